//! Zero-reload changes: servers and hosts through the runtime API, reloads only for structure,
//! coalesced, and a reload whenever the runtime API fails.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use support::{
    eventually, reloading_service, service, wait_for_404, wait_for_backends, Backend, Weft,
};

async fn reloads(weft: &Weft) -> u64 {
    weft.show_proc().await.unwrap().0
}

/// weft routing alpha.test to `backends`, once they serve it; and its reloads so far.
async fn alpha_on(backends: &[&Backend]) -> (Weft, u64) {
    let servers: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let names: Vec<&str> = backends.iter().map(|b| b.name.as_str()).collect();
    let weft = Weft::builder()
        .services(&service("alpha", &["alpha.test"], None, &servers))
        .start()
        .await;
    wait_for_backends(&weft, "alpha.test", "/", &names).await;
    let before = reloads(&weft).await;
    (weft, before)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_added_removed_and_moved_need_no_reload() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let c = Backend::start("c").await;
    let (weft, before) = alpha_on(&[&a]).await;

    // Added.
    weft.write_services(&service("alpha", &["alpha.test"], None, &[a.addr, b.addr]));
    wait_for_backends(&weft, "alpha.test", "/", &["a", "b"]).await;
    // Moved (b's container came back elsewhere, as c).
    weft.write_services(&service("alpha", &["alpha.test"], None, &[a.addr, c.addr]));
    wait_for_backends(&weft, "alpha.test", "/", &["a", "c"]).await;
    // Removed.
    weft.write_services(&service("alpha", &["alpha.test"], None, &[c.addr]));
    wait_for_backends(&weft, "alpha.test", "/", &["c"]).await;
    // A new host for the existing backend, and a path route to it.
    weft.write_services(&service(
        "alpha",
        &["alpha.test", "alpha2.test"],
        None,
        &[c.addr],
    ));
    wait_for_backends(&weft, "alpha2.test", "/", &["c"]).await;
    // A host removed.
    weft.write_services(&service("alpha", &["alpha2.test"], None, &[c.addr]));
    wait_for_404(&weft, "alpha.test", "/").await;

    assert_eq!(
        reloads(&weft).await,
        before,
        "no change above needs a reload"
    );
    let (_, json) = weft.status("/status").await.unwrap();
    let status: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(
        status["haproxy"]["runtime_updates"].as_u64().unwrap() >= 5,
        "{json}"
    );

    // A new service takes a spare backend of the pool: no reload either, and /status names
    // the spare it runs on.
    let d = Backend::start("d").await;
    weft.write_services(
        &(service("alpha", &["alpha2.test"], None, &[c.addr])
            + &service("delta", &["delta.test"], None, &[d.addr])),
    );
    wait_for_backends(&weft, "delta.test", "/", &["d"]).await;
    assert_eq!(reloads(&weft).await, before, "a new service takes a spare");
    let (_, json) = weft.status("/status").await.unwrap();
    let status: serde_json::Value = serde_json::from_str(&json).unwrap();
    let delta = status["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["service"] == "delta")
        .unwrap();
    assert_eq!(delta["backend"], "spare_1", "{json}");

    // The files say what runs: a reload (caused by a service of a flavour no spare has)
    // changes no routing.
    let e = Backend::start("e").await;
    weft.write_services(
        &(service("alpha", &["alpha2.test"], None, &[c.addr])
            + &service("delta", &["delta.test"], None, &[d.addr])
            + &reloading_service("echo", &["echo.test"], &[e.addr])),
    );
    wait_for_backends(&weft, "echo.test", "/", &["e"]).await;
    assert_eq!(
        reloads(&weft).await,
        before + 1,
        "a new service of another flavour is one reload"
    );
    wait_for_backends(&weft, "delta.test", "/", &["d"]).await;
    wait_for_backends(&weft, "alpha2.test", "/", &["c"]).await;
    wait_for_404(&weft, "alpha.test", "/").await;
}

/// Reloads are at least `min_reload_interval` apart, and each but the last is made before the
/// last change arrives; so changes arriving over a time T make at most 2 + T / interval
/// reloads: two for a hundred changes within a second. T is measured, so a slow machine that
/// takes longer to write them gets a bound that says so, not a failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_changes_in_a_second_make_at_most_two_reloads() {
    const INTERVAL: Duration = Duration::from_secs(2);
    let backend = Backend::start("a").await;
    let weft = Weft::builder()
        .services(&service("base", &["base.test"], None, &[backend.addr]))
        .min_reload_interval(INTERVAL)
        .start()
        .await;
    wait_for_backends(&weft, "base.test", "/", &["a"]).await;
    let before = reloads(&weft).await;

    // 100 new services (each would need a reload), one every 9 ms.
    let mut services = service("base", &["base.test"], None, &[backend.addr]);
    let start = tokio::time::Instant::now();
    for i in 0..100 {
        tokio::time::sleep_until(start + Duration::from_millis(9) * i).await;
        services += &service(
            &format!("svc{i}"),
            &[&format!("svc{i}.test")],
            None,
            &[backend.addr],
        );
        weft.overwrite_services(&services);
    }
    // The last change arrives after the debounce (50 ms) and a read.
    let arrived = start.elapsed() + support::patience(Duration::from_millis(500));
    for i in [0, 50, 99] {
        wait_for_backends(&weft, &format!("svc{i}.test"), "/", &["a"]).await;
    }
    let made = reloads(&weft).await - before;
    let bound = 2 + (arrived.as_secs_f64() / INTERVAL.as_secs_f64()) as u64;
    eprintln!("100 changes over {arrived:?} -> {made} reloads (at most {bound})");
    assert!(
        (1..=bound).contains(&made),
        "{made} reloads, at most {bound}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_runtime_update_falls_back_to_a_reload() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let (weft, before) = alpha_on(&[&a]).await;

    // The admin socket is gone (someone cleaned the run directory): the runtime API fails.
    let admin = weft.run_dir().join("admin.sock");
    std::fs::rename(&admin, weft.run_dir().join("admin.sock.moved")).unwrap();
    weft.write_services(&service("alpha", &["alpha.test"], None, &[a.addr, b.addr]));
    wait_for_backends(&weft, "alpha.test", "/", &["a", "b"]).await;
    assert_eq!(reloads(&weft).await, before + 1, "the fallback reload");
    assert!(weft
        .log()
        .contains("runtime update failed, reloading instead"));

    // HAProxy hands the bound socket on to each new worker, so the path stays where it was
    // moved: put it back, and the next change is a runtime one again.
    std::fs::rename(weft.run_dir().join("admin.sock.moved"), &admin).unwrap();
    weft.write_services(&service("alpha", &["alpha.test"], None, &[b.addr]));
    wait_for_backends(&weft, "alpha.test", "/", &["b"]).await;
    assert_eq!(reloads(&weft).await, before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_server_is_caught_by_the_confirmation_and_repaired() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let (weft, before) = alpha_on(&[&a, &b]).await;

    // Someone points slot s2 elsewhere by hand.
    support::cli(
        &weft.run_dir().join("admin.sock"),
        "set server be_alpha/s2 addr 127.0.0.9 port 9",
    )
    .await
    .unwrap();
    // The next change to this backend confirms every slot, finds s2 wrong, and reloads.
    let c = Backend::start("c").await;
    weft.write_services(&service(
        "alpha",
        &["alpha.test"],
        None,
        &[a.addr, b.addr, c.addr],
    ));
    wait_for_backends(&weft, "alpha.test", "/", &["a", "b", "c"]).await;
    assert_eq!(reloads(&weft).await, before + 1);
}

/// Waits until `/status` and `/metrics` both say `(declared, free)` spare backends (the
/// status follows an apply's end, which may come after its traffic); returns the page.
async fn pool_reads(weft: &Weft, want: (u64, u64)) -> String {
    eventually(Duration::from_secs(5), "the pool as expected", || async {
        let (status, metrics, page) = pool(weft).await;
        if (status, metrics) == (want, want) {
            Ok(page)
        } else {
            Err(format!("status {status:?}, metrics {metrics:?}"))
        }
    })
    .await
}

/// `(declared, free)` spare backends, as `/status` and `/metrics` say them; the page's words.
async fn pool(weft: &Weft) -> ((u64, u64), (u64, u64), String) {
    let (_, json) = weft.status("/status").await.unwrap();
    let status: serde_json::Value = serde_json::from_str(&json).unwrap();
    let pool = &status["haproxy"]["pool"];
    let from_status = (
        pool["declared"].as_u64().unwrap(),
        pool["free"].as_u64().unwrap(),
    );
    let (_, metrics) = weft.status("/metrics").await.unwrap();
    let gauge = |name: &str| -> u64 {
        let line = metrics
            .lines()
            .find(|l| l.split(' ').next() == Some(name))
            .unwrap_or_else(|| panic!("{name} missing in:\n{metrics}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    let from_metrics = (
        gauge("weft_pool_spare_backends"),
        gauge("weft_pool_spare_backends_free"),
    );
    let (_, page) = weft.status("/").await.unwrap();
    (from_status, from_metrics, page)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_used_up_pool_is_shown_and_the_next_new_service_reloads_and_refills_it() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let c = Backend::start("c").await;
    let weft = Weft::builder()
        .services(&service("alpha", &["alpha.test"], None, &[a.addr]))
        .haproxy_key("spare_backends", "1")
        .min_reload_interval(Duration::ZERO)
        .start()
        .await;
    wait_for_backends(&weft, "alpha.test", "/", &["a"]).await;
    let before = reloads(&weft).await;
    let page = pool_reads(&weft, (1, 1)).await;
    assert!(page.contains("1 of 1 spare backends free"), "{page}");

    // The one spare taken: no reload, and the pool reads empty everywhere.
    let two = service("alpha", &["alpha.test"], None, &[a.addr])
        + &service("beta", &["beta.test"], None, &[b.addr]);
    weft.write_services(&two);
    wait_for_backends(&weft, "beta.test", "/", &["b"]).await;
    assert_eq!(reloads(&weft).await, before, "beta takes the spare");
    let page = pool_reads(&weft, (1, 0)).await;
    assert!(
        page.contains("0 of 1 spare backends free")
            && page.contains("the next new service waits for a reload"),
        "{page}"
    );
    weft.wait_for_log("the backend pool is used up").await;

    // The next new service waits for a reload, which gives every service its own backend
    // and the pool its spare back.
    weft.write_services(&(two + &service("gamma", &["gamma.test"], None, &[c.addr])));
    wait_for_backends(&weft, "gamma.test", "/", &["c"]).await;
    assert_eq!(reloads(&weft).await, before + 1, "gamma needs a reload");
    pool_reads(&weft, (1, 1)).await;
    for (host, name) in [("alpha.test", "a"), ("beta.test", "b")] {
        wait_for_backends(&weft, host, "/", &[name]).await;
    }
}
