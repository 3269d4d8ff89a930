//! HAProxy in master-worker mode: start it, watch it, stop it, and read its master CLI.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

use super::files::PID_FILE;
use super::{cli_command, CliError};
use crate::config::HaproxyConfig;

/// How long a fresh HAProxy may take to answer on its master socket with a worker running.
const START_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(25);
/// How often an external HAProxy's master is asked whether it still runs, and how many tries
/// in a row must fail before it counts as gone.
pub const LIVENESS_INTERVAL: Duration = Duration::from_secs(2);
pub const SILENT_TRIES: u32 = 3;
/// How often a reload's progress is read from the master.
const RELOAD_POLL: Duration = Duration::from_millis(5);
/// Lines of HAProxy's own output kept for error messages.
const KEPT_OUTPUT_LINES: usize = 20;
/// How often an adopted master (not weft's child, so no exit notice) is looked for in /proc.
const ADOPTED_POLL: Duration = Duration::from_millis(50);
/// How long a leftover master that does not answer gets to stop before SIGKILL.
const LEFTOVER_GRACE: Duration = Duration::from_secs(5);

/// HAProxy's stdout and stderr, inside run_dir: a FIFO rather than a pipe to weft, so that a
/// later weft, which adopts this HAProxy, reads what it prints. While no weft runs, HAProxy's
/// writes fail (EPIPE; HAProxy ignores SIGPIPE) and those lines are lost.
pub const OUTPUT_FIFO: &str = "haproxy.output";

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot start {binary}: {source}")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("haproxy exited during start-up ({status}): {output}")]
    ExitedAtStart { status: ExitStatus, output: String },
    #[error("haproxy did not come up within {timeout:?}: {output}")]
    StartTimeout { timeout: Duration, output: String },
    #[error("unexpected answer to `show proc`: {answer:?}")]
    ShowProc { answer: String },
    #[error(transparent)]
    Cli(#[from] CliError),
    #[error("reload: {0}")]
    Reload(#[source] CliError),
    #[error(
        "reload not confirmed within {timeout:?}: the master's reload counter stayed at {reloads}"
    )]
    ReloadTimeout { timeout: Duration, reloads: u64 },
    #[error("haproxy failed to load the new config (show proc: failed: {failed}); the last good files are restored and the old worker keeps serving")]
    ReloadFailed { failed: u64 },
}

/// The master and worker lines of `show proc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcStatus {
    pub master_pid: u32,
    /// Reloads since the master started.
    pub reloads: u64,
    /// Failed loads since the last successful one.
    pub failed: u64,
    /// `(pid, reloads survived)` of each worker; the current worker has 0.
    pub workers: Vec<(u32, u64)>,
}

impl ProcStatus {
    /// Parses `show proc`: `<pid> master <reloads> [failed: N] <uptime> <version>`, then one
    /// line per worker under `# workers`.
    pub fn parse(answer: &str) -> Option<ProcStatus> {
        let mut master = None;
        let mut workers = Vec::new();
        for line in answer.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields.as_slice() {
                [pid, "master", reloads, "[failed:", failed, ..] => {
                    let failed = failed.trim_end_matches(']');
                    master = Some((
                        pid.parse().ok()?,
                        reloads.parse().ok()?,
                        failed.parse().ok()?,
                    ));
                }
                [pid, "worker", reloads, ..] => {
                    workers.push((pid.parse().ok()?, reloads.parse().ok()?));
                }
                _ => {}
            }
        }
        let (master_pid, reloads, failed) = master?;
        Some(ProcStatus {
            master_pid,
            reloads,
            failed,
            workers,
        })
    }
}

/// Asks the master for its process list.
pub async fn show_proc(master_socket: &Path) -> Result<ProcStatus, ProcessError> {
    let answer = cli_command(master_socket, "show proc").await?;
    ProcStatus::parse(&answer).ok_or(ProcessError::ShowProc { answer })
}

