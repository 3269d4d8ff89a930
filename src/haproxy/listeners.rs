//! The port is HAProxy's: finds foreign listeners on the addresses HAProxy binds.
//!
//! A process that listens on HAProxy's port with `SO_REUSEPORT` (HAProxy sets it on its own
//! listeners) is given a share of the new connections by the kernel, and nothing else would
//! notice. So weft reads the listening TCP sockets (`/proc/net/tcp`, `/proc/net/tcp6`, state
//! `0A`) on each address HAProxy binds, maps each socket's inode to the processes holding it
//! (`/proc/PID/fd/* -> socket:[INODE]`), and calls a listener foreign when none of them is
//! the HAProxy weft runs: its master (`show proc`, else the pid file) or a child of it.
//!
//! ```text
//! /proc/net/tcp{,6} ──LISTEN on a bind──> inodes ──HAProxy's own fds──> explained
//!                                            └──the rest: every /proc/PID/fd (bounded)──> foreign
//! ```
//!
//! The common case costs the two tables and HAProxy's own fds; the whole of `/proc` is read
//! only while something foreign listens.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::files::PID_FILE;
use super::process::show_proc;
use crate::config::{HaproxyConfig, HaproxyMode};
use crate::render::RenderSettings;

/// How often the binds are checked after the first check.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(10);
/// Foreign listeners listed in `/status` and `/healthz`; the count has them all.
pub const MAX_SHOWN: usize = 8;
/// Processes and fd entries read in one scan of `/proc` at most.
const MAX_PROCESSES: usize = 100_000;
const MAX_FD_ENTRIES: usize = 2_000_000;
/// Owners kept per socket (forked children share their parent's).
const MAX_OWNERS: usize = 4;
/// TCP_LISTEN in `/proc/net/tcp`'s `st` column.
const LISTEN: &str = "0A";

/// A listening socket that is not HAProxy's, on an address HAProxy binds.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct ForeignListener {
    /// The address the socket is bound to (`0.0.0.0:80` overlaps HAProxy's `127.0.0.1:80`).
    pub address: SocketAddr,
    /// A process holding it; `None` when none was found (another pid namespace, or the budget
    /// of the scan ran out).
    pub pid: Option<u32>,
    /// That process's name (`/proc/PID/comm`), as the process set it.
    pub process: Option<String>,
}

/// What the last check found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ForeignListeners {
    /// At most [`MAX_SHOWN`], sorted.
    pub listeners: Vec<ForeignListener>,
    /// All of them.
    pub count: usize,
}

/// One LISTEN line of `/proc/net/tcp` or `/proc/net/tcp6`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Socket {
    pub local: SocketAddr,
    pub inode: u64,
}

/// Parses one line of `/proc/net/tcp{,6}`; `None` for the header, other states, garbage.
/// Addresses are hex words in the kernel's byte order (each 32-bit word as the host stores
/// it: little-endian on x86 and ARM), the port is big-endian hex.
pub fn parse_line(line: &str) -> Option<Socket> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.len() < 10 || fields[3] != LISTEN {
        return None;
    }
    let (address, port) = fields[1].split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match address.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(address)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_exact_mut(4).enumerate() {
                chunk.copy_from_slice(&word(address.get(i * 8..i * 8 + 8)?)?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    let inode = fields[9].parse().ok()?;
    Some(Socket {
        local: SocketAddr::new(ip, port),
        inode,
    })
}

/// Eight hex digits: one 32-bit word as the kernel printed it, back to its bytes.
fn word(hex: &str) -> Option<[u8; 4]> {
    if hex.len() != 8 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some(u32::from_str_radix(hex, 16).ok()?.to_ne_bytes())
}

/// `::ffff:a.b.c.d` is `a.b.c.d`.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Whether a socket bound to `socket` takes connections meant for `bind`: same port, and the
/// same address or a wildcard on either side (`[::]` without V6ONLY takes IPv4 too).
pub fn overlaps(socket: SocketAddr, bind: SocketAddr) -> bool {
    let (a, b) = (canonical(socket.ip()), canonical(bind.ip()));
    socket.port() == bind.port() && (a == b || a.is_unspecified() || b.is_unspecified())
}

/// The LISTEN sockets of the current network namespace that overlap one of `binds`.
fn listening_on(binds: &[SocketAddr]) -> std::io::Result<Vec<Socket>> {
    let mut found = Vec::new();
    let mut read_any = false;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        // tcp6 is missing where IPv6 is disabled.
        let Ok(file) = std::fs::File::open(table) else {
            continue;
        };
        read_any = true;
        // A line at a time: the table has a line per connection (hundreds of thousands on a
        // busy edge), never held whole.
        use std::io::BufRead;
        found.extend(
            std::io::BufReader::new(file)
                .lines()
                .map_while(Result::ok)
                .filter_map(|line| parse_line(&line))
                .filter(|s| s.inode != 0 && binds.iter().any(|b| overlaps(s.local, *b))),
        );
    }
    if !read_any {
        return Err(std::io::Error::other("cannot read /proc/net/tcp"));
    }
    Ok(found)
}

