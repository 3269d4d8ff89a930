//! The Marathon source: the event stream says when, a full `/v2/apps` fetch says what.
//!
//! ```text
//! /v2/events (SSE) ── relevant event ──┐
//! stream (re)attached ─────────────────┼──> refetch (coalesced: one Notify permit)
//! resync timer (5 min) ────────────────┘        │
//!                                               v
//!                     /v2/apps?embed=apps.tasks ──> routing::app_services ──> SourceReport
//!                                                   (published only when routing changed)
//! ```
//!
//! Several URLs (one per Marathon master) are tried in order, the last one that answered
//! first. A silent stream is reconnected after the read timeout and the state refetched, so
//! nothing missed while it hung is lost. Failures keep the last good services and mark the
//! source degraded until it recovers.

pub mod api;
pub mod routing;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventsource_stream::Eventsource;
use futures::StreamExt;
use reqwest::header::{HeaderValue, AUTHORIZATION};
use reqwest::Url;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use self::routing::{app_services, RoutingSettings};
use super::http::{fetch, HttpError};
use super::{error_chain, Backoff};
use crate::config::{redact, MarathonAuth, MarathonSourceConfig};
use crate::escape::Escaped;
use crate::model::{Health, Hostname, Rejected, ServiceDef, SourceId, SourceReport};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// The first event of every stream.
const ATTACHED: &str = "event_stream_attached";

/// The largest `/v2/apps` answer weft reads: 10,000 apps with 3 tasks each are about 20 MiB.
pub const MAX_APPS_BODY: usize = 256 << 20;
/// The longest line of the event stream: an event is one `data:` line, and Marathon's largest
/// (`deployment_info`, `api_post_event` with a whole app or group) stay far below it.
pub const MAX_EVENT_LINE: usize = 16 << 20;

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
        let mut errors = Vec::new();
        for (index, base) in self.urls() {
            let mut url = Self::endpoint(base, &["v2", "apps"]);
            url.query_pairs_mut().append_pair("embed", "apps.tasks");
            match self.fetch_one(url).await {
                Ok(apps) => {
                    self.preferred.store(index, Ordering::Relaxed);
                    return Ok(apps);
                }
                Err(err) => errors.push(err.to_string()),
            }
        }
        Err(MarathonError::AllFailed { errors })
    }

    async fn fetch_one(&self, url: Url) -> Result<api::AppsResponse, MarathonError> {
        let request = self
            .request(url.clone())
            .timeout(self.config.request_timeout);
        let (_, body) = fetch(request, &url, MAX_APPS_BODY).await?;
        api::decode_apps(&body).map_err(|message| HttpError::Decode { url, message }.into())
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
    content: Option<(Vec<ServiceDef>, Vec<Rejected>)>,
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

/// Turns a fetched app list into services; the apps that did not decode are rejected (of
/// any group: a group label may be what failed).
fn services(
    apps: &api::AppsResponse,
    settings: &RoutingSettings,
) -> (Vec<ServiceDef>, Vec<Rejected>) {
    let mut services = Vec::new();
    let mut rejected = apps.apps.rejected("app", |app| app.subject("app"));
    for app in &apps.apps.records {
        let (app_services, app_rejected) = app_services(app, settings);
        services.extend(app_services);
        rejected.extend(app_rejected);
    }
    (services, rejected)
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
    let (services, rejected) = services(&client.fetch_apps().await?, &settings);
    Ok(SourceReport {
        certificates: Default::default(),
        source: SourceId::Marathon,
        services,
        rejected,
        health: Health::Ok,
    })
}

/// Runs the Marathon source until `shutdown`.
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
    let client = Arc::new(Client::new(config)?);
    let publisher = Publisher {
        state: Arc::new(Mutex::new(State::default())),
        tx,
    };
    let nudged = publisher.clone();
    super::after_start_grace(shutdown.clone(), move || nudged.update(|_| {}));
    let refetch = Arc::new(Notify::new());
    let urls: Vec<String> = client.config.urls.iter().map(redact).collect();
    info!(urls = ?urls, group = ?settings.group, "watching marathon");

    let mut stream = tokio::spawn(follow_events(
        client.clone(),
        refetch.clone(),
        publisher.clone(),
        shutdown.clone(),
    ));
    let mut backoff = Backoff::default();
    let mut resync_timer = tokio::time::interval(resync);
    refetch.notify_one();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            // It returns only at shutdown; a panic is weft's to report, not to hide.
            ended = &mut stream => match ended {
                Err(failed) if failed.is_panic() => std::panic::resume_unwind(failed.into_panic()),
                _ => break,
            },
            () = refetch.notified() => {}
            _ = resync_timer.tick() => debug!("marathon periodic resync"),
        }
        // A hung leader costs the request timeout per URL: shutdown does not wait for it.
        let fetched = tokio::select! {
            _ = shutdown.cancelled() => break,
            fetched = client.fetch_apps() => fetched,
        };
        match fetched {
            Ok(apps) => {
                backoff.reset();
                let content = services(&apps, &settings);
                debug!(
                    apps = apps.apps.records.len(),
                    dropped = apps.apps.dropped.len() + apps.apps.more_dropped,
                    services = content.0.len(),
                    "marathon apps fetched"
                );
                publisher.update(|state| {
                    state.content = Some(content);
                    state.fetch_error = None;
                });
            }
            Err(err) => {
                let delay = backoff.next_delay();
                warn!(error = %Escaped(&err), retry_in = ?delay, "marathon fetch failing, keeping the last good services");
                publisher.update(|state| state.fetch_error = Some(err.to_string()));
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(delay) => refetch.notify_one(),
                }
            }
        }
    }
    stream.abort();
    Ok(())
}

