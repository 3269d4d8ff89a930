//! The Consul source: a bounded number of connections, however big the catalog.
//!
//! ```text
//! /v1/health/state/any?index=..   one blocking watch: every check; a service whose checks (or
//!                                 whose nodes' checks) changed is read again
//! /v1/catalog/services?index=..   one blocking watch: which services are exposed, their tags;
//!                                 new and retagged services are read, and so are those with no
//!                                 check of their own (the state watch cannot see them move)
//! resync                          every exposed service read again within `resync`, spread out
//!            └──> queue (each service once) ──> max_connections - 2 readers:
//!                 /v1/health/service/NAME (every instance; the passing ones serve)
//!                                   └──> state ──> SourceReport, at most every 50 ms
//! ```
//!
//! Two watches hold two connections for their `wait`; the readers share the rest of the
//! budget over kept-alive connections. The state watch is answered before the catalog is
//! read, so every change after a service is read shows in a later state answer. Why this
//! design, and what it costs, is argued in the Consul reference notes; in short: connections
//! stay constant, a change costs one state answer (every check of the catalog) plus one read
//! per changed service, and one hop of latency over a watch per service.

mod api;
mod blocking;
mod client;
mod connections;
pub mod kv;
mod queue;
mod routing;

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use self::api::{decode_catalog, decode_health, decode_state};
pub use self::client::ConsulError;

use self::api::StateCheck;
use self::blocking::BlockingQuery;
use self::client::Client;
use self::queue::Queue;
use self::routing::{is_exposed, service_def};
use crate::config::ConsulSourceConfig;
use crate::escape::{clip, Escaped};
use crate::model::{Health, Hostname, Rejected, ServiceDef, SourceId, SourceReport};
use crate::sources::Backoff;

/// Answers that come within this long of each other are published as one report.
const PUBLISH_COALESCE: Duration = Duration::from_millis(50);
/// The two blocking watches' connections.
const WATCHES: usize = 2;
/// How often the resync looks at the catalog's size again while it waits.
const RESYNC_LOOK: Duration = Duration::from_secs(1);
/// Failing services named in the degraded reason; the rest are counted.
const NAMED_FAILURES: usize = 5;
/// The longest service name, and the longest error, quoted in a failure (the degraded reason,
/// a log line), in bytes: a name is whatever a team registered, and an error repeats it in
/// the URL it names.
const NAME_IN_TEXT: usize = 128;
const ERROR_IN_TEXT: usize = 300;

/// Reads the catalog and every exposed service's health once, without blocking, for
/// `weft render` and `weft check`, with up to `max_connections` reads at once.
pub async fn read_once(
    config: ConsulSourceConfig,
    domain: Option<Hostname>,
) -> Result<SourceReport, ConsulError> {
    let client = Client::new(config);
    let url = client.url(&["v1", "catalog", "services"]);
    let answer = client.get(url.clone(), 0, &[]).await?;
    let catalog =
        decode_catalog(&answer.body).map_err(|message| ConsulError::decode(url, message))?;
    let catalog_rejected = catalog_rejected(&catalog);
    let names: Vec<String> = catalog
        .records
        .into_iter()
        .filter(|(_, tags)| exposed(&client, tags, domain.as_ref()))
        .map(|(name, _)| name)
        .collect();
    let reads = names
        .iter()
        .map(|name| read_service(&client, name, domain.as_ref()));
    let mut report = SourceReport {
        certificates: Default::default(),
        challenges: Default::default(),
        health: Health::Ok,
        rejected: catalog_rejected,
        ..SourceReport::starting(SourceId::Consul)
    };
    for read in futures::future::join_all(reads).await {
        let read = read?;
        report.services.push(std::sync::Arc::new(read.def));
        report.rejected.extend(read.rejected);
    }
    Ok(report)
}

/// The catalog entries that did not decode: those services are not routed.
fn catalog_rejected(catalog: &api::CatalogServices) -> Vec<Rejected> {
    catalog.rejected("catalog service", |service| {
        format!("{} tags", service.subject("service"))
    })
}

fn exposed(client: &Client, tags: &Option<Vec<String>>, domain: Option<&Hostname>) -> bool {
    let tags = tags.as_deref().unwrap_or_default();
    is_exposed(tags, &client.config.tag_prefix, domain)
}

/// One service, read.
struct Read {
    def: ServiceDef,
    rejected: Vec<Rejected>,
    /// The nodes its instances run on, passing or not.
    nodes: BTreeSet<String>,
}

