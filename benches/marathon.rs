//! How long weft takes from a `/v2/apps?embed=apps.tasks` body to a rendered haproxy.cfg.
//!
//! `cargo bench --bench marathon` — 5000 apps with 3 tasks each (the shape marathon-lb's own
//! benchmark uses), without and with HTTP health checks. Each phase is timed over several runs
//! and the median printed; BENCHMARKS.md records the numbers.

use std::time::{Duration, Instant};

use weft::config::{HostPorts, MarathonGroup};
use weft::model::{build, Ledger, ModelSettings, SourceId, SourceReport};
use weft::network::AllowedNetworks;
use weft::render::{render, RenderSettings};
use weft::sources::marathon::api::decode_apps;
use weft::sources::marathon::routing::{app_services, RoutingSettings};

const APPS: usize = 5000;
const TASKS: usize = 3;
const RUNS: usize = 7;

/// A Marathon 1.5-style app list: docker USER network on weave, one service port, `TASKS`
/// running tasks on 10.2.x.y, optionally an HTTP health check with alive results.
fn apps_json(health_checks: bool) -> String {
    let mut apps = Vec::with_capacity(APPS);
    for i in 0..APPS {
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
        apps.push(format!(
            r#"{{"id":"/app-{i}","cmd":null,"instances":{TASKS},"cpus":0.1,"mem":65,"labels":{{"HAPROXY_GROUP":"external","HAPROXY_0_VHOST":"app-{i}.example.com"}},"portDefinitions":[{{"port":{}}}],"container":{{"type":"DOCKER","docker":{{"image":"nginx","network":"USER"}},"portMappings":[{{"containerPort":8080,"hostPort":0,"servicePort":{}}}]}},"networks":[{{"mode":"container","name":"weave"}}],"healthChecks":{checks},"version":"2016-02-01T22:57:48.784Z","tasks":[{}]}}"#,
            10000 + i,
            10000 + i,
            tasks.join(",")
        ));
    }
    format!(r#"{{"apps":[{}]}}"#, apps.join(","))
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn run(health_checks: bool) {
    let body = apps_json(health_checks);
    let routing = RoutingSettings {
        group: MarathonGroup::parse("external"),
        domain: None,
        host_ports: HostPorts::Deny,
    };
    let model = ModelSettings::new(AllowedNetworks::new(["10.2.0.0/16"
        .parse()
        .expect("network")]));
    let settings = RenderSettings {
        bind: "0.0.0.0:80".parse().expect("bind"),
        run_dir: "/var/lib/weft".into(),
        map_dir: "/var/lib/weft".into(),
        hard_stop_after: Duration::from_secs(30),
        max_reloads: 50,
        maxconn: Some(weft::config::AUTO_MAXCONN_CAP),
        slots: weft::config::DEFAULT_SLOTS,
        log: None,
        edge_id: "0123456789abcdef".into(),
        worker: None,
    };
    let (mut decode, mut route, mut table, mut text, mut total) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut size = 0;
    let mut last_table = None;
    for _ in 0..RUNS {
        let start = Instant::now();
        let apps = decode_apps(body.as_bytes()).expect("decode");
        let decoded = Instant::now();
        let mut report = SourceReport::starting(SourceId::Marathon);
        for app in &apps.apps {
            let (services, rejected) = app_services(app, &routing);
            report.services.extend(services);
            report.rejected.extend(rejected);
        }
        let routed = Instant::now();
        let built = build(&[&report], &model, &Ledger::default());
        let tabled = Instant::now();
        let rendered = render(&built.table, &settings).expect("render");
        let done = Instant::now();
        assert_eq!(built.table.backends.len(), APPS);
        assert!(built.dropped.is_empty());
        size = rendered.config.len() + rendered.hosts_map.len();
        decode.push(decoded - start);
        route.push(routed - decoded);
        table.push(tabled - routed);
        text.push(done - tabled);
        total.push(done - start);
        last_table = Some(built.table);
    }
    println!(
        "{APPS} apps x {TASKS} tasks, health checks {}: body {:.1} MiB, config+map {:.1} MiB, median of {RUNS}: decode {:?}, labels {:?}, table {:?}, render {:?}, total {:?}",
        if health_checks { "on " } else { "off" },
        body.len() as f64 / 1048576.0,
        size as f64 / 1048576.0,
        median(decode),
        median(route),
        median(table),
        median(text),
        median(total),
    );
    if let Some(table) = last_table {
        check_with_haproxy(&table);
    }
}

/// `haproxy -c` on the rendered files, for scale: the validation every apply runs.
fn check_with_haproxy(table: &weft::model::RoutingTable) {
    let haproxy = std::path::Path::new("/usr/sbin/haproxy");
    if !haproxy.exists() {
        println!("haproxy -c: skipped, /usr/sbin/haproxy is not installed");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let settings = RenderSettings {
        bind: "127.0.0.1:8080".parse().expect("bind"),
        run_dir: dir.path().to_path_buf(),
        map_dir: dir.path().to_path_buf(),
        hard_stop_after: Duration::from_secs(30),
        max_reloads: 50,
        maxconn: Some(weft::config::AUTO_MAXCONN_CAP),
        slots: weft::config::DEFAULT_SLOTS,
        log: None,
        edge_id: "0123456789abcdef".into(),
        worker: None,
    };
    let rendered = render(table, &settings).expect("render");
    for (name, content) in rendered.files() {
        std::fs::write(dir.path().join(name), content).expect("write");
    }
    std::fs::write(dir.path().join("server-state"), "1\n").expect("write");
    let mut samples = Vec::new();
    for _ in 0..3 {
        let start = Instant::now();
        let status = std::process::Command::new(haproxy)
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
        "haproxy -c on that config: median of 3: {:?}",
        median(samples)
    );
}

fn main() {
    run(false);
    run(true);
}
