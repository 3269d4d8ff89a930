//! A Marathon HTTP API test double: `GET /v2/apps[?embed=apps.tasks]`, `GET /v2/apps/{id}` and
//! the `GET /v2/events` Server-Sent Events stream, with basic or token auth and injectable
//! faults, on 127.0.0.1:0.
//!
//! It follows the Marathon reference notes, the samples in tests/fixtures/marathon/ and, where
//! those are silent, Marathon's own source (1.x: Jersey for /v2/apps, Jetty's
//! `EventSourceServlet` for /v2/events). Tests change the apps with plain methods (`put_app`,
//! `add_task`, ...); each change is applied and its events published under one lock, so a
//! client that refetches after an event always sees the change.
//!
//! ```text
//! test ── put_app / add_task / set_task_* ──> State (Mutex) ──> GET /v2/apps JSON
//!                                               └─ events ──> each open stream: filter, stall ──> SSE frames
//! ```
//!
//! What a client must cope with, because Marathon does it (and so does the double):
//! - Frame lines end with CRLF (`event: t\r\ndata: {..}\r\n\r\n`); `set_line_ending` switches
//!   to LF to check that both parse.
//! - `?event_type=` filters every event, `event_stream_attached` included: with a filter that
//!   leaves it out, the stream starts silent. Every stream also sees the `event_stream_attached`
//!   and `event_stream_detached` of the others.
//! - `/v2/events` answers 405 unless an `Accept` header is exactly `text/event-stream`.
//! - A bare line ending every 10 s on an open stream, as Jetty's `EventSourceServlet` writes by
//!   default (Marathon keeps its `heartBeatPeriod`); `set_heartbeat` changes the period or
//!   (`None`) turns it off.
//! - Terminal task states (TASK_KILLED, TASK_FAILED, ...) remove the task from its app.
//!
//! Known differences: the stream body is chunked (Jetty's is close-delimited, which HTTP clients
//! read the same way); `put_app` bumps the version and keeps the tasks (Marathon would restart
//! them); counts (`tasksRunning`, ...) are recomputed from the tasks on every answer.
//!
//! Dropping the double aborts its server and kills every open connection, streams included.

#![allow(dead_code, clippy::unwrap_used)]

mod events;
mod http;
mod model;
use super::killable as net;
pub mod probe;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use serde_json::{json, Value};
use tokio::net::TcpListener;

#[allow(unused_imports)]
pub use events::{timestamp, HealthEventId, LineEnding, REMOTE_ADDRESS};
#[allow(unused_imports)]
pub use model::{App, NetworkMode, Port, Task, DEFAULT_HOST, DEFAULT_IMAGE, DEFAULT_SLAVE_ID};

use events::{Frame, Subscriber};

pub const APPS: &str = "/v2/apps";
pub const EVENTS: &str = "/v2/events";
/// Jetty's `EventSourceServlet` default `heartBeatPeriod`.
pub const JETTY_HEARTBEAT: Duration = Duration::from_secs(10);
/// Where service ports are assigned from (Marathon's `--local_port_min`).
pub const FIRST_SERVICE_PORT: u16 = 10000;
/// The body of every 401, as Marathon's API docs give it (traits.raml, `secured`).
pub const UNAUTHORIZED_MESSAGE: &str = "Invalid username or password.";

/// What goes wrong with every request to one endpoint until the next `set_*_fault`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    None,
    /// This status with Marathon's JSON error body, `{"message":"<reason phrase>"}` (what its
    /// exception mapper writes for a `WebApplicationException`), e.g. 503 Service Unavailable.
    Status(u16),
    /// Every answer (a stream: its headers) comes after this delay; auth and faults are judged
    /// after it.
    Slow(Duration),
    /// No leader (an election, or this master cut off): Marathon's `LeaderProxyFilter` answers
    /// `sendError(503, "Could not determine the current leader")`, which Jetty writes as an
    /// HTML error page (after Jetty's own basic-auth check, before any resource).
    NoLeader,
}

/// Who may ask. One model at a time: the last `set_*` wins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Auth {
    None,
    /// Marathon's `--http_credentials user:pass`: `Authorization: Basic <base64>`, else 401 with
    /// `WWW-Authenticate: Basic realm="Mesosphere"` (the `--http_realm` default).
    Basic {
        user: String,
        password: String,
    },
    /// DC/OS: `Authorization: token=<token>`, else 401 with `WWW-Authenticate: acsjwt`.
    Token(String),
}

