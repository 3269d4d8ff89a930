//! End to end: the Marathon double -> weft (events + fetches) -> real HAProxy -> loopback
//! backends. Tasks of one app share the container port and differ by loopback IP, as
//! containers on a weave network do.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use support::marathon::{App, Fault, MarathonDouble, NetworkMode, Task};
use support::{wait_for_404, wait_for_backends, wait_for_healthz, Backend, Weft, WeftBuilder};

/// Three backends on 127.0.0.1-3, one port.
async fn backends() -> (Backend, Backend, Backend, u16) {
    let a = Backend::start("a").await;
    let port = a.addr.port();
    let b = Backend::start_at("b", &format!("127.0.0.2:{port}")).await;
    let c = Backend::start_at("c", &format!("127.0.0.3:{port}")).await;
    (a, b, c, port)
}

/// The three backends, and Marathon with /shop's one task, shop.1 on 127.0.0.1 (backend a).
async fn marathon_with_shop() -> (MarathonDouble, (Backend, Backend, Backend, u16)) {
    let backends = backends().await;
    let marathon = MarathonDouble::start().await;
    marathon.put_app(shop(backends.3).task(task("shop.1", "127.0.0.1")));
    (marathon, backends)
}

fn shop(port: u16) -> App {
    App::new("/shop")
        .label("HAPROXY_GROUP", "external")
        .label("HAPROXY_0_VHOST", "shop.test")
        .container_port(port)
}

fn task(id: &str, ip: &str) -> Task {
    Task::new(id).ip(ip).health(Some(true))
}

/// weft on Marathon at `urls`: a read timeout of 1 s and a request timeout of 2 s, unless
/// `durations` (key, value) say otherwise, and what else they say (`resync`).
fn weft_on(urls: &[String], durations: &[(&str, &str)]) -> WeftBuilder {
    let mut keys = vec![("read_timeout", "1s"), ("request_timeout", "2s")];
    keys.retain(|(key, _)| !durations.iter().any(|(other, _)| other == key));
    keys.extend_from_slice(durations);
    let lines: Vec<String> = keys
        .iter()
        .map(|(key, value)| format!("{key} = {value:?}"))
        .collect();
    Weft::builder().marathon(urls, &lines.join("\n"))
}

