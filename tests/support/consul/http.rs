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
use axum::Json;
use futures::StreamExt;

use super::go::go_quote;
use super::json::{render, render_filtered, SessionJson};
use super::session::{generate_id, NewSession};
use super::state::{Endpoint, Shared};
use super::txn::{
    self, BodyError, KvOp, TxnReadJson, TxnResponseJson, TXN_MAX_OPS, TXN_MAX_REQ_LEN,
    TXN_MAX_REQ_LEN_DOCS,
};
use super::{
    parse_go_bool, parse_go_duration, parse_go_uint, Fault, CATALOG_SERVICES, DATACENTER,
    DEFAULT_WAIT, HEALTH_SERVICE, HEALTH_STATE, JITTER_FRACTION, KV, KV_MAX_VALUE_SIZE, MAX_WAIT,
    OTHER_PATHS, SESSION, TXN,
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
    let endpoint = [
        CATALOG_SERVICES,
        HEALTH_SERVICE,
        HEALTH_STATE,
        KV,
        SESSION,
        TXN,
    ]
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

/// `GET /v1/kv/:key` (`KVSGet`, `KVSGetKeys` in `agent/kvs_endpoint.go`): `?keys` lists keys,
/// `?recurse` entries under a prefix, otherwise one key (`?raw`: its value alone).
pub(super) async fn kv_get(
    AxumState(shared): SharedState,
    key: Option<Path<String>>,
    headers: HeaderMap,
    Query(params): Params,
) -> Response {
    let (path, key) = named(KV, key);
    let key = key.unwrap_or_default();
    answer(&shared, &headers, &params, path, |params| {
        if has(params, "keys") {
            // The old spelling first, the right one wins (`KVSGetKeys`).
            let separator = first(params, "separator")
                .or_else(|| first(params, "seperator"))
                .unwrap_or_default()
                .to_string();
            return Ok(Endpoint::KvKeys {
                prefix: key,
                separator,
            });
        }
        if has(params, "recurse") {
            return Ok(Endpoint::KvList { prefix: key });
        }
        if key.is_empty() {
            return Err(Rejection(StatusCode::BAD_REQUEST, "Missing key name"));
        }
        Ok(Endpoint::KvGet {
            key,
            raw: has(params, "raw"),
        })
    })
    .await
}

/// What a KV PUT asks of the state store (`KVSPut` picks the `api.KVOp`).
enum KvWrite {
    Set,
    Cas(u64),
    Lock(String),
    Unlock(String),
}

/// `PUT /v1/kv/:key` (`KVSPut`): the body is the value; `?flags`, `?cas`, `?acquire=<session>`,
/// `?release=<session>` (at most one of the last three). Answers `true`, or the outcome of a
/// check-and-set, an acquisition or a release.
pub(super) async fn kv_put(
    AxumState(shared): SharedState,
    key: Option<Path<String>>,
    headers: HeaderMap,
    Query(params): Params,
    body: Body,
) -> Response {
    stall_if_faulted(&shared).await;
    let key = key.map(|Path(key)| key).unwrap_or_default();
    let put = async {
        let options = QueryOptions::parse(&params)?;
        if key.is_empty() {
            return Err(Rejection(StatusCode::BAD_REQUEST, "Missing key name").into());
        }
        conflicting_flags(&params, &["cas", "acquire", "release"])?;
        let flags = uint_param(&params, "flags")?.unwrap_or(0);
        let mut op = match uint_param(&params, "cas")? {
            Some(cas) => KvWrite::Cas(cas),
            None => KvWrite::Set,
        };
        if let Some(session) = first(&params, "acquire") {
            op = KvWrite::Lock(session.to_string());
        }
        if let Some(session) = first(&params, "release") {
            op = KvWrite::Unlock(session.to_string());
        }
        let value = read_value(&headers, body).await?;
        rpc_write(&shared, &headers, &params, &options)?;
        // `kvsPreApply`: a lock within the key's lock delay is refused by the leader before
        // raft (so no index moves).
        if matches!(op, KvWrite::Lock(_)) {
            let now = tokio::time::Instant::now();
            if shared.lock().kv.lock_delay(&key, now).is_some() {
                return Ok(false);
            }
        }
        let outcome = shared.write(|state, index| {
            Ok(match op {
                KvWrite::Set => {
                    state.kv.set(&key, value, flags, index);
                    Ok(true)
                }
                KvWrite::Cas(cas) => Ok(state.kv.set_cas(&key, value, flags, cas, index)),
                KvWrite::Lock(session) => state.kv_lock(&key, value, flags, &session, index),
                KvWrite::Unlock(session) => state.kv_unlock(&key, value, flags, &session, index),
            })
        });
        // An error of the FSM (a missing or unknown session) is still a raft entry.
        outcome.map_err(|error| {
            Refusal(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("raft apply failed: {error}"),
            )
        })
    };
    match put.await {
        Ok(outcome) => write_answer(&shared, outcome).await,
        Err::<_, Refusal>(refusal) => refusal.into_response(),
    }
}

/// `DELETE /v1/kv/:key` (`KVSDelete`): `?recurse` deletes a prefix, `?cas` only the key at that
/// ModifyIndex. Answers `true`, or the outcome of a check-and-set.
pub(super) async fn kv_delete(
    AxumState(shared): SharedState,
    key: Option<Path<String>>,
    headers: HeaderMap,
    Query(params): Params,
) -> Response {
    stall_if_faulted(&shared).await;
    let key = key.map(|Path(key)| key).unwrap_or_default();
    let delete = || {
        let options = QueryOptions::parse(&params)?;
        conflicting_flags(&params, &["recurse", "cas"])?;
        let recurse = has(&params, "recurse");
        if !recurse && key.is_empty() {
            return Err(Rejection(StatusCode::BAD_REQUEST, "Missing key name").into());
        }
        let cas = uint_param(&params, "cas")?;
        rpc_write(&shared, &headers, &params, &options)?;
        Ok(shared.write(|state, index| {
            Ok(match cas {
                Some(cas) => state.kv.delete_cas(&key, cas, index),
                None if recurse => {
                    state.kv.delete_tree(&key, index);
                    true
                }
                None => {
                    state.kv.delete(&key, index);
                    true
                }
            })
        }))
    };
    match delete() {
        Ok(outcome) => write_answer(&shared, outcome).await,
        Err::<_, Refusal>(refusal) => refusal.into_response(),
    }
}

/// `PUT /v1/txn` (`Txn` and `convertOps` in `agent/txn_endpoint.go`): the body is read (a
/// `Content-Length` past `TXN_MAX_REQ_LEN`, or a body whose JSON runs past it, is a 413) and
/// decoded (`txn::decode`; a 400 `Failed to parse body: ...`), then at most `TXN_MAX_OPS`
/// operations (413 `Transaction contains too many operations (N > 128)`) and no value past
/// `kv_max_value_size` (413). A transaction without a write verb is a read (`txn_read`), one
/// with a write goes to the leader and raft (`txn_apply`). 200 with the results, or 409 with
/// the errors of every failed operation and nothing applied. The query parameters are looked
/// at after the body, as Consul does.
pub(super) async fn txn(
    AxumState(shared): SharedState,
    headers: HeaderMap,
    Query(params): Params,
    body: Body,
) -> Response {
    stall_if_faulted(&shared).await;
    let run = async {
        let ops = read_txn_ops(&headers, body).await?;
        if ops.iter().any(KvOp::is_write) {
            txn_apply(&shared, &headers, &params, &ops).await
        } else {
            txn_read(&shared, &headers, &params, &ops).await
        }
    };
    match run.await {
        Ok(response) => response,
        Err::<_, Refusal>(refusal) => refusal.into_response(),
    }
}

/// `convertOps`: the body within `max(txn_max_req_len, kv_max_value_size)`, decoded, counted
/// and its values bounded; the operations without a `KV` member are dropped.
async fn read_txn_ops(headers: &HeaderMap, body: Body) -> Result<Vec<KvOp>, Refusal> {
    let too_large = |length: Option<u64>| {
        let body = match length {
            Some(length) => format!(
                "Request body({length} bytes) too large, max size: {TXN_MAX_REQ_LEN} bytes. \
                 See {TXN_MAX_REQ_LEN_DOCS}."
            ),
            // `http.MaxBytesReader` stopped the decoder (no `Content-Length`).
            None => format!(
                "Request body too large, max size: {TXN_MAX_REQ_LEN} bytes. See \
                 {TXN_MAX_REQ_LEN_DOCS}."
            ),
        };
        Refusal(StatusCode::PAYLOAD_TOO_LARGE, body)
    };
    if let Some(length) = content_length(headers).filter(|l| *l > TXN_MAX_REQ_LEN as u64) {
        drain(body).await;
        return Err(too_large(Some(length)));
    }
    // Go's decoder reads only as far as the first JSON value: bytes past the limit matter only
    // if that value is not over by then.
    let mut chunks = body.into_data_stream();
    let mut bytes = Vec::new();
    let mut cut = false;
    while let Some(Ok(chunk)) = chunks.next().await {
        bytes.extend_from_slice(&chunk);
        if bytes.len() > TXN_MAX_REQ_LEN {
            bytes.truncate(TXN_MAX_REQ_LEN);
            cut = true;
            break;
        }
    }
    let parse_failed = |why: &str| {
        Refusal(
            StatusCode::BAD_REQUEST,
            format!("Failed to parse body: {why}"),
        )
    };
    let ops = match txn::decode(&bytes) {
        Ok(ops) => ops,
        Err(BodyError::Empty | BodyError::Incomplete) if cut => return Err(too_large(None)),
        Err(BodyError::Empty) => return Err(parse_failed("EOF")),
        Err(BodyError::Incomplete) => return Err(parse_failed("unexpected EOF")),
        Err(BodyError::Parse(why)) => return Err(parse_failed(&why)),
        Err(BodyError::Unsupported(why)) => return Err(Refusal(StatusCode::BAD_REQUEST, why)),
    };
    if ops.len() > TXN_MAX_OPS {
        return Err(Refusal(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "Transaction contains too many operations ({} > {TXN_MAX_OPS})",
                ops.len()
            ),
        ));
    }
    let ops: Vec<KvOp> = ops.into_iter().flatten().collect();
    if let Some(op) = ops.iter().find(|op| op.value.len() > KV_MAX_VALUE_SIZE) {
        return Err(Refusal(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "Value for key {} is too large ({} > {KV_MAX_VALUE_SIZE} bytes)",
                go_quote(&op.key),
                op.value.len()
            ),
        ));
    }
    Ok(ops)
}

