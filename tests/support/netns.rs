//! Network namespaces for the bridge and topology tests, made here and removed by Drop guards
//! (also when the test panics). Every link a test makes lives in a namespace it made
//! (`ip -n NS ...`): the host's own links are never touched.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use axum::Router;
use nix::sched::CloneFlags;

/// Linux capability numbers (capability.h).
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
/// Prefix of every namespace these tests make; the creator's pid follows.
const PREFIX: &str = "weft-";

/// Fails the test, saying what is missing, unless namespaces can be made here.
pub fn require_netns() {
    let ip = Command::new("ip").arg("-V").output();
    assert!(
        ip.is_ok_and(|o| o.status.success()),
        "`ip` is missing: these tests make network namespaces with iproute2 \
         (apt-get install iproute2; .ci/run installs it)"
    );
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let caps = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| caps & (1 << cap) != 0;
    assert!(
        has(CAP_SYS_ADMIN) && has(CAP_NET_ADMIN),
        "these tests need root (CAP_SYS_ADMIN and CAP_NET_ADMIN) to make network namespaces \
         and links in them; run them as root (CI does)"
    );
}

/// A network namespace `weft-<pid>-<random>-<tag>`, with its loopback up and IPv6 off (no
/// address events of its own). Dropping it kills what still runs inside and deletes it, and
/// with it every link inside.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        require_netns();
        sweep_leftovers();
        let name = format!(
            "{PREFIX}{}-{:04x}-{tag}",
            std::process::id(),
            fastrand::u16(..)
        );
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        // A kernel without IPv6 has nothing to turn off.
        let _ = ns.sysctl("net/ipv6/conf/all/disable_ipv6", "1");
        let _ = ns.sysctl("net/ipv6/conf/default/disable_ipv6", "1");
        ns
    }

    /// `ip -n NS ARGS`; fails the test with ip's stderr.
    pub fn ip(&self, args: &[&str]) -> String {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A veth pair: `name` here, its `peer` end in `peer_ns`.
    pub fn add_veth(&self, name: &str, peer: &str, peer_ns: &Netns) {
        self.ip(&[
            "link",
            "add",
            name,
            "type",
            "veth",
            "peer",
            "name",
            peer,
            "netns",
            &peer_ns.name,
        ]);
    }

    /// `ip -n NS ARGS`, its failure returned.
    pub fn try_ip(&self, args: &[&str]) -> Result<String, String> {
        let output = Command::new("ip")
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&output.stderr).into_owned())
        }
    }

    /// `ip netns exec NS PROGRAM` (ip execs the program: the child's pid is the program's).
    pub fn exec(&self, program: impl AsRef<Path>) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.name])
            .arg(program.as_ref());
        command
    }

    /// Writes a sysctl of this namespace (from a thread inside it: /proc/sys/net is per
    /// namespace).
    pub fn sysctl(&self, key: &str, value: &str) -> std::io::Result<()> {
        let path = Path::new("/proc/sys").join(key);
        let value = value.to_string();
        self.spawn(move || std::fs::write(&path, value))
            .join()
            .unwrap()
    }

    /// Runs `f` on a thread that lives in this namespace: its sockets are the namespace's.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        let path = PathBuf::from("/run/netns").join(&self.name);
        std::thread::spawn(move || {
            let file = File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            nix::sched::setns(&file, CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("setns {}: {e}", path.display()));
            f()
        })
    }

    /// A tokio runtime whose worker threads live in this namespace (a thread is made in its
    /// creator's namespace): what is spawned on it opens its sockets here, e.g. a double that
    /// listens on an address of this namespace and talks to itself over its loopback. A
    /// future that `block_on` polls itself runs on the caller's thread, in the caller's
    /// namespace: spawn it.
    pub fn runtime(&self) -> tokio::runtime::Runtime {
        self.spawn(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap()
        })
        .join()
        .unwrap()
    }

    /// The link `dev` as `ip -d link` and `ip addr` show it; `None` when absent.
    pub fn link(&self, dev: &str) -> Option<LinkSnapshot> {
        let json = self
            .try_ip(&["-j", "-d", "link", "show", "dev", dev])
            .ok()?;
        let links: serde_json::Value = serde_json::from_str(&json).unwrap();
        let link = &links[0];
        let addrs: serde_json::Value =
            serde_json::from_str(&self.ip(&["-j", "-4", "addr", "show", "dev", dev])).unwrap();
        let mut addresses: Vec<String> = addrs[0]["addr_info"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
            .collect();
        addresses.sort();
        Some(LinkSnapshot {
            index: link["ifindex"].as_u64().unwrap(),
            kind: link["linkinfo"]["info_kind"].as_str().map(str::to_string),
            up: link["flags"].as_array().unwrap().iter().any(|f| f == "UP"),
            mtu: link["mtu"].as_u64().unwrap(),
            mac: link["address"].as_str().unwrap_or_default().to_string(),
            addresses,
        })
    }

    /// Pids of the processes inside.
    pub fn pids(&self) -> Vec<i32> {
        Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        remove(&self.name);
    }
}

