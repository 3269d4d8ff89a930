//! The Consul source: blocking queries on the catalog and on each exposed service's health.
//!
//! ```text
//! /v1/catalog/services?index=..&wait=..        one watch: which services are exposed
//!    └─ per exposed service:
//!       /v1/health/service/NAME?passing&index=..  one watch each, started and stopped as
//!                                                  services come and go
//! every watch ──> shared state ──> SourceReport, published only when routing content changed
//! ```
//!
//! Client rules from Consul's blocking-query docs: reset the index to 0 when it goes
//! backwards, never block with an index below 1, a client timeout above wait * 17/16, and a
//! token-bucket rate limit per watch. A failing watch keeps its last good content, backs off
//! with jitter, and marks the source degraded until it recovers.

use std::collections::{BTreeMap, BTreeSet};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use reqwest::header::HeaderMap;
use reqwest::Url;
use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::http::{fetch, HttpError};
use super::{nullable, Backoff};
use crate::config::{Consistency, ConsulSourceConfig};
use crate::model::{Health, Hostname, Rejected, ServiceDef, SourceId, SourceReport};

/// Slack on top of wait * 17/16 before a blocking query counts as hung.
const TIMEOUT_SLACK: Duration = Duration::from_secs(5);
/// Burst of the per-watch token bucket.
const RATE_BURST: u32 = 5;

/// Consul's failures are HTTP failures.
pub type ConsulError = HttpError;

// ---- Consul's JSON, as the API documents it (unknown fields ignored) ----

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
    #[serde(default)]
    pub tagged_addresses: Option<BTreeMap<String, String>>,
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

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct HealthCheck {
    #[serde(rename = "CheckID")]
    pub check_id: String,
    pub status: String,
    #[serde(default, rename = "ServiceID", deserialize_with = "nullable")]
    pub service_id: String,
}

/// `/v1/catalog/services`: service name -> union of its tags.
pub type CatalogServices = BTreeMap<String, Option<Vec<String>>>;

pub fn decode_health(body: &[u8]) -> Result<Vec<HealthEntry>, String> {
    serde_json::from_slice(body).map_err(|e| e.to_string())
}

pub fn decode_catalog(body: &[u8]) -> Result<CatalogServices, String> {
    serde_json::from_slice(body).map_err(|e| e.to_string())
}

// ---- Blocking-query rules ----

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
fn wait_param(wait: Duration) -> String {
    format!("{}ms", wait.as_millis().max(1))
}

/// A token bucket per watch: at most `rate` requests a second after a burst.
fn rate_limiter(rate: NonZeroU32) -> DefaultDirectRateLimiter {
    let burst = NonZeroU32::new(RATE_BURST).unwrap_or(NonZeroU32::MIN);
    RateLimiter::direct(Quota::per_second(rate).allow_burst(burst))
}

// ---- Routing from tags ----

/// The routing a service's tags ask for, with `prefix` = `weft.`.
#[derive(Debug, Default, PartialEq, Eq)]
struct TagRouting {
    hosts: Vec<String>,
    enabled: Option<bool>,
    path: Option<String>,
    balance: Option<String>,
    check: Option<String>,
    ignored: Vec<String>,
}

fn tag_routing(tags: &[String], prefix: &str) -> TagRouting {
    let mut routing = TagRouting::default();
    for tag in tags {
        let Some(rest) = tag.strip_prefix(prefix) else {
            continue;
        };
        match rest.split_once('=') {
            Some(("host", host)) => routing.hosts.push(host.to_string()),
            Some(("enable", value)) => routing.enabled = Some(value != "false"),
            Some(("path", path)) => routing.path = Some(path.to_string()),
            Some(("balance", balance)) => routing.balance = Some(balance.to_string()),
            Some(("check", check)) => routing.check = Some(check.to_string()),
            _ => routing.ignored.push(tag.clone()),
        }
    }
    routing.hosts.sort();
    routing.hosts.dedup();
    routing
}

/// Whether weft routes a service at all: it names a host, or Apollo mode exposes every
/// service that does not opt out.
fn is_exposed(tags: &[String], prefix: &str, domain: Option<&Hostname>) -> bool {
    let routing = tag_routing(tags, prefix);
    if routing.enabled == Some(false) {
        return false;
    }
    !routing.hosts.is_empty() || domain.is_some()
}

