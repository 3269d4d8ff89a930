//! Test support: loopback backends, a weft process with real HAProxy ([`Weft::builder`]),
//! polling helpers.
//!
//! Everything started here is stopped by a Drop guard, also when the test panics.
//!
//! Patience: `WEFT_TEST_PATIENCE` (a positive number, default 1) scales every wait and
//! deadline of the tests, so that a slow or loaded machine can run them with, say,
//! `WEFT_TEST_PATIENCE=3 cargo test`. The helpers here (`eventually`, the `wait_for_*`
//! functions, `netns::wait_until`, the doubles' waits, request timeouts) scale their own
//! timeouts; a test's own deadline goes through [`patience`]. Not scaled: what weft and the
//! doubles are configured with (a Consul `wait`, a read timeout, a heartbeat, a delay), since
//! that is part of what the tests look at.

#![allow(dead_code, clippy::unwrap_used)]

use std::fmt::Debug;
use std::future::Future;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub mod consul;
pub mod fixtures;
pub mod killable;
pub mod marathon;
pub mod netns;
pub mod pebble;
pub mod tls;

use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequest, Request};
use axum::response::IntoResponse;
use axum::Router;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UnixStream};
use tokio::task::JoinHandle;
use weft::config::RuntimeUpdates;

pub const HAPROXY: &str = "/usr/sbin/haproxy";

/// `wait` scaled by `WEFT_TEST_PATIENCE` (see the top of this file).
pub fn patience(wait: Duration) -> Duration {
    static FACTOR: OnceLock<f64> = OnceLock::new();
    let factor = *FACTOR.get_or_init(|| match std::env::var("WEFT_TEST_PATIENCE") {
        Err(_) => 1.0,
        Ok(text) => match text.trim().parse::<f64>() {
            Ok(factor) if factor.is_finite() && factor > 0.0 => factor,
            _ => panic!("WEFT_TEST_PATIENCE must be a positive number such as 3, not {text:?}"),
        },
    });
    wait.mul_f64(factor)
}

/// Fails the test, saying what is missing, when HAProxy is not installed.
pub fn require_haproxy() {
    assert!(
        Path::new(HAPROXY).exists(),
        "{HAPROXY} is missing: these tests run the real HAProxy 2.6 (apt-get install haproxy)"
    );
}