/// The HAProxy weft runs, as far as it is known.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Haproxy {
    pub master: Option<u32>,
    pub workers: Vec<u32>,
}

/// The socket inodes among `wanted` that `pid` holds, with the fd entries read.
fn sockets_of(pid: u32, wanted: &BTreeSet<u64>, budget: &mut usize) -> BTreeSet<u64> {
    let mut held = BTreeSet::new();
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return held;
    };
    for entry in entries.flatten() {
        if *budget == 0 {
            break;
        }
        *budget -= 1;
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let inode = target
            .to_str()
            .and_then(|t| t.strip_prefix("socket:["))
            .and_then(|t| t.strip_suffix(']'))
            .and_then(|t| t.parse::<u64>().ok());
        if let Some(inode) = inode.filter(|i| wanted.contains(i)) {
            held.insert(inode);
        }
    }
    held
}

/// `PPid` of `pid`, from `/proc/PID/stat` (after the last `)`: comm may hold anything).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

fn comm_of(pid: u32) -> Option<String> {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(comm.trim_end_matches('\n').to_string())
}

impl Haproxy {
    fn owns(&self, pid: u32) -> bool {
        self.master == Some(pid)
            || self.workers.contains(&pid)
            || (self.master.is_some() && parent_of(pid) == self.master)
    }
}

/// The foreign listeners on `binds` (blocking: reads `/proc`).
pub fn find_foreign(binds: &[SocketAddr], haproxy: &Haproxy) -> std::io::Result<ForeignListeners> {
    let sockets = listening_on(binds)?;
    let mut unexplained: BTreeSet<u64> = sockets.iter().map(|s| s.inode).collect();
    let mut budget = MAX_FD_ENTRIES;
    // HAProxy's own fds first: in the usual case they explain every socket.
    for pid in haproxy.master.iter().chain(&haproxy.workers) {
        for inode in sockets_of(*pid, &unexplained, &mut budget) {
            unexplained.remove(&inode);
        }
    }
    let mut owners: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    if !unexplained.is_empty() {
        let pids = std::fs::read_dir("/proc")?
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .take(MAX_PROCESSES);
        let mut ours = BTreeSet::new();
        for pid in pids {
            if budget == 0 {
                break;
            }
            for inode in sockets_of(pid, &unexplained, &mut budget) {
                // A child of the master that `show proc` did not list yet (a worker just forked).
                if haproxy.owns(pid) {
                    ours.insert(inode);
                    continue;
                }
                let pids = owners.entry(inode).or_default();
                if pids.len() < MAX_OWNERS {
                    pids.push(pid);
                }
            }
        }
        for inode in ours {
            owners.remove(&inode);
            unexplained.remove(&inode);
        }
    }
    let mut all = BTreeSet::new();
    for socket in sockets.iter().filter(|s| unexplained.contains(&s.inode)) {
        match owners.get(&socket.inode) {
            Some(pids) => {
                for pid in pids {
                    all.insert(ForeignListener {
                        address: socket.local,
                        pid: Some(*pid),
                        process: comm_of(*pid),
                    });
                }
            }
            None => {
                all.insert(ForeignListener {
                    address: socket.local,
                    pid: None,
                    process: None,
                });
            }
        }
    }
    Ok(ForeignListeners {
        count: all.len(),
        listeners: all.into_iter().take(MAX_SHOWN).collect(),
    })
}

