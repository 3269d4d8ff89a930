//! The ACME source, `[tls.acme]`: certificates ordered from an ACME CA (RFC 8555, through
//! instant-acme) for the routed hosts `tls.acme.hosts` names, shared by every edge.
//!
//! ```text
//! routed hosts (the build) ─┐
//!                           ├─> a host without a certificate valid past renew_before, not
//! the store (watched) ──────┘   backing off, not ordered here: an order task (max_orders)
//!                                 lock locks/<host> ── held by another edge: try again later
//!                                 the account (created once, in the store)
//!                                 the order (resumed from orders/<host>, else placed)
//!                                 challenges/<host>/<token> = key authorization ── every edge's
//!                                   watch puts it in HAProxy's challenge map, at runtime, and
//!                                   once its HAProxy answers it, acks/<host>/<token>/<session>
//!                                 waits (10 s at most) for the acks of every edge alive
//!                                 ready, finalized, the chain + key -> certs/<host>
//!                                 a failure -> failures/<host>: its reason, the next try
//! the store ──> SourceReport { certificates: certs/* of routed hosts, their challenges/*,
//!                              rejected: each host's failure, each entry that does not decode }
//! ```
//!
//! Each edge reads the same store, so all serve the same certificates and answer the same
//! challenges; only the holder of a host's lock talks to the CA for it. An edge that dies
//! holding a lock loses it when its session ends (`lock_ttl`); the next edge resumes the order.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use instant_acme::{
    Account, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus,
    RetryPolicy,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::AcmeConfig;
use crate::model::certs::{check_challenge, validate, Certificates};
use crate::model::{Built, Health, Rejected, SourceId, SourceReport};

mod http;
pub mod store;
use store::{Read, State, Store, StoreWatch};

/// The name of a host's ACME certificate in the table: `.acme.<host>`. No file of `tls.certs`
/// has such a name (hidden files are not read), so the two never collide.
pub const CERT_PREFIX: &str = ".acme.";
/// How often the hosts are looked at again even when nothing changed (renewals come due).
const TICK: Duration = Duration::from_secs(5);
/// How long to wait before trying a host whose lock another edge holds.
const LOCKED_ELSEWHERE: Duration = Duration::from_secs(10);
/// How long the ordering edge waits for its own HAProxy to answer a challenge.
const SELF_CHECK: Duration = Duration::from_secs(10);
/// After its own HAProxy answers, how long the ordering edge waits at most for the other edges
/// to say theirs do.
const ACK_WAIT: Duration = Duration::from_secs(10);
/// Challenges this edge checks on its own HAProxy at once, to acknowledge them.
const MAX_ACKING: usize = 8;
/// How often an edge writes again the hosts it certifies (`wanted/<session>`).
const REPUBLISH: Duration = Duration::from_secs(60);
/// How long after a write of the list a read that does not show it held means it was lost
/// (not that the read is older than the write).
const PUBLISH_SETTLE: Duration = Duration::from_secs(5);
/// After a failed write of the list, how long before the next.
const PUBLISH_BACKOFF: Duration = Duration::from_secs(30);

/// This edge's list `wanted/<session>` as last written.
struct Published {
    hosts: BTreeSet<String>,
    at: tokio::time::Instant,
    /// The session holding it (`None` for the local store, or while being written).
    session: Option<String>,
}

/// The longest backoff after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(24 * 3600);
/// The least backoff after the CA says a rate limit is reached (Let's Encrypt's limits count
/// over hours).
const RATE_LIMITED_BACKOFF: Duration = Duration::from_secs(3600);
/// How long one order may take in all, under its lock.
const ORDER_TIMEOUT: Duration = Duration::from_secs(300);
/// The most entries of the store one pass of the collection deletes.
const COLLECT_BATCH: usize = 64;
/// How many of the hosts beyond `max_hosts` the report names.
const OVER_NAMED: usize = 5;
/// How long the CA may take to validate or to issue, per step.
const POLL: RetryPolicy = RetryPolicy::new()
    .initial_delay(Duration::from_millis(250))
    .backoff(1.5)
    .timeout(Duration::from_secs(60));

/// `failures/<host>`: why the last order failed and when the next may start.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Failure {
    pub reason: String,
    pub attempts: u32,
    /// Unix seconds.
    pub until: i64,
}

/// Counters for the metrics.
pub struct Counters {
    pub issued: std::sync::atomic::AtomicU64,
    pub failed: std::sync::atomic::AtomicU64,
    pub orders: std::sync::atomic::AtomicU64,
    /// Orders this edge gave up because its lock was gone (its session expired).
    pub lost: std::sync::atomic::AtomicU64,
}

pub static COUNTERS: Counters = Counters {
    issued: std::sync::atomic::AtomicU64::new(0),
    failed: std::sync::atomic::AtomicU64::new(0),
    orders: std::sync::atomic::AtomicU64::new(0),
    lost: std::sync::atomic::AtomicU64::new(0),
};

