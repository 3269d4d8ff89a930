//! Prometheus metrics, read from the same view as the status page at each scrape.
//!
//! Names are constants here, in one place. Counters count since weft started.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// `weft_haproxy_reloads_total`: confirmed reloads (HAProxy master's counter).
pub const RELOADS: &str = "weft_haproxy_reloads";
/// `weft_haproxy_runtime_updates_total`: servers and maps changed without a reload.
pub const RUNTIME_UPDATES: &str = "weft_haproxy_runtime_updates";
/// `weft_apply_generation_total`: applies attempted.
pub const APPLIES: &str = "weft_apply_generation";
/// 1 while HAProxy runs a config weft installed.
pub const HAPROXY_UP: &str = "weft_haproxy_up";
/// 1 when the last apply failed (HAProxy keeps its last good config).
pub const APPLY_FAILING: &str = "weft_apply_failing";
/// Routes (host + path) and backends in the applied table.
pub const ROUTES: &str = "weft_routes";
pub const BACKENDS: &str = "weft_backends";
/// Backends with no server: their hosts answer 503.
pub const EMPTY_BACKENDS: &str = "weft_backends_without_servers";
/// Inputs dropped with a reason, by source.
pub const DROPPED: &str = "weft_dropped_inputs";
/// Claims that lost to a host's holder, by the losing claim's source.
pub const CONFLICTS: &str = "weft_host_conflicts";
/// 1 when the source is ok, 0 when degraded or starting; by source.
pub const SOURCE_UP: &str = "weft_source_up";
/// Services each source currently reports.
pub const SOURCE_SERVICES: &str = "weft_source_services";
/// 1 when the weave bridge is as configured (or off), 0 with a problem.
pub const BRIDGE_OK: &str = "weft_bridge_ok";
/// Sockets on HAProxy's binds that are not HAProxy's (a process sharing its port).
pub const FOREIGN_LISTENERS: &str = "weft_foreign_listeners";
/// With `[tls]`: certificates served (weft's default not counted), and the earliest notAfter
/// among them, unix seconds (absent with none).
pub const TLS_CERTIFICATES: &str = "weft_tls_certificates";
pub const TLS_EARLIEST_EXPIRY: &str = "weft_tls_certificate_earliest_expiry_seconds";
/// The backend pool: spare backends the running config declares, and those free (as many new
/// services can come without a reload; at 0, the next one waits for a reload).
pub const POOL_SPARES: &str = "weft_pool_spare_backends";
pub const POOL_FREE: &str = "weft_pool_spare_backends_free";
/// With the Marathon source: requests and bytes by kind (`full`: `/v2/apps`, `app`:
/// `/v2/apps/{id}`), and events by how they were used (`applied` in place, `fetched_app`,
/// `fetched_all`, `ignored`).
pub const MARATHON_REQUESTS: &str = "weft_marathon_requests";
pub const MARATHON_BYTES: &str = "weft_marathon_bytes";
pub const MARATHON_EVENTS: &str = "weft_marathon_events";
/// With `[tls.acme]`: this edge's ACME work, by result (`placed`: new orders sent to the CA,
/// `issued`: certificates stored, `failed`: orders failed, each recorded with its backoff,
/// `lost`: orders stopped because this edge's lock expired under them).
pub const ACME_ORDERS: &str = "weft_acme_orders";
/// 1 when `/healthz` answers 200.
pub const HEALTHY: &str = "weft_healthy";

type Labels = Vec<(String, String)>;