/// `show proc`, retried while the master refuses connections (it does for a moment after a
/// reload), up to `timeout`.
pub async fn master_status(
    master_socket: &Path,
    timeout: Duration,
) -> Result<ProcStatus, ProcessError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match show_proc(master_socket).await {
            Err(ProcessError::Cli(err))
                if err.is_refused() && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(RELOAD_POLL).await
            }
            status => return status,
        }
    }
}

/// Asks the master to reload and waits until its reload counter passes `before`: the new
/// worker runs, or the load failed (`failed` > 0). Returns the new counter.
pub async fn reload(
    master_socket: &Path,
    before: u64,
    timeout: Duration,
) -> Result<u64, ProcessError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match cli_command(master_socket, "reload").await {
            Ok(_) => break,
            Err(err) if err.is_refused() && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(RELOAD_POLL).await
            }
            Err(err) => return Err(ProcessError::Reload(err)),
        }
    }
    loop {
        match show_proc(master_socket).await {
            Ok(proc) if proc.reloads > before && proc.failed > 0 => {
                return Err(ProcessError::ReloadFailed {
                    failed: proc.failed,
                })
            }
            Ok(proc) if proc.reloads > before => return Ok(proc.reloads),
            Ok(_) => {}
            Err(err) => debug!(error = %err, "show proc during reload"),
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ProcessError::ReloadTimeout {
                timeout,
                reloads: before,
            });
        }
        tokio::time::sleep(RELOAD_POLL).await;
    }
}

/// Why HAProxy no longer runs.
#[derive(Debug)]
pub enum Gone {
    /// The managed master exited: how, as far as weft can tell.
    Exited(String),
    /// The external master stopped answering on its socket.
    Silent(ProcessError),
}

/// Whether an external HAProxy's master still answers: `show proc` every
/// [`LIVENESS_INTERVAL`], and [`SILENT_TRIES`] failed tries in a row over one interval make it
/// gone, so that the moment a reload makes it refuse connections is not taken for a death.
/// The schedule and the count live here, not in the future that waits: the caller's loop
/// drops that future whenever something else happens first, and the probe must go on.
#[derive(Debug)]
pub struct Liveness {
    next: tokio::time::Instant,
    failed: u32,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            next: tokio::time::Instant::now() + LIVENESS_INTERVAL,
            failed: 0,
        }
    }
}

impl Liveness {
    /// Resolves once the master no longer answers; cancel-safe.
    pub async fn until_silent(&mut self, master_socket: &Path) -> ProcessError {
        loop {
            tokio::time::sleep_until(self.next).await;
            let answer = show_proc(master_socket).await;
            let now = tokio::time::Instant::now();
            match answer {
                Ok(_) => {
                    self.failed = 0;
                    self.next = now + LIVENESS_INTERVAL;
                }
                Err(err) => {
                    self.failed += 1;
                    if self.failed >= SILENT_TRIES {
                        *self = Liveness::default();
                        return err;
                    }
                    self.next = now + LIVENESS_INTERVAL / SILENT_TRIES;
                }
            }
        }
    }
}

/// A HAProxy master that weft supervises: one it started, or one an earlier weft left running
/// on the same run_dir, adopted.
pub struct Managed {
    master: Master,
    pid: u32,
    output: Arc<Mutex<VecDeque<String>>>,
    /// Reads [`OUTPUT_FIFO`]; it never ends by itself (weft holds the FIFO's write side too).
    /// `None` when the FIFO of an adopted HAProxy could not be opened.
    reader: Option<JoinHandle<()>>,
}

enum Master {
    /// weft's child: its exit is a notice.
    Child(Child),
    /// Another weft's child (now init's), or weft's own from before an exec: watched in /proc.
    Adopted,
}

/// How to start HAProxy.
#[derive(Debug, Clone)]
pub struct Launch {
    pub binary: PathBuf,
    pub master_socket: PathBuf,
    pub config_file: PathBuf,
    pub pid_file: PathBuf,
    pub output_fifo: PathBuf,
}

impl Launch {
    pub fn new(config: &HaproxyConfig) -> Launch {
        Launch {
            binary: config.binary.clone(),
            master_socket: config.master_socket.clone(),
            config_file: config.config_file.clone(),
            pid_file: config.run_dir.join(PID_FILE),
            output_fifo: config.run_dir.join(OUTPUT_FIFO),
        }
    }
}

