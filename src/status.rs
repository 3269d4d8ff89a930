//! What weft routes where, and why something is missing: `/` (HTML), `/status` (JSON),
//! `/healthz`.
//!
//! Read-only views of the controller's watch channels; serving them never blocks the data path.

use std::sync::Arc;

use askama::Template;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::bridge::{unix_seconds, BridgeState};
use crate::model::{Built, Health, Ledger, ServiceName, SourceReport};

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
    servers: Vec<String>,
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
    bridge: BridgeState,
}

impl StatusFeed {
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
            Some(built) => (
                built
                    .table
                    .routes
                    .iter()
                    .filter(|(_, service)| !rejected(service))
                    .map(|(key, service)| RouteView {
                        host: key.host.to_string(),
                        path: key.path.to_string(),
                        service: service.to_string(),
                        backend: service.backend(),
                        servers: built
                            .table
                            .backends
                            .get(service)
                            .map(|b| b.servers.iter().map(ToString::to_string).collect())
                            .unwrap_or_default(),
                    })
                    .collect(),
                built.dropped.iter().map(view_of).collect(),
            ),
            None => (Vec::new(), Vec::new()),
        };
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
        StatusView {
            healthy: problems.is_empty(),
            problems,
            sources,
            routes,
            dropped,
            conflicts,
            claims,
            haproxy,
            bridge,
        }
    }
}

#[derive(Template)]
#[template(path = "status.html")]
struct StatusPage<'a> {
    version: &'a str,
    status: &'a StatusView,
}

async fn status_json(State(feed): State<StatusFeed>) -> Json<StatusView> {
    Json(feed.view())
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
        dropped: dropped.into_iter().collect(),
        conflicts: conflicts.into_iter().collect(),
        sources: view
            .sources
            .iter()
            .map(|s| (s.name.as_str(), s.state == "ok", s.services))
            .collect(),
        bridge_ok: view.bridge.problems().is_empty(),
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

async fn healthz(State(feed): State<StatusFeed>) -> Response {
    let view = feed.view();
    if view.healthy {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        let body = view.problems.join("\n") + "\n";
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}

async fn page(State(feed): State<StatusFeed>) -> Response {
    let view = feed.view();
    let page = StatusPage {
        version: env!("CARGO_PKG_VERSION"),
        status: &view,
    };
    match page.render() {
        Ok(html) => ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response(),
        Err(err) => (StatusCode::INTERNAL_SERVER_ERROR, err.to_string()).into_response(),
    }
}

/// Serves the status endpoints on an already-bound listener until `shutdown`.
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
        .with_state(feed);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}
