//! The apply loop: the one task that drives the `Applier`.
//!
//! ```text
//! desired table ──> apply ──> done (runtime update, unchanged, deferred by the interval)
//!                     └────> reload due ──> `haproxy -c` runs on its own ──> commit (reload)
//!                                             meanwhile new tables still
//!                                             go through apply: their
//!                                             runtime part is not held up
//! ```
//!
//! When the validation ends, the latest table is reloaded if it has the validated structure
//! (only servers and routes moved on), else validated again. A backend that `haproxy -c`
//! rejects is dropped and the rest applied; it stays out while its definition stays the same,
//! and shows on the status page as dropped. When HAProxy died and the desired config is
//! rejected, it is started on the last good one.

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::blame::{effective, Blamed};
use super::retry::{Ended, Retry};
use crate::bridge::unix_now;
use crate::haproxy::apply::{Applier, ApplyError, Candidate, Outcome, Refreshed, Step, Validation};
use crate::haproxy::process::Gone;
use crate::haproxy::validate::ValidateError;
use crate::model::{Built, RoutingTable};
use crate::status::ApplyStatus;

/// How many services `haproxy -c` may blame for one table before weft gives up on it.
const MAX_CULPRITS: usize = 16;

/// A reload waiting for its `haproxy -c`.
struct Pending {
    candidate: Candidate,
    check: Validation,
}

/// What the loop remembers between applies.
struct LoopState {
    /// The last table applied in full, for the change log (shared with the applier).
    applied: Arc<RoutingTable>,
    retry: Retry,
    status: watch::Sender<ApplyStatus>,
}

impl LoopState {
    /// Reports one apply's result: status page, log, retry schedule.
    fn record(
        &mut self,
        result: Result<Outcome, ApplyError>,
        table: &Arc<RoutingTable>,
        applier: &Applier,
    ) {
        let running = applier.running();
        self.status.send_modify(|s| {
            s.generation += 1;
            s.running = running;
            if let Some(serving) = applier.serving().filter(|now| **now != *s.backends) {
                s.backends = Arc::new(serving.clone());
            }
            if let Some(pool) = applier.pool() {
                if pool.declared > 0 && pool.free == 0 && s.pool.free > 0 {
                    warn!(
                        spares = pool.declared,
                        "the backend pool is used up: the next new service waits for a reload, which refills it (haproxy.spare_backends)"
                    );
                }
                s.pool = pool;
            }
            match &result {
                Ok(outcome) => {
                    s.last_error = None;
                    match outcome {
                        Outcome::Reloaded { reloads } => s.reloads = *reloads,
                        Outcome::Runtime { updates } | Outcome::Deferred { updates, .. } => {
                            s.runtime_updates += *updates as u64
                        }
                        Outcome::Started | Outcome::Unchanged => {}
                    }
                    if *outcome != Outcome::Unchanged {
                        s.last_change = Some(unix_now());
                    }
                }
                Err(err) => s.last_error = Some(err.to_string()),
            }
        });
        let ended = Ended::of(&result);
        let retry_in = self.retry.delay();
        self.retry.after(ended, tokio::time::Instant::now());
        match result {
            // Part applied at runtime; the reload follows when the interval allows.
            Ok(Outcome::Deferred { until, updates }) => {
                debug!(updates, wait = ?until.saturating_duration_since(tokio::time::Instant::now()), "reload deferred by min_reload_interval");
            }
            Ok(outcome) => {
                if outcome != Outcome::Unchanged {
                    let changes = self.applied.diff(table);
                    info!(?outcome, services = table.backends.len(), routes = table.routes.len(), %changes, "routing applied");
                }
                self.applied = Arc::clone(table);
            }
            // The same table would be rejected again: wait for the next change.
            Err(err @ ApplyError::Validate(_)) => {
                error!(error = %err, "haproxy rejected the config, keeping the last good one until the next change");
            }
            Err(err) => {
                error!(error = %err, ?retry_in, "apply failed, HAProxy keeps its last good config");
            }
        }
    }
}

/// Whether the latest desired table differs from the one a failed validation was for.
fn moved_on(
    desired: &watch::Receiver<Option<Arc<Built>>>,
    blamed: &Blamed,
    validated: &RoutingTable,
) -> bool {
    desired
        .borrow()
        .as_ref()
        .is_some_and(|built| *blamed.apply_to(&built.table) != *validated)
}

