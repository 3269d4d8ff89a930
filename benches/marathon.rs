//! How long weft takes from Marathon's `/v2/apps?embed=apps.tasks` to HAProxy's files.
//!
//! ```text
//! cargo bench --bench marathon            # 1000, 10000 and 20000 apps
//! cargo bench --bench marathon -- 10000   # one size (any number of apps; several may be given)
//! ```
//!
//! Apps of 3 tasks each (the shape marathon-lb's own benchmark uses, Marathon 1.5: docker USER
//! network, `container.portMappings`, weave IPs), without and with HTTP health checks. For
//! each size and shape:
//! - the stages in this process, as `weft render` runs them (the answer's decode with each app's
//!   services, table, render, and their total; and, for scale, the decode and the services on
//!   one thread), median of
//!   [`RUNS`];
//! - `weft render --out DIR` end to end, as an operator runs it: the release binary, its
//!   weft.toml naming the Marathon double on loopback, which serves the same body (built once:
//!   a real Marathon's own time to answer is not weft's), the files written; the wall clock of
//!   the process from spawn to exit, median and quartiles of [`PROCESS_RUNS`];
//! - `haproxy -c` on the rendered config, for scale: the validation every apply runs.
//!
//! BENCHMARKS.md records the numbers.

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::marathon::MarathonDouble;
use weft::config::{HostPorts, MarathonGroup};
use weft::model::{build, Ledger, ModelSettings, SourceId, SourceReport};
use weft::network::AllowedNetworks;
use weft::render::{render, RenderSettings};
use weft::sources::marathon::api::{decode_apps, decode_apps_each};
use weft::sources::marathon::routing::{app_services, RoutingSettings};
use weft::sources::marathon::state::Apps;

/// weft's own allocator (see main.rs), so that the stages here cost what they cost in weft.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SIZES: [usize; 3] = [1_000, 10_000, 20_000];
const TASKS: usize = 3;
/// The pieces the in-process stages take the answer in, as from the network.
const PIECE: usize = 64 << 10;
const RUNS: usize = 7;
/// `weft render` end to end: on a shared VM a process's wall clock moves by half between one
/// run and the next (BENCHMARKS.md, "What a run of `weft render` pays for on this host"), so
/// more runs than [`RUNS`] make its median and quartiles steadier.
const PROCESS_RUNS: usize = 21;
/// `haproxy -c` runs, at several hundred ms each.
const CHECK_RUNS: usize = 3;
const WEFT: &str = env!("CARGO_BIN_EXE_weft");

