//! ACME across three edges: Pebble (Let's Encrypt's test CA) and its mock DNS, the Consul
//! double, and three edges, each weft with its HAProxy in a namespace of its own.
//!
//! ```text
//!  edge-a: weft + HAProxy :80 :443   192.168.150.11 ──veth──┐
//!  edge-b: weft + HAProxy :80 :443   192.168.150.12 ──veth──┤ hub: bridge br0 192.168.150.1/24
//!  edge-c: weft + HAProxy :80 :443   192.168.150.13 ──veth──┘      Consul double :8500
//!                                                                  pebble :14000, DNS :8053
//! ```
//!
//! A service with a new host is registered; one edge takes the host's lock and orders; every
//! edge answers the challenge from the map its watch of Consul's KV keeps; the DNS points the
//! host at an edge other than the one that ordered (Pebble's VA dials the first A record), so
//! the CA validates there. Afterwards all three serve the certificate by SNI. The service's
//! server is in 10.2.0.0/16 and never receives anything: no request is routed.

#![allow(clippy::unwrap_used)]

mod support;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::time::{Duration, Instant};

use support::consul::{ConsulDouble, Instance};
use support::netns::{get_in, require_netns, wait_until, Netns, NsWeft};
use support::pebble::{require_pebble, Pebble, PebbleOptions};

const CONSUL: &str = "192.168.150.1:8500";
const HOST: &str = "shop.example.com";
const EDGES: [(&str, Ipv4Addr); 3] = [
    ("edge-a", Ipv4Addr::new(192, 168, 150, 11)),
    ("edge-b", Ipv4Addr::new(192, 168, 150, 12)),
    ("edge-c", Ipv4Addr::new(192, 168, 150, 13)),
];
/// From the registration to every edge serving the certificate: an order takes about 2 s
/// (the ordering edge's self-check, 1 s for the others, Pebble's validation and issuance).
const ISSUED_WITHIN: Duration = Duration::from_secs(30);

struct Topology {
    hub: Netns,
    edges: Vec<Netns>,
}

impl Topology {
    fn build() -> Topology {
        let hub = Netns::new("hub");
        hub.ip(&["link", "add", "br0", "type", "bridge"]);
        hub.ip(&["addr", "add", "192.168.150.1/24", "dev", "br0"]);
        hub.ip(&["link", "set", "br0", "up"]);
        let edges = EDGES
            .iter()
            .map(|(name, address)| {
                let edge = Netns::new(name);
                edge.add_veth("eth0", name, &hub);
                edge.ip(&["addr", "add", &format!("{address}/24"), "dev", "eth0"]);
                edge.ip(&["link", "set", "eth0", "up"]);
                hub.ip(&["link", "set", name, "master", "br0", "up"]);
                edge
            })
            .collect();
        Topology { hub, edges }
    }
}

/// weft in an edge: HAProxy on all of the edge's addresses (the CA reaches port 80 on eth0),
/// the Consul source, TLS with an empty certificates' directory, ACME from Pebble.
fn start_edge(ns: &Netns, pebble: &Pebble, certs: &std::path::Path) -> NsWeft {
    NsWeft::start(
        ns,
        &format!(
            "[haproxy]\nbind = \"0.0.0.0:80\"\nrun_dir = \"run\"\nhard_stop_after = \"5s\"\n\n\
             [network]\nallowed = [\"10.2.0.0/16\"]\n\n\
             [bridge]\nmode = \"off\"\n\n\
             [status]\nlisten = \"127.0.0.1:9090\"\n\n\
             [sources.consul]\nurl = \"http://{CONSUL}\"\n\n\
             [tls]\nlisten = \"0.0.0.0:443\"\ncerts = \"{certs}\"\n\n\
             [tls.acme]\ndirectory = \"{directory}\"\nemail = \"ops@example.com\"\n\
             hosts = [\".example.com\"]\nca_file = \"{ca}\"\nlock_ttl = \"10s\"\n",
            certs = certs.display(),
            directory = pebble.directory_url(),
            ca = pebble.ca_file().display(),
        ),
        None,
    )
}

fn wait_for_edge(ns: &Netns, edge: &NsWeft) {
    let status = "127.0.0.1:9090".parse().unwrap();
    wait_until(Duration::from_secs(10), "weft's status endpoint", || {
        get_in(ns, status, "localhost", "/healthz")
    });
    let socket = edge.path("run/admin.sock");
    wait_until(Duration::from_secs(10), "HAProxy's admin socket", || {
        socket.exists().then_some(()).ok_or(())
    });
}

