//! End to end: the Consul double -> weft (blocking queries) -> real HAProxy -> loopback backends.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use support::consul::{ConsulDouble, Fault, Instance, Status, CATALOG_SERVICES, HEALTH_SERVICE};
use support::{wait_for_404, wait_for_backends, wait_for_healthz, Backend, Weft};

/// The state watch's path.
const STATE_ANY: &str = "/v1/health/state/any";
/// The claims ledger watch's path.
const CLAIMS: &str = "/v1/kv/weft/claims/";

fn instance(service: &str, id: &str, backend: &Backend, host: &str) -> Instance {
    Instance::new(
        service,
        id,
        &backend.addr.ip().to_string(),
        backend.addr.port(),
    )
    .tag(&format!("weft.host={host}"))
}

/// Consul with shop-1 on `a`, and weft on it (`keys` in its Consul section), once it routes
/// shop.test to a.
async fn routing_shop_to(a: &Backend, keys: &str) -> (ConsulDouble, Weft) {
    let consul = ConsulDouble::start().await;
    consul.register(instance("shop", "shop-1", a, "shop.test"));
    let weft = Weft::builder().consul(&consul.url(), keys).start().await;
    wait_for_backends(&weft, "shop.test", "/", &[&a.name]).await;
    (consul, weft)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_fail_deregister_and_survive_an_outage() {
    let consul = ConsulDouble::start().await;
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    // Blocking queries wait five minutes: whatever is routed within the tests' deadlines came
    // from a query woken by the change.
    let weft = Weft::builder()
        .consul(&consul.url(), "wait = \"5m\"")
        .start()
        .await;
    wait_for_healthz(&weft, "ok").await;
    consul.wait_for_blocked_queries(CATALOG_SERVICES, 1).await;

    // Registered -> routed.
    consul.register(instance("shop", "shop-1", &a, "shop.test"));
    consul.register(instance("shop", "shop-2", &b, "shop.test"));
    wait_for_backends(&weft, "shop.test", "/", &["a", "b"]).await;

    // One instance critical: it leaves rotation.
    consul.set_check("shop-2", Status::Critical);
    wait_for_backends(&weft, "shop.test", "/", &["a"]).await;
    consul.set_check("shop-2", Status::Passing);
    wait_for_backends(&weft, "shop.test", "/", &["a", "b"]).await;

    // Consul loses its leader for a while: traffic is unaffected, weft says it is degraded.
    let (reloads, _, _) = weft.show_proc().await.unwrap();
    consul.set_fault(Fault::NoLeader);
    consul.bump_index(); // wake the blocked queries so they meet the fault now
    wait_for_healthz(&weft, "source consul is degraded").await;
    let (_, body) = weft.status("/healthz").await.unwrap();
    assert!(body.contains("No cluster leader"), "{body}");
    for _ in 0..20 {
        let (status, _) = weft.get("shop.test", "/").await.unwrap();
        assert_eq!(status, 200);
    }
    assert_eq!(
        weft.show_proc().await.unwrap().0,
        reloads,
        "no reload during the outage"
    );

    // Consul is back: weft recovers by itself and follows changes again.
    consul.set_fault(Fault::None);
    wait_for_healthz(&weft, "ok").await;
    consul.deregister("shop-1");
    wait_for_backends(&weft, "shop.test", "/", &["b"]).await;

    // Deregistered: the host answers 404.
    consul.deregister("shop-2");
    wait_for_404(&weft, "shop.test", "/").await;
    assert!(
        weft.log().contains("consul catalog watch failing")
            || weft.log().contains("consul health watch failing")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_quiet_services_cost_few_requests_and_index_storms_no_reloads() {
    const SERVICES: usize = 50;
    const WAIT: Duration = Duration::from_secs(2);
    let consul = ConsulDouble::start().await;
    let backend = Backend::start("a").await;
    consul.register_all((0..SERVICES).map(|i| {
        instance(
            &format!("svc{i}"),
            &format!("svc{i}-1"),
            &backend,
            &format!("svc{i}.test"),
        )
    }));
    // A service weft must not read at all: not exposed.
    consul.register(Instance::new("internal", "internal-1", "127.0.0.1", 1).tag("db"));
    // The resync is an hour away: what is read in the quiet period, the watches read.
    let weft = Weft::builder()
        .consul(&consul.url(), "wait = \"2s\"\nresync = \"1h\"")
        .start()
        .await;
    for i in [0, SERVICES / 2, SERVICES - 1] {
        wait_for_backends(&weft, &format!("svc{i}.test"), "/", &["a"]).await;
    }
    // The three watches (the catalog, the checks, the claims ledger's KV folder) are parked on
    // a blocking query: the quiet period starts.
    consul.wait_for_blocked_queries(CATALOG_SERVICES, 1).await;
    consul.wait_for_blocked_queries(STATE_ANY, 1).await;
    consul.wait_for_blocked_queries(CLAIMS, 1).await;
    assert_eq!(
        consul
            .requests()
            .count(&format!("{HEALTH_SERVICE}internal")),
        0
    );

    let before = consul.requests().total;
    let start = Instant::now();
    tokio::time::sleep(WAIT * 3).await;
    let made = consul.requests().total - before;
    let elapsed = start.elapsed();
    // Three watches, each re-armed once per wait (and a little jitter): however many services.
    let bound = 3.0 * (elapsed.as_secs_f64() / WAIT.as_secs_f64() + 1.0);
    eprintln!(
        "{made} requests in {elapsed:?} for {SERVICES} services, wait {WAIT:?}; bound {bound:.0}"
    );
    assert!(
        (made as f64) <= bound,
        "{made} requests in {elapsed:?} with {SERVICES} services, wait {WAIT:?}: bound {bound:.0}"
    );
    // And the watches did block and re-arm: without blocking, there would be thousands.
    assert!(made >= 2, "{made} requests: the watches are not re-arming");

    // A storm of index bumps and check Output changes with identical routing: no reload, and
    // no service read (Output is not what decides passing).
    let (reloads, _, _) = weft.show_proc().await.unwrap();
    let reads = consul.requests().endpoint(HEALTH_SERVICE).requests;
    for round in 0..100 {
        if round % 2 == 0 {
            consul.bump_index();
        } else {
            consul.set_check_output(
                &format!("svc{}-1", round % SERVICES),
                &format!("HTTP 200 OK at {round}"),
            );
        }
    }
    // Both watches have seen the storm and parked again.
    consul.wait_for_blocked_queries(STATE_ANY, 1).await;
    consul.wait_for_blocked_queries(CATALOG_SERVICES, 1).await;
    assert_eq!(
        weft.show_proc().await.unwrap().0,
        reloads,
        "index storm caused a reload"
    );
    assert_eq!(
        consul.requests().endpoint(HEALTH_SERVICE).requests,
        reads,
        "output changes made weft read services"
    );
    wait_for_backends(&weft, "svc7.test", "/", &["a"]).await;
}

/// Consul's own limit: 200 connections per client IP (`limits.http_max_conns_per_client`).
/// A watch per service would need 1,001; weft holds at most its budget, is never refused,
/// routes all 1,000 and follows a health flip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_services_inside_consuls_connection_limit() {
    const SERVICES: usize = 1000;
    const BUDGET: usize = 16;
    let consul = ConsulDouble::start().await;
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    consul.register_all((0..SERVICES).map(|i| {
        instance(
            &format!("svc{i}"),
            &format!("svc{i}-1"),
            &a,
            &format!("svc{i}.test"),
        )
    }));
    consul.register(instance("svc500", "svc500-2", &b, "svc500.test"));
    let weft = Weft::builder()
        .consul(
            &consul.url(),
            &format!("wait = \"5m\"\nmax_connections = {BUDGET}"),
        )
        .start()
        .await;
    wait_for_healthz(&weft, "ok").await;
    for i in [0, 1, SERVICES / 3, SERVICES - 1] {
        wait_for_backends(&weft, &format!("svc{i}.test"), "/", &["a"]).await;
    }
    wait_for_backends(&weft, "svc500.test", "/", &["a", "b"]).await;
    let (_, status) = weft.status("/status").await.unwrap();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(
        status["routes"].as_array().unwrap().len(),
        SERVICES,
        "every service is routed"
    );

    // One health flip reaches HAProxy: svc500-2 fails, then passes again.
    consul.set_check("svc500-2", Status::Critical);
    wait_for_backends(&weft, "svc500.test", "/", &["a"]).await;
    consul.set_check("svc500-2", Status::Passing);
    wait_for_backends(&weft, "svc500.test", "/", &["a", "b"]).await;

    let connections = consul.connections();
    let peak = connections.peak.values().copied().max().unwrap_or(0);
    eprintln!("peak connections {peak}, accepted {}", connections.accepted);
    assert!(
        peak <= BUDGET,
        "weft held {peak} connections, its budget is {BUDGET}"
    );
    assert!(
        connections.refused.is_empty(),
        "consul refused connections: {:?}",
        connections.refused
    );
    assert!(
        !weft.log().contains("http_max_conns_per_client"),
        "{}",
        weft.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apollo_mode_tokens_and_addresses_outside_the_network() {
    let consul = ConsulDouble::start().await;
    consul.set_token(Some("s3cret-token".into()));
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    // Apollo mode: every service is NAME.example.com unless it opts out.
    consul.register(Instance::new("web", "web-1", "127.0.0.1", a.addr.port()));
    consul.register(
        Instance::new("hidden", "hidden-1", "127.0.0.1", b.addr.port()).tag("weft.enable=false"),
    );
    // Registered without a Service.Address: the node's address, outside the allowed networks.
    consul.register(Instance::new("nodeaddr", "nodeaddr-1", "", b.addr.port()));

    let dir_token = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(dir_token.path(), "s3cret-token\n").unwrap();
    let token_file = format!("token_file = {:?}", dir_token.path().display().to_string());
    let weft = Weft::builder()
        .consul(&consul.url(), &token_file)
        .domain("example.com")
        .start()
        .await;
    wait_for_backends(&weft, "web.example.com", "/", &["a"]).await;
    wait_for_404(&weft, "hidden.example.com", "/").await;
    let (status, _) = weft.get("nodeaddr.example.com", "/").await.unwrap();
    assert_eq!(
        status, 503,
        "a service whose only instance was dropped has no server"
    );

    let (_, json) = weft.status("/status").await.unwrap();
    let status: serde_json::Value = serde_json::from_str(&json).unwrap();
    let dropped = status["dropped"].as_array().unwrap();
    assert!(
        dropped.iter().any(|d| d["subject"]
            == "service \"nodeaddr\" server \"192.0.2.10:".to_string()
                + &b.addr.port().to_string()
                + "\""
            && d["reason"]
                .as_str()
                .unwrap()
                .contains("register the container's weave IP")),
        "{dropped:?}"
    );
    assert!(
        !weft.log().contains("s3cret-token"),
        "the token must never be logged"
    );

    // The token is revoked: 403, degraded, the routes stay.
    consul.set_token(Some("another".into()));
    consul.bump_index();
    wait_for_healthz(&weft, "403").await;
    wait_for_backends(&weft, "web.example.com", "/", &["a"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_stalls_and_a_backwards_index_are_survived() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let (consul, weft) = routing_shop_to(&a, "wait = \"1s\"").await;

    consul.set_fault(Fault::Garbage);
    consul.bump_index();
    wait_for_healthz(&weft, "cannot decode").await;
    wait_for_backends(&weft, "shop.test", "/", &["a"]).await;

    // Consul accepts the query and never answers: the client timeout (wait * 17/16 + 5 s)
    // notices, the routes stay.
    consul.set_fault(Fault::Stall);
    consul.bump_index();
    wait_for_healthz(&weft, "operation timed out").await;
    wait_for_backends(&weft, "shop.test", "/", &["a"]).await;

    // The index goes backwards (a restored snapshot): weft resets and still follows changes.
    consul.set_fault(Fault::IndexBackwards);
    consul.bump_index();
    consul.register(instance("shop", "shop-2", &b, "shop.test"));
    wait_for_backends(&weft, "shop.test", "/", &["a", "b"]).await;
    consul.set_fault(Fault::None);
    wait_for_healthz(&weft, "ok").await;
    consul.deregister("shop-2");
    wait_for_backends(&weft, "shop.test", "/", &["a"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_down_at_start_holds_back_no_other_route() {
    let consul = ConsulDouble::start().await;
    consul.set_fault(Fault::NoLeader);
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    consul.register(instance("shop", "shop-1", &b, "shop.test"));
    let weft = Weft::builder()
        .consul(&consul.url(), "wait = \"1s\"")
        .start()
        .await;
    weft.write_services(&support::service("files", &["files.test"], None, &[a.addr]));

    // After a grace of a few seconds (for a blip), the file source routes although Consul
    // never answered, and weft says why Consul is missing.
    wait_for_healthz(&weft, "source consul is degraded").await;
    wait_for_backends(&weft, "files.test", "/", &["a"]).await;
    let (_, body) = weft.status("/healthz").await.unwrap();
    assert!(body.contains("No cluster leader"), "{body}");

    // Consul gets a leader: its services join (at the catalog watch's next retry, which has
    // backed off by now), the file's stay.
    consul.set_fault(Fault::None);
    support::eventually(Duration::from_secs(30), "shop.test routed", || async {
        match weft.get("shop.test", "/").await? {
            (200, _) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    wait_for_backends(&weft, "shop.test", "/", &["b"]).await;
    wait_for_healthz(&weft, "ok").await;
    wait_for_backends(&weft, "files.test", "/", &["a"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consul_that_never_answers_holds_back_no_other_route() {
    let consul = ConsulDouble::start().await;
    // Accepts the connection, never answers: no request fails for minutes.
    consul.set_fault(Fault::Stall);
    let a = Backend::start("a").await;
    let weft = Weft::builder()
        .consul(&consul.url(), "wait = \"5m\"")
        .start()
        .await;
    weft.write_services(&support::service("files", &["files.test"], None, &[a.addr]));
    wait_for_healthz(&weft, "catalog: no answer yet").await;
    wait_for_backends(&weft, "files.test", "/", &["a"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_reads_ride_out_a_leader_loss_and_acl_filtering_is_said() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let (consul, weft) = routing_shop_to(&a, "wait = \"1s\"\nconsistency = \"stale\"").await;

    // The leader is lost: stale reads go on from the server's own state, and weft says the
    // answers may be old, but keeps following them.
    consul.set_fault(Fault::NoLeader);
    consul.register(instance("shop", "shop-2", &b, "shop.test"));
    wait_for_backends(&weft, "shop.test", "/", &["a", "b"]).await;
    weft.wait_for_log("consul answered without a known leader")
        .await;
    consul.set_fault(Fault::None);
    consul.bump_index();
    weft.wait_for_log("consul answers with a known leader again")
        .await;

    // ACLs switched on without weft having a token: Consul filters rather than refuses. The
    // routes go (Consul says there is nothing), and the log says why it may be so.
    consul.set_token(Some("s3cret".into()));
    consul.bump_index();
    wait_for_404(&weft, "shop.test", "/").await;
    weft.wait_for_log("consul filtered the answer by ACLs")
        .await;
}

/// Other clients on the host hold all but one of Consul's connections for weft's IP: weft
/// meets the 429 Consul answers past `limits.http_max_conns_per_client`, says so in those
/// words, backs off instead of retrying in a tight loop, and recovers once the limit has room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consuls_connection_limit_is_named_backed_off_and_ridden_out() {
    let a = Backend::start("a").await;
    let consul = ConsulDouble::builder()
        .max_conns_per_client(1)
        .start()
        .await;
    consul.register(instance("shop", "shop-1", &a, "shop.test"));
    let start = Instant::now();
    // The first request (the state watch) takes the one connection and blocks on it; every
    // other connection is refused.
    let weft = Weft::builder()
        .consul(&consul.url(), "wait = \"5m\"")
        .start()
        .await;
    support::eventually(
        Duration::from_secs(20),
        "weft names Consul's connection limit",
        || async {
            if weft.log().contains("limits.http_max_conns_per_client") {
                Ok(())
            } else {
                Err(consul.connections().refused_total())
            }
        },
    )
    .await;
    // Backoff, not a tight loop: 0.5 s doubling to 30 s, per watch and per service.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let refused = consul.connections().refused_total();
    let seconds = start.elapsed().as_secs_f64();
    assert!(
        (refused as f64) <= 10.0 * seconds,
        "{refused} refused connections in {seconds:.1} s"
    );

    // The other clients let go: weft reads the catalog and routes.
    consul.set_max_conns_per_client(0);
    wait_for_backends(&weft, "shop.test", "/", &["a"]).await;
    wait_for_healthz(&weft, "ok").await;
}

/// The resync reads every exposed service again within `resync`, from the start: the safety
/// net for what neither watch shows (an instance moved under its old ID).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_resync_reads_every_service_again_and_catches_a_move_under_the_same_id() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let consul = ConsulDouble::start().await;
    consul.register_all((0..5).map(|i| {
        instance(
            &format!("svc{i}"),
            &format!("svc{i}-1"),
            &a,
            &format!("svc{i}.test"),
        )
    }));
    let weft = Weft::builder()
        .consul(&consul.url(), "wait = \"5m\"\nresync = \"2s\"")
        .start()
        .await;
    wait_for_backends(&weft, "svc4.test", "/", &["a"]).await;
    let read = |i: usize| consul.requests().count(&format!("{HEALTH_SERVICE}svc{i}"));
    let before: Vec<u64> = (0..5).map(read).collect();
    support::eventually(
        Duration::from_secs(10),
        "every service read again",
        || async {
            let now: Vec<u64> = (0..5).map(read).collect();
            if now.iter().zip(&before).all(|(n, b)| n > b) {
                Ok(())
            } else {
                Err(format!("{before:?} -> {now:?}"))
            }
        },
    )
    .await;
    // svc2-1 re-registered under its own ID on b with its check unchanged: no watch wakes
    // for it with news, the resync finds it.
    consul.register(instance("svc2", "svc2-1", &b, "svc2.test"));
    wait_for_backends(&weft, "svc2.test", "/", &["b"]).await;
}

/// One bad instance among good ones, `"Port": -1` in one service and `"Port": "8080"` in
/// another: each is dropped alone, named with its reason on /status; the other instances
/// serve, and the source stays ok.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_does_not_decode_is_dropped_alone() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let c = Backend::start("c").await;
    let consul = ConsulDouble::start().await;
    consul.register(instance("shop", "shop-1", &a, "shop.test"));
    consul.register(instance("shop", "shop-2", &b, "shop.test"));
    consul.register(instance("cart", "cart-1", &c, "cart.test"));
    consul.register(instance("cart", "cart-2", &a, "cart.test"));
    // The double's own entries, each with a port no Consul writes, served as they are.
    for (service, id, port) in [
        ("shop", "shop-2", serde_json::json!(-1)),
        ("cart", "cart-2", serde_json::json!("8080")),
    ] {
        let url = format!("{}{HEALTH_SERVICE}{service}", consul.url());
        let entries: serde_json::Value = reqwest::get(url).await.unwrap().json().await.unwrap();
        let entries = entries.as_array().unwrap().iter();
        let mut entry = entries
            .clone()
            .find(|e| e["Service"]["ID"] == id)
            .unwrap()
            .clone();
        entry["Service"]["Port"] = port;
        consul.set_raw_health_entry(id, Some(entry));
    }

    let weft = Weft::builder().consul(&consul.url(), "").start().await;
    wait_for_backends(&weft, "shop.test", "/", &["a"]).await;
    wait_for_backends(&weft, "cart.test", "/", &["c"]).await;

    let (_, json) = weft.status("/status").await.unwrap();
    let status: serde_json::Value = serde_json::from_str(&json).unwrap();
    let source = status["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "consul");
    assert_eq!(source.unwrap()["state"], "ok", "{json}");
    let dropped: Vec<(String, String)> = support::dropped(&status)
        .into_iter()
        .map(|(_, subject, reason)| (subject, reason))
        .collect();
    assert_eq!(dropped.len(), 2, "{dropped:#?}");
    let expected = [
        (
            "service \"cart\" instance \"cart-2\" on node ",
            "does not decode, dropped: Service.Port: invalid type: string \"8080\", expected u32",
        ),
        (
            "service \"shop\" instance \"shop-2\" on node ",
            "does not decode, dropped: Service.Port: invalid value: integer `-1`, expected u32",
        ),
    ];
    for ((subject, reason), (want_subject, want_reason)) in dropped.iter().zip(expected) {
        assert!(subject.starts_with(want_subject), "{subject}");
        assert_eq!(reason, want_reason);
    }
    let log = weft.log();
    assert!(
        log.lines()
            .any(|l| l.contains("input dropped") && l.contains("shop-2")),
        "{log}"
    );
}