/// `weft stop`: stops the HAProxy a weft left serving on `launch`'s files ([`is_ours`]),
/// gracefully: SIGUSR1, SIGKILL after `grace`. Returns its pid, `None` when there was none.
pub async fn stop_kept(launch: &Launch, grace: Duration) -> Option<u32> {
    let pid = read_pid_file(&launch.pid_file).filter(|pid| is_ours(launch, *pid) && alive(*pid))?;
    stop_pid(pid, grace).await;
    Some(pid)
}

impl Managed {
    /// Starts `haproxy -W -S <socket>,mode,600 -f <config> -p <pidfile>` and waits until the
    /// master answers with a worker running. HAProxy gets a process group of its own (a ^C
    /// meant for weft is weft's to handle) and no `kill_on_drop`: whether it outlives weft is
    /// `haproxy.on_exit`'s to say, and a weft killed outright leaves it serving.
    pub async fn start(launch: &Launch) -> Result<Managed, ProcessError> {
        stop_leftover(launch).await;
        let _ = std::fs::remove_file(&launch.master_socket);
        let output = Arc::new(Mutex::new(VecDeque::new()));
        let spawn_err = |source| ProcessError::Spawn {
            binary: launch.binary.clone(),
            source,
        };
        let (reader, writer) =
            open_output(&launch.output_fifo, output.clone()).map_err(spawn_err)?;
        let stderr = writer.try_clone().map_err(spawn_err)?;
        let mut command = Command::new(&launch.binary);
        super::scrub_env(&mut command)
            .arg("-W")
            .arg("-S")
            .arg(format!("{},mode,600", launch.master_socket.display()))
            .arg("-f")
            .arg(&launch.config_file)
            .arg("-p")
            .arg(&launch.pid_file)
            .stdin(Stdio::null())
            .stdout(writer)
            .stderr(stderr)
            .process_group(0);
        // HAProxy runs with the host's huge page setting, not the daemon's own (see pages).
        let spawned = crate::pages::spawn_with_host_pages(|| command.spawn());
        let child = match spawned {
            Ok(child) => child,
            Err(source) => {
                reader.abort();
                return Err(spawn_err(source));
            }
        };
        let pid = child.id().unwrap_or_default();
        let mut managed = Managed {
            master: Master::Child(child),
            pid,
            output,
            reader: Some(reader),
        };

        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            if let Master::Child(child) = &mut managed.master {
                if let Some(status) = child.try_wait().ok().flatten() {
                    return Err(ProcessError::ExitedAtStart {
                        status,
                        output: managed.recent_output(),
                    });
                }
            }
            match show_proc(&launch.master_socket).await {
                Ok(proc) if !proc.workers.is_empty() => {
                    info!(pid, master_socket = %launch.master_socket.display(), "haproxy started");
                    return Ok(managed);
                }
                Ok(_) | Err(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(POLL).await
                }
                _ => {
                    managed.kill().await;
                    return Err(ProcessError::StartTimeout {
                        timeout: START_TIMEOUT,
                        output: managed.recent_output(),
                    });
                }
            }
        }
    }

    /// Takes over the HAProxy an earlier weft left running on this run_dir, if there is one
    /// and it is sound: the pid file names a process whose executable is `launch.binary` and
    /// whose arguments are this config file and master socket ([`is_ours`]), and that master
    /// answers `show proc` under the same pid with a worker running. One of ours that does not
    /// answer is stopped (weft starts its own); anything else is left alone.
    pub async fn adopt(launch: &Launch) -> Option<Managed> {
        let pid = read_pid_file(&launch.pid_file)?;
        if !is_ours(launch, pid) {
            return None;
        }
        match master_status(&launch.master_socket, LEFTOVER_GRACE).await {
            Ok(proc) if proc.master_pid == pid && !proc.workers.is_empty() => {
                let output = Arc::new(Mutex::new(VecDeque::new()));
                let reader = match open_output(&launch.output_fifo, output.clone()) {
                    Ok((reader, _writer)) => Some(reader),
                    Err(err) => {
                        warn!(error = %err, fifo = %launch.output_fifo.display(), "cannot read the adopted haproxy's output");
                        None
                    }
                };
                info!(
                    pid,
                    reloads = proc.reloads,
                    workers = proc.workers.len(),
                    "adopted the haproxy an earlier weft left serving"
                );
                Some(Managed {
                    master: Master::Adopted,
                    pid,
                    output,
                    reader,
                })
            }
            answer => {
                let answer = match answer {
                    Ok(proc) => format!("{proc:?}"),
                    Err(err) => err.to_string(),
                };
                warn!(pid, %answer, "a haproxy of an earlier weft runs on this config but its master does not answer as expected: stopping it");
                stop_pid(pid, LEFTOVER_GRACE).await;
                None
            }
        }
    }

    /// The master's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The last lines HAProxy printed, for error messages.
    pub fn recent_output(&self) -> String {
        let lines = self.output.lock().map(|o| o.clone()).unwrap_or_default();
        Vec::from(lines).join(" | ")
    }

    /// Resolves when the master exits; says how.
    pub async fn wait(&mut self) -> String {
        match &mut self.master {
            Master::Child(child) => match child.wait().await {
                Ok(status) => status.to_string(),
                Err(err) => format!("cannot wait for it: {err}"),
            },
            Master::Adopted => {
                while alive(self.pid) {
                    tokio::time::sleep(ADOPTED_POLL).await;
                }
                format!("the adopted master (pid {}) is gone", self.pid)
            }
        }
    }

    /// Soft stop (SIGUSR1: workers finish their connections), then SIGKILL after `grace`.
    pub async fn stop(mut self, grace: Duration) {
        if signal(self.pid, Signal::SIGUSR1) {
            if let Ok(how) = tokio::time::timeout(grace, self.wait()).await {
                info!(pid = self.pid, %how, "haproxy stopped");
                return;
            }
            warn!(
                pid = self.pid,
                ?grace,
                "haproxy did not stop in time, killing it"
            );
        }
        self.kill().await;
    }

    /// Leaves HAProxy serving on its own, for the next weft to adopt.
    pub fn release(self) {
        info!(
            pid = self.pid,
            "haproxy keeps serving its last good config: the next weft adopts it, `weft stop` stops it"
        );
    }

    async fn kill(&mut self) {
        match &mut self.master {
            Master::Child(child) => {
                let _ = child.kill().await;
            }
            Master::Adopted => {
                signal(self.pid, Signal::SIGKILL);
                let _ = tokio::time::timeout(START_TIMEOUT, self.wait()).await;
            }
        }
    }
}