/// One command on an HAProxy admin socket (a unix socket: reachable from any namespace).
fn admin(socket: &std::path::Path, command: &str) -> String {
    let mut stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
    stream.write_all(format!("{command}\n").as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
}

/// Requests the `http` frontend received (`show stat`, `req_tot`).
fn requests(edge: &NsWeft) -> u64 {
    let stat = admin(&edge.path("run/admin.sock"), "show stat");
    let header: Vec<&str> = stat
        .lines()
        .next()
        .unwrap()
        .trim_start_matches("# ")
        .split(',')
        .collect();
    let column = header.iter().position(|c| *c == "req_tot").unwrap();
    stat.lines()
        .find(|l| l.starts_with("http,FRONTEND,"))
        .and_then(|l| l.split(',').nth(column))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The certificate the edge's HAProxy serves for `host` by SNI, verified against `chain` (the
/// CA's issuing root and intermediate): its serial.
fn served_in(ns: &Netns, host: &str, chain: &std::path::Path) -> Result<String, String> {
    let output = ns
        .exec("openssl")
        .args(["s_client", "-connect", "127.0.0.1:443", "-servername", host])
        .arg("-CAfile")
        .arg(chain)
        .args(["-verify_return_error", "-verify_hostname", host])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !text.contains("Verify return code: 0 (ok)") {
        return Err(format!(
            "not verified: {}",
            text.lines()
                .find(|l| l.contains("Verify return code"))
                .unwrap_or("no answer")
        ));
    }
    let pem = pem::parse(text.as_bytes()).map_err(|e| e.to_string())?;
    let (_, cert) = x509_parser::prelude::X509Certificate::from_der(pem.contents())
        .map_err(|e| e.to_string())?;
    Ok(cert.raw_serial_as_string())
}

use x509_parser::prelude::FromDer;

#[test]
fn one_edge_orders_another_is_validated_and_all_three_serve_the_certificate() {
    require_netns();
    require_pebble();
    support::require_haproxy();
    let t = Topology::build();
    let runtime = t.hub.runtime();
    let consul_addr: SocketAddr = CONSUL.parse().unwrap();
    let consul = runtime.block_on(async {
        tokio::spawn(ConsulDouble::start_on(consul_addr))
            .await
            .unwrap()
    });
    let pebble = Pebble::start(&t.hub, PebbleOptions::default());
    let certs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let edges: Vec<NsWeft> = t
        .edges
        .iter()
        .zip(&certs)
        .map(|(ns, certs)| start_edge(ns, &pebble, certs.path()))
        .collect();
    for (ns, edge) in t.edges.iter().zip(&edges) {
        wait_for_edge(ns, edge);
    }
    let before: Vec<u64> = edges.iter().map(requests).collect();

    pebble.set_a(HOST, &[EDGES[0].1, EDGES[1].1, EDGES[2].1]);
    let registered = Instant::now();
    consul.register(
        Instance::new("shop", "shop-1", "10.2.1.5", 8080).tag(&format!("weft.host={HOST}")),
    );

    // The edge that placed the order; the DNS then points the host at the next edge, before
    // the orderer tells the CA the challenge is ready (it waits for its own HAProxy, then 1 s).
    let orderer = wait_until(Duration::from_secs(20), "an edge placing the order", || {
        edges
            .iter()
            .position(|e| e.log().contains("ACME order placed"))
            .ok_or(())
    });
    let validator = (orderer + 1) % 3;
    pebble.set_a(HOST, &[EDGES[validator].1]);
    eprintln!(
        "{} ordered; the DNS points {HOST} at {}",
        EDGES[orderer].0, EDGES[validator].0
    );

    let roots = pebble.issuing_roots();
    let chain = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        chain.path(),
        format!("{}{}", roots.root, roots.intermediate),
    )
    .unwrap();
    let mut serials = Vec::new();
    for (ns, (name, _)) in t.edges.iter().zip(EDGES) {
        let serial = wait_until(ISSUED_WITHIN, &format!("{name} serving {HOST}"), || {
            served_in(ns, HOST, chain.path())
        });
        serials.push(serial);
    }
    let elapsed = registered.elapsed();
    eprintln!("all three edges serve the certificate {elapsed:?} after the registration");
    assert!(
        elapsed < ISSUED_WITHIN,
        "served after {elapsed:?} (goal {ISSUED_WITHIN:?})"
    );
    assert!(
        serials.iter().all(|s| *s == serials[0]),
        "one certificate on every edge: {serials:?}"
    );

    // Exactly one order, placed by one edge; the CA validated against another.
    assert_eq!(pebble.orders().len(), 1, "{}", pebble.log());
    let placed: Vec<&str> = edges
        .iter()
        .zip(EDGES)
        .filter(|(e, _)| e.log().contains("ACME order placed"))
        .map(|(_, (name, _))| name)
        .collect();
    assert_eq!(placed, [EDGES[orderer].0]);
    let after: Vec<u64> = edges.iter().map(requests).collect();
    assert!(
        after[validator] > before[validator],
        "{} received no request: {before:?} -> {after:?}",
        EDGES[validator].0
    );
    let attempts = pebble.http01_attempts();
    assert!(
        !attempts.is_empty() && attempts.iter().all(|a| a.host == HOST),
        "{attempts:?}"
    );
    // The challenge is gone from the store once the order is done.
    assert!(consul.kv_keys("weft/acme/challenges/").is_empty());
    assert!(!consul.kv_keys("weft/acme/certs/").is_empty());
    drop(edges);
    drop(pebble);
    drop(consul);
    drop(runtime);
}