/// `weft_on`, once shop.test is served by exactly `expected`.
async fn weft_serving_shop(urls: &[String], durations: &[(&str, &str)], expected: &[&str]) -> Weft {
    let weft = weft_on(urls, durations).start().await;
    wait_for_backends(&weft, "shop.test", "/", expected).await;
    weft
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_killing_and_failing_health_move_traffic() {
    let (_a, _b, _c, port) = backends().await;
    let marathon = MarathonDouble::start().await;
    marathon.put_app(
        shop(port)
            .http_health_check("/", 1, 3)
            .task(task("shop.1", "127.0.0.1")),
    );
    // The resync and the read timeout are an hour away: what changes within the tests'
    // deadlines came by an event on the one stream.
    let weft = weft_on(
        &[marathon.url()],
        &[("resync", "1h"), ("read_timeout", "1h")],
    )
    .start()
    .await;
    wait_for_backends(&weft, "shop.test", "/", &["a"]).await;
    // The app's health check as marathon-lb maps it: every 1 s, fall after 3 + 1 failures,
    // 20 s (timeoutSeconds) each at most.
    let config = std::fs::read_to_string(weft.run_dir().join("haproxy.cfg")).unwrap();
    assert!(
        config.contains(
            "    option httpchk GET /\n    timeout check 20s\n    default-server inter 1s fall 4 rise 2\n"
        ),
        "{config}"
    );
    marathon.wait_for_open_streams(1).await;
    let connections = marathon.event_connections();

    // Scale up: the new task serves on its status_update_event.
    marathon.add_task("/shop", task("shop.2", "127.0.0.2"));
    wait_for_backends(&weft, "shop.test", "/", &["a", "b"]).await;

    // A task still running but failing its health check leaves rotation.
    marathon.set_task_health("shop.2", false);
    wait_for_backends(&weft, "shop.test", "/", &["a"]).await;
    marathon.set_task_health("shop.2", true);
    wait_for_backends(&weft, "shop.test", "/", &["a", "b"]).await;

    // A killed task leaves rotation.
    marathon.remove_task("shop.2");
    wait_for_backends(&weft, "shop.test", "/", &["a"]).await;

    // The app is destroyed: its host answers 404.
    marathon.remove_app("/shop");
    wait_for_404(&weft, "shop.test", "/").await;
    assert_eq!(
        marathon.event_connections(),
        connections,
        "weft reconnected"
    );

    // All of it came from the events themselves: one full fetch at the start, and the app
    // fetched alone once its last task went and it terminated (404: gone; the two events ask
    // once if they come before the fetch).
    let lines = [
        "weft_marathon_requests_total{kind=\"full\"} 1",
        // shop.2 running, its first check, unhealthy, healthy, killed.
        "weft_marathon_events_total{use=\"applied\"} 5",
        // shop.1 killed, the app's last task; the app terminated.
        "weft_marathon_events_total{use=\"fetched_app\"} 2",
        "weft_marathon_events_total{use=\"fetched_all\"} 0",
    ];
    // The terminate event may still be on its way when the host already answers 404.
    support::eventually(Duration::from_secs(5), "marathon metrics", || async {
        let (_, metrics) = weft.status("/metrics").await?;
        match lines
            .iter()
            .find(|line| !metrics.lines().any(|l| l == **line))
        {
            Some(line) => Err(format!("{line} missing in:\n{metrics}")),
            None => Ok(()),
        }
    })
    .await;
    assert_eq!(marathon.apps_requests(), 1);
    assert!((1..=2).contains(&marathon.app_requests()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stream_is_noticed_and_weft_catches_up() {
    let (marathon, _backends) = marathon_with_shop().await;
    // Full fetches at most 1 s apart (default 5 s): after the stall's reconnect, the cut's
    // reconnect asks for a second one at once, and the default spacing left the test's 5 s
    // wait for it about 1 s to spare (it failed once in a loaded CI run).
    let weft = weft_serving_shop(
        &[marathon.url()],
        &[("resync", "1h"), ("full_fetch_interval", "1s")],
        &["a"],
    )
    .await;
    marathon.wait_for_open_streams(1).await;
    let connections = marathon.event_connections();

    // The stream hangs without a FIN; meanwhile a task starts. Only the read timeout (1 s)
    // can notice: the resync is an hour away.
    marathon.stall_streams();
    marathon.add_task("/shop", task("shop.3", "127.0.0.3"));
    wait_for_backends(&weft, "shop.test", "/", &["a", "c"]).await;
    assert!(
        marathon.event_connections() > connections,
        "weft reconnected"
    );
    assert!(weft.log().contains("silent"), "{}", weft.log());

    // A cut stream too: weft reconnects and refetches.
    marathon.cut_streams();
    marathon.remove_task("shop.3");
    wait_for_backends(&weft, "shop.test", "/", &["a"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_marathon_down_the_last_routes_keep_serving() {
    let (_a, _b, _c, port) = backends().await;
    let marathon = MarathonDouble::start().await;
    marathon.put_app(
        shop(port)
            .task(task("shop.1", "127.0.0.1"))
            .task(task("shop.2", "127.0.0.2")),
    );
    let weft = weft_serving_shop(&[marathon.url()], &[("resync", "1s")], &["a", "b"]).await;
    let (reloads, _, _) = weft.show_proc().await.unwrap();

    // A leader election: Jetty's HTML 503 page, read as its title in the reason.
    marathon.set_apps_fault(Fault::NoLeader);
    marathon.cut_streams();
    wait_for_healthz(&weft, "Error 503 Could not determine the current leader").await;
    for _ in 0..10 {
        assert_eq!(weft.get("shop.test", "/").await.unwrap().0, 200);
    }
    // 503s from /v2/apps: the reason is now Marathon's own JSON error.
    marathon.set_apps_fault(Fault::Status(503));
    wait_for_healthz(
        &weft,
        r#"503 Service Unavailable: {"message":"Service Unavailable"}"#,
    )
    .await;
    for _ in 0..10 {
        assert_eq!(weft.get("shop.test", "/").await.unwrap().0, 200);
    }
    // Marathon gone entirely: its port refuses connections.
    drop(marathon);
    wait_for_healthz(&weft, "Connection refused").await;
    wait_for_backends(&weft, "shop.test", "/", &["a", "b"]).await;
    assert_eq!(
        weft.show_proc().await.unwrap().0,
        reloads,
        "no reload while Marathon is away"
    );
}

/// An event that needs its app fetched while Marathon fails: the last good routes stay, the
/// source says why, and once Marathon answers again a full fetch (after the backoff) catches
/// up with what changed meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_app_fetch_keeps_the_routes_and_a_full_fetch_catches_up() {
    let (marathon, (_a, _b, _c, port)) = marathon_with_shop().await;
    let weft = weft_serving_shop(
        &[marathon.url()],
        &[("resync", "1h"), ("read_timeout", "1h")],
        &["a"],
    )
    .await;
    marathon.wait_for_open_streams(1).await;
    let full = marathon.apps_requests();

    marathon.set_apps_fault(Fault::Status(503));
    // A new app: its api_post_event asks for /v2/apps/cart, which fails.
    marathon.put_app(
        App::new("/cart")
            .label("HAPROXY_GROUP", "external")
            .label("HAPROXY_0_VHOST", "cart.test")
            .container_port(port)
            .task(task("cart.1", "127.0.0.2")),
    );
    wait_for_healthz(
        &weft,
        r#"503 Service Unavailable: {"message":"Service Unavailable"}"#,
    )
    .await;
    assert!(marathon.app_requests() >= 1);
    assert_eq!(weft.get("shop.test", "/").await.unwrap().0, 200);
    wait_for_404(&weft, "cart.test", "/").await;

    marathon.set_apps_fault(Fault::None);
    wait_for_backends(&weft, "cart.test", "/", &["b"]).await;
    wait_for_healthz(&weft, "ok").await;
    assert!(marathon.apps_requests() > full, "caught up by a full fetch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_second_url_serves_when_the_first_is_dead() {
    let (marathon, _backends) = marathon_with_shop().await;
    let weft = weft_serving_shop(&[MarathonDouble::dead_url(), marathon.url()], &[], &["a"]).await;
    // Events flow through the second URL too.
    marathon.wait_for_open_streams(1).await;
    marathon.add_task("/shop", task("shop.2", "127.0.0.2"));
    wait_for_backends(&weft, "shop.test", "/", &["a", "b"]).await;
    wait_for_healthz(&weft, "ok").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_groups_and_unroutable_tasks_are_reported() {
    let (_a, _b, _c, port) = backends().await;
    let marathon = MarathonDouble::start().await;
    marathon.put_app(
        shop(port)
            .label("HAPROXY_0_STICKY", "true")
            .task(task("shop.1", "127.0.0.1")),
    );
    // Another group: not routed, not reported.
    marathon.put_app(
        App::new("/internal")
            .label("HAPROXY_GROUP", "internal")
            .label("HAPROXY_0_VHOST", "internal.test")
            .container_port(port)
            .task(task("internal.1", "127.0.0.2")),
    );
    // Apollo mode: /team/web is web.team.example.com, no VHOST needed.
    marathon.put_app(
        App::new("/team/web")
            .label("HAPROXY_GROUP", "external")
            .container_port(port)
            .task(task("web.1", "127.0.0.3")),
    );
    let weft = weft_on(&[marathon.url()], &[])
        .domain("example.com")
        .start()
        .await;
    wait_for_backends(&weft, "shop.test", "/", &["a"]).await;
    wait_for_backends(&weft, "web.team.example.com", "/", &["c"]).await;
    wait_for_404(&weft, "internal.test", "/").await;

    let (_, json) = weft.status("/status").await.unwrap();
    let status: serde_json::Value = serde_json::from_str(&json).unwrap();
    let dropped = status["dropped"].as_array().unwrap();
    assert!(
        dropped.iter().any(|d| d["subject"] == "app \"/shop\""
            && d["reason"].as_str().unwrap().contains("HAPROXY_0_STICKY")),
        "{dropped:?}"
    );
    assert!(!json.contains("/internal"), "{json}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_never_answers_does_not_hold_the_stream() {
    let (marathon, _backends) = marathon_with_shop().await;
    // The first Marathon accepts connections and never answers, not even the stream's headers.
    let hung = MarathonDouble::start().await;
    hung.set_apps_fault(Fault::Slow(Duration::from_secs(3600)));
    hung.set_events_fault(Fault::Slow(Duration::from_secs(3600)));
    let weft = weft_serving_shop(&[hung.url(), marathon.url()], &[("resync", "1h")], &["a"]).await;

    // The stream gives up on the silent leader after the read timeout and attaches to the
    // second: events (not the resync, an hour away) bring the new task.
    marathon.wait_for_open_streams(1).await;
    marathon.add_task("/shop", task("shop.2", "127.0.0.2"));
    wait_for_backends(&weft, "shop.test", "/", &["a", "b"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_stream_with_heartbeats_stays_attached() {
    let (marathon, _backends) = marathon_with_shop().await;
    // Heartbeats well inside the read timeout (1 s), and no event for three timeouts.
    marathon.set_heartbeat(Some(Duration::from_millis(200)));
    let weft = weft_serving_shop(&[marathon.url()], &[("resync", "1h")], &["a"]).await;
    marathon.wait_for_open_streams(1).await;
    let connections = marathon.event_connections();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        marathon.event_connections(),
        connections,
        "weft reconnected"
    );
    assert!(!weft.log().contains("silent"), "{}", weft.log());
    // The stream still carries events.
    marathon.add_task("/shop", task("shop.2", "127.0.0.2"));
    wait_for_backends(&weft, "shop.test", "/", &["a", "b"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_marathon_that_never_answers_holds_back_no_other_route() {
    let a = Backend::start("a").await;
    let marathon = MarathonDouble::start().await;
    marathon.set_apps_fault(Fault::Slow(Duration::from_secs(3600)));
    marathon.set_events_fault(Fault::Slow(Duration::from_secs(3600)));
    // Timeouts far away: only the start grace can let the other routes through.
    let weft = weft_on(
        &[marathon.url()],
        &[("request_timeout", "1h"), ("read_timeout", "1h")],
    )
    .start()
    .await;
    weft.write_services(&support::service("files", &["files.test"], None, &[a.addr]));
    wait_for_healthz(&weft, "no answer yet").await;
    wait_for_backends(&weft, "files.test", "/", &["a"]).await;
}

/// What `GET /v2/apps?embed=apps.tasks` answers for app `id` now, to be edited into a record
/// no Marathon writes and put back raw.
fn app_json(marathon: &MarathonDouble, id: &str) -> serde_json::Value {
    let apps = marathon.apps_json();
    let app = apps["apps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == id);
    app.unwrap().clone()
}

/// One bad record among good ones: an app with `containerPort: -1`, an app whose VHOST label
/// is a number, a task whose port is -1. Each is dropped alone, named with its reason on
/// /status; every other app and task is routed, and the source stays ok.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_or_a_task_that_does_not_decode_is_dropped_alone() {
    let (_a, _b, _c, port) = backends().await;
    let marathon = MarathonDouble::start().await;
    marathon.put_app(shop(port).task(task("shop.1", "127.0.0.1")));
    let app = |id: &str, host: &str| {
        App::new(id)
            .label("HAPROXY_GROUP", "external")
            .label("HAPROXY_0_VHOST", host)
            .container_port(port)
    };
    marathon.put_app(
        app("/cart", "cart.test")
            .task(task("cart.1", "127.0.0.2"))
            .task(task("cart.2", "127.0.0.3")),
    );
    let mut cart = app_json(&marathon, "/cart");
    let bad_task = cart["tasks"].as_array_mut().unwrap().iter_mut();
    bad_task
        .filter(|t| t["id"] == "cart.2")
        .for_each(|t| t["ports"] = serde_json::json!([-1]));
    marathon.put_raw_app(cart);
    // Marathon 1.5+: the port mappings in `container`.
    marathon.put_app(
        app("/broken", "broken.test")
            .network_mode(NetworkMode::Container("weave".into()))
            .task(task("broken.1", "127.0.0.3")),
    );
    let mut broken = app_json(&marathon, "/broken");
    broken["container"]["portMappings"][0]["containerPort"] = serde_json::json!(-1);
    marathon.put_raw_app(broken);
    marathon.put_app(app("/numeric", "numeric.test").task(task("numeric.1", "127.0.0.3")));
    let mut numeric = app_json(&marathon, "/numeric");
    numeric["labels"]["HAPROXY_0_VHOST"] = serde_json::json!(5);
    marathon.put_raw_app(numeric);

    let weft = weft_on(&[marathon.url()], &[]).start().await;
    wait_for_backends(&weft, "shop.test", "/", &["a"]).await;
    wait_for_backends(&weft, "cart.test", "/", &["b"]).await;
    wait_for_404(&weft, "broken.test", "/").await;

    let (_, json) = weft.status("/status").await.unwrap();
    let status: serde_json::Value = serde_json::from_str(&json).unwrap();
    let marathon_source = status["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "marathon");
    assert_eq!(marathon_source.unwrap()["state"], "ok", "{json}");
    let routes: Vec<&str> = status["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["host"].as_str().unwrap())
        .collect();
    assert_eq!(routes, ["cart.test", "shop.test"], "{json}");
    let dropped: Vec<(String, String)> = support::dropped(&status)
        .into_iter()
        .map(|(_, subject, reason)| (subject, reason))
        .collect();
    let expected = [
        (
            "app \"/broken\"",
            "does not decode, dropped: container.portMappings[0].containerPort: invalid value: integer `-1`, expected u32",
        ),
        (
            "app \"/cart\" task \"cart.2\"",
            "does not decode, dropped: ports[0]: invalid value: integer `-1`, expected u32",
        ),
        (
            "app \"/numeric\"",
            "does not decode, dropped: labels.HAPROXY_0_VHOST: invalid type: integer `5`, expected a string",
        ),
    ];
    for (subject, reason) in expected {
        assert!(
            dropped.iter().any(|(s, r)| s == subject && r == reason),
            "{subject}: {reason} not in {dropped:#?}"
        );
    }
    assert_eq!(dropped.len(), 3, "{dropped:#?}");
    let log = weft.log();
    assert!(
        log.lines()
            .any(|l| l.contains("input dropped") && l.contains("/numeric")),
        "{log}"
    );
    let (_, metrics) = weft.status("/metrics").await.unwrap();
    assert!(
        metrics.contains("weft_dropped_inputs{source=\"marathon\"} 3"),
        "{metrics}"
    );
}
