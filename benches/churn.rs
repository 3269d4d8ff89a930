//! Churn benchmark: steady traffic through weft + real HAProxy while a real source (the
//! services file) churns servers and adds services.
//!
//! ```text
//! cargo bench --bench churn                       # all four runs, ~1 min each
//! cargo bench --bench churn -- on keep-alive 60   # one run: runtime on|off, keep-alive|close, seconds
//! ```
//!
//! Per run it prints: requests, failed requests by kind, latency p50/p99, change-to-traffic
//! p50/p99 (from the file write to the first request served by the new server, split into
//! runtime changes and changes that need a reload), reloads, runtime updates, and the peak
//! number of HAProxy worker processes. `off` runs reload for every change with no minimum
//! interval, as marathon-lb does. BENCHMARKS.md records the results.

#![allow(clippy::unwrap_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{Backend, Weft};
use weft::config::RuntimeUpdates;

/// Backends that can be moved in and out of services.
const POOL: usize = 48;
const BASE_SERVICES: usize = 10;
const SERVERS_PER_SERVICE: usize = 2;
const NEW_SERVICES: usize = 50;
const SERVER_CHANGES: usize = 1000;
/// Every this many changes, a new service instead of a server move.
const NEW_EVERY: usize = (SERVER_CHANGES + NEW_SERVICES) / NEW_SERVICES;
/// Background load: this many clients, each one request every `PACE`.
const CLIENTS: usize = 16;
const PACE: Duration = Duration::from_millis(20);

#[derive(Default)]
struct Stats {
    requests: u64,
    failures: BTreeMap<String, u64>,
    latencies: Vec<Duration>,
}

/// One change whose first served request is being watched for.
struct ProbeRecord {
    structural: bool,
    written: Instant,
    service: usize,
    backend: usize,
    /// When the server left the service again.
    superseded: Option<Instant>,
    /// Stops the probe once superseded: nothing left to see.
    cancel: Arc<std::sync::atomic::AtomicBool>,
    seen: tokio::task::JoinHandle<Option<Instant>>,
}

struct Service {
    name: String,
    servers: Vec<usize>,
    /// Routed by HAProxy already: a change to it can go through the runtime API.
    routed: Arc<std::sync::atomic::AtomicBool>,
}

