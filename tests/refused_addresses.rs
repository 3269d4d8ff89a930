//! Addresses no team may route to (issue 11): this edge itself, the hosts' bridges, the network
//! and broadcast address of an allowed network, the operator's `network.deny`, from each of
//! the three sources; HAProxy's loop guard; and the Host header's edge cases, through real
//! HAProxy on loopback.
//!
//! No request here is ever sent to a 10.2.x.y server: those servers are refused, and the
//! tests ask `/status` about them, never their hosts (tests/edge_loop.rs does that, inside a
//! network namespace of its own).

#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::consul::{ConsulDouble, Instance};
use support::marathon::{App, MarathonDouble, Task};
use support::{eventually, raw, service, wait_for_backends, Backend, Weft};
use tokio::net::{TcpListener, TcpStream};

/// Loopback for the good backends, the weave network for the refused ones, one deny entry.
const NETWORK: &str = "allowed = [\"127.0.0.0/8\", \"10.2.0.0/16\"]\n\
                       deny = [\"10.2.7.0/24\", \"10.2.0.0/16:22\"]";

/// Waits until `/status` lists, for each `(server, reason)`, a dropped server with that
/// reason; returns the dropped list.
async fn wait_for_dropped(weft: &Weft, expected: &[(&str, &str)]) -> Vec<serde_json::Value> {
    eventually(
        Duration::from_secs(10),
        "refused servers in /status dropped",
        || async {
            let (_, json) = weft.status("/status").await?;
            let status: serde_json::Value =
                serde_json::from_str(&json).map_err(|e| e.to_string())?;
            let dropped = status["dropped"].as_array().cloned().unwrap_or_default();
            for (server, reason) in expected {
                let subject = format!("server \"{server}\"");
                let found = dropped.iter().any(|d| {
                    d["subject"].as_str().unwrap_or("").ends_with(&subject)
                        && d["reason"].as_str().unwrap_or("").contains(reason)
                });
                if !found {
                    return Err(format!("no {server} ({reason}) in {dropped:#?}"));
                }
            }
            Ok(dropped)
        },
    )
    .await
}

/// The refused servers every source test registers, with the reason each must carry. The
/// bridge address is 10.2.0.7, not this host's (it may carry 10.2.0.1 if it is a weave host).
fn refused(haproxy_port: u16) -> Vec<(String, &'static str)> {
    vec![
        (
            "10.2.0.7:80".into(),
            "(network.bridges), which holds the hosts' bridges",
        ),
        (
            "10.2.0.0:80".into(),
            "is the network address of 10.2.0.0/16",
        ),
        (
            "10.2.255.255:80".into(),
            "is the broadcast address of 10.2.0.0/16",
        ),
        ("10.2.7.5:80".into(), "network.deny entry \"10.2.7.0/24\""),
        (
            "10.2.1.5:22".into(),
            "network.deny entry \"10.2.0.0/16:22\"",
        ),
        (
            format!("127.0.0.1:{haproxy_port}"),
            "is where this edge listens",
        ),
    ]
}

