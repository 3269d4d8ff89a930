//! The controller: wires sources -> table -> render -> apply, and keeps HAProxy running.
//!
//! ```text
//! source tasks ──watch<SourceReport>──> build table ──watch<Built>──> apply loop ──> HAProxy
//!                                       (drops logged                (one at a time; bursts
//!                                        as they change)              coalesce in the watch)
//! bridge keeper (first pass before HAProxy; then netlink events + interval) ──watch──> status
//! listener watch (first check before HAProxy; then every 10 s) ──────────────watch──> status
//! ```

use std::collections::BTreeSet;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::bridge::{BridgeState, Keeper};
use crate::config::{AcmeStore, BridgeMode, ClaimsStore, Config, ACME_CONNECTIONS};
use crate::escape::Escaped;
use crate::haproxy::apply::Applier;
use crate::haproxy::listeners::{ForeignListeners, ListenerWatch};
use futures::FutureExt;

use crate::model::{
    build, Built, ClaimIntents, Dropped, Health, Ledger, ModelSettings, SourceReport,
};
use crate::sources::consul::kv::KvFolder;
use crate::sources::{self, acme, SourceError};
use crate::status::{self, ApplyStatus, StatusFeed};

mod apply_loop;
mod blame;
pub mod claims;
mod retry;
use apply_loop::apply_loop;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot listen on {addr} for the status page (status.listen): {source}")]
    StatusListen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("status server: {source}")]
    StatusServe {
        #[source]
        source: std::io::Error,
    },
    #[error("source {} failed: {source}", .source.source_id())]
    Source {
        #[from]
        source: SourceError,
    },
    #[error(transparent)]
    Claims(#[from] claims::ClaimsError),
    #[error(transparent)]
    RunDir(#[from] crate::haproxy::files::RunDirError),
    #[error("ACME state: {0}")]
    Acme(String),
    #[error("a task of weft's ended unexpectedly: {0}")]
    TaskEnded(String),
}

/// Runs weft until `shutdown` is cancelled. A managed HAProxy then keeps serving or stops, as
/// `haproxy.on_exit` says; it keeps serving regardless when `handover` was cancelled first (weft
/// is about to execute itself again and adopt it).
pub async fn run(
    config: Config,
    shutdown: CancellationToken,
    handover: CancellationToken,
) -> Result<(), RunError> {
    crate::haproxy::files::prepare_run_dir(&config.haproxy.run_dir)?;
    let _lock = crate::haproxy::files::lock_run_dir(&config.haproxy.run_dir)?;
    let status_listener = TcpListener::bind(config.status_listen)
        .await
        .map_err(|source| RunError::StatusListen {
            addr: config.status_listen,
            source,
        })?;
    info!(listen = %config.status_listen, "status page");

    let mut tasks = JoinSet::new();
    // The bridge first: HAProxy reaches every backend through it. A bridge weft cannot repair
    // is reported (ERROR, /healthz) but HAProxy starts anyway: routing is weft's main job.
    let (bridge_tx, bridge_rx) = watch::channel(BridgeState::new(&config.bridge));
    if config.bridge.mode != BridgeMode::Off {
        let mut keeper = Keeper::new(config.bridge.clone(), bridge_tx);
        keeper.check_now().await;
        let token = shutdown.clone();
        tasks.spawn(async move {
            keeper.run(token).await;
            Ok(())
        });
    }

    // Who else listens on HAProxy's port, checked once before HAProxy starts (each one an
    // ERROR) and then periodically. HAProxy starts anyway: refusing would take the edge down
    // because of a stranger; /healthz and weft_foreign_listeners say it loudly instead.
    let (listeners_tx, listeners_rx) = watch::channel(ForeignListeners::default());
    let mut listener_watch = ListenerWatch::new(config.haproxy.clone(), listeners_tx);
    listener_watch.check().await;
    tasks.spawn(listener_watch.run(shutdown.clone()).map(Ok));

    let mut reports = sources::spawn_all(&config, &mut tasks, &shutdown);

    // Gathered once: an address this host gains later is still caught by HAProxy's loop guard.
    let model = config.model_settings(crate::network::own_addresses());
    let (intents_tx, intents_rx) = watch::channel(ClaimIntents::default());
    let (ledger_tx, ledger_rx) = watch::channel(None::<Ledger>);
    let store = match (&config.routing.claims, &config.sources.consul) {
        (ClaimsStore::Consul { prefix }, Some(consul)) => claims::Store::Consul(
            claims::ConsulStore::new(KvFolder::claims(consul.clone(), prefix)),
        ),
        _ => claims::Store::Local(claims::LocalStore::open(&config.haproxy.run_dir)?),
    };
    tasks.spawn(
        claims::keep(
            store,
            config.routing.ownership.release_after,
            intents_rx,
            ledger_tx,
            shutdown.clone(),
        )
        .map(Ok),
    );
    let (desired_tx, desired_rx) = watch::channel(None::<Arc<Built>>);
    if let Some(acme) = config.acme() {
        let store = match (&acme.store, &config.sources.consul) {
            (AcmeStore::Consul { prefix }, Some(consul)) => acme::store::Store::consul(
                KvFolder::new(consul.clone(), prefix, "ACME state", ACME_CONNECTIONS),
                &config.haproxy.edge_id(),
                acme.lock_ttl,
            ),
            _ => acme::store::Store::local(&config.haproxy.run_dir.join("acme"))
                .map_err(|err| RunError::Acme(err.to_string()))?,
        };
        let (report_tx, report_rx) =
            watch::channel(SourceReport::starting(crate::model::SourceId::Acme));
        reports.push(report_rx);
        tasks.spawn(
            acme::run(
                acme.clone(),
                store,
                config.haproxy.bind,
                config.haproxy.edge_id(),
                desired_rx.clone(),
                report_tx,
                shutdown.clone(),
            )
            .map(Ok),
        );
    }
    let (apply_tx, apply_rx) = watch::channel(ApplyStatus::default());
    let feed = StatusFeed {
        reports: reports.clone(),
        built: desired_rx.clone(),
        apply: apply_rx,
        bridge: bridge_rx,
        ledger: ledger_rx.clone(),
        listeners: listeners_rx,
        stats: Arc::new(crate::haproxy::stats::StatsCache::new(
            config.haproxy.run_dir.join(crate::render::ADMIN_SOCKET),
        )),
        prometheus: config
            .haproxy
            .run_dir
            .join(crate::haproxy::stats::PROMETHEUS_SOCKET),
    };
    let token = shutdown.clone();
    tasks.spawn(async move {
        status::serve(status_listener, feed, token)
            .await
            .map_err(|source| RunError::StatusServe { source })
    });
    tasks.spawn(build_loop(
        reports,
        model,
        ClaimsLink {
            ledger: ledger_rx,
            intents: intents_tx,
        },
        desired_tx,
        shutdown.clone(),
    ));

    let applier = Applier::new(config.haproxy.clone());
    let apply = apply_loop(applier, desired_rx, apply_tx, shutdown.clone(), handover);
    tokio::pin!(apply);
    let failure = tokio::select! {
        () = &mut apply => None,
        err = first_failure(&mut tasks, &shutdown) => Some(err),
    };
    let result = match failure {
        None if shutdown.is_cancelled() => Ok(()),
        // Before shutdown the apply loop ends only when the table's channel closed, that is
        // when a task feeding it ended: that task says why.
        None => Err(first_failure(&mut tasks, &shutdown).await),
        Some(err) => {
            shutdown.cancel();
            // The apply loop stops a managed HAProxy gracefully on its way out.
            apply.await;
            Err(err)
        }
    };
    shutdown.cancel();
    while tasks.join_next().await.is_some() {}
    result
}

/// Resolves when a task fails, panics or ends: each runs until shutdown, and routing would
/// silently freeze without it.
async fn first_failure(
    tasks: &mut JoinSet<Result<(), RunError>>,
    shutdown: &CancellationToken,
) -> RunError {
    loop {
        match tasks.join_next().await {
            Some(Ok(Err(err))) => return err,
            // At shutdown every task returns; the apply loop still stops HAProxy.
            Some(Ok(Ok(()))) if shutdown.is_cancelled() => {}
            Some(Ok(Ok(()))) => return RunError::TaskEnded("it returned before shutdown".into()),
            Some(Err(join)) => return RunError::TaskEnded(join.to_string()),
            None => std::future::pending().await,
        }
    }
}

/// The build loop's side of the claims ledger.
struct ClaimsLink {
    ledger: watch::Receiver<Option<Ledger>>,
    intents: watch::Sender<ClaimIntents>,
}

/// Rebuilds the table whenever a source or the ledger publishes; publishes only a table that
/// differs, and hands the ledger what it should record.
async fn build_loop(
    mut reports: Vec<watch::Receiver<SourceReport>>,
    model: ModelSettings,
    mut claims: ClaimsLink,
    desired: watch::Sender<Option<Arc<Built>>>,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let mut reported: BTreeSet<Dropped> = BTreeSet::new();
    loop {
        // Until every source has read once, and the ledger too, a table would be missing
        // routes, or hand hosts to the wrong holder: wait. (The reports and the ledger are read
        // in place, not copied: the build is synchronous, and their next publish waits for it.
        // A copy of every report lived on here until the next change.)
        let built = {
            let current: Vec<watch::Ref<'_, SourceReport>> =
                reports.iter_mut().map(|r| r.borrow_and_update()).collect();
            let ledger = claims.ledger.borrow_and_update();
            match (
                current.iter().all(|r| r.health != Health::Starting),
                &*ledger,
            ) {
                (true, Some(ledger)) => {
                    let refs: Vec<&SourceReport> = current.iter().map(|r| &**r).collect();
                    Some(build(&refs, &model, ledger))
                }
                _ => None,
            }
        };
        if let Some(built) = built {
            log_drops(&mut reported, &built.dropped);
            claims.intents.send_if_modified(|old| {
                if *old == built.intents {
                    return false;
                }
                *old = built.intents.clone();
                true
            });
            desired.send_if_modified(|old| {
                if old.as_deref() == Some(&built) {
                    return false;
                }
                *old = Some(Arc::new(built));
                true
            });
        }
        let changes = reports.iter_mut().map(|r| Box::pin(r.changed()));
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            changed = claims.ledger.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
            }
            (result, _, _) = futures_select_all(changes) => {
                if result.is_err() {
                    return Ok(());
                }
            }
        }
    }
}

