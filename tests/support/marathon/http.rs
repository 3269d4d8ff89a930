//! The HTTP side of the double: `/v2/apps`, `/v2/apps/{id}` and `/v2/events` handlers, faults,
//! auth.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use axum::extract::{Path, Query, RawQuery, State as AxumState};
use axum::http::header::{ACCEPT, AUTHORIZATION, CONNECTION, CONTENT_TYPE, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use tokio::sync::mpsc;

use super::events::{self, Subscriber};
use super::{render_app, Auth, Fault, Shared, UNAUTHORIZED_MESSAGE};

/// Marathon's `InfoEmbedResolver`: `tasks` (or the deprecated `failures`) with an optional
/// `apps.`, `app.` or `group.apps.` prefix embeds the tasks.
fn embeds_tasks(params: &[(String, String)]) -> bool {
    params
        .iter()
        .filter(|(key, _)| key == "embed")
        .any(|(_, value)| {
            let bare = ["group.apps.", "apps.", "app."]
                .iter()
                .find_map(|prefix| value.strip_prefix(prefix))
                .unwrap_or(value);
            bare == "tasks" || bare == "failures"
        })
}

type SharedState = AxumState<Arc<Shared>>;
type Params = Query<Vec<(String, String)>>;

#[derive(Clone, Copy)]
enum Endpoint {
    Apps,
    Events,
}

pub(super) async fn list_apps(
    AxumState(shared): SharedState,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    Query(params): Params,
) -> Response {
    if let Err(refusal) = count_and_admit(&shared, &headers, Endpoint::Apps, query).await {
        return refusal;
    }
    let mut state = shared.lock();
    if let Some(body) = state.apps_body.clone() {
        state.served_bytes += body.len() as u64;
        return ([(CONTENT_TYPE, "application/json")], body).into_response();
    }
    let body = state.render_apps(embeds_tasks(&params)).to_string();
    state.served_bytes += body.len() as u64;
    ([(CONTENT_TYPE, "application/json")], body).into_response()
}

/// `GET /v2/apps/{id}`: `{"app": {...}}`, tasks always embedded (Marathon adds them for
/// compatibility), or a 404 in Marathon's words.
pub(super) async fn show_app(
    AxumState(shared): SharedState,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    shared.lock().app_requests += 1;
    if let Err(refusal) = admit(&shared, &headers, Endpoint::Apps).await {
        return refusal;
    }
    let id = format!("/{}", id.trim_matches('/'));
    let mut state = shared.lock();
    match state.app_index(&id) {
        Some(index) => {
            let body = json!({ "app": render_app(&state.apps[index], true) }).to_string();
            state.served_bytes += body.len() as u64;
            ([(CONTENT_TYPE, "application/json")], body).into_response()
        }
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({ "message": format!("App '{id}' does not exist") })),
        )
            .into_response(),
    }
}

pub(super) async fn event_stream(
    AxumState(shared): SharedState,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    Query(params): Params,
) -> Response {
    if let Err(refusal) = count_and_admit(&shared, &headers, Endpoint::Events, query).await {
        return refusal;
    }
    // Jetty's EventSourceServlet compares each Accept header to the media type, whole.
    if !headers
        .get_all(ACCEPT)
        .iter()
        .any(|value| value.as_bytes() == b"text/event-stream")
    {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            [(CONTENT_TYPE, "text/html;charset=iso-8859-1")],
            "<html><body><h2>HTTP ERROR 405</h2><p>Problem accessing /v2/events. Reason:\n\
             <pre>    HTTP method GET is not supported by this URL</pre></p></body></html>\n",
        )
            .into_response();
    }
    let types = params
        .into_iter()
        .filter(|(key, _)| key == "event_type")
        .map(|(_, value)| value)
        .collect();
    let (tx, rx) = mpsc::unbounded_channel();
    let stalled = Arc::new(AtomicBool::new(false));
    let (id, heartbeat, eol) = {
        let mut state = shared.lock();
        state.next_stream += 1;
        state.event_connections += 1;
        let id = state.next_stream;
        let eol = state.line_ending;
        state.streams.push(Subscriber {
            id,
            types,
            eol,
            stalled: stalled.clone(),
            tx,
        });
        // Like Marathon: subscribe first, then publish the attachment to every stream.
        let attached = events::stream_attached(&state.now());
        state.publish("event_stream_attached", &attached);
        (id, state.heartbeat, eol)
    };
    let guard = StreamGuard { shared, id };
    Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, "text/event-stream;charset=utf-8")
        .header(CONNECTION, "close")
        .body(events::body(rx, heartbeat, stalled, eol, guard))
        .unwrap()
}

