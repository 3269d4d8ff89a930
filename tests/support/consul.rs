//! A Consul HTTP API test double: `/v1/catalog/services` and `/v1/health/service/:name`, with
//! blocking queries, ACL tokens and injectable faults, on 127.0.0.1:0.
//!
//! It follows shared/reference/consul.md and the docs samples in shared/fixtures/consul/. Tests
//! change the catalog with plain methods (`register`, `set_check`, ...); every write raises one
//! raft-like index and wakes the blocked queries, as a Consul server does.
//!
//! ```text
//! test ── register / set_check / set_fault ──> State (Mutex) ── index ──> watch ──> blocked queries
//! client ── GET /v1/... ──> record ──> fault? params? token? ──> block ──> JSON + X-Consul-* headers
//! ```
//!
//! Dropping the double aborts its server and kills every open connection, blocked or stalled
//! queries included, so a client sees Consul go away as it would when the agent dies.

#![allow(dead_code, clippy::unwrap_used)]

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::hash::BuildHasher;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, Query, Request, State as AxumState};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

pub const DATACENTER: &str = "dc1";
pub const CATALOG_SERVICES: &str = "/v1/catalog/services";
pub const HEALTH_SERVICE: &str = "/v1/health/service/";

/// Consul's `defaultQueryTime` and `maxQueryTime`.
const DEFAULT_WAIT: Duration = Duration::from_secs(5 * 60);
const MAX_WAIT: Duration = Duration::from_secs(10 * 60);
/// Consul adds up to wait/16 of random jitter to every blocking query (`JitterFraction`).
const JITTER_FRACTION: u32 = 16;
/// The address of a node that `register` creates on its own: TEST-NET-1, never routable, so a
/// client that falls back to it by mistake cannot reach a loopback backend.
pub const DEFAULT_NODE_ADDRESS: &str = "192.0.2.10";
pub const DEFAULT_NODE: &str = "node1";

/// The status of a health check, as Consul spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Passing,
    Warning,
    Critical,
    Maintenance,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Passing => "passing",
            Status::Warning => "warning",
            Status::Critical => "critical",
            Status::Maintenance => "maintenance",
        }
    }
}

/// What goes wrong with every request until the next `set_fault`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    None,
    /// `500 No cluster leader`.
    NoLeader,
    /// `429 RPC rate limit exceeded`.
    RateLimited,
    /// The connection is accepted and the request read, but no answer ever comes.
    Stall,
    /// `200` with every usual header and a truncated JSON body.
    Garbage,
    /// Answers carry an `X-Consul-Index` lower than before, as after a snapshot restore; the
    /// lower numbering is consistent (a blocking query on it blocks) until the fault is cleared.
    IndexBackwards,
}

/// One service instance, registered with `ConsulDouble::register`.
///
/// `address` stays a string: Consul's `Service.Address` may be empty (use the node's address),
/// an IP or a host name, and the double must hand out exactly what a registrator wrote.
#[derive(Clone, Debug)]
pub struct Instance {
    pub service: String,
    pub id: String,
    pub address: String,
    pub port: u16,
    pub tags: Vec<String>,
    pub meta: BTreeMap<String, String>,
    pub node: String,
    /// Extra `Service.TaggedAddresses`; `lan_ipv4`/`wan_ipv4` (or `_ipv6`) are added from
    /// `address` like a real agent does.
    pub tagged_addresses: BTreeMap<String, (String, u16)>,
    /// The status of the instance's one service check (`service:<id>`); `None`: no check.
    pub check: Option<Status>,
    pub output: String,
}

impl Instance {
    /// A passing instance of `service` on node `node1`.
    pub fn new(service: &str, id: &str, address: &str, port: u16) -> Instance {
        Instance {
            service: service.to_string(),
            id: id.to_string(),
            address: address.to_string(),
            port,
            tags: Vec::new(),
            meta: BTreeMap::new(),
            node: DEFAULT_NODE.to_string(),
            tagged_addresses: BTreeMap::new(),
            check: Some(Status::Passing),
            output: String::new(),
        }
    }