/// A transaction with a write (`Txn.Apply` in `agent/consul/txn_endpoint.go`): only `?dc` and
/// the token count (`parseDC`, `parseToken`); the RPC's checks (token, leader, rate limit,
/// datacenter); `preCheck` on the leader (a failure is a 409 without a raft write); then one
/// raft write (`TxnRW`), which wakes blocked KV queries as any write does. A failed operation
/// there is a 409 too: the raft index was spent, but nothing in the KV store moved. The answer
/// has no `X-Consul-*` headers.
async fn txn_apply(
    shared: &Arc<Shared>,
    headers: &HeaderMap,
    params: &[(String, String)],
    ops: &[KvOp],
) -> Result<Response, Refusal> {
    let options = QueryOptions::datacenter_only(params);
    let access = rpc(shared, headers, params, &options, Rpc::Write)?;
    let readable = access == Access::Full;
    let now = tokio::time::Instant::now();
    let errors = shared
        .lock()
        .txn_pre_check(ops, !readable, PERMISSION_DENIED, now);
    if !errors.is_empty() {
        let answer = TxnResponseJson::new(Err(errors), readable);
        return Ok(txn_answer(shared, StatusCode::CONFLICT, answer).await);
    }
    let outcome = shared.write(|state, index| Ok(state.txn_write(ops, index)));
    let status = match outcome {
        Ok(_) => StatusCode::OK,
        Err(_) => StatusCode::CONFLICT,
    };
    Ok(txn_answer(shared, status, TxnResponseJson::new(outcome, readable)).await)
}

