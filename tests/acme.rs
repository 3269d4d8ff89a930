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
use support::netns::{
    get_in, require_netns, wait_for_weft, wait_until, Edges, Netns, NsServer, NsWeft,
};
use support::pebble::{require_pebble, Pebble, PebbleOptions};

const CONSUL: &str = "192.168.150.1:8500";
const HOST: &str = "shop.example.com";
const EDGES: [(&str, Ipv4Addr); 3] = [
    ("edge-a", Ipv4Addr::new(192, 168, 150, 11)),
    ("edge-b", Ipv4Addr::new(192, 168, 150, 12)),
    ("edge-c", Ipv4Addr::new(192, 168, 150, 13)),
];
/// From the registration to every edge serving the certificate: an order takes about 2 s
/// (the edges' acknowledgements, the test's own 500 ms later, Pebble's validation and
/// issuance).
const ISSUED_WITHIN: Duration = Duration::from_secs(30);
/// The service's server, on the hub: reachable from every edge through its route to
/// 10.2.0.0/16, and never the edges' own address.
const SERVER: &str = "10.2.1.5:8080";

/// The hub and the edges; each edge routes 10.2.0.0/16 to the hub, which holds the service's
/// server.
fn topology() -> Edges {
    let t = Edges::build(&EDGES);
    for edge in &t.edges {
        edge.ip(&["route", "add", "10.2.0.0/16", "via", "192.168.150.1"]);
    }
    t.hub.ip(&["addr", "add", "10.2.1.5/32", "dev", "br0"]);
    t
}

/// weft in an edge: HAProxy on all of the edge's addresses (the CA reaches port 80 on eth0),
/// the Consul source, TLS with an empty certificates' directory, ACME from Pebble; `acme`:
/// more `[tls.acme]` keys.
fn start_edge(ns: &Netns, pebble: &Pebble, certs: &std::path::Path, acme: &str) -> NsWeft {
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
             hosts = [\".example.com\"]\nca_file = \"{ca}\"\nlock_ttl = \"10s\"\n{acme}",
            certs = certs.display(),
            directory = pebble.directory_url(),
            ca = pebble.ca_file().display(),
        ),
        None,
    )
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

/// The topology, the double, Pebble, the service's server and the three edges, running.
struct Estate {
    // Dropped first to last: the edges, Pebble, the server, the double, its runtime, then the
    // namespaces.
    edges: Vec<NsWeft>,
    pebble: Pebble,
    _server: NsServer,
    consul: ConsulDouble,
    runtime: tokio::runtime::Runtime,
    _certs: Vec<tempfile::TempDir>,
    t: Edges,
}

impl Estate {
    fn start(pebble: PebbleOptions, acme: &str) -> Estate {
        require_netns();
        require_pebble();
        support::require_haproxy();
        let t = topology();
        let runtime = t.hub.runtime();
        let consul_addr: SocketAddr = CONSUL.parse().unwrap();
        let consul = runtime.block_on(async {
            tokio::spawn(ConsulDouble::start_on(consul_addr))
                .await
                .unwrap()
        });
        let server = NsServer::start(&t.hub, SERVER.parse().unwrap(), "shop\n");
        let pebble = Pebble::start(&t.hub, pebble);
        let certs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        let edges: Vec<NsWeft> = t
            .edges
            .iter()
            .zip(&certs)
            .map(|(ns, certs)| start_edge(ns, &pebble, certs.path(), acme))
            .collect();
        for (ns, edge) in t.edges.iter().zip(&edges) {
            wait_for_weft(ns, edge);
        }
        Estate {
            edges,
            pebble,
            _server: server,
            consul,
            runtime,
            _certs: certs,
            t,
        }
    }

    /// Registers the service of HOST; the DNS points at the edges in order.
    fn register(&self) {
        self.pebble
            .set_a(HOST, &[EDGES[0].1, EDGES[1].1, EDGES[2].1]);
        let (ip, port) = SERVER.split_once(':').unwrap();
        self.consul.register(
            Instance::new("shop", "shop-1", ip, port.parse().unwrap())
                .tag(&format!("weft.host={HOST}")),
        );
    }

