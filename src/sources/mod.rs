//! Sources: where service definitions come from.
//!
//! Each source runs as its own task and publishes a complete [`SourceReport`] on a
//! `tokio::sync::watch` channel: never half a catalog. A source that fails keeps publishing its
//! last good definitions and marks itself degraded with the reason.
//!
//! Definitions are raw, as the source gave them: validation happens once, in [`crate::model`],
//! which also owns the report types (what a source reports is the model's input). The
//! configured sources are listed once, in `Source::configured`: [`read_all_once`] (`weft
//! render`, `weft check`) and [`spawn_all`] (`weft run`) both go through it.

pub mod acme;
pub mod certs;
pub mod consul;
pub mod dir_watch;
pub mod file;
pub mod http;
pub mod marathon;
pub mod records;

use std::path::PathBuf;
use std::time::Duration;

use reqwest::Url;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{
    ClaimsStore, Config, ConsulSourceConfig, FileSourceConfig, MarathonSourceConfig, TlsConfig,
    ACME_CONNECTIONS, CLAIMS_CONNECTIONS,
};
use crate::model::{Hostname, SourceId, SourceReport};

/// Why a source could not be read once or could not start watching: what `weft render` and
/// `weft check` print, and what stops `weft run` (a source task returns only at shutdown or
/// with this). A source that fails while it runs is degraded instead (see
/// [`Health`](crate::model::Health)).
///
/// The causes already name the path or URL, so each message is its cause's.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{source}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: file::FileError,
    },
    #[error("{source}")]
    WatchFile {
        path: PathBuf,
        #[source]
        source: file::FileError,
    },
    #[error("{source}")]
    ReadConsul {
        url: Url,
        #[source]
        source: consul::ConsulError,
    },
    #[error("{source}")]
    ReadMarathon {
        urls: Vec<Url>,
        #[source]
        source: marathon::MarathonError,
    },
    #[error("{source}")]
    WatchMarathon {
        urls: Vec<Url>,
        #[source]
        source: marathon::MarathonError,
    },
    #[error("{source}")]
    Certs {
        #[from]
        source: certs::CertsError,
    },
}

impl SourceError {
    /// The source that failed.
    pub fn source_id(&self) -> SourceId {
        match self {
            SourceError::ReadFile { .. } | SourceError::WatchFile { .. } => SourceId::File,
            SourceError::ReadConsul { .. } => SourceId::Consul,
            SourceError::ReadMarathon { .. } | SourceError::WatchMarathon { .. } => {
                SourceId::Marathon
            }
            SourceError::Certs { .. } => SourceId::Tls,
        }
    }
}

/// One configured source with what it runs on: the one list of sources that both the single
/// read and the running tasks go through.
enum Source {
    File(FileSourceConfig),
    Consul {
        config: ConsulSourceConfig,
        domain: Option<Hostname>,
    },
    Marathon {
        config: MarathonSourceConfig,
        domain: Option<Hostname>,
    },
    /// The certificates' directory of `[tls]`.
    Tls(TlsConfig),
}

impl Source {
    /// Every source `config` turns on, in [`SourceId`] order.
    fn configured(config: &Config) -> Vec<Source> {
        let domain = &config.routing.domain;
        let sources = &config.sources;
        let file = sources.file.clone().map(Source::File);
        let consul = sources.consul.clone().map(|mut consul| {
            // The claims ledger takes its share of the budget first.
            if matches!(config.routing.claims, ClaimsStore::Consul { .. }) {
                consul.max_connections -= CLAIMS_CONNECTIONS;
            }
            // So does the ACME state.
            if config.acme_in_consul() {
                consul.max_connections -= ACME_CONNECTIONS;
            }
            Source::Consul {
                config: consul,
                domain: domain.clone(),
            }
        });
        let marathon = sources.marathon.clone().map(|config| Source::Marathon {
            config,
            domain: domain.clone(),
        });
        let tls = config.haproxy.tls.clone().map(Source::Tls);
        [file, consul, marathon, tls]
            .into_iter()
            .flatten()
            .collect()
    }

    fn id(&self) -> SourceId {
        match self {
            Source::File(_) => SourceId::File,
            Source::Consul { .. } => SourceId::Consul,
            Source::Marathon { .. } => SourceId::Marathon,
            Source::Tls(_) => SourceId::Tls,
        }
    }