    pub fn tag(mut self, tag: &str) -> Instance {
        self.tags.push(tag.to_string());
        self
    }

    pub fn meta(mut self, key: &str, value: &str) -> Instance {
        self.meta.insert(key.to_string(), value.to_string());
        self
    }

    /// The node the instance runs on; created with `DEFAULT_NODE_ADDRESS` if not registered.
    pub fn node(mut self, node: &str) -> Instance {
        self.node = node.to_string();
        self
    }

    pub fn tagged_address(mut self, name: &str, address: &str, port: u16) -> Instance {
        self.tagged_addresses
            .insert(name.to_string(), (address.to_string(), port));
        self
    }

    pub fn status(mut self, status: Status) -> Instance {
        self.check = Some(status);
        self
    }

    pub fn output(mut self, output: &str) -> Instance {
        self.output = output.to_string();
        self
    }

    /// No service check at all: the instance counts as passing, as in Consul.
    pub fn without_check(mut self) -> Instance {
        self.check = None;
        self
    }
}

/// How many requests the double received: all of them, and per URL path.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Requests {
    pub total: u64,
    pub by_path: BTreeMap<String, u64>,
}

impl Requests {
    /// Requests to `path`, e.g. `/v1/health/service/shop`.
    pub fn count(&self, path: &str) -> u64 {
        self.by_path.get(path).copied().unwrap_or(0)
    }
}

/// A running double; stopped when dropped.
pub struct ConsulDouble {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl ConsulDouble {
    /// Starts an empty catalog (the index is 1) on 127.0.0.1:0.
    pub async fn start() -> ConsulDouble {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (changes, _) = watch::channel(1);
        let shared = Arc::new(Shared {
            state: Mutex::new(State::new()),
            changes,
        });
        let app = Router::new()
            .route(CATALOG_SERVICES, get(catalog_services))
            .route("/v1/health/service/", get(health_service_unnamed))
            .route("/v1/health/service/{*name}", get(health_service))
            .fallback(|| async { (StatusCode::NOT_FOUND, "404 page not found") })
            .layer(axum::middleware::from_fn_with_state(shared.clone(), record))
            .with_state(shared.clone());
        let shutdown = CancellationToken::new();
        let listener = KillableListener {
            inner: listener,
            shutdown: shutdown.clone(),
        };
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        ConsulDouble {
            addr,
            shared,
            shutdown,
            task,
        }
    }

    /// `http://127.0.0.1:<port>`, without a trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The raft index of the last write.
    pub fn index(&self) -> u64 {
        self.shared.lock().index
    }

    /// Registers a node (or moves it to `address`), with a passing `serfHealth` check.
    pub fn register_node(&self, name: &str, address: &str) {
        self.shared.write(|state, index| {
            state.ensure_node(name, index);
            let node = state.nodes.get_mut(name).unwrap();
            node.address = address.to_string();
            node.modify_index = index;
            state.catalog_index = index;
            Ok(())
        });
    }

    pub fn set_node_meta(&self, node: &str, key: &str, value: &str) {
        self.shared.write(|state, index| {
            let node = state.node_mut(node)?;
            node.meta.insert(key.to_string(), value.to_string());
            node.modify_index = index;
            Ok(())
        });
    }

    /// Registers an instance, replacing one with the same ID (which keeps its CreateIndex).
    pub fn register(&self, instance: Instance) {
        self.shared.write(|state, index| {
            if !state.nodes.contains_key(&instance.node) {
                state.ensure_node(&instance.node, index);
            }
            let old = state.instances.remove(&instance.id);
            if let Some(old) = &old {
                if old.spec.service != instance.service {
                    state.deregistered.insert(old.spec.service.clone(), index);
                }
            }
            let create_index = old.as_ref().map_or(index, |old| old.create_index);
            let check = instance.check.map(|status| CheckState {
                status,
                output: instance.output.clone(),
                create_index: old
                    .as_ref()
                    .and_then(|old| old.check.as_ref())
                    .map_or(index, |check| check.create_index),
                modify_index: index,
            });
            state.instances.insert(
                instance.id.clone(),
                InstanceState {
                    spec: instance,
                    create_index,
                    modify_index: index,
                    check,
                },
            );
            state.catalog_index = index;
            Ok(())
        });
    }