/// How long a stream must have lasted for the reconnect backoff to start over
/// (reference/marathon.md).
const HEALTHY_STREAM: Duration = Duration::from_secs(600);

/// Follows `/v2/events`: every relevant event, and every (re)attach, asks for a refetch.
async fn follow_events(
    client: Arc<Client>,
    refetch: Arc<Notify>,
    publisher: Publisher,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::default();
    loop {
        let started = tokio::time::Instant::now();
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            result = read_stream(&client, &refetch, &publisher) => result,
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
                "a line longer than {} MiB: not an event stream weft reads",
                MAX_EVENT_LINE >> 20
            ),
        }
    }
}

impl std::error::Error for ReadError {}

/// When the stream's current line must end: `read_timeout` after the last one ended, and
/// before it is `MAX_EVENT_LINE` long.
struct LineWatch {
    read_timeout: Duration,
    last_line: tokio::time::Instant,
    open: usize,
}

impl LineWatch {
    fn new(read_timeout: Duration) -> LineWatch {
        LineWatch {
            read_timeout,
            last_line: tokio::time::Instant::now(),
            open: 0,
        }
    }

    fn deadline(&self) -> tokio::time::Instant {
        self.last_line + self.read_timeout
    }

    fn saw(&mut self, chunk: &[u8]) -> Result<(), ReadError> {
        match chunk.iter().rposition(|b| *b == b'\n' || *b == b'\r') {
            Some(end) => {
                self.last_line = tokio::time::Instant::now();
                self.open = chunk.len() - end - 1;
            }
            None => self.open += chunk.len(),
        }
        if self.open > MAX_EVENT_LINE {
            return Err(ReadError::TooLong);
        }
        Ok(())
    }
}

/// Reads one stream until it ends, fails or stays silent for the read timeout.
///
/// The timeout applies to lines, not events: Marathon's Jetty sends a bare line as a
/// keep-alive every 10 s, which keeps a quiet but healthy stream alive, while a stream that
/// hangs (a proxy, a stuck leader) sends nothing at all, and one that sends bytes without a
/// newline never completes an event (both are reconnected; a line longer than
/// `MAX_EVENT_LINE` is too).
async fn read_stream(
    client: &Client,
    refetch: &Notify,
    publisher: &Publisher,
) -> Result<(), MarathonError> {
    let (url, response) = client.open_stream().await?;
    let read_timeout = client.config.read_timeout;
    info!(url = %redact(&url), "marathon event stream connected");
    publisher.update(|state| state.stream_error = None);
    // Whatever happened while no stream was attached: catch up.
    refetch.notify_one();
    // A line must end within `read_timeout` of the last one, and within MAX_EVENT_LINE bytes:
    // a stream that trickles bytes without a newline is as dead as a silent one.
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
    let mut events = Box::pin(bytes.eventsource());
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
        if event.event == ATTACHED {
            debug!(url = %redact(&url), "marathon event stream attached");
        } else if client.config.event_types.contains(&event.event) {
            debug!(event = %Escaped(&event.event), "marathon event");
            refetch.notify_one();
        }
    }
    Err(MarathonError::Stream {
        url,
        message: "closed by Marathon".into(),
    })
}
