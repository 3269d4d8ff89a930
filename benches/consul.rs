//! Consul benchmark: weft's Consul source against the Consul double at 100, 1,000 and 10,000
//! exposed services of two passing instances each, with real HAProxy.
//!
//! ```text
//! cargo bench --bench consul             # 100, 1000, 10000, then 1 vs 2 edges at 1000
//! cargo bench --bench consul -- 1000     # one size
//! cargo bench --bench consul -- edges    # 1 vs 2 edges at 1000 only
//! ```
//!
//! Per size it prints: the time from weft's start until every service's backend in HAProxy
//! serves both instances (HAProxy's own `show servers state`); the peak connections to the
//! double and the 429s it refused; requests a minute to Consul while idle (default `wait` and
//! `resync`); body bytes the double answered per check flip, by endpoint; instance moves
//! (deregister `svcK-2`, register `svcK-3` at a new address) until HAProxy serves the new
//! address and not the old, p50/p99; weft's RSS once routed and its peak. The servers are
//! loopback addresses that nothing listens on: no traffic goes to them, only HAProxy's runtime
//! state is read. BENCHMARKS.md records the results.

#![allow(clippy::unwrap_used)]

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{memory_mib, percentile, serving};
use support::consul::{
    ConsulDouble, Instance, Requests, Status, CATALOG_SERVICES, HEALTH_SERVICE, HEALTH_STATE, KV,
};
use support::Weft;

const SIZES: [usize; 3] = [100, 1_000, 10_000];
/// The size of the 1-vs-2 edges comparison.
const EDGES_SIZE: usize = 1_000;
/// The 1-vs-2 edges run's resync: short, so that its reads show in the idle window.
const EDGES_RESYNC: Duration = Duration::from_secs(30);
/// The state watch's path.
const STATE_ANY: &str = "/v1/health/state/any";
/// Every server listens on this port, at an address that tells the instance apart.
const PORT: u16 = 8080;
const IDLE_WINDOW: Duration = Duration::from_secs(30);
/// Check flips: half of them fail `svcK-2`, the other half bring it back.
const FLIPS: usize = 20;
const MOVES: usize = 50;
/// Between two flips or moves: more than the watch's token bucket spacing (`max_rate` 5/s).
const SPACING: Duration = Duration::from_millis(300);
/// How long everything may take to be routed before the size is given up.
const ROUTE_DEADLINE: Duration = Duration::from_secs(15 * 60);
/// How long one flip or move may take to show in HAProxy.
const CHANGE_DEADLINE: Duration = Duration::from_secs(60);
/// A move slower than this prints what weft logged meanwhile.
const SLOW_CHANGE: Duration = Duration::from_secs(1);
/// Polling one backend's servers while a change goes through.
const CHANGE_POLL: Duration = Duration::from_millis(2);

/// Instance `n` (1, 2; 3 for a moved one) of service `k`: `127.n.(k / 256).(k % 256):8080`.
fn server(n: u8, k: usize) -> SocketAddr {
    let ip = Ipv4Addr::new(127, n, (k >> 8) as u8, (k & 0xff) as u8);
    SocketAddr::new(IpAddr::V4(ip), PORT)
}

fn instance(n: u8, k: usize) -> Instance {
    let addr = server(n, k);
    Instance::new(
        &format!("svc{k}"),
        &format!("svc{k}-{n}"),
        &addr.ip().to_string(),
        addr.port(),
    )
    .tag(&format!("weft.host=svc{k}.test"))
}

fn backend(k: usize) -> String {
    format!("be_svc{k}")
}

/// A double whose catalog holds `size` services of two passing instances, written at once.
async fn catalog(size: usize) -> ConsulDouble {
    let consul = ConsulDouble::start().await;
    consul.register_all((0..size).flat_map(|k| [instance(1, k), instance(2, k)]));
    consul
}

