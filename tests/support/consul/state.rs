//! The catalog the double serves: nodes, instances and their checks, each with its
//! CreateIndex/ModifyIndex, and Consul's `index` table (the last change per table and per
//! service name) that the endpoints answer and block on. The writes follow Consul's state store
//! (`agent/consul/state/catalog.go` and `catalog_ce.go`): an object's ModifyIndex and the table
//! indexes move only when the object really changes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard, PoisonError};

use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use super::kv::Kv;
use super::session::Sessions;
use super::{Fault, Instance, Requests, Status, DEFAULT_NODE_ADDRESS};

pub(super) struct Shared {
    pub(super) state: Mutex<State>,
    /// The raft index of the last write; blocked queries re-check their endpoint's index when it
    /// moves, as Consul re-runs a blocking query when its memdb watch fires.
    pub(super) changes: watch::Sender<u64>,
    /// Wakes the session timers' task when a session's timer starts or restarts.
    pub(super) session_timers: Notify,
}

impl Shared {
    /// A test that panics while holding the lock must not take every later request with it.
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// One raft write: `change` gets the new index; blocked queries are woken afterwards. An
    /// `Err` (a test naming something unknown) fails the test, outside the lock. A write whose
    /// outcome is `false` (a failed check-and-set) is still a raft entry, as in Consul, where
    /// the FSM decides it. A session whose check the change failed or removed is invalidated in
    /// the same write (`invalidate_unhealthy_sessions`).
    pub(super) fn write<T>(&self, change: impl FnOnce(&mut State, u64) -> Result<T, String>) -> T {
        let mut state = self.lock();
        let index = state.index + 1;
        let result = change(&mut state, index);
        if result.is_ok() {
            state.invalidate_unhealthy_sessions(index);
            state.index = index;
        }
        drop(state);
        match result {
            Ok(outcome) => {
                self.changes.send_replace(index);
                outcome
            }
            Err(message) => panic!("consul double: {message}"),
        }
    }

    /// The leader's session timers (`session_ttl.go`): every session whose timer has run out
    /// is invalidated, each in a raft write of its own (`invalidateSession` applies a
    /// `SessionDestroy`). Answers when the next timer fires.
    pub(super) fn expire_sessions(&self, now: Instant) -> Option<Instant> {
        let mut state = self.lock();
        let mut written = None;
        while let Some(id) = state.sessions.first_due(now) {
            let index = state.index + 1;
            state.invalidate_session(&id, index);
            state.index = index;
            written = Some(index);
        }
        let next = state.sessions.next_expiry();
        drop(state);
        if let Some(index) = written {
            self.changes.send_replace(index);
        }
        next
    }
}

/// Runs the session timers until the double goes (the task is aborted with it).
pub(super) async fn session_timers(shared: std::sync::Arc<Shared>) {
    loop {
        let next = shared.expire_sessions(Instant::now());
        // A timer started since holds a permit: this returns at once.
        let started = shared.session_timers.notified();
        match next {
            Some(deadline) => {
                tokio::select! {
                    () = tokio::time::sleep_until(deadline) => {}
                    () = started => {}
                }
            }
            None => started.await,
        }
    }
}

pub(super) struct State {
    /// The raft index of the last write, whether or not it changed anything.
    pub(super) index: u64,
    pub(super) tables: IndexTable,
    pub(super) nodes: BTreeMap<String, NodeState>,
    /// By service ID: the double keeps IDs unique across nodes.
    pub(super) instances: BTreeMap<String, InstanceState>,
    /// Service name -> the IDs of its instances, so that one service is read without a scan.
    pub(super) by_service: BTreeMap<String, BTreeSet<String>>,
    /// The KV store, with its own table indexes: no catalog index moves with it.
    pub(super) kv: Kv,
    /// The sessions, with the `sessions` table index.
    pub(super) sessions: Sessions,
    pub(super) token: Option<String>,
    pub(super) fault: Fault,
    /// Subtracted from every reported index while `Fault::IndexBackwards` lasts.
    pub(super) index_offset: u64,
    pub(super) requests: Requests,
    pub(super) last_query: BTreeMap<String, String>,
    pub(super) blocked: BTreeMap<String, usize>,
    /// By service ID: JSON a test serves, as it is, in place of that instance's health entry.
    pub(super) raw_health_entries: BTreeMap<String, serde_json::Value>,
}