/// A Marathon 1.5-style app list of `apps` apps: docker USER network on weave, one service
/// port, `TASKS` running tasks on 10.2.x.y, optionally an HTTP health check with alive results.
fn apps_json(apps: usize, health_checks: bool) -> String {
    let checks = if health_checks {
        r#"[{"protocol":"HTTP","path":"/health","portIndex":0,"intervalSeconds":3,"timeoutSeconds":15,"maxConsecutiveFailures":10,"gracePeriodSeconds":15}]"#
    } else {
        "[]"
    };
    let results = if health_checks {
        r#"[{"alive":true,"consecutiveFailures":0,"firstSuccess":"2016-02-01T22:14:08.666Z","lastFailure":null,"lastSuccess":"2016-02-01T23:10:30.986Z"}]"#
    } else {
        "[]"
    };
    let mut list = Vec::with_capacity(apps);
    for i in 0..apps {
        let tasks: Vec<String> = (0..TASKS)
            .map(|t| {
                let n = i * TASKS + t;
                format!(
                    r#"{{"id":"app-{i}.task-{t}","appId":"/app-{i}","host":"10.0.{}.{}","ports":[{}],"ipAddresses":[{{"ipAddress":"10.2.{}.{}","protocol":"IPv4"}}],"state":"TASK_RUNNING","startedAt":"2016-02-01T22:14:03.432Z","stagedAt":"2016-02-01T22:14:00.653Z","version":"2016-02-01T22:14:00.625Z","slaveId":"S{t}","healthCheckResults":{results}}}"#,
                    (n / 250) % 256,
                    n % 250 + 1,
                    31000 + n % 1000,
                    (n / 250) % 255 + 1,
                    n % 250 + 2
                )
            })
            .collect();
        list.push(format!(
            r#"{{"id":"/app-{i}","cmd":null,"instances":{TASKS},"cpus":0.1,"mem":65,"labels":{{"HAPROXY_GROUP":"external","HAPROXY_0_VHOST":"app-{i}.example.com"}},"portDefinitions":[{{"port":{}}}],"container":{{"type":"DOCKER","docker":{{"image":"nginx","network":"USER"}},"portMappings":[{{"containerPort":8080,"hostPort":0,"servicePort":{}}}]}},"networks":[{{"mode":"container","name":"weave"}}],"healthChecks":{checks},"version":"2016-02-01T22:57:48.784Z","tasks":[{}]}}"#,
            10000 + i,
            10000 + i,
            tasks.join(",")
        ));
    }
    format!(r#"{{"apps":[{}]}}"#, list.join(","))
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn ms(duration: Duration) -> String {
    format!("{:.1} ms", duration.as_secs_f64() * 1000.0)
}

fn mib(bytes: usize) -> String {
    format!("{:.1} MiB", bytes as f64 / 1048576.0)
}

fn render_settings(dir: &Path) -> RenderSettings {
    RenderSettings {
        bind: "0.0.0.0:80".parse().expect("bind"),
        clients: weft::render::ClientSettings::default(),
        run_dir: dir.to_path_buf(),
        map_dir: dir.to_path_buf(),
        hard_stop_after: Duration::from_secs(30),
        max_reloads: 50,
        maxconn: Some(weft::config::AUTO_MAXCONN_CAP),
        pool: weft::config::Pool {
            spares: weft::config::DEFAULT_SPARE_BACKENDS,
            spare_slots: weft::config::DEFAULT_SPARE_SLOTS,
        },
        log: None,
        edge_id: "0123456789abcdef".into(),
        worker: None,
        tls: None,
    }
}

/// The stages in this process, median of [`RUNS`]; returns the last table.
fn in_process(apps: usize, body: &str) -> weft::model::RoutingTable {
    let routing = RoutingSettings {
        group: MarathonGroup::parse("external"),
        domain: None,
        host_ports: HostPorts::Deny,
    };
    let model = ModelSettings::new(AllowedNetworks::new(["10.2.0.0/16"
        .parse()
        .expect("network")]));
    let settings = render_settings(Path::new("/var/lib/weft"));
    let (mut read, mut table, mut text, mut total) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut size = 0;
    let mut last_table = None;
    // As `weft render` reads the answer: as it comes (here in pieces of [`PIECE`] bytes), in
    // segments on rayon's pool, each app's services worked out as soon as it is decoded.
    for _ in 0..RUNS {
        let start = Instant::now();
        let each = routing.clone();
        let apps_read = decode_apps_each(body.as_bytes(), PIECE, move |app| {
            Apps::read_app(app, &each)
        })
        .expect("decode");
        let (services, rejected) = Apps::content_of_full(apps_read);
        let report = SourceReport {
            services,
            rejected,
            ..SourceReport::starting(SourceId::Marathon)
        };
        let routed = Instant::now();
        let built = build(&[&report], &model, &Ledger::default());
        let tabled = Instant::now();
        let rendered = render(&built.table, &settings).expect("render");
        let done = Instant::now();
        assert_eq!(built.table.backends.len(), apps);
        assert!(built.dropped.is_empty());
        size = rendered.config.len() + rendered.hosts_map.len();
        read.push(routed - start);
        table.push(tabled - routed);
        text.push(done - tabled);
        total.push(done - start);
        last_table = Some(built.table);
    }
    let mut one_thread = Vec::new();
    for _ in 0..RUNS {
        let start = Instant::now();
        let decoded = decode_apps(body.as_bytes()).expect("decode");
        one_thread.push(start.elapsed());
        assert_eq!(decoded.apps.records.len(), apps);
    }
    let mut services = Vec::new();
    for _ in 0..RUNS {
        let decoded = decode_apps(body.as_bytes()).expect("decode");
        let start = Instant::now();
        for app in &decoded.apps.records {
            std::hint::black_box(app_services(app, &routing));
        }
        services.push(start.elapsed());
    }
    println!(
        "  in process, on one thread, median of {RUNS}: decode {}, services {} (below: both in \
         segments on the pool as the answer comes, each app's services as it is decoded)",
        ms(median(one_thread)),
        ms(median(services)),
    );
    println!(
        "  in process: config+map {}, median of {RUNS}: decode and services {}, table {}, \
         render {}, total {}",
        mib(size),
        ms(median(read)),
        ms(median(table)),
        ms(median(text)),
        ms(median(total)),
    );
    std::sync::Arc::unwrap_or_clone(last_table.expect("at least one run"))
}

/// `weft render --out DIR` against the double serving `body`: the process's wall clock,
/// median and quartiles of [`PROCESS_RUNS`].
fn end_to_end(apps: usize, body: &str, marathon: &MarathonDouble) {
    marathon.serve_apps_body(Some(body.to_string().into()));
    let dir = tempfile::tempdir().expect("tempdir");
    let run_dir = dir.path().join("run");
    let out = dir.path().join("out");
    std::fs::create_dir(&run_dir).expect("run dir");
    let config = dir.path().join("weft.toml");
    std::fs::write(
        &config,
        format!(
            "[haproxy]\nrun_dir = {run_dir:?}\n[bridge]\nmode = \"off\"\n\
             [sources.marathon]\nurls = [\"{}\"]\n",
            marathon.url()
        ),
    )
    .expect("weft.toml");
    let (mut samples, mut cpu) = (Vec::new(), Vec::new());
    for _ in 0..PROCESS_RUNS {
        let cpu_before = children_cpu();
        let start = Instant::now();
        let output = Command::new(WEFT)
            .arg("render")
            .arg("-c")
            .arg(&config)
            .arg("--out")
            .arg(&out)
            .output()
            .expect("weft render");
        samples.push(start.elapsed());
        cpu.push(children_cpu().saturating_sub(cpu_before));
        assert!(
            output.status.success(),
            "weft render failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let hosts = std::fs::read_to_string(out.join(weft::render::HOSTS_MAP)).expect("hosts.map");
        assert_eq!(hosts.lines().count(), apps, "every app routed");
    }
    marathon.check();
    samples.sort();
    let quartile = |q: usize| samples[(samples.len() - 1) * q / 4];
    println!(
        "  weft render --out DIR over HTTP, wall clock, median of {PROCESS_RUNS}: {} (quartiles {} \
         / {}, min {}, max {}); its CPU time (user+sys): {}",
        ms(quartile(2)),
        ms(quartile(1)),
        ms(quartile(3)),
        ms(samples[0]),
        ms(samples[samples.len() - 1]),
        ms(median(cpu)),
    );
}

/// The CPU time (user + system) of every child process waited for so far: on a shared
/// machine, what a run cost, beside how long it waited for a core.
fn children_cpu() -> Duration {
    use nix::sys::resource::{getrusage, UsageWho};
    let usage = getrusage(UsageWho::RUSAGE_CHILDREN).expect("getrusage");
    let time = |t: nix::sys::time::TimeVal| {
        Duration::new(t.tv_sec().max(0) as u64, (t.tv_usec().max(0) as u32) * 1000)
    };
    time(usage.user_time()) + time(usage.system_time())
}

/// `haproxy -c` on the rendered files, for scale: the validation every apply runs.
fn check_with_haproxy(table: &weft::model::RoutingTable) {
    let haproxy = Path::new(support::HAPROXY);
    if !haproxy.exists() {
        println!(
            "  haproxy -c: skipped, {} is not installed",
            support::HAPROXY
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut settings = render_settings(dir.path());
    settings.bind = "127.0.0.1:8080".parse().expect("bind");
    let rendered = render(table, &settings).expect("render");
    for (name, content) in rendered.files() {
        std::fs::write(dir.path().join(name), content).expect("write");
    }
    std::fs::write(dir.path().join("server-state"), "1\n").expect("write");
    let mut samples = Vec::new();
    for _ in 0..CHECK_RUNS {
        let start = Instant::now();
        let status = Command::new(haproxy)
            .arg("-c")
            .arg("-f")
            .arg(dir.path().join("haproxy.cfg"))
            .output()
            .expect("haproxy -c");
        assert!(
            status.status.success(),
            "{}",
            String::from_utf8_lossy(&status.stderr)
        );
        samples.push(start.elapsed());
    }
    println!(
        "  haproxy -c on that config, median of {CHECK_RUNS}: {}",
        ms(median(samples))
    );
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let marathon = runtime.block_on(MarathonDouble::start());
    for apps in common::sizes(&SIZES) {
        for health_checks in [false, true] {
            let body = apps_json(apps, health_checks);
            println!(
                "{apps} apps x {TASKS} tasks, health checks {}: body {}",
                if health_checks { "on" } else { "off" },
                mib(body.len()),
            );
            let table = in_process(apps, &body);
            end_to_end(apps, &body, &marathon);
            check_with_haproxy(&table);
        }
    }
}