/// A transaction without a write (`Txn.Read`): the query options as any read parses them
/// (`?stale`, `?consistent`, `?dc`; no blocking), the RPC's checks, `preCheck`, then `TxnRO`
/// on the server's state, no raft write. The answer carries `X-Consul-KnownLeader` and
/// `X-Consul-LastContact` (no `X-Consul-Index`), and the `QueryMeta` in its body.
async fn txn_read(
    shared: &Arc<Shared>,
    headers: &HeaderMap,
    params: &[(String, String)],
    ops: &[KvOp],
) -> Result<Response, Refusal> {
    let options = QueryOptions::parse(params)?;
    let access = rpc(shared, headers, params, &options, Rpc::Read)?;
    let readable = access == Access::Full;
    let (status, answer, meta) = {
        let mut state = shared.lock();
        // Only stale reads get here without a leader: from a server that lost it a while ago.
        let meta = match state.fault {
            Fault::NoLeader => (15_000_000_000, false),
            _ => (0, true),
        };
        let now = tokio::time::Instant::now();
        let errors = state.txn_pre_check(ops, !readable, PERMISSION_DENIED, now);
        if errors.is_empty() {
            let outcome = state.txn_read(ops);
            let status = match outcome {
                Ok(_) => StatusCode::OK,
                Err(_) => StatusCode::CONFLICT,
            };
            (status, TxnResponseJson::new(outcome, readable), Some(meta))
        } else {
            // `Txn.Read` returns before `SetQueryMeta`: the meta stays zero.
            let answer = TxnResponseJson::new(Err(errors), readable);
            (StatusCode::CONFLICT, answer, None)
        }
    };
    let (last_contact, known_leader) = meta.unwrap_or((0, false));
    let mut response = txn_answer(shared, status, TxnReadJson::new(answer, meta)).await;
    let headers = response.headers_mut();
    headers.insert(
        "x-consul-lastcontact",
        HeaderValue::from(last_contact / 1_000_000),
    );
    let known_leader = if known_leader { "true" } else { "false" };
    headers.insert(
        "x-consul-knownleader",
        HeaderValue::from_static(known_leader),
    );
    Ok(response)
}

