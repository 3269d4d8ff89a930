//! The Marathon source: events change the apps in place where they carry enough, single-app
//! fetches fill in where they do not, and full fetches only (re)synchronize.
//!
//! ```text
//! /v2/events (SSE) ── event ──> queue ──> state::Apps::apply ─ Applied ──────────────┐
//!                                             │ FetchApp(id), coalesced              │
//!                                             v                                      │
//!                                  /v2/apps/{id}?embed=app.tasks ──> replace app ────┤
//! stream (re)attached, resync timer,                                                 │
//! an event weft cannot trust ──> /v2/apps?embed=apps.tasks ──> Apps::from_full ──────┤
//!   (at most one per full_fetch_interval)                                            v
//!                            each app's services (routing::app_services) ──> SourceReport
//!                                                       (published only when routing changed)
//! ```
//!
//! Several URLs (one per Marathon master) are tried in order, the last one that answered
//! first. A silent stream is reconnected after the read timeout and the state refetched, so
//! nothing missed while it hung is lost. Failures keep the last good services and mark the
//! source degraded until it recovers.

pub mod api;
pub mod routing;
pub mod state;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventsource_stream::Eventsource;
use futures::StreamExt;
use reqwest::header::{HeaderValue, AUTHORIZATION};
use reqwest::Url;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use self::routing::RoutingSettings;
use self::state::{Apps, Outcome};
use super::http::{fetch_into, Body, HttpError, Sink};
use super::records::{Records, Streamed};
use super::{error_chain, Backoff};
use crate::config::{redact, MarathonAuth, MarathonSourceConfig};
use crate::escape::Escaped;
use crate::model::{Health, Hostname, Rejected, ServiceDef, SourceId, SourceReport};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// The first event of every stream.
const ATTACHED: &str = "event_stream_attached";

/// The largest `/v2/apps` answer weft reads: 10,000 apps with 3 tasks each are about 20 MiB.
pub const MAX_APPS_BODY: usize = 256 << 20;
/// The largest `/v2/apps/{id}` answer weft reads: one app can be as large as all of them.
pub const MAX_APP_BODY: usize = MAX_APPS_BODY;
/// Events read but not yet applied: the stream waits (and, past its read timeout, reconnects
/// and is caught up by a full fetch) while this many are queued.
pub const EVENT_QUEUE: usize = 1024;
/// The largest event kept until it is applied; a larger one is replaced by a full fetch.
/// Those weft applies are a few hundred bytes; an `api_post_event` carries a whole definition.
pub const MAX_QUEUED_EVENT: usize = 64 << 10;
/// App fetches queued at once; past it, one full fetch replaces them.
pub const MAX_PENDING_APPS: usize = 1000;
/// How long the first full fetch waits for the event stream to attach, so that no event
/// between the two is missed and the attach needs no second full fetch.
const ATTACH_WAIT: Duration = Duration::from_secs(1);

/// What weft asks Marathon for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fetch {
    /// `/v2/apps?embed=apps.tasks`: every app.
    Full = 0,
    /// `/v2/apps/{id}?embed=app.tasks`: one app.
    App = 1,
}

/// How an event was used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventUse {
    /// Applied in place.
    Applied = 0,
    /// Its app fetched alone.
    FetchedApp = 1,
    /// A full fetch.
    FetchedAll = 2,
    /// Nothing routed depends on it.
    Ignored = 3,
}

/// Counts since weft started, for the metrics: requests and bytes by [`Fetch`], events by
/// [`EventUse`].
pub struct Counters {
    requests: [AtomicU64; 2],
    bytes: [AtomicU64; 2],
    events: [AtomicU64; 4],
}

pub static COUNTERS: Counters = Counters {
    requests: [AtomicU64::new(0), AtomicU64::new(0)],
    bytes: [AtomicU64::new(0), AtomicU64::new(0)],
    events: [
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
    ],
};

impl Counters {
    pub fn requests(&self, kind: Fetch) -> u64 {
        self.requests[kind as usize].load(Ordering::Relaxed)
    }

    pub fn bytes(&self, kind: Fetch) -> u64 {
        self.bytes[kind as usize].load(Ordering::Relaxed)
    }

    pub fn events(&self, used: EventUse) -> u64 {
        self.events[used as usize].load(Ordering::Relaxed)
    }