fn count(counter: &std::sync::atomic::AtomicU64) {
    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// What the order tasks share.
struct Context {
    config: AcmeConfig,
    store: Store,
    /// The CA's latest `Retry-After` on an error answer.
    retry_after: http::RetryAfter,
    /// The account, once loaded or created; dropped when the CA no longer knows it.
    /// With the stored credentials it was made from: another edge may replace them.
    account: tokio::sync::Mutex<Option<(String, Account)>>,
    /// Where this edge's own HAProxy answers plain HTTP, for the self-check.
    http: SocketAddr,
    edge: String,
}

/// How an order task ended.
enum Ended {
    Issued,
    /// Under the lock, the store said there is nothing to do (any more).
    NotNeeded,
    /// Another edge holds the host's lock.
    LockedElsewhere,
    /// This edge lost the host's lock half-way (its session expired): nothing more of the
    /// order was written, the edge that holds the lock now finishes it.
    LockLost,
    /// Failed, with the least backoff the CA asked for; recorded in the store.
    Failed(String, Option<Duration>),
    /// Failed, and the store could not record it: this edge waits this long alone.
    FailedUnrecorded(Duration),
}

/// Runs the ACME source until `stop`: reads the store, publishes what it holds, and orders
/// what the routed hosts need.
pub async fn run(
    config: AcmeConfig,
    (store, mut watch): (Store, StoreWatch),
    http: SocketAddr,
    edge: String,
    mut built: watch::Receiver<Option<Arc<Built>>>,
    report: watch::Sender<SourceReport>,
    stop: CancellationToken,
) {
    let context = Arc::new(Context {
        config,
        store: store.clone(),
        account: tokio::sync::Mutex::new(None),
        retry_after: http::RetryAfter::default(),
        http,
        edge,
    });
    debug!("ACME source started");
    // The session outlives the tasks that use it: it is destroyed once they are done.
    let session_stop = CancellationToken::new();
    let session = tokio::spawn(store.keep_session(session_stop.clone()));
    // The store is watched by a task of its own: a blocking query dropped half-way would hold
    // its connection (of two) until Consul answered it.
    let (reads_tx, mut reads) = tokio::sync::mpsc::channel::<Result<Read, String>>(4);
    let watcher = {
        let stop = stop.clone();
        tokio::spawn(async move {
            loop {
                let failures = reads_tx.clone();
                let failed = move |reason: String| {
                    let _ = failures.try_send(Err(reason));
                };
                let Some(read) = watch.next(&stop, failed).await else {
                    return;
                };
                if reads_tx.send(Ok(read)).await.is_err() {
                    return;
                }
            }
        })
    };
    let mut read: Option<Read> = None;
    let mut hosts: BTreeSet<String> = BTreeSet::new();
    // The hosts of `hosts` only a service's tag or label asked for.
    let mut opted: BTreeSet<String> = BTreeSet::new();
    let mut in_flight: BTreeSet<String> = BTreeSet::new();
    let mut not_before: BTreeMap<String, tokio::time::Instant> = BTreeMap::new();
    let mut orders: JoinSet<(String, Ended)> = JoinSet::new();
    let mut tasks: BTreeMap<tokio::task::Id, String> = BTreeMap::new();
    let mut degraded: Option<String> = None;
    // Nothing is collected before the first build said which hosts are routed.
    let mut routed_known = false;
    let mut seen = Seen::default();
    let mut collecting: Option<tokio::task::JoinHandle<()>> = None;
    // What `wanted/<session>` says and when it was written, and the write of it under way.
    let mut published: Option<Published> = None;
    let mut publishing: Option<tokio::task::JoinHandle<Result<Option<String>, String>>> = None;
    // Why the last write of the list failed, and when it may be tried again.
    let mut publish_failed: Option<(String, tokio::time::Instant)> = None;
    // The challenges this edge acknowledged or is checking, by key and version; a check that
    // failed gives its key back (tried again at the next pass).
    let mut acked: BTreeMap<String, u64> = BTreeMap::new();
    let mut acking: JoinSet<Option<String>> = JoinSet::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            next = reads.recv() => match next {
                None => break,
                Some(Ok(next)) => {
                    debug!(entries = next.state.len(), "ACME state read");
                    read = Some(next);
                    degraded = None;
                }
                Some(Err(reason)) => {
                    warn!(%reason, "cannot read the ACME state; the last one read stays");
                    degraded = Some(format!("ACME store: {reason}"));
                    report.send_if_modified(|r| r.degrade(format!("ACME store: {reason}")));
                    continue;
                }
            },
            changed = built.changed() => {
                if changed.is_err() {
                    break;
                }
                let now = built.borrow_and_update().clone();
                if let Some(built) = now {
                    routed_known = true;
                    let (wanted, asked) = wanted_hosts(&context.config, &built, unix_now());
                    if wanted != hosts || asked != opted {
                        debug!(hosts = wanted.len(), opted_in = asked.len(), "routed hosts for ACME certificates changed");
                        hosts = wanted;
                        opted = asked;
                    }
                }
            }
            Some(done) = acking.join_next() => {
                if let Ok(Some(failed)) = done {
                    acked.remove(&failed);
                }
            }
            Some(done) = orders.join_next_with_id() => {
                let (id, host, ended) = match done {
                    Ok((id, (host, ended))) => (id, host, ended),
                    Err(err) => {
                        let Some(host) = tasks.remove(&err.id()) else { continue };
                        warn!(%host, error = %err, "an ACME order task ended abnormally");
                        (err.id(), host, Ended::FailedUnrecorded(context.config.retry_after))
                    }
                };
                tasks.remove(&id);
                in_flight.remove(&host);
                finished(&host, ended, &mut not_before);
            }
            _ = tick.tick() => {}
        }
        let Some(read) = &read else { continue };
        let state = &read.state;
        let (served, over) = capped(&context.config, state, &hosts, &opted);
        // A challenge written again (an order resumed by another edge) is checked again.
        let version = |key: &String| read.versions.get(key).copied().unwrap_or(0);
        acked.retain(|key, at| state.contains_key(key) && *at == version(key));
        for (key, value) in
            state.range::<String, _>("challenges/".to_string().."challenges0".to_string())
        {
            if acking.len() >= MAX_ACKING {
                break;
            }
            let Some((host, token)) = key["challenges/".len()..].split_once('/') else {
                continue;
            };
            if acked.contains_key(key)
                || !served.contains(host)
                || check_challenge(token, value).is_err()
            {
                continue;
            }
            acked.insert(key.clone(), version(key));
            let (store, http) = (context.store.clone(), context.http);
            let (host, token, value) = (host.to_string(), token.to_string(), value.clone());
            let key = key.clone();
            acking.spawn(async move {
                if !self_check(http, &host, &token, &value).await {
                    warn!(%host, %token, "this edge's HAProxy did not answer the ACME challenge within 10 s");
                    return Some(key);
                }
                match store.ack(&host, &token).await {
                    Ok(()) => {
                        debug!(%host, %token, "this edge's HAProxy answers the ACME challenge; acknowledged");
                        None
                    }
                    Err(err) => {
                        warn!(%host, error = %err, "cannot acknowledge the ACME challenge");
                        Some(key)
                    }
                }
            });
        }
        // The hosts this edge certifies, for the other edges' collection and acknowledgements:
        // written again when they change, every minute, and as soon as the read shows the list
        // no longer held (the session was lost and made again).
        if let Some(task) = publishing.take_if(|task| task.is_finished()) {
            match task.await {
                Ok(Ok(session)) => {
                    publish_failed = None;
                    if let Some(published) = &mut published {
                        published.session = session;
                    }
                }
                Ok(Err(reason)) => {
                    warn!(%reason, "cannot tell the other edges which hosts this one certifies; trying again in 30 s");
                    publish_failed = Some((reason, tokio::time::Instant::now() + PUBLISH_BACKOFF));
                    published = None;
                }
                Err(_) => published = None,
            }
        }
        let lost = |p: &Published| {
            p.session.as_ref().is_some_and(|session| {
                !read.versions.is_empty()
                    && p.at.elapsed() > PUBLISH_SETTLE
                    && !read.held.contains(&format!("wanted/{session}"))
            })
        };
        let stale = !published
            .as_ref()
            .is_some_and(|p| p.hosts == *served && p.at.elapsed() < REPUBLISH && !lost(p));
        let backing_off = publish_failed
            .as_ref()
            .is_some_and(|(_, until)| tokio::time::Instant::now() < *until);
        if routed_known && publishing.is_none() && stale && !backing_off {
            let (store, hosts) = (context.store.clone(), served.clone().into_owned());
            published = Some(Published {
                hosts: hosts.clone(),
                at: tokio::time::Instant::now(),
                session: None,
            });
            publishing = Some(tokio::spawn(async move {
                store
                    .publish_wanted(&hosts)
                    .await
                    .map_err(|err| err.to_string())
            }));
        }
        report.send_if_modified(|r| {
            let mut next = report_of(state, &served, unix_now());
            if !over.is_empty() {
                next.rejected.push(over_rejected(&context.config, &over));
            }
            if let Some((reason, _)) = &publish_failed {
                next.rejected.push(Rejected {
                    subject: "ACME list of this edge's hosts (wanted/<session>)".into(),
                    reason: format!("cannot be written: {reason}; the other edges may collect these hosts' certificates and do not wait for this edge's acknowledgements"),
                });
            }
            if let Some(reason) = &degraded {
                next.health = r.health.clone();
                next.degrade(reason.clone());
            }
            if *r == next {
                return false;
            }
            *r = next;
            true
        });
        let now = tokio::time::Instant::now();
        let garbage = seen.garbage(&context.config, read, &hosts, now, unix_now());
        // Never from a state that may be stale (the watch failing), nor before the first build.
        if routed_known
            && degraded.is_none()
            && !garbage.is_empty()
            && !matches!(&collecting, Some(task) if !task.is_finished())
        {
            let store = context.store.clone();
            collecting = Some(tokio::spawn(async move {
                let (deleted, error) = store.collect(&garbage).await;
                if deleted > 0 {
                    info!(
                        entries = deleted,
                        "ACME: collected the store's entries no routed host uses"
                    );
                }
                if let Some(err) = error {
                    warn!(error = %err, "ACME: cannot collect some of the store's unused entries; trying again later");
                }
            }));
        }
        not_before.retain(|_, at| *at > now);
        for host in needing(&context.config, state, &served, unix_now()) {
            if in_flight.len() >= context.config.max_orders {
                break;
            }
            if in_flight.contains(&host) || not_before.contains_key(&host) {
                continue;
            }
            debug!(%host, "ACME: a certificate is due");
            in_flight.insert(host.clone());
            let (context, snapshot, name) = (context.clone(), state.clone(), host.clone());
            let handle = orders.spawn(async move {
                let ended = order(&context, &host, &snapshot).await;
                (host, ended)
            });
            tasks.insert(handle.id(), name);
        }
    }
    orders.shutdown().await;
    acking.shutdown().await;
    for task in [
        collecting.map(|t| t.abort_handle()),
        publishing.map(|t| t.abort_handle()),
    ]
    .into_iter()
    .flatten()
    {
        task.abort();
    }
    watcher.abort();
    session_stop.cancel();
    let _ = session.await;
}

