//! A rolling deploy on Marathon, followed by weft from the event stream: what weft pulls from
//! Marathon per event, whether it fetches every app again, and how soon HAProxy routes exactly
//! Marathon's tasks.
//!
//! ```text
//! cargo bench --bench marathon_deploy            # 1000 and 10000 apps
//! cargo bench --bench marathon_deploy -- 10000   # one size
//! ```
//!
//! `N` health-checked apps of 3 tasks each (Marathon 1.5 shape, docker USER network, each task
//! its own loopback IP on one container port, served by one backend on 0.0.0.0; a COMMAND
//! health check, so that Marathon's results decide and HAProxy checks nothing) are loaded
//! into the Marathon double; weft (release binary, managed HAProxy, `resync` an hour away)
//! routes them all. Then [`ROUNDS`] rounds each redeploy [`APPS_PER_ROUND`] apps as Marathon's
//! rolling restart does: a new app version (`api_post_event`), then per task a replacement
//! started (`status_update_event` TASK_RUNNING, then `health_status_changed_event` alive) and
//! the old one killed (`status_update_event` TASK_KILLED), [`EVENT_SPACING`] apart. After each
//! round's last event, `show servers state` of the round's backends is polled until each serves
//! exactly the app's tasks (running, no maintenance); that time is one sample. Printed:
//! - task events and all events sent; full and single-app fetches during the deploy, by the
//!   double's count; bytes weft read from Marathon (`weft_marathon_bytes_total`) per event;
//! - last event -> HAProxy routes exactly Marathon's tasks, p50 / p99 / max over the rounds;
//! - weft's RSS at the end.
//!
//! BENCHMARKS.md records the results.

#![allow(clippy::unwrap_used)]

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{memory_mib, metric, percentile, serving};
use serde_json::{json, Value};
use support::marathon::{App, MarathonDouble, Task};
use support::{Backend, Weft};

const SIZES: [usize; 2] = [1_000, 10_000];
const TASKS: usize = 3;
const ROUNDS: usize = 12;
const APPS_PER_ROUND: usize = 10;
const EVENT_SPACING: Duration = Duration::from_millis(5);
const ROUTE_DEADLINE: Duration = Duration::from_secs(10 * 60);
const ROUND_DEADLINE: Duration = Duration::from_secs(30);
const FIRST_VERSION: &str = "2026-01-01T00:00:00.000Z";

/// Task `n`'s own loopback IP (127.1.0.0 and up).
fn ip(n: usize) -> String {
    format!("127.{}.{}.{}", 1 + n / 65_536, (n / 256) % 256, n % 256)
}

fn app(k: usize, port: u16, version: &str) -> App {
    App::new(&format!("/app{k}"))
        .label("HAPROXY_GROUP", "external")
        .label("HAPROXY_0_VHOST", &format!("app{k}.test"))
        .container_port(port)
        .service_port(10_000 + k as u16 % 50_000)
        // Marathon's own check decides which tasks are routed; HAProxy runs none (a COMMAND
        // check maps to none), which at 30,000 servers would need more file descriptors than
        // this machine's limit of 20,000.
        .health_check(json!({
            "protocol": "COMMAND",
            "command": {"value": "curl -f http://$HOST:$PORT0/"},
            "gracePeriodSeconds": 300,
            "intervalSeconds": 60,
            "timeoutSeconds": 20,
            "maxConsecutiveFailures": 3
        }))
        .version(version)
}

fn task(k: usize, n: usize) -> Task {
    Task::new(&format!("app{k}.t{n}"))
        .ip(&ip(n))
        .health(Some(true))
}

/// `/v2/apps?embed=apps.tasks` of `apps` apps, task `n` = `k * TASKS + j`.
fn apps_json(apps: usize, port: u16) -> Value {
    let now = FIRST_VERSION;
    let list: Vec<Value> = (0..apps)
        .map(|k| {
            let app = app(k, port, FIRST_VERSION);
            let mut stored = app.definition_json(FIRST_VERSION);
            stored["deployments"] = json!([]);
            let tasks: Vec<Value> = (0..TASKS)
                .map(|j| {
                    task(k, k * TASKS + j).to_json(
                        &app.id,
                        FIRST_VERSION,
                        &app.service_ports(),
                        now,
                    )
                })
                .collect();
            stored["tasks"] = json!(tasks);
            stored
        })
        .collect();
    json!({ "apps": list })
}

/// Backend `be_app{k}`'s servers in service, from `show servers state be_app{k}`.
async fn routed(admin: &Path, k: usize) -> BTreeSet<SocketAddr> {
    let backend = format!("be_app{k}");
    let answer = support::cli(admin, &format!("show servers state {backend}"))
        .await
        .unwrap_or_default();
    serving(&answer).remove(&backend).unwrap_or_default()
}

fn addresses(tasks: &[usize], port: u16) -> BTreeSet<SocketAddr> {
    tasks
        .iter()
        .map(|n| SocketAddr::new(ip(*n).parse().unwrap(), port))
        .collect()
}