/// A transaction's JSON with its status (`Fault::Garbage` cuts it as any write answer).
async fn txn_answer(
    shared: &Arc<Shared>,
    status: StatusCode,
    answer: impl serde::Serialize,
) -> Response {
    let mut response = write_json(shared, answer).await;
    *response.status_mut() = status;
    response
}

/// The largest `PUT /v1/session/create` body the double reads (Consul reads it whole).
const SESSION_BODY_LIMIT: usize = 1024 * 1024;

/// `PUT /v1/session/create` (`SessionCreate` in `agent/session_endpoint.go`, then
/// `Session.Apply` in `agent/consul/session_endpoint.go`): the body, read only with a
/// `Content-Length` above 0, over the defaults (a 400 `Request decode failed: ...` if it does
/// not decode); then the RPC: `Must provide Node`, the ACL (`session:write`), the behavior,
/// the TTL, and the raft write, whose FSM errors come back as `apply failed: ...`. Every RPC
/// error is a 500 with its text, as Consul's HTTP layer answers a plain error. Answers
/// `{"ID": "<uuid>"}` and starts the TTL timer.
pub(super) async fn session_create(
    AxumState(shared): SharedState,
    headers: HeaderMap,
    Query(params): Params,
    body: Body,
) -> Response {
    stall_if_faulted(&shared).await;
    let create = async {
        let mut new = NewSession::default();
        if content_length(&headers).is_some_and(|length| length > 0) {
            let body = axum::body::to_bytes(body, SESSION_BODY_LIMIT)
                .await
                .map_err(|e| {
                    Refusal(
                        StatusCode::BAD_REQUEST,
                        format!("Request decode failed: {e}"),
                    )
                })?;
            new = NewSession::decode(&body).map_err(|e| {
                Refusal(
                    StatusCode::BAD_REQUEST,
                    format!("Request decode failed: {e}"),
                )
            })?;
        }
        new.fixup_empty_checks();
        let options = QueryOptions::datacenter_only(&params);
        let access = rpc(&shared, &headers, &params, &options, Rpc::Write)?;
        if new.node.is_empty() {
            return Err(internal("Must provide Node"));
        }
        if access == Access::Anonymous {
            return Err(Rejection(StatusCode::FORBIDDEN, PERMISSION_DENIED).into());
        }
        let ttl_min = shared.lock().sessions.ttl_min;
        let behavior = new.check(ttl_min).map_err(internal)?;
        let id = generate_id();
        let created =
            shared.write(|state, index| Ok(state.create_session(new, behavior, id.clone(), index)));
        created.map_err(|error| internal(format!("apply failed: {error}")))?;
        // `resetSessionTimer`, after the raft write.
        shared
            .lock()
            .sessions
            .reset_timer(&id, tokio::time::Instant::now());
        shared.session_timers.notify_one();
        Ok(id)
    };
    match create.await {
        Ok(id) => write_json(&shared, serde_json::json!({ "ID": id })).await,
        Err::<_, Refusal>(refusal) => refusal.into_response(),
    }
}

