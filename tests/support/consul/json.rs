//! The JSON a Consul agent writes for the catalog: what each endpoint answers, in Consul's
//! order, with every object's CreateIndex/ModifyIndex.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use super::state::{CheckState, Endpoint, InstanceState, NodeState, State};
use super::{Instance, DATACENTER};

/// The answer to a request that passed every check.
pub(super) fn render(state: &State, endpoint: &Endpoint) -> Response {
    match endpoint {
        Endpoint::Catalog => Json(catalog(state)).into_response(),
        Endpoint::Health {
            name,
            passing,
            tags,
        } => Json(health(state, name, *passing, tags)).into_response(),
        Endpoint::State { state: wanted } => Json(checks_in_state(state, wanted)).into_response(),
    }
}

/// What the anonymous token (no read rights) gets: nothing, as a normal answer.
pub(super) fn render_filtered(endpoint: &Endpoint) -> Response {
    match endpoint {
        Endpoint::Catalog => Json(BTreeMap::<String, Vec<String>>::new()).into_response(),
        Endpoint::Health { .. } | Endpoint::State { .. } => Json(Vec::<()>::new()).into_response(),
    }
}

fn catalog(state: &State) -> BTreeMap<String, Vec<String>> {
    let mut services: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    services.insert("consul".to_string(), BTreeSet::new());
    for instance in state.instances.values() {
        services
            .entry(instance.spec.service.clone())
            .or_default()
            .extend(instance.spec.tags.iter().cloned());
    }
    services
        .into_iter()
        .map(|(name, tags)| (name, tags.into_iter().collect()))
        .collect()
}

fn health(state: &State, name: &str, passing: bool, tags: &[String]) -> Vec<HealthEntry> {
    let mut instances: Vec<&InstanceState> = state
        .instances_of(name)
        .filter(|i| {
            tags.iter().all(|wanted| {
                let wanted = wanted.to_lowercase();
                i.spec.tags.iter().any(|tag| tag.to_lowercase() == wanted)
            })
        })
        .collect();
    instances.sort_by(|a, b| (&a.spec.node, &a.spec.id).cmp(&(&b.spec.node, &b.spec.id)));
    instances
        .into_iter()
        .filter_map(|instance| {
            let node = state.nodes.get(&instance.spec.node)?;
            Some(health_entry(&instance.spec.node, node, instance))
        })
        .filter(|entry| !passing || entry.checks.iter().all(|c| c.status == "passing"))
        .collect()
}

/// `ChecksInState`: every check for `any`, else those whose status is `wanted` (Consul's status
/// index is case-insensitive; an unknown state matches nothing, it is not an error). In the
/// order of Consul's checks table: by node, then check ID, both without case.
fn checks_in_state(state: &State, wanted: &str) -> Vec<CheckJson> {
    let wanted = (wanted != "any").then(|| wanted.to_lowercase());
    let node_checks = state
        .nodes
        .iter()
        .map(|(name, node)| serf_check(name, node));
    let service_checks = state.instances.values().filter_map(|instance| {
        let check = instance.check.as_ref()?;
        Some(service_check(&instance.spec, check))
    });
    let mut checks: Vec<CheckJson> = node_checks
        .chain(service_checks)
        .filter(|check| {
            wanted
                .as_deref()
                .map_or(true, |wanted| check.status == wanted)
        })
        .collect();
    checks.sort_by_cached_key(|c| (c.node.to_lowercase(), c.check_id.to_lowercase()));
    checks
}

