//! The apply decision: from what runs and what is wanted, which way to go. Pure; `apply` does
//! what it says.
//!
//! ```text
//! nothing of ours runs (not started, died, first external apply) ──> reload (start)
//! in doubt (a runtime update failed part way) ───────────────────────> reload, runtime part first
//! same files ─────────────────────────────────────────────────────────> unchanged
//! same structure, runtime updates on ─────────────────────────────────> runtime
//! otherwise ──> reload, runtime part first (runtime updates on), now or when the interval allows
//! ```

use tokio::time::Instant;

use super::plan::{same_structure, Applied};
use crate::config::RuntimeUpdates;

/// What the applier knows of the running HAProxy.
#[derive(Debug, Clone, Copy)]
pub struct Situation<'a> {
    /// What HAProxy runs, if anything weft installed runs (`None` before the first start, after
    /// a managed HAProxy died, and before the first reload in external mode).
    pub applied: Option<&'a Applied>,
    /// A runtime update failed part way: HAProxy may run something between `applied` and
    /// what was sent.
    pub in_doubt: bool,
    pub runtime_updates: RuntimeUpdates,
    /// The earliest the next reload may run (`min_reload_interval` after the last one).
    pub next_reload: Option<Instant>,
}

/// The way to bring HAProxy to the desired state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The files already say this.
    Unchanged,
    /// Only servers and map entries change: the runtime API, no reload.
    Runtime,
    /// Validate, then reload (or start).
    Reload {
        /// Apply what fits the running config through the runtime API first, so that server
        /// changes do not wait for the reload.
        runtime_part: bool,
        /// The reload waits until then; the runtime part goes out now.
        deferred_until: Option<Instant>,
    },
}

pub fn decide(situation: &Situation, desired: &Applied, now: Instant) -> Decision {
    let Some(applied) = situation.applied else {
        return Decision::Reload {
            runtime_part: false,
            deferred_until: None,
        };
    };
    let runtime = situation.runtime_updates == RuntimeUpdates::On;
    if !situation.in_doubt {
        if applied.rendered == desired.rendered {
            return Decision::Unchanged;
        }
        if runtime && same_structure(&applied.slots, &desired.slots) {
            return Decision::Runtime;
        }
    }
    Decision::Reload {
        runtime_part: runtime,
        deferred_until: situation.next_reload.filter(|at| *at > now),
    }
}

/// What a validated candidate becomes once its `haproxy -c` has passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refresh {
    /// Reload into the validated candidate: the routing did not move on.
    Candidate,
    /// Reload into the latest state: only servers and routes moved on, the validated
    /// structure holds.
    Latest,
    /// The latest state has another structure: validate it first.
    Revalidate,
    /// HAProxy already runs the latest state (the routing went back).
    NotNeeded,
}

/// `applied` is `None` when what runs is not known (nothing runs, or in doubt).
pub fn refresh(candidate: &Applied, latest: &Applied, applied: Option<&Applied>) -> Refresh {
    if candidate.table == latest.table {
        Refresh::Candidate
    } else if applied.is_some_and(|a| a.rendered == latest.rendered) {
        Refresh::NotNeeded
    } else if same_structure(&candidate.slots, &latest.slots) {
        Refresh::Latest
    } else {
        Refresh::Revalidate
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::haproxy::plan::tests::{applied, table};

    fn situation(applied: Option<&Applied>) -> Situation<'_> {
        Situation {
            applied,
            in_doubt: false,
            runtime_updates: RuntimeUpdates::On,
            next_reload: None,
        }
    }

    const RELOAD_NOW: Decision = Decision::Reload {
        runtime_part: true,
        deferred_until: None,
    };

    #[test]
    fn nothing_running_is_a_start_without_a_runtime_part() {
        let desired = applied(table(&[("shop", &["10.2.1.5:80"])]));
        let mut nothing = situation(None);
        nothing.next_reload = Some(Instant::now() + Duration::from_secs(60));
        let start = Decision::Reload {
            runtime_part: false,
            deferred_until: None,
        };
        assert_eq!(decide(&nothing, &desired, Instant::now()), start);
    }

    #[test]
    fn same_files_are_unchanged_unless_in_doubt() {
        let running = applied(table(&[("shop", &["10.2.1.5:80"])]));
        let now = Instant::now();
        assert_eq!(
            decide(&situation(Some(&running)), &running, now),
            Decision::Unchanged
        );
        let doubt = Situation {
            in_doubt: true,
            ..situation(Some(&running))
        };
        assert_eq!(decide(&doubt, &running, now), RELOAD_NOW);
    }

    #[test]
    fn a_server_move_is_runtime_unless_off_or_in_doubt() {
        let running = applied(table(&[("shop", &["10.2.1.5:80"])]));
        let moved = applied(table(&[("shop", &["10.2.1.6:80"])]));
        let now = Instant::now();
        assert_eq!(
            decide(&situation(Some(&running)), &moved, now),
            Decision::Runtime
        );
        let off = Situation {
            runtime_updates: RuntimeUpdates::Off,
            ..situation(Some(&running))
        };
        let reload_only = Decision::Reload {
            runtime_part: false,
            deferred_until: None,
        };
        assert_eq!(decide(&off, &moved, now), reload_only);
        let doubt = Situation {
            in_doubt: true,
            ..situation(Some(&running))
        };
        assert_eq!(decide(&doubt, &moved, now), RELOAD_NOW);
    }

    #[test]
    fn a_new_backend_reloads_now_or_when_the_interval_allows() {
        let running = applied(table(&[("shop", &["10.2.1.5:80"])]));
        let more = applied(table(&[
            ("shop", &["10.2.1.5:80"]),
            ("cart", &["10.2.1.7:80"]),
        ]));
        let now = Instant::now();
        assert_eq!(decide(&situation(Some(&running)), &more, now), RELOAD_NOW);
        let later = now + Duration::from_millis(700);
        let held = Situation {
            next_reload: Some(later),
            ..situation(Some(&running))
        };
        assert_eq!(
            decide(&held, &more, now),
            Decision::Reload {
                runtime_part: true,
                deferred_until: Some(later),
            }
        );
        // Once the interval has passed, the reload runs at once.
        assert_eq!(decide(&held, &more, later), RELOAD_NOW);
    }

    #[test]
    fn refresh_reloads_the_candidate_the_latest_or_revalidates() {
        let running = applied(table(&[("shop", &["10.2.1.5:80"])]));
        let candidate = applied(table(&[
            ("shop", &["10.2.1.5:80"]),
            ("cart", &["10.2.1.7:80"]),
        ]));
        assert_eq!(
            refresh(&candidate, &candidate, Some(&running)),
            Refresh::Candidate
        );
        let servers_moved = applied(table(&[
            ("shop", &["10.2.1.6:80"]),
            ("cart", &["10.2.1.8:80"]),
        ]));
        assert_eq!(
            refresh(&candidate, &servers_moved, Some(&running)),
            Refresh::Latest
        );
        let another_backend = applied(table(&[
            ("shop", &["10.2.1.5:80"]),
            ("pay", &["10.2.1.9:80"]),
        ]));
        assert_eq!(
            refresh(&candidate, &another_backend, Some(&running)),
            Refresh::Revalidate
        );
        // The routing went back to what runs; unless what runs is not known.
        assert_eq!(
            refresh(&candidate, &running, Some(&running)),
            Refresh::NotNeeded
        );
        assert_eq!(refresh(&candidate, &running, None), Refresh::Revalidate);
    }
}