    /// A Consul session that says, as an edge's does, that it certifies HOST (its list
    /// `wanted/<session>`, held by it): the ordering edge waits for its acknowledgement as for
    /// every edge's, so the test decides when the CA is told the challenge is ready.
    fn gate_session(&self) -> String {
        self.runtime.block_on(async {
            tokio::spawn(async {
                let client = reqwest::Client::new();
                let answer = client
                    .put(format!("http://{CONSUL}/v1/session/create"))
                    .body(r#"{"Name": "weft-acme weft/acme test-gate", "TTL": "300s"}"#)
                    .send()
                    .await
                    .unwrap();
                let created: serde_json::Value = answer.json().await.unwrap();
                let id = created["ID"].as_str().unwrap().to_string();
                let held = client
                    .put(format!(
                        "http://{CONSUL}/v1/kv/weft/acme/wanted/{id}?acquire={id}"
                    ))
                    .body(HOST)
                    .send()
                    .await
                    .unwrap()
                    .text()
                    .await
                    .unwrap();
                assert_eq!(held, "true");
                id
            })
            .await
            .unwrap()
        })
    }

    /// The acknowledgements of HOST's pending challenge, once it has one: its token and the
    /// sessions that acknowledged it.
    fn acks(&self) -> Option<(String, Vec<String>)> {
        let challenges = self
            .consul
            .kv_keys(&format!("weft/acme/challenges/{HOST}/"));
        let token = challenges.first()?.rsplit('/').next()?.to_string();
        let acks = self
            .consul
            .kv_keys(&format!("weft/acme/acks/{HOST}/{token}/"))
            .into_iter()
            .filter_map(|key| key.rsplit('/').next().map(str::to_string))
            .collect();
        Some((token, acks))
    }

    /// The edge whose log says it placed an order, once one does.
    fn orderer(&self, within: Duration) -> usize {
        wait_until(within, "an edge placing the order", || {
            self.edges
                .iter()
                .position(|e| e.log().contains("ACME order placed"))
                .ok_or(())
        })
    }

    /// A file holding Pebble's current issuing root and intermediate.
    fn chain(&self) -> tempfile::NamedTempFile {
        let roots = self.pebble.issuing_roots();
        let chain = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            chain.path(),
            format!("{}{}", roots.root, roots.intermediate),
        )
        .unwrap();
        chain
    }

    /// Waits until every edge in `which` serves a certificate for HOST that `chain` verifies,
    /// other than `not`; the serials.
    fn served(
        &self,
        which: &[usize],
        chain: &std::path::Path,
        not: &[String],
        within: Duration,
    ) -> Vec<String> {
        which
            .iter()
            .map(|&i| {
                wait_until(within, &format!("{} serving {HOST}", EDGES[i].0), || {
                    served_in(&self.t.edges[i], HOST, chain).and_then(|s| {
                        if not.contains(&s) {
                            Err(format!("still {s}"))
                        } else {
                            Ok(s)
                        }
                    })
                })
            })
            .collect()
    }

    /// weft's `/status` of edge `i`, as JSON.
    fn status(&self, i: usize) -> serde_json::Value {
        let (_, body) = get_in(
            &self.t.edges[i],
            "127.0.0.1:9090".parse().unwrap(),
            "localhost",
            "/status",
        )
        .unwrap();
        serde_json::from_str(&body).unwrap()
    }
}

/// Requests over HTTPS to HOST, each on a new connection (a new handshake, so each sees the
/// certificate installed at that moment), from inside `ns` until `stop`: (ok, failed, first
/// failure).
fn https_load(
    ns: &Netns,
    chain: &std::path::Path,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(u64, u64, Option<String>)> {
    let ca = std::fs::read(chain).unwrap();
    let handle = ns.spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let mut builder = reqwest::Client::builder()
                .resolve(HOST, "127.0.0.1:443".parse().unwrap())
                .pool_max_idle_per_host(0)
                .no_proxy()
                .timeout(Duration::from_secs(5));
            for cert in reqwest::Certificate::from_pem_bundle(&ca).unwrap() {
                builder = builder.add_root_certificate(cert);
            }
            let client = builder.build().unwrap();
            let (mut ok, mut failed, mut first) = (0, 0, None);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match client.get(format!("https://{HOST}/")).send().await {
                    Ok(answer) if answer.status() == 200 => ok += 1,
                    Ok(answer) => {
                        failed += 1;
                        first.get_or_insert(format!("status {}", answer.status()));
                    }
                    Err(err) => {
                        failed += 1;
                        first.get_or_insert(format!("{err:?}"));
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (ok, failed, first)
        })
    });
    handle
}