impl Drop for Managed {
    fn drop(&mut self) {
        if let Some(reader) = &self.reader {
            reader.abort();
        }
    }
}

/// Makes HAProxy's output FIFO if it is missing (0600; anything else at its path is replaced)
/// and opens it: a task that forwards each line to the log, and the write side for HAProxy.
/// weft's side is opened read-write, so it never reads an end while weft runs.
fn open_output(
    path: &Path,
    kept: Arc<Mutex<VecDeque<String>>>,
) -> std::io::Result<(JoinHandle<()>, std::fs::File)> {
    use std::os::unix::fs::FileTypeExt;
    let is_fifo = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_fifo());
    if !is_fifo {
        let _ = std::fs::remove_file(path);
        nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .map_err(std::io::Error::from)?;
    }
    let receiver = tokio::net::unix::pipe::OpenOptions::new()
        .read_write(true)
        .open_receiver(path)?;
    let writer = std::fs::OpenOptions::new().write(true).open(path)?;
    Ok((tokio::spawn(forward_output(receiver, kept)), writer))
}

/// Whether `pid` runs (a zombie does not: it is reaped here if it is weft's own child, as a
/// master started before an exec of weft is).
fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let zombie = stat
        .rsplit_once(')')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
    if zombie {
        if let Ok(pid) = i32::try_from(pid) {
            let _ = nix::sys::wait::waitpid(
                Pid::from_raw(pid),
                Some(nix::sys::wait::WaitPidFlag::WNOHANG),
            );
        }
    }
    !zombie
}