    fn count_event(&self, used: EventUse) {
        self.events[used as usize].fetch_add(1, Ordering::Relaxed);
    }
}
/// The longest event of the stream, its lines together (and so the longest line). Marathon
/// writes an event as one `data:` line; weft keeps none longer than [`MAX_QUEUED_EVENT`] (a
/// longer one is replaced by a full fetch), and one past this bound ends the stream, which is
/// reconnected and caught up by a full fetch all the same. The bound keeps two costs small:
/// the reader joins `data:` lines until a blank one (without it, short lines and no blank one
/// would grow an event without end), and it parses an unfinished event again from its start
/// as each chunk comes (the work grows as the square of an event's chunks).
pub const MAX_EVENT: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum MarathonError {
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("event stream from {}: {message}", redact(url))]
    Stream { url: Url, message: String },
    #[error(
        "event stream from {}: no complete line for {after:?} (silent, or bytes without a newline)",
        redact(url)
    )]
    Silent { url: Url, after: Duration },
    #[error("no Marathon URL answered: {}", errors.join("; "))]
    AllFailed { errors: Vec<String> },
}

/// HTTP to Marathon, shared by the fetcher and the stream.
struct Client {
    http: reqwest::Client,
    config: MarathonSourceConfig,
    /// Index of the URL that answered last: tried first next time.
    preferred: AtomicUsize,
}

impl Client {
    fn new(config: MarathonSourceConfig) -> Result<Client, MarathonError> {
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            // A redirect would carry the Authorization header to wherever it points (reqwest
            // drops it only across hosts, and keeps it from https to http): a 3xx is an error.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(HttpError::Client)?;
        Ok(Client {
            http,
            config,
            preferred: AtomicUsize::new(0),
        })
    }

    /// The URLs in the order to try them.
    fn urls(&self) -> Vec<(usize, &Url)> {
        let first = self.preferred.load(Ordering::Relaxed);
        let mut urls: Vec<(usize, &Url)> = self.config.urls.iter().enumerate().collect();
        urls.sort_by_key(|(i, _)| *i != first);
        urls
    }

    fn request(&self, url: Url) -> reqwest::RequestBuilder {
        let request = self.http.get(url);
        match &self.config.auth {
            None => request,
            // reqwest marks the basic-auth header sensitive itself.
            Some(MarathonAuth::Basic { user, password }) => {
                request.basic_auth(user, Some(password.expose()))
            }
            Some(MarathonAuth::Token(token)) => {
                match HeaderValue::from_str(&format!("token={}", token.expose())) {
                    Ok(mut value) => {
                        value.set_sensitive(true);
                        request.header(AUTHORIZATION, value)
                    }
                    // Refused by reqwest when sent, with a message that does not echo it.
                    Err(_) => request.header("Authorization", format!("token={}", token.expose())),
                }
            }
        }
    }

    fn endpoint(base: &Url, segments: &[&str]) -> Url {
        let mut url = base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    /// `/v2/apps?embed=apps.tasks` from the first URL that answers.
    async fn fetch_apps(&self) -> Result<api::AppsResponse, MarathonError> {
        let apps = self.fetch_apps_each(|app| app).await?;
        Ok(api::AppsResponse { apps })
    }

    /// The apps of `/v2/apps?embed=apps.tasks` from the first URL that answers, each as
    /// `each` makes it, decoded as the answer comes ([`api::apps_as_they_come`]).
    async fn fetch_apps_each<U: Send + 'static>(
        &self,
        each: impl Fn(api::MarathonApp) -> U + Sync + Send + 'static,
    ) -> Result<Records<U>, MarathonError> {
        let each: Arc<dyn Fn(api::MarathonApp) -> U + Send + Sync> = Arc::new(each);
        let apps = self
            .get_from_any(
                &["v2", "apps"],
                "apps.tasks",
                Fetch::Full,
                || api::apps_as_they_come(Arc::clone(&each)),
                Streamed::finish,
            )
            .await?;
        apps.ok_or_else(|| MarathonError::AllFailed {
            errors: vec!["/v2/apps: 404".into()],
        })
    }

    /// `/v2/apps/{id}?embed=app.tasks` from the first URL that answers; `None`: there is no
    /// such app (404). `id` must pass [`state::is_app_id`].
    async fn fetch_app(&self, id: &str) -> Result<Option<api::FetchedApp>, MarathonError> {
        let mut segments = vec!["v2", "apps"];
        segments.extend(id.split('/').filter(|segment| !segment.is_empty()));
        self.get_from_any(&segments, "app.tasks", Fetch::App, Body::default, |body| {
            api::decode_app(&body.into_vec())
        })
        .await
    }