#[test]
fn one_edge_orders_another_is_validated_and_all_three_serve_then_renew_the_certificate() {
    // Certificates valid 60 s, renewed with 45 s left: the renewal follows 15 s after the
    // issue.
    let estate = Estate::start(
        PebbleOptions {
            cert_validity: Some(Duration::from_secs(60)),
            ..PebbleOptions::default()
        },
        "renew_before = \"45s\"\n",
    );
    let gate = estate.gate_session();
    let registered = Instant::now();
    estate.register();

    // The edge that placed the order; the DNS then points the host at the next edge. The
    // orderer tells the CA the challenge is ready only once every edge alive acknowledged that
    // its HAProxy answers it: the three edges, and the test's own session, last.
    let orderer = estate.orderer(Duration::from_secs(20));
    let validator = (orderer + 1) % 3;
    estate.pebble.set_a(HOST, &[EDGES[validator].1]);
    eprintln!(
        "{} ordered; the DNS points {HOST} at {}",
        EDGES[orderer].0, EDGES[validator].0
    );
    // Each edge says it certifies the host, in a list its session holds.
    wait_until(
        Duration::from_secs(10),
        "four lists naming the host",
        || {
            let naming: Vec<String> = estate
                .consul
                .kv_keys("weft/acme/wanted/")
                .into_iter()
                .filter(|key| estate.consul.kv_lock_holder(key).is_some())
                .filter(|key| {
                    estate
                        .consul
                        .kv_get(key)
                        .is_some_and(|v| String::from_utf8_lossy(&v).lines().any(|l| l == HOST))
                })
                .collect();
            match naming.len() {
                4 => Ok(()),
                _ => Err(naming),
            }
        },
    );
    let (token, acked) = wait_until(
        Duration::from_secs(20),
        "three edges' acks",
        || match estate.acks() {
            Some((token, acks)) if acks.len() == 3 => Ok((token, acks)),
            other => Err(other),
        },
    );
    let acked_at = registered.elapsed();
    assert!(!acked.contains(&gate), "{acked:?}");
    // Every edge's own check of its HAProxy is done (the orderer's too: it polls the acks
    // now): from here on, the edges' frontends count the CA's requests alone.
    let polled = format!("/v1/kv/weft/acme/acks/{HOST}/{token}/");
    wait_until(
        Duration::from_secs(10),
        "the orderer polling the acks",
        || match estate.consul.requests().count(&polled) {
            0 => Err(()),
            _ => Ok(()),
        },
    );
    let before: Vec<u64> = estate.edges.iter().map(requests).collect();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        estate.pebble.http01_attempts().is_empty(),
        "the orderer told the CA before every edge acknowledged: {:?}",
        estate.pebble.http01_attempts()
    );
    eprintln!("the three edges acknowledged the challenge {acked_at:?} after the registration; the test's session acknowledges 500 ms later");
    estate.consul.kv_put(
        &format!("weft/acme/acks/{HOST}/{token}/{gate}"),
        "test-gate",
    );
    wait_until(
        Duration::from_secs(20),
        "the CA's validation",
        || match estate.pebble.validations().as_slice() {
            [] => Err("none yet".to_string()),
            done => Ok(done.to_vec()),
        },
    );
    // What the edges' frontends counted meanwhile is the CA's: the validator got it all.
    let after: Vec<u64> = estate.edges.iter().map(requests).collect();
    assert!(
        after[validator] > before[validator],
        "{} received no request: {before:?} -> {after:?}",
        EDGES[validator].0
    );
    assert_eq!(
        after[orderer], before[orderer],
        "the CA validated against the orderer {}",
        EDGES[orderer].0
    );
    // The orderer went on at the test's acknowledgement, not at its 10 s bound.
    let log = estate.edges[orderer].log();
    assert!(
        log.contains("every edge answers the ACME challenge host=shop.example.com edges=4"),
        "{log}"
    );
    assert!(!log.contains("not every edge acknowledged"), "{log}");
    let chain = estate.chain();
    let serials = estate.served(&[0, 1, 2], chain.path(), &[], ISSUED_WITHIN);
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
    assert_eq!(estate.pebble.orders().len(), 1, "{}", estate.pebble.log());
    let placed: Vec<usize> = (0..3)
        .filter(|&i| estate.edges[i].log().contains("ACME order placed"))
        .collect();
    assert_eq!(placed, [orderer]);
    let metric = |i: usize, line: &str| {
        let (_, text) = get_in(
            &estate.t.edges[i],
            "127.0.0.1:9090".parse().unwrap(),
            "localhost",
            "/metrics",
        )
        .unwrap();
        text.lines().any(|l| l == line)
    };
    for (i, (name, _)) in EDGES.iter().enumerate() {
        let placed = if i == orderer { 1 } else { 0 };
        assert!(
            metric(
                i,
                &format!("weft_acme_orders_total{{result=\"placed\"}} {placed}")
            ),
            "{name}: weft_acme_orders_total placed {placed}"
        );
    }
    // The acknowledgements go with the challenge (one written late is collected).
    wait_until(Duration::from_secs(15), "the acks deleted", || match estate
        .consul
        .kv_keys("weft/acme/acks/")
    {
        keys if keys.is_empty() => Ok(()),
        keys => Err(keys),
    });
    // The test's session gone, the renewal waits for the three edges alone.
    estate.consul.invalidate_session(&gate);
    let attempts = estate.pebble.http01_attempts();
    assert!(
        !attempts.is_empty() && attempts.iter().all(|a| a.host == HOST),
        "{attempts:?}"
    );
    assert!(estate.consul.kv_keys("weft/acme/challenges/").is_empty());

    // Renewal, under an HTTPS load on every edge: a new certificate on all three, no reload,
    // no failed request.
    let reloads: Vec<u64> = (0..3)
        .map(|i| estate.status(i)["haproxy"]["reloads"].as_u64().unwrap_or(0))
        .collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let loads: Vec<_> = estate
        .t
        .edges
        .iter()
        .map(|ns| https_load(ns, chain.path(), stop.clone()))
        .collect();
    let renewed = estate.served(&[0, 1, 2], chain.path(), &serials, Duration::from_secs(40));
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for (i, load) in loads.into_iter().enumerate() {
        let (ok, failed, first) = load.join().unwrap();
        eprintln!(
            "{}: {ok} requests served during the renewal, {failed} failed",
            EDGES[i].0
        );
        assert!(ok > 0);
        assert_eq!(failed, 0, "{}: first failure: {first:?}", EDGES[i].0);
    }
    assert!(renewed.iter().all(|s| *s == renewed[0]), "{renewed:?}");
    let reloads_after: Vec<u64> = (0..3)
        .map(|i| estate.status(i)["haproxy"]["reloads"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(reloads, reloads_after, "the renewal reloaded HAProxy");
    assert_eq!(estate.pebble.orders().len(), 2, "one order per certificate");
}

/// An edge that lists the host but never acknowledges the challenge (down, its session not
/// yet expired: here the test's own session) holds the order up for 10 s, no longer: then the
/// orderer tells the CA, says so, and every edge serves the certificate.
#[test]
fn an_edge_that_never_acknowledges_holds_the_order_up_10_s_at_most() {
    let estate = Estate::start(PebbleOptions::default(), "");
    let _silent = estate.gate_session();
    estate.register();
    let orderer = estate.orderer(Duration::from_secs(20));
    let acked = wait_until(
        Duration::from_secs(20),
        "three edges' acks",
        || match estate.acks() {
            Some((_, acks)) if acks.len() == 3 => Ok(Instant::now()),
            other => Err(other),
        },
    );
    // The orderer's wait began before its own ack, which came before the three were seen:
    // the CA hears of the challenge within the 10 s bound after them, and not at once.
    let told = wait_until(
        Duration::from_secs(20),
        "the CA told of the challenge",
        || match estate.pebble.http01_attempts().as_slice() {
            [] => Err("no attempt yet"),
            _ => Ok(Instant::now()),
        },
    );
    let waited = told - acked;
    eprintln!("the CA was told {waited:?} after the three edges' acks");
    assert!(
        waited >= Duration::from_secs(3),
        "the orderer did not wait for the silent edge: told {waited:?} after the acks"
    );
    assert!(
        waited <= Duration::from_secs(13),
        "waited past the 10 s bound: {waited:?}"
    );
    let log = estate.edges[orderer].log();
    let line = log
        .lines()
        .find(|l| l.contains("not every edge acknowledged the ACME challenge within 10 s"))
        .unwrap_or_else(|| panic!("the orderer says nothing of the silent edge: {log}"));
    assert!(line.contains("missing=1"), "{line}");
    assert!(
        !log.contains("every edge answers the ACME challenge"),
        "{log}"
    );
    let chain = estate.chain();
    let serials = estate.served(&[0, 1, 2], chain.path(), &[], ISSUED_WITHIN);
    assert!(serials.iter().all(|s| *s == serials[0]), "{serials:?}");
    assert_eq!(estate.pebble.orders().len(), 1, "{}", estate.pebble.log());
}

#[test]
fn a_ca_that_is_down_leaves_the_old_certificate_a_reason_and_a_backoff_and_a_killed_orderer_is_taken_over(
) {
    // Certificates valid 3 min, renewed with 150 s left but never in their first quarter: the
    // renewal is due 45 s after the issue.
    let mut estate = Estate::start(
        PebbleOptions {
            cert_validity: Some(Duration::from_secs(180)),
            ..PebbleOptions::default()
        },
        "renew_before = \"150s\"\nretry_after = \"1h\"\n",
    );
    estate.register();
    let chain = estate.chain();
    let first = estate.served(&[0, 1, 2], chain.path(), &[], ISSUED_WITHIN);

    // The CA goes down: the renewal fails, says why on /status, backs off for an hour (the
    // failure is in the store: no edge tries again), and the certificate keeps serving.
    estate.pebble.stop();
    let reason = wait_until(Duration::from_secs(70), "the failure on /status", || {
        let status = estate.status(0);
        let dropped = status["dropped"].as_array().cloned().unwrap_or_default();
        dropped
            .into_iter()
            .find(|d| {
                d["subject"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("ACME order"))
            })
            .ok_or(status)
    });
    eprintln!("/status: {reason}");
    assert!(
        reason["reason"]
            .as_str()
            .unwrap()
            .contains("next order after"),
        "{reason}"
    );
    let failures = estate
        .consul
        .kv_get(&format!("weft/acme/failures/{HOST}"))
        .unwrap();
    let failure: serde_json::Value = serde_json::from_slice(&failures).unwrap();
    assert_eq!(failure["attempts"], 1);
    std::thread::sleep(Duration::from_secs(12));
    let failure: serde_json::Value = serde_json::from_slice(
        &estate
            .consul
            .kv_get(&format!("weft/acme/failures/{HOST}"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        failure["attempts"], 1,
        "no edge tried again within its backoff"
    );
    let still = estate.served(&[0, 1, 2], chain.path(), &[], Duration::from_secs(5));
    assert_eq!(still, first, "the old certificate still serves");
    let placed_before = estate
        .edges
        .iter()
        .filter(|e| e.log().contains("ACME order placed"))
        .count();
    assert_eq!(placed_before, 1, "one order, before the CA went down");

    // The CA comes back; the backoff ends (the test shortens it in the store); the edge that
    // places the order dies before telling the CA the challenge is ready. Another edge takes
    // the host's lock once the dead edge's session ends, and finishes the same order.
    estate.pebble.start_again();
    let orders_before = estate.pebble.orders().len();
    let marks: Vec<usize> = estate.edges.iter().map(|e| e.log().len()).collect();
    estate
        .consul
        .kv_delete(&format!("weft/acme/failures/{HOST}"));
    let orderer = wait_until(
        Duration::from_secs(30),
        "an edge placing the second order",
        || {
            (0..3)
                .find(|&i| estate.edges[i].log()[marks[i]..].contains("ACME order placed"))
                .ok_or(())
        },
    );
    estate.edges[orderer].process.kill();
    let killed = Instant::now();
    let alive: Vec<usize> = (0..3).filter(|&i| i != orderer).collect();
    estate.pebble.set_a(HOST, &[EDGES[alive[0]].1]);
    eprintln!("{} killed mid-order", EDGES[orderer].0);
    let chain = estate.chain();
    let renewed = estate.served(&alive, chain.path(), &first, Duration::from_secs(60));
    eprintln!(
        "taken over and issued {:?} after the kill",
        killed.elapsed()
    );
    assert!(renewed.iter().all(|s| *s == renewed[0]), "{renewed:?}");
    assert!(
        alive
            .iter()
            .any(|&i| estate.edges[i].log().contains("resuming the ACME order")),
        "an edge resumed the dead edge's order"
    );
    assert_eq!(
        estate.pebble.orders().len(),
        orders_before + 1,
        "the dead edge's order was finished, not placed again"
    );
}

/// Without Consul: one edge, the file source, the ACME state in `run_dir/acme/state.json`
/// (readable by weft alone), the certificate served.
#[test]
fn a_single_edge_without_consul_keeps_the_state_in_its_run_dir() {
    require_netns();
    require_pebble();
    support::require_haproxy();
    let t = topology();
    let server = NsServer::start(&t.hub, SERVER.parse().unwrap(), "shop\n");
    let pebble = Pebble::start(&t.hub, PebbleOptions::default());
    pebble.set_a(HOST, &[EDGES[0].1]);
    // Outside `hosts`: one service opts its host in, another does not.
    const OPTED: &str = "blog.example.org";
    const PLAIN: &str = "plain.example.org";
    pebble.set_a(OPTED, &[EDGES[0].1]);
    pebble.set_a(PLAIN, &[EDGES[0].1]);
    let certs = tempfile::tempdir().unwrap();
    let edge = NsWeft::start(
        &t.edges[0],
        &format!(
            "[haproxy]\nbind = \"0.0.0.0:80\"\nrun_dir = \"run\"\nhard_stop_after = \"5s\"\n\n\
             [network]\nallowed = [\"10.2.0.0/16\"]\n\n\
             [bridge]\nmode = \"off\"\n\n\
             [status]\nlisten = \"127.0.0.1:9090\"\n\n\
             [sources.file]\npath = \"services.toml\"\n\n\
             [tls]\nlisten = \"0.0.0.0:443\"\ncerts = \"{certs}\"\n\n\
             [tls.acme]\ndirectory = \"{directory}\"\nemail = \"ops@example.com\"\n\
             hosts = [\".example.com\"]\nca_file = \"{ca}\"\ncollect_after = \"10s\"\n\
             opt_in = true\n",
            certs = certs.path().display(),
            directory = pebble.directory_url(),
            ca = pebble.ca_file().display(),
        ),
        Some(&format!(
            "[[service]]\nname = \"shop\"\nhosts = [\"{HOST}\"]\nservers = [\"{SERVER}\"]\n\n\
             [[service]]\nname = \"blog\"\nhosts = [\"{OPTED}\"]\nservers = [\"{SERVER}\"]\n\
             acme = true\n\n\
             [[service]]\nname = \"plain\"\nhosts = [\"{PLAIN}\"]\nservers = [\"{SERVER}\"]\n"
        )),
    );
    wait_for_weft(&t.edges[0], &edge);
    let roots = pebble.issuing_roots();
    let chain = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        chain.path(),
        format!("{}{}", roots.root, roots.intermediate),
    )
    .unwrap();
    wait_until(ISSUED_WITHIN, "the edge serving the certificate", || {
        served_in(&t.edges[0], HOST, chain.path())
    });
    wait_until(ISSUED_WITHIN, "the opted-in host's certificate", || {
        served_in(&t.edges[0], OPTED, chain.path())
    });
    assert_eq!(
        pebble.orders().len(),
        2,
        "{HOST} and {OPTED}, never {PLAIN}"
    );
    assert!(served_in(&t.edges[0], PLAIN, chain.path()).is_err());
    use std::os::unix::fs::PermissionsExt;
    let dir = edge.path("run/acme");
    let file = dir.join("state.json");
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert!(state.get("account").is_some(), "{state}");
    assert!(state.get(format!("certs/{HOST}")).is_some(), "{state}");
    assert!(state.get(format!("certs/{OPTED}")).is_some(), "{state}");
    assert!(state.get(format!("certs/{PLAIN}")).is_none(), "{state}");
    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&file), 0o600);
    // The host no longer routed: after collect_after its certificate leaves the store.
    let unrouted = std::time::Instant::now();
    let services = edge.path("services.toml");
    let next = services.with_extension("next");
    std::fs::write(
        &next,
        format!(
            "[[service]]\nname = \"shop\"\nhosts = [\"shop.internal\"]\nservers = [\"{SERVER}\"]\n"
        ),
    )
    .unwrap();
    std::fs::rename(&next, &services).unwrap();
    wait_until(Duration::from_secs(40), "the certificate collected", || {
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&file).map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
        match state.get(format!("certs/{HOST}")) {
            None => Ok(state),
            Some(_) => Err(format!(
                "{:?}",
                state.as_object().map(|o| o.keys().collect::<Vec<_>>())
            )),
        }
    });
    let after = unrouted.elapsed();
    println!("the certificate of the unrouted host collected {after:.1?} after the change (collect_after 10s)");
    assert!(
        after >= Duration::from_secs(10),
        "not before collect_after: {after:?}"
    );
    assert!(
        edge.log().contains("collected the store's entries"),
        "{}",
        edge.log()
    );
    drop(edge);
    drop(pebble);
    drop(server);
}