/// `PUT /v1/session/destroy/:id` (`SessionDestroy`, `Session.Apply`): `true`. An unknown
/// session is `true` too, without a raft write (`Session.Apply` returns before it, and before
/// the ACL check); a known one is invalidated as a failed check would (`deleteSessionTxn`).
pub(super) async fn session_destroy(
    AxumState(shared): SharedState,
    id: Option<Path<String>>,
    headers: HeaderMap,
    Query(params): Params,
) -> Response {
    stall_if_faulted(&shared).await;
    let id = id.map(|Path(id)| id).unwrap_or_default();
    let destroy = || {
        if id.is_empty() {
            return Err(Refusal::from(Rejection(
                StatusCode::BAD_REQUEST,
                "Missing session",
            )));
        }
        let options = QueryOptions::datacenter_only(&params);
        let access = rpc(&shared, &headers, &params, &options, Rpc::Write)?;
        if shared.lock().sessions.get(&id).is_none() {
            return Ok(());
        }
        if access == Access::Anonymous {
            return Err(Rejection(StatusCode::FORBIDDEN, PERMISSION_DENIED).into());
        }
        shared.write(|state, index| {
            // Gone in between (its TTL ran out): `deleteSessionTxn` finds nothing.
            state.invalidate_session(&id, index);
            Ok(())
        });
        Ok(())
    };
    match destroy() {
        Ok(()) => write_answer(&shared, true).await,
        Err(refusal) => refusal.into_response(),
    }
}

