//! Sources: where service definitions come from.
//!
//! Each source runs as its own task and publishes a complete [`SourceReport`] on a
//! `tokio::sync::watch` channel: never half a catalog. A source that fails keeps publishing its
//! last good definitions and marks itself degraded with the reason.
//!
//! Definitions are raw, as the source gave them: validation happens once, in [`crate::model`].

pub mod consul;
pub mod file;
pub mod http;
pub mod marathon;

use std::fmt;
use std::time::{Duration, SystemTime};

/// Which source a definition came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SourceId {
    File,
    Consul,
    Marathon,
}

impl fmt::Display for SourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SourceId::File => "file",
            SourceId::Consul => "consul",
            SourceId::Marathon => "marathon",
        })
    }
}

/// One service as a source describes it, before any validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceDef {
    pub name: String,
    pub hosts: Vec<String>,
    /// Path prefix; `None` means `/`.
    pub path: Option<String>,
    /// `ip:port` strings.
    pub servers: Vec<String>,
    pub balance: Option<String>,
    /// HTTP health check path.
    pub check: Option<String>,
    /// Time between two checks; `None`: weft's default (2 s).
    pub check_interval: Option<Duration>,
    /// Failed checks in a row before a server is taken out; `None`: weft's default (3).
    pub check_fall: Option<u32>,
}

#[cfg(test)]
impl ServiceDef {
    /// A plain definition for tests: these hosts and servers, everything else unset.
    pub fn new(name: &str, hosts: &[&str], servers: &[&str]) -> ServiceDef {
        ServiceDef {
            name: name.into(),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            path: None,
            servers: servers.iter().map(|s| s.to_string()).collect(),
            balance: None,
            check: None,
            check_interval: None,
            check_fall: None,
        }
    }
}

/// A definition the source itself could not read (a broken TOML entry, a bad label): it never
/// reaches the model, but the operator must see why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// What was rejected, e.g. `service #3`.
    pub subject: String,
    pub reason: String,
}

/// The health of a source, as the status page and `weft check` show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Not read yet.
    Starting,
    Ok,
    /// The last read failed; the definitions are the last good ones.
    Degraded {
        reason: String,
        since: SystemTime,
    },
}

/// Everything one source currently says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceReport {
    pub source: SourceId,
    pub services: Vec<ServiceDef>,
    pub rejected: Vec<Rejected>,
    pub health: Health,
}

impl SourceReport {
    /// Marks the source degraded; `since` stays when the reason is the same. Returns whether
    /// anything changed (a new reason).
    pub fn degrade(&mut self, reason: String) -> bool {
        if matches!(&self.health, Health::Degraded { reason: old, .. } if *old == reason) {
            return false;
        }
        self.health = Health::Degraded {
            reason,
            since: SystemTime::now(),
        };
        true
    }

    pub fn starting(source: SourceId) -> Self {
        SourceReport {
            source,
            services: Vec::new(),
            rejected: Vec::new(),
            health: Health::Starting,
        }
    }
}

/// Reads every configured source once, for `weft render` and `weft check`.
pub async fn read_all_once(
    config: &crate::config::Config,
) -> Vec<(SourceId, Result<SourceReport, String>)> {
    let mut reports = Vec::new();
    if let Some(file) = &config.sources.file {
        let report = file::read_once(&file.path).await.map_err(|e| e.to_string());
        reports.push((SourceId::File, report));
    }
    if let Some(consul) = &config.sources.consul {
        let report = consul::read_once(consul.clone(), config.routing.domain.clone())
            .await
            .map_err(|e| e.to_string());
        reports.push((SourceId::Consul, report));
    }
    if let Some(marathon) = &config.sources.marathon {
        let report = marathon::read_once(marathon.clone(), config.routing.domain.clone())
            .await
            .map_err(|e| e.to_string());
        reports.push((SourceId::Marathon, report));
    }
    reports
}

/// An error and its causes on one line: reqwest's own message ("error sending request") says
/// nothing of why; its sources do ("connection refused", "operation timed out").
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Reads `null` as the type's default: Go (Consul) writes an empty slice or map as `null`,
/// and Marathon's versions differ in what they leave out.
pub(crate) fn nullable<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + serde::Deserialize<'de>,
{
    Ok(<Option<T> as serde::Deserialize>::deserialize(deserializer)?.unwrap_or_default())
}

/// How long a source that never answered yet may hold back the first routing before it is
/// reported degraded with no services: long enough for a blip (an agent restart, a leader
/// election) not to cost its routes (in external mode HAProxy still serves them), short
/// enough that the other sources' routes, and a managed HAProxy, do not wait for a source
/// that is down.
pub const START_GRACE: Duration = Duration::from_secs(5);

/// A source's start, for `START_GRACE`: it begins when the source's state is made.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StartGrace(tokio::time::Instant);

impl Default for StartGrace {
    fn default() -> Self {
        StartGrace(tokio::time::Instant::now())
    }
}

impl StartGrace {
    pub(crate) fn is_over(&self) -> bool {
        self.0.elapsed() >= START_GRACE
    }
}

/// Runs `nudge` once, `START_GRACE` after now (unless shut down first): a source that has not
/// answered by then is published as such even when no request of its ends meanwhile (one
/// can hang for minutes).
pub(crate) fn after_start_grace(
    shutdown: tokio_util::sync::CancellationToken,
    nudge: impl FnOnce() + Send + 'static,
) {
    tokio::spawn(async move {
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep(START_GRACE) => nudge(),
        }
    });
}

/// Exponential backoff with jitter for a failing source: 0.5 s doubling to 30 s, each delay
/// drawn between half and all of its step so that many watches do not retry in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    step: Duration,
}

impl Backoff {
    pub const MIN: Duration = Duration::from_millis(500);
    pub const MAX: Duration = Duration::from_secs(30);

    pub fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(Self::MAX);
        step.mul_f64(0.5 + fastrand::f64() / 2.0)
    }

    pub fn reset(&mut self) {
        self.step = Self::MIN;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { step: Self::MIN }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let mut backoff = Backoff::default();
        let mut step = Backoff::MIN;
        for _ in 0..12 {
            let delay = backoff.next_delay();
            assert!(
                delay >= step / 2 && delay <= step,
                "{delay:?} for step {step:?}"
            );
            step = (step * 2).min(Backoff::MAX);
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Backoff::MIN);
    }
}