async fn read_service(
    client: &Client,
    name: &str,
    domain: Option<&Hostname>,
) -> Result<Read, ConsulError> {
    let url = client.url(&["v1", "health", "service", name]);
    let answer = client.get(url.clone(), 0, &[]).await?;
    let entries =
        decode_health(&answer.body).map_err(|message| ConsulError::decode(url, message))?;
    let (def, mut rejected) =
        service_def(name, &entries.records, &client.config.tag_prefix, domain);
    // An instance that did not decode serves nothing; the others do.
    rejected.extend(
        entries.rejected(&format!("service {name:?} instance"), |instance| {
            format!("service {name:?} {}", instance.subject("instance"))
        }),
    );
    let nodes = entries
        .records
        .iter()
        .map(|e| e.node.node.clone())
        .collect();
    Ok(Read {
        def,
        rejected,
        nodes,
    })
}

/// Runs the Consul source until `shutdown`.
pub async fn run(
    config: ConsulSourceConfig,
    domain: Option<Hostname>,
    tx: watch::Sender<SourceReport>,
    shutdown: CancellationToken,
) {
    let client = Arc::new(Client::new(config));
    let source = Arc::new(Source::new(client, domain));
    info!(url = %crate::config::redact(&source.client.config.url), max_connections = source.client.config.max_connections, "watching consul");
    let nudged = source.clone();
    crate::sources::after_start_grace(shutdown.clone(), move || nudged.dirty.notify_one());
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(source.clone().publish(tx, shutdown.clone()));
    tasks.spawn(source.clone().watch_state(shutdown.clone()));
    tasks.spawn(source.clone().watch_catalog(shutdown.clone()));
    tasks.spawn(source.clone().resync(shutdown.clone()));
    let readers = source
        .client
        .config
        .max_connections
        .saturating_sub(WATCHES)
        .max(1);
    for _ in 0..readers {
        tasks.spawn(source.clone().read_queued(shutdown.clone()));
    }
    // Every task runs until shutdown; one that panics ends weft with its panic rather than
    // leaving its part of Consul unwatched.
    while let Some(ended) = tasks.join_next().await {
        if let Err(failed) = ended {
            if failed.is_panic() {
                std::panic::resume_unwind(failed.into_panic());
            }
        }
    }
}

/// One exposed service.
#[derive(Debug, Default)]
struct ServiceState {
    /// `None` until the first answer.
    content: Option<(std::sync::Arc<ServiceDef>, Vec<Rejected>)>,
    error: Option<String>,
    backoff: Backoff,
    /// The nodes its instances run on: a change of their node checks reads it again.
    nodes: BTreeSet<String>,
    /// Its tags in the catalog: a change reads it again.
    tags: Vec<String>,
    /// A failed read's retry is waiting: one at a time, however often it fails.
    retry_pending: bool,
}

#[derive(Debug, Default)]
struct State {
    catalog_loaded: bool,
    catalog_error: Option<String>,
    /// The catalog entries of the last answer that did not decode.
    catalog_rejected: Vec<Rejected>,
    /// The state watch's first answer came (or it failed): the catalog may be read.
    baseline: bool,
    state_error: Option<String>,
    /// The checks of the last state answer that did not decode.
    state_rejected: Vec<Rejected>,
    started: crate::sources::StartGrace,
    services: BTreeMap<String, ServiceState>,
    /// Set once the catalog and every exposed service answered once: from then on the report
    /// is complete.
    complete: bool,
    /// From the last state answer: a digest of each service's own checks, and of each node's.
    service_checks: HashMap<String, u64>,
    node_checks: HashMap<String, u64>,
}

struct Source {
    client: Arc<Client>,
    domain: Option<Hostname>,
    state: Mutex<State>,
    /// Services to read, each once however often it was asked for.
    queue: Queue,
    /// The state changed: publish.
    dirty: Notify,
    /// The state watch has its first answer.
    baseline: Notify,
}