/// A running double; stopped when dropped.
pub struct MarathonDouble {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    /// Dropped with the double: the server and every open connection go, and a panic of a
    /// handler fails the test.
    server: net::Served,
}

impl MarathonDouble {
    /// Starts with no apps, no auth, no faults on 127.0.0.1:0.
    pub async fn start() -> MarathonDouble {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            state: Mutex::new(State::new()),
        });
        let app = Router::new()
            .route(APPS, get(http::list_apps))
            .route("/v2/apps/{*id}", get(http::show_app))
            .route(EVENTS, get(http::event_stream))
            .fallback(|| async {
                (
                    StatusCode::NOT_FOUND,
                    Json(json!({"message": "URI not found"})),
                )
            })
            .with_state(shared.clone());
        MarathonDouble {
            addr,
            shared,
            server: net::Served::start(listener, app),
        }
    }

    /// `http://127.0.0.1:<port>`, without a trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Fails the test with the first panic of one of the double's handlers so far (dropping
    /// the double does it too).
    pub fn check(&self) {
        self.server.check();
    }

    /// A URL on a loopback port that nothing listens on right now: connections are refused.
    pub fn dead_url() -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        format!("http://{addr}")
    }

    /// Creates or replaces an app (replacing keeps its place, its tasks and its service ports),
    /// as `PUT /v2/apps/<id>` would. Events: `api_post_event`, `deployment_info`, a
    /// `status_update_event` per task the app carries, `deployment_success`.
    pub fn put_app(&self, mut app: App) {
        self.shared.change(|state| {
            let now = state.now();
            for (index, port) in app.ports.iter_mut().enumerate() {
                if port.service_port == 0 {
                    port.service_port = state.service_port(&app.id, index);
                }
            }
            let version = app.version.clone().unwrap_or_else(|| now.clone());
            let definition = app.definition_json(&version);
            let mut stored = definition.clone();
            stored["deployments"] = json!([]);
            stored["tasks"] = json!([]);
            match state.app_index(&app.id) {
                Some(index) => {
                    let tasks = state.apps[index]["tasks"].take();
                    if tasks.is_array() {
                        stored["tasks"] = tasks;
                    }
                    state.apps[index] = stored;
                }
                None => state.apps.push(stored),
            }
            state
                .service_ports
                .insert(app.id.clone(), app.service_ports());
            state.publish("api_post_event", &events::api_post(&definition, &now));
            state.deployments += 1;
            let n = state.deployments;
            let deployment_id = format!("{n:08x}-0000-4000-8000-{n:012x}");
            let plan = events::deployment_plan(&deployment_id, &app.id, &version);
            state.publish("deployment_info", &events::deployment_info(&plan, &now));
            for task in &app.tasks {
                state.add_task(&app.id, task)?;
            }
            state.publish(
                "deployment_success",
                &events::deployment_success(&plan, &now),
            );
            Ok(())
        });
    }

    /// Creates or replaces the app `app["id"]` with `app`, served as it is (tasks embedded
    /// as `app["tasks"]` gives them): a record no Marathon writes (`"containerPort": -1`, a
    /// label that is a number), for a client's decoder. Event: `api_post_event`.
    pub fn put_raw_app(&self, app: Value) {
        self.shared.change(|state| {
            let id = app["id"].clone();
            let now = state.now();
            state.publish("api_post_event", &events::api_post(&app, &now));
            match state.apps.iter().position(|stored| stored["id"] == id) {
                Some(index) => state.apps[index] = app,
                None => state.apps.push(app),
            }
            Ok(())
        });
    }

    /// Deletes an app: a TASK_KILLED `status_update_event` per task, then `app_terminated_event`.
    pub fn remove_app(&self, id: &str) {
        self.shared.change(|state| {
            let index = state
                .app_index(id)
                .ok_or_else(|| format!("no app {id:?} to remove"))?;
            let app = state.apps.remove(index);
            let now = state.now();
            for task in app["tasks"].as_array().into_iter().flatten() {
                state.publish(
                    "status_update_event",
                    &events::status_update(task, "TASK_KILLED", &now),
                );
            }
            state.publish("app_terminated_event", &events::app_terminated(id, &now));
            Ok(())
        });
    }

    /// Adds a task to an app; events: `status_update_event` with the task's state, then, for a
    /// task given a health result, the `health_status_changed_event` of its first check.
    pub fn add_task(&self, app_id: &str, task: Task) {
        self.shared.change(|state| state.add_task(app_id, &task));
    }

    /// Moves a task to `state` (`startedAt` is set on TASK_RUNNING); a terminal state removes
    /// it. Event: `status_update_event`. A task without a `state` key keeps none.
    pub fn set_task_state(&self, task_id: &str, new_state: &str) {
        self.shared
            .change(|state| state.set_task_state(task_id, new_state));
    }

    /// Records a result of the task's first health check; event: `health_status_changed_event`
    /// (sent on every call, where Marathon sends it on changes only).
    pub fn set_task_health(&self, task_id: &str, alive: bool) {
        self.shared.change(|state| {
            let (app, index) = state
                .find_task(task_id)
                .ok_or_else(|| format!("no task {task_id:?}"))?;
            let now = state.now();
            let task = &mut state.apps[app]["tasks"][index];
            model::record_health(task, alive, &now);
            let event = events::health_changed(task, alive, state.health_event_id, &now);
            state.publish("health_status_changed_event", &event);
            Ok(())
        });
    }

    /// Kills a task: TASK_KILLED `status_update_event`, and the task is gone.
    pub fn remove_task(&self, task_id: &str) {
        self.shared
            .change(|state| state.set_task_state(task_id, "TASK_KILLED"));
    }

    /// Replaces every app with `apps["apps"]` (a recorded `/v2/apps?embed=apps.tasks` answer),
    /// served back as it is. A snapshot, not a change: no event.
    pub fn load_apps_json(&self, apps: Value) {
        self.shared.change(|state| {
            let Some(list) = apps.get("apps").and_then(Value::as_array) else {
                return Err("load_apps_json wants {\"apps\": [...]}".to_string());
            };
            state.apps = list.clone();
            Ok(())
        });
    }

    /// Answers every `GET /v2/apps` with exactly `body` (`None`: the apps again), whatever the
    /// apps and the query: a recorded or generated answer served as it is, without the cost of
    /// building it per request (the Marathon benchmark's 20,000 apps). Auth and faults apply.
    pub fn serve_apps_body(&self, body: Option<Bytes>) {
        self.shared.change(|state| {
            state.apps_body = body;
            Ok(())
        });
    }

    /// Publishes any event; `eventType` and `timestamp` are added to an object without them.
    pub fn emit(&self, event_type: &str, mut event: Value) {
        self.shared.change(|state| {
            if let Some(object) = event.as_object_mut() {
                object
                    .entry("eventType")
                    .or_insert_with(|| json!(event_type));
                object
                    .entry("timestamp")
                    .or_insert_with(|| json!(state.now()));
            }
            state.publish(event_type, &event.to_string());
            Ok(())
        });
    }

    /// What `GET /v2/apps?embed=apps.tasks` answers right now.
    pub fn apps_json(&self) -> Value {
        self.shared.lock().render_apps(true)
    }

    /// Every event published so far, streams or not, in order.
    pub fn published(&self) -> Vec<(String, Value)> {
        self.shared.lock().published.clone()
    }

    pub fn set_auth(&self, auth: Auth) {
        self.shared.lock().auth = auth;
    }

    pub fn set_basic_auth(&self, credentials: Option<(&str, &str)>) {
        self.set_auth(
            credentials.map_or(Auth::None, |(user, password)| Auth::Basic {
                user: user.to_string(),
                password: password.to_string(),
            }),
        );
    }

    pub fn set_token(&self, token: Option<&str>) {
        self.set_auth(token.map_or(Auth::None, |token| Auth::Token(token.to_string())));
    }

    /// Faults of `GET /v2/apps` and `GET /v2/apps/{id}`.
    pub fn set_apps_fault(&self, fault: Fault) {
        self.shared.lock().apps_fault = fault;
    }

    /// Faults of new `GET /v2/events` requests; open streams go on.
    pub fn set_events_fault(&self, fault: Fault) {
        self.shared.lock().events_fault = fault;
    }

    /// The streams open now stay open and get nothing more, heartbeats included, as behind a
    /// hung proxy; no FIN. Changes still apply, and streams opened later work.
    pub fn stall_streams(&self) {
        for stream in &self.shared.lock().streams {
            stream.stalled.store(true, Ordering::SeqCst);
        }
    }

    /// Ends every open stream cleanly now (the body ends, the connection closes), as Marathon
    /// does when it loses leadership.
    pub fn cut_streams(&self) {
        // Dropping the senders ends each body once it has sent what was queued.
        self.shared.lock().streams.clear();
    }

    /// Kills every open stream's connection mid-body: the client reads an error, not an end.
    pub fn abort_streams(&self) {
        for stream in self.shared.lock().streams.drain(..) {
            let _ = stream.tx.send(Frame::Abort);
        }
    }

    /// A bare line ending every `period` on streams opened from now on (Jetty: 10 s).
    pub fn set_heartbeat(&self, period: Option<Duration>) {
        self.shared.lock().heartbeat = period;
    }

    /// The line ending of streams opened from now on (default CRLF, as Marathon).
    pub fn set_line_ending(&self, eol: LineEnding) {
        self.shared.lock().line_ending = eol;
    }

    /// Which ID `health_status_changed_event` carries (default `instanceId`, Marathon 1.4+).
    pub fn set_health_event_id(&self, id: HealthEventId) {
        self.shared.lock().health_event_id = id;
    }

    /// Stamps every timestamp (events, versions, task times) with `time` instead of the clock.
    pub fn freeze_time(&self, time: Option<&str>) {
        self.shared.lock().frozen_time = time.map(str::to_string);
    }

    /// `GET /v2/apps` requests so far, refused ones included (not `/v2/apps/{id}`).
    pub fn apps_requests(&self) -> u64 {
        self.shared.lock().apps_requests
    }

    /// `GET /v2/apps/{id}` requests so far, refused ones included.
    pub fn app_requests(&self) -> u64 {
        self.shared.lock().app_requests
    }

    /// Bytes of the `/v2/apps` and `/v2/apps/{id}` answers served so far (the JSON bodies).
    pub fn served_bytes(&self) -> u64 {
        self.shared.lock().served_bytes
    }

    /// `GET /v2/events` requests so far, refused ones included.
    pub fn events_requests(&self) -> u64 {
        self.shared.lock().events_requests
    }

    /// Event streams opened so far.
    pub fn event_connections(&self) -> u64 {
        self.shared.lock().event_connections
    }

    /// Event streams open now (stalled ones included).
    pub fn open_streams(&self) -> usize {
        self.shared.lock().streams.len()
    }

    /// Waits until exactly `count` streams are open; panics after 10 s (scaled).
    pub async fn wait_for_open_streams(&self, count: usize) {
        let what = format!("{count} open event streams");
        crate::support::eventually(Duration::from_secs(10), &what, || async {
            match self.open_streams() {
                open if open == count => Ok(()),
                open => Err(open),
            }
        })
        .await
    }

    /// The raw query string of the last `GET /v2/events` (`""` without one).
    pub fn last_events_query(&self) -> Option<String> {
        self.shared.lock().last_events_query.clone()
    }

    /// The raw query string of the last `GET /v2/apps`.
    pub fn last_apps_query(&self) -> Option<String> {
        self.shared.lock().last_apps_query.clone()
    }
}