/// The routed hosts that need an ACME certificate: named by `tls.acme.hosts`, or (with
/// `tls.acme.opt_in`) routed to a service that asks for one; not wildcards (HTTP-01 cannot
/// prove them), and not served by a certificate of `tls.certs` valid past the renewal window.
/// With the hosts only a service asked for (they come after the operator's at the cap).
fn wanted_hosts(
    config: &AcmeConfig,
    built: &Built,
    now: i64,
) -> (BTreeSet<String>, BTreeSet<String>) {
    let renew = config.renew_before.as_secs() as i64;
    let operators: Certificates = built
        .table
        .certificates
        .iter()
        .filter(|(name, cert)| !name.starts_with(CERT_PREFIX) && cert.not_after - renew > now)
        .map(|(name, cert)| (name.clone(), cert.clone()))
        .collect();
    let table = &built.table;
    let mut wanted = BTreeSet::new();
    let mut opted = BTreeSet::new();
    for (key, service) in &table.routes {
        let host = key.host.as_str();
        let named = config.wants(host);
        // The holder's word (its route at `/`), not a guest's adding a path under the host.
        let asked = config.opt_in
            && key.path.is_root()
            && table.backends.get(service).is_some_and(|b| b.acme);
        if !(named || asked) || host.starts_with('*') || wanted.contains(host) {
            continue;
        }
        // A name too long for a certificate's name in HAProxy's crt-list is not ordered (its
        // certificate could not be installed): such hosts keep the default certificate.
        if crate::model::certs::covers(&operators, host)
            || crate::model::certs::check_name(&cert_name(host)).is_err()
        {
            continue;
        }
        if !named {
            opted.insert(host.to_string());
        }
        wanted.insert(host.to_string());
    }
    (wanted, opted)
}

