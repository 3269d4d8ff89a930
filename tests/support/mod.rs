//! Test support: loopback backends, a weft process with real HAProxy, polling helpers.
//!
//! Everything started here is stopped by a Drop guard, also when the test panics.

#![allow(dead_code, clippy::unwrap_used)]

use std::fmt::Debug;
use std::future::Future;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod consul;
pub mod fixtures;
pub mod killable;
pub mod marathon;
pub mod netns;

use axum::extract::Request;
use axum::Router;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UnixStream};
use tokio::task::JoinHandle;

pub const HAPROXY: &str = "/usr/sbin/haproxy";

/// Fails the test, saying what is missing, when HAProxy is not installed.
pub fn require_haproxy() {
    assert!(
        Path::new(HAPROXY).exists(),
        "{HAPROXY} is missing: these tests run the real HAProxy 2.6 (apt-get install haproxy)"
    );
}

/// An HTTP server on 127.0.0.1:0 that answers every request with its name.
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Backend {
    pub async fn start(name: &str) -> Backend {
        Backend::start_at(name, "127.0.0.1:0").await
    }

    /// A backend on a given loopback address, e.g. `127.0.0.2:<port of another backend>`:
    /// tasks of one Marathon app share the container port and differ by IP.
    pub async fn start_at(name: &str, addr: &str) -> Backend {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let body = name.to_string();
        let app = Router::new().fallback(move |_: Request| {
            let body = body.clone();
            async move { body }
        });
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Backend {
            name: name.to_string(),
            addr,
            task,
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `weft run` process in its own temporary directory, with HAProxy on a loopback port.
pub struct Weft {
    pub dir: tempfile::TempDir,
    pub port: u16,
    /// Where weft's status endpoints listen.
    pub status_port: u16,
    child: Option<Child>,
}

impl Weft {
    /// Writes weft.toml and services.toml and starts `weft run` (managed mode).
    pub fn start(services: &str) -> Weft {
        let dir = tempfile::Builder::new()
            .prefix("weft-test-")
            .tempdir()
            .unwrap();
        Weft::start_in(dir, free_port(), "", services)
    }

    /// Starts `weft run` in `dir` with HAProxy on `port`; `haproxy_keys` go into `[haproxy]`.
    pub fn start_in(dir: tempfile::TempDir, port: u16, haproxy_keys: &str, services: &str) -> Weft {
        Weft::start_full(dir, port, haproxy_keys, "", services)
    }

    /// Starts `weft run` with extra weft.toml sections (a source, `[routing]`...) and an
    /// empty services file.
    pub fn start_sections(sections: &str) -> Weft {
        let dir = tempfile::Builder::new()
            .prefix("weft-test-")
            .tempdir()
            .unwrap();
        Weft::start_full(dir, free_port(), "", &format!("\n{sections}\n"), "")
    }

    /// Starts `weft run` with a Consul source at `consul_url` (and an empty services file);
    /// `consul_keys` go into `[sources.consul]`, `extra` after it (e.g. a `[routing]` section).
    pub fn start_consul(consul_url: &str, consul_keys: &str, extra: &str) -> Weft {
        let dir = tempfile::Builder::new()
            .prefix("weft-test-")
            .tempdir()
            .unwrap();
        let sections =
            format!("\n[sources.consul]\nurl = {consul_url:?}\n{consul_keys}\n{extra}\n");
        Weft::start_full(dir, free_port(), "", &sections, "")
    }

    fn start_full(
        dir: tempfile::TempDir,
        port: u16,
        haproxy_keys: &str,
        sections: &str,
        services: &str,
    ) -> Weft {
        require_haproxy();
        let status_port = free_port();
        // The churn benchmark reads the file sooner than the tests need to.
        let debounce = std::env::var("WEFT_TEST_DEBOUNCE").unwrap_or_else(|_| "50ms".into());
        let config = format!(
            "[haproxy]\nbind = \"127.0.0.1:{port}\"\nrun_dir = \"run\"\nhard_stop_after = \"5s\"\n{haproxy_keys}\n\
             [network]\nallowed = [\"127.0.0.0/8\"]\n\n\
             [bridge]\nmode = \"off\"\n\n\
             [status]\nlisten = \"127.0.0.1:{status_port}\"\n\n\
             [sources.file]\npath = \"services.toml\"\ndebounce = \"{debounce}\"\n{sections}"
        );
        std::fs::write(dir.path().join("weft.toml"), config).unwrap();
        std::fs::write(dir.path().join("services.toml"), services).unwrap();
        let mut weft = Weft {
            dir,
            port,
            status_port,
            child: None,
        };
        weft.spawn();
        weft
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.log_path()).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_weft"))
            .arg("run")
            .arg("-c")
            .arg(self.dir.path().join("weft.toml"))
            .env("WEFT_LOG", "info,weft=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn run_dir(&self) -> PathBuf {
        self.path("run")
    }

    pub fn log_path(&self) -> PathBuf {
        self.path("weft.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Waits until weft's log holds `want`.
    pub async fn wait_for_log(&self, want: &str) {
        eventually(
            Duration::from_secs(10),
            &format!("log line {want:?}"),
            || async { self.log().contains(want).then_some(()).ok_or(()) },
        )
        .await
    }

    /// Replaces services.toml the way most editors save: a new file renamed over the old.
    pub fn write_services(&self, services: &str) {
        let tmp = self.path(".services.toml.swp");
        std::fs::write(&tmp, services).unwrap();
        std::fs::rename(&tmp, self.path("services.toml")).unwrap();
    }

    /// Rewrites services.toml in place (truncate + write), as `echo >` does.
    pub fn overwrite_services(&self, services: &str) {
        std::fs::write(self.path("services.toml"), services).unwrap();
    }

    /// GET through HAProxy with a Host header: (status, body).
    pub async fn get(&self, host: &str, path: &str) -> Result<(u16, String), String> {
        get(self.port, host, path).await
    }

    /// GET a status endpoint: (status, body).
    pub async fn status(&self, path: &str) -> Result<(u16, String), String> {
        get(self.status_port, "localhost", path).await
    }

    /// The master's `show proc`: (reload counter, failed counter, worker count). The master
    /// refuses connections for a moment while it reloads: retried until it answers.
    pub async fn show_proc(&self) -> Result<(u64, u64, usize), String> {
        let socket = self.run_dir().join("master.sock");
        let answer = eventually(Duration::from_secs(5), "the master answers", || {
            cli(&socket, "show proc")
        })
        .await;
        let mut master = None;
        let mut workers = 0;
        for line in answer.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields.as_slice() {
                [_, "master", reloads, "[failed:", failed, ..] => {
                    master = Some((
                        reloads.parse().map_err(|_| answer.clone())?,
                        failed
                            .trim_end_matches(']')
                            .parse()
                            .map_err(|_| answer.clone())?,
                    ))
                }
                [_, "worker", ..] => workers += 1,
                _ => {}
            }
        }
        let (reloads, failed) = master.ok_or_else(|| answer.clone())?;
        Ok((reloads, failed, workers))
    }

    /// The HAProxy master's pid, from the pid file weft has it write.
    pub fn haproxy_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.run_dir().join("haproxy.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Sends SIGTERM to weft and waits for it to exit; returns its exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        terminate(self.child.take()?)
    }
}

impl Drop for Weft {
    fn drop(&mut self) {
        let pid = self.haproxy_pid();
        self.stop();
        // If weft could not stop its HAProxy, do it here: no process outlives the test.
        if let Some(pid) = pid {
            if process_alive(pid) {
                signal(pid, "KILL");
            }
        }
        if std::thread::panicking() {
            eprintln!("---- weft log ----\n{}", self.log());
        }
    }
}

/// SIGTERM to `child`, then waits for it (SIGKILL after 15 s); its exit status.
pub fn terminate(mut child: Child) -> Option<std::process::ExitStatus> {
    signal(child.id() as i32, "TERM");
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait().ok()
}

pub fn process_alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // A zombie has exited; only its parent has not reaped it yet.
    !stat
        .rsplit_once(')')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
}

pub fn signal(pid: i32, name: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status();
}

/// One exchange on an HAProxy CLI socket.
pub async fn cli(socket: &Path, command: &str) -> Result<String, String> {
    let mut stream = UnixStream::connect(socket)
        .await
        .map_err(|e| format!("{}: {e}", socket.display()))?;
    stream
        .write_all(format!("{command};quit\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut answer))
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(answer)
}

/// GET `http://127.0.0.1:port/path` with `Host: host`, on a fresh connection.
pub async fn get(port: u16, host: &str, path: &str) -> Result<(u16, String), String> {
    get_at(
        SocketAddr::from(([127, 0, 0, 1], port)),
        host,
        path,
        Duration::from_secs(5),
    )
    .await
}

/// GET `http://addr/path` with `Host: host`, on a fresh connection: status and body.
pub async fn get_at(
    addr: SocketAddr,
    host: &str,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String), String> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(timeout)
        .build()
        .map_err(|e| e.to_string())?;
    let response = client
        .get(format!("http://{addr}{path}"))
        .header("Host", host)
        .send()
        .await
        .map_err(|e| format!("{e:?}"))?;
    let status = response.status().as_u16();
    let body = response.text().await.map_err(|e| e.to_string())?;
    Ok((status, body))
}

/// Polls `check` until it returns `Ok`, failing the test with the last error at `timeout`.
pub async fn eventually<T, E: Debug, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(err) if Instant::now() >= deadline => {
                panic!("{what}: not true after {timeout:?}; last: {err:?}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(25)).await,
        }
    }
}

/// Waits until `host` + `path` answers 200 from exactly the backends named in `expected`
/// (each of them seen, no other), sampling enough requests to see round robin go round.
pub async fn wait_for_backends(weft: &Weft, host: &str, path: &str, expected: &[&str]) {
    let mut want: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
    want.sort();
    eventually(
        Duration::from_secs(5),
        &format!("{host}{path} served by {expected:?}"),
        || async {
            let mut seen = Vec::new();
            for _ in 0..(expected.len() * 4) {
                let (status, body) = weft.get(host, path).await?;
                if status != 200 {
                    return Err(format!("status {status}: {body}"));
                }
                if !seen.contains(&body) {
                    seen.push(body);
                }
            }
            seen.sort();
            if seen == want {
                Ok(())
            } else {
                Err(format!("seen {seen:?}"))
            }
        },
    )
    .await
}

/// Waits until weft's `/healthz` body mentions `want` (`ok`, or a problem's words).
pub async fn wait_for_healthz(weft: &Weft, want: &str) {
    eventually(
        Duration::from_secs(10),
        &format!("healthz {want}"),
        || async {
            match weft.status("/healthz").await? {
                (_, body) if body.contains(want) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
}

/// Waits until `host` + `path` answers weft's 404.
pub async fn wait_for_404(weft: &Weft, host: &str, path: &str) {
    eventually(
        Duration::from_secs(5),
        &format!("{host}{path} -> 404"),
        || async {
            match weft.get(host, path).await? {
                (404, body) if body.contains("no route") => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await
}

/// A `[[service]]` entry.
pub fn service(name: &str, hosts: &[&str], path: Option<&str>, servers: &[SocketAddr]) -> String {
    let hosts: Vec<String> = hosts.iter().map(|h| format!("{h:?}")).collect();
    let servers: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
    let path = path.map(|p| format!("path = {p:?}\n")).unwrap_or_default();
    format!(
        "[[service]]\nname = {name:?}\nhosts = [{}]\n{path}servers = [{}]\n\n",
        hosts.join(", "),
        servers.join(", ")
    )
}

/// A HAProxy started by the test itself, as systemd would start it for external mode:
/// `haproxy -W -S <master.sock> -f <haproxy.cfg> -p <pid>`. Killed on drop.
pub struct ExternalHaproxy {
    pub master_socket: PathBuf,
    pub config_file: PathBuf,
    child: Child,
}

impl ExternalHaproxy {
    /// Starts HAProxy in `dir` on a config that answers every request on `port` with `body`.
    pub fn start(dir: &Path, port: u16, body: &str) -> ExternalHaproxy {
        require_haproxy();
        let config_file = dir.join("haproxy.cfg");
        let master_socket = dir.join("external-master.sock");
        std::fs::write(
            &config_file,
            format!(
                "defaults\n    mode http\n    timeout connect 1s\n    timeout client 5s\n    timeout server 5s\n\
                 frontend http\n    bind 127.0.0.1:{port}\n    http-request return status 200 content-type text/plain string {body:?}\n"
            ),
        )
        .unwrap();
        let child = Self::spawn(&master_socket, &config_file);
        ExternalHaproxy {
            master_socket,
            config_file,
            child,
        }
    }

    fn spawn(master_socket: &Path, config_file: &Path) -> Child {
        Command::new(HAPROXY)
            .arg("-W")
            .arg("-S")
            .arg(format!("{},mode,600", master_socket.display()))
            .arg("-f")
            .arg(config_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills the master (its worker follows it), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on whatever its config file says now, as systemd's restart would.
    pub fn restart(&mut self) {
        self.kill();
        self.child = Self::spawn(&self.master_socket, &self.config_file);
    }
}

impl Drop for ExternalHaproxy {
    fn drop(&mut self) {
        self.kill();
    }
}