/// Consul's `index` table: the raft index of the last change to each table and to each
/// service name.
#[derive(Default)]
pub(super) struct IndexTable {
    pub(super) nodes: u64,
    /// Raised by every instance registered, changed or deregistered (`catalogInsertService`,
    /// `deleteServiceTxn`); `/v1/catalog/services` answers with it.
    pub(super) services: u64,
    /// Raised by every check added, changed or deleted, and by every deregistration
    /// (`catalogInsertCheck`, `deleteServiceTxn`); `/v1/health/state/:state` answers with it.
    pub(super) checks: u64,
    /// `service.<name>`, while the service has instances: raised by its instances, their
    /// checks, their nodes and the nodes' serfHealth; `/v1/health/service/:name` answers
    /// with it.
    pub(super) service: BTreeMap<String, u64>,
    /// `service_last_extinction`: when a service last lost its last instance. What
    /// `/v1/health/service/:name` answers for a service without instances.
    pub(super) service_extinction: u64,
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

#[derive(Clone)]
pub(super) struct CheckState {
    pub(super) status: Status,
    pub(super) output: String,
    pub(super) create_index: u64,
    pub(super) modify_index: u64,
}

/// What a request reads.
pub(super) enum Endpoint {
    Catalog,
    Health {
        name: String,
        passing: bool,
        tags: Vec<String>,
    },
    /// `/v1/health/state/:state`: `any`, or the status the checks must have.
    State {
        state: String,
    },
    /// `/v1/kv/:key`: one key, its raw value alone with `?raw`.
    KvGet {
        key: String,
        raw: bool,
    },
    /// `/v1/kv/:prefix?recurse`: every entry under the prefix.
    KvList {
        prefix: String,
    },
    /// `/v1/kv/:prefix?keys`: the keys under the prefix, cut after the separator if one is
    /// given.
    KvKeys {
        prefix: String,
        separator: String,
    },
    /// `/v1/session/info/:id`: the session, or nothing.
    SessionInfo {
        id: String,
    },
    /// `/v1/session/list`.
    SessionList,
    /// `/v1/session/node/:node`: the node's sessions.
    SessionNode {
        node: String,
    },
}

impl State {
    pub(super) fn new() -> State {
        State {
            index: 1,
            tables: IndexTable::default(),
            nodes: BTreeMap::new(),
            instances: BTreeMap::new(),
            by_service: BTreeMap::new(),
            kv: Kv::default(),
            sessions: Sessions::default(),
            token: None,
            fault: Fault::None,
            index_offset: 0,
            requests: Requests::default(),
            last_query: BTreeMap::new(),
            raw_health_entries: BTreeMap::new(),
            blocked: BTreeMap::new(),
        }
    }

    /// The index an endpoint answers with and blocks on (never 0: Consul sends 1 instead).
    pub(super) fn endpoint_index(&self, endpoint: &Endpoint) -> u64 {
        let tables = &self.tables;
        let index = match endpoint {
            Endpoint::Catalog => tables.services,
            // `maxIndexAndWatchChForService`: the service's own index, the last extinction for
            // a service without instances, or the catalog's if no service ever went extinct.
            Endpoint::Health { name, .. } => match tables.service.get(name) {
                Some(index) => *index,
                None if tables.service_extinction > 0 => tables.service_extinction,
                None => tables.checks.max(tables.services).max(tables.nodes),
            },
            Endpoint::State { .. } => tables.checks,
            Endpoint::KvGet { key, .. } => self.kv.get_index(key),
            Endpoint::KvList { prefix } | Endpoint::KvKeys { prefix, .. } => {
                self.kv.list_index(prefix)
            }
            // `SessionGet`, `SessionList`, `NodeSessions`: the `sessions` table's index.
            Endpoint::SessionInfo { .. } | Endpoint::SessionList | Endpoint::SessionNode { .. } => {
                self.sessions.index
            }
        };
        index.max(1)
    }