/// What a scrape reports, taken from the status view.
pub struct Snapshot<'a> {
    pub healthy: bool,
    pub reloads: u64,
    pub runtime_updates: u64,
    pub applies: u64,
    pub haproxy_up: bool,
    pub apply_failing: bool,
    pub routes: usize,
    pub backends: usize,
    pub empty_backends: usize,
    /// `(declared, free)` spare backends.
    pub pool: (usize, usize),
    /// `(source, dropped count)`.
    pub dropped: Vec<(&'a str, usize)>,
    /// `(source, lost claims)`.
    pub conflicts: Vec<(&'a str, usize)>,
    /// `(source, up, services)`.
    pub sources: Vec<(&'a str, bool, usize)>,
    pub bridge_ok: bool,
    pub foreign_listeners: usize,
    /// With `[tls]`: `(certificates, earliest notAfter)`.
    pub tls: Option<(usize, Option<i64>)>,
    /// With the Marathon source.
    pub marathon: Option<MarathonCounts>,
    /// With `[tls.acme]`: `(result, count)`.
    pub acme: Option<Vec<(&'static str, u64)>>,
}

/// What the Marathon source asked and read, since weft started.
pub struct MarathonCounts {
    /// `(kind, requests, bytes)`.
    pub requests: Vec<(&'static str, u64, u64)>,
    /// `(use, events)`.
    pub events: Vec<(&'static str, u64)>,
}

fn gauge(registry: &mut Registry, name: &str, help: &str, value: i64) {
    let gauge: Gauge = Gauge::default();
    gauge.set(value);
    registry.register(name, help, gauge);
}

fn counter(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let counter: Counter = Counter::default();
    counter.inc_by(value);
    registry.register(name, help, counter);
}

fn by_source(source: &str) -> Labels {
    vec![("source".to_string(), source.to_string())]
}

/// The Prometheus text exposition of `snapshot`.
pub fn encode_snapshot(snapshot: &Snapshot) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    counter(
        &mut registry,
        RELOADS,
        "Confirmed HAProxy reloads",
        snapshot.reloads,
    );
    counter(
        &mut registry,
        RUNTIME_UPDATES,
        "Servers and maps changed through the runtime API, without a reload",
        snapshot.runtime_updates,
    );
    counter(
        &mut registry,
        APPLIES,
        "Applies attempted",
        snapshot.applies,
    );
    gauge(
        &mut registry,
        HAPROXY_UP,
        "HAProxy runs a config weft installed",
        snapshot.haproxy_up.into(),
    );
    gauge(
        &mut registry,
        APPLY_FAILING,
        "The last apply failed",
        snapshot.apply_failing.into(),
    );
    gauge(
        &mut registry,
        ROUTES,
        "Routes (host and path prefix)",
        snapshot.routes as i64,
    );
    gauge(
        &mut registry,
        BACKENDS,
        "Backends (services)",
        snapshot.backends as i64,
    );
    gauge(
        &mut registry,
        EMPTY_BACKENDS,
        "Backends without a server (503)",
        snapshot.empty_backends as i64,
    );
    gauge(
        &mut registry,
        POOL_SPARES,
        "Spare backends the running config declares for new services",
        snapshot.pool.0 as i64,
    );
    gauge(
        &mut registry,
        POOL_FREE,
        "Spare backends free: new services that can come without a reload",
        snapshot.pool.1 as i64,
    );
    gauge(
        &mut registry,
        BRIDGE_OK,
        "The weave bridge is as configured",
        snapshot.bridge_ok.into(),
    );
    gauge(
        &mut registry,
        FOREIGN_LISTENERS,
        "Sockets on HAProxy's binds held by a process that is not HAProxy",
        snapshot.foreign_listeners as i64,
    );
    gauge(
        &mut registry,
        HEALTHY,
        "weft is healthy (/healthz answers 200)",
        snapshot.healthy.into(),
    );

    let dropped = Family::<Labels, Gauge>::default();
    for (source, count) in &snapshot.dropped {
        dropped.get_or_create(&by_source(source)).set(*count as i64);
    }
    registry.register(DROPPED, "Inputs dropped with a reason, by source", dropped);
    let conflicts = Family::<Labels, Gauge>::default();
    for (source, count) in &snapshot.conflicts {
        conflicts
            .get_or_create(&by_source(source))
            .set(*count as i64);
    }
    registry.register(
        CONFLICTS,
        "Routes refused because another service holds the host, by source",
        conflicts,
    );
    let up = Family::<Labels, Gauge>::default();
    let services = Family::<Labels, Gauge>::default();
    for (source, is_up, count) in &snapshot.sources {
        up.get_or_create(&by_source(source)).set((*is_up).into());
        services
            .get_or_create(&by_source(source))
            .set(*count as i64);
    }
    registry.register(SOURCE_UP, "The source is ok (0: degraded or starting)", up);
    registry.register(SOURCE_SERVICES, "Services the source reports", services);
    if let Some(marathon) = &snapshot.marathon {
        let requests = Family::<Labels, Counter>::default();
        let bytes = Family::<Labels, Counter>::default();
        for (kind, count, read) in &marathon.requests {
            let labels = vec![("kind".to_string(), kind.to_string())];
            requests.get_or_create(&labels).inc_by(*count);
            bytes.get_or_create(&labels).inc_by(*read);
        }
        registry.register(
            MARATHON_REQUESTS,
            "Requests to Marathon, by kind (full: /v2/apps, app: /v2/apps/{id})",
            requests,
        );
        registry.register(
            MARATHON_BYTES,
            "Bytes of Marathon's answers read, by kind",
            bytes,
        );
        let events = Family::<Labels, Counter>::default();
        for (used, count) in &marathon.events {
            events
                .get_or_create(&vec![("use".to_string(), used.to_string())])
                .inc_by(*count);
        }
        registry.register(
            MARATHON_EVENTS,
            "Marathon events, by use (applied in place, fetched_app, fetched_all, ignored)",
            events,
        );
    }

    if let Some(acme) = &snapshot.acme {
        let orders = Family::<Labels, Counter>::default();
        for (result, count) in acme {
            orders
                .get_or_create(&vec![("result".to_string(), result.to_string())])
                .inc_by(*count);
        }
        registry.register(
            ACME_ORDERS,
            "ACME orders of this edge, by result (placed, issued, failed)",
            orders,
        );
    }

    if let Some((count, earliest)) = snapshot.tls {
        gauge(
            &mut registry,
            TLS_CERTIFICATES,
            "TLS certificates served (weft's default not counted)",
            count as i64,
        );
        if let Some(earliest) = earliest {
            gauge(
                &mut registry,
                TLS_EARLIEST_EXPIRY,
                "The earliest notAfter of the TLS certificates served, unix seconds",
                earliest,
            );
        }
    }

    let mut text = String::new();
    encode(&mut text, &registry)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition() {
        let text = encode_snapshot(&Snapshot {
            healthy: false,
            reloads: 3,
            runtime_updates: 17,
            applies: 25,
            haproxy_up: true,
            apply_failing: false,
            routes: 4,
            backends: 3,
            empty_backends: 1,
            pool: (20, 7),
            dropped: vec![("file", 2)],
            conflicts: vec![("consul", 1)],
            sources: vec![("file", true, 3), ("consul", false, 0)],
            bridge_ok: true,
            foreign_listeners: 2,
            tls: Some((2, Some(1_800_000_000))),
            marathon: Some(MarathonCounts {
                requests: vec![("full", 2, 40_000_000), ("app", 9, 20_000)],
                events: vec![("applied", 1200), ("fetched_app", 9)],
            }),
            acme: Some(vec![("placed", 3), ("issued", 2), ("failed", 1)]),
        })
        .unwrap();
        for line in [
            "weft_haproxy_reloads_total 3",
            "weft_haproxy_runtime_updates_total 17",
            "weft_routes 4",
            "weft_backends_without_servers 1",
            "weft_pool_spare_backends 20",
            "weft_pool_spare_backends_free 7",
            "weft_dropped_inputs{source=\"file\"} 2",
            "weft_host_conflicts{source=\"consul\"} 1",
            "weft_source_up{source=\"consul\"} 0",
            "weft_source_services{source=\"file\"} 3",
            "weft_healthy 0",
            "weft_foreign_listeners 2",
            "weft_tls_certificates 2",
            "weft_tls_certificate_earliest_expiry_seconds 1800000000",
            "weft_marathon_requests_total{kind=\"full\"} 2",
            "weft_marathon_bytes_total{kind=\"app\"} 20000",
            "weft_marathon_events_total{use=\"applied\"} 1200",
            "weft_acme_orders_total{result=\"failed\"} 1",
            "# EOF",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing in:\n{text}"
            );
        }
    }
}