/// After a rejected config: a managed HAProxy that died meanwhile comes back on the last good
/// files rather than staying down until the routing changes.
async fn restart_on_last_good(applier: &mut Applier, state: &mut LoopState) {
    match applier.start_last_good().await {
        Ok(Some(_)) => {
            info!("haproxy started again on the last good config");
            state
                .retry
                .after(Ended::Started, tokio::time::Instant::now());
            state.status.send_modify(|s| s.running = true);
        }
        Ok(None) => {}
        Err(err) => {
            error!(error = %err, retry_in = ?state.retry.delay(), "cannot start haproxy on the last good config");
            state
                .retry
                .after(Ended::Failed, tokio::time::Instant::now());
        }
    }
}

/// Applies every new desired table, retrying failures with backoff, restarting a managed
/// HAProxy that died (backing off when it keeps dying), and validating reloads without
/// holding up runtime changes.
pub(super) async fn apply_loop(
    mut applier: Applier,
    mut desired: watch::Receiver<Option<Arc<Built>>>,
    status: watch::Sender<ApplyStatus>,
    shutdown: CancellationToken,
    handover: CancellationToken,
) {
    let mut state = LoopState {
        applied: Arc::default(),
        retry: Retry::default(),
        status,
    };
    let mut pending: Option<Pending> = None;
    let mut blamed = Blamed::default();
    if applier.adopt().await {
        state.status.send_modify(|s| s.running = true);
    }
    loop {
        let retry_at = state.retry.at;
        let retry_sleep = async move {
            match retry_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let validation = async {
            match pending.as_mut() {
                Some(p) => p.check.as_mut().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            changed = desired.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            gone = applier.gone() => {
                state.retry.after_gone(tokio::time::Instant::now());
                let retry_in = state.retry.at.map(|at| at.saturating_duration_since(tokio::time::Instant::now()));
                match gone {
                    Gone::Exited(how) => error!(%how, ?retry_in, "haproxy exited unexpectedly, restarting it on the last good config"),
                    Gone::Silent(err) => error!(error = %err, ?retry_in, "the external haproxy stopped answering; weft reloads it once it answers again"),
                }
                applier.mark_gone();
                state.status.send_modify(|s| s.running = false);
                continue;
            }
            () = retry_sleep => {}
            checked = validation => {
                let Some(done) = pending.take() else { continue };
                match checked {
                    Ok(()) => {
                        let Some(built) = desired.borrow().clone() else { continue };
                        let table = effective(&built, &mut blamed, &state.status);
                        match applier.refresh(done.candidate, &table) {
                            Ok(Refreshed::Reload(candidate)) => {
                                let table = candidate.shared_table();
                                let result = applier.commit(candidate).await;
                                state.record(result, &table, &applier);
                                continue;
                            }
                            Ok(Refreshed::NotNeeded) => continue,
                            // The structure moved on: apply (and validate) the latest table.
                            Ok(Refreshed::Revalidate) => {}
                            Err(err) => {
                                state.record(Err(err), &table, &applier);
                                continue;
                            }
                        }
                    }
                    // `add` blames the service (and the latest table is applied without
                    // it) or, finding none, leaves the error to the arm below.
                    Err(ApplyError::Validate(ValidateError::Rejected { stderr, culprit: Some(backend) }))
                        if blamed.len() < MAX_CULPRITS
                            && blamed.add(done.candidate.service_of(&backend), done.candidate.table(), &stderr) => {}
                    Err(err) => {
                        state.record(Err(err), &done.candidate.shared_table(), &applier);
                        if !applier.running() {
                            restart_on_last_good(&mut applier, &mut state).await;
                        }
                        // Tables that came during the validation were held for its end: the
                        // latest may be the fix.
                        if !moved_on(&desired, &blamed, done.candidate.table()) {
                            continue;
                        }
                    }
                }
            }
        }
        let Some(built) = desired.borrow_and_update().clone() else {
            continue;
        };
        let table = effective(&built, &mut blamed, &state.status);
        match applier.apply(&table).await {
            Ok(Step::Done(outcome)) => state.record(Ok(outcome), &table, &applier),
            // While a validation runs, its end picks up this table. No timer either: an
            // elapsed one would spin this loop until the validation ends.
            Ok(Step::Reload(_)) if pending.is_some() => state.retry.at = None,
            Ok(Step::Reload(candidate)) => match applier.validation(&candidate) {
                Ok(check) => {
                    state.retry.at = None;
                    pending = Some(Pending { candidate, check })
                }
                Err(err) => state.record(Err(err), &table, &applier),
            },
            Err(err) => state.record(Err(err), &table, &applier),
        }
    }
    applier.stop(handover.is_cancelled()).await;
}
