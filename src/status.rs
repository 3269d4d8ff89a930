//! What weft routes where, and why something is missing: `/` (HTML), `/status` (JSON),
//! `/healthz`.
//!
//! Read-only views of the controller's watch channels; serving them never blocks the data path.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use askama::Template;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use crate::bridge::{unix_seconds, BridgeState};
use crate::escape::Escaped;
use crate::haproxy::listeners::ForeignListeners;
use crate::haproxy::stats::{BackendStats, Stats, StatsCache};
use crate::model::{Built, Health, Ledger, ServiceName, SourceId, SourceReport};
use crate::slots::PoolUse;

/// What the apply loop last did, as the status page shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ApplyStatus {
    /// Applies attempted so far.
    pub generation: u64,
    /// HAProxy runs a config weft installed.
    pub running: bool,
    /// The master's reload counter after the last confirmed reload.
    pub reloads: u64,
    /// Servers and maps changed through the runtime API, without a reload, since start.
    pub runtime_updates: u64,
    /// The HAProxy backend that serves each service (its own, `be_NAME`, or a spare of the
    /// pool), for reading HAProxy's figures by service.
    #[serde(skip)]
    pub backends: Arc<BTreeMap<ServiceName, String>>,
    /// The backend pool: spare backends declared, and free for new services.
    pub pool: PoolUse,
    /// The last apply's error; `None` once an apply succeeds again.
    pub last_error: Option<String>,
    /// Unix seconds of the last successful change.
    pub last_change: Option<u64>,
    /// Services left out because `haproxy -c` rejected their backend.
    pub rejected: Vec<RejectedService>,
}

/// A service `haproxy -c` rejected: out of the routing until its definition changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RejectedService {
    pub service: String,
    pub source: String,
    pub reason: String,
}

/// The channels the status server reads.
#[derive(Clone)]
pub struct StatusFeed {
    pub reports: Vec<watch::Receiver<SourceReport>>,
    pub built: watch::Receiver<Option<Arc<Built>>>,
    pub apply: watch::Receiver<ApplyStatus>,
    pub bridge: watch::Receiver<BridgeState>,
    /// The claims ledger, as its keeper publishes it.
    pub ledger: watch::Receiver<Option<Ledger>>,
    /// Processes other than HAProxy listening on its binds.
    pub listeners: watch::Receiver<ForeignListeners>,
    /// HAProxy's live figures, read when asked for.
    pub stats: Arc<StatsCache>,
    /// HAProxy's Prometheus exporter, for `/metrics/haproxy`.
    pub prometheus: std::path::PathBuf,
}

/// The claims ledger at a glance.
#[derive(Debug, Serialize)]
struct ClaimsView {
    /// `ok`, `starting` (not read yet), `unread` (its store did not answer: only uncontested
    /// hosts route), `failing` (a read or a write fails now).
    state: &'static str,
    /// Hosts it holds.
    hosts: usize,
    /// Claims routed by this edge that its store does not hold yet.
    unrecorded: usize,
    trouble: Option<String>,
}

#[derive(Debug, Serialize)]
struct SourceView {
    name: String,
    state: &'static str,
    reason: Option<String>,
    since: Option<u64>,
    services: usize,
}

#[derive(Debug, Serialize)]
struct RouteView {
    host: String,
    path: String,
    service: String,
    backend: String,
    /// The service's servers, one list shared by its routes: a service of 5,000 servers on 64
    /// hosts is 5,000 texts per view, not 320,000.
    servers: Arc<[String]>,
}

