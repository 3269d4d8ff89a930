//! The event bus side of the double: event JSON in Marathon's field order, SSE frames as Jetty's
//! `EventSourceServlet` writes them, and the body of one `/v2/events` response.

use std::collections::BTreeSet;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::model::instance_id;

/// Every client of the double is on loopback; Marathon reports `request.getRemoteAddr`.
pub const REMOTE_ADDRESS: &str = "127.0.0.1";

/// How SSE lines end. Marathon serves `/v2/events` with Jetty's `EventSourceServlet`, which ends
/// every line with CRLF: a client that splits frames on "\n\n" only never sees one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineEnding {
    /// `event: t\r\ndata: {..}\r\n\r\n`: what Marathon sends (the default).
    CrLf,
    /// `event: t\ndata: {..}\n\n`: what other SSE servers send; the SSE spec allows both.
    Lf,
}

impl LineEnding {
    pub fn as_str(self) -> &'static str {
        match self {
            LineEnding::CrLf => "\r\n",
            LineEnding::Lf => "\n",
        }
    }
}

/// Which ID `health_status_changed_event` carries: Marathon 1.4+ writes `instanceId`,
/// Marathon up to 1.3 wrote `taskId`. Never both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HealthEventId {
    InstanceId,
    TaskId,
}

/// One SSE frame: `event: <type>`, one `data:` line (event JSON never holds a newline), a blank
/// line.
pub fn frame(event_type: &str, data: &str, eol: LineEnding) -> Bytes {
    let eol = eol.as_str();
    Bytes::from(format!("event: {event_type}{eol}data: {data}{eol}{eol}"))
}

/// A JSON object with its keys in the given order (serde_json's map sorts them; Marathon writes
/// case-class field order, and tests compare frames byte for byte).
pub fn ordered_json(fields: &[(&str, Value)]) -> String {
    let body: Vec<String> = fields
        .iter()
        .map(|(key, value)| format!("{}:{}", json!(key), value))
        .collect();
    format!("{{{}}}", body.join(","))
}

pub fn stream_attached(timestamp: &str) -> String {
    ordered_json(&[
        ("remoteAddress", json!(REMOTE_ADDRESS)),
        ("eventType", json!("event_stream_attached")),
        ("timestamp", json!(timestamp)),
    ])
}

pub fn stream_detached(timestamp: &str) -> String {
    ordered_json(&[
        ("remoteAddress", json!(REMOTE_ADDRESS)),
        ("eventType", json!("event_stream_detached")),
        ("timestamp", json!(timestamp)),
    ])
}

/// `status_update_event` for `task` (as /v2/apps embeds it) moving to `status`.
pub fn status_update(task: &Value, status: &str, timestamp: &str) -> String {
    let or_empty = |value: &Value| {
        if value.is_null() {
            json!([])
        } else {
            value.clone()
        }
    };
    ordered_json(&[
        ("slaveId", task["slaveId"].clone()),
        ("taskId", task["id"].clone()),
        ("taskStatus", json!(status)),
        ("message", json!("")),
        ("appId", task["appId"].clone()),
        ("host", task["host"].clone()),
        ("ipAddresses", or_empty(&task["ipAddresses"])),
        ("ports", or_empty(&task["ports"])),
        ("version", task["version"].clone()),
        ("eventType", json!("status_update_event")),
        ("timestamp", json!(timestamp)),
    ])
}

pub fn health_changed(task: &Value, alive: bool, id: HealthEventId, timestamp: &str) -> String {
    let task_id = task["id"].as_str().unwrap_or_default();
    let id = match id {
        HealthEventId::InstanceId => ("instanceId", json!(instance_id(task_id))),
        HealthEventId::TaskId => ("taskId", json!(task_id)),
    };
    ordered_json(&[
        ("appId", task["appId"].clone()),
        id,
        ("version", task["version"].clone()),
        ("alive", json!(alive)),
        ("eventType", json!("health_status_changed_event")),
        ("timestamp", json!(timestamp)),
    ])
}

/// `api_post_event` for a `PUT /v2/apps/<id>` carrying `definition`.
pub fn api_post(definition: &Value, timestamp: &str) -> String {
    let id = definition["id"].as_str().unwrap_or_default();
    ordered_json(&[
        ("clientIp", json!(REMOTE_ADDRESS)),
        ("uri", json!(format!("/v2/apps{id}"))),
        ("appDefinition", definition.clone()),
        ("eventType", json!("api_post_event")),
        ("timestamp", json!(timestamp)),
    ])
}