/// The hosts that get certificates: all of `hosts`, or when they are more than `max_hosts`: the
/// operator's (not only `opted` in by a service) holding a certificate (they keep it), the
/// operator's others, then the opted-in holding one, then the rest, each by name. The others.
fn capped<'a>(
    config: &AcmeConfig,
    state: &State,
    hosts: &'a BTreeSet<String>,
    opted: &BTreeSet<String>,
) -> (std::borrow::Cow<'a, BTreeSet<String>>, Vec<&'a String>) {
    if hosts.len() <= config.max_hosts {
        return (std::borrow::Cow::Borrowed(hosts), Vec::new());
    }
    // Stable (by name within each rank); each host's rank worked out once.
    let mut ranked: Vec<&String> = hosts.iter().collect();
    ranked.sort_by_cached_key(|host| {
        (
            opted.contains(*host),
            !state.contains_key(&format!("certs/{host}")),
        )
    });
    let mut ranked = ranked.into_iter();
    let served = ranked.by_ref().take(config.max_hosts).cloned().collect();
    (std::borrow::Cow::Owned(served), ranked.collect())
}

/// What the report says of the hosts beyond `max_hosts`.
fn over_rejected(config: &AcmeConfig, over: &[&String]) -> Rejected {
    let named: Vec<&str> = over.iter().take(OVER_NAMED).map(|h| h.as_str()).collect();
    let more = match over.len().saturating_sub(OVER_NAMED) {
        0 => String::new(),
        n => format!(" and {n} more"),
    };
    Rejected {
        subject: "ACME hosts".into(),
        reason: format!(
            "{} routed hosts want a certificate and tls.acme.max_hosts is {}: none is ordered for {}{more}",
            config.max_hosts + over.len(),
            config.max_hosts,
            named.join(", "),
        ),
    }
}

/// What this edge has seen of the store over time, to tell the entries nobody uses: those of
/// hosts neither it nor any other edge alive has certified for `collect_after`, certificates
/// and failures long past, challenges left behind by an edge that died (unchanged for longer
/// than any order lasts), acknowledgements of challenges gone, and the lists of edges gone.
#[derive(Default)]
struct Seen {
    /// Hosts with entries in the store that no edge alive certifies, since when.
    unwanted: BTreeMap<String, tokio::time::Instant>,
    /// Each challenge's version (its value, in the local store), and since when it is
    /// unchanged.
    challenges: BTreeMap<String, (String, tokio::time::Instant)>,
}

/// Whether Consul can be asked for `key` by name: no segment empty or a dot.
fn nameable(key: &str) -> bool {
    key.split('/')
        .all(|segment| !matches!(segment, "" | "." | ".."))
}

/// The host a key of the store is about (`certs/<host>`, `challenges/<host>/<token>`, ...);
/// `None` for the account, the edges' lists, and any key with an empty or dot segment (Consul
/// could not be asked to delete it by name).
fn host_of(key: &str) -> Option<(&str, &str)> {
    if !nameable(key) {
        return None;
    }
    let (kind, rest) = key.split_once('/')?;
    match kind {
        "certs" | "orders" | "failures" | "locks" => Some((kind, rest)),
        "challenges" | "acks" => Some((kind, rest.split_once('/')?.0)),
        _ => None,
    }
}

impl Seen {
    /// Looks at `read` with the hosts this edge certifies (`wanted`): the garbage in it, each
    /// key with the version to delete it at (0: any; the local store), at most
    /// [`COLLECT_BATCH`].
    fn garbage(
        &mut self,
        config: &AcmeConfig,
        read: &Read,
        wanted: &BTreeSet<String>,
        now: tokio::time::Instant,
        unix: i64,
    ) -> Vec<(String, u64)> {
        let state = &read.state;
        // Consul's version of the entry; in the local store, its value's hash.
        let version = |key: &String| match read.versions.get(key) {
            Some(version) => *version,
            None if read.versions.is_empty() => {
                state.get(key).map_or(0, |v| store::local_version(v))
            }
            None => 0,
        };
        // The hosts the other edges alive certify: their lists, held by their sessions.
        let lists = state
            .range::<String, _>("wanted/".to_string().."wanted0".to_string())
            .filter(|(key, _)| read.held.contains(*key));
        let others: BTreeSet<&str> = lists.flat_map(|(_, hosts)| hosts.lines()).collect();
        let stored: BTreeSet<&str> = state
            .keys()
            .filter_map(|key| host_of(key))
            .map(|(_, host)| host)
            .filter(|host| !wanted.contains(*host) && !others.contains(host))
            .collect();
        self.unwanted
            .retain(|host, _| stored.contains(host.as_str()));
        for host in stored {
            self.unwanted.entry(host.to_string()).or_insert(now);
        }
        self.challenges.retain(|key, _| state.contains_key(key));
        let challenge_stale = ORDER_TIMEOUT * 2 + config.lock_ttl + store::LOCK_DELAY;
        let collect_after = config.collect_after.as_secs() as i64;
        let mut garbage = Vec::new();
        for (key, value) in state {
            if garbage.len() >= COLLECT_BATCH {
                break;
            }
            // The list of an edge whose session is gone.
            if key.starts_with("wanted/") && !read.versions.is_empty() {
                if nameable(key) && !read.held.contains(key) {
                    garbage.push((key.clone(), version(key)));
                }
                continue;
            }
            let Some((kind, host)) = host_of(key) else {
                continue;
            };
            let gone = self
                .unwanted
                .get(host)
                .is_some_and(|since| now.duration_since(*since) >= config.collect_after);
            let collect = match kind {
                // A lock an edge holds stays, whoever wants the host.
                "locks" => gone && !read.held.contains(key),
                // Past for longer than collect_after: an edge whose clock runs ahead does not
                // take a certificate that is still served for expired.
                "certs" => {
                    gone || not_after(value)
                        .is_some_and(|at| at.saturating_add(collect_after) < unix)
                }
                "failures" => {
                    gone || serde_json::from_str::<Failure>(value)
                        .is_ok_and(|f| f.until.saturating_add(collect_after) < unix)
                }
                // An acknowledgement outlives its challenge when the order's cleanup failed.
                "acks" => {
                    gone || key.rsplit_once('/').is_some_and(|(challenge, _)| {
                        !state.contains_key(&format!("challenges/{}", &challenge["acks/".len()..]))
                    })
                }
                "challenges" => {
                    // Written again (an order resumed) is unchanged no more, even with the
                    // same key authorization.
                    let mark = match read.versions.get(key) {
                        Some(version) => version.to_string(),
                        None => value.clone(),
                    };
                    let (seen, since) = self
                        .challenges
                        .entry(key.clone())
                        .or_insert_with(|| (mark.clone(), now));
                    if *seen != mark {
                        *seen = mark;
                        *since = now;
                    }
                    gone || now.duration_since(*since) >= challenge_stale
                }
                _ => gone,
            };
            if collect {
                garbage.push((key.clone(), version(key)));
            }
        }
        garbage
    }
}