impl Source {
    fn new(client: Arc<Client>, domain: Option<Hostname>) -> Source {
        Source {
            client,
            domain,
            state: Mutex::new(State::default()),
            queue: Queue::default(),
            dirty: Notify::new(),
            baseline: Notify::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes the state and has it published.
    fn update<T>(&self, change: impl FnOnce(&mut State) -> T) -> T {
        let result = change(&mut self.state());
        self.dirty.notify_one();
        result
    }

    /// Publishes the state as a report when it changed, at most every `PUBLISH_COALESCE`.
    async fn publish(
        self: Arc<Self>,
        tx: watch::Sender<SourceReport>,
        shutdown: CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.dirty.notified() => {}
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(PUBLISH_COALESCE) => {}
            }
            let Some(report) = self.report() else {
                continue;
            };
            tx.send_if_modified(|current| {
                let changed = *current != report;
                *current = report;
                changed
            });
        }
    }

    /// The report the state makes, or `None` while the first answers are still coming in the
    /// start grace.
    fn report(&self) -> Option<SourceReport> {
        let mut state = self.state();
        if !state.complete {
            let all_answered = state.catalog_loaded
                && state
                    .services
                    .values()
                    .all(|s| s.content.is_some() || s.error.is_some());
            // Past the start grace, what answered is published and what did not is named
            // (degraded), so that the other sources and services route meanwhile.
            if !all_answered && !state.started.is_over() {
                return None;
            }
            state.complete = all_answered;
        }
        let mut report = SourceReport {
            certificates: Default::default(),
            challenges: Default::default(),
            health: Health::Ok,
            rejected: [&state.catalog_rejected, &state.state_rejected]
                .into_iter()
                .flatten()
                .cloned()
                .collect(),
            ..SourceReport::starting(SourceId::Consul)
        };
        let mut errors: Vec<String> = state.catalog_error.iter().cloned().collect();
        errors.extend(state.state_error.iter().cloned());
        if !state.catalog_loaded && state.catalog_error.is_none() {
            errors.push(format!(
                "catalog: no answer yet ({:?} after the start)",
                crate::sources::START_GRACE
            ));
        }
        let mut failing = Vec::new();
        for (name, service) in &state.services {
            if let Some((def, tags)) = &service.content {
                report.services.push(def.clone());
                report.rejected.extend(tags.iter().cloned());
            }
            if let Some(error) = &service.error {
                failing.push(format!(
                    "{}: {}",
                    clip(name, NAME_IN_TEXT),
                    clip(error, ERROR_IN_TEXT)
                ));
            } else if service.content.is_none() && !state.complete {
                failing.push(format!("{}: no answer yet", clip(name, NAME_IN_TEXT)));
            }
        }
        if failing.len() > NAMED_FAILURES {
            let more = failing.len() - NAMED_FAILURES;
            failing.truncate(NAMED_FAILURES);
            failing.push(format!("and {more} more services"));
        }
        errors.extend(failing);
        if !errors.is_empty() {
            report.degrade(errors.join("; "));
        }
        Some(report)
    }

    /// Watches every check of the catalog; a service whose own checks, or whose nodes'
    /// checks, changed since the last answer is read again.
    async fn watch_state(self: Arc<Self>, shutdown: CancellationToken) {
        let client = self.client.clone();
        let mut query = BlockingQuery::new(
            &client,
            "health state",
            &["v1", "health", "state", "any"],
            &[],
        );
        let failed = |err: &ConsulError, delay: Duration| {
            warn!(error = %Escaped(&err), retry_in = ?delay, "consul health state watch failing, changes are seen by the catalog watch and the resync meanwhile");
            self.update(|state| {
                state.state_error = Some(format!("health state: {err}"));
                state.baseline = true;
            });
            self.baseline.notify_waiters();
        };
        while let Some(checks) = query.next(&client, decode_state, &shutdown, failed).await {
            let (services, nodes) = digests(&checks.records);
            // Not a routing input itself (a service is read whole, its checks with it), but
            // what Consul sent that weft could not read.
            let rejected = checks.rejected("health state check", |check| {
                format!("health state {}", check.subject("check"))
            });
            let changed = self.update(|state| {
                state.state_rejected = rejected;
                let changed = if state.baseline {
                    changed_services(state, &services, &nodes)
                } else {
                    Vec::new()
                };
                state.service_checks = services;
                state.node_checks = nodes;
                state.state_error = None;
                state.baseline = true;
                changed
            });
            self.baseline.notify_waiters();
            if !changed.is_empty() {
                debug!(services = changed.len(), "consul checks changed");
            }
            self.queue.push(changed);
        }
    }