fn services_toml(services: &[Service], pool: &[SocketAddr]) -> String {
    let mut text = String::new();
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

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn client(keep_alive: bool) -> reqwest::Client {
    let builder = reqwest::Client::builder().timeout(Duration::from_secs(5));
    let builder = if keep_alive {
        builder
    } else {
        builder.pool_max_idle_per_host(0)
    };
    builder.build().unwrap()
}

async fn request(
    client: &reqwest::Client,
    port: u16,
    host: &str,
    keep_alive: bool,
) -> Result<String, String> {
    let mut request = client
        .get(format!("http://127.0.0.1:{port}/"))
        .header("Host", host);
    if !keep_alive {
        request = request.header("Connection", "close");
    }
    match request.send().await {
        Ok(response) if response.status().is_success() => response
            .text()
            .await
            .map_err(|e| format!("body: {}", e.without_url())),
        Ok(response) => Err(format!("status {}", response.status().as_u16())),
        Err(e) if e.is_timeout() => Err("timeout".into()),
        Err(e) if e.is_connect() => Err("connect".into()),
        Err(e) => Err(format!("request: {}", e.without_url())),
    }
}

/// Polls `host` until backend `name` answers; returns when it did.
async fn probe(
    port: u16,
    host: String,
    name: String,
    deadline: Instant,
    cancelled: Arc<std::sync::atomic::AtomicBool>,
) -> Option<Instant> {
    // A new connection for every probe request: it sees what a new client sees, not what an
    // old worker still serves on a connection opened before a reload.
    let client = client(false);
    while Instant::now() < deadline && !cancelled.load(std::sync::atomic::Ordering::Relaxed) {
        if let Ok(body) = request(&client, port, &host, false).await {
            if body == name {
                return Some(Instant::now());
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

async fn run(runtime: bool, keep_alive: bool, seconds: u64) {
    let mut backends = Vec::new();
    for i in 0..POOL {
        backends.push(Backend::start(&format!("b{i}")).await);
    }
    let pool: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let mut services: Vec<Service> = (0..BASE_SERVICES)
        .map(|i| Service {
            name: format!("base{i}"),
            servers: (0..SERVERS_PER_SERVICE)
                .map(|j| (i * SERVERS_PER_SERVICE + j) % POOL)
                .collect(),
            routed: Arc::new(std::sync::atomic::AtomicBool::new(true)),
        })
        .collect();
    let dir = tempfile::Builder::new()
        .prefix("weft-churn-")
        .tempdir()
        .unwrap();
    // The services file is read 5 ms after it changes (sources.file.debounce): the default
    // 200 ms would dominate every change-to-traffic figure.
    let mut weft = Weft::builder()
        .dir(dir)
        .debounce(Duration::from_millis(5))
        .services(&services_toml(&services, &pool));
    if !runtime {
        // Every change is a reload, and none waits for another (marathon-lb's way).
        weft = weft
            .runtime_updates(RuntimeUpdates::Off)
            .min_reload_interval(Duration::ZERO);
    }
    let weft = weft.start().await;
    let port = weft.port;
    for service in &services {
        support::wait_for_backends(
            &weft,
            &format!("{}.test", service.name),
            "/",
            &service
                .servers
                .iter()
                .map(|i| backends[*i].name.as_str())
                .collect::<Vec<_>>(),
        )
        .await;
    }
    let hosts: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(
        services
            .iter()
            .map(|s| format!("{}.test", s.name))
            .collect(),
    ));

    // Background load.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stats = Arc::new(Mutex::new(Stats::default()));
    let mut load = Vec::new();
    for c in 0..CLIENTS {
        let (stop, stats, hosts) = (stop.clone(), stats.clone(), hosts.clone());
        load.push(tokio::spawn(async move {
            // One pool per host, as browsers keep connections per origin: one connection
            // carrying many Host values would meet an old worker's config after a reload.
            let mut clients: BTreeMap<String, reqwest::Client> = BTreeMap::new();
            let mut tick = tokio::time::interval(PACE);
            let mut n = c;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                tick.tick().await;
                let host = {
                    let hosts = hosts.lock().unwrap();
                    hosts[n % hosts.len()].clone()
                };
                n += CLIENTS;
                let start = Instant::now();
                let client = clients
                    .entry(host.clone())
                    .or_insert_with(|| client(keep_alive));
                let result = request(client, port, &host, keep_alive).await;
                let mut stats = stats.lock().unwrap();
                stats.requests += 1;
                match result {
                    Ok(_) => stats.latencies.push(start.elapsed()),
                    Err(kind) => {
                        if std::env::var_os("CHURN_DEBUG").is_some() {
                            eprintln!("{:?} {host}: {kind}", Instant::now());
                        }
                        *stats.failures.entry(kind).or_default() += 1
                    }
                }
            }
        }));
    }

    // Peak worker processes.
    let peak = Arc::new(Mutex::new(0usize));
    let watcher = {
        let (stop, peak) = (stop.clone(), peak.clone());
        let socket = weft.run_dir().join("master.sock");
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(answer) = support::cli(&socket, "show proc").await {
                    let workers = answer.lines().filter(|l| l.contains(" worker ")).count();
                    let mut peak = peak.lock().unwrap();
                    *peak = (*peak).max(workers);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    // Churn: server moves at a steady pace, a new service every so often.
    let (_, _, reloads_before) = (0, 0, weft.show_proc().await.unwrap().0);
    let total = Duration::from_secs(seconds);
    let changes = SERVER_CHANGES + NEW_SERVICES;
    let step = total / changes as u32;
    let mut rng = fastrand::Rng::with_seed(7);
    let mut probes = Vec::new();
    let started = Instant::now();
    let started_wall = std::time::SystemTime::now();
    for change in 0..changes {
        let target = started + step * change as u32;
        tokio::time::sleep_until(target.into()).await;
        let (service_index, backend, structural) = if change % NEW_EVERY == NEW_EVERY - 1
            && services.len() < BASE_SERVICES + NEW_SERVICES
        {
            let first = rng.usize(0..POOL);
            let name = format!("new{}", services.len() - BASE_SERVICES);
            services.push(Service {
                name,
                servers: vec![first],
                routed: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            });
            (services.len() - 1, first, true)
        } else {
            // Move one server of a random service to a backend it does not have.
            let s = rng.usize(0..services.len());
            let service = &mut services[s];
            let slot = rng.usize(0..service.servers.len());
            let mut next = rng.usize(0..POOL);
            while service.servers.contains(&next) {
                next = rng.usize(0..POOL);
            }
            let old = std::mem::replace(&mut service.servers[slot], next);
            // A server moved out before its probe saw it never had the chance to serve.
            if let Some(record) = probes
                .iter_mut()
                .rev()
                .find(|r: &&mut ProbeRecord| r.service == s && r.backend == old)
            {
                record.superseded.get_or_insert(Instant::now());
                record
                    .cancel
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
            // A change to a service HAProxy does not route yet waits for its reload.
            let structural = !service.routed.load(std::sync::atomic::Ordering::Relaxed);
            (s, next, structural)
        };
        let host = format!("{}.test", services[service_index].name);
        let name = backends[backend].name.clone();
        weft.write_services(&services_toml(&services, &pool));
        let written = Instant::now();
        let load_hosts = hosts.clone();
        let routed = services[service_index].routed.clone();
        let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let cancelled = cancel.clone();
        probes.push(ProbeRecord {
            structural,
            written,
            service: service_index,
            backend,
            superseded: None,
            cancel,
            seen: tokio::spawn(async move {
                let deadline = written + Duration::from_secs(10);
                let seen = probe(port, host.clone(), name, deadline, cancelled).await;
                // A new service joins the background load once it routes: asking for a host
                // before it exists is a 404 by design, not a failure.
                if seen.is_some() && !routed.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    load_hosts.lock().unwrap().push(host);
                }
                seen
            }),
        });
    }
    let churn_time = started.elapsed();
    let mut runtime_latency = Vec::new();
    let mut reload_latency = Vec::new();
    let (mut lost, mut superseded) = (0, 0);
    for record in probes {
        let seen = record.seen.await.unwrap();
        match (seen, record.superseded) {
            (Some(seen), Some(gone)) if seen > gone => superseded += 1,
            (Some(seen), _) if record.structural => reload_latency.push(seen - record.written),
            (Some(seen), _) => {
                if std::env::var_os("CHURN_DEBUG").is_some()
                    && seen - record.written > Duration::from_millis(300)
                {
                    eprintln!(
                        "slow runtime change at +{:.3?}: {:.1?} service {}",
                        record.written - started,
                        seen - record.written,
                        record.service
                    );
                }
                runtime_latency.push(seen - record.written)
            }
            (None, Some(_)) => superseded += 1,
            (None, None) => lost += 1,
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    watcher.await.unwrap();

    let (_, json) = weft.status("/status").await.unwrap();
    let status: serde_json::Value = serde_json::from_str(&json).unwrap();
    let reloads = weft.show_proc().await.unwrap().0 - reloads_before;
    let stats = stats.lock().unwrap();
    let mut latencies = stats.latencies.clone();
    latencies.sort();
    runtime_latency.sort();
    reload_latency.sort();
    let failed: u64 = stats.failures.values().sum();
    println!(
        "runtime_updates={} connections={} churn={:.1?}: {} server changes, {} new services",
        if runtime { "on" } else { "off" },
        if keep_alive { "keep-alive" } else { "close" },
        churn_time,
        changes - (services.len() - BASE_SERVICES),
        services.len() - BASE_SERVICES,
    );
    println!(
        "  requests {}  failed {} {:?}  latency p50 {:.1?} p99 {:.1?}",
        stats.requests,
        failed,
        stats.failures,
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99)
    );
    println!(
        "  change-to-traffic: server changes p50 {:.1?} p99 {:.1?} (n={}); new services p50 {:.1?} p99 {:.1?} (n={}); moved out before seen {}; never seen {}",
        percentile(&runtime_latency, 0.5),
        percentile(&runtime_latency, 0.99),
        runtime_latency.len(),
        percentile(&reload_latency, 0.5),
        percentile(&reload_latency, 0.99),
        reload_latency.len(),
        superseded,
        lost
    );
    if std::env::var_os("CHURN_DEBUG").is_some() {
        std::fs::write("/tmp/churn-weft.log", weft.log()).unwrap();
        eprintln!("churn started at {:?}", started_wall);
        for line in weft.log().lines().filter(|l| {
            l.contains("WARN")
                || l.contains("ERROR")
                || l.contains("Deferred")
                || l.contains("reloaded")
        }) {
            eprintln!("{line}");
        }
    }
    println!(
        "  reloads {}  runtime updates {}  peak haproxy workers {}",
        reloads,
        status["haproxy"]["runtime_updates"],
        peak.lock().unwrap()
    );
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let seconds = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(60);
    let runs: Vec<(bool, bool)> = match (
        args.first().map(String::as_str),
        args.get(1).map(String::as_str),
    ) {
        (Some(mode), Some(connection)) => vec![(mode == "on", connection == "keep-alive")],
        _ => vec![(true, true), (true, false), (false, true), (false, false)],
    };
    for (runtime_on, keep_alive) in runs {
        runtime.block_on(run(runtime_on, keep_alive, seconds));
    }
}