    /// GETs `segments?embed=...` from the first URL whose answer decodes, its body taken by a
    /// sink from `start` as it comes, then decoded by `decode`; `None` when one answers that
    /// there is no such app (404).
    async fn get_from_any<S: Sink + Send, T>(
        &self,
        segments: &[&str],
        embed: &str,
        kind: Fetch,
        start: impl Fn() -> S,
        decode: impl Fn(S) -> Result<T, String>,
    ) -> Result<Option<T>, MarathonError> {
        let max = match kind {
            Fetch::Full => MAX_APPS_BODY,
            Fetch::App => MAX_APP_BODY,
        };
        let mut errors = Vec::new();
        for (index, base) in self.urls() {
            let mut url = Self::endpoint(base, segments);
            url.query_pairs_mut().append_pair("embed", embed);
            let request = self
                .request(url.clone())
                .timeout(self.config.request_timeout);
            COUNTERS.requests[kind as usize].fetch_add(1, Ordering::Relaxed);
            let mut body = start();
            let length = match fetch_into(request, &url, max, &mut body).await {
                Ok((_, length)) => length,
                // Marathon's own answer that the app does not exist; a 404 from a proxy in
                // front of it (a failover, a wrong path) is an error like any other.
                Err(HttpError::Status { status, body, .. })
                    if status == reqwest::StatusCode::NOT_FOUND
                        && kind == Fetch::App
                        && body.contains("does not exist") =>
                {
                    self.preferred.store(index, Ordering::Relaxed);
                    return Ok(None);
                }
                Err(err) => {
                    errors.push(err.to_string());
                    continue;
                }
            };
            COUNTERS.bytes[kind as usize].fetch_add(length as u64, Ordering::Relaxed);
            debug!(url = %redact(&url), ?kind, bytes = length, "marathon answer read");
            match decode(body) {
                Ok(decoded) => {
                    debug!(url = %redact(&url), ?kind, "marathon answer decoded");
                    self.preferred.store(index, Ordering::Relaxed);
                    return Ok(Some(decoded));
                }
                Err(message) => errors.push(HttpError::decode(url, &message).to_string()),
            }
        }
        Err(MarathonError::AllFailed { errors })
    }

    /// Opens `/v2/events` on the first URL that accepts it.
    async fn open_stream(&self) -> Result<(Url, reqwest::Response), MarathonError> {
        let mut errors = Vec::new();
        for (index, base) in self.urls() {
            let mut url = Self::endpoint(base, &["v2", "events"]);
            {
                let mut query = url.query_pairs_mut();
                // Marathon filters its own attach event too: ask for it.
                query.append_pair("event_type", ATTACHED);
                for event in &self.config.event_types {
                    query.append_pair("event_type", event);
                }
                query.append_pair("plan-format", "light");
            }
            let request = self
                .request(url.clone())
                .header("Accept", "text/event-stream")
                .send();
            // A leader that accepts the connection and never answers must not hold the
            // stream (and the other URLs) forever: the read timeout covers the headers too.
            match tokio::time::timeout(self.config.read_timeout, request).await {
                Ok(Ok(response)) if response.status().is_success() => {
                    self.preferred.store(index, Ordering::Relaxed);
                    return Ok((url, response));
                }
                Ok(Ok(response)) => errors.push(
                    HttpError::redirect("GET", &url, response.status(), response.headers())
                        .map_or_else(
                            || format!("GET {}: {}", redact(&url), response.status()),
                            |redirect| redirect.to_string(),
                        ),
                ),
                Ok(Err(source)) => errors.push(HttpError::request(&url, source).to_string()),
                Err(_) => errors.push(format!(
                    "GET {}: no answer within the read timeout ({:?})",
                    redact(&url),
                    self.config.read_timeout
                )),
            }
        }
        Err(MarathonError::AllFailed { errors })
    }
}

/// What the fetcher and the stream know, published together.
#[derive(Default)]
struct State {
    /// `None` until the first fetch succeeded.
    content: Option<(Vec<std::sync::Arc<ServiceDef>>, Vec<Rejected>)>,
    fetch_error: Option<String>,
    started: super::StartGrace,
    stream_error: Option<String>,
}

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
        let Some((services, rejected)) = state.content.clone() else {
            // Never publish before a complete first fetch, unless to say, past the start
            // grace, that there is none yet (and why), so that nothing else waits for it.
            if state.started.is_over() {
                let reason = state.fetch_error.clone().unwrap_or_else(|| {
                    format!("no answer yet ({:?} after the start)", super::START_GRACE)
                });
                self.tx.send_if_modified(|report| report.degrade(reason));
            }
            return;
        };
        let errors: Vec<String> = [&state.fetch_error, &state.stream_error]
            .into_iter()
            .flatten()
            .cloned()
            .collect();
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

