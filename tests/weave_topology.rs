//! The Apollo network end to end, in network namespaces this test makes and removes:
//!
//! ```text
//!  client 192.168.100.2 ──veth── edge: weft + HAProxy on :80, bridge weave 10.2.0.3/16 (weft's)
//!                                  │ vethwe
//!                     overlay: bridge ovl (stands in for weave's overlay, layer 2)
//!                                  │ vethwe                       │ vethwe
//!                    host1: weave 10.2.0.1/16        host2: weave 10.2.0.2/16
//!                                  │                              │
//!                    c1: 10.2.1.5:8080 (host1's /24)  c2: 10.2.2.7:8080 (host2's /24)
//! ```
//!
//! `Host: app.example.com` from the client reaches containers on both hosts through the edge.
//! Then the edge's bridge is set down and flushed: weft repairs it and traffic resumes.

#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::netns::{get_in, wait_until, Netns, NsServer, NsWeft};

const HOST: &str = "app.example.com";

/// Every namespace of the topology. Dropped after the processes and servers that live in
/// them (those are declared later in the test), taking every link with them.
struct Topology {
    edge: Netns,
    host1: Netns,
    host2: Netns,
    overlay: Netns,
    c1: Netns,
    c2: Netns,
    client: Netns,
}

impl Topology {
    fn build() -> Topology {
        let topology = Topology {
            edge: Netns::new("edge"),
            host1: Netns::new("host1"),
            host2: Netns::new("host2"),
            overlay: Netns::new("overlay"),
            c1: Netns::new("c1"),
            c2: Netns::new("c2"),
            client: Netns::new("client"),
        };
        let t = &topology;
        t.overlay.ip(&["link", "add", "ovl", "type", "bridge"]);
        t.overlay.ip(&["link", "set", "ovl", "up"]);

        // host1 and host2: their weave bridge with its address, as the platform set it up.
        for (host, address) in [(&t.host1, "10.2.0.1/16"), (&t.host2, "10.2.0.2/16")] {
            host.ip(&["link", "add", "weave", "type", "bridge"]);
            host.ip(&["addr", "add", address, "dev", "weave"]);
            host.ip(&["link", "set", "weave", "up"]);
        }
        // The edge: a bare bridge (down, no address), as `weave create-bridge` failing
        // halfway would leave it; weft configures it before HAProxy starts.
        t.edge.ip(&["link", "add", "weave", "type", "bridge"]);

        // Each weave bridge joins the overlay at layer 2.
        for (host, port) in [
            (&t.edge, "ovl-edge"),
            (&t.host1, "ovl-h1"),
            (&t.host2, "ovl-h2"),
        ] {
            host.add_veth("vethwe", port, &t.overlay);
            host.ip(&["link", "set", "vethwe", "master", "weave", "up"]);
            t.overlay.ip(&["link", "set", port, "master", "ovl", "up"]);
        }

        // Containers: a veth into their host's bridge, an address from the host's /24 with
        // the weave network's prefix (docker --bridge=weave --fixed-cidr=10.2.N.0/24).
        for (host, container, port, address) in [
            (&t.host1, &t.c1, "c1", "10.2.1.5/16"),
            (&t.host2, &t.c2, "c2", "10.2.2.7/16"),
        ] {
            host.add_veth(port, "eth0", container);
            host.ip(&["link", "set", port, "master", "weave", "up"]);
            container.ip(&["addr", "add", address, "dev", "eth0"]);
            container.ip(&["link", "set", "eth0", "up"]);
        }

        // The client sits outside the weave network, on its own link to the edge.
        t.edge.add_veth("client0", "eth0", &t.client);
        t.edge
            .ip(&["addr", "add", "192.168.100.1/24", "dev", "client0"]);
        t.edge.ip(&["link", "set", "client0", "up"]);
        t.client
            .ip(&["addr", "add", "192.168.100.2/24", "dev", "eth0"]);
        t.client.ip(&["link", "set", "eth0", "up"]);
        topology
    }
}

fn edge_http() -> SocketAddr {
    "192.168.100.1:80".parse().unwrap()
}

/// Samples requests from the client until both containers have answered, each with 200.
fn wait_for_both_containers(t: &Topology, weft: &NsWeft, what: &str) {
    let check = || {
        let answers = (0..6)
            .map(|_| get_in(&t.client, edge_http(), HOST, "/"))
            .collect::<Result<Vec<_>, _>>()?;
        support::served_by(&["c1 on host1", "c2 on host2"], &answers)
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_until(Duration::from_secs(30), what, check)
    }));
    if let Err(panic) = result {
        eprintln!("---- weft log ----\n{}", weft.log());
        std::panic::resume_unwind(panic);
    }
}