/// One service's definition from its passing instances.
fn service_def(
    name: &str,
    entries: &[HealthEntry],
    prefix: &str,
    domain: Option<&Hostname>,
) -> (ServiceDef, Vec<Rejected>) {
    let mut tags: Vec<String> = entries
        .iter()
        .flat_map(|e| e.service.tags.clone().unwrap_or_default())
        .collect();
    tags.sort();
    tags.dedup();
    let routing = tag_routing(&tags, prefix);
    let mut hosts = routing.hosts;
    if let Some(domain) = domain {
        hosts.push(format!("{name}.{domain}"));
    }
    let mut servers: Vec<String> = entries
        .iter()
        .map(|entry| {
            // An empty Service.Address means "use the node's address".
            let address = if entry.service.address.is_empty() {
                &entry.node.address
            } else {
                &entry.service.address
            };
            if address.contains(':') {
                format!("[{address}]:{}", entry.service.port)
            } else {
                format!("{address}:{}", entry.service.port)
            }
        })
        .collect();
    servers.sort();
    servers.dedup();
    let rejected = routing
        .ignored
        .into_iter()
        .map(|tag| Rejected {
            subject: format!("service {name:?} tag {tag:?}"),
            reason: format!(
                "unknown {prefix} tag, ignored (known: host, enable, path, balance, check)"
            ),
        })
        .collect();
    (
        ServiceDef {
            name: name.to_string(),
            hosts,
            path: routing.path,
            servers,
            balance: routing.balance,
            check: routing.check,
            check_interval: None,
            check_fall: None,
        },
        rejected,
    )
}

// ---- The watches ----

#[derive(Debug, Default)]
struct ServiceState {
    /// `None` until the first answer.
    content: Option<(ServiceDef, Vec<Rejected>)>,
    error: Option<String>,
}

#[derive(Debug, Default)]
struct State {
    catalog_loaded: bool,
    catalog_error: Option<String>,
    started: super::StartGrace,
    services: BTreeMap<String, ServiceState>,
    /// Set once every watch has answered once: from then on the report is complete.
    complete: bool,
}

/// The HTTP side, shared by every watch.
struct Client {
    http: reqwest::Client,
    config: ConsulSourceConfig,
}

/// One answer of a blocking query.
struct Answer {
    index: Option<u64>,
    body: Vec<u8>,
    /// `X-Consul-Results-Filtered-By-ACLs: true`: the token could not read everything.
    acl_filtered: bool,
    /// `X-Consul-KnownLeader`.
    known_leader: Option<bool>,
}

/// What Consul's answers say besides their content, logged when it changes: results filtered
/// by ACLs (a catalog that shrinks may be a token problem, not a change), an answer from a
/// server that knows no leader (a stale read, possibly old).
#[derive(Default)]
struct Notices {
    acl_filtered: bool,
    leaderless: bool,
}

impl Notices {
    fn observe(&mut self, answer: &Answer, what: &str) {
        if answer.acl_filtered != self.acl_filtered {
            self.acl_filtered = answer.acl_filtered;
            if self.acl_filtered {
                warn!(what, "consul filtered the answer by ACLs: what weft's token cannot read is left out; give the token service:read and node:read");
            } else {
                info!(what, "consul no longer filters the answer by ACLs");
            }
        }
        let leaderless = answer.known_leader == Some(false);
        if leaderless != self.leaderless {
            self.leaderless = leaderless;
            if leaderless {
                warn!(what, "consul answered without a known leader (a stale read): the services may be out of date");
            } else {
                info!(what, "consul answers with a known leader again");
            }
        }
    }
}

impl Client {
    fn new(config: ConsulSourceConfig) -> Result<Client, reqwest::Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()?;
        Ok(Client { http, config })
    }

    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.config.url.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    async fn get(
        &self,
        mut url: Url,
        index: u64,
        extra: &[(&str, &str)],
    ) -> Result<Answer, ConsulError> {
        let mut pairs: Vec<(&str, String)> =
            extra.iter().map(|(k, v)| (*k, v.to_string())).collect();
        if let Some(dc) = &self.config.datacenter {
            pairs.push(("dc", dc.clone()));
        }
        if self.config.consistency == Consistency::Stale {
            pairs.push(("stale", String::new()));
        }
        if index > 0 {
            pairs.push(("index", index.to_string()));
            pairs.push(("wait", wait_param(self.config.wait)));
        }
        if !pairs.is_empty() {
            url.query_pairs_mut().extend_pairs(pairs);
        }
        let mut request = self
            .http
            .get(url.clone())
            .timeout(client_timeout(self.config.wait));
        if let Some(token) = &self.config.token {
            request = request.header("X-Consul-Token", token.expose());
        }
        let (headers, body) = fetch(request, &url).await?;
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        Ok(Answer {
            index: consul_index(&headers),
            body,
            acl_filtered: header("X-Consul-Results-Filtered-By-ACLs") == Some("true"),
            known_leader: header("X-Consul-KnownLeader").and_then(|v| v.parse().ok()),
        })
    }
}

