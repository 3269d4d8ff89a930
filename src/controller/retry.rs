//! When the apply loop tries again: the retry and error policy, pure.
//!
//! ```text
//! applied, unchanged ─────> no retry; the delay starts over
//! started ────────────────> no retry; the delay stays (a start is no proof HAProxy stays up)
//! deferred until T ───────> retry at T (min_reload_interval)
//! rejected by haproxy -c ─> no retry: the same table would be rejected again; wait for a change
//! failed otherwise ───────> retry after the delay, which doubles up to RETRY_MAX
//! HAProxy gone ───────────> restart at once if it had run STABLE_RUN (or was adopted); quick
//!                           repeated deaths back off from RETRY_MIN, doubling. A delay of
//!                           its own: failed applies (a full disk, say) never slow a restart
//! ```

use std::time::Duration;

use tokio::time::Instant;

use crate::haproxy::apply::{ApplyError, Outcome};

/// Retry delays after a failed apply or a HAProxy crash, doubling up to the last.
pub const RETRY_MIN: Duration = Duration::from_millis(500);
pub const RETRY_MAX: Duration = Duration::from_secs(30);
/// A HAProxy that ran this long before it died restarts at once.
pub const STABLE_RUN: Duration = Duration::from_secs(60);

/// How an apply ended, as far as retrying goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Applied,
    Started,
    Deferred(Instant),
    Rejected,
    Failed,
}

impl Ended {
    pub fn of(result: &Result<Outcome, ApplyError>) -> Ended {
        match result {
            Ok(Outcome::Deferred { until, .. }) => Ended::Deferred(*until),
            Ok(Outcome::Started) => Ended::Started,
            Ok(_) => Ended::Applied,
            Err(ApplyError::Validate(_)) => Ended::Rejected,
            Err(_) => Ended::Failed,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retry {
    /// The delay the next failure waits.
    delay: Duration,
    /// When to apply again without a change, if at all.
    pub at: Option<Instant>,
    /// When HAProxy was last started.
    started_at: Option<Instant>,
    /// The wait before the last restart after a death.
    restart_delay: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            delay: RETRY_MIN,
            at: None,
            started_at: None,
            restart_delay: Duration::ZERO,
        }
    }
}

impl Retry {
    pub fn delay(&self) -> Duration {
        self.delay
    }

    pub fn after(&mut self, ended: Ended, now: Instant) {
        match ended {
            Ended::Applied => {
                self.delay = RETRY_MIN;
                self.at = None;
            }
            Ended::Started => {
                self.started_at = Some(now);
                self.at = None;
            }
            Ended::Deferred(until) => self.at = Some(until),
            Ended::Rejected => self.at = None,
            Ended::Failed => self.back_off(now),
        }
    }

    /// HAProxy exited or stopped answering.
    pub fn after_gone(&mut self, now: Instant) {
        let stable = !self
            .started_at
            .is_some_and(|at| now.saturating_duration_since(at) < STABLE_RUN);
        self.restart_delay = if stable {
            Duration::ZERO
        } else {
            (self.restart_delay * 2).clamp(RETRY_MIN, RETRY_MAX)
        };
        self.at = Some(now + self.restart_delay);
    }

    fn back_off(&mut self, now: Instant) {
        self.at = Some(now + self.delay);
        self.delay = (self.delay * 2).min(RETRY_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_back_off_doubling_to_the_cap_and_a_success_starts_over() {
        let now = Instant::now();
        let mut retry = Retry::default();
        let mut waits = Vec::new();
        for _ in 0..8 {
            retry.after(Ended::Failed, now);
            waits.push(retry.at.unwrap() - now);
        }
        let secs: Vec<f64> = waits.iter().map(Duration::as_secs_f64).collect();
        assert_eq!(secs, [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]);
        retry.after(Ended::Applied, now);
        assert_eq!((retry.at, retry.delay()), (None, RETRY_MIN));
    }

    #[test]
    fn a_rejected_config_waits_for_the_next_change_and_keeps_the_delay() {
        let now = Instant::now();
        let mut retry = Retry::default();
        retry.after(Ended::Failed, now);
        retry.after(Ended::Rejected, now);
        assert_eq!(retry.at, None);
        assert_eq!(retry.delay(), RETRY_MIN * 2);
    }

    #[test]
    fn a_deferred_reload_retries_when_the_interval_allows() {
        let now = Instant::now();
        let until = now + Duration::from_millis(800);
        let mut retry = Retry::default();
        retry.after(Ended::Deferred(until), now);
        assert_eq!(retry.at, Some(until));
        assert_eq!(retry.delay(), RETRY_MIN);
    }

    #[test]
    fn quick_repeated_deaths_back_off_a_stable_run_restarts_at_once() {
        let start = Instant::now();
        let mut retry = Retry::default();
        retry.after(Ended::Started, start);
        // A start is no proof: the delay keeps growing while HAProxy keeps dying.
        let first = start + Duration::from_secs(1);
        retry.after_gone(first);
        assert_eq!(retry.at, Some(first + RETRY_MIN));
        retry.after(Ended::Started, start + Duration::from_secs(2));
        let second = start + Duration::from_secs(3);
        retry.after_gone(second);
        assert_eq!(retry.at, Some(second + RETRY_MIN * 2));
        // After a minute up, a death restarts at once.
        retry.after(Ended::Started, start + Duration::from_secs(4));
        let later = start + Duration::from_secs(4) + STABLE_RUN;
        retry.after_gone(later);
        assert_eq!(retry.at, Some(later));
    }

    /// Applies that keep failing (a full disk) do not slow the restart of a HAProxy that
    /// died: one adopted from an earlier weft (never started by this one) restarts at once.
    #[test]
    fn failed_applies_do_not_delay_a_restart() {
        let now = Instant::now();
        let mut retry = Retry::default();
        for _ in 0..8 {
            retry.after(Ended::Failed, now);
        }
        assert_eq!(retry.delay(), RETRY_MAX);
        retry.after_gone(now);
        assert_eq!(retry.at, Some(now));
    }

    #[test]
    fn results_map_to_their_policy() {
        let until = Instant::now();
        let deferred = Ok(Outcome::Deferred { updates: 1, until });
        assert_eq!(Ended::of(&deferred), Ended::Deferred(until));
        assert_eq!(Ended::of(&Ok(Outcome::Started)), Ended::Started);
        assert_eq!(Ended::of(&Ok(Outcome::Unchanged)), Ended::Applied);
        assert_eq!(
            Ended::of(&Ok(Outcome::Reloaded { reloads: 2 })),
            Ended::Applied
        );
        let rejected = crate::haproxy::validate::ValidateError::Rejected {
            stderr: String::new(),
            culprit: None,
        };
        assert_eq!(Ended::of(&Err(rejected.into())), Ended::Rejected);
        let runtime = crate::haproxy::runtime::RuntimeError::Answer {
            command: "x".into(),
            answer: "y".into(),
        };
        assert_eq!(Ended::of(&Err(runtime.into())), Ended::Failed);
    }
}