/// `PUT /v1/session/renew/:id` (`SessionRenew`, `Session.Renew`): restarts the session's TTL
/// timer, without a raft write, and answers the session in a list (no `X-Consul-*` headers);
/// an unknown session is a 404 `Session id '<id>' not found`, before the ACL check.
pub(super) async fn session_renew(
    AxumState(shared): SharedState,
    id: Option<Path<String>>,
    headers: HeaderMap,
    Query(params): Params,
) -> Response {
    stall_if_faulted(&shared).await;
    let id = id.map(|Path(id)| id).unwrap_or_default();
    let renew = || {
        let options = QueryOptions::parse(&params)?;
        if id.is_empty() {
            return Err(Refusal::from(Rejection(
                StatusCode::BAD_REQUEST,
                "Missing session",
            )));
        }
        let access = rpc(&shared, &headers, &params, &options, Rpc::Write)?;
        let mut state = shared.lock();
        if state.sessions.get(&id).is_none() {
            let message = format!("Session id '{id}' not found");
            return Err(Refusal(StatusCode::NOT_FOUND, message));
        }
        if access == Access::Anonymous {
            return Err(Rejection(StatusCode::FORBIDDEN, PERMISSION_DENIED).into());
        }
        let now = tokio::time::Instant::now();
        let session = state.sessions.reset_timer(&id, now);
        drop(state);
        shared.session_timers.notify_one();
        Ok(Vec::from_iter(session.as_ref().map(SessionJson::new)))
    };
    match renew() {
        Ok(sessions) => write_json(&shared, sessions).await,
        Err(refusal) => refusal.into_response(),
    }
}

/// `GET /v1/session/info/:id` (`SessionGet`): the session in a list, `[]` when unknown.
pub(super) async fn session_info(
    AxumState(shared): SharedState,
    id: Option<Path<String>>,
    headers: HeaderMap,
    Query(params): Params,
) -> Response {
    let (path, id) = named(SESSION_INFO, id);
    answer(&shared, &headers, &params, path, |_| {
        let id = id.ok_or(Rejection(StatusCode::BAD_REQUEST, "Missing session"))?;
        Ok(Endpoint::SessionInfo { id })
    })
    .await
}

/// `GET /v1/session/list` (`SessionList`): every session, by ID.
pub(super) async fn session_list(
    AxumState(shared): SharedState,
    headers: HeaderMap,
    Query(params): Params,
) -> Response {
    answer(&shared, &headers, &params, SESSION_LIST.to_string(), |_| {
        Ok(Endpoint::SessionList)
    })
    .await
}

/// `GET /v1/session/node/:node` (`SessionsForNode`): the node's sessions, `[]` for none.
pub(super) async fn session_node(
    AxumState(shared): SharedState,
    node: Option<Path<String>>,
    headers: HeaderMap,
    Query(params): Params,
) -> Response {
    let (path, node) = named(SESSION_NODE, node);
    answer(&shared, &headers, &params, path, |_| {
        let node = node.ok_or(Rejection(StatusCode::BAD_REQUEST, "Missing node name"))?;
        Ok(Endpoint::SessionNode { node })
    })
    .await
}

const SESSION_INFO: &str = "/v1/session/info/";
const SESSION_LIST: &str = "/v1/session/list";
const SESSION_NODE: &str = "/v1/session/node/";

/// A session endpoint asked with another method: `wrap` answers `OPTIONS` with the `Allow`
/// header and anything else with `MethodNotAllowedError` (405, `OPTIONS` first in `Allow`).
pub(super) fn session_method_not_allowed(
    allowed: &'static str,
) -> impl Fn(axum::http::Method) -> std::future::Ready<Response> + Clone + Send + Sync + 'static {
    move |method| {
        let allow = [(axum::http::header::ALLOW, allowed)];
        let response = if method == axum::http::Method::OPTIONS {
            (allow, "").into_response()
        } else {
            let message = format!("method {method} not allowed");
            (StatusCode::METHOD_NOT_ALLOWED, allow, message).into_response()
        };
        std::future::ready(response)
    }
}

fn internal(message: impl Into<String>) -> Refusal {
    Refusal(StatusCode::INTERNAL_SERVER_ERROR, message.into())
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// Any other method on `/v1/kv/` (`MethodNotAllowedError`).
pub(super) async fn kv_method_not_allowed(method: axum::http::Method) -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        [(axum::http::header::ALLOW, "GET,PUT,DELETE")],
        format!("method {method} not allowed"),
    )
        .into_response()
}