/// The Marathon source's counters, for the metrics.
fn marathon_counts() -> crate::metrics::MarathonCounts {
    use crate::sources::marathon::{EventUse, Fetch, COUNTERS};
    crate::metrics::MarathonCounts {
        requests: [("full", Fetch::Full), ("app", Fetch::App)]
            .into_iter()
            .map(|(name, kind)| (name, COUNTERS.requests(kind), COUNTERS.bytes(kind)))
            .collect(),
        events: [
            ("applied", EventUse::Applied),
            ("fetched_app", EventUse::FetchedApp),
            ("fetched_all", EventUse::FetchedAll),
            ("ignored", EventUse::Ignored),
        ]
        .into_iter()
        .map(|(name, used)| (name, COUNTERS.events(used)))
        .collect(),
    }
}

/// A TLS certificate served by SNI.
#[derive(Debug, Serialize)]
struct CertificateView {
    name: String,
    sans: Vec<String>,
    /// Unix seconds.
    not_after: i64,
    serial: String,
}

#[derive(Debug, Serialize)]
struct DroppedView {
    source: String,
    subject: String,
    reason: String,
}

/// `/status`: everything at once.
#[derive(Debug, Serialize)]
struct StatusView {
    healthy: bool,
    problems: Vec<String>,
    sources: Vec<SourceView>,
    routes: Vec<RouteView>,
    dropped: Vec<DroppedView>,
    /// Claims that lost to a host's holder (also in `dropped`): a tenant reaching for another's
    /// host. They never fail `/healthz`, which a tenant must not be able to do; alert on
    /// `weft_host_conflicts` instead.
    conflicts: Vec<DroppedView>,
    claims: ClaimsView,
    haproxy: ApplyStatus,
    /// Sockets on HAProxy's binds that no HAProxy process of weft's holds (at most
    /// `listeners::MAX_SHOWN` listed, `count` all of them).
    foreign_listeners: ForeignListeners,
    bridge: BridgeState,
    /// HAProxy's live figures per routed service (its servers: those the service has now),
    /// read from `show stat` at most every 2 s; `null` when HAProxy did not answer.
    traffic: Option<BTreeMap<String, BackendStats>>,
    /// With `[tls]`: the certificates served by SNI (dropped ones are in `dropped`, source
    /// `tls`); `null` without `[tls]`.
    certificates: Option<Vec<CertificateView>>,
}

impl StatusFeed {
    /// The view with HAProxy's live figures, read (at a bounded rate) for it.
    async fn view_with_traffic(&self) -> StatusView {
        let stats = self.stats.get().await;
        let mut view = self.view();
        view.traffic = stats.map(|stats| traffic(&stats, &view.routes));
        view
    }