/// Unregisters a stream when its body is dropped (client gone, cut, double dropped) and tells
/// the other streams, as Marathon's `event_stream_detached` does.
struct StreamGuard {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.streams.retain(|stream| stream.id != self.id);
        let detached = events::stream_detached(&state.now());
        state.publish("event_stream_detached", &detached);
    }
}

/// Counts a request to a counted endpoint (with its raw query), then `admit`s it.
async fn count_and_admit(
    shared: &Shared,
    headers: &HeaderMap,
    endpoint: Endpoint,
    query: Option<String>,
) -> Result<(), Response> {
    {
        let mut state = shared.lock();
        let query = Some(query.unwrap_or_default());
        match endpoint {
            Endpoint::Apps => {
                state.apps_requests += 1;
                state.last_apps_query = query;
            }
            Endpoint::Events => {
                state.events_requests += 1;
                state.last_events_query = query;
            }
        }
    }
    admit(shared, headers, endpoint).await
}

/// The delay of a slow fault, then auth (Jetty's security handler), then an error fault.
async fn admit(shared: &Shared, headers: &HeaderMap, endpoint: Endpoint) -> Result<(), Response> {
    let (fault, auth) = {
        let state = shared.lock();
        let fault = match endpoint {
            Endpoint::Apps => state.apps_fault,
            Endpoint::Events => state.events_fault,
        };
        (fault, state.auth.clone())
    };
    if let Fault::Slow(delay) = fault {
        tokio::time::sleep(delay).await;
    }
    if let Some(challenge) = refuse_credentials(&auth, headers) {
        return Err((
            StatusCode::UNAUTHORIZED,
            [(WWW_AUTHENTICATE, challenge)],
            Json(json!({ "message": UNAUTHORIZED_MESSAGE })),
        )
            .into_response());
    }
    if fault == Fault::NoLeader {
        return Err((
            StatusCode::SERVICE_UNAVAILABLE,
            [(CONTENT_TYPE, "text/html;charset=iso-8859-1")],
            jetty_error_page(503, "Could not determine the current leader"),
        )
            .into_response());
    }
    if let Fault::Status(code) = fault {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let message = status.canonical_reason().unwrap_or("Error");
        return Err((status, Json(json!({ "message": message }))).into_response());
    }
    Ok(())
}

/// Jetty's `ErrorHandler` page for `sendError(code, message)`.
fn jetty_error_page(code: u16, message: &str) -> String {
    format!(
        "<html>\n<head>\n<meta http-equiv=\"Content-Type\" content=\"text/html;charset=ISO-8859-1\"/>\n\
         <title>Error {code} {message}</title>\n</head>\n<body><h2>HTTP ERROR {code}</h2>\n\
         <p>Problem accessing /v2/apps. Reason:\n<pre>    {message}</pre></p>\n</body>\n</html>\n"
    )
}

/// The `WWW-Authenticate` challenge when the request does not carry the right credentials.
fn refuse_credentials(auth: &Auth, headers: &HeaderMap) -> Option<&'static str> {
    let presented = headers
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok());
    match auth {
        Auth::None => None,
        Auth::Basic { user, password } => {
            let expected = base64(format!("{user}:{password}").as_bytes());
            let accepted = presented
                .and_then(|value| value.split_once(' '))
                .is_some_and(|(scheme, credentials)| {
                    scheme.eq_ignore_ascii_case("basic") && credentials.trim() == expected
                });
            (!accepted).then_some("Basic realm=\"Mesosphere\"")
        }
        Auth::Token(token) => {
            let accepted =
                presented.and_then(|value| value.strip_prefix("token=")) == Some(token.as_str());
            (!accepted).then_some("acsjwt")
        }
    }
}

/// Standard base64 with padding (RFC 4648), for Basic credentials.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut text = String::new();
    for chunk in bytes.chunks(3) {
        let byte = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let group = (byte(0) << 16) | (byte(1) << 8) | byte(2);
        for i in 0..4 {
            if i <= chunk.len() {
                text.push(char::from(ALPHABET[(group >> (18 - 6 * i)) as usize & 63]));
            } else {
                text.push('=');
            }
        }
    }
    text
}