/// The hosts of `hosts` whose stored certificate is missing, does not validate, or is inside
/// the renewal window, and that are not backing off after a failure.
/// Renewals come first, the most urgent first; hosts without a certificate after them.
fn needing(config: &AcmeConfig, state: &State, hosts: &BTreeSet<String>, now: i64) -> Vec<String> {
    let mut due: Vec<(i64, String)> = hosts
        .iter()
        .filter(|host| !failure(state, host).is_some_and(|f| f.until > now))
        .filter_map(|host| {
            let stored = state
                .get(&format!("certs/{host}"))
                .and_then(|pem| stored_cert(host, pem, now).ok().map(|cert| (pem, cert)));
            match stored {
                None => Some((i64::MAX, host.clone())),
                Some((pem, cert)) => {
                    let at = renewal_due(config, pem).unwrap_or(now);
                    (at <= now).then_some((cert.not_after, host.clone()))
                }
            }
        })
        .collect();
    due.sort();
    due.into_iter().map(|(_, host)| host).collect()
}

/// A stored certificate of `host`, validated as the directory's are, and for `host` alone: a
/// certificate stored under one host's key never serves another.
fn stored_cert(
    host: &str,
    pem: &str,
    now: i64,
) -> Result<crate::model::certs::Certificate, String> {
    let cert = validate(&cert_name(host), pem.as_bytes(), now)?;
    if cert.sans != [host] {
        return Err(format!(
            "its names {:?} are not exactly {host:?}",
            cert.sans
        ));
    }
    Ok(cert)
}

/// When a certificate's renewal is due: `renew_before` ahead of its expiry, but never in the
/// first quarter of its lifetime, so that a `renew_before` longer than the CA's lifetimes
/// renews four times a lifetime rather than in a loop.
fn renewal_due(config: &AcmeConfig, pem: &str) -> Option<i64> {
    let (from, to) = validity(pem)?;
    let renew = config.renew_before.as_secs() as i64;
    Some(to.saturating_sub(renew).max(from + (to - from) / 4))
}

/// When the first certificate of `pem` expires (Unix seconds).
fn not_after(pem: &str) -> Option<i64> {
    validity(pem).map(|(_, to)| to)
}

/// The validity of the first certificate of `pem`: not before, not after (Unix seconds).
fn validity(pem: &str) -> Option<(i64, i64)> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let block = pem::parse(pem.as_bytes()).ok()?;
    let (_, leaf) = X509Certificate::from_der(block.contents()).ok()?;
    Some((
        leaf.validity().not_before.timestamp(),
        leaf.validity().not_after.timestamp(),
    ))
}

fn cert_name(host: &str) -> String {
    format!("{CERT_PREFIX}{host}")
}

/// The failure recorded for `host`; its time is kept within a backoff of now, whatever the
/// store says (a time past the year 9999 would not even print).
fn failure(state: &State, host: &str) -> Option<Failure> {
    let mut failure: Failure =
        serde_json::from_str(state.get(&format!("failures/{host}"))?).ok()?;
    failure.until = failure.until.min(unix_now() + MAX_BACKOFF.as_secs() as i64);
    Some(failure)
}

/// What the store holds for the routed hosts, as a source report.
fn report_of(state: &State, hosts: &BTreeSet<String>, now: i64) -> SourceReport {
    let mut report = SourceReport {
        health: Health::Ok,
        ..SourceReport::starting(SourceId::Acme)
    };
    for host in hosts {
        if let Some(pem) = state.get(&format!("certs/{host}")) {
            match stored_cert(host, pem, now) {
                Ok(cert) => {
                    report.certificates.insert(cert.name.clone(), cert);
                }
                Err(reason) => report.rejected.push(Rejected {
                    subject: format!("ACME certificate of {host:?}"),
                    reason,
                }),
            }
        }
        if let Some(failure) = failure(state, host) {
            let next = if failure.until > now {
                let at = std::time::UNIX_EPOCH + Duration::from_secs(failure.until.max(0) as u64);
                format!(
                    "; next order after {}",
                    humantime::format_rfc3339_seconds(at)
                )
            } else {
                "; next order due".into()
            };
            report.rejected.push(Rejected {
                subject: format!("ACME order for {host:?}"),
                reason: format!(
                    "failed {} time(s): {}{next}",
                    failure.attempts, failure.reason
                ),
            });
        }
    }
    // Only the challenges of hosts this edge wants certified reach HAProxy's map: an entry of
    // another name (written by whoever else may write the folder) is not answered.
    for (key, value) in
        state.range::<String, _>("challenges/".to_string().."challenges0".to_string())
    {
        let Some((host, token)) = key["challenges/".len()..].split_once('/') else {
            continue;
        };
        if !hosts.contains(host) {
            continue;
        }
        match check_challenge(token, value) {
            Ok(()) => {
                report
                    .challenges
                    .insert(token.to_string(), value.to_string());
            }
            Err(reason) => report.rejected.push(Rejected {
                subject: format!("ACME challenge {:?}", crate::escape::Escaped(token)),
                reason,
            }),
        }
    }
    report
}

