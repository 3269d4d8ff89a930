//! The JSON a Consul agent writes for the catalog, the KV store and the sessions: what each
//! endpoint answers, in Consul's order, with every object's CreateIndex/ModifyIndex.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use serde::Serialize;

use super::kv::KvEntry;
use super::session::SessionEntry;
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
        } => Json(health_json(state, name, *passing, tags)).into_response(),
        Endpoint::State { state: wanted } => Json(checks_in_state(state, wanted)).into_response(),
        Endpoint::KvGet { key, raw } => match state.kv.entries.get(key) {
            None => not_found(),
            // `KVSGet` with `?raw`: the value alone, with headers that stop a browser from
            // running it.
            Some(entry) if *raw => (
                [
                    (header::CONTENT_TYPE, "text/plain"),
                    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
                    (header::CONTENT_SECURITY_POLICY, "sandbox"),
                ],
                entry.value.clone(),
            )
                .into_response(),
            Some(entry) => Json([KvJson::new(entry)]).into_response(),
        },
        Endpoint::KvList { prefix } => {
            let entries: Vec<KvJson> = state.kv.under(prefix).map(KvJson::new).collect();
            if entries.is_empty() {
                return not_found();
            }
            Json(entries).into_response()
        }
        Endpoint::KvKeys { prefix, separator } => {
            let keys = kv_keys(state.kv.under(prefix), prefix, separator);
            kv_keys_answer(keys, prefix)
        }
        // `SessionGet`, `SessionList`, `SessionsForNode`: a list, `[]` for nothing.
        Endpoint::SessionInfo { id } => {
            let session = state.sessions.get(id).map(SessionJson::new);
            Json(Vec::from_iter(session)).into_response()
        }
        Endpoint::SessionList => Json(
            state
                .sessions
                .all()
                .map(SessionJson::new)
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Endpoint::SessionNode { node } => {
            let sessions = state.sessions.on_node(node).map(SessionJson::new);
            Json(sessions.collect::<Vec<_>>()).into_response()
        }
    }
}

/// What the anonymous token (no read rights) gets: nothing, as a normal answer; and whether
/// ACLs took something away (`X-Consul-Results-Filtered-By-ACLs`).
pub(super) fn render_filtered(state: &State, endpoint: &Endpoint) -> (Response, bool) {
    match endpoint {
        Endpoint::Catalog => (
            Json(BTreeMap::<String, Vec<String>>::new()).into_response(),
            true,
        ),
        Endpoint::Health { .. } | Endpoint::State { .. } => {
            (Json(Vec::<()>::new()).into_response(), true)
        }
        // Refused before it gets here (`KVS.Get` answers Permission denied).
        Endpoint::KvGet { .. } => (
            (StatusCode::FORBIDDEN, "Permission denied").into_response(),
            false,
        ),
        // `FilterDirEnt` leaves nothing, and an empty list is a 404.
        Endpoint::KvList { prefix } => (not_found(), state.kv.under(prefix).next().is_some()),
        Endpoint::KvKeys { prefix, .. } => (
            kv_keys_answer(Vec::new(), prefix),
            state.kv.under(prefix).next().is_some(),
        ),
        // `filterACLWithAuthorizer` leaves no session without `session:read` on its node.
        Endpoint::SessionInfo { id } => (
            Json(Vec::<()>::new()).into_response(),
            state.sessions.get(id).is_some(),
        ),
        Endpoint::SessionList => (
            Json(Vec::<()>::new()).into_response(),
            state.sessions.len() > 0,
        ),
        Endpoint::SessionNode { node } => (
            Json(Vec::<()>::new()).into_response(),
            state.sessions.on_node(node).next().is_some(),
        ),
    }
}

/// Consul's 404 of the KV store: no body at all.
fn not_found() -> Response {
    StatusCode::NOT_FOUND.into_response()
}

/// `KVSGetKeys`: an empty list is a 404, except at the root, where it is `[]`.
fn kv_keys_answer(keys: Vec<String>, prefix: &str) -> Response {
    if keys.is_empty() && !prefix.is_empty() {
        return not_found();
    }
    Json(keys).into_response()
}

/// `KVS.ListKeys`: every key, or, with a separator, each key cut after the first separator
/// past the prefix (once per distinct result), in key order.
fn kv_keys<'a>(
    entries: impl Iterator<Item = &'a KvEntry>,
    prefix: &str,
    separator: &str,
) -> Vec<String> {
    let mut keys = Vec::new();
    let mut seen = BTreeSet::new();
    for entry in entries {
        if separator.is_empty() {
            keys.push(entry.key.clone());
            continue;
        }
        let after = &entry.key[prefix.len()..];
        match after.find(separator) {
            Some(at) => {
                let key = &entry.key[..prefix.len() + at + separator.len()];
                if seen.insert(key.to_string()) {
                    keys.push(key.to_string());
                }
            }
            None => keys.push(entry.key.clone()),
        }
    }
    keys
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

/// The health entries, each instance with a raw entry set by a test served as that JSON.
fn health_json(
    state: &State,
    name: &str,
    passing: bool,
    tags: &[String],
) -> Vec<serde_json::Value> {
    health(state, name, passing, tags)
        .into_iter()
        .map(
            |entry| match state.raw_health_entries.get(&entry.service.id) {
                Some(raw) => raw.clone(),
                None => serde_json::to_value(entry).expect("a health entry is JSON"),
            },
        )
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

/// `structs.DirEntry`: `Value` is base64, `null` for an empty value; `Session` only on a
/// locked key (`omitempty`).
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct KvJson {
    lock_index: u64,
    key: String,
    flags: u64,
    value: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    session: Option<String>,
    create_index: u64,
    modify_index: u64,
}

impl KvJson {
    pub(super) fn new(entry: &KvEntry) -> KvJson {
        KvJson {
            lock_index: entry.lock_index,
            key: entry.key.clone(),
            flags: entry.flags,
            value: (!entry.value.is_empty())
                .then(|| base64::engine::general_purpose::STANDARD.encode(&entry.value)),
            session: entry.session.clone(),
            create_index: entry.create_index,
            modify_index: entry.modify_index,
        }
    }
}

/// `structs.Session`, as the session endpoints write it: `LockDelay` in nanoseconds, nil slices
/// as `null`, the deprecated `Checks` only when not empty (`omitempty`), nothing of the
/// (Enterprise) `EnterpriseMeta`.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct SessionJson {
    #[serde(rename = "ID")]
    id: String,
    name: String,
    node: String,
    lock_delay: i64,
    behavior: &'static str,
    #[serde(rename = "TTL")]
    ttl: String,
    node_checks: Option<Vec<String>>,
    service_checks: Option<Vec<ServiceCheckJson>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    checks: Vec<String>,
    create_index: u64,
    modify_index: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct ServiceCheckJson {
    #[serde(rename = "ID")]
    id: String,
    namespace: String,
}

impl SessionJson {
    pub(super) fn new(session: &SessionEntry) -> SessionJson {
        SessionJson {
            id: session.id.clone(),
            name: session.name.clone(),
            node: session.node.clone(),
            lock_delay: session.lock_delay,
            behavior: session.behavior.as_str(),
            ttl: session.ttl.clone(),
            node_checks: session.node_checks.clone(),
            service_checks: session.service_checks.as_ref().map(|checks| {
                checks
                    .iter()
                    .map(|check| ServiceCheckJson {
                        id: check.id.clone(),
                        namespace: check.namespace.clone(),
                    })
                    .collect()
            }),
            checks: session.checks.clone().unwrap_or_default(),
            create_index: session.create_index,
            modify_index: session.modify_index,
        }
    }
}

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
