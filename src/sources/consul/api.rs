//! Consul's JSON, as the HTTP API documents it (unknown fields ignored; Go's `null` for an
//! empty list read as empty), and the rules of its blocking queries. Lists are decoded record
//! by record: an instance, a check or a catalog entry that does not decode is dropped with
//! its reason, never the whole answer.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::sources::nullable;
use crate::sources::records::{decode_record, quoted, Record, Records};

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

/// `/v1/catalog/services`: service name -> union of its tags, in name order.
pub type CatalogServices = Records<(String, Option<Vec<String>>)>;

/// What names a record that does not decode, each part read where it can be.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct EntryName {
    #[serde(default)]
    node: Option<Lenient<NodeName>>,
    #[serde(default)]
    service: Option<Lenient<InstanceId>>,
}

#[derive(Deserialize)]
struct NodeName {
    #[serde(rename = "Node")]
    node: Lenient<String>,
}

#[derive(Deserialize)]
struct InstanceId {
    #[serde(rename = "ID")]
    id: Lenient<String>,
}

/// A value read if it has the expected shape, else nothing (and no error).
struct Lenient<T>(Option<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Lenient<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = <&RawValue>::deserialize(deserializer)?;
        Ok(Lenient(serde_json::from_str(raw.get()).ok()))
    }
}

/// `"shop-1" on node "n1"`, from whichever of the two can be read.
fn instance_name(id: Option<String>, node: Option<String>) -> Option<String> {
    match (id, node) {
        (Some(id), Some(node)) => Some(format!("{} on node {}", quoted(&id), quoted(&node))),
        (Some(id), None) => Some(quoted(&id)),
        (None, Some(node)) => Some(format!("on node {}", quoted(&node))),
        (None, None) => None,
    }
}

impl Record for HealthEntry {
    fn name(raw: &str) -> Option<String> {
        let name: EntryName = serde_json::from_str(raw).ok()?;
        instance_name(
            name.service.and_then(|s| s.0).and_then(|s| s.id.0),
            name.node.and_then(|n| n.0).and_then(|n| n.node.0),
        )
    }
}

impl Record for StateCheck {
    fn name(raw: &str) -> Option<String> {
        #[derive(Deserialize)]
        struct CheckName {
            #[serde(default, rename = "CheckID")]
            check_id: Option<Lenient<String>>,
            #[serde(default, rename = "Node")]
            node: Option<Lenient<String>>,
        }
        let name: CheckName = serde_json::from_str(raw).ok()?;
        instance_name(name.check_id.and_then(|c| c.0), name.node.and_then(|n| n.0))
    }
}

/// The instances of `/v1/health/service/:service`; one that does not decode is among the
/// `dropped`. Only an answer that is not a JSON array fails.
pub fn decode_health(body: &[u8]) -> Result<Records<HealthEntry>, String> {
    serde_json::from_slice(body).map_err(|e| e.to_string())
}

/// The catalog; a service whose tags do not decode is among the `dropped`. Only an answer that
/// is not a JSON object fails.
pub fn decode_catalog(body: &[u8]) -> Result<CatalogServices, String> {
    // Names and raw values borrowed from the answer; each service's tags decoded alone.
    let raw: BTreeMap<String, &RawValue> =
        serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let mut catalog = CatalogServices::default();
    for (name, tags) in raw {
        let decoded = decode_record(tags.get()).map(|tags| (name.clone(), tags));
        catalog.push(decoded, || Some(quoted(&name)));
    }
    Ok(catalog)
}

