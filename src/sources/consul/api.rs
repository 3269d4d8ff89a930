//! Consul's JSON, as the HTTP API documents it (unknown fields ignored; Go's `null` for an
//! empty list read as empty), and the rules of its blocking queries.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use crate::sources::nullable;

/// Slack on top of wait * 17/16 before a blocking query counts as hung.
const TIMEOUT_SLACK: Duration = Duration::from_secs(5);

/// One entry of `/v1/health/service/:service`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct HealthEntry {
    pub node: HealthNode,
    pub service: HealthService,
    #[serde(default, deserialize_with = "nullable")]
    pub checks: Vec<HealthCheck>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct HealthNode {
    pub node: String,
    pub address: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct HealthService {
    #[serde(rename = "ID")]
    pub id: String,
    pub service: String,
    #[serde(default)]
    pub tags: Option<Vec<String>>,
    #[serde(default, deserialize_with = "nullable")]
    pub address: String,
    pub port: u32,
    /// The docs' sample writes `address`/`port` in lower case here, real agents `Address`/`Port`.
    #[serde(default)]
    pub tagged_addresses: Option<BTreeMap<String, TaggedAddress>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TaggedAddress {
    #[serde(alias = "address", rename = "Address")]
    pub address: String,
    #[serde(alias = "port", rename = "Port")]
    pub port: u32,
}

/// A check inside a health entry: the node's checks and the instance's own.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct HealthCheck {
    #[serde(rename = "CheckID")]
    pub check_id: String,
    pub status: String,
    #[serde(default, rename = "ServiceID", deserialize_with = "nullable")]
    pub service_id: String,
}

/// One check of `/v1/health/state/:state`: every node check (`ServiceName` empty) and every
/// service check of the catalog. Only what tells one state from the next is read (`Output`
/// and `Notes` change without changing anything weft routes).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "PascalCase")]
pub struct StateCheck {
    pub node: String,
    #[serde(rename = "CheckID")]
    pub check_id: String,
    pub status: String,
    #[serde(default, rename = "ServiceID", deserialize_with = "nullable")]
    pub service_id: String,
    #[serde(default, deserialize_with = "nullable")]
    pub service_name: String,
}

/// `/v1/catalog/services`: service name -> union of its tags.
pub type CatalogServices = BTreeMap<String, Option<Vec<String>>>;

pub fn decode_health(body: &[u8]) -> Result<Vec<HealthEntry>, String> {
    serde_json::from_slice(body).map_err(|e| e.to_string())
}

pub fn decode_catalog(body: &[u8]) -> Result<CatalogServices, String> {
    serde_json::from_slice(body).map_err(|e| e.to_string())
}

pub fn decode_state(body: &[u8]) -> Result<Vec<StateCheck>, String> {
    serde_json::from_slice(body).map_err(|e| e.to_string())
}

/// The index for the next query, from the previous one and the answer's `X-Consul-Index`.
///
/// Backwards (a server restored from a snapshot, a leader change) resets to 0: the next query
/// does not block and fetches a fresh index. An index of 0 is a Consul bug; blocking on it
/// would return at once, so it is treated as 1.
pub fn next_index(previous: u64, answer: Option<u64>) -> u64 {
    match answer {
        None => 0,
        Some(index) if index < previous => 0,
        Some(index) => index.max(1),
    }
}

/// Consul adds up to wait/16 of jitter to a blocking query: the client must wait longer.
pub fn client_timeout(wait: Duration) -> Duration {
    wait * 17 / 16 + TIMEOUT_SLACK
}

/// Consul's `wait` parameter: a Go duration in whole milliseconds.
pub fn wait_param(wait: Duration) -> String {
    format!("{}ms", wait.as_millis().max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        crate::sources::fixture(&format!("consul/{name}"))
    }

    #[test]
    fn index_rules() {
        // First answer, then blocking on it.
        assert_eq!(next_index(0, Some(42)), 42);
        assert_eq!(next_index(42, Some(42)), 42);
        assert_eq!(next_index(42, Some(43)), 43);
        // Backwards: reset, so the next query does not block.
        assert_eq!(next_index(42, Some(7)), 0);
        // Never block below 1.
        assert_eq!(next_index(0, Some(0)), 1);
        // No header: do not block.
        assert_eq!(next_index(42, None), 0);
    }

    #[test]
    fn client_timeout_exceeds_consul_jitter() {
        for wait in [
            Duration::from_secs(1),
            Duration::from_secs(300),
            Duration::from_secs(600),
        ] {
            assert!(client_timeout(wait) > wait * 17 / 16);
        }
        assert_eq!(
            client_timeout(Duration::from_secs(16)),
            Duration::from_secs(22)
        );
        assert_eq!(wait_param(Duration::from_secs(300)), "300000ms");
    }

    #[test]
    fn decodes_the_health_fixture() {
        let entries = decode_health(&fixture("health-service-redis.docs.json")).unwrap();
        assert_eq!(entries.len(), 1);
        let entry = &entries[0];
        assert_eq!(entry.node.node, "foobar");
        assert_eq!(entry.node.address, "10.1.10.12");
        assert_eq!(entry.service.id, "redis");
        assert_eq!(entry.service.port, 8000);
        assert_eq!(
            entry.service.tags.as_deref(),
            Some(&["primary".to_string()][..])
        );
        // Lower-case keys inside Service.TaggedAddresses, as the docs' sample writes them.
        let tagged = entry.service.tagged_addresses.as_ref().unwrap();
        assert_eq!(tagged["wan"].address, "198.18.1.2");
        assert_eq!(tagged["wan"].port, 80);
        assert_eq!(entry.checks.len(), 2);
        assert_eq!(entry.checks[1].check_id, "serfHealth");
    }

    #[test]
    fn decodes_upper_case_tagged_addresses_and_unknown_fields() {
        let body = br#"[{"Node":{"Node":"n1","Address":"10.2.0.3","NewField":{"x":1}},
            "Service":{"ID":"shop-1","Service":"shop","Tags":null,"Address":"","Port":8080,
              "TaggedAddresses":{"lan_ipv4":{"Address":"10.2.1.5","Port":8080}},
              "Weights":{"Passing":1,"Warning":1},"Locality":null},
            "Checks":[]}]"#;
        let entries = decode_health(body).unwrap();
        let tagged = entries[0].service.tagged_addresses.as_ref().unwrap();
        assert_eq!(tagged["lan_ipv4"].address, "10.2.1.5");
    }

    /// Go writes empty slices and maps as `null` (an agent's `"Meta": null`, a node without
    /// tagged addresses, an entry without checks, a node check's `ServiceID`).
    #[test]
    fn nulls_read_as_empty() {
        let body =
            br#"[{"Node":{"Node":"n1","Address":"10.2.0.3","TaggedAddresses":null,"Meta":null},
            "Service":{"ID":"shop-1","Service":"shop","Tags":null,"Address":null,"Port":8080,
              "Meta":null,"TaggedAddresses":null},
            "Checks":null}]"#;
        let entries = decode_health(body).unwrap();
        assert!(entries[0].checks.is_empty());
        assert!(entries[0].service.address.is_empty());
        let state = decode_state(
            br#"[{"Node":"n1","CheckID":"serfHealth","Name":"Serf","Status":"passing",
                  "ServiceID":null,"ServiceName":null,"ServiceTags":null,"Output":"ok"}]"#,
        )
        .unwrap();
        assert_eq!(state[0].service_name, "");
    }

    #[test]
    fn decodes_the_catalog_fixture() {
        let catalog = decode_catalog(&fixture("catalog-services.docs.json")).unwrap();
        assert_eq!(catalog.len(), 3);
        assert_eq!(
            catalog["postgresql"].as_deref(),
            Some(&["primary".to_string(), "secondary".to_string()][..])
        );
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(decode_health(b"[{\"Node\":").is_err());
        assert!(decode_catalog(b"<html>").is_err());
        assert!(decode_state(b"{}").is_err());
    }
}
