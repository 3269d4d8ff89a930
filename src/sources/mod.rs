//! Sources: where service definitions come from.
//!
//! Each source runs as its own task and publishes a complete [`SourceReport`] on a
//! `tokio::sync::watch` channel: never half a catalog. A source that fails keeps publishing its
//! last good definitions and marks itself degraded with the reason.
//!
//! Definitions are raw, as the source gave them: validation happens once, in [`crate::model`].

pub mod file;

use std::fmt;
use std::time::SystemTime;

/// Which source a definition came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SourceId {
    File,
}

impl fmt::Display for SourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SourceId::File => "file",
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
    config: &crate::config::SourcesConfig,
) -> Vec<(SourceId, Result<SourceReport, String>)> {
    let mut reports = Vec::new();
    if let Some(file) = &config.file {
        let report = file::read_once(&file.path).await.map_err(|e| e.to_string());
        reports.push((SourceId::File, report));
    }
    reports
}