    pub fn deregister(&self, service_id: &str) {
        self.shared.write(|state, index| {
            let Some(gone) = state.instances.remove(service_id) else {
                return Err(format!("no service instance {service_id:?} to deregister"));
            };
            state.deregistered.insert(gone.spec.service, index);
            state.catalog_index = index;
            Ok(())
        });
    }

    /// Sets the status of the instance's service check (a write even if it is unchanged).
    pub fn set_check(&self, service_id: &str, status: Status) {
        self.shared.write(|state, index| {
            let check = state.check_mut(service_id)?;
            check.status = status;
            check.modify_index = index;
            Ok(())
        });
    }

    /// Changes only the check's Output text: the index rises, nothing a router uses changes.
    pub fn set_check_output(&self, service_id: &str, output: &str) {
        self.shared.write(|state, index| {
            let check = state.check_mut(service_id)?;
            check.output = output.to_string();
            check.modify_index = index;
            Ok(())
        });
    }

    /// Sets the node's `serfHealth`: anything but passing hides all its instances from
    /// `?passing`.
    pub fn set_node_check(&self, node: &str, status: Status) {
        self.shared.write(|state, index| {
            let node = state.node_mut(node)?;
            node.serf.status = status;
            node.serf.modify_index = index;
            Ok(())
        });
    }

    /// A write that changes no content, such as an identical re-registration: every endpoint's
    /// index rises and every blocked query returns the same data again.
    pub fn bump_index(&self) {
        self.shared.write(|state, index| {
            state.bumped_index = index;
            state.catalog_index = index;
            Ok(())
        });
    }

    /// With `Some(token)`, requests need `X-Consul-Token: <token>` or
    /// `Authorization: Bearer <token>` (or the deprecated `?token=`), else 403.
    pub fn set_token(&self, token: Option<String>) {
        self.shared.lock().token = token;
    }

    pub fn set_fault(&self, fault: Fault) {
        let mut state = self.shared.lock();
        if fault == Fault::IndexBackwards && state.fault != Fault::IndexBackwards {
            state.index_offset = (state.index / 2).max(1);
        } else if fault != Fault::IndexBackwards {
            state.index_offset = 0;
        }
        state.fault = fault;
    }

    pub fn requests(&self) -> Requests {
        self.shared.lock().requests.clone()
    }

    /// The raw query string of the last request to `path` (`""` without one).
    pub fn last_query(&self, path: &str) -> Option<String> {
        self.shared.lock().last_query.get(path).cloned()
    }

    /// How many blocking queries on `path` are waiting right now.
    pub fn blocked_queries(&self, path: &str) -> usize {
        self.shared.lock().blocked.get(path).copied().unwrap_or(0)
    }