fn consul_index(headers: &HeaderMap) -> Option<u64> {
    headers.get("X-Consul-Index")?.to_str().ok()?.parse().ok()
}

/// Reads the catalog and every exposed service's health once, without blocking, for
/// `weft render` and `weft check`.
pub async fn read_once(
    config: ConsulSourceConfig,
    domain: Option<Hostname>,
) -> Result<SourceReport, ConsulError> {
    let client = Client::new(config).map_err(ConsulError::Client)?;
    let url = client.url(&["v1", "catalog", "services"]);
    let answer = client.get(url.clone(), 0, &[]).await?;
    let catalog =
        decode_catalog(&answer.body).map_err(|message| ConsulError::Decode { url, message })?;
    let mut report = SourceReport {
        health: Health::Ok,
        ..SourceReport::starting(SourceId::Consul)
    };
    for (name, tags) in catalog {
        if !is_exposed(
            tags.as_deref().unwrap_or_default(),
            &client.config.tag_prefix,
            domain.as_ref(),
        ) {
            continue;
        }
        let url = client.url(&["v1", "health", "service", &name]);
        let answer = client.get(url.clone(), 0, &[("passing", "")]).await?;
        let entries =
            decode_health(&answer.body).map_err(|message| ConsulError::Decode { url, message })?;
        let (def, rejected) =
            service_def(&name, &entries, &client.config.tag_prefix, domain.as_ref());
        report.services.push(def);
        report.rejected.extend(rejected);
    }
    Ok(report)
}

/// Runs the Consul source until `shutdown`.
pub async fn run(
    config: ConsulSourceConfig,
    domain: Option<Hostname>,
    tx: watch::Sender<SourceReport>,
    shutdown: CancellationToken,
) -> Result<(), reqwest::Error> {
    let client = Arc::new(Client::new(config)?);
    let state = Arc::new(Mutex::new(State::default()));
    let publisher = Publisher {
        state: state.clone(),
        tx,
    };
    let nudged = publisher.clone();
    super::after_start_grace(shutdown.clone(), move || nudged.update(|_| {}));
    info!(url = %client.config.url, "watching consul");
    watch_catalog(client, domain, publisher, shutdown).await;
    Ok(())
}

/// Publishes the shared state as a report when it is complete and its content changed.
#[derive(Clone)]
struct Publisher {
    state: Arc<Mutex<State>>,
    tx: watch::Sender<SourceReport>,
}

impl Publisher {
    fn update(&self, change: impl FnOnce(&mut State)) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        change(&mut state);
        if !state.complete {
            let all_answered = state.catalog_loaded
                && state
                    .services
                    .values()
                    .all(|s| s.content.is_some() || s.error.is_some());
            // Past the start grace, what answered is published and what did not is named
            // (degraded), so that the other sources and services route meanwhile.
            if !all_answered && !state.started.is_over() {
                return;
            }
            state.complete = all_answered;
        }
        let mut services = Vec::new();
        let mut rejected = Vec::new();
        let mut errors: Vec<String> = state.catalog_error.iter().cloned().collect();
        if !state.catalog_loaded && errors.is_empty() {
            errors.push(format!(
                "catalog: no answer yet ({:?} after the start)",
                super::START_GRACE
            ));
        }
        for (name, service) in &state.services {
            if let Some((def, tags)) = &service.content {
                services.push(def.clone());
                rejected.extend(tags.iter().cloned());
            }
            if let Some(error) = &service.error {
                errors.push(format!("{name}: {error}"));
            } else if service.content.is_none() && !state.complete {
                errors.push(format!("{name}: no answer yet"));
            }
        }
        drop(state);
        self.tx.send_if_modified(|report| {
            let before = report.clone();
            report.services = services;
            report.rejected = rejected;
            if errors.is_empty() {
                report.health = Health::Ok;
            } else {
                report.degrade(errors.join("; "));
            }
            *report != before
        });
    }
}

