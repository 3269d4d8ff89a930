//! A Consul HTTP API test double: `/v1/catalog/services` and `/v1/health/service/:name`, with
//! blocking queries, ACL tokens and injectable faults, on 127.0.0.1:0.
//!
//! It follows the Consul reference notes and the docs samples in tests/fixtures/consul/. Tests
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

use super::killable as conn;
mod go;
mod http;
mod state;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use self::go::{parse_go_bool, parse_go_duration, parse_go_uint};

use self::conn::Served;
use self::http::{catalog_services, health_service, record};
use self::state::{CheckState, InstanceState, Shared, State};

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
    /// No leader: `500 No cluster leader`, except to `?stale` reads, which the server answers
    /// from its own state with `X-Consul-KnownLeader: false` and a large `LastContact`.
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
    /// Dropped with the double: the server and every open connection go, and a panic of a
    /// handler fails the test.
    server: Served,
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
            .route("/v1/health/service/", get(health_service))
            .route("/v1/health/service/{*name}", get(health_service))
            .fallback(|| async { (StatusCode::NOT_FOUND, "404 page not found") })
            .layer(axum::middleware::from_fn_with_state(shared.clone(), record))
            .with_state(shared.clone());
        ConsulDouble {
            addr,
            shared,
            server: Served::start(listener, app),
        }
    }

    /// `http://127.0.0.1:<port>`, without a trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Fails the test with the first panic of one of the double's handlers so far (dropping
    /// the double does it too).
    pub fn check(&self) {
        self.server.check();
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

    /// With `Some(token)`, ACLs are on with a default policy of deny: `X-Consul-Token`,
    /// `Authorization: Bearer` or `?token=` must carry `token` to read anything. No token
    /// reads as anonymous (filtered: `200 []`, a catalog without services); any other token
    /// is unknown to Consul: `403 ACL not found`.
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

    /// Waits until at least `count` blocking queries wait on `path`; panics after 10 s (scaled).
    pub async fn wait_for_blocked_queries(&self, path: &str, count: usize) {
        let what = format!("{count} blocking queries on {path}");
        crate::support::eventually(Duration::from_secs(10), &what, || async {
            match self.blocked_queries(path) {
                blocked if blocked >= count => Ok(()),
                blocked => Err(blocked),
            }
        })
        .await
    }
}