    fn view(&self) -> StatusView {
        let mut problems = Vec::new();
        let sources: Vec<SourceView> = self
            .reports
            .iter()
            .map(|rx| {
                let report = rx.borrow();
                let (state, reason, since) = match &report.health {
                    Health::Starting => ("starting", None, None),
                    Health::Ok => ("ok", None, None),
                    Health::Degraded { reason, since } => {
                        ("degraded", Some(reason.clone()), Some(unix_seconds(*since)))
                    }
                };
                if state != "ok" {
                    problems.push(format!(
                        "source {} is {state}{}",
                        report.source,
                        reason
                            .as_deref()
                            .map(|r| format!(": {r}"))
                            .unwrap_or_default()
                    ));
                }
                SourceView {
                    name: report.source.to_string(),
                    state,
                    reason,
                    since,
                    services: report.services.len(),
                }
            })
            .collect();
        let built = self.built.borrow().clone();
        let haproxy = self.apply.borrow().clone();
        let rejected = |service: &ServiceName| {
            haproxy
                .rejected
                .iter()
                .any(|r| r.service == service.as_str())
        };
        let view_of = |d: &crate::model::Dropped| DroppedView {
            source: d.source.to_string(),
            subject: d.subject.clone(),
            reason: d.reason.clone(),
        };
        let conflicts: Vec<DroppedView> = built
            .as_deref()
            .map(|b| b.conflicts.iter().map(view_of).collect())
            .unwrap_or_default();
        let (routes, mut dropped): (Vec<RouteView>, Vec<DroppedView>) = match built.as_deref() {
            Some(built) => {
                let mut servers_of: HashMap<&ServiceName, Arc<[String]>> = HashMap::new();
                let mut servers = |service| {
                    servers_of
                        .entry(service)
                        .or_insert_with(|| {
                            built.table.backends.get(service).map_or_else(
                                || Arc::from([]),
                                |b| b.servers.iter().map(ToString::to_string).collect(),
                            )
                        })
                        .clone()
                };
                (
                    built
                        .table
                        .routes
                        .iter()
                        .filter(|(_, service)| !rejected(service))
                        .map(|(key, service)| RouteView {
                            host: key.host.to_string(),
                            path: key.path.to_string(),
                            service: service.to_string(),
                            backend: haproxy
                                .backends
                                .get(service)
                                .cloned()
                                .unwrap_or_else(|| service.backend()),
                            servers: servers(service),
                        })
                        .collect(),
                    built.dropped.iter().map(view_of).collect(),
                )
            }
            None => (Vec::new(), Vec::new()),
        };
        // The reason is cut where it is made (controller::blame); the name is a valid one.
        dropped.extend(haproxy.rejected.iter().map(|r| DroppedView {
            source: r.source.clone(),
            subject: format!("service {:?}", r.service),
            reason: r.reason.clone(),
        }));
        if let Some(error) = &haproxy.last_error {
            problems.push(format!("haproxy: {error}"));
        } else if !haproxy.running {
            let yet = if haproxy.generation == 0 { " yet" } else { "" };
            problems.push(format!("haproxy: not running{yet}"));
        }
        let bridge = self.bridge.borrow().clone();
        problems.extend(bridge.problems());
        let claims = match self.ledger.borrow().as_ref() {
            None => ClaimsView {
                state: "starting",
                hosts: 0,
                unrecorded: 0,
                trouble: None,
            },
            Some(ledger) => ClaimsView {
                state: match (&ledger.trouble, ledger.unread) {
                    (Some(_), _) => "failing",
                    (None, true) => "unread",
                    (None, false) => "ok",
                },
                hosts: ledger.hosts.len(),
                unrecorded: ledger.hosts.values().filter(|h| !h.recorded).count(),
                trouble: ledger.trouble.clone(),
            },
        };
        // The ledger's store is the operator's (a token without KV write, a full disk): unlike a
        // conflict, which any tenant can cause, it fails /healthz.
        if let Some(trouble) = &claims.trouble {
            problems.push(format!("claims ledger: {trouble}"));
        }
        let tls = self
            .reports
            .iter()
            .any(|r| r.borrow().source == SourceId::Tls);
        let certificates = tls.then(|| {
            built
                .as_deref()
                .map(|b| {
                    b.table
                        .certificates
                        .values()
                        .map(|c| CertificateView {
                            name: c.name.clone(),
                            sans: c.sans.clone(),
                            not_after: c.not_after,
                            serial: c.serial.clone(),
                        })
                        .collect()
                })
                .unwrap_or_default()
        });
        let foreign_listeners = self.listeners.borrow().clone();
        problems.extend(foreign_listeners.listeners.iter().map(|l| {
            let owner = match (l.pid, &l.process) {
                (Some(pid), Some(name)) => format!("pid {pid} ({name:?})"),
                (Some(pid), None) => format!("pid {pid}"),
                (None, _) => "a process weft cannot see".to_string(),
            };
            format!(
                "foreign listener on {}: {owner} is not haproxy and takes a share of its connections",
                l.address
            )
        }));
        let unlisted = foreign_listeners.count - foreign_listeners.listeners.len();
        if unlisted > 0 {
            problems.push(format!("{unlisted} more foreign listeners"));
        }
        StatusView {
            healthy: problems.is_empty(),
            problems,
            sources,
            routes,
            dropped,
            conflicts,
            claims,
            haproxy,
            foreign_listeners,
            bridge,
            traffic: None,
            certificates,
        }
    }
}