/// The plan of a one-step deployment of `app_id`, in the `plan-format=light` shape (no
/// `original`/`target` groups).
pub fn deployment_plan(deployment_id: &str, app_id: &str, version: &str) -> Value {
    json!({
        "id": deployment_id,
        "steps": [{"actions": [{"action": "RestartApplication", "app": app_id}]}],
        "version": version
    })
}

pub fn deployment_info(plan: &Value, timestamp: &str) -> String {
    ordered_json(&[
        ("plan", plan.clone()),
        ("currentStep", plan["steps"][0].clone()),
        ("eventType", json!("deployment_info")),
        ("timestamp", json!(timestamp)),
    ])
}

pub fn deployment_success(plan: &Value, timestamp: &str) -> String {
    ordered_json(&[
        ("id", plan["id"].clone()),
        ("plan", plan.clone()),
        ("eventType", json!("deployment_success")),
        ("timestamp", json!(timestamp)),
    ])
}

pub fn app_terminated(app_id: &str, timestamp: &str) -> String {
    ordered_json(&[
        ("appId", json!(app_id)),
        ("eventType", json!("app_terminated_event")),
        ("timestamp", json!(timestamp)),
    ])
}

/// Marathon's `Timestamp.toString`: UTC, milliseconds, `2017-02-18T19:12:00.102Z`.
pub fn timestamp(time: SystemTime) -> String {
    let since_epoch = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since_epoch.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = i64::try_from(days).unwrap_or(0) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3_600,
        rest % 3_600 / 60,
        rest % 60,
        since_epoch.subsec_millis()
    )
}

/// What the double hands one open stream.
pub enum Frame {
    Data(Bytes),
    /// Fail the body: hyper drops the connection without ending the chunked body.
    Abort,
}

/// One open `/v2/events` response, as the state sees it.
pub struct Subscriber {
    pub id: u64,
    /// `?event_type=` values; empty: every event.
    pub types: BTreeSet<String>,
    pub eol: LineEnding,
    pub stalled: Arc<AtomicBool>,
    pub tx: mpsc::UnboundedSender<Frame>,
}

impl Subscriber {
    /// Queues the event unless the stream is stalled or filters it out (Marathon filters every
    /// event, `event_stream_attached` included).
    pub fn offer(&self, event_type: &str, data: &str) {
        if self.stalled.load(Ordering::SeqCst)
            || !(self.types.is_empty() || self.types.contains(event_type))
        {
            return;
        }
        // A closed receiver is a stream whose guard is about to unregister it.
        let _ = self.tx.send(Frame::Data(frame(event_type, data, self.eol)));
    }
}

/// The response body of one stream: frames as they are published, a bare line ending every
/// `heartbeat` (Jetty's heartbeat, off unless asked for), the end when the sender goes away.
/// `guard` lives as long as the body, so dropping it tells the double the stream is closed.
pub fn body<G: Send + 'static>(
    rx: mpsc::UnboundedReceiver<Frame>,
    heartbeat: Option<Duration>,
    stalled: Arc<AtomicBool>,
    eol: LineEnding,
    guard: G,
) -> Body {
    struct Open<G> {
        rx: mpsc::UnboundedReceiver<Frame>,
        ticker: Option<tokio::time::Interval>,
        stalled: Arc<AtomicBool>,
        eol: LineEnding,
        _guard: G,
    }
    let ticker = heartbeat
        .map(|period| tokio::time::interval_at(tokio::time::Instant::now() + period, period));
    let open = Open {
        rx,
        ticker,
        stalled,
        eol,
        _guard: guard,
    };
    let stream = futures::stream::unfold(open, |mut open| async move {
        loop {
            let next = match open.ticker.as_mut() {
                Some(ticker) => tokio::select! {
                    frame = open.rx.recv() => Some(frame),
                    _ = ticker.tick() => None,
                },
                None => Some(open.rx.recv().await),
            };
            match next {
                Some(Some(Frame::Data(bytes))) => return Some((Ok(bytes), open)),
                Some(Some(Frame::Abort)) => {
                    let error = io::Error::new(io::ErrorKind::ConnectionReset, "stream aborted");
                    return Some((Err(error), open));
                }
                Some(None) => return None,
                None if !open.stalled.load(Ordering::SeqCst) => {
                    let beat = Bytes::from_static(open.eol.as_str().as_bytes());
                    return Some((Ok(beat), open));
                }
                None => {}
            }
        }
    });
    Body::from_stream(stream)
}