/// GET a status endpoint of the weft in the edge (it listens on the edge's loopback).
fn status(t: &Topology, path: &str) -> (u16, String) {
    get_in(
        &t.edge,
        "127.0.0.1:9090".parse().unwrap(),
        "localhost",
        path,
    )
    .unwrap()
}

#[test]
fn client_reaches_containers_on_both_hosts_and_weft_repairs_the_edge_bridge() {
    support::require_haproxy();
    let t = Topology::build();
    // Declared after the namespaces: stopped before they are deleted.
    let _c1 = NsServer::start(&t.c1, "10.2.1.5:8080".parse().unwrap(), "c1 on host1");
    let _c2 = NsServer::start(&t.c2, "10.2.2.7:8080".parse().unwrap(), "c2 on host2");

    let mut weft = NsWeft::start(
        &t.edge,
        "[haproxy]\nbind = \"0.0.0.0:80\"\nrun_dir = \"run\"\nhard_stop_after = \"5s\"\n\n\
         [network]\nallowed = [\"10.2.0.0/16\"]\n\n\
         [bridge]\nmode = \"ensure\"\nhost_index = 3\n\n\
         [status]\nlisten = \"127.0.0.1:9090\"\n\n\
         [sources.file]\npath = \"services.toml\"\ndebounce = \"50ms\"\n",
        Some(&format!(
            "[[service]]\nname = \"app\"\nhosts = [\"{HOST}\"]\n\
             servers = [\"10.2.1.5:8080\", \"10.2.2.7:8080\"]\n"
        )),
    );

    // weft configured the bare bridge before HAProxy started; the client reaches both hosts.
    wait_for_both_containers(&t, &weft, "both containers through the edge");
    let bridge = t.edge.link("weave").unwrap();
    assert!(bridge.up);
    assert_eq!(bridge.addresses, ["10.2.0.3/16"]);
    let log = weft.log();
    assert!(
        log.contains("wrong=bridge weave lacks its address 10.2.0.3/16"),
        "{log}"
    );
    let first_repairs = log.matches("bridge repaired").count();
    let (code, body) = status(&t, "/healthz");
    assert_eq!((code, body.as_str()), (200, "ok\n"));

    // The edge loses its bridge's state: down and flushed.
    t.edge.ip(&["link", "set", "weave", "down"]);
    t.edge.ip(&["addr", "flush", "dev", "weave"]);
    wait_for_both_containers(&t, &weft, "traffic resumes after the repair");
    let repaired = t.edge.link("weave").unwrap();
    assert_eq!(
        repaired, bridge,
        "repaired in place: same index, MAC, address"
    );
    let log = weft.log();
    let repairs: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("bridge repaired"))
        .skip(first_repairs)
        .collect();
    assert!(
        repairs
            .iter()
            .any(|l| l.contains("wrong=bridge weave is down (IFF_UP unset)")),
        "{log}"
    );
    assert!(
        repairs
            .iter()
            .any(|l| l.contains("wrong=bridge weave lacks its address 10.2.0.3/16")),
        "{log}"
    );
    assert!(repairs.iter().all(|l| l.contains("WARN")), "{repairs:?}");

    // The status page tells what happened.
    let (code, body) = status(&t, "/status");
    assert_eq!(code, 200);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    let bridge = &json["bridge"];
    assert_eq!(bridge["name"], "weave", "{body}");
    assert_eq!(bridge["address"], "10.2.0.3/16", "{body}");
    assert_eq!(bridge["mode"], "ensure", "{body}");
    assert!(
        bridge["state"] == "ok" || bridge["state"] == "repaired",
        "{body}"
    );
    let last = bridge["last_repair"]["repairs"].to_string();
    assert!(last.contains("lacks its address 10.2.0.3/16"), "{body}");
    assert_eq!(json["healthy"], true, "{body}");
    let (code, page) = status(&t, "/");
    assert_eq!(code, 200);
    assert!(page.contains("<h2>Bridge</h2>"), "{page}");

    let status = weft.process.stop().unwrap();
    assert!(status.success(), "{status}\n{}", weft.log());
}
