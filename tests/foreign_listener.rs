//! The port is HAProxy's: a process that listens on it too with `SO_REUSEPORT` (and so takes
//! a share of the connections) is found, named with its pid, and fails `/healthz` until it
//! is gone. Here the stranger is this test process itself, on HAProxy's loopback port.

#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};

use support::{eventually, wait_for_healthz, Weft};

/// A listener on `addr` that shares the port the way HAProxy's own listeners allow.
fn reuseport_listener(addr: SocketAddr) -> TcpListener {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.set_reuseport(true).unwrap();
    socket.bind(addr).unwrap();
    socket.listen(16).unwrap()
}

/// Longer than the check's interval (10 s), with room for a slow machine.
const DETECTED_WITHIN: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reuseport_listener_on_haproxys_port_fails_healthz_until_it_is_gone() {
    let weft = Weft::builder().start().await;
    // HAProxy's own listener is not foreign.
    wait_for_healthz(&weft, "ok").await;
    let addr = SocketAddr::from(([127, 0, 0, 1], weft.port));
    let stranger = reuseport_listener(addr);
    let pid = std::process::id();

    let body = eventually(DETECTED_WITHIN, "healthz names the stranger", || async {
        match weft.status("/healthz").await? {
            (503, body) if body.contains("foreign listener") => Ok(body),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(
        body.contains(&format!("foreign listener on {addr}: pid {pid} (")),
        "{body}"
    );

    let (_, status) = weft.status("/status").await.unwrap();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let foreign = &status["foreign_listeners"];
    assert_eq!(foreign["count"], 1, "{foreign}");
    assert_eq!(foreign["listeners"][0]["address"], addr.to_string());
    assert_eq!(foreign["listeners"][0]["pid"], pid);
    assert!(foreign["listeners"][0]["process"].is_string(), "{foreign}");
    assert_eq!(status["healthy"], false);

    let (_, metrics) = weft.status("/metrics").await.unwrap();
    assert!(
        metrics.lines().any(|l| l == "weft_foreign_listeners 1"),
        "{metrics}"
    );
    assert!(weft
        .log()
        .lines()
        .any(|l| l.contains("ERROR") && l.contains("not haproxy") && l.contains(&pid.to_string())));

    drop(stranger);
    eventually(DETECTED_WITHIN, "healthz ok again", || async {
        match weft.status("/healthz").await? {
            (200, body) if body == "ok\n" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    weft.wait_for_log("the foreign listener is gone").await;
}

/// A stranger already on the port when weft starts: an ERROR before HAProxy starts, and
/// HAProxy starts anyway (refusing would take the edge down because of a stranger).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_there_before_start_is_reported_and_haproxy_starts_anyway() {
    let port = support::free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let _stranger = reuseport_listener(addr);
    let weft = Weft::builder().port(port).start().await;
    weft.wait_for_log("haproxy started").await;
    let log = weft.log();
    let reported = log
        .find("not haproxy listens")
        .expect("the stranger is reported");
    let started = log.find("haproxy started").expect("haproxy starts anyway");
    assert!(reported < started, "{log}");
    wait_for_healthz(
        &weft,
        &format!("foreign listener on {addr}: pid {}", std::process::id()),
    )
    .await;
}