/// Fetches the apps once, for `weft render` and `weft check`.
pub async fn read_once(
    config: MarathonSourceConfig,
    domain: Option<Hostname>,
) -> Result<SourceReport, MarathonError> {
    let settings = RoutingSettings {
        group: config.group.clone(),
        domain,
        host_ports: config.host_ports,
    };
    let client = Client::new(config)?;
    let apps = client
        .fetch_apps_each(move |app| Apps::read_app(app, &settings))
        .await?;
    let (services, rejected) = Apps::content_of_full(apps);
    debug!(services = services.len(), "marathon services worked out");
    Ok(SourceReport {
        certificates: Default::default(),
        challenges: Default::default(),
        source: SourceId::Marathon,
        services,
        rejected,
        health: Health::Ok,
    })
}

/// What the stream hands the fetcher, in the stream's order.
#[derive(Debug)]
enum Incoming {
    /// A stream (re)attached: whatever happened while none was attached is unknown.
    Attached,
    Event {
        kind: String,
        data: String,
    },
    /// An event over [`MAX_QUEUED_EVENT`]: not kept, a full fetch instead.
    TooLarge {
        kind: String,
    },
}

/// What the fetcher still has to do.
struct Wants {
    /// A full fetch, when due.
    full: bool,
    /// Apps to fetch alone, each once however many events asked.
    apps: BTreeSet<String>,
    /// When the last full fetch ended: the next waits for `full_fetch_interval` after it.
    last_full: Option<tokio::time::Instant>,
    /// After a failure, nothing is fetched before this.
    retry_at: Option<tokio::time::Instant>,
}

impl Wants {
    /// When the full fetch wanted may run.
    fn full_due(
        &self,
        spacing: Duration,
        now: tokio::time::Instant,
    ) -> Option<tokio::time::Instant> {
        if !self.full {
            return None;
        }
        let spaced = self.last_full.map(|at| at + spacing);
        Some(
            [spaced, self.retry_at]
                .into_iter()
                .flatten()
                .max()
                .unwrap_or(now),
        )
    }

    /// Takes what an event asks for.
    fn ask(&mut self, outcome: Outcome) {
        let used = match outcome {
            Outcome::Applied => EventUse::Applied,
            Outcome::Ignored => EventUse::Ignored,
            Outcome::FetchApp(id) => {
                if self.apps.len() >= MAX_PENDING_APPS {
                    self.full = true;
                } else {
                    self.apps.insert(id);
                }
                EventUse::FetchedApp
            }
            Outcome::FetchAll => {
                self.full = true;
                EventUse::FetchedAll
            }
        };
        COUNTERS.count_event(used);
    }
}