struct Shared {
    state: Mutex<State>,
}

impl Shared {
    /// A test that panics while holding the lock must not take every later request with it.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// One change and its events under the lock; an `Err` (a test naming something unknown)
    /// fails the test, outside the lock.
    fn change(&self, change: impl FnOnce(&mut State) -> Result<(), String>) {
        let result = change(&mut self.lock());
        if let Err(message) = result {
            panic!("marathon double: {message}");
        }
    }
}

struct State {
    /// Apps as /v2/apps embeds them (with `tasks`), in the order they were created.
    apps: Vec<Value>,
    /// What /v2/apps answers instead of the apps, when set (`serve_apps_body`).
    apps_body: Option<Bytes>,
    /// Service ports per app, for the `servicePorts` of new tasks.
    service_ports: BTreeMap<String, Vec<u16>>,
    /// Assigned service ports by (app, port index): stable across `put_app`s.
    assigned_ports: BTreeMap<(String, usize), u16>,
    next_service_port: u16,
    deployments: u64,
    streams: Vec<Subscriber>,
    next_stream: u64,
    published: Vec<(String, Value)>,
    auth: Auth,
    apps_fault: Fault,
    events_fault: Fault,
    heartbeat: Option<Duration>,
    line_ending: LineEnding,
    health_event_id: HealthEventId,
    frozen_time: Option<String>,
    apps_requests: u64,
    app_requests: u64,
    served_bytes: u64,
    events_requests: u64,
    event_connections: u64,
    last_apps_query: Option<String>,
    last_events_query: Option<String>,
}