/// Each routed service's figures, its servers those it routes to now (free slots left out).
/// Worked out once a service (its routes share its servers), each slot looked up in a set: a
/// service of 5,000 servers on 64 hosts costs 5,000 look-ups, not 64 times 5,000 squared.
fn traffic(stats: &Stats, routes: &[RouteView]) -> BTreeMap<String, BackendStats> {
    let mut traffic = BTreeMap::new();
    for route in routes {
        if traffic.contains_key(&route.service) {
            continue;
        }
        let Some(figures) = stats.get(&route.backend) else {
            continue;
        };
        let routed: HashSet<&str> = route.servers.iter().map(String::as_str).collect();
        let mut figures = figures.clone();
        figures
            .servers
            .retain(|server| routed.contains(server.address.as_str()));
        traffic.insert(route.service.clone(), figures);
    }
    traffic
}

#[derive(Template)]
#[template(path = "status.html")]
struct StatusPage<'a> {
    version: &'a str,
    status: &'a StatusView,
    /// What the filter box holds: rows whose text contains it, case-insensitively.
    filter: &'a str,
    routes: Shown<'a, RouteView>,
    /// With `[tls]`.
    certificates: Option<Shown<'a, CertificateView>>,
    conflicts: Shown<'a, DroppedView>,
    dropped: Shown<'a, DroppedView>,
}

/// The most servers of one route the page lists (the rest counted): a service with 5,000
/// servers takes one row of the page, not a page of its own. `/status` has them all.
pub const SERVERS_SHOWN: usize = 16;

/// The most rows of one list the page shows: at 10,000 routes a page stays a few hundred KB,
/// and the filter box (or `/status`) reaches the rest.
pub const PAGE_ROWS: usize = 500;
/// The longest filter the page takes.
const MAX_FILTER: usize = 200;

/// The rows of one list that match the filter, at most [`PAGE_ROWS`] of them.
struct Shown<'a, T> {
    rows: Vec<&'a T>,
    /// How many match, shown or not.
    matching: usize,
    /// How many there are.
    total: usize,
}

impl<'a, T> Shown<'a, T> {
    fn of(all: &'a [T], text: impl Fn(&T) -> String, filter: &str) -> Self {
        let filter = filter.to_lowercase();
        let matching: Vec<&T> = all
            .iter()
            .filter(|row| filter.is_empty() || text(row).to_lowercase().contains(&filter))
            .collect();
        Shown {
            matching: matching.len(),
            total: all.len(),
            rows: matching.into_iter().take(PAGE_ROWS).collect(),
        }
    }

    /// "N" or "N of M", and what is left out.
    fn count(&self) -> String {
        let mut text = if self.matching == self.total {
            self.total.to_string()
        } else {
            format!("{} of {}", self.matching, self.total)
        };
        if self.rows.len() < self.matching {
            text += &format!(
                ", the first {} shown: narrow with the filter",
                self.rows.len()
            );
        }
        text
    }
}

/// `/?q=...`: the page's filter.
#[derive(Debug, Default, serde::Deserialize)]
struct PageQuery {
    q: Option<String>,
}

impl StatusPage<'_> {
    fn traffic_of(&self, service: &str) -> Option<&BackendStats> {
        self.status.traffic.as_ref()?.get(service)
    }
}

async fn status_json(State(feed): State<StatusFeed>) -> Json<StatusView> {
    Json(feed.view_with_traffic().await)
}

