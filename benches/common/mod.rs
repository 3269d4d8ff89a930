//! What several benchmarks measure alike: percentiles, a process's memory, HAProxy's servers
//! in service. Each bench includes it as `mod common;`.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use weft::haproxy::runtime::parse_servers_state;

/// The `p` percentile (0.0 to 1.0) of `sorted`, nearest rank; zero when it is empty.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    match sorted.len() {
        0 => Duration::ZERO,
        n => sorted[((n - 1) as f64 * p).round() as usize],
    }
}

/// `VmRSS`, `VmHWM`, ... of `pid`, in MiB.
pub fn memory_mib(pid: u32, key: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(f64::NAN);
    kib / 1024.0
}

/// Each backend's servers that HAProxy has in service (`show servers state`): running
/// (`srv_op_state` 2), and neither in maintenance nor draining by `srv_admin_state` (HAProxy's
/// `SRV_ADMF_MAINT` 0x23 and `SRV_ADMF_DRAIN` 0x18; 0x04, `SRV_ADMF_CMAINT`, alone is a slot
/// declared `disabled` and since made ready). Parked slots are in maintenance.
pub fn serving(answer: &str) -> BTreeMap<String, BTreeSet<SocketAddr>> {
    let mut backends: BTreeMap<String, BTreeSet<SocketAddr>> = BTreeMap::new();
    for (server, line) in parse_servers_state(answer) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let servers = backends.entry(server.backend).or_default();
        let admin: u32 = fields[6].parse().unwrap_or(u32::MAX);
        if fields[5] == "2" && admin & 0x3b == 0 {
            if let Ok(ip) = server.addr.parse() {
                servers.insert(SocketAddr::new(ip, server.port));
            }
        }
    }
    backends
}

/// The sizes asked for on the command line (numbers; cargo adds `--bench`), else `default`.
pub fn sizes(default: &[usize]) -> Vec<usize> {
    let asked: Vec<usize> = std::env::args()
        .skip(1)
        .filter(|arg| !arg.starts_with('-'))
        .map(|arg| {
            arg.replace([',', '_'], "")
                .parse()
                .unwrap_or_else(|_| panic!("{arg:?} is not a size"))
        })
        .collect();
    if asked.is_empty() {
        default.to_vec()
    } else {
        asked
    }
}

/// The value of weft's Prometheus sample that starts with `sample` (a name, with its labels if
/// any), NaN when absent.
pub async fn metric(weft: &crate::support::Weft, sample: &str) -> f64 {
    let (_, text) = weft.status("/metrics").await.expect("weft's /metrics");
    text.lines()
        .find_map(|line| line.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or(f64::NAN)
}