    async fn read_once(self) -> Result<SourceReport, SourceError> {
        match self {
            Source::File(config) => {
                file::read_once(&config.path)
                    .await
                    .map_err(|source| SourceError::ReadFile {
                        path: config.path,
                        source,
                    })
            }
            Source::Consul { config, domain } => {
                let url = config.url.clone();
                consul::read_once(config, domain)
                    .await
                    .map_err(|source| SourceError::ReadConsul { url, source })
            }
            Source::Marathon { config, domain } => {
                let urls = config.urls.clone();
                marathon::read_once(config, domain)
                    .await
                    .map_err(|source| SourceError::ReadMarathon { urls, source })
            }
            Source::Tls(config) => Ok(certs::read_once(&config).await?),
        }
    }

    /// Runs the source until `shutdown`, publishing on `tx`.
    async fn run(
        self,
        tx: watch::Sender<SourceReport>,
        shutdown: CancellationToken,
    ) -> Result<(), SourceError> {
        match self {
            Source::File(config) => {
                let path = config.path.clone();
                file::run(config, tx, shutdown)
                    .await
                    .map_err(|source| SourceError::WatchFile { path, source })
            }
            // Consul needs nothing that can fail before it watches: every failure after that
            // degrades the source instead.
            Source::Consul { config, domain } => {
                consul::run(config, domain, tx, shutdown).await;
                Ok(())
            }
            Source::Marathon { config, domain } => {
                let urls = config.urls.clone();
                marathon::run(config, domain, tx, shutdown)
                    .await
                    .map_err(|source| SourceError::WatchMarathon { urls, source })
            }
            Source::Tls(config) => Ok(certs::run(config, tx, shutdown).await?),
        }
    }
}

/// Reads every configured source once, one after the other, for `weft render` and
/// `weft check`.
pub async fn read_all_once(config: &Config) -> Vec<Result<SourceReport, SourceError>> {
    let mut reports = Vec::new();
    for source in Source::configured(config) {
        reports.push(source.read_once().await);
    }
    reports
}

/// Starts a task in `tasks` for every configured source and returns the channels they publish
/// on, in [`SourceId`] order; each starts as [`SourceReport::starting`]. A task returns only at
/// `shutdown`, or with the error that kept its source from running.
pub fn spawn_all<E>(
    config: &Config,
    tasks: &mut JoinSet<Result<(), E>>,
    shutdown: &CancellationToken,
) -> Vec<watch::Receiver<SourceReport>>
where
    E: From<SourceError> + Send + 'static,
{
    Source::configured(config)
        .into_iter()
        .map(|source| {
            let (tx, rx) = watch::channel(SourceReport::starting(source.id()));
            let source = source.run(tx, shutdown.clone());
            tasks.spawn(async move { source.await.map_err(E::from) });
            rx
        })
        .collect()
}

/// Opens a file to read it, links followed, refusing anything but a regular file
/// (`InvalidData`, "not a regular file"). The open does not wait: a FIFO's would block until a
/// writer came, and the check is on the file opened, not on the path before.
pub fn open_regular(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        // No effect on a regular file's reads.
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not a regular file",
        ));
    }
    Ok(file)
}

/// Reads one of weft's own files (the claims ledger, the ACME state) of at most `max` bytes: a
/// larger one is an error (`InvalidData`, with the bound), refused by its length before it is
/// read (and read no further than the bound if it grows meanwhile), and so is anything but a
/// regular file ([`open_regular`]).
pub fn read_own_file(path: &std::path::Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Error, ErrorKind, Read};
    let too_large = || {
        Error::new(
            ErrorKind::InvalidData,
            format!("larger than {} MiB, weft's bound", max >> 20),
        )
    };
    let file = open_regular(path)?;
    let length = file.metadata()?.len();
    if length > max {
        return Err(too_large());
    }
    let mut bytes = Vec::with_capacity(usize::try_from(length).unwrap_or(0));
    file.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(too_large());
    }
    Ok(bytes)
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
    shutdown: CancellationToken,
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

/// Makes a FIFO at `fifo`, then runs `read` on a thread of its own: what it returns, which must
/// be within 10 s (a read that opens the FIFO and waits for a writer never returns).
#[cfg(test)]
pub(crate) fn read_beside_a_fifo<T: Send + 'static>(
    fifo: &std::path::Path,
    read: impl FnOnce() -> T + Send + 'static,
) -> T {
    let made = std::process::Command::new("mkfifo")
        .arg(fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(read());
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the read returns")
}

/// A recorded answer from `tests/fixtures/<path>`, for the decoders' unit tests.
#[cfg(test)]
pub(crate) fn fixture(path: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(path);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
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