async fn metrics(State(feed): State<StatusFeed>) -> Response {
    let view = feed.view();
    // Every source has its series, at 0 when nothing is dropped: an alert on it then has a
    // value to compare, not a missing series.
    let mut dropped: std::collections::BTreeMap<&str, usize> =
        view.sources.iter().map(|s| (s.name.as_str(), 0)).collect();
    for d in &view.dropped {
        *dropped.entry(d.source.as_str()).or_default() += 1;
    }
    let mut conflicts: std::collections::BTreeMap<&str, usize> =
        view.sources.iter().map(|s| (s.name.as_str(), 0)).collect();
    for d in &view.conflicts {
        *conflicts.entry(d.source.as_str()).or_default() += 1;
    }
    let backends: std::collections::BTreeSet<&str> =
        view.routes.iter().map(|r| r.service.as_str()).collect();
    let empty: std::collections::BTreeSet<&str> = view
        .routes
        .iter()
        .filter(|r| r.servers.is_empty())
        .map(|r| r.service.as_str())
        .collect();
    let snapshot = crate::metrics::Snapshot {
        healthy: view.healthy,
        reloads: view.haproxy.reloads,
        runtime_updates: view.haproxy.runtime_updates,
        applies: view.haproxy.generation,
        haproxy_up: view.haproxy.running,
        apply_failing: view.haproxy.last_error.is_some(),
        routes: view.routes.len(),
        backends: backends.len(),
        empty_backends: empty.len(),
        pool: (view.haproxy.pool.declared, view.haproxy.pool.free),
        dropped: dropped.into_iter().collect(),
        conflicts: conflicts.into_iter().collect(),
        sources: view
            .sources
            .iter()
            .map(|s| (s.name.as_str(), s.state == "ok", s.services))
            .collect(),
        bridge_ok: view.bridge.problems().is_empty(),
        foreign_listeners: view.foreign_listeners.count,
        tls: view
            .certificates
            .as_ref()
            .map(|certs| (certs.len(), certs.iter().map(|c| c.not_after).min())),
        marathon: view
            .sources
            .iter()
            .any(|s| s.name == crate::model::SourceId::Marathon.to_string())
            .then(marathon_counts),
        acme: view
            .sources
            .iter()
            .any(|s| s.name == crate::model::SourceId::Acme.to_string())
            .then(|| {
                use crate::sources::acme::COUNTERS;
                use std::sync::atomic::Ordering::Relaxed;
                vec![
                    ("placed", COUNTERS.orders.load(Relaxed)),
                    ("issued", COUNTERS.issued.load(Relaxed)),
                    ("failed", COUNTERS.failed.load(Relaxed)),
                    ("lost", COUNTERS.lost.load(Relaxed)),
                ]
            }),
    };
    match crate::metrics::encode_snapshot(&snapshot) {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(err) => (StatusCode::INTERNAL_SERVER_ERROR, err.to_string()).into_response(),
    }
}

/// HAProxy's own Prometheus exporter, passed through (`?scope=backend&scope=server`,
/// `?no-maint` as HAProxy reads them), spares in use named after their services.
async fn haproxy_metrics(State(feed): State<StatusFeed>, uri: axum::http::Uri) -> Response {
    use crate::haproxy::stats::{exporter, ExporterError};
    match exporter(&feed.prometheus, uri.query()).await {
        Ok(answer) => {
            let (parts, body) = answer.into_parts();
            let renames: Vec<(String, String)> = feed
                .apply
                .borrow()
                .backends
                .iter()
                .filter(|(_, backend)| backend.starts_with(crate::slots::SPARE_PREFIX))
                .map(|(service, spare)| {
                    (
                        format!("proxy=\"{spare}\""),
                        format!("proxy=\"{}\"", service.backend()),
                    )
                })
                .collect();
            let body = crate::haproxy::stats::spares_renamed(body, renames);
            let mut response = axum::body::Body::from_stream(body).into_response();
            *response.status_mut() = parts.status;
            if let Some(kind) = parts.headers.get(header::CONTENT_TYPE) {
                response
                    .headers_mut()
                    .insert(header::CONTENT_TYPE, kind.clone());
            }
            response
        }
        Err(err @ ExporterError::Query) => {
            (StatusCode::BAD_REQUEST, err.to_string()).into_response()
        }
        Err(err) => (StatusCode::BAD_GATEWAY, err.to_string()).into_response(),
    }
}