async fn run(size: usize) {
    // One listener for every task: each task's IP is its own loopback address, on one port.
    let backend = Backend::start_at("task", "0.0.0.0:0").await;
    let port = backend.addr.port();
    let marathon = MarathonDouble::start().await;
    marathon.load_apps_json(apps_json(size, port));
    let started = Instant::now();
    let weft = Weft::builder()
        .marathon(
            &[marathon.url()],
            "resync = \"1h\"\nread_timeout = \"60s\"\nrequest_timeout = \"60s\"",
        )
        .start()
        .await;
    let admin = weft.run_dir().join("admin.sock");
    // Every app routed: its 3 tasks in service.
    let mut tasks: Vec<Vec<usize>> = (0..size)
        .map(|k| (0..TASKS).map(|j| k * TASKS + j).collect())
        .collect();
    let mut progress = started + Duration::from_secs(30);
    loop {
        let answer = support::cli(&admin, "show servers state")
            .await
            .unwrap_or_default();
        let backends = serving(&answer);
        let done = (0..size)
            .filter(|k| backends.get(&format!("be_app{k}")) == Some(&addresses(&tasks[*k], port)))
            .count();
        if done == size {
            break;
        }
        assert!(
            started.elapsed() < ROUTE_DEADLINE,
            "{done} of {size} apps routed"
        );
        if Instant::now() > progress {
            eprintln!(
                "  ... {done} of {size} routed after {:.0?}",
                started.elapsed()
            );
            progress += Duration::from_secs(30);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!(
        "{size} apps x {TASKS} tasks, health-checked: all routed {:.1?} after start",
        started.elapsed()
    );
    marathon.wait_for_open_streams(1).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let full_before = marathon.apps_requests();
    let app_before = marathon.app_requests();
    let bytes_before = metric(&weft, "weft_marathon_bytes_total{kind=\"full\"}").await
        + metric(&weft, "weft_marathon_bytes_total{kind=\"app\"}").await;
    let events_before = marathon.published().len();
    let mut next_task = size * TASKS;
    let mut samples = Vec::new();
    let mut task_events = 0;
    for round in 0..ROUNDS {
        let version = format!("2026-01-02T00:{:02}:{:02}.000Z", round / 60, round % 60);
        // Spread over the apps.
        let apps: Vec<usize> = (0..APPS_PER_ROUND)
            .map(|i| {
                (round * APPS_PER_ROUND + i) * (size / (ROUNDS * APPS_PER_ROUND)).max(1) % size
            })
            .collect();
        for &k in &apps {
            marathon.put_app(app(k, port, &version));
            tokio::time::sleep(EVENT_SPACING).await;
        }
        // Task by task, each app's replacement started before its old task is killed.
        for _ in 0..TASKS {
            for &k in &apps {
                let new = next_task;
                next_task += 1;
                // The oldest task goes.
                let old = tasks[k].remove(0);
                tasks[k].push(new);
                marathon.add_task(&format!("/app{k}"), task(k, new).version(&version));
                tokio::time::sleep(EVENT_SPACING).await;
                marathon.remove_task(&format!("app{k}.t{old}"));
                tokio::time::sleep(EVENT_SPACING).await;
                task_events += 3;
            }
        }
        let last_event = Instant::now();
        loop {
            let mut exact = true;
            for &k in &apps {
                if routed(&admin, k).await != addresses(&tasks[k], port) {
                    exact = false;
                    break;
                }
            }
            if exact {
                samples.push(last_event.elapsed());
                break;
            }
            assert!(
                last_event.elapsed() < ROUND_DEADLINE,
                "round {round}: not routed after {ROUND_DEADLINE:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let events = marathon.published().len() - events_before;
    let full = marathon.apps_requests() - full_before;
    let single = marathon.app_requests() - app_before;
    let bytes = metric(&weft, "weft_marathon_bytes_total{kind=\"full\"}").await
        + metric(&weft, "weft_marathon_bytes_total{kind=\"app\"}").await
        - bytes_before;
    let stream_events = metric(&weft, "weft_marathon_events_total{use=\"applied\"}").await
        + metric(&weft, "weft_marathon_events_total{use=\"fetched_app\"}").await
        + metric(&weft, "weft_marathon_events_total{use=\"fetched_all\"}").await
        + metric(&weft, "weft_marathon_events_total{use=\"ignored\"}").await;
    samples.sort();
    println!(
        "  deploy: {ROUNDS} rounds x {APPS_PER_ROUND} apps, {task_events} task events, {events} events published ({} on weft's stream since start), {:?} apart",
        stream_events, EVENT_SPACING
    );
    println!("  full fetches during the deploy: {full}; single-app fetches: {single}");
    println!(
        "  bytes weft read from Marathon during the deploy: {:.0} ({:.0} per event published, {:.0} per task event)",
        bytes,
        bytes / events as f64,
        bytes / task_events as f64
    );
    println!(
        "  last event -> HAProxy routes exactly Marathon's tasks: p50 {:.1?}, p99 {:.1?}, max {:.1?} ({} rounds)",
        percentile(&samples, 0.5),
        percentile(&samples, 0.99),
        samples.last().copied().unwrap_or_default(),
        samples.len()
    );
    println!(
        "  weft RSS {:.1} MiB (peak {:.1} MiB)",
        memory_mib(weft.pid().unwrap(), "VmRSS"),
        memory_mib(weft.pid().unwrap(), "VmHWM")
    );
    drop(weft);
    drop(backend);
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for size in common::sizes(&SIZES) {
        runtime.block_on(run(size));
    }
}