/// Whether `pid` runs `binary` (`/proc/PID/exe`; a replaced binary reads `... (deleted)`).
fn runs(pid: u32, binary: &Path) -> bool {
    let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) else {
        return false;
    };
    let exe = exe.to_string_lossy();
    let exe = exe.strip_suffix(" (deleted)").unwrap_or(&exe);
    let canonical = std::fs::canonicalize(binary).unwrap_or_else(|_| binary.to_path_buf());
    Path::new(exe) == binary || Path::new(exe) == canonical
}

/// Checks the binds of the rendered config, now and every [`CHECK_INTERVAL`], and publishes
/// what it finds.
pub struct ListenerWatch {
    config: HaproxyConfig,
    binds: Vec<SocketAddr>,
    /// The master last seen: `show proc` refuses connections during a reload.
    last_master: Option<u32>,
    state: watch::Sender<ForeignListeners>,
}

impl ListenerWatch {
    pub fn new(config: HaproxyConfig, state: watch::Sender<ForeignListeners>) -> ListenerWatch {
        let binds = RenderSettings::new(&config, &config.run_dir, "").binds();
        ListenerWatch {
            config,
            binds,
            last_master: None,
            state,
        }
    }

    /// The HAProxy weft runs: `show proc` on the master socket; else the pid file (managed
    /// mode) or the master last seen, when that pid still runs the configured binary.
    async fn haproxy(&mut self) -> Haproxy {
        match show_proc(&self.config.master_socket).await {
            Ok(proc) => {
                self.last_master = Some(proc.master_pid);
                return Haproxy {
                    master: Some(proc.master_pid),
                    workers: proc.workers.iter().map(|(pid, _)| *pid).collect(),
                };
            }
            Err(err) => debug!(error = %err, "show proc for the listener check"),
        }
        let from_file = (self.config.mode == HaproxyMode::Managed)
            .then(|| super::process::read_pid_file(&self.config.run_dir.join(PID_FILE)))
            .flatten();
        let master = from_file
            .into_iter()
            .chain(self.last_master)
            .find(|pid| runs(*pid, &self.config.binary));
        Haproxy {
            master,
            workers: Vec::new(),
        }
    }

    /// One check: published, and each listener logged when it appears (ERROR) and goes (INFO).
    pub async fn check(&mut self) -> ForeignListeners {
        let haproxy = self.haproxy().await;
        let binds = self.binds.clone();
        let found = tokio::task::spawn_blocking(move || find_foreign(&binds, &haproxy)).await;
        let found = match found {
            Ok(Ok(found)) => found,
            Ok(Err(err)) => {
                warn!(error = %err, "cannot check who listens on haproxy's binds");
                return self.state.borrow().clone();
            }
            Err(err) => {
                warn!(error = %err, "the listener check failed");
                return self.state.borrow().clone();
            }
        };
        let before = self.state.borrow().clone();
        for new in found
            .listeners
            .iter()
            .filter(|l| !before.listeners.contains(l))
        {
            error!(
                address = %new.address,
                pid = ?new.pid,
                process = ?new.process,
                binds = ?self.binds,
                "a process that is not haproxy listens on haproxy's port: it takes a share of the connections"
            );
        }
        for gone in before
            .listeners
            .iter()
            .filter(|l| !found.listeners.contains(l))
        {
            info!(address = %gone.address, pid = ?gone.pid, "the foreign listener is gone");
        }
        self.state.send_replace(found.clone());
        found
    }