/// The lock fences every write of an order, against the Consul double's `/v1/txn`: a write
/// lands while this edge's session holds the host's lock, and is rolled back (nothing written)
/// once the session is gone and another edge may hold the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_that_lost_its_session_writes_nothing_more() {
    use weft::sources::acme::store::Store;
    use weft::sources::consul::kv::KvFolder;
    let consul = ConsulDouble::start().await;
    let config = weft::config::Config::parse(
        &format!("[sources.consul]\nurl = \"{}\"\n", consul.url()),
        std::path::Path::new("/etc/weft"),
    )
    .unwrap();
    let source = config.sources.consul.clone().unwrap();
    let folder = KvFolder::new(source.clone(), "weft/acme", "ACME state", 2);
    // Sessions that outlive the test (nothing renews them here).
    let (store, _watch) = Store::consul(folder, "edge-a", Duration::from_secs(300));
    let folder = KvFolder::new(source, "weft/acme", "ACME state", 2);
    let (other, _watch) = Store::consul(folder, "edge-b", Duration::from_secs(300));
    let cert = format!("weft/acme/certs/{HOST}");
    let value = |key: &str| consul.kv_get(key).map(|v| String::from_utf8(v).unwrap());
    assert!(
        !store
            .write_locked(HOST, &format!("certs/{HOST}"), Some("PEM"))
            .await
            .unwrap(),
        "without the lock nothing is written"
    );
    assert_eq!(value(&cert), None);
    assert!(store.lock(HOST).await.unwrap());
    assert!(!other.lock(HOST).await.unwrap(), "one holder");
    assert!(
        !other
            .write_locked(HOST, &format!("certs/{HOST}"), Some("B"))
            .await
            .unwrap(),
        "a session that does not hold the lock writes nothing (a 409 on the check)"
    );
    assert!(store
        .write_locked(HOST, &format!("certs/{HOST}"), Some("PEM"))
        .await
        .unwrap());
    assert_eq!(value(&cert).as_deref(), Some("PEM"));
    // The collection deletes at the version read: a held lock's version moved on (acquired
    // after it was read) and stays; a key at its version goes.
    let lock = format!("weft/acme/locks/{HOST}");
    let stale = consul.kv_entry(&lock).unwrap().modify_index - 1;
    consul.kv_put("weft/acme/orders/gone.example.com", "x");
    let order = consul
        .kv_entry("weft/acme/orders/gone.example.com")
        .unwrap()
        .modify_index;
    let (deleted, error) = store
        .collect(&[
            (format!("locks/{HOST}"), stale),
            ("orders/gone.example.com".into(), order),
        ])
        .await;
    assert_eq!((deleted, error.map(|e| e.to_string())), (1, None));
    assert!(consul.kv_lock_holder(&lock).is_some());
    assert_eq!(consul.kv_get("weft/acme/orders/gone.example.com"), None);
    // The edge stalled past its TTL: Consul invalidated the session and released the lock.
    let session = consul
        .kv_lock_holder(&format!("weft/acme/locks/{HOST}"))
        .unwrap();
    consul.invalidate_session(&session);
    assert!(!store
        .write_locked(HOST, &format!("certs/{HOST}"), Some("LATE"))
        .await
        .unwrap());
    assert!(!store
        .write_locked(HOST, &format!("certs/{HOST}"), None)
        .await
        .unwrap());
    assert_eq!(
        value(&cert).as_deref(),
        Some("PEM"),
        "rolled back: neither the late write nor the delete landed"
    );
    // After the lock delay the other edge takes the lock: its writes land, the first's do not.
    let taken = Instant::now();
    while !other.lock(HOST).await.unwrap() {
        assert!(taken.elapsed() < Duration::from_secs(20), "never taken");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(other
        .write_locked(HOST, &format!("certs/{HOST}"), Some("B"))
        .await
        .unwrap());
    assert!(!store
        .write_locked(HOST, &format!("certs/{HOST}"), Some("LATE"))
        .await
        .unwrap());
    assert_eq!(value(&cert).as_deref(), Some("B"));
}