/// Runs the Marathon source until `shutdown`.
///
/// One task reads the stream and queues its events; this one applies them in order to the
/// apps it knows, and fetches, one request at a time, what they do not carry. An event that
/// arrives while a fetch is under way is applied after the fetch's answer: events are changes
/// to the latest state, so applying again one that the answer already holds changes nothing,
/// and every later one follows it in the stream's order.
pub async fn run(
    config: MarathonSourceConfig,
    domain: Option<Hostname>,
    tx: watch::Sender<SourceReport>,
    shutdown: CancellationToken,
) -> Result<(), MarathonError> {
    let settings = RoutingSettings {
        group: config.group.clone(),
        domain,
        host_ports: config.host_ports,
    };
    let resync = config.resync;
    let spacing = config.full_fetch_interval;
    let client = Arc::new(Client::new(config)?);
    let publisher = Publisher {
        state: Arc::new(Mutex::new(State::default())),
        tx,
    };
    let nudged = publisher.clone();
    super::after_start_grace(shutdown.clone(), move || nudged.update(|_| {}));
    let (events_tx, mut events) = mpsc::channel(EVENT_QUEUE);
    let urls: Vec<String> = client.config.urls.iter().map(redact).collect();
    info!(urls = ?urls, group = ?settings.group, "watching marathon");

    let mut stream = tokio::spawn(follow_events(
        client.clone(),
        events_tx,
        publisher.clone(),
        shutdown.clone(),
    ));
    // The first full fetch waits briefly for the stream's attach, which it then covers.
    let first = tokio::select! {
        _ = shutdown.cancelled() => None,
        first = tokio::time::timeout(ATTACH_WAIT, events.recv()) => first.ok().flatten(),
    };
    let mut pending: Vec<Incoming> = first
        .into_iter()
        .filter(|incoming| !matches!(incoming, Incoming::Attached))
        .collect();
    let mut apps: Option<Apps> = None;
    let mut wants = Wants {
        full: true,
        apps: BTreeSet::new(),
        last_full: None,
        retry_at: None,
    };
    let mut backoff = Backoff::default();
    // A fetch succeeded since the last publish: the fetch error, if any, is over.
    let mut recovered = false;
    let mut resync_timer = tokio::time::interval_at(tokio::time::Instant::now() + resync, resync);
    loop {
        // Events first, in order: those queued during a fetch apply to its answer.
        for incoming in pending.drain(..) {
            match (incoming, &mut apps) {
                (Incoming::Attached, _) => wants.full = true,
                // Before the first full answer, that answer holds it all.
                (Incoming::Event { .. }, None) => {}
                (Incoming::Event { kind, data }, Some(apps)) => {
                    let outcome = apps.apply(&kind, &data);
                    debug!(event = %Escaped(&kind), ?outcome, "marathon event");
                    wants.ask(outcome);
                }
                (Incoming::TooLarge { kind }, Some(_)) => {
                    debug!(event = %Escaped(&kind), "marathon event too large to keep");
                    wants.ask(Outcome::FetchAll);
                }
                (Incoming::TooLarge { .. }, None) => {}
            }
        }
        // Published once per batch of events and fetch answers, and only with a change.
        let changed = apps.as_mut().is_some_and(Apps::take_changed);
        if changed || recovered {
            let content = apps.as_ref().filter(|_| changed).map(Apps::content);
            publisher.update(|state| {
                if content.is_some() {
                    state.content = content;
                }
                if recovered {
                    state.fetch_error = None;
                }
            });
            recovered = false;
        }
        let now = tokio::time::Instant::now();
        let full_due = wants.full_due(spacing, now);
        let app_due = wants.retry_at.map_or(true, |at| at <= now) && !wants.apps.is_empty();
        if full_due.is_some_and(|due| due <= now) {
            // A hung leader costs the request timeout per URL: shutdown does not wait for it.
            let fetched = tokio::select! {
                _ = shutdown.cancelled() => break,
                fetched = client.fetch_apps() => fetched,
            };
            match fetched {
                Ok(answer) => {
                    backoff.reset();
                    let state = Apps::from_full(answer, &settings);
                    debug!(apps = state.len(), "marathon apps fetched");
                    apps = Some(state);
                    wants.full = false;
                    wants.apps.clear();
                    wants.retry_at = None;
                    recovered = true;
                }
                Err(err) => failed(&mut wants, &mut backoff, &publisher, err),
            }
            wants.last_full = Some(tokio::time::Instant::now());
        } else if let (true, Some(known)) = (app_due, apps.as_mut()) {
            let Some(id) = wants.apps.pop_first() else {
                continue;
            };
            let fetched = tokio::select! {
                _ = shutdown.cancelled() => break,
                fetched = client.fetch_app(&id) => fetched,
            };
            match fetched {
                Ok(fetched) => {
                    debug!(app = %Escaped(&id), found = fetched.is_some(), "marathon app fetched");
                    known.replace(&id, fetched);
                    // A full fetch still wanted after a failure: its error and backoff stand.
                    if !wants.full {
                        wants.retry_at = None;
                        recovered = true;
                    }
                }
                // What it would have said is unknown now: a full fetch catches up.
                Err(err) => {
                    wants.full = true;
                    failed(&mut wants, &mut backoff, &publisher, err);
                }
            }
        } else {
            let wake = full_due.or(wants.retry_at.filter(|_| !wants.apps.is_empty()));
            tokio::select! {
                _ = shutdown.cancelled() => break,
                // It returns only at shutdown; a panic is weft's to report, not to hide.
                ended = &mut stream => match ended {
                    Err(failed) if failed.is_panic() => std::panic::resume_unwind(failed.into_panic()),
                    _ => break,
                },
                incoming = events.recv() => pending.extend(incoming),
                _ = resync_timer.tick() => {
                    debug!("marathon periodic resync");
                    wants.full = true;
                }
                () = sleep_until_some(wake) => {}
            }
        }
        // Whatever else is queued joins the next batch (at most a queue's worth).
        while pending.len() < EVENT_QUEUE {
            match events.try_recv() {
                Ok(incoming) => pending.push(incoming),
                Err(_) => break,
            }
        }
    }
    stream.abort();
    Ok(())
}

/// A fetch failed: the last good services stay, the source is degraded, and nothing is fetched
/// again before the backoff's delay.
fn failed(wants: &mut Wants, backoff: &mut Backoff, publisher: &Publisher, err: MarathonError) {
    let delay = backoff.next_delay();
    warn!(error = %Escaped(&err), retry_in = ?delay, "marathon fetch failing, keeping the last good services");
    wants.retry_at = Some(tokio::time::Instant::now() + delay);
    publisher.update(|state| state.fetch_error = Some(err.to_string()));
}