/// Every check; one that does not decode is among the `dropped`.
pub fn decode_state(body: &[u8]) -> Result<Records<StateCheck>, String> {
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
        let entries = decode_health(&fixture("health-service-redis.docs.json"))
            .unwrap()
            .records;
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
        let entries = decode_health(body).unwrap().records;
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
        let entries = decode_health(body).unwrap().records;
        assert!(entries[0].checks.is_empty());
        assert!(entries[0].service.address.is_empty());
        let state = decode_state(
            br#"[{"Node":"n1","CheckID":"serfHealth","Name":"Serf","Status":"passing",
                  "ServiceID":null,"ServiceName":null,"ServiceTags":null,"Output":"ok"}]"#,
        )
        .unwrap()
        .records;
        assert_eq!(state[0].service_name, "");
    }

    #[test]
    fn decodes_the_catalog_fixture() {
        let catalog = decode_catalog(&fixture("catalog-services.docs.json")).unwrap();
        assert_eq!(catalog.records.len(), 3);
        let postgresql = catalog.records.iter().find(|(n, _)| n == "postgresql");
        assert_eq!(
            postgresql.unwrap().1.as_deref(),
            Some(&["primary".to_string(), "secondary".to_string()][..])
        );
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(decode_health(b"[{\"Node\":").is_err());
        assert!(decode_catalog(b"<html>").is_err());
        assert!(decode_state(b"{}").is_err());
        assert!(decode_health(br#"{"Node":{}}"#).is_err());
        assert!(decode_catalog(b"[]").is_err());
    }

    fn instance(id: &str, node: &str, port: &str) -> String {
        format!(
            r#"{{"Node":{{"Node":"{node}","Address":"10.2.0.3"}},
                "Service":{{"ID":"{id}","Service":"shop","Address":"10.2.1.5","Port":{port}}},
                "Checks":[]}}"#
        )
    }

    /// One bad instance among good ones: the good ones decode, the bad one is named by its
    /// ID and node, with the field and why.
    fn one_bad_instance(port: &str) -> Records<HealthEntry> {
        let body = format!(
            "[{},{},{}]",
            instance("shop-1", "n1", "8080"),
            instance("shop-2", "n2", port),
            instance("shop-3", "n3", "8080")
        );
        decode_health(body.as_bytes()).unwrap()
    }

    #[test]
    fn an_instance_with_port_minus_one_is_dropped_alone() {
        let entries = one_bad_instance("-1");
        let ids: Vec<&str> = entries
            .records
            .iter()
            .map(|e| e.service.id.as_str())
            .collect();
        assert_eq!(ids, ["shop-1", "shop-3"]);
        assert_eq!(entries.dropped.len(), 1);
        let dropped = &entries.dropped[0];
        assert_eq!(
            dropped.subject("instance"),
            "instance \"shop-2\" on node \"n2\""
        );
        assert_eq!(
            dropped.reason,
            "Service.Port: invalid value: integer `-1`, expected u32"
        );
    }

    #[test]
    fn an_instance_with_a_port_as_text_is_dropped_alone() {
        let entries = one_bad_instance(r#""8080""#);
        assert_eq!(entries.records.len(), 2);
        let dropped = &entries.dropped[0];
        assert_eq!(
            dropped.subject("instance"),
            "instance \"shop-2\" on node \"n2\""
        );
        assert_eq!(
            dropped.reason,
            "Service.Port: invalid type: string \"8080\", expected u32"
        );
    }

    #[test]
    fn an_instance_is_named_by_what_of_it_can_be_read() {
        let body = br#"[{"Node":{"Node":"n1"},"Service":{"ID":7,"Port":1}},
                        {"Node":5,"Service":{"ID":"b","Port":"x"}},
                        {"Service":null}]"#;
        let entries = decode_health(body).unwrap();
        let subjects: Vec<String> = entries
            .dropped
            .iter()
            .map(|d| d.subject("instance"))
            .collect();
        assert_eq!(
            subjects,
            ["instance on node \"n1\"", "instance \"b\"", "instance #3"]
        );
    }

    #[test]
    fn a_catalog_entry_or_a_check_that_does_not_decode_is_dropped_alone() {
        let catalog =
            decode_catalog(br#"{"shop":["weft.host=shop.test"],"bad":[1],"db":null}"#).unwrap();
        let names: Vec<&str> = catalog.records.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["db", "shop"]);
        assert_eq!(catalog.dropped[0].subject("service"), "service \"bad\"");
        assert_eq!(
            catalog.dropped[0].reason,
            "[0]: invalid type: integer `1`, expected a string"
        );
        let state = decode_state(
            br#"[{"Node":"n1","CheckID":"serfHealth","Status":"passing"},
                 {"Node":"n1","CheckID":"service:x","Status":7}]"#,
        )
        .unwrap();
        assert_eq!(state.records.len(), 1);
        assert_eq!(
            state.dropped[0].subject("check"),
            "check \"service:x\" on node \"n1\""
        );
    }
}
