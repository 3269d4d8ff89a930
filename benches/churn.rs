//! Churn benchmark: steady traffic through weft + real HAProxy while a real source (the
//! services file) churns servers, adds services and removes others, with WebSockets held open
//! throughout.
//!
//! ```text
//! cargo bench --bench churn                       # all five runs, ~1 min each
//! cargo bench --bench churn -- on keep-alive 60   # one run: runtime on|off, keep-alive|close|https, seconds
//! ```
//!
//! `https` is keep-alive over TLS on weft's `[tls]` bind (HTTP/1.1: reqwest here speaks no h2),
//! with the certificate that covers every host renewed every 3 s throughout: renewals must
//! fail no request and add no reload.
//!
//! Per run it prints: requests, failed requests by kind, latency p50/p99, change-to-traffic
//! p50/p99 (from the file write to the first request served by the new server, split into
//! runtime changes and changes that need a reload), reloads, runtime updates, the peak
//! number of HAProxy worker processes, and the long-lived connections (WebSockets opened before
//! the churn, an echo on each every second) still open at the end and cut before it. `off`
//! runs reload for every change with no minimum interval, as marathon-lb does.
//! BENCHMARKS.md records the results.

#![allow(clippy::unwrap_used)]

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::percentile;
use futures::{SinkExt, StreamExt};
use support::tls::{install, wait_for_serial, TestCa};
use support::{Backend, Weft};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use weft::config::RuntimeUpdates;

/// Backends that can be moved in and out of services.
const POOL: usize = 48;
/// Services that stay for the whole run, `SERVERS_PER_SERVICE` servers each.
const BASE_SERVICES: usize = 10;
const SERVERS_PER_SERVICE: usize = 2;
/// Services there at the start that the churn removes, one server each.
const OLD_SERVICES: usize = 50;
/// Services the churn adds, one server each; they stay.
const NEW_SERVICES: usize = 50;
const SERVER_CHANGES: usize = 1000;
const CHANGES: usize = SERVER_CHANGES + NEW_SERVICES + OLD_SERVICES;
/// Of every this many changes, one is a new service (the middle one) and one a removal (the
/// last one); the others are server moves.
const EVERY: usize = CHANGES / NEW_SERVICES;
/// Long-lived connections: WebSockets to the base services, opened before the churn and held
/// to the end, an echo on each every `ECHO_EVERY`.
const WEBSOCKETS: usize = 20;
const ECHO_EVERY: Duration = Duration::from_secs(1);
/// `haproxy.hard_stop_after`: the old worker that holds a WebSocket after a reload cuts it this
/// long after the reload. Short, so that a run that reloads shows its cuts within the run.
const HARD_STOP_AFTER: Duration = Duration::from_secs(5);
/// How the background load connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Conn {
    KeepAlive,
    Close,
    /// Keep-alive over TLS, to the `[tls]` bind.
    Https,
}

impl Conn {
    fn name(self) -> &'static str {
        match self {
            Conn::KeepAlive => "keep-alive",
            Conn::Close => "close",
            Conn::Https => "https",
        }
    }
}

/// How often the certificate is renewed in an `https` run.
const ROTATE_EVERY: Duration = Duration::from_secs(3);
/// The certificate's file in the certificates' directory.
const CERT_FILE: &str = "churn.pem";

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
    /// An old service, removable by the churn.
    old: bool,
    /// Removed from the services file.
    removed: bool,
    /// Routed by HAProxy already: a change to it can go through the runtime API.
    routed: Arc<std::sync::atomic::AtomicBool>,
}