    /// Watches which services are exposed and their tags; reads new and retagged ones, and
    /// those the state watch cannot see.
    async fn watch_catalog(self: Arc<Self>, shutdown: CancellationToken) {
        // The state watch's first answer is the baseline every later change is seen against.
        loop {
            let baseline = self.baseline.notified();
            if self.state().baseline {
                break;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = baseline => {}
            }
        }
        let client = self.client.clone();
        let mut query = BlockingQuery::new(&client, "catalog", &["v1", "catalog", "services"], &[]);
        let failed = |err: &ConsulError, delay: Duration| {
            warn!(error = %Escaped(&err), retry_in = ?delay, "consul catalog watch failing, keeping the last good services");
            self.update(|state| state.catalog_error = Some(format!("catalog: {err}")));
        };
        while let Some(catalog) = query.next(&client, decode_catalog, &shutdown, failed).await {
            let rejected = catalog_rejected(&catalog);
            let exposed: BTreeMap<String, Vec<String>> = catalog
                .records
                .into_iter()
                .filter(|(_, tags)| exposed(&client, tags, self.domain.as_ref()))
                .map(|(name, tags)| (name, tags.unwrap_or_default()))
                .collect();
            let to_read = self.update(|state| {
                state.catalog_loaded = true;
                state.catalog_error = None;
                state.catalog_rejected = rejected;
                state.services.retain(|name, _| exposed.contains_key(name));
                let mut to_read = Vec::new();
                for (name, tags) in exposed {
                    let service = state.services.entry(name.clone()).or_default();
                    // New, retagged, or invisible to the state watch (no check of its own):
                    // a registration may have changed it.
                    if service.content.is_none()
                        || service.tags != tags
                        || !state.service_checks.contains_key(&name)
                    {
                        to_read.push(name);
                    }
                    service.tags = tags;
                }
                to_read
            });
            self.queue.push(to_read);
        }
    }

    /// Reads every exposed service again within `resync`, one at a time, evenly spread: the
    /// safety net for a change neither watch shows (an instance re-registered at a new
    /// address with unchanged checks).
    async fn resync(self: Arc<Self>, shutdown: CancellationToken) {
        let mut last: Option<String> = None;
        let mut last_read = tokio::time::Instant::now();
        loop {
            // The pace follows the catalog as it is now (it may grow from nothing at the
            // start): looked at again at least every `RESYNC_LOOK`.
            let (count, complete) = {
                let state = self.state();
                (state.services.len() as u32, state.complete)
            };
            let due = last_read + self.client.config.resync / count.max(1);
            let now = tokio::time::Instant::now();
            if !complete || count == 0 || now < due {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep_until(due.min(now + RESYNC_LOOK)) => {}
                }
                continue;
            }
            last_read = now;
            let next = {
                let state = self.state();
                let after = last
                    .as_deref()
                    .map_or(std::ops::Bound::Unbounded, std::ops::Bound::Excluded);
                state
                    .services
                    .range::<str, _>((after, std::ops::Bound::Unbounded))
                    .next()
                    .or_else(|| state.services.iter().next())
                    .map(|(name, _)| name.clone())
            };
            if let Some(name) = next {
                last = Some(name.clone());
                self.queue.push([name]);
            }
        }
    }

    /// Reads queued services, one at a time, until shutdown.
    async fn read_queued(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let name = tokio::select! {
                _ = shutdown.cancelled() => return,
                name = self.queue.pop() => name,
            };
            let read = tokio::select! {
                _ = shutdown.cancelled() => return,
                read = read_service(&self.client, &name, self.domain.as_ref()) => read,
            };
            self.queue.done(&name);
            let outcome = self.update(|state| {
                let service = state.services.get_mut(&name)?;
                Some(service.record(read))
            });
            let Some(outcome) = outcome else { continue };
            // One WARN when a service starts failing and one INFO when it recovers: with
            // Consul down, 10,000 services would otherwise log 10,000 lines every backoff.
            match &outcome {
                ReadOutcome::Read { was_failing: true } => {
                    info!(service = %Escaped(&clip(&name, NAME_IN_TEXT)), "consul service read again")
                }
                ReadOutcome::Read { .. } => {}
                ReadOutcome::Failed {
                    error,
                    delay,
                    was_failing: false,
                    ..
                } => {
                    warn!(service = %Escaped(&clip(&name, NAME_IN_TEXT)), error = %Escaped(&clip(&error.to_string(), ERROR_IN_TEXT)), retry_in = ?delay, "consul service read failing, keeping its last good servers")
                }
                ReadOutcome::Failed { error, delay, .. } => {
                    debug!(service = %Escaped(&clip(&name, NAME_IN_TEXT)), error = %Escaped(&clip(&error.to_string(), ERROR_IN_TEXT)), retry_in = ?delay, "consul service read still failing")
                }
            }
            if let ReadOutcome::Failed {
                delay, retry: true, ..
            } = outcome
            {
                self.clone().retry_after(name, delay, shutdown.clone());
            }
        }
    }

    /// Reads `name` again after `delay`: its one pending retry.
    fn retry_after(self: Arc<Self>, name: String, delay: Duration, shutdown: CancellationToken) {
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(delay) => {
                    self.update(|state| {
                        if let Some(service) = state.services.get_mut(&name) {
                            service.retry_pending = false;
                        }
                    });
                    self.queue.push([name]);
                }
            }
        });
    }
}