async fn futures_select_all<F: std::future::Future + Unpin>(
    futures: impl IntoIterator<Item = F>,
) -> (F::Output, usize, Vec<F>) {
    let futures: Vec<F> = futures.into_iter().collect();
    if futures.is_empty() {
        return std::future::pending().await;
    }
    futures::future::select_all(futures).await
}

/// Logs each drop once, when it appears, and says when it is gone.
fn log_drops(reported: &mut BTreeSet<Dropped>, now: &[Dropped]) {
    let now: BTreeSet<Dropped> = now.iter().cloned().collect();
    for dropped in now.difference(reported) {
        warn!(source = %dropped.source, subject = %Escaped(&dropped.subject), reason = %Escaped(&dropped.reason), "input dropped");
    }
    for gone in reported.difference(&now) {
        info!(source = %gone.source, subject = %Escaped(&gone.subject), "no longer dropped");
    }
    *reported = now;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A source that cannot start ends its task early: weft stops, and says why.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_source_that_cannot_start_stops_weft_with_its_error() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "[sources.file]\npath = \"missing/services.toml\"\n\
             [bridge]\nmode = \"off\"\n\
             [haproxy]\nrun_dir = \"{}\"\n\
             [status]\nlisten = \"127.0.0.1:0\"\n",
            dir.path().display()
        );
        let config = Config::parse(&text, dir.path()).unwrap();
        // The apply loop also ends when the source's end closes the table's channel: whichever
        // of the two weft sees first, the error is the source's. Once was not enough to see it.
        for _ in 0..20 {
            let result = run(
                config.clone(),
                CancellationToken::new(),
                CancellationToken::new(),
            )
            .await;
            assert!(
                matches!(
                    result,
                    Err(RunError::Source {
                        source: SourceError::WatchFile { .. }
                    })
                ),
                "{result:?}"
            );
        }
    }
}