fn services_toml(services: &[Service], pool: &[SocketAddr]) -> String {
    let mut text = String::new();
    for service in services.iter().filter(|s| !s.removed) {
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

/// Where the load sends its requests: plain HTTP to HAProxy's port, or HTTPS to its TLS bind
/// trusting the run's CA.
#[derive(Clone)]
struct Target {
    port: u16,
    tls: Option<(u16, reqwest::Certificate)>,
}

fn client(conn: Conn, target: &Target, host: &str) -> reqwest::Client {
    let builder = reqwest::Client::builder().timeout(Duration::from_secs(5));
    let builder = match (conn, &target.tls) {
        (Conn::Https, Some((port, ca))) => builder
            .add_root_certificate(ca.clone())
            .resolve(host, SocketAddr::from(([127, 0, 0, 1], *port))),
        (Conn::Close, _) => builder.pool_max_idle_per_host(0),
        _ => builder,
    };
    builder.build().unwrap()
}

async fn request(
    client: &reqwest::Client,
    target: &Target,
    host: &str,
    conn: Conn,
) -> Result<String, String> {
    let mut request = match (conn, &target.tls) {
        (Conn::Https, Some((port, _))) => client.get(format!("https://{host}:{port}/")),
        _ => client
            .get(format!("http://127.0.0.1:{}/", target.port))
            .header("Host", host),
    };
    if conn == Conn::Close {
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
    let target = Target { port, tls: None };
    let client = client(Conn::Close, &target, &host);
    while Instant::now() < deadline && !cancelled.load(std::sync::atomic::Ordering::Relaxed) {
        if let Ok(body) = request(&client, &target, &host, Conn::Close).await {
            if body == name {
                return Some(Instant::now());
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

/// The hosts the load asks for: only hosts that are routed and not about to be removed.
#[derive(Default)]
struct Hosts {
    routed: Vec<String>,
    /// Requests under way, per host: a removal waits until its host has none.
    in_flight: BTreeMap<String, usize>,
}

type WsClient = WebSocketStream<TcpStream>;

/// A WebSocket to `ws://HOST/` through HAProxy on `port`.
async fn ws_open(port: u16, host: &str) -> Result<WsClient, String> {
    let stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let handshake = tokio_tungstenite::client_async(format!("ws://{host}/"), stream);
    let (client, _) = tokio::time::timeout(Duration::from_secs(5), handshake)
        .await
        .map_err(|_| "handshake timed out".to_string())?
        .map_err(|e| format!("handshake: {e}"))?;
    Ok(client)
}

/// Sends `text` and waits (at most 5 s) for its echo.
async fn ws_echo(client: &mut WsClient, text: &str) -> Result<(), String> {
    client
        .send(Message::text(text))
        .await
        .map_err(|e| format!("send: {e}"))?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, client.next()).await {
            Err(_) => return Err("no echo within 5 s".into()),
            Ok(Some(Ok(Message::Text(echoed)))) if echoed.as_str() == text => return Ok(()),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            Ok(Some(Ok(Message::Close(_)))) => return Err("closed".into()),
            Ok(None) => return Err("closed".into()),
            Ok(Some(Err(e))) => return Err(format!("receive: {e}")),
            Ok(Some(Ok(other))) => return Err(format!("unexpected {other:?}")),
        }
    }
}

/// Holds a WebSocket open until `stop`, an echo every `ECHO_EVERY` and a last one at `stop`;
/// returns when and why it was cut, if it was.
async fn hold(
    mut client: WsClient,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Result<(), (Instant, String)> {
    let mut n = 0u64;
    loop {
        tokio::time::sleep(ECHO_EVERY).await;
        let last = stop.load(std::sync::atomic::Ordering::Relaxed);
        n += 1;
        ws_echo(&mut client, &format!("echo {n}"))
            .await
            .map_err(|why| (Instant::now(), why))?;
        if last {
            let _ = client.close(None).await;
            return Ok(());
        }
    }
}

async fn run(runtime: bool, conn: Conn, seconds: u64) {
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
            old: false,
            removed: false,
            routed: Arc::new(std::sync::atomic::AtomicBool::new(true)),
        })
        .chain((0..OLD_SERVICES).map(|i| Service {
            name: format!("old{i}"),
            servers: vec![(BASE_SERVICES * SERVERS_PER_SERVICE + i) % POOL],
            old: true,
            removed: false,
            routed: Arc::new(std::sync::atomic::AtomicBool::new(true)),
        }))
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
        .hard_stop_after(HARD_STOP_AFTER)
        .services(&services_toml(&services, &pool));
    if !runtime {
        // Every change is a reload, and none waits for another (marathon-lb's way).
        weft = weft
            .runtime_updates(RuntimeUpdates::Off)
            .min_reload_interval(Duration::ZERO);
    }
    if conn == Conn::Https {
        weft = weft.tls();
    }
    let weft = weft.start().await;
    let port = weft.port;
    // https: one certificate for every host the run will have, renewed every ROTATE_EVERY.
    let every_host: Vec<String> = services
        .iter()
        .map(|s| format!("{}.test", s.name))
        .chain((0..NEW_SERVICES).map(|i| format!("new{i}.test")))
        .collect();
    let every_host: Vec<&str> = every_host.iter().map(String::as_str).collect();
    let ca = (conn == Conn::Https).then(TestCa::new);
    let target = Target {
        port,
        tls: match (&ca, weft.tls_port) {
            (Some(ca), Some(tls_port)) => {
                let first = ca.issue(&every_host, 30);
                install(&weft.certs_dir(), CERT_FILE, &first.pem);
                wait_for_serial(tls_port, Some("base0.test"), &first.serial).await;
                let root = std::fs::read(&ca.file).unwrap();
                Some((tls_port, reqwest::Certificate::from_pem(&root).unwrap()))
            }
            _ => None,
        },
    };
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
    let hosts = Arc::new(Mutex::new(Hosts {
        routed: services
            .iter()
            .map(|s| format!("{}.test", s.name))
            .collect(),
        in_flight: BTreeMap::new(),
    }));

    // Background load.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stats = Arc::new(Mutex::new(Stats::default()));
    let mut load = Vec::new();
    for c in 0..CLIENTS {
        let (stop, stats, hosts, target) =
            (stop.clone(), stats.clone(), hosts.clone(), target.clone());
        load.push(tokio::spawn(async move {
            // One pool per host, as browsers keep connections per origin: one connection
            // carrying many Host values would meet an old worker's config after a reload.
            let mut clients: BTreeMap<String, reqwest::Client> = BTreeMap::new();
            let mut tick = tokio::time::interval(PACE);
            let mut n = c;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                tick.tick().await;
                let host = {
                    let mut hosts = hosts.lock().unwrap();
                    let host = hosts.routed[n % hosts.routed.len()].clone();
                    *hosts.in_flight.entry(host.clone()).or_default() += 1;
                    host
                };
                n += CLIENTS;
                let start = Instant::now();
                let client = clients
                    .entry(host.clone())
                    .or_insert_with(|| client(conn, &target, &host));
                let result = request(client, &target, &host, conn).await;
                *hosts.lock().unwrap().in_flight.get_mut(&host).unwrap() -= 1;
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

    // https: the certificate renewed every ROTATE_EVERY, through the whole churn.
    let renewals = ca.map(|ca| {
        let (stop, certs) = (stop.clone(), weft.certs_dir());
        let hosts: Vec<String> = every_host.iter().map(|h| h.to_string()).collect();
        tokio::spawn(async move {
            let hosts: Vec<&str> = hosts.iter().map(String::as_str).collect();
            let mut last = String::new();
            let mut count = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                tokio::time::sleep(ROTATE_EVERY).await;
                let renewed = ca.issue(&hosts, 30);
                install(&certs, CERT_FILE, &renewed.pem);
                last = renewed.serial;
                count += 1;
            }
            (count, last)
        })
    });

    // Long-lived connections, to the base services (never removed), opened before the churn.
    let mut long_lived = Vec::new();
    for i in 0..WEBSOCKETS {
        let host = format!("base{}.test", i % BASE_SERVICES);
        let mut client = ws_open(port, &host)
            .await
            .unwrap_or_else(|e| panic!("a WebSocket to {host}: {e}"));
        ws_echo(&mut client, "hello").await.unwrap();
        long_lived.push(tokio::spawn(hold(client, stop.clone())));
        // Their echoes spread over the second.
        tokio::time::sleep(ECHO_EVERY / WEBSOCKETS as u32).await;
    }

    // Churn: server moves at a steady pace; every so often a new service, and a removal.
    let (_, _, reloads_before) = (0, 0, weft.show_proc().await.unwrap().0);
    let total = Duration::from_secs(seconds);
    let step = total / CHANGES as u32;
    let mut rng = fastrand::Rng::with_seed(7);
    let mut probes = Vec::new();
    let (mut added, mut removed) = (0, 0);
    let started = Instant::now();
    let started_wall = std::time::SystemTime::now();
    for change in 0..CHANGES {
        let target = started + step * change as u32;
        tokio::time::sleep_until(target.into()).await;
        // The change, and the server it puts in service (to probe for), if any.
        let watch = if change % EVERY == EVERY / 2 - 1 && added < NEW_SERVICES {
            let first = rng.usize(0..POOL);
            services.push(Service {
                name: format!("new{added}"),
                servers: vec![first],
                old: false,
                removed: false,
                routed: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            });
            added += 1;
            Some((services.len() - 1, first, true))
        } else if change % EVERY == EVERY - 1 && removed < OLD_SERVICES {
            // A removal: its host leaves the load, and the requests under way to it end,
            // before the file says so (it answers 404 from then on, by design).
            let left: Vec<usize> = (0..services.len())
                .filter(|&i| services[i].old && !services[i].removed)
                .collect();
            let s = left[rng.usize(0..left.len())];
            services[s].removed = true;
            removed += 1;
            let host = format!("{}.test", services[s].name);
            hosts.lock().unwrap().routed.retain(|h| *h != host);
            while hosts
                .lock()
                .unwrap()
                .in_flight
                .get(&host)
                .copied()
                .unwrap_or(0)
                > 0
            {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            // Its servers' probes have nothing left to see.
            for record in probes
                .iter_mut()
                .filter(|r: &&mut ProbeRecord| r.service == s)
            {
                record.superseded.get_or_insert(Instant::now());
                record
                    .cancel
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
            None
        } else {
            // Move one server of a random service to a backend it does not have.
            let live: Vec<usize> = (0..services.len())
                .filter(|&i| !services[i].removed)
                .collect();
            let s = live[rng.usize(0..live.len())];
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
            Some((s, next, structural))
        };
        weft.write_services(&services_toml(&services, &pool));
        let written = Instant::now();
        let Some((service_index, backend, structural)) = watch else {
            continue;
        };
        let host = format!("{}.test", services[service_index].name);
        let name = backends[backend].name.clone();
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
                    load_hosts.lock().unwrap().routed.push(host);
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
    let mut cuts = Vec::new();
    for task in long_lived {
        if let Err((when, why)) = task.await.unwrap() {
            cuts.push((when - started, why));
        }
    }
    cuts.sort_by_key(|(when, _)| *when);
    let renewed = match renewals {
        Some(task) => {
            let (count, last) = task.await.unwrap();
            let (tls_port, _) = target.tls.as_ref().unwrap();
            let took = wait_for_serial(*tls_port, Some("new0.test"), &last).await;
            format!("  certificate renewals {count} (the last served {took:.1?} after its file)\n")
        }
        None => String::new(),
    };

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
        "runtime_updates={} connections={} churn={:.1?}: {} server changes, {} new services, {} removals",
        if runtime { "on" } else { "off" },
        conn.name(),
        churn_time,
        CHANGES - added - removed,
        added,
        removed,
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
    print!("{renewed}");
    println!(
        "  reloads {}  runtime updates {}  peak haproxy workers {}",
        reloads,
        status["haproxy"]["runtime_updates"],
        peak.lock().unwrap()
    );
    // A reload's old worker keeps its WebSockets until hard_stop_after, then cuts them.
    let when = match (cuts.first(), cuts.last()) {
        (Some((first, why)), Some((last, _))) => format!(
            " (the first {first:.1?} after the churn began, the last {last:.1?}; first: {why})"
        ),
        _ => String::new(),
    };
    println!(
        "  long-lived connections (WebSockets, an echo each second; hard_stop_after {:?}): {} opened, open at the end {}, cut {}{}",
        HARD_STOP_AFTER,
        WEBSOCKETS,
        WEBSOCKETS - cuts.len(),
        cuts.len(),
        when
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
    let conn = |name: &str| match name {
        "close" => Conn::Close,
        "https" => Conn::Https,
        _ => Conn::KeepAlive,
    };
    let runs: Vec<(bool, Conn)> = match (
        args.first().map(String::as_str),
        args.get(1).map(String::as_str),
    ) {
        (Some(mode), Some(connection)) => vec![(mode == "on", conn(connection))],
        _ => vec![
            (true, Conn::KeepAlive),
            (true, Conn::Close),
            (true, Conn::Https),
            (false, Conn::KeepAlive),
            (false, Conn::Close),
        ],
    };
    for (runtime_on, connections) in runs {
        runtime.block_on(run(runtime_on, connections, seconds));
    }
}