/// What one read did to a service.
enum ReadOutcome {
    Read {
        was_failing: bool,
    },
    Failed {
        error: ConsulError,
        delay: Duration,
        was_failing: bool,
        /// No retry was pending: start one.
        retry: bool,
    },
}

impl ServiceState {
    fn record(&mut self, read: Result<Read, ConsulError>) -> ReadOutcome {
        let was_failing = self.error.is_some();
        match read {
            Ok(read) => {
                self.content = Some((std::sync::Arc::new(read.def), read.rejected));
                self.nodes = read.nodes;
                self.error = None;
                self.backoff.reset();
                ReadOutcome::Read { was_failing }
            }
            Err(error) => {
                let delay = self.backoff.next_delay();
                self.error = Some(clip(&error.to_string(), ERROR_IN_TEXT).into_owned());
                let retry = !std::mem::replace(&mut self.retry_pending, true);
                ReadOutcome::Failed {
                    error,
                    delay,
                    was_failing,
                    retry,
                }
            }
        }
    }
}

/// A digest of each service's own checks and of each node's checks: what decides whether an
/// instance passes (`Output` and `Notes` left out: they change without changing that).
fn digests(checks: &[StateCheck]) -> (HashMap<String, u64>, HashMap<String, u64>) {
    let mut by_service: HashMap<&str, Vec<&StateCheck>> = HashMap::new();
    let mut by_node: HashMap<&str, Vec<&StateCheck>> = HashMap::new();
    for check in checks {
        if check.service_name.is_empty() {
            by_node.entry(&check.node).or_default().push(check);
        } else {
            by_service
                .entry(&check.service_name)
                .or_default()
                .push(check);
        }
    }
    let digest = |mut checks: Vec<&StateCheck>| {
        checks.sort_by(|a, b| (&a.node, &a.check_id).cmp(&(&b.node, &b.check_id)));
        let mut hasher = DefaultHasher::new();
        checks.hash(&mut hasher);
        hasher.finish()
    };
    let collect = |groups: HashMap<&str, Vec<&StateCheck>>| {
        groups
            .into_iter()
            .map(|(key, checks)| (key.to_string(), digest(checks)))
            .collect()
    };
    (collect(by_service), collect(by_node))
}

