//! A service registered at the edge's own weave address (issue 11), in network namespaces this
//! test makes and removes:
//!
//! ```text
//!  edge: weft + HAProxy on 0.0.0.0:80, bridge weave 10.2.0.1/16
//!          │ c1 (veth, in weave)
//!  c1: 10.2.1.5:8080 (host 1's /24), the app's container
//! ```
//!
//! `loop.example.com` names 10.2.0.1:80, HAProxy's own listener: before issue 11 each request
//! to it made HAProxy connect to itself until it ran out of connections, and every other host
//! timed out. Every request here is sent from inside the edge's namespace, to its loopback.

#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::netns::{get_in, wait_until, Netns, NsServer, NsWeft};

const APP: &str = "app.example.com";
const LOOP: &str = "loop.example.com";
/// Concurrent requests of the storm.
const STORM: usize = 300;

/// The edge with its bridge and one container. Dropped after the processes and servers that
/// live in them (declared later in the test), taking every link with them.
struct Topology {
    edge: Netns,
    c1: Netns,
}

impl Topology {
    fn build() -> Topology {
        let t = Topology {
            edge: Netns::new("loop-edge"),
            c1: Netns::new("loop-c1"),
        };
        t.edge.ip(&["link", "add", "weave", "type", "bridge"]);
        t.edge.ip(&["addr", "add", "10.2.0.1/16", "dev", "weave"]);
        t.edge.ip(&["link", "set", "weave", "up"]);
        t.edge.add_veth("c1", "eth0", &t.c1);
        t.edge.ip(&["link", "set", "c1", "master", "weave", "up"]);
        t.c1.ip(&["addr", "add", "10.2.1.5/16", "dev", "eth0"]);
        t.c1.ip(&["link", "set", "eth0", "up"]);
        t
    }
}

fn edge_http() -> SocketAddr {
    "127.0.0.1:80".parse().unwrap()
}

fn status(t: &Topology) -> serde_json::Value {
    let (_, body) = get_in(
        &t.edge,
        "127.0.0.1:9090".parse().unwrap(),
        "localhost",
        "/status",
    )
    .unwrap();
    serde_json::from_str(&body).unwrap()
}

/// Fails with weft's log when `f` panics.
fn with_log<T>(weft: &NsWeft, f: impl FnOnce() -> T) -> T {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(value) => value,
        Err(panic) => {
            eprintln!("---- weft log ----\n{}", weft.log());
            std::panic::resume_unwind(panic);
        }
    }
}

#[test]
fn a_server_at_the_edges_own_address_is_refused_and_a_storm_to_it_hurts_no_other_host() {
    support::require_haproxy();
    let t = Topology::build();
    // Declared after the namespaces: stopped before they are deleted.
    let _c1 = NsServer::start(&t.c1, "10.2.1.5:8080".parse().unwrap(), "c1");
    let weft = NsWeft::start(
        &t.edge,
        "[haproxy]\nbind = \"0.0.0.0:80\"\nrun_dir = \"run\"\nhard_stop_after = \"5s\"\n\n\
         [network]\nallowed = [\"10.2.0.0/16\"]\n\n\
         [bridge]\nmode = \"check\"\naddress = \"10.2.0.1/16\"\n\n\
         [status]\nlisten = \"127.0.0.1:9090\"\n\n\
         [sources.file]\npath = \"services.toml\"\ndebounce = \"50ms\"\n",
        Some(&format!(
            "[[service]]\nname = \"loop\"\nhosts = [\"{LOOP}\"]\nservers = [\"10.2.0.1:80\"]\n\n\
             [[service]]\nname = \"app\"\nhosts = [\"{APP}\"]\nservers = [\"10.2.1.5:8080\"]\n"
        )),
    );

    with_log(&weft, || {
        wait_until(
            Duration::from_secs(30),
            "the app served through the edge",
            || match get_in(&t.edge, edge_http(), APP, "/")? {
                (200, body) if body == "c1" => Ok(()),
                other => Err(format!("{other:?}")),
            },
        );
        // Refused with its reason, shown in /status.
        let json = status(&t);
        let dropped = json["dropped"].as_array().unwrap();
        assert!(
            dropped.iter().any(
                |d| d["subject"] == "service \"loop\" server \"10.2.0.1:80\""
                    && d["reason"]
                        .as_str()
                        .unwrap()
                        .contains("address 10.2.0.1 is this edge's own")
            ),
            "{dropped:#?}"
        );
        let loop_route = json["routes"].to_string();
        assert!(!loop_route.contains("10.2.0.1:80"), "{loop_route}");

        // A storm to the refused service's host: answered at once (no server: 503), and the
        // app keeps answering meanwhile, each request well within its 3 s timeout.
        let edge = &t.edge;
        let storm = edge.spawn(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let requests = (0..STORM)
                    .map(|_| support::get_at(edge_http(), LOOP, "/", Duration::from_secs(10)));
                futures::future::join_all(requests).await
            })
        });
        let mut app_answers = Vec::new();
        while !storm.is_finished() || app_answers.len() < 5 {
            app_answers.push(get_in(edge, edge_http(), APP, "/"));
        }
        let storm = storm.join().unwrap();
        for answer in &app_answers {
            assert_eq!(answer, &Ok((200, "c1".to_string())), "{app_answers:?}");
        }
        let loops: Vec<_> = storm
            .iter()
            .filter(|answer| !matches!(answer, Ok((503, _))))
            .collect();
        assert!(loops.is_empty(), "{} of {STORM}: {loops:?}", loops.len());
    });
}