    /// Waits until at least `count` blocking queries wait on `path`; panics after 10 s.
    pub async fn wait_for_blocked_queries(&self, path: &str, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.blocked_queries(path) < count {
            assert!(
                Instant::now() < deadline,
                "{count} blocking queries on {path}: only {} after 10s",
                self.blocked_queries(path)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for ConsulDouble {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.task.abort();
    }
}

struct Shared {
    state: Mutex<State>,
    /// The index of the last write; blocked queries wait for it to change.
    changes: watch::Sender<u64>,
}

impl Shared {
    /// A test that panics while holding the lock must not take every later request with it.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// One raft write: `change` gets the new index; blocked queries are woken afterwards. An
    /// `Err` (a test naming something unknown) fails the test, outside the lock.
    fn write(&self, change: impl FnOnce(&mut State, u64) -> Result<(), String>) {
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

struct State {
    index: u64,
    /// The last write to the service catalog (what `/v1/catalog/services` reports).
    catalog_index: u64,
    bumped_index: u64,
    nodes: BTreeMap<String, NodeState>,
    /// By service ID: the double keeps IDs unique across nodes.
    instances: BTreeMap<String, InstanceState>,
    /// Service name -> index of its last deregistration.
    deregistered: BTreeMap<String, u64>,
    token: Option<String>,
    fault: Fault,
    /// Subtracted from every reported index while `Fault::IndexBackwards` lasts.
    index_offset: u64,
    requests: Requests,
    last_query: BTreeMap<String, String>,
    blocked: BTreeMap<String, usize>,
}

struct NodeState {
    id: String,
    address: String,
    meta: BTreeMap<String, String>,
    create_index: u64,
    modify_index: u64,
    serf: CheckState,
}

struct InstanceState {
    spec: Instance,
    create_index: u64,
    modify_index: u64,
    check: Option<CheckState>,
}

struct CheckState {
    status: Status,
    output: String,
    create_index: u64,
    modify_index: u64,
}

impl State {
    fn new() -> State {
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

    fn ensure_node(&mut self, name: &str, index: u64) {
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

    fn node_mut(&mut self, node: &str) -> Result<&mut NodeState, String> {
        self.nodes
            .get_mut(node)
            .ok_or_else(|| format!("no node {node:?}"))
    }

    fn check_mut(&mut self, service_id: &str) -> Result<&mut CheckState, String> {
        self.instances
            .get_mut(service_id)
            .ok_or_else(|| format!("no service instance {service_id:?}"))?
            .check
            .as_mut()
            .ok_or_else(|| format!("service instance {service_id:?} has no check"))
    }

    fn endpoint_index(&self, endpoint: &Endpoint) -> u64 {
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
    fn reported(&self, index: u64) -> u64 {
        index.saturating_sub(self.index_offset).max(1)
    }

    fn render(&self, endpoint: &Endpoint) -> Response {
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
enum Endpoint {
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
    meta: BTreeMap<String, String>,
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
            meta: spec.meta.clone(),
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

// HTTP side.

type SharedState = AxumState<Arc<Shared>>;
type Params = Query<Vec<(String, String)>>;

async fn record(AxumState(shared): SharedState, request: Request, next: Next) -> Response {
    {
        let mut state = shared.lock();
        let path = request.uri().path().to_string();
        state.requests.total += 1;
        *state.requests.by_path.entry(path.clone()).or_default() += 1;
        let query = request.uri().query().unwrap_or("").to_string();
        state.last_query.insert(path, query);
    }
    next.run(request).await
}

async fn catalog_services(
    AxumState(shared): SharedState,
    headers: HeaderMap,
    Query(params): Params,
) -> Response {
    answer(
        &shared,
        &headers,
        &params,
        CATALOG_SERVICES.to_string(),
        |_| Ok(Endpoint::Catalog),
    )
    .await
}

async fn health_service_unnamed(
    AxumState(shared): SharedState,
    headers: HeaderMap,
    Query(params): Params,
) -> Response {
    answer(
        &shared,
        &headers,
        &params,
        HEALTH_SERVICE.to_string(),
        |_| Err(Rejection(StatusCode::BAD_REQUEST, "Missing service name")),
    )
    .await
}

async fn health_service(
    AxumState(shared): SharedState,
    Path(name): Path<String>,
    headers: HeaderMap,
    Query(params): Params,
) -> Response {
    let path = format!("{HEALTH_SERVICE}{name}");
    answer(&shared, &headers, &params, path, |params| {
        let passing = match first(params, "passing") {
            None => false,
            Some("") => true,
            Some(value) => parse_go_bool(value).ok_or(Rejection(
                StatusCode::BAD_REQUEST,
                "Invalid value for ?passing",
            ))?,
        };
        let tags = params
            .iter()
            .filter(|(key, _)| key == "tag")
            .map(|(_, value)| value.clone())
            .collect();
        Ok(Endpoint::Health {
            name,
            passing,
            tags,
        })
    })
    .await
}

/// The part every endpoint shares: a stall, the checks in Consul's order, the blocking wait, the
/// answer.
async fn answer(
    shared: &Arc<Shared>,
    headers: &HeaderMap,
    params: &[(String, String)],
    path: String,
    endpoint: impl FnOnce(&[(String, String)]) -> Result<Endpoint, Rejection>,
) -> Response {
    if shared.lock().fault == Fault::Stall {
        std::future::pending::<()>().await;
    }
    let (options, endpoint) = match admit(shared, headers, params, endpoint) {
        Ok(admitted) => admitted,
        Err(rejection) => return rejection.into_response(),
    };
    block(shared, &endpoint, &path, &options).await;

    let (index, response, fault) = {
        let state = shared.lock();
        let index = state.reported(state.endpoint_index(&endpoint));
        (index, state.render(&endpoint), state.fault)
    };
    let mut response = with_consul_headers(response, index, options.consistency);
    if fault == Fault::Garbage {
        response = truncate_body(response).await;
    }
    response
}

/// Query options, the endpoint's own parameters, the ACL, then the RPC (faults, datacenter).
fn admit(
    shared: &Arc<Shared>,
    headers: &HeaderMap,
    params: &[(String, String)],
    endpoint: impl FnOnce(&[(String, String)]) -> Result<Endpoint, Rejection>,
) -> Result<(QueryOptions, Endpoint), Rejection> {
    let options = QueryOptions::parse(params)?;
    let endpoint = endpoint(params)?;
    let (fault, token) = {
        let state = shared.lock();
        (state.fault, state.token.clone())
    };
    if token.is_some_and(|token| !presents_token(headers, params, &token)) {
        return Err(Rejection(StatusCode::FORBIDDEN, "Permission denied"));
    }
    match fault {
        Fault::NoLeader => {
            return Err(Rejection(
                StatusCode::INTERNAL_SERVER_ERROR,
                "No cluster leader",
            ));
        }
        Fault::RateLimited => {
            return Err(Rejection(
                StatusCode::TOO_MANY_REQUESTS,
                "RPC rate limit exceeded",
            ));
        }
        Fault::None | Fault::Stall | Fault::Garbage | Fault::IndexBackwards => {}
    }
    if options
        .datacenter
        .as_deref()
        .is_some_and(|dc| dc != DATACENTER)
    {
        return Err(Rejection(
            StatusCode::INTERNAL_SERVER_ERROR,
            "No path to datacenter",
        ));
    }
    Ok((options, endpoint))
}

/// Waits while the endpoint's index is still `<= ?index`, up to `?wait` plus jitter.
async fn block(shared: &Arc<Shared>, endpoint: &Endpoint, path: &str, options: &QueryOptions) {
    if options.index == 0 {
        return;
    }
    // Subscribe before reading the state, so that no write can slip in between.
    let mut changes = shared.changes.subscribe();
    let min_index = options.index.saturating_add(shared.lock().index_offset);
    let deadline = tokio::time::Instant::now() + options.wait + jitter(options.wait);
    let _blocked = BlockedQuery::new(shared, path);
    while shared.lock().endpoint_index(endpoint) <= min_index {
        match tokio::time::timeout_at(deadline, changes.changed()).await {
            Ok(Ok(())) => {}
            // Wait elapsed (or the double is going away).
            Ok(Err(_)) | Err(_) => return,
        }
    }
}

/// Counts a waiting blocking query for `ConsulDouble::blocked_queries`, also when the client
/// goes away and the handler is dropped.
struct BlockedQuery {
    shared: Arc<Shared>,
    path: String,
}

impl BlockedQuery {
    fn new(shared: &Arc<Shared>, path: &str) -> BlockedQuery {
        *shared.lock().blocked.entry(path.to_string()).or_default() += 1;
        BlockedQuery {
            shared: shared.clone(),
            path: path.to_string(),
        }
    }
}

impl Drop for BlockedQuery {
    fn drop(&mut self) {
        if let Some(count) = self.shared.lock().blocked.get_mut(&self.path) {
            *count = count.saturating_sub(1);
        }
    }
}

fn jitter(wait: Duration) -> Duration {
    let max = u64::try_from(wait.as_nanos() / u128::from(JITTER_FRACTION)).unwrap_or(u64::MAX);
    if max == 0 {
        return Duration::ZERO;
    }
    let random = RandomState::new().hash_one(Instant::now());
    Duration::from_nanos(random % (max + 1))
}

#[derive(Clone, Copy)]
enum Consistency {
    Leader,
    Stale,
    Consistent,
}

struct QueryOptions {
    datacenter: Option<String>,
    consistency: Consistency,
    index: u64,
    wait: Duration,
}

impl QueryOptions {
    fn parse(params: &[(String, String)]) -> Result<QueryOptions, Rejection> {
        let has = |key: &str| params.iter().any(|(k, _)| k == key);
        let consistency = match (has("stale"), has("consistent")) {
            (true, true) => {
                return Err(Rejection(
                    StatusCode::BAD_REQUEST,
                    "Cannot specify ?stale with ?consistent, conflicting semantics.",
                ))
            }
            (true, false) => Consistency::Stale,
            (false, true) => Consistency::Consistent,
            (false, false) => Consistency::Leader,
        };
        let mut wait = DEFAULT_WAIT;
        if let Some(text_wait) = first(params, "wait").filter(|w| !w.is_empty()) {
            let nanos = parse_go_duration(text_wait)
                .ok_or(Rejection(StatusCode::BAD_REQUEST, "Invalid wait time"))?;
            // Consul clamps rather than rejects: above the max -> max, zero or less -> default.
            wait = match u64::try_from(nanos) {
                Ok(0) | Err(_) => DEFAULT_WAIT,
                Ok(nanos) => Duration::from_nanos(nanos).min(MAX_WAIT),
            };
        }
        let mut index = 0;
        if let Some(text_index) = first(params, "index").filter(|i| !i.is_empty()) {
            index = parse_go_uint(text_index)
                .ok_or(Rejection(StatusCode::BAD_REQUEST, "Invalid index"))?;
        }
        if has("filter") {
            // Silently ignoring it would let a client that relies on ?filter pass its tests.
            return Err(Rejection(
                StatusCode::BAD_REQUEST,
                "?filter is not implemented by the Consul test double",
            ));
        }
        Ok(QueryOptions {
            datacenter: first(params, "dc")
                .filter(|dc| !dc.is_empty())
                .map(str::to_string),
            consistency,
            index,
            wait,
        })
    }
}

fn first<'a>(params: &'a [(String, String)], key: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, value)| value.as_str())
}

fn presents_token(headers: &HeaderMap, params: &[(String, String)], token: &str) -> bool {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    header("x-consul-token") == Some(token)
        || header("authorization")
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|v| v.trim() == token)
        || first(params, "token") == Some(token)
}

/// An error answer. Its body is plain text, as Consul writes it.
struct Rejection(StatusCode, &'static str);

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        (self.0, self.1).into_response()
    }
}

fn with_consul_headers(mut response: Response, index: u64, consistency: Consistency) -> Response {
    let headers = response.headers_mut();
    headers.insert("x-consul-index", HeaderValue::from(index));
    headers.insert("x-consul-knownleader", HeaderValue::from_static("true"));
    headers.insert("x-consul-lastcontact", HeaderValue::from_static("0"));
    let consistency = match consistency {
        Consistency::Leader => "leader",
        Consistency::Stale => "stale",
        Consistency::Consistent => "consistent",
    };
    headers.insert(
        "x-consul-effective-consistency",
        HeaderValue::from_static(consistency),
    );
    response
}

/// Keeps the status and headers and cuts the JSON body in half: a prefix of a JSON array or
/// object never parses.
async fn truncate_body(response: Response) -> Response {
    let (mut parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    let cut = bytes.slice(..bytes.len() / 2);
    Response::from_parts(parts, Body::from(cut))
}

/// Go's `strconv.ParseBool`.
pub fn parse_go_bool(text: &str) -> Option<bool> {
    match text {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Go's `strconv.ParseUint(text, 10, 64)`: digits only, no sign, no spaces.
pub fn parse_go_uint(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Go's `time.ParseDuration`, in signed nanoseconds: `300ms`, `1.5h`, `1h2m3s`, `-5s`, `0`.
pub fn parse_go_duration(text: &str) -> Option<i128> {
    let (negative, mut rest) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    if rest == "0" {
        return Some(0);
    }
    if rest.is_empty() {
        return None;
    }
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let whole_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let (whole, after) = rest.split_at(whole_len);
        rest = after;
        let mut fraction = "";
        if let Some(after_dot) = rest.strip_prefix('.') {
            let fraction_len = after_dot.bytes().take_while(u8::is_ascii_digit).count();
            (fraction, rest) = after_dot.split_at(fraction_len);
        } else if whole.is_empty() {
            return None;
        }
        if whole.is_empty() && fraction.is_empty() {
            return None;
        }
        let unit_len = rest
            .find(|c: char| c == '.' || c.is_ascii_digit())
            .unwrap_or(rest.len());
        let (unit, after_unit) = rest.split_at(unit_len);
        rest = after_unit;
        let unit: u128 = match unit {
            "ns" => 1,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return None,
        };
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().ok()?
        };
        // Digits past the 18th cannot change a duration that fits in 64 bits.
        let fraction = &fraction[..fraction.len().min(18)];
        let fraction_ns = if fraction.is_empty() {
            0
        } else {
            let scale = 10u128.pow(u32::try_from(fraction.len()).ok()?);
            fraction.parse::<u128>().ok()? * unit / scale
        };
        total = total
            .checked_add(whole.checked_mul(unit)?)?
            .checked_add(fraction_ns)?;
        if total > 1 << 63 {
            return None;
        }
    }
    if !negative && total > (1 << 63) - 1 {
        return None;
    }
    let total = i128::try_from(total).ok()?;
    Some(if negative { -total } else { total })
}

// Connections that die with the double. Aborting axum's serve task stops accepting, but each
// connection runs in a task of its own: a blocked or stalled query would still be answered, or
// hang, after the test dropped the double. Hyper polls the socket for EOF while a request is in
// flight, so failing the reads and writes once the double is dropped closes every connection.

struct KillableListener {
    inner: TcpListener,
    shutdown: CancellationToken,
}

impl axum::serve::Listener for KillableListener {
    type Io = KillableStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (KillableStream, SocketAddr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    let stream = KillableStream {
                        stream,
                        shutdown: self.shutdown.clone(),
                        killed: Box::pin(self.shutdown.clone().cancelled_owned()),
                    };
                    return (stream, addr);
                }
                // Out of file descriptors and the like: retry, as axum's own listener does.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

struct KillableStream {
    stream: TcpStream,
    shutdown: CancellationToken,
    killed: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl KillableStream {
    /// Ready with an error once the double is dropped; registers the waker otherwise.
    fn poll_killed(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        if self.shutdown.is_cancelled() || self.killed.as_mut().poll(cx).is_ready() {
            Poll::Ready(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "consul double dropped",
            ))
        } else {
            Poll::Pending
        }
    }
}

impl AsyncRead for KillableStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Poll::Ready(error) = this.poll_killed(cx) {
            return Poll::Ready(Err(error));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for KillableStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Poll::Ready(error) = this.poll_killed(cx) {
            return Poll::Ready(Err(error));
        }
        Pin::new(&mut this.stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Poll::Ready(error) = this.poll_killed(cx) {
            return Poll::Ready(Err(error));
        }
        Pin::new(&mut this.stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