fn pairs<'a>(refused: &'a [(String, &'static str)]) -> Vec<(&'a str, &'static str)> {
    refused.iter().map(|(s, r)| (s.as_str(), *r)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_source_refuses_the_edge_the_bridges_and_denied_servers() {
    let good = Backend::start("good").await;
    let port = support::free_port();
    let bad = refused(port);
    let servers: Vec<SocketAddr> = bad.iter().map(|(s, _)| s.parse().unwrap()).collect();
    // The refused servers share a service with a good one: that one keeps serving.
    let mut mixed = servers.clone();
    mixed.push(good.addr);
    let services = service("bad", &["bad.test"], None, &servers)
        + &service("mixed", &["mixed.test"], None, &mixed)
        + &service("good", &["good.test"], None, &[good.addr]);
    let weft = Weft::builder()
        .port(port)
        .network(NETWORK)
        .services(&services)
        .start()
        .await;
    wait_for_backends(&weft, "good.test", "/", &["good"]).await;
    wait_for_backends(&weft, "mixed.test", "/", &["good"]).await;
    let dropped = wait_for_dropped(&weft, &pairs(&bad)).await;
    assert!(
        dropped
            .iter()
            .any(|d| d["subject"] == "service \"mixed\" server \"10.2.0.0:80\""),
        "{dropped:#?}"
    );
    // The log says it too, once per refused server, and the metric counts them.
    weft.wait_for_log("address 10.2.0.7 lies in 10.2.0.0/24 (network.bridges)")
        .await;
    let (_, metrics) = weft.status("/metrics").await.unwrap();
    let line = metrics
        .lines()
        .find(|l| l.starts_with("weft_dropped_inputs{source=\"file\"}"))
        .unwrap_or_else(|| panic!("{metrics}"));
    let count: usize = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(count >= 2 * bad.len(), "{line}");
    // The status page shows the reasons.
    let (_, page) = weft.status("/").await.unwrap();
    assert!(
        page.contains("is the broadcast address of 10.2.0.0/16"),
        "{page}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consul_source_refuses_the_edge_the_bridges_and_denied_servers() {
    let good = Backend::start("good").await;
    let port = support::free_port();
    let bad = refused(port);
    let consul = ConsulDouble::start().await;
    for (i, (server, _)) in bad.iter().enumerate() {
        let addr: SocketAddr = server.parse().unwrap();
        consul.register(
            Instance::new(
                "bad",
                &format!("bad-{i}"),
                &addr.ip().to_string(),
                addr.port(),
            )
            .tag("weft.host=bad.test"),
        );
    }
    consul.register(
        Instance::new("good", "good-1", "127.0.0.1", good.addr.port()).tag("weft.host=good.test"),
    );
    let weft = Weft::builder()
        .port(port)
        .network(NETWORK)
        .consul(&consul.url(), "")
        .start()
        .await;
    wait_for_backends(&weft, "good.test", "/", &["good"]).await;
    let dropped = wait_for_dropped(&weft, &pairs(&bad)).await;
    assert!(
        dropped.iter().all(|d| d["source"] == "consul"),
        "{dropped:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_marathon_source_refuses_the_edge_the_bridges_and_denied_servers() {
    let good = Backend::start("good").await;
    let port = support::free_port();
    let marathon = MarathonDouble::start().await;
    // A Marathon app's tasks share its container port: one app per refused port.
    let bad = refused(port);
    for (i, (server, _)) in bad.iter().enumerate() {
        let addr: SocketAddr = server.parse().unwrap();
        marathon.put_app(
            App::new(&format!("/bad{i}"))
                .label("HAPROXY_GROUP", "external")
                .label("HAPROXY_0_VHOST", &format!("bad{i}.test"))
                .container_port(addr.port())
                .task(
                    Task::new(&format!("bad{i}.1"))
                        .ip(&addr.ip().to_string())
                        .health(Some(true)),
                ),
        );
    }
    marathon.put_app(
        App::new("/good")
            .label("HAPROXY_GROUP", "external")
            .label("HAPROXY_0_VHOST", "good.test")
            .container_port(good.addr.port())
            .task(Task::new("good.1").ip("127.0.0.1").health(Some(true))),
    );
    let weft = Weft::builder()
        .port(port)
        .network(NETWORK)
        .marathon(&[marathon.url()], "")
        .start()
        .await;
    wait_for_backends(&weft, "good.test", "/", &["good"]).await;
    let dropped = wait_for_dropped(&weft, &pairs(&bad)).await;
    assert!(
        dropped.iter().all(|d| d["source"] == "marathon"),
        "{dropped:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_header_edge_cases() {
    let shop = Backend::start("shop").await;
    let other = Backend::start("other").await;
    let weft = Weft::builder()
        .services(
            &(service("shop", &["shop.test"], None, &[shop.addr])
                + &service("other", &["other.test"], None, &[other.addr])),
        )
        .start()
        .await;
    wait_for_backends(&weft, "shop.test", "/", &["shop"]).await;
    wait_for_backends(&weft, "other.test", "/", &["other"]).await;
    let close = "Connection: close\r\n\r\n";
    for (case, head, want) in [
        (
            "plain",
            "GET / HTTP/1.1\r\nHost: shop.test\r\n",
            (200, "shop"),
        ),
        (
            "trailing dot",
            "GET / HTTP/1.1\r\nHost: shop.test.\r\n",
            (200, "shop"),
        ),
        (
            "trailing dot, port, case",
            "GET / HTTP/1.1\r\nHost: SHOP.Test.:80\r\n",
            (200, "shop"),
        ),
        (
            "two dots are no name",
            "GET / HTTP/1.1\r\nHost: shop.test..\r\n",
            (404, "no route"),
        ),
        (
            "two different Host headers",
            "GET / HTTP/1.1\r\nHost: other.test\r\nHost: shop.test\r\n",
            (400, ""),
        ),
        (
            "one Host header, two values",
            "GET / HTTP/1.1\r\nHost: other.test, shop.test\r\n",
            (400, ""),
        ),
        (
            "the same Host twice",
            "GET / HTTP/1.1\r\nHost: shop.test\r\nHost: shop.test\r\n",
            (200, "shop"),
        ),
        (
            "absolute target disagrees",
            "GET http://other.test/ HTTP/1.1\r\nHost: shop.test\r\n",
            (400, ""),
        ),
        (
            "absolute target agrees",
            "GET http://shop.test/ HTTP/1.1\r\nHost: shop.test\r\n",
            (200, "shop"),
        ),
        (
            "IPv6 literal with a port",
            "GET / HTTP/1.1\r\nHost: [::1]:80\r\n",
            (404, "no route"),
        ),
        (
            "IPv6 literal",
            "GET / HTTP/1.1\r\nHost: [::1]\r\n",
            (404, "no route"),
        ),
        (
            "IPv6 literal, long",
            "GET / HTTP/1.1\r\nHost: [2001:db8::1]:8080\r\n",
            (404, "no route"),
        ),
        (
            "a path in the Host",
            "GET / HTTP/1.1\r\nHost: evil.test/.shop.test\r\n",
            (400, ""),
        ),
    ] {
        let (code, body) = raw(weft.port, &format!("{head}{close}")).await;
        assert_eq!(code, want.0, "{case}: {body}");
        assert!(body.contains(want.1), "{case}: {body}");
    }
}

/// The loop guard's header as this edge's rendered config names it.
fn loop_header(weft: &Weft) -> String {
    let config = std::fs::read_to_string(weft.run_dir().join("haproxy.cfg")).unwrap();
    let start = config
        .find("X-Weft-Via-")
        .unwrap_or_else(|| panic!("{config}"));
    config[start..]
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .next()
        .unwrap()
        .to_string()
}

/// A TCP forwarder to `target` that counts its connections and refuses (closes) every one
/// past `limit`: a loop through it ends even where nothing else would end it.
async fn forwarder(target: SocketAddr, limit: usize) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let counted = count.clone();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            if counted.fetch_add(1, Ordering::SeqCst) >= limit {
                continue;
            }
            tokio::spawn(async move {
                if let Ok(mut outbound) = TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    (addr, count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loop_guard_stops_a_request_that_keeps_coming_back() {
    let shop = Backend::start("shop").await;
    let port = support::free_port();
    // A forwarder back to HAProxy: a loop no address rule can see (a port forward, a NAT).
    let (forward, connections) = forwarder(SocketAddr::from(([127, 0, 0, 1], port)), 50).await;
    let weft = Weft::builder()
        .port(port)
        .services(
            &(service("shop", &["shop.test"], None, &[shop.addr])
                + &service("loop", &["loop.test"], None, &[forward])),
        )
        .start()
        .await;
    wait_for_backends(&weft, "shop.test", "/", &["shop"]).await;
    let header = loop_header(&weft);

    // A request that passed this edge twice already (a backend that calls another service
    // through the edge, forwarding every header) is served; a third time is a loop.
    let close = "Connection: close\r\n\r\n";
    let twice = format!("{header}: 1\r\n{header}: 1\r\n");
    let (code, body) = raw(
        port,
        &format!("GET / HTTP/1.1\r\nHost: shop.test\r\n{twice}{close}"),
    )
    .await;
    assert_eq!((code, body.as_str()), (200, "shop"));
    let (code, body) = raw(
        port,
        &format!("GET / HTTP/1.1\r\nHost: shop.test\r\n{twice}{header}: 1\r\n{close}"),
    )
    .await;
    assert_eq!(code, 508, "{body}");
    assert!(body.contains("loop detected"), "{body}");
    // Another edge's header is no concern of this one's: a client cannot use it against us.
    let (code, _) = raw(
        port,
        &format!(
            "GET / HTTP/1.1\r\nHost: shop.test\r\n{0}: 1\r\n{0}: 1\r\n{0}: 1\r\n{close}",
            "X-Weft-Via-0000000000000000"
        ),
    )
    .await;
    assert_eq!(code, 200);

    // The real loop: HAProxy -> forwarder -> HAProxy... ends after three passes, with 508.
    let (code, body) = raw(
        port,
        &format!("GET / HTTP/1.1\r\nHost: loop.test\r\n{close}"),
    )
    .await;
    assert_eq!(code, 508, "{body}");
    assert_eq!(connections.load(Ordering::SeqCst), 3);
}
