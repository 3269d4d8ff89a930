//! External mode: HAProxy belongs to someone else (systemd); weft only writes its files and
//! reloads it through the master socket, and leaves it running when weft stops.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use support::{eventually, free_port, service, wait_for_backends, Backend, ExternalHaproxy, Weft};

/// An external HAProxy serving its own config, then weft taking it over with service alpha on
/// backend a (routed when this returns).
async fn weft_on_an_external_haproxy() -> (Backend, ExternalHaproxy, String, Weft) {
    let a = Backend::start("a").await;
    let dir = tempfile::Builder::new()
        .prefix("weft-ext-")
        .tempdir()
        .unwrap();
    let port = free_port();
    let haproxy = ExternalHaproxy::start(dir.path(), port, "before weft");
    eventually(
        Duration::from_secs(5),
        "the external haproxy serves",
        || async {
            match support::get(port, "x.test", "/").await? {
                (200, body) if body == "before weft" => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    let services = service("alpha", &["alpha.test"], None, &[a.addr]);
    // The weft harness owns the directory from here; the external HAProxy stays in it.
    let weft = Weft::builder()
        .dir(dir)
        .external(&haproxy)
        .services(&services)
        .start()
        .await;
    wait_for_backends(&weft, "alpha.test", "/", &["a"]).await;
    (a, haproxy, services, weft)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_takes_over_a_running_haproxy_and_leaves_it_running() {
    let (_a, mut haproxy, services, mut weft) = weft_on_an_external_haproxy().await;
    let config = std::fs::read_to_string(&haproxy.config_file).unwrap();
    assert!(
        config.contains("Rendered by weft"),
        "weft wrote the config HAProxy loads"
    );

    // A change reloads the same external master.
    let b = Backend::start("b").await;
    weft.write_services(&(services + &service("beta", &["beta.test"], None, &[b.addr])));
    wait_for_backends(&weft, "beta.test", "/", &["b"]).await;

    let status = weft.stop().unwrap();
    assert!(status.success(), "{status}");
    assert!(haproxy.alive(), "weft leaves an external HAProxy running");
    wait_for_backends(&weft, "alpha.test", "/", &["a"]).await;
}

/// weft does not assume an external HAProxy runs: it asks its master (`show proc`), reports
/// it down on /metrics and /status when it stops answering, and reloads it onto weft's routes
/// once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_haproxy_that_dies_is_reported_down_and_taken_back_when_it_returns() {
    let (a, mut haproxy, services, weft) = weft_on_an_external_haproxy().await;
    let up = |want: &'static str| {
        let weft = &weft;
        async move {
            let (_, metrics) = weft.status("/metrics").await?;
            let line = metrics
                .lines()
                .find(|l| l.starts_with("weft_haproxy_up "))
                .ok_or("no weft_haproxy_up")?
                .to_string();
            if line == format!("weft_haproxy_up {want}") {
                Ok(())
            } else {
                Err(line)
            }
        }
    };
    eventually(Duration::from_secs(5), "weft_haproxy_up 1", || up("1")).await;

    haproxy.kill();
    // The routing keeps changing (every 300 ms, faster than the 2 s liveness interval), so the
    // apply loop keeps waking: the liveness probe must go on through it.
    let churn = async {
        for round in 0.. {
            let extra = service(&format!("churn{round}"), &["churn.test"], None, &[a.addr]);
            weft.write_services(&format!("{services}{extra}"));
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };
    tokio::select! {
        () = eventually(Duration::from_secs(15), "weft_haproxy_up 0", || up("0")) => {}
        () = churn => {}
    }
    let (code, status) = weft.status("/status").await.unwrap();
    assert_eq!(code, 200);
    assert!(status.contains("\"running\":false"), "{status}");
    let (code, healthz) = weft.status("/healthz").await.unwrap();
    assert_eq!(code, 503, "{healthz}");

    // systemd brings it back on the files weft installed; weft reloads it and says so.
    haproxy.restart();
    eventually(Duration::from_secs(30), "weft_haproxy_up 1 again", || {
        up("1")
    })
    .await;
    wait_for_backends(&weft, "alpha.test", "/", &["a"]).await;
    let (code, healthz) = weft.status("/healthz").await.unwrap();
    assert_eq!(code, 200, "{healthz}");
}
