//! The Pebble harness (`support::pebble`) on its own, in a hub namespace like `tests/edges.rs`'s:
//!
//! ```text
//!  hub: bridge br0 192.168.150.1/24
//!       pebble               https://192.168.150.1:14000/dir, management :15000
//!       pebble-challtestsrv  DNS :8053, management :8055
//! ```
//!
//! The directory answers over HTTPS trusting the harness' CA, the config and environment took
//! (nonce rejections off, no VA sleeps, the DNS server, a short certificate validity), A records
//! replace each other in the order given, the issuing chain is served, and a stopped Pebble is
//! down until it starts again, with a new issuing chain.

#![allow(clippy::unwrap_used)]

mod support;

use std::net::Ipv4Addr;
use std::time::Duration;

use support::netns::{require_netns, Netns};
use support::pebble::{require_pebble, Pebble, PebbleOptions};
use x509_parser::prelude::{FromDer, X509Certificate};

const HOST: &str = "app.example.com";
const EDGE_A: Ipv4Addr = Ipv4Addr::new(192, 168, 150, 11);
const EDGE_B: Ipv4Addr = Ipv4Addr::new(192, 168, 150, 12);

fn hub() -> Netns {
    let hub = Netns::new("hub");
    hub.ip(&["link", "add", "br0", "type", "bridge"]);
    hub.ip(&["addr", "add", "192.168.150.1/24", "dev", "br0"]);
    hub.ip(&["link", "set", "br0", "up"]);
    hub
}

/// (subject, issuer, is a CA) of a PEM certificate.
fn names(pem: &str) -> (String, String, bool) {
    let pem = pem::parse(pem.as_bytes()).unwrap();
    let (_, cert) = X509Certificate::from_der(pem.contents()).unwrap();
    (
        cert.subject().to_string(),
        cert.issuer().to_string(),
        cert.is_ca(),
    )
}

#[test]
fn pebble_serves_its_directory_and_issuing_chain_and_comes_back_after_a_stop() {
    require_netns();
    require_pebble();
    let hub = hub();
    // Declared after the namespace: stopped before it is deleted.
    let mut pebble = Pebble::start(
        &hub,
        PebbleOptions {
            cert_validity: Some(Duration::from_secs(60)),
            ..PebbleOptions::default()
        },
    );
    assert_eq!(pebble.directory_url(), "https://192.168.150.1:14000/dir");
    assert_eq!(
        std::fs::read_to_string(pebble.ca_file()).unwrap(),
        pebble.ca_pem()
    );

    // The directory, over HTTPS trusting only the harness' CA.
    let (status, body) = pebble.https("GET", &pebble.directory_url(), None).unwrap();
    assert_eq!(status, 200, "{body}");
    let directory: serde_json::Value = serde_json::from_str(&body).unwrap();
    for key in ["newNonce", "newAccount", "newOrder"] {
        let url = directory[key]
            .as_str()
            .unwrap_or_else(|| panic!("{key}: {body}"));
        assert!(
            url.starts_with("https://192.168.150.1:14000/"),
            "{key}: {url}"
        );
    }
    let (status, _) = pebble
        .https("HEAD", directory["newNonce"].as_str().unwrap(), None)
        .unwrap();
    assert_eq!(status, 200, "HEAD newNonce");

    // What Pebble says it was configured with.
    let log = pebble.log();
    for line in [
        "Configured to reject 0% of good nonces",
        "Configured to attempt authz reuse for each identifier 0% of the time",
        "Disabling random VA sleeps",
        "Using custom DNS resolver for ACME challenges: 192.168.150.1:8053",
        "Using certificate validity period of 60 seconds",
    ] {
        assert!(log.contains(line), "no {line:?} in Pebble's log:\n{log}");
    }
    assert!(!log.contains("VA always returns valid"), "{log}");
    assert!(pebble.orders().is_empty() && pebble.accounts_created() == 0);
    assert!(pebble.http01_attempts().is_empty() && pebble.issued().is_empty());

    // A records: in the order given, replacing the previous ones; the VA dials the first.
    assert_eq!(pebble.validation_address(HOST), None, "no default IPv4");
    pebble.set_a(HOST, &[EDGE_A, EDGE_B]);
    assert_eq!(pebble.validation_address(HOST), Some(EDGE_A));
    if let Some(answer) = pebble.resolve_a(HOST) {
        assert_eq!(answer, [EDGE_A, EDGE_B]);
    }
    pebble.set_a(HOST, &[EDGE_B, EDGE_A]);
    assert_eq!(pebble.validation_address(HOST), Some(EDGE_B));
    if let Some(answer) = pebble.resolve_a(HOST) {
        assert_eq!(answer, [EDGE_B, EDGE_A], "set_a replaces, in order");
    }
    pebble.clear_a(HOST);
    assert_eq!(pebble.validation_address(HOST), None);
    if let Some(answer) = pebble.resolve_a(HOST) {
        assert!(answer.is_empty(), "{answer:?}");
    }
    let challtestsrv = pebble.challtestsrv_log();
    assert!(
        challtestsrv.contains("Added response for DNS A queries to \"app.example.com\""),
        "{challtestsrv}"
    );

    // The issuing chain: a root, and the intermediate it signed.
    let first = pebble.issuing_roots();
    let (root_subject, root_issuer, root_is_ca) = names(&first.root);
    let (_, intermediate_issuer, intermediate_is_ca) = names(&first.intermediate);
    assert!(root_is_ca && intermediate_is_ca);
    assert_eq!(root_subject, root_issuer, "the root is self-signed");
    assert_eq!(intermediate_issuer, root_subject);

    // The CA is down, then back with a new issuing chain; records and the listener's CA stay.
    pebble.set_a(HOST, &[EDGE_A]);
    pebble.stop();
    assert!(!pebble.is_running());
    let down = pebble.https("GET", &pebble.directory_url(), None);
    assert!(down.is_err(), "a stopped Pebble answered: {down:?}");
    pebble.start_again();
    assert!(pebble.is_running());
    let (status, _) = pebble.https("GET", &pebble.directory_url(), None).unwrap();
    assert_eq!(status, 200);
    let second = pebble.issuing_roots();
    assert_ne!(second.root, first.root, "a new root after a restart");
    assert_ne!(second.intermediate, first.intermediate);
    assert_eq!(pebble.validation_address(HOST), Some(EDGE_A));
    if let Some(answer) = pebble.resolve_a(HOST) {
        assert_eq!(answer, [EDGE_A], "challtestsrv kept its records");
    }
    assert!(pebble.logs().contains(&log), "the first run's log is kept");
    assert!(!pebble.log().contains(&log));
}
