//! Scale benchmark: weft (the services file) + managed real HAProxy at 10,000 services of 3
//! loopback servers each.
//!
//! ```text
//! cargo bench --bench scale            # 10,000 services
//! cargo bench --bench scale -- 1000    # another size
//! ```
//!
//! It prints, one line a measure:
//! - HAProxy's worker RSS once every service is routed, and the RSS of a second HAProxy
//!   started on the same config with exactly the services' servers: every parked slot line
//!   (`server sN 127.0.0.1:1 disabled`) and every `backend spare_*` section dropped, its binds
//!   and sockets moved; their ratio;
//! - weft's RSS once routed and settled, and after 10 new services added one by one;
//! - new service -> traffic: from the services file's write to the first 200 from the new
//!   host through HAProxy (a new connection every 5 ms), p50/p99, and the reloads meanwhile
//!   (weft's `weft_haproxy_reloads_total`);
//! - server move -> HAProxy: one server of a service moved to another loopback backend in the
//!   file, until `show servers state be_<service>` on the admin socket shows the new address
//!   and not the old; timed from weft's `services file changed` log line (written when the
//!   debounce, set to 0 ms, ends and the read begins), so the file watch's event delivery and
//!   the debounce are excluded, and the read and parse of the whole file, the model, the
//!   slots, the render, the file writes and the runtime commands are included. The time
//!   from the write is printed beside it.
//!
//! The servers are `POOL` HTTP backends on 127.0.0.1 (`support::Backend`, each answering its
//! name); service K has backends K, K+1, K+2 (mod `POOL`). BENCHMARKS.md records the results.

#![allow(clippy::unwrap_used)]

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use common::{memory_mib, metric, percentile, serving};
use support::{Backend, Weft};

const DEFAULT_SIZE: usize = 10_000;
const POOL: usize = 64;
const SERVERS: usize = 3;
const NEW_SERVICES: usize = 10;
const MOVES: usize = 30;
/// weft settles this long before its steady RSS is read.
const SETTLE: Duration = Duration::from_secs(10);
const ROUTE_DEADLINE: Duration = Duration::from_secs(10 * 60);
const CHANGE_DEADLINE: Duration = Duration::from_secs(30);
/// Between two moves.
const SPACING: Duration = Duration::from_millis(300);
/// Between a new service's first 200 and the next new service: more than weft's default
/// `haproxy.min_reload_interval` (1 s), so that a new service that needs a reload (none with
/// the backend pool, while it has spares) measures that reload, not the interval's hold.
const NEW_SPACING: Duration = Duration::from_millis(1500);

fn name(k: usize) -> String {
    format!("svc{k}")
}

struct Service {
    name: String,
    servers: Vec<usize>,
}

fn services_toml(services: &[Service], pool: &[SocketAddr]) -> String {
    let mut text = String::with_capacity(services.len() * 120);
    for service in services {
        let servers: Vec<String> = service
            .servers
            .iter()
            .map(|i| format!("\"{}\"", pool[*i]))
            .collect();
        text += &format!(
            "[[service]]\nname = \"{0}\"\nhosts = [\"{0}.test\"]\nservers = [{1}]\n\n",
            service.name,
            servers.join(", ")
        );
    }
    text
}

fn want(service: &Service, pool: &[SocketAddr]) -> BTreeSet<SocketAddr> {
    service.servers.iter().map(|i| pool[*i]).collect()
}

/// Waits until every service's backend serves exactly its servers.
async fn wait_routed(admin: &Path, services: &[Service], pool: &[SocketAddr], started: Instant) {
    let poll = Duration::from_millis((services.len() as u64 / 10).max(100));
    let mut progress = started + Duration::from_secs(30);
    loop {
        let routed = match support::cli(admin, "show servers state").await {
            Ok(answer) => {
                let backends = serving(&answer);
                services
                    .iter()
                    .filter(|s| backends.get(&format!("be_{}", s.name)) == Some(&want(s, pool)))
                    .count()
            }
            Err(_) => 0,
        };
        if routed == services.len() {
            return;
        }
        assert!(
            started.elapsed() < ROUTE_DEADLINE,
            "{routed} of {} services routed after {:.0?}",
            services.len(),
            started.elapsed()
        );
        if Instant::now() > progress {
            eprintln!(
                "  ... {routed} of {} routed after {:.0?}",
                services.len(),
                started.elapsed()
            );
            progress += Duration::from_secs(30);
        }
        tokio::time::sleep(poll).await;
    }
}

/// The worker pids of the HAProxy whose master listens on `socket`.
async fn workers(socket: &Path) -> Vec<u32> {
    let answer = support::cli(socket, "show proc").await.unwrap_or_default();
    answer
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields.as_slice() {
                [pid, "worker", ..] => pid.parse().ok(),
                _ => None,
            }
        })
        .collect()
}