/// A weft on `consul` (`keys` in its Consul section), and the moment it was started.
async fn start_edge(consul: &ConsulDouble, keys: &str) -> (Weft, Instant) {
    let started = Instant::now();
    let weft = Weft::builder().consul(&consul.url(), keys).start().await;
    (weft, started)
}

fn admin_socket(weft: &Weft) -> std::path::PathBuf {
    weft.run_dir().join("admin.sock")
}

/// The servers in service of one backend (none while HAProxy does not answer).
async fn backend_serving(admin: &Path, backend: &str) -> BTreeSet<SocketAddr> {
    let answer = support::cli(admin, &format!("show servers state {backend}"))
        .await
        .unwrap_or_default();
    serving(&answer).remove(backend).unwrap_or_default()
}

/// Waits until every one of `size` services' backends serves exactly its two instances;
/// the time since `started`, or what was routed at the deadline.
async fn wait_routed(weft: &Weft, size: usize, started: Instant) -> Result<Duration, String> {
    let admin = admin_socket(weft);
    // The whole state of 10,000 backends is megabytes: polled less often, so as not to slow
    // down what it measures.
    let poll = Duration::from_millis((size as u64 / 10).max(50));
    let mut progress = started + Duration::from_secs(30);
    loop {
        let routed = match support::cli(&admin, "show servers state").await {
            Ok(answer) => {
                let backends = serving(&answer);
                (0..size)
                    .filter(|&k| {
                        backends.get(&backend(k)) == Some(&[server(1, k), server(2, k)].into())
                    })
                    .count()
            }
            Err(_) => 0,
        };
        if routed == size {
            return Ok(started.elapsed());
        }
        if started.elapsed() > ROUTE_DEADLINE {
            return Err(format!(
                "{routed} of {size} services routed after {:.1?}",
                started.elapsed()
            ));
        }
        if Instant::now() > progress {
            eprintln!(
                "  ... {routed} of {size} services routed after {:.0?}",
                started.elapsed()
            );
            progress += Duration::from_secs(30);
        }
        tokio::time::sleep(poll).await;
    }
}

/// Polls `backend` until its servers in service satisfy `done`; the time since `since`.
async fn wait_backend(
    admin: &Path,
    backend: &str,
    since: Instant,
    done: impl Fn(&BTreeSet<SocketAddr>) -> bool,
) -> Option<Duration> {
    while since.elapsed() < CHANGE_DEADLINE {
        if done(&backend_serving(admin, backend).await) {
            return Some(since.elapsed());
        }
        tokio::time::sleep(CHANGE_POLL).await;
    }
    None
}

/// What the double received and answered between two snapshots.
fn since(before: &Requests, after: &Requests) -> BTreeMap<&'static str, (u64, u64)> {
    [CATALOG_SERVICES, HEALTH_STATE, HEALTH_SERVICE, KV]
        .into_iter()
        .map(|endpoint| {
            let (b, a) = (before.endpoint(endpoint), after.endpoint(endpoint));
            (
                endpoint,
                (a.requests - b.requests, a.body_bytes - b.body_bytes),
            )
        })
        .collect()
}

/// Once every edge's two watches block: requests a minute to the double over `IDLE_WINDOW`.
async fn idle_requests(consul: &ConsulDouble, edges: usize) -> f64 {
    consul.wait_for_blocked_queries(STATE_ANY, edges).await;
    consul
        .wait_for_blocked_queries(CATALOG_SERVICES, edges)
        .await;
    let before = consul.requests();
    let started = Instant::now();
    tokio::time::sleep(IDLE_WINDOW).await;
    let after = consul.requests();
    let per_minute = 60.0 / started.elapsed().as_secs_f64();
    let by_endpoint: Vec<String> = since(&before, &after)
        .into_iter()
        .map(|(endpoint, (requests, _))| format!("{endpoint} {requests}"))
        .collect();
    println!(
        "  idle over {:.0?}: {} requests ({})",
        started.elapsed(),
        after.total - before.total,
        by_endpoint.join(", ")
    );
    (after.total - before.total) as f64 * per_minute
}

