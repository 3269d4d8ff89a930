//! What weft does when `haproxy -c` rejects a config: the service to blame is dropped and the
//! rest applied (also when HAProxy is not running yet), and a change that arrives while a
//! rejected validation runs is applied after it.
//!
//! No input that passes weft's validation makes HAProxy 2.6 reject the config any more, so a
//! shell wrapper injects the fault: it hands every command to the real `/usr/sbin/haproxy`,
//! except that `-c` rejects a config holding `option httpchk GET /poison` with an ALERT naming
//! that line (HAProxy's own wording), or one holding `backend be_broken` with an ALERT in the
//! global section (nobody to blame) after a delay (and a `.checking` file beside the
//! config while it waits).

#![allow(clippy::unwrap_used)]

mod support;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use support::{reloading_service, service, wait_for_backends, Backend, Weft};

const WRAPPER: &str = r#"#!/bin/sh
if [ "$1" = "-c" ]; then
    cfg="$3"
    line=$(grep -n 'option httpchk GET /poison' "$cfg" | head -n 1 | cut -d: -f1)
    if [ -n "$line" ]; then
        echo "[ALERT]    (1) : config : parsing [$cfg:$line] : 'option httpchk' : injected fault" >&2
        echo "[ALERT]    (1) : config : Fatal errors found in configuration." >&2
        exit 1
    fi
    if grep -q '^backend be_broken' "$cfg"; then
        touch "$cfg.checking"
        sleep 2
        echo "[ALERT]    (1) : config : parsing [$cfg:2] : 'stats' : injected fault" >&2
        exit 1
    fi
fi
exec /usr/sbin/haproxy "$@"
"#;

/// weft on the fault-injecting wrapper, with `services` in its file.
async fn start(services: &str) -> Weft {
    let dir = tempfile::Builder::new()
        .prefix("weft-test-")
        .tempdir()
        .unwrap();
    let wrapper = dir.path().join("haproxy-wrapper");
    std::fs::write(&wrapper, WRAPPER).unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    Weft::builder()
        .dir(dir)
        .binary(&wrapper)
        .services(services)
        .start()
        .await
}

/// weft on the wrapper, routing `good.test` to `a`; returns the services file's text.
async fn serving_good(a: &Backend) -> (Weft, String) {
    let good = service("good", &["good.test"], None, &[a.addr]);
    let weft = start(&good).await;
    wait_for_backends(&weft, "good.test", "/", &["a"]).await;
    (weft, good)
}

/// A `[[service]]` with a health check path.
fn checked(name: &str, host: &str, check: &str, server: std::net::SocketAddr) -> String {
    format!("[[service]]\nname = {name:?}\nhosts = [{host:?}]\nservers = [\"{server}\"]\ncheck = {check:?}\n\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_service_is_dropped_shown_and_back_once_fixed() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let good = service("good", &["good.test"], None, &[b.addr]);
    let weft = start(&(checked("shop", "shop.test", "/poison", a.addr) + &good)).await;

    // HAProxy was not running: the first config is validated like any reload.
    wait_for_backends(&weft, "good.test", "/", &["b"]).await;
    let log = weft.log();
    assert!(
        log.contains("haproxy rejected this service's backend, dropping it service=shop"),
        "{log}"
    );
    assert_eq!(weft.get("shop.test", "/").await.unwrap().0, 404);
    // The status page says why shop.test is not routed.
    let (_, status) = weft.status("/status").await.unwrap();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let dropped = status["dropped"].as_array().unwrap();
    assert!(
        dropped.iter().any(|d| d["subject"] == "service \"shop\""
            && d["reason"]
                .as_str()
                .unwrap()
                .contains("haproxy rejected its backend")
            && d["reason"].as_str().unwrap().contains("injected fault")),
        "{dropped:?}"
    );
    assert!(
        status["routes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["service"] != "shop"),
        "{status}"
    );

    // A reload with shop still rejected: a new service is routed, shop is not.
    let more = service("more", &["more.test"], None, &[a.addr]);
    weft.write_services(&(checked("shop", "shop.test", "/poison", a.addr) + &good + &more));
    wait_for_backends(&weft, "more.test", "/", &["a"]).await;
    assert_eq!(weft.get("shop.test", "/").await.unwrap().0, 404);

    // Fixed: its new definition gets a new chance, and the status page forgets the blame.
    weft.write_services(&(checked("shop", "shop.test", "/ok", a.addr) + &good + &more));
    wait_for_backends(&weft, "shop.test", "/", &["a"]).await;
    let (_, status) = weft.status("/status").await.unwrap();
    assert!(!status.contains("haproxy rejected its backend"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_dying_while_the_routing_is_rejected_comes_back_on_the_last_good_config() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let (weft, good) = serving_good(&a).await;

    // A routing HAProxy rejects with nobody to blame; then HAProxy dies.
    weft.write_services(
        &(good.clone() + &reloading_service("broken", &["broken.test"], &[b.addr])),
    );
    weft.wait_for_log("haproxy rejected the config").await;
    let pid = weft.haproxy_pid().unwrap();
    support::signal(pid, "KILL");
    // The last good config serves again, without any change of the routing.
    weft.wait_for_log("haproxy started again on the last good config")
        .await;
    assert_ne!(weft.haproxy_pid(), Some(pid));
    wait_for_backends(&weft, "good.test", "/", &["a"]).await;
    assert_eq!(weft.get("broken.test", "/").await.unwrap().0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fix_arriving_during_a_rejected_validation_is_applied() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let (weft, good) = serving_good(&a).await;

    // A config HAProxy rejects with nobody to blame; its check takes two seconds...
    weft.write_services(
        &(good.clone() + &reloading_service("broken", &["broken.test"], &[b.addr])),
    );
    let checking = weft.run_dir().join("staging/haproxy.cfg.checking");
    support::eventually(
        Duration::from_secs(10),
        "the check of the broken config",
        || async { checking.exists().then_some(()).ok_or(()) },
    )
    .await;
    // ...and meanwhile the operator fixes it (with a change that needs a reload too): the fix
    // is applied when the check fails.
    weft.write_services(&(good + &reloading_service("fixed", &["fixed.test"], &[b.addr])));
    wait_for_backends(&weft, "fixed.test", "/", &["b"]).await;
    wait_for_backends(&weft, "good.test", "/", &["a"]).await;
    assert!(
        weft.log().contains("haproxy rejected the config"),
        "{}",
        weft.log()
    );
}