async fn healthz(State(feed): State<StatusFeed>) -> Response {
    let view = feed.view();
    if view.healthy {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        // One line per problem, whatever a source's reason holds: the body is read in terminals.
        let body: String = view
            .problems
            .iter()
            .map(|problem| format!("{}\n", Escaped(problem)))
            .collect();
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}

async fn page(
    State(feed): State<StatusFeed>,
    axum::extract::Query(query): axum::extract::Query<PageQuery>,
) -> Response {
    let view = feed.view_with_traffic().await;
    let filter: String = query
        .q
        .unwrap_or_default()
        .trim()
        .chars()
        .take(MAX_FILTER)
        .collect();
    let dropped_text = |d: &DroppedView| format!("{} {} {}", d.source, d.subject, d.reason);
    let page = StatusPage {
        version: env!("CARGO_PKG_VERSION"),
        status: &view,
        filter: &filter,
        routes: Shown::of(
            &view.routes,
            |r| format!("{}{} {} {}", r.host, r.path, r.service, r.servers.join(" ")),
            &filter,
        ),
        certificates: view.certificates.as_ref().map(|certificates| {
            Shown::of(
                certificates,
                |c| format!("{} {}", c.name, c.sans.join(" ")),
                &filter,
            )
        }),
        conflicts: Shown::of(&view.conflicts, dropped_text, &filter),
        dropped: Shown::of(&view.dropped, dropped_text, &filter),
    };
    match page.render() {
        Ok(html) => ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response(),
        Err(err) => (StatusCode::INTERNAL_SERVER_ERROR, err.to_string()).into_response(),
    }
}

/// Connections the status server holds at once; the next waits to be accepted until one
/// closes. Operators' browsers, `weft status` and a scraper or two need a handful.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a client may take to send a request's headers (also, on a kept-alive connection,
/// to start the next request).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection takes new requests: then it is closed gracefully, its request in
/// progress answered first (within [`ANSWER_GRACE`]); a scraper simply opens the next.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// How long an answer in progress may still take once its connection is past
/// [`CONNECTION_LIFETIME`]: enough for a scrape of `/metrics/haproxy` at 10,000 services (tens
/// of MB, within Prometheus' own `scrape_timeout`), so that a client that never reads holds one
/// of [`MAX_CONNECTIONS`] two minutes at most. At weft's shutdown, [`HEADER_TIMEOUT`].
pub const ANSWER_GRACE: Duration = Duration::from_secs(60);

/// Serves the status endpoints on an already-bound listener until `shutdown`: HTTP/1.1, at
/// most [`MAX_CONNECTIONS`] connections at once, each bounded in time ([`HEADER_TIMEOUT`],
/// [`CONNECTION_LIFETIME`], [`ANSWER_GRACE`]). At shutdown, the answers in progress get
/// [`HEADER_TIMEOUT`] to finish.
pub async fn serve(
    listener: TcpListener,
    feed: StatusFeed,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/", get(page))
        .route("/status", get(status_json))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/metrics/haproxy", get(haproxy_metrics))
        .with_state(feed);
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = async {
                // Never closed: it lives in this function.
                let permit = permits.clone().acquire_owned().await.ok()?;
                Some((permit, listener.accept().await))
            } => accepted,
        };
        let (permit, stream) = match accepted {
            Some((permit, Ok((stream, _)))) => (permit, stream),
            Some((_, Err(err))) => {
                // Out of file descriptors, a connection reset before it was accepted: the
                // listener itself is fine; a second later it may accept again (and the log
                // gets a line a second, not a flood).
                warn!(error = %err, "status server cannot accept a connection");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            None => break,
        };
        let service = TowerToHyperService::new(app.clone());
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let _permit = permit;
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let connection = http.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            let lifetime = tokio::time::sleep(CONNECTION_LIFETIME);
            let grace = tokio::select! {
                _ = connection.as_mut() => return,
                _ = shutdown.cancelled() => HEADER_TIMEOUT,
                () = lifetime => ANSWER_GRACE,
            };
            connection.as_mut().graceful_shutdown();
            // Its answer in progress, if any.
            let _ = tokio::time::timeout(grace, connection).await;
        });
    }
    connections.close();
    connections.wait().await;
    Ok(())
}