/// Records how an order ended, on this edge: a host whose failure could not be stored, or
/// whose lock another edge holds, waits here.
fn finished(host: &str, ended: Ended, not_before: &mut BTreeMap<String, tokio::time::Instant>) {
    let now = tokio::time::Instant::now();
    match ended {
        Ended::Issued => {
            count(&COUNTERS.issued);
            info!(%host, "ACME certificate issued and stored");
        }
        Ended::NotNeeded => {
            debug!(%host, "another edge got the certificate, or failed, meanwhile");
            not_before.insert(host.to_string(), now + TICK);
        }
        Ended::LockedElsewhere => {
            debug!(%host, "another edge orders this host's certificate");
            not_before.insert(host.to_string(), now + LOCKED_ELSEWHERE);
        }
        Ended::LockLost => {
            count(&COUNTERS.lost);
            warn!(%host, "this edge lost the host's ACME lock (its session expired) and stopped the order; the edge holding the lock finishes it");
            not_before.insert(host.to_string(), now + LOCKED_ELSEWHERE);
        }
        Ended::Failed(_, _) => {}
        Ended::FailedUnrecorded(backoff) => {
            not_before.insert(host.to_string(), now + backoff);
        }
    }
}

/// One host's order, under its lock. What decides whether to order is read again from the
/// store under the lock: the edge that held it before may have stored a certificate or a
/// failure since this edge's last read, and the order it placed.
async fn order(context: &Context, host: &str, state: &State) -> Ended {
    match context.store.lock(host).await {
        Ok(true) => {}
        Ok(false) => return Ended::LockedElsewhere,
        Err(err) => {
            // Not the host's failure, and not recorded without the lock: this edge waits alone.
            warn!(%host, error = %err, "cannot take the host's ACME lock");
            return Ended::FailedUnrecorded(LOCKED_ELSEWHERE);
        }
    }
    let ended =
        match tokio::time::timeout(ORDER_TIMEOUT, order_under_lock(context, host, state)).await {
            Ok(ended) => ended,
            // A CA (or something in front of it) that stops answering must not hold the lock and
            // a slot forever.
            Err(_) => {
                let before = context
                    .store
                    .get(&format!("failures/{host}"))
                    .await
                    .ok()
                    .flatten()
                    .and_then(|text| serde_json::from_str(&text).ok());
                let reason = format!("the order took longer than {ORDER_TIMEOUT:?}");
                record_failure(context, host, before, reason, None).await
            }
        };
    if let Err(err) = context.store.unlock(host).await {
        warn!(%host, error = %err, "cannot release the ACME lock; it goes with this edge's session");
    }
    ended
}

async fn order_under_lock(context: &Context, host: &str, state: &State) -> Ended {
    let mut fresh = state.clone();
    for key in [
        format!("failures/{host}"),
        format!("certs/{host}"),
        format!("orders/{host}"),
    ] {
        match context.store.get(&key).await {
            Ok(Some(value)) => {
                fresh.insert(key, value);
            }
            Ok(None) => {
                fresh.remove(&key);
            }
            Err(err) => {
                let reason = format!("cannot read the ACME state: {err}");
                return record_failure(context, host, failure(&fresh, host), reason, None).await;
            }
        }
    }
    let hosts = BTreeSet::from([host.to_string()]);
    if needing(&context.config, &fresh, &hosts, unix_now()).is_empty() {
        return Ended::NotNeeded;
    }
    match order_locked(context, host, &fresh).await {
        Ok(()) => Ended::Issued,
        Err(Ended::Failed(reason, at_least)) => {
            record_failure(context, host, failure(&fresh, host), reason, at_least).await
        }
        Err(other) => other,
    }
}

/// Stores a failure (while the lock is held: the next edge to take it sees it), with the
/// backoff of its attempt: `retry_after` doubled per earlier failure, at most 24 h, at least
/// `at_least`.
async fn record_failure(
    context: &Context,
    host: &str,
    before: Option<Failure>,
    reason: String,
    at_least: Option<Duration>,
) -> Ended {
    count(&COUNTERS.failed);
    // The CA's own word on when to come back comes first (a rate limit's `Retry-After`).
    let at_least = match (context.retry_after.take(), at_least) {
        (Some(asked), other) => Some(asked.max(other.unwrap_or_default())),
        (None, other) => other,
    };
    let attempts = before.map_or(1, |f| f.attempts.saturating_add(1));
    let backoff = context
        .config
        .retry_after
        .saturating_mul(1 << attempts.saturating_sub(1).min(16))
        .min(MAX_BACKOFF)
        .max(at_least.unwrap_or_default());
    warn!(%host, %reason, attempts, retry_in = ?backoff, "ACME order failed");
    let record = Failure {
        reason: reason.clone(),
        attempts,
        until: unix_now() + backoff.as_secs() as i64,
    };
    let text = serde_json::to_string(&record).unwrap_or_default();
    // The record in the store holds every edge back (and an operator who deletes it lets them
    // try at once); only when it cannot be written does this edge wait alone.
    match context
        .store
        .write_locked(host, &format!("failures/{host}"), Some(&text))
        .await
    {
        Ok(true) => Ended::Failed(reason, at_least),
        Ok(false) => Ended::LockLost,
        Err(err) => {
            warn!(%host, error = %err, "cannot record the ACME failure in the store; this edge waits anyway");
            Ended::FailedUnrecorded(backoff)
        }
    }
}

/// A CA's problem type, when the error is one.
fn problem_type(err: &instant_acme::Error) -> Option<&str> {
    match err {
        instant_acme::Error::Api(problem) => problem.r#type.as_deref(),
        _ => None,
    }
}