/// weft's config with exactly the services' servers: no parked slot, no spare backend; its
/// listeners and sockets moved into `dir`, its bind to `port`.
fn exact_config(installed: &str, dir: &Path, port: u16) -> String {
    let mut out = String::with_capacity(installed.len());
    let mut in_spare = false;
    for line in installed.lines() {
        let trimmed = line.trim_start();
        if !line.starts_with(' ') && !line.is_empty() {
            // A section header ends the previous section.
            in_spare = trimmed.starts_with("backend spare_");
        }
        if in_spare {
            continue;
        }
        let fields: Vec<&str> = trimmed.split_whitespace().collect();
        let line = match fields.as_slice() {
            ["server", _, "127.0.0.1:1", "disabled", ..] => continue,
            ["stats", "socket", _, rest @ ..] => format!(
                "    stats socket {} {}",
                dir.join("admin.sock").display(),
                rest.join(" ")
            ),
            ["server-state-file", _] => format!(
                "    server-state-file {}",
                dir.join("server-state").display()
            ),
            ["bind", addr, ..] if addr.starts_with("unix@") => format!(
                "    bind unix@{} mode 600",
                dir.join("prometheus.sock").display()
            ),
            ["bind", addr, rest @ ..] => {
                assert!(addr.starts_with("127.0.0.1:"), "{line}");
                format!("    bind 127.0.0.1:{port} {}", rest.join(" "))
            }
            _ => line.to_string(),
        };
        out += &line;
        out.push('\n');
    }
    out
}