// Serde mirrors of Consul's JSON, fields in the order real agents write them.

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct HealthEntry {
    node: NodeJson,
    service: ServiceJson,
    checks: Vec<CheckJson>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct NodeJson {
    #[serde(rename = "ID")]
    id: String,
    node: String,
    address: String,
    datacenter: String,
    tagged_addresses: BTreeMap<String, String>,
    meta: BTreeMap<String, String>,
    create_index: u64,
    modify_index: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct ServiceJson {
    #[serde(rename = "ID")]
    id: String,
    service: String,
    tags: Vec<String>,
    address: String,
    /// Omitted when empty, as Go's `omitempty` does (an instance without an address).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    tagged_addresses: BTreeMap<String, ServiceAddressJson>,
    /// `null` for an instance registered without meta: a Go nil map, as real agents write it.
    meta: Option<BTreeMap<String, String>>,
    port: u16,
    weights: WeightsJson,
    enable_tag_override: bool,
    proxy: ProxyJson,
    connect: EmptyJson,
    namespace: String,
    create_index: u64,
    modify_index: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct ServiceAddressJson {
    address: String,
    port: u16,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct WeightsJson {
    passing: u32,
    warning: u32,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct ProxyJson {
    mode: String,
    mesh_gateway: EmptyJson,
    expose: EmptyJson,
}

#[derive(Serialize)]
struct EmptyJson {}

/// `structs.HealthCheck`, as `/v1/health/service/:name` (in `Checks`) and
/// `/v1/health/state/:state` write it.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct CheckJson {
    node: String,
    #[serde(rename = "CheckID")]
    check_id: String,
    name: String,
    status: &'static str,
    notes: String,
    output: String,
    #[serde(rename = "ServiceID")]
    service_id: String,
    service_name: String,
    service_tags: Vec<String>,
    #[serde(rename = "Type")]
    kind: String,
    interval: String,
    timeout: String,
    exposed_port: u16,
    definition: EmptyJson,
    namespace: String,
    create_index: u64,
    modify_index: u64,
}

impl CheckJson {
    /// A node check without `service`, a TTL service check with it.
    fn new(
        node: &str,
        check_id: String,
        name: String,
        check: &CheckState,
        service: Option<&Instance>,
    ) -> CheckJson {
        CheckJson {
            node: node.to_string(),
            check_id,
            name,
            status: check.status.as_str(),
            notes: String::new(),
            output: check.output.clone(),
            service_id: service.map(|s| s.id.clone()).unwrap_or_default(),
            service_name: service.map(|s| s.service.clone()).unwrap_or_default(),
            service_tags: service.map(|s| s.tags.clone()).unwrap_or_default(),
            kind: if service.is_some() { "ttl" } else { "" }.to_string(),
            interval: String::new(),
            timeout: String::new(),
            exposed_port: 0,
            definition: EmptyJson {},
            namespace: "default".to_string(),
            create_index: check.create_index,
            modify_index: check.modify_index,
        }
    }
}

fn serf_check(node_name: &str, node: &NodeState) -> CheckJson {
    let name = "Serf Health Status".to_string();
    CheckJson::new(node_name, "serfHealth".to_string(), name, &node.serf, None)
}

fn service_check(spec: &Instance, check: &CheckState) -> CheckJson {
    CheckJson::new(
        &spec.node,
        format!("service:{}", spec.id),
        format!("Service '{}' check", spec.service),
        check,
        Some(spec),
    )
}

fn health_entry(node_name: &str, node: &NodeState, instance: &InstanceState) -> HealthEntry {
    let spec = &instance.spec;
    let mut node_addresses = BTreeMap::new();
    let mut node_meta = BTreeMap::from([("consul-network-segment".to_string(), String::new())]);
    node_meta.extend(node.meta.clone());
    for (name, suffix) in [("lan", "lan_"), ("wan", "wan_")] {
        node_addresses.insert(name.to_string(), node.address.clone());
        if let Some(family) = ip_family(&node.address) {
            node_addresses.insert(format!("{suffix}{family}"), node.address.clone());
        }
    }
    // Agents add lan_ipv4/wan_ipv4 (or _ipv6) from the service address unless given.
    let mut service_addresses: BTreeMap<String, ServiceAddressJson> = BTreeMap::new();
    if let Some(family) = ip_family(&spec.address) {
        for name in ["lan", "wan"] {
            service_addresses.insert(
                format!("{name}_{family}"),
                ServiceAddressJson {
                    address: spec.address.clone(),
                    port: spec.port,
                },
            );
        }
    }
    for (name, (address, port)) in &spec.tagged_addresses {
        service_addresses.insert(
            name.clone(),
            ServiceAddressJson {
                address: address.clone(),
                port: *port,
            },
        );
    }
    // Node checks come first, as in Consul's parseCheckServiceNodes.
    let mut checks = vec![serf_check(node_name, node)];
    if let Some(check) = &instance.check {
        checks.push(service_check(spec, check));
    }
    HealthEntry {
        node: NodeJson {
            id: node.id.clone(),
            node: node_name.to_string(),
            address: node.address.clone(),
            datacenter: DATACENTER.to_string(),
            tagged_addresses: node_addresses,
            meta: node_meta,
            create_index: node.create_index,
            modify_index: node.modify_index,
        },
        service: ServiceJson {
            id: spec.id.clone(),
            service: spec.service.clone(),
            tags: spec.tags.clone(),
            address: spec.address.clone(),
            tagged_addresses: service_addresses,
            meta: Some(spec.meta.clone()).filter(|meta| !meta.is_empty()),
            port: spec.port,
            weights: WeightsJson {
                passing: 1,
                warning: 1,
            },
            enable_tag_override: false,
            proxy: ProxyJson {
                mode: String::new(),
                mesh_gateway: EmptyJson {},
                expose: EmptyJson {},
            },
            connect: EmptyJson {},
            namespace: "default".to_string(),
            create_index: instance.create_index,
            modify_index: instance.modify_index,
        },
        checks,
    }
}

fn ip_family(address: &str) -> Option<&'static str> {
    match address.parse::<IpAddr>() {
        Ok(IpAddr::V4(_)) => Some("ipv4"),
        Ok(IpAddr::V6(_)) => Some("ipv6"),
        Err(_) => None,
    }
}