/// The exposed services that a new state answer may have changed: their own checks differ,
/// or the checks of a node they run on.
fn changed_services(
    state: &State,
    services: &HashMap<String, u64>,
    nodes: &HashMap<String, u64>,
) -> Vec<String> {
    let differs = |old: &HashMap<String, u64>, new: &HashMap<String, u64>, key: &str| {
        old.get(key) != new.get(key)
    };
    let changed_nodes: BTreeSet<&str> = state
        .node_checks
        .keys()
        .chain(nodes.keys())
        .filter(|node| differs(&state.node_checks, nodes, node))
        .map(String::as_str)
        .collect();
    state
        .services
        .iter()
        .filter(|(name, service)| {
            differs(&state.service_checks, services, name)
                || service
                    .nodes
                    .iter()
                    .any(|n| changed_nodes.contains(n.as_str()))
        })
        .map(|(name, _)| name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(node: &str, id: &str, status: &str, service: &str) -> StateCheck {
        StateCheck {
            node: node.into(),
            check_id: id.into(),
            status: status.into(),
            service_id: if service.is_empty() {
                String::new()
            } else {
                format!("{service}-1")
            },
            service_name: service.into(),
        }
    }

    fn state_with(services: &[(&str, &[&str])], checks: &[StateCheck]) -> State {
        let (service_checks, node_checks) = digests(checks);
        let mut state = State {
            service_checks,
            node_checks,
            ..State::default()
        };
        for (name, nodes) in services {
            let service = state.services.entry(name.to_string()).or_default();
            service.nodes = nodes.iter().map(|n| n.to_string()).collect();
        }
        state
    }

    #[test]
    fn a_check_change_reads_its_service_a_node_change_every_service_on_the_node() {
        let before = [
            check("n1", "serfHealth", "passing", ""),
            check("n2", "serfHealth", "passing", ""),
            check("n1", "service:shop-1", "passing", "shop"),
            check("n2", "service:cart-1", "passing", "cart"),
        ];
        let state = state_with(
            &[("shop", &["n1"]), ("cart", &["n2"]), ("pay", &["n1"])],
            &before,
        );
        let changed = |after: &[StateCheck]| {
            let (services, nodes) = digests(after);
            changed_services(&state, &services, &nodes)
        };
        // The same checks in another order, or a changed output: nothing to read.
        let mut same = before.to_vec();
        same.reverse();
        assert!(changed(&same).is_empty());
        // A service check fails: that service.
        let mut shop_fails = before.to_vec();
        shop_fails[2].status = "critical".into();
        assert_eq!(changed(&shop_fails), ["shop"]);
        // A node fails: every service with an instance there (pay has no check of its own).
        let mut n1_fails = before.to_vec();
        n1_fails[0].status = "critical".into();
        assert_eq!(changed(&n1_fails), ["pay", "shop"]);
        // An instance goes away with its check: that service.
        assert_eq!(changed(&before[..3]), ["cart"]);
    }

    #[test]
    fn the_degraded_reason_names_a_few_services_and_counts_the_rest() {
        let config = crate::config::Config::parse("[sources.consul]\n", std::path::Path::new("/"));
        let consul = config.unwrap().sources.consul.unwrap();
        let client = Client::new(consul);
        let source = Source::new(Arc::new(client), None);
        {
            let mut state = source.state();
            state.catalog_loaded = true;
            state.complete = true;
        }
        for i in 0..300 {
            source.state().services.insert(
                format!("svc{i:03}"),
                ServiceState {
                    error: Some("GET ...: 500: No cluster leader".into()),
                    ..ServiceState::default()
                },
            );
        }
        let report = source.report().unwrap();
        let Health::Degraded { reason, .. } = &report.health else {
            panic!("{:?}", report.health);
        };
        assert!(reason.contains("svc000: GET"), "{reason}");
        assert!(reason.ends_with("and 295 more services"), "{reason}");
        assert!(reason.len() < 1000, "{} bytes", reason.len());
        // A name as long as a team cares to register, and an error that repeats it: each cut.
        let long = "a".repeat(100_000);
        source.state().services.insert(
            long.clone(),
            ServiceState {
                error: Some(format!("GET /v1/health/service/{long}: 500")),
                ..ServiceState::default()
            },
        );
        let report = source.report().unwrap();
        let Health::Degraded { reason, .. } = &report.health else {
            panic!("{:?}", report.health);
        };
        let quoted = format!("{}…: GET /v1/health/service/", "a".repeat(NAME_IN_TEXT));
        assert!(reason.starts_with(&quoted), "{reason}");
        assert!(reason.len() < 2000, "{} bytes", reason.len());
    }

    /// However often a failing service is asked for (resync, catalog, state), one retry at a
    /// time waits for it: the retries do not pile up while Consul is down.
    #[test]
    fn a_failing_service_has_one_retry_pending_at_a_time() {
        let failure = || {
            Err(ConsulError::decode(
                "http://consul/v1/health/service/shop".parse().unwrap(),
                "EOF".into(),
            ))
        };
        let mut service = ServiceState::default();
        let retries: Vec<bool> = (0..5)
            .map(|_| match service.record(failure()) {
                ReadOutcome::Failed { retry, .. } => retry,
                ReadOutcome::Read { .. } => panic!("read"),
            })
            .collect();
        assert_eq!(retries, [true, false, false, false, false]);
        // The retry fires (and clears the flag): the next failure starts the next one.
        service.retry_pending = false;
        assert!(matches!(
            service.record(failure()),
            ReadOutcome::Failed {
                retry: true,
                was_failing: true,
                ..
            }
        ));
    }
}
