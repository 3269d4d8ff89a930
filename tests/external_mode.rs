//! External mode: HAProxy belongs to someone else (systemd); weft only writes its files and
//! reloads it through the master socket, and leaves it running when weft stops.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use support::{eventually, free_port, service, wait_for_backends, Backend, ExternalHaproxy, Weft};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_takes_over_a_running_haproxy_and_leaves_it_running() {
    let a = Backend::start("a").await;
    let dir = tempfile::Builder::new()
        .prefix("weft-ext-")
        .tempdir()
        .unwrap();
    let port = free_port();
    let mut haproxy = ExternalHaproxy::start(dir.path(), port, "before weft");
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
    let mut weft = Weft::builder()
        .dir(dir)
        .external(&haproxy)
        .services(&services)
        .start()
        .await;
    wait_for_backends(&weft, "alpha.test", "/", &["a"]).await;
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