/// An HTTP server on 127.0.0.1:0 that answers every request with its name, and echoes the
/// messages of a WebSocket when asked to upgrade.
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
        let app = Router::new().fallback(move |request: Request| {
            let body = body.clone();
            async move {
                // A WebSocket upgrade: every message comes back (benches/churn.rs).
                if request.headers().contains_key(axum::http::header::UPGRADE) {
                    return match WebSocketUpgrade::from_request(request, &()).await {
                        Ok(upgrade) => upgrade.on_upgrade(echo),
                        Err(rejection) => rejection.into_response(),
                    };
                }
                body.into_response()
            }
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

/// Echoes every text and binary message of a WebSocket until it closes.
async fn echo(mut socket: WebSocket) {
    while let Some(Ok(message)) = socket.recv().await {
        let echoed = match message {
            WsMessage::Text(_) | WsMessage::Binary(_) => socket.send(message).await,
            WsMessage::Close(_) => return,
            _ => Ok(()),
        };
        if echoed.is_err() {
            return;
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A panic's message, when it has one (`panic!` with or without arguments).
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(a panic without a message)")
}

/// A port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `weft run` process in its own temporary directory, with HAProxy on a loopback port;
/// made by [`Weft::builder`].
pub struct Weft {
    pub dir: tempfile::TempDir,
    pub port: u16,
    /// Where weft's status endpoints listen.
    pub status_port: u16,
    child: Option<Child>,
    /// Variables added to weft's environment.
    env: Vec<(String, String)>,
    /// With [`WeftBuilder::tls`]: where HAProxy's TLS bind listens.
    pub tls_port: Option<u16>,
}

/// What a [`Weft`] starts with: a `weft.toml` with HAProxy in managed mode on a free loopback
/// port and HAProxy's default `maxconn` (a quarter of the hard open-files limit), the file source on `services.toml`, the bridge off, `127.0.0.0/8` allowed, and
/// what the methods add.
///
/// ```ignore
/// let weft = Weft::builder().services(&services).consul(&consul.url()).start().await;
/// ```
#[must_use]
pub struct WeftBuilder {
    dir: Option<tempfile::TempDir>,
    port: Option<u16>,
    services: Option<String>,
    haproxy_keys: Vec<String>,
    maxconn: Option<u32>,
    soft_open_files: Option<u64>,
    debounce: Duration,
    sources: String,
    domain: Option<String>,
    /// More `[routing]` keys (TOML lines).
    routing: String,
    network: Option<String>,
    env: Vec<(String, String)>,
    hard_stop_after: Duration,
    tls: bool,
}

impl Weft {
    pub fn builder() -> WeftBuilder {
        WeftBuilder {
            dir: None,
            port: None,
            services: None,
            haproxy_keys: Vec::new(),
            maxconn: None,
            soft_open_files: None,
            debounce: Duration::from_millis(50),
            sources: String::new(),
            domain: None,
            routing: String::new(),
            network: None,
            env: Vec::new(),
            hard_stop_after: Duration::from_secs(5),
            tls: false,
        }
    }

    /// The certificates' directory of `[tls]` ([`WeftBuilder::tls`]).
    pub fn certs_dir(&self) -> PathBuf {
        self.path("certs")
    }

    /// Starts `weft run`; with `soft_open_files`, under that soft open-files limit (prlimit
    /// sets it on itself and execs weft, so the pid is weft's).
    fn spawn(&mut self, soft_open_files: Option<u64>) {
        let log = std::fs::File::create(self.log_path()).unwrap();
        let weft = env!("CARGO_BIN_EXE_weft");
        let mut command = match soft_open_files {
            None => Command::new(weft),
            Some(soft) => {
                let mut prlimit = Command::new("prlimit");
                prlimit.arg(format!("--nofile={soft}:")).arg(weft);
                prlimit
            }
        };
        let child = command
            .arg("run")
            .arg("-c")
            .arg(self.dir.path().join("weft.toml"))
            .env("WEFT_LOG", "info,weft=debug")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// weft's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
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

    /// SIGKILL to weft, as a crash or the OOM killer would; waits until it is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts `weft run` again on the same directory (after [`stop`](Self::stop) or
    /// [`kill`](Self::kill)) and waits until its status endpoint answers.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "weft still runs");
        // A new log for the new weft, the old one kept beside it.
        let log = self.log_path();
        let mut old = log.clone().into_os_string();
        old.push(".old");
        let mut previous = std::fs::read(&old).unwrap_or_default();
        previous.extend(std::fs::read(&log).unwrap_or_default());
        std::fs::write(&old, previous).unwrap();
        self.spawn(None);
        self.wait_until_up().await;
    }

    async fn wait_until_up(&self) {
        let pid = self.child.as_ref().unwrap().id() as i32;
        eventually(
            Duration::from_secs(10),
            "weft's status endpoint answers",
            || async {
                // Dropping `weft` on this panic prints its log.
                assert!(process_alive(pid), "weft exited as it started");
                self.status("/healthz").await.map(|_| ())
            },
        )
        .await
    }
}

impl WeftBuilder {
    /// The services file (default: empty). Without it, a `services.toml` that the test laid out
    /// in [`dir`](Self::dir) (a symlink, say) is kept as it is.
    pub fn services(mut self, services: &str) -> Self {
        self.services = Some(services.to_string());
        self
    }

    /// Runs in a directory the test prepared (a wrapper script, a symlinked services file);
    /// the fixture owns it from here, and removes it.
    pub fn dir(mut self, dir: tempfile::TempDir) -> Self {
        self.dir = Some(dir);
        self
    }

    /// HAProxy's port (default: a free one).
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// `haproxy.binary`: another HAProxy (a wrapper that injects faults).
    pub fn binary(self, binary: &Path) -> Self {
        self.haproxy_key("binary", &toml_string(binary.display()))
    }

    /// External mode on an HAProxy the test started, on its port.
    pub fn external(self, haproxy: &ExternalHaproxy) -> Self {
        self.port(haproxy.port)
            .haproxy_key("mode", "\"external\"")
            .haproxy_key(
                "master_socket",
                &toml_string(haproxy.master_socket.display()),
            )
            .haproxy_key("config_file", &toml_string(haproxy.config_file.display()))
    }

    /// `haproxy.log`: the access log to this syslog address.
    pub fn access_log(self, syslog: SocketAddr) -> Self {
        self.haproxy_key("log", &toml_string(syslog))
    }

    /// `haproxy.runtime_updates` (default on).
    pub fn runtime_updates(self, updates: RuntimeUpdates) -> Self {
        let value = match updates {
            RuntimeUpdates::On => "\"on\"",
            RuntimeUpdates::Off => "\"off\"",
        };
        self.haproxy_key("runtime_updates", value)
    }

    /// `haproxy.min_reload_interval` (default weft's, 1 s).
    pub fn min_reload_interval(self, interval: Duration) -> Self {
        self.haproxy_key("min_reload_interval", &toml_duration(interval))
    }

    /// `haproxy.maxconn` (default: unset, weft's default).
    pub fn maxconn(mut self, maxconn: u32) -> Self {
        self.maxconn = Some(maxconn);
        self
    }

    /// Starts weft with this soft open-files limit (default: the test's own), with `prlimit`.
    pub fn soft_open_files(mut self, soft: u64) -> Self {
        self.soft_open_files = Some(soft);
        self
    }

    /// `[tls]` on a free loopback port, with the certificates' directory `certs` (created
    /// here, empty unless the test wrote into it first).
    pub fn tls(mut self) -> Self {
        self.tls = true;
        self
    }

    /// `sources.file.debounce` (default 50 ms, quicker than weft's 200 ms).
    pub fn debounce(mut self, debounce: Duration) -> Self {
        self.debounce = debounce;
        self
    }

    /// A Consul source at `url`; `keys` (TOML lines, e.g. `wait = "2s"`) go into its section.
    pub fn consul(mut self, url: &str, keys: &str) -> Self {
        self.sources += &format!("\n[sources.consul]\nurl = {url:?}\n{keys}\n");
        self
    }

    /// A Marathon source on `urls`; `keys` (TOML lines) go into its section.
    pub fn marathon(mut self, urls: &[String], keys: &str) -> Self {
        let urls: Vec<String> = urls.iter().map(|u| format!("{u:?}")).collect();
        self.sources += &format!(
            "\n[sources.marathon]\nurls = [{}]\n{keys}\n",
            urls.join(", ")
        );
        self
    }

    /// `routing.domain`: Apollo mode, every service is NAME.domain unless it opts out.
    pub fn domain(mut self, domain: &str) -> Self {
        self.domain = Some(domain.to_string());
        self
    }

    /// More `[routing]` keys (TOML lines, tables such as `[[routing.teams]]` last).
    pub fn routing(mut self, keys: &str) -> Self {
        self.routing += keys;
        self.routing.push('\n');
        self
    }

    /// The `[network]` section's keys (TOML lines; default `allowed = ["127.0.0.0/8"]`).
    pub fn network(mut self, keys: &str) -> Self {
        self.network = Some(keys.to_string());
        self
    }

    /// Adds `name=value` to weft's environment.
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_string(), value.to_string()));
        self
    }

    /// `haproxy.hard_stop_after` (default 5 s, so that old workers go quickly).
    pub fn hard_stop_after(mut self, after: Duration) -> Self {
        self.hard_stop_after = after;
        self
    }

    /// `haproxy.on_exit`: `keep` (weft's default) or `stop`.
    pub fn on_exit(self, what: &str) -> Self {
        self.haproxy_key("on_exit", &toml_string(what))
    }

    /// One more `[haproxy]` key: `value` is TOML (`"\"accept\""`, `["10.0.0.0/8"]`).
    pub fn haproxy_key(mut self, key: &str, value: &str) -> Self {
        self.haproxy_keys.push(format!("{key} = {value}"));
        self
    }

    /// Writes weft.toml (and services.toml), starts `weft run`, and waits until its status
    /// endpoint answers; fails the test with weft's log if weft exits instead.
    pub async fn start(self) -> Weft {
        require_haproxy();
        let dir = self.dir.unwrap_or_else(|| {
            tempfile::Builder::new()
                .prefix("weft-test-")
                .tempdir()
                .unwrap()
        });
        let port = self.port.unwrap_or_else(free_port);
        let status_port = free_port();
        let routing = format!(
            "\n[routing]\n{}{}",
            self.domain
                .map(|domain| format!("domain = {domain:?}\n"))
                .unwrap_or_default(),
            self.routing
        );
        let config = format!(
            "[haproxy]\nbind = \"127.0.0.1:{port}\"\nrun_dir = \"run\"\nhard_stop_after = {}\n\
             {}{}\n\n\
             [network]\n{}\n\n\
             [bridge]\nmode = \"off\"\n\n\
             [status]\nlisten = \"127.0.0.1:{status_port}\"\n\n\
             [sources.file]\npath = \"services.toml\"\ndebounce = {}\n{}{routing}",
            toml_duration(self.hard_stop_after),
            self.maxconn
                .map(|maxconn| format!("maxconn = {maxconn}\n"))
                .unwrap_or_default(),
            self.haproxy_keys.join("\n"),
            self.network
                .as_deref()
                .unwrap_or("allowed = [\"127.0.0.0/8\"]"),
            toml_duration(self.debounce),
            self.sources,
        );
        let tls_port = self.tls.then(free_port);
        let config = match tls_port {
            Some(tls) => {
                format!("{config}\n[tls]\nlisten = \"127.0.0.1:{tls}\"\ncerts = \"certs\"\n")
            }
            None => config,
        };
        if self.tls {
            std::fs::create_dir_all(dir.path().join("certs")).unwrap();
        }
        std::fs::write(dir.path().join("weft.toml"), config).unwrap();
        let services_file = dir.path().join("services.toml");
        match self.services {
            Some(services) => std::fs::write(&services_file, services).unwrap(),
            None if services_file.exists() => {}
            None => std::fs::write(&services_file, "").unwrap(),
        }
        let mut weft = Weft {
            dir,
            port,
            status_port,
            child: None,
            env: self.env,
            tls_port,
        };
        weft.spawn(self.soft_open_files);
        weft.wait_until_up().await;
        weft
    }
}

/// A TOML string of `value`'s text.
fn toml_string(value: impl std::fmt::Display) -> String {
    format!("{:?}", value.to_string())
}

/// A TOML duration as weft reads it, in milliseconds.
fn toml_duration(duration: Duration) -> String {
    format!("\"{}ms\"", duration.as_millis())
}

impl Drop for Weft {
    fn drop(&mut self) {
        self.stop();
        // weft leaves its HAProxy serving when it exits (haproxy.on_exit = "keep"), for the
        // next weft: no process outlives the test. Its workers exit with the master.
        if let Some(pid) = self.haproxy_pid() {
            if process_alive(pid) {
                signal(pid, "KILL");
                let deadline = Instant::now() + Duration::from_secs(5);
                while process_alive(pid) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        if std::thread::panicking() {
            eprintln!("---- weft log ----\n{}", self.log());
        }
    }
}

/// SIGTERM to `child`, then waits for it (SIGKILL after 15 s, scaled); its exit status.
pub fn terminate(mut child: Child) -> Option<std::process::ExitStatus> {
    signal(child.id() as i32, "TERM");
    let deadline = Instant::now() + patience(Duration::from_secs(15));
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
    tokio::time::timeout(
        patience(Duration::from_secs(5)),
        stream.read_to_string(&mut answer),
    )
    .await
    .map_err(|_| "timeout".to_string())?
    .map_err(|e| e.to_string())?;
    Ok(answer)
}

/// One raw HTTP/1.1 exchange with HAProxy on `port` (the request as written, so that it can
/// carry what no client library sends): the status code and the body.
pub async fn raw(port: u16, request: &str) -> (u16, String) {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.unwrap();
        String::from_utf8_lossy(&answer).into_owned()
    };
    let answer = tokio::time::timeout(patience(Duration::from_secs(5)), exchange)
        .await
        .unwrap_or_else(|_| panic!("no answer to {request:?}"));
    let code = answer
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {answer:?} for {request:?}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    (code, body)
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

/// GET `http://addr/path` with `Host: host`, on a fresh connection: status and body. The
/// `timeout` is scaled by [`patience`].
pub async fn get_at(
    addr: SocketAddr,
    host: &str,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String), String> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(patience(timeout))
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

/// Polls `check` until it returns `Ok`, failing the test with the last error at `timeout`
/// (scaled by [`patience`]).
pub async fn eventually<T, E: Debug, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let timeout = patience(timeout);
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
    eventually(
        Duration::from_secs(5),
        &format!("{host}{path} served by {expected:?}"),
        || async {
            let mut answers = Vec::new();
            for _ in 0..(expected.len() * 4) {
                answers.push(weft.get(host, path).await?);
            }
            served_by(expected, &answers)
        },
    )
    .await
}

/// `Ok` when `answers` (status, body) are all 200s and their bodies are exactly the backends
/// named in `expected`: each of them seen, no other.
pub fn served_by(expected: &[&str], answers: &[(u16, String)]) -> Result<(), String> {
    let mut seen: Vec<&str> = Vec::new();
    for (status, body) in answers {
        if *status != 200 {
            return Err(format!("status {status}: {body}"));
        }
        if !seen.contains(&body.as_str()) {
            seen.push(body);
        }
    }
    seen.sort_unstable();
    let mut want = expected.to_vec();
    want.sort_unstable();
    if seen == want {
        Ok(())
    } else {
        Err(format!("seen {seen:?}"))
    }
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

/// `(source, subject, reason)` of each input `/status` lists as dropped.
pub fn dropped(status: &serde_json::Value) -> Vec<(String, String, String)> {
    let text = |d: &serde_json::Value, key: &str| d[key].as_str().unwrap().to_string();
    status["dropped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (text(d, "source"), text(d, "subject"), text(d, "reason")))
        .collect()
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

/// An answer as the doubles' tests look at it.
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header in {:?}", self.headers))
            .to_str()
            .unwrap()
    }

    pub fn content_type(&self) -> &str {
        self.header("content-type")
    }
}

/// GET `url` with `headers` on a fresh client, within `timeout` (scaled by [`patience`]); fails
/// the test when no answer comes.
pub async fn get_answer(url: &str, headers: &[(&str, &str)], timeout: Duration) -> Answer {
    let client = reqwest::Client::builder()
        .timeout(patience(timeout))
        .build()
        .unwrap();
    let mut request = client.get(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e:?}"));
    Answer {
        status: response.status().as_u16(),
        headers: response.headers().clone(),
        body: response.text().await.unwrap(),
    }
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

/// A service no spare backend of the pool can take (balance `first`, a flavour no other
/// service has): adding one is a reload.
pub fn reloading_service(name: &str, hosts: &[&str], servers: &[SocketAddr]) -> String {
    service(name, hosts, None, servers).replacen(
        "[[service]]\n",
        "[[service]]\nbalance = \"first\"\n",
        1,
    )
}

/// A HAProxy started by the test itself, as systemd would start it for external mode:
/// `haproxy -W -S <master.sock> -f <haproxy.cfg> -p <pid>`. Killed on drop.
pub struct ExternalHaproxy {
    pub port: u16,
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
            port,
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