    /// What a client sees of `index` (lowered while `Fault::IndexBackwards` lasts).
    pub(super) fn reported(&self, index: u64) -> u64 {
        index.saturating_sub(self.index_offset).max(1)
    }

    /// The instances of `name`, by ID.
    pub(super) fn instances_of(&self, name: &str) -> impl Iterator<Item = &InstanceState> {
        self.by_service
            .get(name)
            .into_iter()
            .flatten()
            .filter_map(|id| self.instances.get(id))
    }

    pub(super) fn node_mut(&mut self, node: &str) -> Result<&mut NodeState, String> {
        self.nodes
            .get_mut(node)
            .ok_or_else(|| format!("no node {node:?}"))
    }

    /// Creates the node, with a passing serfHealth as the leader registers a new member, or
    /// moves it to `address` (`None`: keep it as it is).
    pub(super) fn ensure_node(&mut self, name: &str, address: Option<&str>, index: u64) {
        let Some(node) = self.nodes.get_mut(name) else {
            let number = self.nodes.len() + 1;
            self.nodes.insert(
                name.to_string(),
                NodeState {
                    id: format!("{number:08x}-0000-4000-8000-{number:012x}"),
                    address: address.unwrap_or(DEFAULT_NODE_ADDRESS).to_string(),
                    meta: BTreeMap::new(),
                    create_index: index,
                    modify_index: index,
                    serf: CheckState {
                        status: Status::Passing,
                        output: "Agent alive and reachable".to_string(),
                        create_index: index,
                        modify_index: index,
                    },
                },
            );
            self.tables.nodes = index;
            self.tables.checks = index;
            return;
        };
        if let Some(address) = address.filter(|address| *address != node.address) {
            node.address = address.to_string();
            node.modify_index = index;
            self.node_changed(name, index);
        }
    }

    pub(super) fn set_node_meta(
        &mut self,
        name: &str,
        key: &str,
        value: &str,
        index: u64,
    ) -> Result<(), String> {
        let node = self.node_mut(name)?;
        if node.meta.get(key).map(String::as_str) != Some(value) {
            node.meta.insert(key.to_string(), value.to_string());
            node.modify_index = index;
            self.node_changed(name, index);
        }
        Ok(())
    }

    /// `catalogInsertNode`: node data is part of every health answer of its services.
    fn node_changed(&mut self, name: &str, index: u64) {
        self.tables.nodes = index;
        self.touch_services_on(name, index);
    }

    /// `updateAllServiceIndexesOfNode`.
    fn touch_services_on(&mut self, node: &str, index: u64) {
        for instance in self.instances.values().filter(|i| i.spec.node == node) {
            self.tables
                .service
                .insert(instance.spec.service.clone(), index);
        }
    }

    pub(super) fn set_node_check(
        &mut self,
        name: &str,
        status: Status,
        index: u64,
    ) -> Result<(), String> {
        let node = self.node_mut(name)?;
        if node.serf.status != status {
            node.serf.status = status;
            node.serf.modify_index = index;
            self.tables.checks = index;
            self.touch_services_on(name, index);
        }
        Ok(())
    }

