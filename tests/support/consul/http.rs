//! HTTP side: the axum handlers, query parameters, ACL tokens, faults, blocking queries and the
//! `X-Consul-*` headers.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, HttpBody};
use axum::extract::{Path, Query, Request, State as AxumState};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::json::{render, render_filtered};
use super::state::{Endpoint, Shared};
use super::{
    parse_go_bool, parse_go_duration, parse_go_uint, Fault, CATALOG_SERVICES, DATACENTER,
    DEFAULT_WAIT, HEALTH_SERVICE, HEALTH_STATE, JITTER_FRACTION, MAX_WAIT, OTHER_PATHS,
};

type SharedState = AxumState<Arc<Shared>>;
type Params = Query<Vec<(String, String)>>;

/// Counts the request when it arrives (a stalled one too) and its body when it is answered.
pub(super) async fn record(
    AxumState(shared): SharedState,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path().to_string();
    let endpoint = [CATALOG_SERVICES, HEALTH_SERVICE, HEALTH_STATE]
        .into_iter()
        .find(|prefix| path.starts_with(prefix))
        .unwrap_or(OTHER_PATHS);
    {
        let mut state = shared.lock();
        let requests = &mut state.requests;
        requests.total += 1;
        requests.by_endpoint.entry(endpoint).or_default().requests += 1;
        *requests.by_path.entry(path.clone()).or_default() += 1;
        let query = request.uri().query().unwrap_or("").to_string();
        state.last_query.insert(path, query);
    }
    let response = next.run(request).await;
    // Every body the double makes is whole: its size is known.
    let bytes = response.body().size_hint().lower();
    let mut state = shared.lock();
    state.requests.body_bytes += bytes;
    state
        .requests
        .by_endpoint
        .entry(endpoint)
        .or_default()
        .body_bytes += bytes;
    drop(state);
    response
}

pub(super) async fn catalog_services(
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

/// `/v1/health/service/:name`, and `/v1/health/service/` without one (a 400, after the checks
/// that come before it).
pub(super) async fn health_service(
    AxumState(shared): SharedState,
    name: Option<Path<String>>,
    headers: HeaderMap,
    Query(params): Params,
) -> Response {
    let (path, name) = named(HEALTH_SERVICE, name);
    answer(&shared, &headers, &params, path, |params| {
        let name = name.ok_or(Rejection(StatusCode::BAD_REQUEST, "Missing service name"))?;
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

/// `/v1/health/state/:state`, and `/v1/health/state/` without one. Consul
/// (`HealthChecksInState`) only refuses an empty state; any other goes to the state store,
/// where a state that no check has (`bogus`) is an empty list, not an error.
pub(super) async fn health_state(
    AxumState(shared): SharedState,
    state: Option<Path<String>>,
    headers: HeaderMap,
    Query(params): Params,
) -> Response {
    let (path, state) = named(HEALTH_STATE, state);
    answer(&shared, &headers, &params, path, |_| {
        let state = state.ok_or(Rejection(StatusCode::BAD_REQUEST, "Missing check state"))?;
        Ok(Endpoint::State { state })
    })
    .await
}

/// The request's path under `prefix`, and the name in it (none when empty).
fn named(prefix: &str, name: Option<Path<String>>) -> (String, Option<String>) {
    let name = name.map(|Path(name)| name);
    let path = format!("{prefix}{}", name.as_deref().unwrap_or_default());
    (path, name)
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
    let (options, endpoint, access) = match admit(shared, headers, params, endpoint) {
        Ok(admitted) => admitted,
        Err(rejection) => return rejection.into_response(),
    };
    block(shared, &endpoint, &path, &options).await;

    let (index, response, fault) = {
        let state = shared.lock();
        let index = state.reported(state.endpoint_index(&endpoint));
        let response = match access {
            Access::Full => render(&state, &endpoint),
            Access::Anonymous => render_filtered(&endpoint),
        };
        (index, response, state.fault)
    };
    let mut response = with_consul_headers(response, index, options.consistency);
    if fault == Fault::NoLeader {
        // Only stale reads get here: from a server that lost its leader a while ago.
        let headers = response.headers_mut();
        headers.insert("x-consul-knownleader", HeaderValue::from_static("false"));
        headers.insert("x-consul-lastcontact", HeaderValue::from_static("15000"));
    }
    if access == Access::Anonymous {
        response.headers_mut().insert(
            "X-Consul-Results-Filtered-By-ACLs",
            HeaderValue::from_static("true"),
        );
    }
    if fault == Fault::Garbage {
        response = truncate_body(response).await;
    }
    response
}

/// What the request's token may read, with ACLs on (`set_token`) and `acl.default_policy =
/// "deny"`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    /// The configured token, or ACLs off.
    Full,
    /// No token: the anonymous token, which may read nothing. Consul filters the results
    /// (a 200 with `[]` or a catalog without services), it does not refuse the request.
    Anonymous,
}

/// Query options, the endpoint's own parameters, the ACL, then the RPC (faults, datacenter).
fn admit(
    shared: &Arc<Shared>,
    headers: &HeaderMap,
    params: &[(String, String)],
    endpoint: impl FnOnce(&[(String, String)]) -> Result<Endpoint, Rejection>,
) -> Result<(QueryOptions, Endpoint, Access), Rejection> {
    let options = QueryOptions::parse(params)?;
    let endpoint = endpoint(params)?;
    let (fault, token) = {
        let state = shared.lock();
        (state.fault, state.token.clone())
    };
    let access = match (token, presented_token(headers, params)) {
        (None, _) => Access::Full,
        (Some(_), None) => Access::Anonymous,
        (Some(expected), Some(presented)) if presented == expected => Access::Full,
        // A token Consul does not know (never created, or revoked).
        (Some(_), Some(_)) => return Err(Rejection(StatusCode::FORBIDDEN, "ACL not found")),
    };
    match fault {
        // A server without a leader still answers stale reads from its own state.
        Fault::NoLeader if !matches!(options.consistency, Consistency::Stale) => {
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
        Fault::NoLeader | Fault::None | Fault::Stall | Fault::Garbage | Fault::IndexBackwards => {}
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
    Ok((options, endpoint, access))
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

/// The request's token, where Consul looks for it and in its order (`parseTokenInternal`):
/// `?token=`, then `X-Consul-Token`, then `Authorization: Bearer` (scheme in any case). The
/// first one present counts, right or wrong.
fn presented_token<'a>(headers: &'a HeaderMap, params: &'a [(String, String)]) -> Option<&'a str> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let bearer = header("authorization").and_then(|v| {
        let (scheme, token) = v.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
    });
    [first(params, "token"), header("x-consul-token"), bearer]
        .into_iter()
        .flatten()
        .find(|token| !token.is_empty())
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
