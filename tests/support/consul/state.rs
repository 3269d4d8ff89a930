//! The catalog the double serves: nodes, instances and their checks, the raft-like indexes, and
//! the JSON a Consul agent writes for them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard, PoisonError};

use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use tokio::sync::watch;

use super::{Fault, Instance, Requests, Status, DATACENTER, DEFAULT_NODE_ADDRESS};

pub(super) struct Shared {
    pub(super) state: Mutex<State>,
    /// The index of the last write; blocked queries wait for it to change.
    pub(super) changes: watch::Sender<u64>,
}

impl Shared {
    /// A test that panics while holding the lock must not take every later request with it.
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// One raft write: `change` gets the new index; blocked queries are woken afterwards. An
    /// `Err` (a test naming something unknown) fails the test, outside the lock.
    pub(super) fn write(&self, change: impl FnOnce(&mut State, u64) -> Result<(), String>) {
        let mut state = self.lock();
        let index = state.index + 1;
        let result = change(&mut state, index);
        if result.is_ok() {
            state.index = index;
        }
        drop(state);
        match result {
            Ok(()) => {
                self.changes.send_replace(index);
            }
            Err(message) => panic!("consul double: {message}"),
        }
    }
}

pub(super) struct State {
    pub(super) index: u64,
    /// The last write to the service catalog (what `/v1/catalog/services` reports).
    pub(super) catalog_index: u64,
    pub(super) bumped_index: u64,
    pub(super) nodes: BTreeMap<String, NodeState>,
    /// By service ID: the double keeps IDs unique across nodes.
    pub(super) instances: BTreeMap<String, InstanceState>,
    /// Service name -> index of its last deregistration.
    pub(super) deregistered: BTreeMap<String, u64>,
    pub(super) token: Option<String>,
    pub(super) fault: Fault,
    /// Subtracted from every reported index while `Fault::IndexBackwards` lasts.
    pub(super) index_offset: u64,
    pub(super) requests: Requests,
    pub(super) last_query: BTreeMap<String, String>,
    pub(super) blocked: BTreeMap<String, usize>,
}

pub(super) struct NodeState {
    pub(super) id: String,
    pub(super) address: String,
    pub(super) meta: BTreeMap<String, String>,
    pub(super) create_index: u64,
    pub(super) modify_index: u64,
    pub(super) serf: CheckState,
}

pub(super) struct InstanceState {
    pub(super) spec: Instance,
    pub(super) create_index: u64,
    pub(super) modify_index: u64,
    pub(super) check: Option<CheckState>,
}

pub(super) struct CheckState {
    pub(super) status: Status,
    pub(super) output: String,
    pub(super) create_index: u64,
    pub(super) modify_index: u64,
}

impl State {
    pub(super) fn new() -> State {
        State {
            index: 1,
            catalog_index: 1,
            bumped_index: 0,
            nodes: BTreeMap::new(),
            instances: BTreeMap::new(),
            deregistered: BTreeMap::new(),
            token: None,
            fault: Fault::None,
            index_offset: 0,
            requests: Requests::default(),
            last_query: BTreeMap::new(),
            blocked: BTreeMap::new(),
        }
    }

    pub(super) fn ensure_node(&mut self, name: &str, index: u64) {
        let number = self.nodes.len() + 1;
        self.nodes
            .entry(name.to_string())
            .or_insert_with(|| NodeState {
                id: format!("{number:08x}-0000-4000-8000-{number:012x}"),
                address: DEFAULT_NODE_ADDRESS.to_string(),
                meta: BTreeMap::new(),
                create_index: index,
                modify_index: index,
                serf: CheckState {
                    status: Status::Passing,
                    output: "Agent alive and reachable".to_string(),
                    create_index: index,
                    modify_index: index,
                },
            });
    }

    pub(super) fn node_mut(&mut self, node: &str) -> Result<&mut NodeState, String> {
        self.nodes
            .get_mut(node)
            .ok_or_else(|| format!("no node {node:?}"))
    }

    pub(super) fn check_mut(&mut self, service_id: &str) -> Result<&mut CheckState, String> {
        self.instances
            .get_mut(service_id)
            .ok_or_else(|| format!("no service instance {service_id:?}"))?
            .check
            .as_mut()
            .ok_or_else(|| format!("service instance {service_id:?} has no check"))
    }

    pub(super) fn endpoint_index(&self, endpoint: &Endpoint) -> u64 {
        let index = match endpoint {
            Endpoint::Catalog => self.catalog_index,
            Endpoint::Health { name, .. } => {
                let mut index = self
                    .bumped_index
                    .max(self.deregistered.get(name).copied().unwrap_or(0));
                for instance in self.instances.values().filter(|i| &i.spec.service == name) {
                    index = index
                        .max(instance.modify_index)
                        .max(instance.check.as_ref().map_or(0, |c| c.modify_index));
                    if let Some(node) = self.nodes.get(&instance.spec.node) {
                        index = index.max(node.modify_index).max(node.serf.modify_index);
                    }
                }
                index
            }
        };
        index.max(1)
    }

    /// What a client sees of `index` (lowered while `Fault::IndexBackwards` lasts).
    pub(super) fn reported(&self, index: u64) -> u64 {
        index.saturating_sub(self.index_offset).max(1)
    }

    /// What the anonymous token (no read rights) gets: nothing, as a normal answer.
    pub(super) fn render_filtered(&self, endpoint: &Endpoint) -> Response {
        match endpoint {
            Endpoint::Catalog => Json(BTreeMap::<String, Vec<String>>::new()).into_response(),
            Endpoint::Health { .. } => Json(Vec::<()>::new()).into_response(),
        }
    }

    pub(super) fn render(&self, endpoint: &Endpoint) -> Response {
        match endpoint {
            Endpoint::Catalog => Json(self.catalog()).into_response(),
            Endpoint::Health {
                name,
                passing,
                tags,
            } => Json(self.health(name, *passing, tags)).into_response(),
        }
    }

    fn catalog(&self) -> BTreeMap<String, Vec<String>> {
        let mut services: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        services.insert("consul".to_string(), BTreeSet::new());
        for instance in self.instances.values() {
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

    fn health(&self, name: &str, passing: bool, tags: &[String]) -> Vec<HealthEntry> {
        let mut instances: Vec<&InstanceState> = self
            .instances
            .values()
            .filter(|i| i.spec.service == name)
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
                let node = self.nodes.get(&instance.spec.node)?;
                Some(health_entry(&instance.spec.node, node, instance))
            })
            .filter(|entry| !passing || entry.checks.iter().all(|c| c.status == "passing"))
            .collect()
    }
}

/// What a request reads.
pub(super) enum Endpoint {
    Catalog,
    Health {
        name: String,
        passing: bool,
        tags: Vec<String>,
    },
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
    let mut checks = vec![CheckJson::new(
        node_name,
        "serfHealth".to_string(),
        "Serf Health Status".to_string(),
        &node.serf,
        None,
    )];
    if let Some(check) = &instance.check {
        checks.push(CheckJson::new(
            node_name,
            format!("service:{}", spec.id),
            format!("Service '{}' check", spec.service),
            check,
            Some(spec),
        ));
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