/// `FLIPS` check flips of `svcK-2` over services spread across the catalog, each waited for
/// in HAProxy; prints the answered body bytes per flip, by endpoint.
async fn flips(consul: &ConsulDouble, weft: &Weft, size: usize) {
    let admin = admin_socket(weft);
    let before = consul.requests();
    let started = Instant::now();
    let mut latencies = Vec::new();
    for flip in 0..FLIPS {
        let k = (flip / 2) * size / (FLIPS / 2) + 1;
        let (status, want): (Status, BTreeSet<SocketAddr>) = if flip % 2 == 0 {
            (Status::Critical, [server(1, k)].into())
        } else {
            (Status::Passing, [server(1, k), server(2, k)].into())
        };
        let written = Instant::now();
        consul.set_check(&format!("svc{k}-2"), status);
        match wait_backend(&admin, &backend(k), written, |s| *s == want).await {
            Some(latency) => latencies.push(latency),
            None => println!("  flip {flip} of svc{k}-2 never showed in HAProxy"),
        }
        tokio::time::sleep(SPACING).await;
    }
    let traffic = since(&before, &consul.requests());
    let total: u64 = traffic.values().map(|(_, bytes)| bytes).sum();
    let per_flip: Vec<String> = traffic
        .iter()
        .map(|(endpoint, (requests, bytes))| {
            format!(
                "{endpoint} {requests} req {:.1} KiB",
                *bytes as f64 / FLIPS as f64 / 1024.0
            )
        })
        .collect();
    latencies.sort();
    println!(
        "  check flips: {FLIPS} over {:.1?}: {:.1} KiB answered per flip ({}); flip -> HAProxy p50 {:.1?} p99 {:.1?}",
        started.elapsed(),
        total as f64 / FLIPS as f64 / 1024.0,
        per_flip.join(", "),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
    );
}

/// `MOVES` instance moves, each in another service: `svcK-2` deregistered and `svcK-3`
/// registered at a new address; the time from the deregistration until HAProxy serves the new
/// address and not the old.
async fn moves(consul: &ConsulDouble, weft: &Weft, size: usize) {
    let admin = admin_socket(weft);
    let mut latencies = Vec::new();
    for step in 0..MOVES {
        let k = (step * size / MOVES + 2) % size;
        let (old, new) = (server(2, k), server(3, k));
        let log_mark = weft.log().len();
        let written = Instant::now();
        consul.deregister(&format!("svc{k}-2"));
        consul.register(instance(3, k));
        let moved = |s: &BTreeSet<SocketAddr>| s.contains(&new) && !s.contains(&old);
        let latency = wait_backend(&admin, &backend(k), written, moved).await;
        if !latency.is_some_and(|latency| latency <= SLOW_CHANGE) {
            println!("  move of svc{k}-2 to {new}: {latency:.1?}; weft's log meanwhile:");
            for line in weft
                .log()
                .get(log_mark..)
                .unwrap_or_default()
                .lines()
                .take(40)
            {
                println!("    {line}");
            }
        }
        latencies.extend(latency);
        tokio::time::sleep(SPACING).await;
    }
    latencies.sort();
    println!(
        "  instance moves: {} of {MOVES} seen, write -> HAProxy p50 {:.1?} p99 {:.1?} max {:.1?}",
        latencies.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or_default(),
    );
}

fn print_connections(consul: &ConsulDouble) {
    let connections = consul.connections();
    println!(
        "  connections: peak {} at once, {} accepted, {} open now, {} refused (429)",
        connections.peak_total,
        connections.accepted,
        connections.open_total(),
        connections.refused_total()
    );
}