#[cfg(test)]
mod page_tests {
    use super::*;

    /// At 1,000 services the page lists at most PAGE_ROWS routes, says how many more there
    /// are, and the filter finds any of them.
    #[test]
    fn a_thousand_routes_are_shown_bounded_and_filtered() {
        let routes: Vec<RouteView> = (0..1000)
            .map(|i| RouteView {
                host: format!("svc{i}.example.com"),
                path: "/".into(),
                service: format!("svc{i}"),
                backend: format!("be_svc{i}"),
                servers: vec![format!("10.2.1.{}:80", i % 250)].into(),
            })
            .collect();
        let text = |r: &RouteView| format!("{}{} {}", r.host, r.path, r.service);
        let all = Shown::of(&routes, text, "");
        assert_eq!(
            (all.rows.len(), all.matching, all.total),
            (PAGE_ROWS, 1000, 1000)
        );
        assert_eq!(
            all.count(),
            "1000, the first 500 shown: narrow with the filter"
        );
        let one = Shown::of(&routes, text, "SVC999.");
        assert_eq!(one.rows.len(), 1);
        assert_eq!(one.rows[0].service, "svc999");
        assert_eq!(one.count(), "1 of 1000");
    }

    /// A service's figures list the servers it routes to now: a free slot, or one whose
    /// address the table no longer holds, is left out; its hosts share one entry.
    #[test]
    fn traffic_lists_a_services_routed_servers_once() {
        let servers: Arc<[String]> = (0..5000)
            .map(|i| format!("10.2.{}.{}:80", i / 250, i % 250))
            .collect();
        let routes: Vec<RouteView> = (0..64)
            .map(|h| RouteView {
                host: format!("h{h}.example.com"),
                path: "/".into(),
                service: "big".into(),
                backend: "be_big".into(),
                servers: servers.clone(),
            })
            .collect();
        let slot = |i: usize, address: &str| crate::haproxy::stats::ServerStats {
            slot: format!("s{i}"),
            address: address.into(),
            ..Default::default()
        };
        let mut slots: Vec<_> = servers
            .iter()
            .enumerate()
            .map(|(i, a)| slot(i, a))
            .collect();
        slots.push(slot(5000, "0.0.0.0:0"));
        slots.push(slot(5001, "10.2.99.1:80"));
        let stats: Stats = [(
            "be_big".to_string(),
            BackendStats {
                requests: 7,
                servers: slots,
                ..Default::default()
            },
        )]
        .into();
        let traffic = traffic(&stats, &routes);
        assert_eq!(traffic.len(), 1);
        assert_eq!(traffic["big"].requests, 7);
        assert_eq!(traffic["big"].servers.len(), 5000);
        assert!(traffic["big"]
            .servers
            .iter()
            .all(|s| s.address != "10.2.99.1:80"));
    }
}