async fn stall_if_faulted(shared: &Arc<Shared>) {
    if shared.lock().fault == Fault::Stall {
        std::future::pending::<()>().await;
    }
}

/// The RPC checks of a KV write: the anonymous token may not write (`kvsPreApply`).
fn rpc_write(
    shared: &Arc<Shared>,
    headers: &HeaderMap,
    params: &[(String, String)],
    options: &QueryOptions,
) -> Result<(), Refusal> {
    match rpc(shared, headers, params, options, Rpc::Write) {
        Ok(Access::Full) => Ok(()),
        Ok(Access::Anonymous) => Err(Rejection(StatusCode::FORBIDDEN, PERMISSION_DENIED).into()),
        Err(rejection) => Err(rejection.into()),
    }
}

/// A write's JSON `true` or `false`, without `X-Consul-*` headers (a write has no query
/// meta).
async fn write_answer(shared: &Arc<Shared>, outcome: bool) -> Response {
    write_json(shared, outcome).await
}

/// A write's JSON answer, without `X-Consul-*` headers.
async fn write_json(shared: &Arc<Shared>, answer: impl serde::Serialize) -> Response {
    let response = Json(answer).into_response();
    if shared.lock().fault == Fault::Garbage {
        return truncate_body(response).await;
    }
    response
}

/// The value of a PUT, bounded as `KVSPut` bounds it: a `Content-Length` past
/// `kv_max_value_size` is a 413 before the body is read. A body without a length (chunked),
/// which Consul reads whole, is cut at the same bound by the double, with the same 413.
async fn read_value(headers: &HeaderMap, body: Body) -> Result<Vec<u8>, Refusal> {
    let too_large = |length: &dyn std::fmt::Display| {
        Refusal(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "Request body({length} bytes) too large, max size: {KV_MAX_VALUE_SIZE} bytes. \
                 See https://developer.hashicorp.com/docs/agent/config/config-files#kv_max_value_size."
            ),
        )
    };
    let length = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(length) = length.filter(|length| *length > KV_MAX_VALUE_SIZE as u64) {
        drain(body).await;
        return Err(too_large(&length));
    }
    match axum::body::to_bytes(body, KV_MAX_VALUE_SIZE).await {
        Ok(bytes) => Ok(bytes.to_vec()),
        Err(_) => Err(too_large(&format!("more than {KV_MAX_VALUE_SIZE}"))),
    }
}

/// How much of a too large body the double reads before it answers the 413.
const DRAIN_LIMIT: usize = 16 * KV_MAX_VALUE_SIZE;

/// Reads (and drops) what the client sends before a 413 is answered, up to a bound, so that it
/// gets the 413 instead of a reset: Go's server drains a little of an unread body too.
async fn drain(body: Body) {
    let mut chunks = body.into_data_stream();
    let mut drained = 0;
    while drained <= DRAIN_LIMIT {
        match chunks.next().await {
            Some(Ok(chunk)) => drained += chunk.len(),
            Some(Err(_)) | None => break,
        }
    }
}

/// `conflictingFlags`: two of `flags` present is a 400 that quotes the whole query, encoded as
/// Go's `url.Values.Encode` does (keys sorted).
fn conflicting_flags(params: &[(String, String)], flags: &[&str]) -> Result<(), Refusal> {
    if flags.iter().filter(|flag| has(params, flag)).count() < 2 {
        return Ok(());
    }
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let encoded: Vec<String> = sorted
        .into_iter()
        .map(|(key, value)| format!("{}={}", go_query_escape(key), go_query_escape(value)))
        .collect();
    let body = format!("Conflicting flags: {}\n", encoded.join("&"));
    Err(Refusal(StatusCode::BAD_REQUEST, body))
}