impl State {
    fn new() -> State {
        State {
            apps: Vec::new(),
            apps_body: None,
            service_ports: BTreeMap::new(),
            assigned_ports: BTreeMap::new(),
            next_service_port: FIRST_SERVICE_PORT,
            deployments: 0,
            streams: Vec::new(),
            next_stream: 0,
            published: Vec::new(),
            auth: Auth::None,
            apps_fault: Fault::None,
            events_fault: Fault::None,
            heartbeat: Some(JETTY_HEARTBEAT),
            line_ending: LineEnding::CrLf,
            health_event_id: HealthEventId::InstanceId,
            frozen_time: None,
            apps_requests: 0,
            app_requests: 0,
            served_bytes: 0,
            events_requests: 0,
            event_connections: 0,
            last_apps_query: None,
            last_events_query: None,
        }
    }

    fn now(&self) -> String {
        self.frozen_time
            .clone()
            .unwrap_or_else(|| events::timestamp(SystemTime::now()))
    }

    /// Sends the event to every open stream that wants it, and logs it.
    fn publish(&mut self, event_type: &str, data: &str) {
        self.streams.retain(|stream| !stream.tx.is_closed());
        for stream in &self.streams {
            stream.offer(event_type, data);
        }
        let value = serde_json::from_str(data).unwrap_or(Value::Null);
        self.published.push((event_type.to_string(), value));
    }