fn failed(what: &str, err: instant_acme::Error) -> Ended {
    let at_least = (problem_type(&err) == Some("urn:ietf:params:acme:error:rateLimited"))
        .then_some(RATE_LIMITED_BACKOFF);
    Ended::Failed(format!("{what}: {err}"), at_least)
}

/// The account: loaded from the store, else created and stored. With `forgotten` (the CA said
/// it does not know the stored one, as a test CA does after a restart) a new one replaces it.
///
/// The stored account is read again under the cell's lock: orders that start together on a
/// new store wait for the first to create the account, then use it.
async fn account(context: &Context, forgotten: bool) -> Result<Account, Ended> {
    let mut cell = context.account.lock().await;
    let stored = context
        .store
        .get("account")
        .await
        .map_err(|err| Ended::Failed(format!("cannot read the ACME account: {err}"), None))?;
    if let (Some((made_from, account)), false) = (cell.as_ref(), forgotten) {
        if stored.as_ref() == Some(made_from) {
            return Ok(account.clone());
        }
    }
    // An account stored for another directory (staging before production) is not used.
    let forgotten = forgotten
        || stored.as_ref().is_some_and(|stored| {
            serde_json::from_str::<serde_json::Value>(stored)
                .ok()
                .and_then(|v| {
                    v.get("directory")
                        .and_then(|d| d.as_str())
                        .map(str::to_string)
                })
                .is_some_and(|d| d != context.config.directory.as_str())
        });
    if let (Some(stored), false) = (&stored, forgotten) {
        let account = load_account(context, stored).await?;
        *cell = Some((stored.clone(), account.clone()));
        return Ok(account);
    }
    let contact = format!("mailto:{}", context.config.email);
    let (account, credentials) = Account::builder_with_http(Box::new(acme_client(context)?))
        .create(
            &NewAccount {
                contact: &[&contact],
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            context.config.directory.to_string(),
            None,
        )
        .await
        .map_err(|err| failed("cannot create the ACME account", err))?;
    let text = serde_json::to_string(&credentials).unwrap_or_default();
    match context.store.put("account", &text, !forgotten).await {
        Ok(true) => {
            info!(id = %account.id(), "ACME account created and stored");
            *cell = Some((text.clone(), account.clone()));
            Ok(account)
        }
        // Another edge stored its account first: that one is used (this one stays unused at
        // the CA, as accounts cost nothing there).
        Ok(false) => match context.store.get("account").await {
            Ok(Some(stored)) => {
                let account = load_account(context, &stored).await?;
                info!("another edge stored its ACME account first; using it");
                *cell = Some((stored, account.clone()));
                Ok(account)
            }
            _ => Err(Ended::Failed(
                "another edge stored its ACME account first; the next order uses it".into(),
                None,
            )),
        },
        Err(err) => Err(Ended::Failed(
            format!("cannot store the ACME account: {err}"),
            None,
        )),
    }
}

/// weft's HTTP client for instant-acme.
fn acme_client(context: &Context) -> Result<http::AcmeHttp, Ended> {
    http::AcmeHttp::new(
        context.config.ca_file.as_deref(),
        context.retry_after.clone(),
    )
    .map_err(|reason| Ended::Failed(format!("cannot make the ACME client: {reason}"), None))
}

/// The account of the stored credentials `stored`.
async fn load_account(context: &Context, stored: &str) -> Result<Account, Ended> {
    let credentials = serde_json::from_str(stored).map_err(|err| {
        Ended::Failed(
            format!("the stored ACME account does not decode: {err}"),
            None,
        )
    })?;
    Account::builder_with_http(Box::new(acme_client(context)?))
        .from_credentials(credentials)
        .await
        .map_err(|err| failed("cannot load the ACME account", err))
}

async fn order_locked(context: &Context, host: &str, state: &State) -> Result<(), Ended> {
    let mut account = account(context, false).await?;
    // Every write of the order is fenced by the host's lock: once this edge lost it, the order
    // stops and writes nothing more.
    let write = |key: String, value: String| async move {
        match context.store.write_locked(host, &key, Some(&value)).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(Ended::LockLost),
            Err(err) => Err(Ended::Failed(format!("ACME store: {err}"), None)),
        }
    };
    let identifiers = [Identifier::Dns(host.to_string())];
    // A stored order is only resumed on the directory's own origin: the account signs a request
    // to whatever URL the store holds.
    let directory = &context.config.directory;
    let stored = state
        .get(&format!("orders/{host}"))
        .filter(|url| reqwest::Url::parse(url).is_ok_and(|url| url.origin() == directory.origin()));
    let resumed = match stored {
        Some(url) => match account.order(url.clone()).await {
            Ok(mut order) => {
                // A `processing` or `valid` order was finalized with a key that died with the
                // edge that made it: a new order, as for an invalid one.
                if !matches!(
                    order.state().status,
                    OrderStatus::Pending | OrderStatus::Ready
                ) {
                    None
                } else {
                    info!(%host, url = %url, "resuming the ACME order another edge placed");
                    Some(order)
                }
            }
            Err(_) => None,
        },
        None => None,
    };
    let mut order = match resumed {
        Some(order) => order,
        None => {
            count(&COUNTERS.orders);
            let placed = match account.new_order(&NewOrder::new(&identifiers)).await {
                Err(err)
                    if problem_type(&err)
                        == Some("urn:ietf:params:acme:error:accountDoesNotExist") =>
                {
                    // The CA forgot the account (a test CA restarted): a new one, once.
                    warn!(%host, "the CA does not know the stored ACME account; creating a new one");
                    account = self::account(context, true).await?;
                    account.new_order(&NewOrder::new(&identifiers)).await
                }
                placed => placed,
            };
            let order = placed.map_err(|err| failed("the CA refused the order", err))?;
            write(format!("orders/{host}"), order.url().to_string()).await?;
            info!(%host, url = %order.url(), edge = %context.edge, "ACME order placed");
            order
        }
    };
    let mut tokens = Vec::new();
    let result = async {
        let mut authorizations = order.authorizations();
        while let Some(authorization) = authorizations.next().await {
            let mut authorization =
                authorization.map_err(|err| failed("cannot read the authorization", err))?;
            match authorization.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => {
                    return Err(Ended::Failed(
                        format!("the authorization is {other:?}"),
                        None,
                    ))
                }
            }
            let mut challenge = authorization
                .challenge(ChallengeType::Http01)
                .ok_or_else(|| Ended::Failed("the CA offers no HTTP-01 challenge".into(), None))?;
            let token = challenge.token.clone();
            let key = challenge.key_authorization().as_str().to_string();
            check_challenge(&token, &key)
                .map_err(|reason| Ended::Failed(format!("the CA's challenge: {reason}"), None))?;
            write(format!("challenges/{host}/{token}"), key.clone()).await?;
            tokens.push(token.clone());
            if !self_check(context.http, host, &token, &key).await {
                warn!(%host, %token, "this edge's HAProxy did not answer the ACME challenge within 10 s; telling the CA anyway");
            }
            wait_for_acks(context, host, &token).await;
            challenge
                .set_ready()
                .await
                .map_err(|err| failed("cannot tell the CA the challenge is ready", err))?;
        }
        let status = order
            .poll_ready(&POLL)
            .await
            .map_err(|err| failed("the CA did not validate", err))?;
        if status != OrderStatus::Ready {
            let why = order
                .state()
                .error
                .as_ref()
                .map_or_else(|| format!("{status:?}"), |p| p.to_string());
            return Err(Ended::Failed(format!("the order is {why}"), None));
        }
        let key = order
            .finalize()
            .await
            .map_err(|err| failed("cannot finalize the order", err))?;
        let chain = order
            .poll_certificate(&POLL)
            .await
            .map_err(|err| failed("the CA did not issue", err))?;
        let pem = format!("{}\n{}", chain.trim_end(), key.trim_end());
        let cert = validate(&cert_name(host), pem.as_bytes(), unix_now())
            .map_err(|reason| Ended::Failed(format!("the issued certificate: {reason}"), None))?;
        write(format!("certs/{host}"), cert.pem.clone()).await?;
        Ok(())
    }
    .await;
    // What is left behind when these fail (or the lock is gone) is collected later.
    let delete = |key: String| async move {
        matches!(context.store.write_locked(host, &key, None).await, Ok(true))
    };
    for token in tokens {
        // Only while the lock is this edge's: the next holder may resume the same challenge.
        if delete(format!("challenges/{host}/{token}")).await {
            let _ = context.store.delete_acks(host, &token).await;
        }
    }
    let done = result.is_ok() || order.state().status == OrderStatus::Invalid;
    if done {
        delete(format!("orders/{host}")).await;
    }
    if result.is_ok() {
        delete(format!("failures/{host}")).await;
    }
    result
}

