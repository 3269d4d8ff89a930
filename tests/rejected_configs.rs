//! What weft does when `haproxy -c` rejects a config: the service to blame is dropped and the
//! rest applied (also when HAProxy is not running yet), and a change that arrives while a
//! rejected validation runs is applied after it.
//!
//! No input that passes weft's validation makes HAProxy 2.6 reject the config any more, so a
//! shell wrapper injects the fault: it hands every command to the real `/usr/sbin/haproxy`,
//! except that `-c` rejects a config holding `backend be_poison` with an ALERT naming that
//! line (HAProxy's own wording), or one holding `backend be_broken` with an ALERT in the
//! global section (nobody to blame) after a delay.

#![allow(clippy::unwrap_used)]

mod support;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use support::{free_port, service, wait_for_backends, Backend, Weft};

const WRAPPER: &str = r#"#!/bin/sh
if [ "$1" = "-c" ]; then
    cfg="$3"
    line=$(grep -n '^backend be_poison' "$cfg" | head -n 1 | cut -d: -f1)
    if [ -n "$line" ]; then
        echo "[ALERT]    (1) : config : parsing [$cfg:$((line + 1))] : 'balance' : injected fault" >&2
        echo "[ALERT]    (1) : config : Fatal errors found in configuration." >&2
        exit 1
    fi
    if grep -q '^backend be_broken' "$cfg"; then
        sleep 2
        echo "[ALERT]    (1) : config : parsing [$cfg:2] : 'stats' : injected fault" >&2
        exit 1
    fi
fi
exec /usr/sbin/haproxy "$@"
"#;

/// weft on the fault-injecting wrapper, with `services` in its file.
fn start(services: &str) -> Weft {
    let dir = tempfile::Builder::new()
        .prefix("weft-test-")
        .tempdir()
        .unwrap();
    let wrapper = dir.path().join("haproxy-wrapper");
    std::fs::write(&wrapper, WRAPPER).unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let keys = format!("binary = {:?}\n", wrapper.display().to_string());
    Weft::start_in(dir, free_port(), &keys, services)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_service_is_dropped_at_start_and_on_reload() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let services = service("poison", &["poison.test"], None, &[a.addr])
        + &service("good", &["good.test"], None, &[b.addr]);
    let weft = start(&services);

    // HAProxy was not running: the first config is validated like any reload.
    wait_for_backends(&weft, "good.test", "/", &["b"]).await;
    let log = weft.log();
    assert!(
        log.contains("haproxy rejected this service's backend, dropping it service=poison"),
        "{log}"
    );
    let (status, _) = weft.get("poison.test", "/").await.unwrap();
    assert_eq!(status, 404);

    // A reload with the poison still there: the new service is routed, the poison not.
    weft.write_services(&(services + &service("more", &["more.test"], None, &[a.addr])));
    wait_for_backends(&weft, "more.test", "/", &["a"]).await;
    wait_for_backends(&weft, "good.test", "/", &["b"]).await;
    let (status, _) = weft.get("poison.test", "/").await.unwrap();
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fix_arriving_during_a_rejected_validation_is_applied() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let good = service("good", &["good.test"], None, &[a.addr]);
    let weft = start(&good);
    wait_for_backends(&weft, "good.test", "/", &["a"]).await;

    // A config HAProxy rejects with nobody to blame; its check takes two seconds...
    weft.write_services(&(good.clone() + &service("broken", &["broken.test"], None, &[b.addr])));
    tokio::time::sleep(Duration::from_millis(600)).await;
    // ...and meanwhile the operator fixes it: the fix is applied when the check fails.
    weft.write_services(&(good + &service("fixed", &["fixed.test"], None, &[b.addr])));
    wait_for_backends(&weft, "fixed.test", "/", &["b"]).await;
    wait_for_backends(&weft, "good.test", "/", &["a"]).await;
    assert!(
        weft.log().contains("haproxy rejected the config"),
        "{}",
        weft.log()
    );
}