    fn service_port(&mut self, app_id: &str, index: usize) -> u16 {
        let key = (app_id.to_string(), index);
        if let Some(port) = self.assigned_ports.get(&key) {
            return *port;
        }
        let port = self.next_service_port;
        self.next_service_port += 1;
        self.assigned_ports.insert(key, port);
        port
    }

    fn app_index(&self, id: &str) -> Option<usize> {
        self.apps.iter().position(|app| app["id"] == json!(id))
    }

    /// (app index, task index) of a task.
    fn find_task(&self, task_id: &str) -> Option<(usize, usize)> {
        self.apps.iter().enumerate().find_map(|(a, app)| {
            let tasks = app["tasks"].as_array()?;
            let t = tasks.iter().position(|task| task["id"] == json!(task_id))?;
            Some((a, t))
        })
    }

    fn add_task(&mut self, app_id: &str, task: &Task) -> Result<(), String> {
        if self.find_task(&task.id).is_some() {
            return Err(format!("task {:?} exists already", task.id));
        }
        let index = self
            .app_index(app_id)
            .ok_or_else(|| format!("no app {app_id:?} for task {:?}", task.id))?;
        let now = self.now();
        let version = self.apps[index]["version"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let service_ports = self.service_ports.get(app_id).cloned().unwrap_or_default();
        let json = task.to_json(app_id, &version, &service_ports, &now);
        let tasks = &mut self.apps[index]["tasks"];
        if !tasks.is_array() {
            *tasks = json!([]);
        }
        tasks.as_array_mut().unwrap().push(json.clone());
        let status = task.state.as_deref().unwrap_or("TASK_RUNNING");
        self.publish(
            "status_update_event",
            &events::status_update(&json, status, &now),
        );
        // A task added with a health result: Marathon's first check of it says so.
        if let Some(alive) = task.health {
            let event = events::health_changed(&json, alive, self.health_event_id, &now);
            self.publish("health_status_changed_event", &event);
        }
        Ok(())
    }

    fn set_task_state(&mut self, task_id: &str, new_state: &str) -> Result<(), String> {
        let (app, index) = self
            .find_task(task_id)
            .ok_or_else(|| format!("no task {task_id:?}"))?;
        let now = self.now();
        let tasks = self.apps[app]["tasks"].as_array_mut().unwrap();
        let task = &mut tasks[index];
        if task.get("state").is_some() {
            task["state"] = json!(new_state);
        }
        if new_state == "TASK_RUNNING" && task["startedAt"].is_null() {
            task["startedAt"] = json!(now);
        }
        let event = events::status_update(task, new_state, &now);
        if model::is_terminal(new_state) {
            tasks.remove(index);
        }
        self.publish("status_update_event", &event);
        Ok(())
    }

    fn render_apps(&self, embed_tasks: bool) -> Value {
        let apps: Vec<Value> = self
            .apps
            .iter()
            .map(|app| render_app(app, embed_tasks))
            .collect();
        json!({ "apps": apps })
    }
}

/// An app as answered: counts from its tasks, and the tasks only if embedded.
fn render_app(app: &Value, embed_tasks: bool) -> Value {
    let mut app = app.clone();
    let Some(object) = app.as_object_mut() else {
        return app;
    };
    if let Some(tasks) = object.get("tasks").and_then(Value::as_array) {
        for (key, count) in model::counts(tasks) {
            object.insert(key.to_string(), json!(count));
        }
    }
    if !embed_tasks {
        object.remove("tasks");
    }
    app
}