async fn watch_catalog(
    client: Arc<Client>,
    domain: Option<Hostname>,
    publisher: Publisher,
    shutdown: CancellationToken,
) {
    let limiter = rate_limiter(client.config.max_rate);
    let mut backoff = Backoff::default();
    let mut notices = Notices::default();
    let mut index = 0;
    let mut watches: BTreeMap<String, CancellationToken> = BTreeMap::new();
    // Kept to notice a watch that panics: its service would silently stop following Consul.
    let mut watch_tasks = tokio::task::JoinSet::new();
    let url = client.url(&["v1", "catalog", "services"]);
    loop {
        let answer = tokio::select! {
            _ = shutdown.cancelled() => break,
            failed = first_panic(&mut watch_tasks) => std::panic::resume_unwind(failed),
            answer = async {
                limiter.until_ready().await;
                client.get(url.clone(), index, &[]).await
            } => answer,
        };
        let catalog = answer.and_then(|answer| {
            notices.observe(&answer, "catalog");
            let catalog = decode_catalog(&answer.body).map_err(|message| ConsulError::Decode {
                url: url.clone(),
                message,
            })?;
            Ok((answer.index, catalog))
        });
        match catalog {
            Ok((answer_index, catalog)) => {
                index = next_index(index, answer_index);
                backoff.reset();
                let exposed: BTreeSet<String> = catalog
                    .into_iter()
                    .filter(|(_, tags)| {
                        is_exposed(
                            tags.as_deref().unwrap_or_default(),
                            &client.config.tag_prefix,
                            domain.as_ref(),
                        )
                    })
                    .map(|(name, _)| name)
                    .collect();
                let gone: Vec<String> = watches
                    .keys()
                    .filter(|n| !exposed.contains(*n))
                    .cloned()
                    .collect();
                for name in &gone {
                    if let Some(token) = watches.remove(name) {
                        token.cancel();
                    }
                    debug!(service = %name, "consul service no longer exposed");
                }
                let new: Vec<String> = exposed
                    .iter()
                    .filter(|n| !watches.contains_key(*n))
                    .cloned()
                    .collect();
                publisher.update(|state| {
                    state.catalog_loaded = true;
                    state.catalog_error = None;
                    for name in &gone {
                        state.services.remove(name);
                    }
                    for name in &new {
                        state.services.entry(name.clone()).or_default();
                    }
                });
                for name in new {
                    let token = shutdown.child_token();
                    watches.insert(name.clone(), token.clone());
                    watch_tasks.spawn(watch_service(
                        client.clone(),
                        name,
                        domain.clone(),
                        publisher.clone(),
                        token,
                    ));
                }
            }
            Err(err) => {
                let delay = backoff.next_delay();
                warn!(error = %err, retry_in = ?delay, "consul catalog watch failing, keeping the last good services");
                index = 0;
                publisher.update(|state| state.catalog_error = Some(err.to_string()));
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    for token in watches.values() {
        token.cancel();
    }
}

/// Resolves with the panic of the first watch that panics; watches that end (their service
/// went away) are reaped on the way.
async fn first_panic(tasks: &mut tokio::task::JoinSet<()>) -> Box<dyn std::any::Any + Send> {
    loop {
        match tasks.join_next().await {
            Some(Err(failed)) if failed.is_panic() => return failed.into_panic(),
            Some(_) => {}
            None => std::future::pending().await,
        }
    }
}

async fn watch_service(
    client: Arc<Client>,
    name: String,
    domain: Option<Hostname>,
    publisher: Publisher,
    stop: CancellationToken,
) {
    let limiter = rate_limiter(client.config.max_rate);
    let mut backoff = Backoff::default();
    let mut notices = Notices::default();
    let mut index = 0;
    let url = client.url(&["v1", "health", "service", &name]);
    loop {
        let answer = tokio::select! {
            _ = stop.cancelled() => return,
            answer = async {
                limiter.until_ready().await;
                client.get(url.clone(), index, &[("passing", "")]).await
            } => answer,
        };
        let entries = answer.and_then(|answer| {
            notices.observe(&answer, &name);
            let entries = decode_health(&answer.body).map_err(|message| ConsulError::Decode {
                url: url.clone(),
                message,
            })?;
            Ok((answer.index, entries))
        });
        match entries {
            Ok((answer_index, entries)) => {
                index = next_index(index, answer_index);
                backoff.reset();
                let content =
                    service_def(&name, &entries, &client.config.tag_prefix, domain.as_ref());
                if stop.is_cancelled() {
                    return;
                }
                publisher.update(|state| {
                    if let Some(service) = state.services.get_mut(&name) {
                        service.content = Some(content);
                        service.error = None;
                    }
                });
            }
            Err(err) => {
                let delay = backoff.next_delay();
                warn!(service = %name, error = %err, retry_in = ?delay, "consul health watch failing, keeping the last good servers");
                index = 0;
                publisher.update(|state| {
                    if let Some(service) = state.services.get_mut(&name) {
                        service.error = Some(err.to_string());
                    }
                });
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
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

    /// Counts and lower bounds only: a loaded machine makes the requests later, never sooner.
    #[tokio::test]
    async fn the_rate_limit_spaces_requests_after_the_burst() {
        // Taken before the limiter exists, so that it cannot have counted from earlier.
        let start = std::time::Instant::now();
        let limiter = rate_limiter(NonZeroU32::new(10).unwrap());
        // The whole burst is there at once: no request of it waits.
        for i in 0..RATE_BURST {
            assert!(
                limiter.check().is_ok(),
                "request {i} of the burst had to wait"
            );
        }
        // 5 more at 10/s cannot all pass before about 0.5 s.
        for _ in 0..5 {
            limiter.until_ready().await;
        }
        assert!(
            start.elapsed() >= Duration::from_millis(400),
            "{:?}",
            start.elapsed()
        );
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
        let (def, _) = service_def("shop", &entries, "weft.", None);
        // Empty Service.Address: the node's address.
        assert_eq!(def.servers, ["10.2.0.3:8080"]);
    }

    /// Go writes empty slices and maps as `null` (an agent's `"Meta": null`, a node without
    /// tagged addresses, an entry without checks).
    #[test]
    fn nulls_read_as_empty() {
        let body =
            br#"[{"Node":{"Node":"n1","Address":"10.2.0.3","TaggedAddresses":null,"Meta":null},
            "Service":{"ID":"shop-1","Service":"shop","Tags":null,"Address":null,"Port":8080,
              "Meta":null,"TaggedAddresses":null},
            "Checks":null}]"#;
        let entries = decode_health(body).unwrap();
        assert!(entries[0].checks.is_empty());
        let (def, _) = service_def("shop", &entries, "weft.", None);
        assert_eq!(def.servers, ["10.2.0.3:8080"]);
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
    }

    fn tags(list: &[&str]) -> Vec<String> {
        list.iter().map(|t| t.to_string()).collect()
    }

    #[test]
    fn exposure() {
        let domain = Hostname::parse("example.com").unwrap();
        assert!(is_exposed(&tags(&["weft.host=a.test"]), "weft.", None));
        assert!(!is_exposed(&tags(&["primary"]), "weft.", None));
        assert!(is_exposed(&tags(&["primary"]), "weft.", Some(&domain)));
        assert!(!is_exposed(
            &tags(&["weft.enable=false"]),
            "weft.",
            Some(&domain)
        ));
        assert!(!is_exposed(
            &tags(&["weft.enable=false", "weft.host=a.test"]),
            "weft.",
            None
        ));
        assert!(is_exposed(&tags(&["edge.host=a.test"]), "edge.", None));
    }

    #[test]
    fn routing_from_tags() {
        let entries = decode_health(
            br#"[{"Node":{"Node":"n1","Address":"10.1.0.1"},
                  "Service":{"ID":"b","Service":"shop","Tags":["weft.host=shop.test","weft.path=/api","weft.balance=leastconn","weft.check=/health","weft.colour=blue"],"Address":"10.2.2.7","Port":80}},
                 {"Node":{"Node":"n2","Address":"10.1.0.2"},
                  "Service":{"ID":"a","Service":"shop","Tags":["weft.host=www.shop.test","weft.host=shop.test"],"Address":"10.2.1.5","Port":80}}]"#,
        )
        .unwrap();
        let domain = Hostname::parse("example.com").unwrap();
        let (def, rejected) = service_def("shop", &entries, "weft.", Some(&domain));
        assert_eq!(
            def.hosts,
            ["shop.test", "www.shop.test", "shop.example.com"]
        );
        assert_eq!(def.servers, ["10.2.1.5:80", "10.2.2.7:80"]);
        assert_eq!(def.path.as_deref(), Some("/api"));
        assert_eq!(def.balance.as_deref(), Some("leastconn"));
        assert_eq!(def.check.as_deref(), Some("/health"));
        assert_eq!(rejected.len(), 1);
        assert!(rejected[0].subject.contains("weft.colour=blue"));
    }
}