#[cfg(test)]
mod server_tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// A status server on loopback with empty state; the senders are kept for as long as it
    /// runs.
    async fn server() -> (
        std::net::SocketAddr,
        CancellationToken,
        watch::Sender<Option<Arc<Built>>>,
        impl Sized,
    ) {
        let (report_tx, report) = watch::channel(SourceReport::starting(SourceId::File));
        let (built_tx, built) = watch::channel(None);
        let (apply_tx, apply) = watch::channel(ApplyStatus::default());
        let (bridge_tx, bridge) = watch::channel(BridgeState::new(&Default::default()));
        let (ledger_tx, ledger) = watch::channel(None);
        let (listeners_tx, listeners) = watch::channel(ForeignListeners::default());
        let dir = tempfile::tempdir().unwrap();
        let feed = StatusFeed {
            reports: vec![report],
            built,
            apply,
            bridge,
            ledger,
            listeners,
            stats: Arc::new(StatsCache::new(dir.path().join("admin.sock"))),
            prometheus: dir.path().join("prometheus.sock"),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        tokio::spawn(serve(listener, feed, shutdown.clone()));
        let kept = (report_tx, apply_tx, bridge_tx, ledger_tx, listeners_tx, dir);
        (addr, shutdown, built_tx, kept)
    }

    /// The first bytes of the answer to `GET /healthz` on `stream`, or `None` if none came
    /// within `wait`.
    async fn healthz(stream: &mut TcpStream, wait: Duration) -> Option<String> {
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: weft\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = [0; 64];
        match tokio::time::timeout(wait, stream.read(&mut answer)).await {
            Ok(Ok(n)) if n > 0 => Some(String::from_utf8_lossy(&answer[..n]).into_owned()),
            _ => None,
        }
    }

    /// With every connection taken, the next waits, unanswered, until one closes; then it is
    /// served.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_are_bounded_and_the_next_waits_its_turn() {
        let (addr, shutdown, _built, _kept) = server().await;
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        let mut next = TcpStream::connect(addr).await.unwrap();
        assert_eq!(healthz(&mut next, Duration::from_secs(1)).await, None);
        idle.pop();
        let answer = healthz(&mut next, Duration::from_secs(5)).await;
        assert!(
            answer
                .as_deref()
                .is_some_and(|a| a.starts_with("HTTP/1.1 ")),
            "{answer:?}"
        );
        shutdown.cancel();
    }

    /// A service of 40 servers takes one row of the page: 16 servers listed, the rest
    /// counted; `/status` has all 40.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_page_lists_a_routes_servers_up_to_the_bound() {
        let (addr, shutdown, built_tx, _kept) = server().await;
        let servers: Vec<String> = (0..40).map(|i| format!("10.2.1.{}:80", i + 2)).collect();
        let servers: Vec<&str> = servers.iter().map(String::as_str).collect();
        let report = SourceReport {
            services: vec![Arc::new(crate::model::ServiceDef::new(
                "shop",
                &["shop.example.com"],
                &servers,
            ))],
            ..SourceReport::starting(SourceId::File)
        };
        let settings =
            crate::model::ModelSettings::new(crate::network::AllowedNetworks::new(["10.2.0.0/16"
                .parse()
                .unwrap()]));
        let built = crate::model::build(&[&report], &settings, &Ledger::default());
        built_tx.send_replace(Some(Arc::new(built)));
        let get = |path: &str| {
            let url = format!("http://{addr}{path}");
            async move { reqwest::get(url).await.unwrap().text().await.unwrap() }
        };
        let page = get("/").await;
        assert!(page.contains("10.2.1.17:80"), "the 16th server");
        assert!(!page.contains("10.2.1.18:80"), "the 17th server");
        assert!(page.contains("and 24 more"));
        assert!(get("/status").await.contains("10.2.1.41:80"));
        shutdown.cancel();
    }

    /// A connection that never sends a request is closed after the header timeout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_silent_connection_is_closed_after_the_header_timeout() {
        let (addr, shutdown, _built, _kept) = server().await;
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let mut partial = TcpStream::connect(addr).await.unwrap();
        partial.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let start = tokio::time::Instant::now();
        for stream in [&mut silent, &mut partial] {
            let mut buf = Vec::new();
            let read = tokio::time::timeout(
                HEADER_TIMEOUT + Duration::from_secs(5),
                stream.read_to_end(&mut buf),
            )
            .await;
            assert!(read.is_ok(), "still open after {:?}", start.elapsed());
        }
        assert!(start.elapsed() >= HEADER_TIMEOUT - Duration::from_secs(1));
        shutdown.cancel();
    }
}