fn signal(pid: u32, signal: Signal) -> bool {
    match i32::try_from(pid) {
        Ok(pid) if pid > 0 => kill(Pid::from_raw(pid), signal).is_ok(),
        _ => false,
    }
}

async fn forward_output(stream: impl AsyncRead + Unpin, kept: Arc<Mutex<VecDeque<String>>>) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        // Every reload makes each old proxy print "Proxy X stopped": routine, not a warning.
        if line.contains("[ALERT]") {
            warn!(target: "haproxy", "{line}");
        } else if line.contains("[WARNING]") && !line.contains("stopped (cumulated conns") {
            info!(target: "haproxy", "{line}");
        } else {
            debug!(target: "haproxy", "{line}");
        }
        if let Ok(mut kept) = kept.lock() {
            if kept.len() == KEPT_OUTPUT_LINES {
                kept.pop_front();
            }
            kept.push_back(line);
        }
    }
}

/// The master's pid, as the pid file's first line says.
pub fn read_pid_file(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// Whether `pid` is a HAProxy master weft started on `launch`: its executable is
/// `launch.binary` (or was, before a package upgrade replaced the file), and its arguments
/// name this config file after `-f` and this master socket after `-S`. Never a guess from a
/// substring: weft signals what passes.
pub fn is_ours(launch: &Launch, pid: u32) -> bool {
    let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) else {
        return false;
    };
    let exe = exe.to_string_lossy();
    let exe = exe.strip_suffix(" (deleted)").unwrap_or(&exe);
    let binary = std::fs::canonicalize(&launch.binary).unwrap_or_else(|_| launch.binary.clone());
    if Path::new(exe) != binary {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let follows = |flag: &str, value: &dyn Fn(&[u8]) -> bool| {
        args.windows(2)
            .any(|pair| pair[0] == flag.as_bytes() && value(pair[1]))
    };
    let config = launch.config_file.as_os_str().as_encoded_bytes();
    let socket = launch.master_socket.as_os_str().as_encoded_bytes();
    follows("-f", &|arg| arg == config)
        && follows("-S", &|arg| {
            arg.split(|b| *b == b',').next() == Some(socket)
        })
}

/// A HAProxy master of an earlier weft on this config that still runs when weft starts its own
/// would hold the port: stop it ([`is_ours`] decides; a stranger is left alone).
async fn stop_leftover(launch: &Launch) {
    let Some(pid) = read_pid_file(&launch.pid_file) else {
        return;
    };
    if is_ours(launch, pid) && alive(pid) {
        warn!(
            pid,
            "stopping a haproxy left running by an earlier weft on the same config"
        );
        stop_pid(pid, LEFTOVER_GRACE).await;
    }
}

/// SIGUSR1 to `pid`, then SIGKILL after `grace`.
async fn stop_pid(pid: u32, grace: Duration) {
    signal(pid, Signal::SIGUSR1);
    let deadline = tokio::time::Instant::now() + grace;
    while alive(pid) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(POLL).await;
    }
    if alive(pid) {
        error!(pid, ?grace, "haproxy did not stop in time, killing it");
        signal(pid, Signal::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_show_proc() {
        let answer =
            "#<PID>          <type>          <reloads>       <uptime>        <version>      \n\
3147            master          2 [failed: 1]   0d00h00m01s     2.6.12-1+deb12u4\n\
# workers\n\
3150            worker          0               0d00h00m01s     2.6.12-1+deb12u4\n\
3149            worker          1               0d00h00m03s     2.6.12-1+deb12u4\n\
# programs\n\n";
        let proc = ProcStatus::parse(answer).unwrap();
        assert_eq!(proc.master_pid, 3147);
        assert_eq!(proc.reloads, 2);
        assert_eq!(proc.failed, 1);
        assert_eq!(proc.workers, vec![(3150, 0), (3149, 1)]);
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(ProcStatus::parse("Unknown command\n"), None);
    }
}