async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// How long a stream must have lasted for the reconnect backoff to start over
/// (reference/marathon.md).
const HEALTHY_STREAM: Duration = Duration::from_secs(600);

/// Follows `/v2/events`: every relevant event, and every (re)attach, asks for a refetch.
async fn follow_events(
    client: Arc<Client>,
    events: mpsc::Sender<Incoming>,
    publisher: Publisher,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::default();
    loop {
        let started = tokio::time::Instant::now();
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            result = read_stream(&client, &events, &publisher) => result,
        };
        // Only a stream that stayed up a while earns a quick reconnect: one that Marathon (or
        // a proxy) closes right after it opened must not cost a full refetch every moment.
        if started.elapsed() >= HEALTHY_STREAM {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        match result {
            Err(err @ MarathonError::Silent { .. }) => {
                info!(error = %Escaped(&err), "marathon event stream silent, reconnecting and refetching")
            }
            Err(err) => {
                warn!(error = %Escaped(&err), retry_in = ?delay, "marathon event stream down, relying on resync until it is back");
                publisher.update(|state| state.stream_error = Some(err.to_string()));
            }
            Ok(()) => {}
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Why reading the raw stream stopped.
#[derive(Debug)]
enum ReadError {
    Http(reqwest::Error),
    Silent,
    TooLong,
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Http(err) => f.write_str(&error_chain(err)),
            ReadError::Silent => f.write_str("silent"),
            ReadError::TooLong => write!(
                f,
                "an event longer than {} MiB: reconnected, and caught up by a full fetch",
                MAX_EVENT >> 20
            ),
        }
    }
}

impl std::error::Error for ReadError {}

/// When the stream's current line must end: `read_timeout` after the last one ended; and the
/// current event (the bytes since the last blank line, which ends an event) must end before it
/// is `MAX_EVENT` long.
struct LineWatch {
    read_timeout: Duration,
    last_line: tokio::time::Instant,
    /// Bytes of the current line, line ends not counted.
    line: usize,
    /// Bytes of the current event, line ends not counted.
    event: usize,
    /// The last byte seen was a `\r`: a `\n` right after it ends no second line.
    after_cr: bool,
}

impl LineWatch {
    fn new(read_timeout: Duration) -> LineWatch {
        LineWatch {
            read_timeout,
            last_line: tokio::time::Instant::now(),
            line: 0,
            event: 0,
            after_cr: false,
        }
    }

    fn deadline(&self) -> tokio::time::Instant {
        self.last_line + self.read_timeout
    }

    /// Follows `chunk`'s lines as the event-stream format ends them (`\r\n`, `\n` or `\r`).
    fn saw(&mut self, chunk: &[u8]) -> Result<(), ReadError> {
        let mut ended = false;
        let mut rest = chunk;
        while let Some(at) = memchr::memchr2(b'\n', b'\r', rest) {
            let (text, end) = (at, rest[at]);
            if text > 0 || !(self.after_cr && end == b'\n') {
                self.event += text;
                if self.event > MAX_EVENT {
                    return Err(ReadError::TooLong);
                }
                // A line with nothing on it ends the event.
                if self.line + text == 0 {
                    self.event = 0;
                }
                self.line = 0;
                ended = true;
            }
            self.after_cr = end == b'\r';
            rest = &rest[at + 1..];
        }
        if !rest.is_empty() {
            self.line += rest.len();
            self.event += rest.len();
            self.after_cr = false;
        }
        if ended {
            self.last_line = tokio::time::Instant::now();
        }
        if self.event > MAX_EVENT {
            return Err(ReadError::TooLong);
        }
        Ok(())
    }
}

/// The events of an event stream's chunks of text. The parser (eventsource-stream) copies the
/// text it holds after each line it reads, so a chunk of N lines cost N times its length (four
/// 256 KiB chunks of short events: most of a second of one core): each chunk is handed over a
/// line at a time, and the parser holds at most one line and the start of the next, so that
/// the cost follows the text's length (`cargo bench --bench event_stream`).
pub fn events<S, E>(
    chunks: S,
) -> impl futures::Stream<
    Item = Result<eventsource_stream::Event, eventsource_stream::EventStreamError<E>>,
>
where
    S: futures::Stream<Item = Result<bytes::Bytes, E>>,
{
    use futures::future::Either;
    chunks
        .flat_map(|chunk| match chunk {
            Ok(chunk) => Either::Left(futures::stream::iter(lines_of(chunk).map(Ok))),
            Err(err) => Either::Right(futures::stream::iter([Err(err)])),
        })
        .eventsource()
}

/// `chunk` in pieces that each end after a line end (`\n` or `\r`: a `\r\n` split in two is
/// one line end to the parser, which waits for the `\n`), the last one perhaps before.
fn lines_of(chunk: bytes::Bytes) -> impl Iterator<Item = bytes::Bytes> {
    let mut start = 0;
    std::iter::from_fn(move || {
        if start == chunk.len() {
            return None;
        }
        let end =
            memchr::memchr2(b'\n', b'\r', &chunk[start..]).map_or(chunk.len(), |at| start + at + 1);
        let piece = chunk.slice(start..end);
        start = end;
        Some(piece)
    })
}

/// Reads one stream until it ends, fails or stays silent for the read timeout.
///
/// The timeout applies to lines, not events: Marathon's Jetty sends a bare line as a
/// keep-alive every 10 s, which keeps a quiet but healthy stream alive, while a stream that
/// hangs (a proxy, a stuck leader) sends nothing at all, and one that sends bytes without a
/// newline never completes an event (both are reconnected; an event longer than `MAX_EVENT`
/// is too).
async fn read_stream(
    client: &Client,
    queue: &mpsc::Sender<Incoming>,
    publisher: &Publisher,
) -> Result<(), MarathonError> {
    let (url, response) = client.open_stream().await?;
    let read_timeout = client.config.read_timeout;
    info!(url = %redact(&url), "marathon event stream connected");
    publisher.update(|state| state.stream_error = None);
    // A line must end within `read_timeout` of the last one, and an event within MAX_EVENT
    // bytes: a stream that trickles bytes without a newline is as dead as a silent one.
    let bytes = futures::stream::unfold(
        (response.bytes_stream(), LineWatch::new(read_timeout), false),
        move |(mut stream, mut lines, done)| async move {
            if done {
                return None;
            }
            // Checked before reading too: `timeout_at` polls the stream first, and a stream
            // that always has bytes ready would never let it fire.
            if tokio::time::Instant::now() >= lines.deadline() {
                return Some((Err(ReadError::Silent), (stream, lines, true)));
            }
            let next = tokio::time::timeout_at(lines.deadline(), stream.next()).await;
            match next {
                Ok(Some(Ok(chunk))) => match lines.saw(&chunk) {
                    Ok(()) => Some((Ok(chunk), (stream, lines, false))),
                    Err(err) => Some((Err(err), (stream, lines, true))),
                },
                Ok(Some(Err(err))) => Some((
                    Err(ReadError::Http(err.without_url())),
                    (stream, lines, true),
                )),
                Ok(None) => None,
                Err(_) => Some((Err(ReadError::Silent), (stream, lines, true))),
            }
        },
    );
    let mut events = Box::pin(events(bytes));
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(event) => event,
            Err(eventsource_stream::EventStreamError::Transport(ReadError::Silent)) => {
                return Err(MarathonError::Silent {
                    url,
                    after: read_timeout,
                })
            }
            Err(err) => {
                return Err(MarathonError::Stream {
                    url,
                    message: err.to_string(),
                })
            }
        };
        let incoming = if event.event == ATTACHED {
            debug!(url = %redact(&url), "marathon event stream attached");
            // Whatever happened while no stream was attached: caught up by a full fetch.
            Incoming::Attached
        } else if client.config.event_types.contains(&event.event) {
            if event.data.len() > MAX_QUEUED_EVENT {
                Incoming::TooLarge { kind: event.event }
            } else {
                Incoming::Event {
                    kind: event.event,
                    data: event.data,
                }
            }
        } else {
            continue;
        };
        // The fetcher is gone only at shutdown.
        if queue.send(incoming).await.is_err() {
            return Ok(());
        }
    }
    Err(MarathonError::Stream {
        url,
        message: "closed by Marathon".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch() -> LineWatch {
        LineWatch::new(Duration::from_secs(30))
    }

    /// Short `data:` lines and never a blank one: the reader would join them into one event
    /// without end, so the watch ends the stream once they pass `MAX_EVENT`.
    #[test]
    fn an_event_of_many_short_lines_is_bounded() {
        let lines = "data: x\n".repeat(64 << 10);
        let mut lines_watch = watch();
        let mut read = 0;
        let err = loop {
            match lines_watch.saw(lines.as_bytes()) {
                Ok(()) => read += lines.len(),
                Err(err) => break err,
            }
            assert!(read <= 2 * MAX_EVENT, "never bounded");
        };
        assert!(matches!(err, ReadError::TooLong));
        assert!(
            read >= MAX_EVENT * 8 / 7 - lines.len(),
            "ended at {read} bytes"
        );
        assert!(err.to_string().contains("an event longer than 1 MiB"));

        // The same lines as events, each ended by a blank line (in each of the three ways a
        // line may end, and split between chunks): read for ever.
        let mut events = watch();
        for end in ["\n\n", "\r\n\r\n", "\r\r"] {
            let event = format!("event: x\ndata: {}{end}", "y".repeat(MAX_EVENT / 2));
            for _ in 0..24 {
                let (a, b) = event.as_bytes().split_at(event.len() - 1);
                events.saw(a).unwrap();
                events.saw(b).unwrap();
            }
            assert_eq!((events.line, events.event), (0, 0), "{end:?}");
        }
    }

    /// `\r\n` ends one line, also when the chunk ends between the two; a line that goes on
    /// counts towards the event across chunks.
    #[test]
    fn line_ends_are_read_as_the_event_stream_format_has_them() {
        let mut lines = watch();
        lines.saw(b"data: a\r").unwrap();
        lines.saw(b"\n").unwrap();
        assert_eq!(
            (lines.line, lines.event),
            (0, 7),
            "one line, not a blank one"
        );
        lines.saw(b"\r\n").unwrap();
        assert_eq!(
            (lines.line, lines.event),
            (0, 0),
            "a blank line ends the event"
        );
        lines.saw(b"data: ").unwrap();
        lines.saw(b"bc").unwrap();
        assert_eq!((lines.line, lines.event), (8, 8));
        lines.saw(b"\n").unwrap();
        assert_eq!((lines.line, lines.event), (0, 8));
        // A keep-alive (a bare line end) between events.
        lines.saw(b"\n\r\n").unwrap();
        assert_eq!((lines.line, lines.event), (0, 0));
    }

    /// The events read a line at a time are the parser's on whole chunks, however the text is
    /// cut: line ends of every kind, `\r\n` split between chunks, comments, a multi-line
    /// event, a line split mid-character.
    #[test]
    fn events_read_line_by_line_are_those_of_whole_chunks() {
        let text = "event: a\ndata: 1\n\n: keep-alive\n\nevent: b\r\ndata: x\r\ndata: y\r\n\r\n\
                    event: c\rdata: é€\r\rid: 7\nevent: d\ndata: z\n\n";
        let read = |cuts: &[usize]| {
            let mut chunks = Vec::new();
            let mut start = 0;
            for &cut in cuts.iter().chain([&text.len()]) {
                chunks.push(Ok::<_, std::convert::Infallible>(
                    bytes::Bytes::copy_from_slice(&text.as_bytes()[start..cut]),
                ));
                start = cut;
            }
            let as_read = |events: Vec<Result<eventsource_stream::Event, _>>| {
                events
                    .into_iter()
                    .map(|e| {
                        let e = e.unwrap();
                        (e.event, e.data, e.id)
                    })
                    .collect::<Vec<_>>()
            };
            let whole = futures::executor::block_on(
                futures::stream::iter(chunks.clone())
                    .eventsource()
                    .collect::<Vec<_>>(),
            );
            let lines = futures::executor::block_on(
                events(futures::stream::iter(chunks)).collect::<Vec<_>>(),
            );
            (as_read(whole), as_read(lines))
        };
        let (whole, _) = read(&[]);
        assert_eq!(whole.len(), 4, "{whole:?}");
        assert_eq!(whole[1], ("b".into(), "x\ny".into(), String::new()));
        let crlf = text.find("\r\n").unwrap();
        let mid_char = text.find('é').unwrap() + 1;
        for cuts in [
            vec![],
            vec![crlf + 1],
            vec![mid_char],
            vec![1, 2, 3, crlf + 1, mid_char],
        ] {
            let (whole, lines) = read(&cuts);
            assert_eq!(lines, whole, "cut at {cuts:?}");
        }
        for cut in 1..text.len() {
            let (whole, lines) = read(&[cut]);
            assert_eq!(lines, whole, "cut at {cut}");
        }
    }

    /// A line that never ends is bounded too.
    #[test]
    fn a_line_without_end_is_bounded() {
        let mut line = watch();
        let chunk = vec![b'x'; MAX_EVENT / 16];
        for _ in 0..16 {
            line.saw(&chunk).unwrap();
        }
        assert!(matches!(line.saw(b"x"), Err(ReadError::TooLong)));
    }
}