/// Waits until the claims ledger in Consul's KV holds every host (each a first claim, written
/// one at a time after routing), and says how long that took and what it cost.
async fn claims_recorded(consul: &ConsulDouble, size: usize, started: Instant) {
    let deadline = started + ROUTE_DEADLINE;
    loop {
        let recorded = consul.kv_keys("weft/claims/").len();
        if recorded >= size {
            let kv = consul.requests().endpoint(KV);
            println!(
                "  claims ledger: {recorded} hosts recorded in Consul KV {:.2?} after start ({} KV requests, {:.1} MiB answered)",
                started.elapsed(),
                kv.requests,
                kv.body_bytes as f64 / 1048576.0
            );
            return;
        }
        if Instant::now() > deadline {
            println!("  claims ledger: only {recorded} of {size} hosts recorded");
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One size, one edge: every measurement.
async fn size_run(size: usize) {
    println!("{size} services x 2 instances, one edge");
    let consul = catalog(size).await;
    let (weft, started) = start_edge(&consul, "").await;
    let pid = weft.pid().unwrap();
    match wait_routed(&weft, size, started).await {
        Ok(routed) => println!(
            "  start -> all routed in HAProxy: {routed:.2?} (HAProxy reloads meanwhile: {})",
            weft.show_proc()
                .await
                .map_or(u64::MAX, |(reloads, _, _)| reloads)
        ),
        Err(seen) => {
            println!("  NOT ROUTED: {seen}");
            print_connections(&consul);
            return;
        }
    }
    println!(
        "  weft RSS once routed {:.1} MiB (peak so far {:.1} MiB)",
        memory_mib(pid, "VmRSS"),
        memory_mib(pid, "VmHWM")
    );
    claims_recorded(&consul, size, started).await;
    let idle = idle_requests(&consul, 1).await;
    println!("  idle requests to Consul: {idle:.0} a minute");
    flips(&consul, &weft, size).await;
    moves(&consul, &weft, size).await;
    print_connections(&consul);
    println!(
        "  weft RSS at the end {:.1} MiB, peak {:.1} MiB",
        memory_mib(pid, "VmRSS"),
        memory_mib(pid, "VmHWM")
    );
    consul.check();
}

/// The load of one edge, then of two, on one double of `EDGES_SIZE` services.
async fn edges_run() {
    for count in [1, 2] {
        println!("{EDGES_SIZE} services x 2 instances, {count} edge(s) on one double");
        let consul = catalog(EDGES_SIZE).await;
        let mut edges = Vec::new();
        for _ in 0..count {
            edges.push(
                start_edge(
                    &consul,
                    &format!("resync = \"{}s\"", EDGES_RESYNC.as_secs()),
                )
                .await,
            );
        }
        let routed = edges
            .iter()
            .map(|(weft, started)| wait_routed(weft, EDGES_SIZE, *started));
        for (i, routed) in futures::future::join_all(routed).await.iter().enumerate() {
            match routed {
                Ok(routed) => println!("  edge {i}: start -> all routed {routed:.2?}"),
                Err(seen) => println!("  edge {i}: NOT ROUTED: {seen}"),
            }
        }
        // The resync's first pause is a whole `resync` (see BENCHMARKS.md): past it, the
        // resync reads one service every EDGES_RESYNC / EDGES_SIZE.
        let first_pause = edges.iter().map(|(_, started)| *started).max().unwrap() + EDGES_RESYNC;
        tokio::time::sleep_until((first_pause + Duration::from_secs(1)).into()).await;
        let idle = idle_requests(&consul, count).await;
        println!(
            "  idle requests to Consul, all edges, resync {EDGES_RESYNC:?}: {idle:.0} a minute (at the default 10m: {:.0})",
            idle * EDGES_RESYNC.as_secs_f64() / 600.0
        );
        print_connections(&consul);
        consul.check();
    }
}

fn main() {
    let mut runs: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    if runs.is_empty() {
        runs = SIZES.iter().map(ToString::to_string).collect();
        runs.push("edges".into());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for run in runs {
        match run.as_str() {
            "edges" => runtime.block_on(edges_run()),
            size => match size.parse() {
                Ok(size) if size > 0 => runtime.block_on(size_run(size)),
                _ => panic!("{size:?}: a number of services (100, 1000, 10000) or `edges`"),
            },
        }
    }
}
