//! The model's input: what a source reports, raw, before any validation.
//!
//! Sources produce these and the model consumes them, so they live here, below both: a source
//! depends on the model, never the other way round.

use std::fmt;
use std::time::{Duration, SystemTime};

/// Which source a definition came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SourceId {
    File,
    Consul,
    Marathon,
    /// The certificates' directory, `tls.certs`.
    Tls,
    /// The certificates ordered from an ACME CA, `tls.acme`, and its pending challenges.
    Acme,
}

impl SourceId {
    /// The inverse of `Display`.
    pub fn parse(text: &str) -> Option<SourceId> {
        match text {
            "file" => Some(SourceId::File),
            "consul" => Some(SourceId::Consul),
            "marathon" => Some(SourceId::Marathon),
            "tls" => Some(SourceId::Tls),
            "acme" => Some(SourceId::Acme),
            _ => None,
        }
    }
}

impl fmt::Display for SourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SourceId::File => "file",
            SourceId::Consul => "consul",
            SourceId::Marathon => "marathon",
            SourceId::Tls => "tls",
            SourceId::Acme => "acme",
        })
    }
}

/// One service as a source describes it, before any validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceDef {
    pub name: String,
    /// What the source calls it, matched by `[[routing.teams]]`: the Consul service name, the
    /// Marathon app id (`/shop/web`), the file's service name.
    pub origin: String,
    pub hosts: Vec<String>,
    /// Path prefix; `None` means `/`.
    pub path: Option<String>,
    /// `ip:port` strings.
    pub servers: Vec<String>,
    pub balance: Option<String>,
    /// HAProxy's active health check of every server, if any.
    pub check: Option<CheckDef>,
    /// Time between two checks; `None`: weft's default (2 s).
    pub check_interval: Option<Duration>,
    /// Failed checks in a row before a server is taken out; `None`: weft's default (3).
    pub check_fall: Option<u32>,
    /// How long one check may take (`timeout check`), as the source wrote it (`"2s"`);
    /// `None`: HAProxy's default, the check interval.
    pub check_timeout: Option<String>,
    /// Services allowed to add paths under the hosts this service holds: `name`, `name*` (a
    /// prefix), of this service's source, or `consul:name` / `marathon:name` / `file:name`.
    pub share: Vec<String>,
    /// `https`: plain HTTP requests to this service's hosts are redirected to HTTPS (where a
    /// certificate covers the host).
    pub redirect: Option<String>,
    /// `Strict-Transport-Security` on this service's HTTPS answers.
    pub hsts: Option<bool>,
    /// `true`: the service's hosts get ACME certificates, beyond `tls.acme.hosts` (where the
    /// operator allows it with `tls.acme.opt_in`).
    pub acme: Option<bool>,
}

#[cfg(test)]
impl ServiceDef {
    /// A plain definition for tests: these hosts and servers, everything else unset.
    pub fn new(name: &str, hosts: &[&str], servers: &[&str]) -> ServiceDef {
        ServiceDef {
            name: name.into(),
            origin: name.into(),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            path: None,
            servers: servers.iter().map(|s| s.to_string()).collect(),
            balance: None,
            check: None,
            check_interval: None,
            check_fall: None,
            check_timeout: None,
            share: Vec::new(),
            redirect: None,
            hsts: None,
            acme: None,
        }
    }
}

/// The kind of health check a source asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckDef {
    /// `GET <path>`: a 2xx or 3xx answer passes.
    Http(String),
    /// A TCP connection that opens passes.
    Tcp,
}

/// A definition the source itself could not read (a broken TOML entry, a bad label): it never
/// reaches the model, but the operator must see why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// What was rejected, e.g. `service #3`.
    pub subject: String,
    pub reason: String,
}

/// How many of one definition's dropped parts (its servers, tasks or tags) are named, each with
/// its reason; the rest are counted in one more entry. A definition with 10,000 bad servers
/// says so in 17 lines, not 10,000, and leaves room on the page for everyone else's.
pub const MAX_NAMED_PARTS: usize = 16;

/// `parts`, what is dropped of one definition's `what` (`"tasks"`), with the first
/// [`MAX_NAMED_PARTS`] named and the rest counted in one entry about `subject`.
pub fn name_first_parts(
    mut parts: Vec<Rejected>,
    subject: impl FnOnce() -> String,
    what: &str,
) -> Vec<Rejected> {
    if parts.len() > MAX_NAMED_PARTS {
        let more = parts.len() - MAX_NAMED_PARTS;
        parts.truncate(MAX_NAMED_PARTS);
        parts.push(Rejected {
            subject: subject(),
            reason: more_parts_dropped(more, what),
        });
    }
    parts
}

/// The reason of the one entry that counts a definition's dropped parts past
/// [`MAX_NAMED_PARTS`].
pub fn more_parts_dropped(more: usize, what: &str) -> String {
    format!("{more} more {what} dropped (only the first {MAX_NAMED_PARTS} are named)")
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
    pub services: Vec<std::sync::Arc<ServiceDef>>,
    pub rejected: Vec<Rejected>,
    pub health: Health,
    /// The TLS certificates that passed validation (only the certificates' directory, `tls.certs`,
    /// and ACME, `tls.acme`, report any).
    pub certificates: super::certs::Certificates,
    /// The pending ACME HTTP-01 challenges (only ACME reports any).
    pub challenges: super::certs::Challenges,
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
            certificates: Default::default(),
            challenges: Default::default(),
            source,
            services: Vec::new(),
            rejected: Vec::new(),
            health: Health::Starting,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn degrade_keeps_since_while_the_reason_stays() {
        let mut report = SourceReport::starting(SourceId::Consul);
        assert!(report.degrade("connection refused".into()));
        let Health::Degraded { since: first, .. } = report.health.clone() else {
            panic!("not degraded: {:?}", report.health);
        };
        assert!(!report.degrade("connection refused".into()));
        assert_eq!(
            report.health,
            Health::Degraded {
                reason: "connection refused".into(),
                since: first
            }
        );
        assert!(report.degrade("timed out".into()));
    }
}