/// Kills what runs in namespace `name` and deletes it.
fn remove(name: &str) {
    let pids = Command::new("ip")
        .args(["netns", "pids", name])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for pid in pids.split_whitespace() {
        let _ = Command::new("kill").args(["-KILL", pid]).status();
    }
    let _ = Command::new("ip")
        .args(["netns", "del", name])
        .stderr(Stdio::null())
        .status();
}

/// Deletes namespaces that an earlier test process made and could not remove (it was killed):
/// those whose creator pid is gone.
fn sweep_leftovers() {
    let Ok(output) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            remove(name);
        }
    }
}

/// What the tests compare before and after weft ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkSnapshot {
    pub index: u64,
    pub kind: Option<String>,
    /// The admin flag IFF_UP.
    pub up: bool,
    pub mtu: u64,
    pub mac: String,
    /// IPv4 addresses with prefixes, sorted.
    pub addresses: Vec<String>,
}

/// Runs a command, failing the test with its stderr; returns stdout.
pub fn run(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?}: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// stdout and stderr of a finished command, for assertion messages.
pub fn text(output: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Polls `check` until it returns `Ok`, failing the test with the last error at `timeout`
/// (scaled by [`patience`](super::patience)).
pub fn wait_until<T, E: std::fmt::Debug>(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<T, E>,
) -> T {
    let timeout = super::patience(timeout);
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(value) => return value,
            Err(err) if Instant::now() >= deadline => {
                panic!("{what}: not true after {timeout:?}; last: {err:?}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// A process started inside a namespace: SIGTERM on drop, SIGKILL if it lingers.
pub struct NsProcess {
    child: Option<Child>,
    pub log: PathBuf,
}

impl NsProcess {
    /// Spawns `command` with stdout and stderr into `log`.
    pub fn spawn(command: &mut Command, log: PathBuf) -> NsProcess {
        let file = File::create(&log).unwrap();
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("{command:?}: {e}"));
        NsProcess {
            child: Some(child),
            log,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, as a crash: nothing of the process runs after it (a child it started, such
    /// as HAProxy, lives on until its namespace goes).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits (SIGKILL after 15 s, scaled); the exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        super::terminate(self.child.take()?)
    }
}

impl Drop for NsProcess {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("---- {} ----\n{}", self.log.display(), self.log());
        }
    }
}

/// `weft run` inside a namespace, on the `weft.toml` (and `services.toml`) the test wrote into
/// its own temporary directory (readable by all: HAProxy's workers read the maps there).
/// Dropping it stops weft (SIGTERM; the namespace's own drop kills what is left, HAProxy
/// included), then removes the directory.
pub struct NsWeft {
    /// Declared first: stopped before its directory goes.
    pub process: NsProcess,
    pub dir: tempfile::TempDir,
}

impl NsWeft {
    pub fn start(ns: &Netns, config: &str, services: Option<&str>) -> NsWeft {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new()
            .prefix(&format!("weft-{}-", ns.name))
            .tempdir()
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(dir.path().join("weft.toml"), config).unwrap();
        if let Some(services) = services {
            std::fs::write(dir.path().join("services.toml"), services).unwrap();
        }
        let mut command = ns.exec(env!("CARGO_BIN_EXE_weft"));
        command
            .args(["run", "-c"])
            .arg(dir.path().join("weft.toml"))
            .env("WEFT_LOG", "info,weft=debug");
        let process = NsProcess::spawn(&mut command, dir.path().join("weft.log"));
        NsWeft { process, dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn log(&self) -> String {
        self.process.log()
    }
}

/// An HTTP server on a thread inside a namespace, answering every request with `body`.
pub struct NsServer {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl NsServer {
    pub fn start(ns: &Netns, addr: SocketAddr, body: &str) -> NsServer {
        let body = body.to_string();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = ns.spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::bind(addr).await {
                    Ok(listener) => listener,
                    Err(err) => {
                        let _ = ready_tx.send(Err(err.to_string()));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                let app = Router::new().fallback(move || async move { body });
                // Not a graceful shutdown: HAProxy may hold idle connections open.
                tokio::select! {
                    _ = axum::serve(listener, app) => {}
                    _ = stop_rx => {}
                }
            });
        });
        ready_rx
            .recv_timeout(super::patience(Duration::from_secs(5)))
            .unwrap_or_else(|e| panic!("server at {addr} in {}: {e}", ns.name))
            .unwrap_or_else(|e| panic!("server at {addr} in {}: {e}", ns.name));
        NsServer {
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }
}

impl Drop for NsServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// GET `http://addr/path` with `Host: host` from inside `ns`, on a fresh connection.
pub fn get_in(
    ns: &Netns,
    addr: SocketAddr,
    host: &str,
    path: &str,
) -> Result<(u16, String), String> {
    let (host, path) = (host.to_string(), path.to_string());
    ns.spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        runtime.block_on(super::get_at(addr, &host, &path, Duration::from_secs(3)))
    })
    .join()
    .map_err(|_| "the client thread panicked".to_string())?
}

/// A hub namespace with a bridge `br0` at 192.168.150.1/24 and one namespace per edge, each on
/// a veth into the bridge at its address (/24): the topology of the multi-edge tests. Dropped
/// after what runs in it (declare it first).
pub struct Edges {
    pub hub: Netns,
    pub edges: Vec<Netns>,
}

impl Edges {
    pub fn build(edges: &[(&str, std::net::Ipv4Addr)]) -> Edges {
        let hub = Netns::new("hub");
        hub.ip(&["link", "add", "br0", "type", "bridge"]);
        hub.ip(&["addr", "add", "192.168.150.1/24", "dev", "br0"]);
        hub.ip(&["link", "set", "br0", "up"]);
        let edges = edges
            .iter()
            .map(|(name, address)| {
                let edge = Netns::new(name);
                edge.add_veth("eth0", name, &hub);
                edge.ip(&["addr", "add", &format!("{address}/24"), "dev", "eth0"]);
                edge.ip(&["link", "set", "eth0", "up"]);
                hub.ip(&["link", "set", name, "master", "br0", "up"]);
                edge
            })
            .collect();
        Edges { hub, edges }
    }
}

/// Waits until weft in `ns` answers on its status endpoint (127.0.0.1:9090) and its HAProxy on
/// its admin socket (`run/admin.sock`).
pub fn wait_for_weft(ns: &Netns, edge: &NsWeft) {
    let status = "127.0.0.1:9090".parse().unwrap();
    wait_until(Duration::from_secs(10), "weft's status endpoint", || {
        get_in(ns, status, "localhost", "/healthz")
    });
    let socket = edge.path("run/admin.sock");
    wait_until(Duration::from_secs(10), "HAProxy's admin socket", || {
        socket.exists().then_some(()).ok_or(())
    });
}