    /// Checks every [`CHECK_INTERVAL`] until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut interval = tokio::time::interval(CHECK_INTERVAL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = interval.tick() => {}
            }
            self.check().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode";

    #[cfg(target_endian = "little")]
    #[test]
    fn parses_ipv4_lines() {
        let line = "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 123456 1 0000000000000000 100 0 0 10 0";
        assert_eq!(
            parse_line(line),
            Some(Socket {
                local: "127.0.0.1:8080".parse().unwrap(),
                inode: 123456
            })
        );
        let any = "   1: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 7 1 0000000000000000 100 0 0 10 0";
        assert_eq!(
            parse_line(any).unwrap().local,
            "0.0.0.0:80".parse().unwrap()
        );
        // 10.2.3.4 is stored as the bytes 0a 02 03 04: little-endian 0x0403020A.
        let ten = "   2: 0403020A:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 8 1 0000000000000000 100 0 0 10 0";
        assert_eq!(
            parse_line(ten).unwrap().local,
            "10.2.3.4:80".parse().unwrap()
        );
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn parses_ipv6_lines() {
        let loopback = "   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 99 1 0000000000000000 100 0 0 10 0";
        assert_eq!(
            parse_line(loopback),
            Some(Socket {
                local: "[::1]:8080".parse().unwrap(),
                inode: 99
            })
        );
        // 2001:db8::1 in the kernel's words: 20 01 0d b8 | 0 | 0 | 00 00 00 01.
        let doc = "   1: B80D0120000000000000000001000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 100 1 0000000000000000 100 0 0 10 0";
        assert_eq!(
            parse_line(doc).unwrap().local,
            "[2001:db8::1]:80".parse().unwrap()
        );
        // ::ffff:127.0.0.1, an IPv4-mapped address, overlaps 127.0.0.1.
        let mapped = "   2: 0000000000000000FFFF00000100007F:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 101 1 0000000000000000 100 0 0 10 0";
        let local = parse_line(mapped).unwrap().local;
        assert_eq!(local, "[::ffff:127.0.0.1]:80".parse().unwrap());
        assert!(overlaps(local, "127.0.0.1:80".parse().unwrap()));
    }

    #[test]
    fn skips_the_header_other_states_and_garbage() {
        assert_eq!(parse_line(HEADER), None);
        let established = "   0: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 5 1 0000000000000000 100 0 0 10 0";
        assert_eq!(parse_line(established), None);
        for garbage in [
            "",
            "   0: 0100007G:1F90 00000000:0000 0A 0 0 0 0 0 5",
            "   0: 0100007F:XYZW 00000000:0000 0A 0 0 0 0 0 5",
            "   0: 01007F:1F90 00000000:0000 0A 0 0 0 0 0 5",
            "   0: 0100007F1F90 00000000:0000 0A 0 0 0 0 0 5",
            "   0: 0100007F:1F90 00000000:0000 0A 0 0 0 0 0 inode",
        ] {
            assert_eq!(parse_line(garbage), None, "{garbage:?}");
        }
    }

    #[test]
    fn overlapping_binds() {
        let at = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(overlaps(at("127.0.0.1:80"), at("127.0.0.1:80")));
        assert!(overlaps(at("0.0.0.0:80"), at("127.0.0.1:80")));
        assert!(overlaps(at("127.0.0.1:80"), at("0.0.0.0:80")));
        assert!(overlaps(at("[::]:80"), at("10.2.0.1:80")));
        assert!(overlaps(at("10.2.0.1:80"), at("[::]:80")));
        assert!(!overlaps(at("127.0.0.1:81"), at("127.0.0.1:80")));
        assert!(!overlaps(at("127.0.0.2:80"), at("127.0.0.1:80")));
        assert!(!overlaps(at("[::1]:80"), at("127.0.0.1:80")));
    }

    /// This test's own listener, found in the real tables, held by this very process.
    #[test]
    fn finds_a_listener_of_this_process() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let bind = listener.local_addr().unwrap();
        let found = find_foreign(&[bind], &Haproxy::default()).unwrap();
        assert_eq!(found.count, 1, "{found:?}");
        assert_eq!(found.listeners[0].address, bind);
        assert_eq!(found.listeners[0].pid, Some(std::process::id()));
        // This process, taken for HAProxy's master, explains it.
        let ours = Haproxy {
            master: Some(std::process::id()),
            workers: Vec::new(),
        };
        assert_eq!(find_foreign(&[bind], &ours).unwrap().count, 0);
        drop(listener);
        assert_eq!(find_foreign(&[bind], &Haproxy::default()).unwrap().count, 0);
    }
}