    /// Registers an instance with its check, as an agent's anti-entropy sends them
    /// (`ensureRegistrationTxn`): what is unchanged keeps its ModifyIndex and moves no table
    /// index. The same ID on another node or under another name is a new instance: the old one
    /// is deregistered first.
    pub(super) fn ensure_instance(&mut self, spec: Instance, index: u64) {
        let elsewhere = self
            .instances
            .get(&spec.id)
            .is_some_and(|old| (&old.spec.node, &old.spec.service) != (&spec.node, &spec.service));
        if elsewhere {
            // It exists: this cannot fail.
            let _ = self.remove_instance(&spec.id, index);
        }
        self.ensure_node(&spec.node, None, index);
        let old = self.instances.remove(&spec.id);
        let service_changed = old
            .as_ref()
            .map_or(true, |old| !same_service(&old.spec, &spec));
        let (create_index, modify_index) = match &old {
            Some(old) if !service_changed => (old.create_index, old.modify_index),
            Some(old) => (old.create_index, index),
            None => (index, index),
        };
        // A check carries its service's tags (`ensureCheckTxn` copies them): new tags change it.
        let tags_changed = old.as_ref().is_some_and(|old| old.spec.tags != spec.tags);
        let old_check = old.and_then(|old| old.check);
        let (check, check_changed) = match (old_check, spec.check) {
            (Some(old), Some(status))
                if old.status == status && old.output == spec.output && !tags_changed =>
            {
                (Some(old), false)
            }
            (None, None) => (None, false),
            // Added, changed, or gone (the agent deregisters a check it no longer has).
            (old, new) => (
                new.map(|status| CheckState {
                    status,
                    output: spec.output.clone(),
                    create_index: old.map_or(index, |old| old.create_index),
                    modify_index: index,
                }),
                true,
            ),
        };
        if service_changed {
            self.tables.services = index;
            self.tables.nodes = index;
        }
        if check_changed {
            self.tables.checks = index;
        }
        if service_changed || check_changed {
            self.tables.service.insert(spec.service.clone(), index);
        }
        self.by_service
            .entry(spec.service.clone())
            .or_default()
            .insert(spec.id.clone());
        self.instances.insert(
            spec.id.clone(),
            InstanceState {
                spec,
                create_index,
                modify_index,
                check,
            },
        );
    }

    /// Deregisters an instance and its check (`deleteServiceTxn`): the checks table moves even
    /// when it had no check, and the service's index goes with its last instance.
    pub(super) fn remove_instance(&mut self, id: &str, index: u64) -> Result<(), String> {
        let gone = self
            .instances
            .remove(id)
            .ok_or_else(|| format!("no service instance {id:?} to deregister"))?;
        let name = gone.spec.service;
        self.tables.checks = index;
        self.tables.services = index;
        self.tables.nodes = index;
        let ids = self.by_service.entry(name.clone()).or_default();
        ids.remove(id);
        if ids.is_empty() {
            self.by_service.remove(&name);
            self.tables.service.remove(&name);
            self.tables.service_extinction = index;
        } else {
            self.tables.service.insert(name, index);
        }
        Ok(())
    }

    /// Changes the instance's check with `change`; if that changes nothing, nothing moves
    /// (`ensureCheckTxn` compares with `IsSame` before it writes).
    pub(super) fn update_check(
        &mut self,
        id: &str,
        index: u64,
        change: impl FnOnce(&mut CheckState),
    ) -> Result<(), String> {
        let instance = self
            .instances
            .get_mut(id)
            .ok_or_else(|| format!("no service instance {id:?}"))?;
        let check = instance
            .check
            .as_mut()
            .ok_or_else(|| format!("service instance {id:?} has no check"))?;
        let before = (check.status, check.output.clone());
        change(check);
        if (check.status, &check.output) != (before.0, &before.1) {
            check.modify_index = index;
            self.tables.checks = index;
            self.tables
                .service
                .insert(instance.spec.service.clone(), index);
        }
        Ok(())
    }

    /// Raises every table index and every service's, as a write would that changes something
    /// the double does not render.
    pub(super) fn bump(&mut self, index: u64) {
        let tables = &mut self.tables;
        (tables.nodes, tables.services, tables.checks) = (index, index, index);
        tables.service_extinction = index;
        for service in tables.service.values_mut() {
            *service = index;
        }
    }
}

/// Consul's `IsSameService` for what the double models.
fn same_service(old: &Instance, new: &Instance) -> bool {
    (
        &old.address,
        old.port,
        &old.tags,
        &old.meta,
        &old.tagged_addresses,
    ) == (
        &new.address,
        new.port,
        &new.tags,
        &new.meta,
        &new.tagged_addresses,
    )
}