/// Go's `url.QueryEscape`.
fn go_query_escape(text: &str) -> String {
    let mut escaped = String::new();
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                escaped.push(char::from(byte));
            }
            b' ' => escaped.push('+'),
            _ => escaped.push_str(&format!("%{byte:02X}")),
        }
    }
    escaped
}

/// `?flags=` or `?cas=`, parsed with `strconv.ParseUint`: a bad one is returned as a plain
/// error, which Consul's HTTP layer answers with a 500 and the error's text.
fn uint_param(params: &[(String, String)], key: &str) -> Result<Option<u64>, Refusal> {
    let Some(text) = first(params, key) else {
        return Ok(None);
    };
    match parse_go_uint(text) {
        Some(value) => Ok(Some(value)),
        None => {
            let why = if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
                "value out of range"
            } else {
                "invalid syntax"
            };
            let body = format!("strconv.ParseUint: parsing {text:?}: {why}");
            Err(Refusal(StatusCode::INTERNAL_SERVER_ERROR, body))
        }
    }
}

fn has(params: &[(String, String)], key: &str) -> bool {
    params.iter().any(|(k, _)| k == key)
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

    let (index, response, filtered, fault) = {
        let state = shared.lock();
        let index = state.reported(state.endpoint_index(&endpoint));
        let (response, filtered) = match access {
            Access::Full => (render(&state, &endpoint), false),
            Access::Anonymous => render_filtered(&state, &endpoint),
        };
        (index, response, filtered, state.fault)
    };
    let mut response = with_consul_headers(response, index, options.consistency);
    if fault == Fault::NoLeader {
        // Only stale reads get here: from a server that lost its leader a while ago.
        let headers = response.headers_mut();
        headers.insert("x-consul-knownleader", HeaderValue::from_static("false"));
        headers.insert("x-consul-lastcontact", HeaderValue::from_static("15000"));
    }
    if filtered {
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
    let access = rpc(shared, headers, params, &options, Rpc::Read)?;
    // `KVS.Get` checks `key:read` in its query, after the rest: the anonymous token is refused.
    if access == Access::Anonymous && matches!(endpoint, Endpoint::KvGet { .. }) {
        return Err(Rejection(StatusCode::FORBIDDEN, PERMISSION_DENIED));
    }
    Ok((options, endpoint, access))
}

/// `acl.ErrPermissionDenied`, as `KVS.Get` and `kvsPreApply` return it.
pub(super) const PERMISSION_DENIED: &str = "Permission denied";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Rpc {
    Read,
    /// A write goes to the leader, whatever the consistency parameters say.
    Write,
}

/// What the RPC checks, in order: the token, the leader (or a stale read without one), the
/// rate limit, the datacenter.
fn rpc(
    shared: &Arc<Shared>,
    headers: &HeaderMap,
    params: &[(String, String)],
    options: &QueryOptions,
    rpc: Rpc,
) -> Result<Access, Rejection> {
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
    let stale = rpc == Rpc::Read && matches!(options.consistency, Consistency::Stale);
    match fault {
        // A server without a leader still answers stale reads from its own state.
        Fault::NoLeader if !stale => {
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
    Ok(access)
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
    /// For the endpoints that only call `parseDC` and `parseToken` (`SessionCreate`,
    /// `SessionDestroy`): `?dc` counts, the other query options are not looked at.
    fn datacenter_only(params: &[(String, String)]) -> QueryOptions {
        QueryOptions {
            datacenter: first(params, "dc")
                .filter(|dc| !dc.is_empty())
                .map(str::to_string),
            consistency: Consistency::Leader,
            index: 0,
            wait: DEFAULT_WAIT,
        }
    }

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

/// An error answer with a text made for the request.
struct Refusal(StatusCode, String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (self.0, self.1).into_response()
    }
}

impl From<Rejection> for Refusal {
    fn from(rejection: Rejection) -> Refusal {
        Refusal(rejection.0, rejection.1.to_string())
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