/// Waits (up to [`ACK_WAIT`]) until every edge alive that certifies `host` (its list
/// `wanted/<session>` names it, held by its session) acknowledged that its HAProxy answers
/// `token`: the CA may validate against any of them. An edge that does not answer in time is
/// logged, not waited for: it may be down with its session not yet expired.
async fn wait_for_acks(context: &Context, host: &str, token: &str) {
    let deadline = tokio::time::Instant::now() + ACK_WAIT;
    let mut alive = BTreeSet::new();
    let mut listed_at: Option<tokio::time::Instant> = None;
    let mut missing = 0;
    while tokio::time::Instant::now() < deadline {
        // The lists again every second: an edge whose list names the host only now (it just
        // started, or just routed the host) is waited for too.
        if !listed_at.is_some_and(|at| at.elapsed() < Duration::from_secs(1)) {
            match context.store.edges_certifying(host).await {
                Ok(Some(now)) => alive = now,
                Ok(None) => return,
                Err(err) => warn!(%host, error = %err, "cannot read which edges certify the host"),
            }
            listed_at = Some(tokio::time::Instant::now());
        }
        match context.store.acks(host, token).await {
            Ok(acks) => {
                missing = alive.difference(&acks).count();
                if missing == 0 && !alive.is_empty() {
                    debug!(%host, edges = alive.len(), "every edge answers the ACME challenge");
                    return;
                }
            }
            Err(err) => warn!(%host, error = %err, "cannot read the ACME acknowledgements"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    warn!(%host, %token, missing, "not every edge acknowledged the ACME challenge within 10 s; telling the CA anyway");
}

/// Waits (up to [`SELF_CHECK`]) until this edge's HAProxy answers the challenge: the store's
/// watch, the build and the runtime map update have all run. Whether it did: not answering is
/// not fatal to an order, as HAProxy may take PROXY headers only, and the CA's own request is
/// what counts.
async fn self_check(http: SocketAddr, host: &str, token: &str, key: &str) -> bool {
    let addr = match http.ip() {
        ip if ip.is_unspecified() => SocketAddr::new([127, 0, 0, 1].into(), http.port()),
        _ => http,
    };
    let url = format!(
        "http://{addr}{}{token}",
        crate::model::certs::ACME_CHALLENGE
    );
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
    {
        Ok(client) => client,
        Err(_) => return false,
    };
    let deadline = tokio::time::Instant::now() + SELF_CHECK;
    while tokio::time::Instant::now() < deadline {
        let answer = client.get(&url).header("host", host).send().await;
        if let Ok(mut answer) = answer {
            // Until the map has the token the request is routed to the host's backend: read
            // no more than a key authorization can be.
            let mut body = Vec::new();
            while let Ok(Some(chunk)) = answer.chunk().await {
                body.extend_from_slice(&chunk);
                if body.len() > crate::model::certs::MAX_CHALLENGE_LEN * 2 + 1 {
                    break;
                }
            }
            if answer.status().is_success() && body == key.as_bytes() {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[cfg(test)]
mod tests;