/// HAProxy on the exact config; its worker's RSS once it answers and settled.
async fn exact_haproxy_rss(weft: &Weft) -> (f64, usize, usize) {
    let installed = std::fs::read_to_string(weft.run_dir().join("haproxy.cfg")).unwrap();
    let dir = tempfile::Builder::new()
        .prefix("weft-scale-exact-")
        .tempdir()
        .unwrap();
    let config = exact_config(&installed, dir.path(), support::free_port());
    let count = |text: &str| {
        text.lines()
            .filter(|l| l.trim_start().starts_with("server "))
            .count()
    };
    let (before, after) = (count(&installed), count(&config));
    let file = dir.path().join("haproxy.cfg");
    std::fs::write(&file, &config).unwrap();
    let master = dir.path().join("master.sock");
    let check = Command::new(support::HAPROXY)
        .arg("-c")
        .arg("-f")
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "haproxy -c on the exact config: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let child: Child = Command::new(support::HAPROXY)
        .arg("-W")
        .arg("-S")
        .arg(format!("{},mode,600", master.display()))
        .arg("-f")
        .arg(&file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let admin = dir.path().join("admin.sock");
    let deadline = Instant::now() + Duration::from_secs(120);
    let worker = loop {
        if let (Some(worker), Ok(_)) = (
            workers(&master).await.first().copied(),
            support::cli(&admin, "show info").await,
        ) {
            break worker;
        }
        assert!(Instant::now() < deadline, "the exact HAProxy did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss = memory_mib(worker, "VmRSS");
    support::terminate(child);
    (rss, before, after)
}

/// Polls `host` through HAProxy, a new connection each time, until it answers 200.
async fn first_200(port: u16, host: &str, since: Instant) -> Option<Duration> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    while since.elapsed() < CHANGE_DEADLINE {
        let answer = client
            .get(format!("http://127.0.0.1:{port}/"))
            .header("Host", host)
            .send()
            .await;
        if answer.is_ok_and(|a| a.status().is_success()) {
            return Some(since.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

/// The timestamp of the first line after `mark` in weft's log that contains `what`.
fn logged_after(weft: &Weft, mark: usize, what: &str) -> Option<SystemTime> {
    let log = weft.log();
    let line = log.get(mark..)?.lines().find(|l| l.contains(what))?;
    let stamp = line.split_whitespace().next()?;
    humantime::parse_rfc3339_weak(stamp.trim_end_matches('Z')).ok()
}

async fn run(size: usize) {
    let mut backends = Vec::new();
    for i in 0..POOL {
        backends.push(Backend::start(&format!("b{i}")).await);
    }
    let pool: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let mut services: Vec<Service> = (0..size)
        .map(|k| Service {
            name: name(k),
            servers: (0..SERVERS).map(|j| (k + j) % POOL).collect(),
        })
        .collect();
    let started = Instant::now();
    // debounce 0: the read starts as soon as the change is seen.
    let weft = Weft::builder()
        .debounce(Duration::ZERO)
        .services(&services_toml(&services, &pool))
        .start()
        .await;
    let pid = weft.pid().unwrap();
    let admin = weft.run_dir().join("admin.sock");
    let master = weft.run_dir().join("master.sock");
    wait_routed(&admin, &services, &pool, started).await;
    let routed = started.elapsed();
    println!(
        "{size} services x {SERVERS} servers ({POOL} loopback backends), file source, debounce 0 ms"
    );
    println!("  start -> all routed: {routed:.2?}");

    // HAProxy: weft's worker, then one on exactly the servers.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let worker = *workers(&master).await.first().unwrap();
    let haproxy_rss = memory_mib(worker, "VmRSS");
    let (exact_rss, lines_weft, lines_exact) = exact_haproxy_rss(&weft).await;

    // weft, settled.
    tokio::time::sleep(SETTLE).await;
    let weft_steady = memory_mib(pid, "VmRSS");
    let weft_peak_routed = memory_mib(pid, "VmHWM");

    // New services, one by one.
    let reloads_before = metric(&weft, "weft_haproxy_reloads_total").await;
    let mut new_latency = Vec::new();
    for i in 0..NEW_SERVICES {
        let k = size + i;
        services.push(Service {
            name: format!("new{i}"),
            servers: (0..SERVERS).map(|j| (k + j) % POOL).collect(),
        });
        weft.write_services(&services_toml(&services, &pool));
        let written = Instant::now();
        match first_200(weft.port, &format!("new{i}.test"), written).await {
            Some(latency) => new_latency.push(latency),
            None => println!("  new{i} never answered"),
        }
        tokio::time::sleep(NEW_SPACING).await;
    }
    let reloads = metric(&weft, "weft_haproxy_reloads_total").await - reloads_before;
    tokio::time::sleep(SETTLE).await;
    let weft_after_new = memory_mib(pid, "VmRSS");

    // Server moves.
    let mut moves_logged = Vec::new();
    let mut moves_written = Vec::new();
    for step in 0..MOVES {
        let index = (step * size / MOVES + 7) % size;
        let service = &mut services[index];
        let old = service.servers[1];
        let mut next = (old + POOL / 2) % POOL;
        while service.servers.contains(&next) {
            next = (next + 1) % POOL;
        }
        service.servers[1] = next;
        let backend = format!("be_{}", service.name);
        let (old, new) = (pool[old], pool[next]);
        let mark = weft.log().len();
        weft.write_services(&services_toml(&services, &pool));
        let written = Instant::now();
        let mut seen = None;
        while written.elapsed() < CHANGE_DEADLINE {
            let answer = support::cli(&admin, &format!("show servers state {backend}"))
                .await
                .unwrap_or_default();
            let servers = serving(&answer).remove(&backend).unwrap_or_default();
            if servers.contains(&new) && !servers.contains(&old) {
                seen = Some((Instant::now(), SystemTime::now()));
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        match seen {
            Some((at, wall)) => {
                moves_written.push(at - written);
                match logged_after(&weft, mark, "services file changed") {
                    Some(logged) => {
                        moves_logged.push(wall.duration_since(logged).unwrap_or_default())
                    }
                    None => println!("  move {step}: no `services file changed` in the log"),
                }
            }
            None => println!("  move {step} of {backend} never showed in HAProxy"),
        }
        tokio::time::sleep(SPACING).await;
    }
    let weft_end = memory_mib(pid, "VmRSS");
    let weft_peak = memory_mib(pid, "VmHWM");
    new_latency.sort();
    moves_logged.sort();
    moves_written.sort();

    println!(
        "  haproxy worker RSS routed: {haproxy_rss:.1} MiB ({lines_weft} server lines); exact servers, no spare slot: {exact_rss:.1} MiB ({lines_exact} server lines); ratio {:.2} (goal <= 1.2)",
        haproxy_rss / exact_rss
    );
    println!(
        "  weft RSS steady: {weft_steady:.1} MiB (peak while routing {weft_peak_routed:.1} MiB); after {NEW_SERVICES} new services: {weft_after_new:.1} MiB (goal < 64 MiB both)"
    );
    println!(
        "  new service -> traffic: p50 {:.1?} p99 {:.1?} (n={}), reloads meanwhile {reloads}",
        percentile(&new_latency, 0.5),
        percentile(&new_latency, 0.99),
        new_latency.len()
    );
    println!(
        "  server move -> haproxy state (from weft's `services file changed`, debounce and file watch excluded): p50 {:.1?} p99 {:.1?} (n={}); from the write: p50 {:.1?} p99 {:.1?} (goal p99 < 100 ms)",
        percentile(&moves_logged, 0.5),
        percentile(&moves_logged, 0.99),
        moves_logged.len(),
        percentile(&moves_written, 0.5),
        percentile(&moves_written, 0.99),
    );
    println!("  weft RSS right after the last move: {weft_end:.1} MiB, peak {weft_peak:.1} MiB");
    // What the moves' work left behind once freed (the allocator hands pages back after a
    // delay).
    tokio::time::sleep(SETTLE).await;
    let weft_settled = memory_mib(pid, "VmRSS");
    println!(
        "  weft RSS {} s after the moves: {weft_settled:.1} MiB",
        SETTLE.as_secs()
    );
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let size = match args.first() {
        None => DEFAULT_SIZE,
        Some(size) => size
            .parse()
            .ok()
            .filter(|size| *size > 0)
            .unwrap_or_else(|| panic!("{size:?}: a number of services")),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(size));
}
