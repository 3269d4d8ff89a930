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
use tracing::{debug, info, warn};

use super::{cli_command, CliError};

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
    /// The managed master exited.
    Exited(std::io::Result<ExitStatus>),
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

/// A HAProxy master that weft started and supervises.
pub struct Managed {
    child: Child,
    pid: u32,
    output: Arc<Mutex<VecDeque<String>>>,
}

/// How to start HAProxy.
#[derive(Debug, Clone)]
pub struct Launch {
    pub binary: PathBuf,
    pub master_socket: PathBuf,
    pub config_file: PathBuf,
    pub pid_file: PathBuf,
}

impl Managed {
    /// Starts `haproxy -W -S <socket>,mode,600 -f <config> -p <pidfile>` and waits until the
    /// master answers with a worker running.
    pub async fn start(launch: &Launch) -> Result<Managed, ProcessError> {
        stop_leftover(launch).await;
        let _ = std::fs::remove_file(&launch.master_socket);
        let mut child = super::scrub_env(&mut Command::new(&launch.binary))
            .arg("-W")
            .arg("-S")
            .arg(format!("{},mode,600", launch.master_socket.display()))
            .arg("-f")
            .arg(&launch.config_file)
            .arg("-p")
            .arg(&launch.pid_file)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| ProcessError::Spawn {
                binary: launch.binary.clone(),
                source,
            })?;
        let pid = child.id().unwrap_or_default();
        let output = Arc::new(Mutex::new(VecDeque::new()));
        if let Some(stdout) = child.stdout.take() {
            tokio::spawn(forward_output(stdout, output.clone()));
        }
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(forward_output(stderr, output.clone()));
        }
        let mut managed = Managed { child, pid, output };

        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = managed.child.try_wait().ok().flatten() {
                return Err(ProcessError::ExitedAtStart {
                    status,
                    output: managed.recent_output(),
                });
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

    /// The last lines HAProxy printed, for error messages.
    pub fn recent_output(&self) -> String {
        let lines = self.output.lock().map(|o| o.clone()).unwrap_or_default();
        Vec::from(lines).join(" | ")
    }

    /// Resolves when the master exits.
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        self.child.wait().await
    }

    /// Soft stop (SIGUSR1: workers finish their connections), then SIGKILL after `grace`.
    pub async fn stop(mut self, grace: Duration) {
        if signal(self.pid, Signal::SIGUSR1) {
            if let Ok(Ok(status)) = tokio::time::timeout(grace, self.child.wait()).await {
                info!(pid = self.pid, %status, "haproxy stopped");
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

    async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }
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

/// A HAProxy left running by an earlier weft that died without stopping it would hold the
/// port: stop it, but only if the pid file names a haproxy started on this very config.
async fn stop_leftover(launch: &Launch) {
    let Ok(text) = std::fs::read_to_string(&launch.pid_file) else {
        return;
    };
    let Some(pid) = text
        .lines()
        .next()
        .and_then(|l| l.trim().parse::<u32>().ok())
    else {
        return;
    };
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return;
    };
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    let config = launch.config_file.display().to_string();
    if !cmdline.contains("haproxy") || !cmdline.contains(&config) {
        return;
    }
    warn!(
        pid,
        "stopping a haproxy left running by an earlier weft on the same config"
    );
    signal(pid, Signal::SIGUSR1);
    for _ in 0..200 {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return;
        }
        tokio::time::sleep(POLL).await;
    }
    signal(pid, Signal::SIGKILL);
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
