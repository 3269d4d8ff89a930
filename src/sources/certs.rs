//! The certificates' directory, `tls.certs`: every `*.pem` file in it, validated (see
//! [`crate::model::certs`]), watched like the services file.
//!
//! ```text
//! tls.certs/ ──list (at most MAX_CERT_FILES, by name)──> read (at most MAX_CERT_BYTES each)
//!            ──validate (now)──> SourceReport { certificates, rejected: each dropped file }
//! ```
//!
//! Hidden names (`..data`, the directory a Kubernetes Secret swaps) and other extensions are
//! not certificates; links are followed. A file that cannot be used is dropped with the
//! reason, the others are published. A directory that cannot be listed keeps the last good
//! certificates and degrades the source. Each re-read (every event burst, and every 30 s)
//! validates again, so a certificate that expires is dropped within 30 s.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::dir_watch::DirWatch;
use crate::config::TlsConfig;
use crate::escape::Escaped;
use crate::model::certs::{cert_name, validate, Certificates, MAX_CERT_BYTES, MAX_CERT_FILES};
use crate::model::{Health, Rejected, SourceId, SourceReport};

/// A burst of changes (a renewal tool writing several files) is read this long after it starts.
const DEBOUNCE: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("cannot list the certificates' directory {path}: {source}")]
    List {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot watch the certificates' directory {path}: {source}")]
    Watch {
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
}

/// What one read of the directory found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CertsContent {
    pub certificates: Certificates,
    pub rejected: Vec<Rejected>,
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Reads and validates every certificate file of `dir` at unix time `now` (blocking).
pub fn read_dir(dir: &Path, now: i64) -> Result<CertsContent, CertsError> {
    let list_err = |source| CertsError::List {
        path: dir.to_path_buf(),
        source,
    };
    // The first MAX_CERT_FILES names in order, the rest only counted: a folder of a million
    // files costs no more memory than one of a thousand.
    let mut names: std::collections::BinaryHeap<String> = std::collections::BinaryHeap::new();
    let mut more = 0;
    for entry in std::fs::read_dir(dir).map_err(list_err)? {
        let entry = entry.map_err(list_err)?;
        if let Some(name) = entry.file_name().to_str() {
            if cert_name(name).is_some() {
                names.push(name.to_string());
                if names.len() > MAX_CERT_FILES {
                    names.pop();
                    more += 1;
                }
            }
        }
    }
    let mut content = CertsContent::default();
    for file in &names.into_sorted_vec() {
        let subject = format!("certificate file {file:?}");
        let name = cert_name(file).unwrap_or(file);
        let result = read_bounded(&dir.join(file)).and_then(|bytes| validate(name, &bytes, now));
        match result {
            Ok(cert) => {
                content.certificates.insert(cert.name.clone(), cert);
            }
            Err(reason) => content.rejected.push(Rejected { subject, reason }),
        }
    }
    if more > 0 {
        content.rejected.push(Rejected {
            subject: format!("{more} more certificate files"),
            reason: format!(
                "more than {MAX_CERT_FILES} certificate files in {}; these are not read",
                dir.display()
            ),
        });
    }
    Ok(content)
}

/// A regular file's bytes (links followed), one more than [`MAX_CERT_BYTES`] at most: enough
/// for [`validate`] to refuse a larger one, never more.
fn read_bounded(path: &Path) -> Result<Vec<u8>, String> {
    let unreadable = |err: std::io::Error| format!("unreadable: {err}");
    let file = crate::sources::open_regular(path).map_err(|err| match err.kind() {
        std::io::ErrorKind::InvalidData => err.to_string(),
        _ => unreadable(err),
    })?;
    let mut bytes = Vec::new();
    file.take(MAX_CERT_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(unreadable)?;
    Ok(bytes)
}

async fn read(dir: &Path) -> Result<CertsContent, CertsError> {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || read_dir(&dir, unix_now()))
        .await
        .unwrap_or_else(|join| {
            Err(CertsError::List {
                path: PathBuf::new(),
                source: std::io::Error::other(join.to_string()),
            })
        })
}

fn report_of(content: CertsContent) -> SourceReport {
    SourceReport {
        certificates: content.certificates,
        rejected: content.rejected,
        health: Health::Ok,
        ..SourceReport::starting(SourceId::Tls)
    }
}

/// The report of a single read, for `weft render` and `weft check`.
pub async fn read_once(config: &TlsConfig) -> Result<SourceReport, CertsError> {
    read(&config.certs).await.map(report_of)
}

/// Watches the directory until `shutdown`, publishing its certificates on every change.
pub async fn run(
    config: TlsConfig,
    tx: watch::Sender<SourceReport>,
    shutdown: CancellationToken,
) -> Result<(), CertsError> {
    let dir = config.certs.clone();
    let mut watch = DirWatch::new(&dir, DEBOUNCE, |path| {
        // A Kubernetes Secret's files change by swapping `..data`: hidden names count too.
        path.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(".pem") || n.starts_with(".."))
    })
    .map_err(|source| CertsError::Watch {
        path: dir.clone(),
        source,
    })?;
    info!(dir = %dir.display(), "watching the certificates' directory");
    loop {
        let result = read(&dir).await;
        tx.send_if_modified(|report| {
            let before = report.clone();
            match result {
                Ok(content) => {
                    if matches!(report.health, Health::Degraded { .. }) {
                        info!(dir = %dir.display(), "certificates' directory readable again");
                    }
                    *report = report_of(content);
                }
                Err(err) => {
                    let reason = err.to_string();
                    if report.degrade(reason.clone()) {
                        warn!(error = %Escaped(&reason), certificates = report.certificates.len(), "certificates' directory unusable, keeping the last good certificates");
                    }
                }
            }
            *report != before
        });
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            () = watch.changed() => debug!(dir = %dir.display(), "certificates' directory changed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::certs::tests::self_signed;

    /// Past the bound, the first files by name are read and the rest counted.
    #[test]
    fn the_first_files_by_name_are_read_and_the_rest_counted() {
        let dir = tempfile::tempdir().unwrap();
        // Written last first, so that the folder's own order is not the names'.
        for i in (0..MAX_CERT_FILES + 5).rev() {
            std::fs::write(dir.path().join(format!("c{i:05}.pem")), "garbage").unwrap();
        }
        let content = read_dir(dir.path(), unix_now()).unwrap();
        assert_eq!(content.rejected.len(), MAX_CERT_FILES + 1);
        let last_read = format!("certificate file \"c{:05}.pem\"", MAX_CERT_FILES - 1);
        assert_eq!(content.rejected[MAX_CERT_FILES - 1].subject, last_read);
        assert_eq!(
            content.rejected[MAX_CERT_FILES].subject,
            "5 more certificate files"
        );
    }

    #[test]
    fn good_files_are_read_and_bad_ones_dropped_with_their_reason() {
        let dir = tempfile::tempdir().unwrap();
        let now = unix_now();
        let (cert, key) = self_signed(&["a.test"], now - 60, now + 3600);
        std::fs::write(dir.path().join("a.pem"), format!("{cert}{key}")).unwrap();
        std::fs::write(dir.path().join("b.pem"), "garbage").unwrap();
        std::fs::write(dir.path().join("big.pem"), vec![b'x'; MAX_CERT_BYTES + 1]).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not a certificate").unwrap();
        std::fs::create_dir(dir.path().join("..data")).unwrap();
        let content = read_dir(dir.path(), now).unwrap();
        assert_eq!(content.certificates.keys().collect::<Vec<_>>(), ["a"]);
        let dropped: Vec<(&str, &str)> = content
            .rejected
            .iter()
            .map(|r| (r.subject.as_str(), r.reason.as_str()))
            .collect();
        assert_eq!(dropped.len(), 2, "{dropped:?}");
        assert_eq!(dropped[0].0, "certificate file \"b.pem\"");
        assert!(dropped[0].1.starts_with("not PEM"));
        assert!(dropped[1].1.starts_with("larger than 128 KiB"));
    }

    #[test]
    fn a_fifo_is_dropped_not_waited_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let content = crate::sources::read_beside_a_fifo(&dir.path().join("f.pem"), move || {
            read_dir(&path, unix_now()).unwrap()
        });
        assert_eq!(content.rejected.len(), 1);
        assert_eq!(content.rejected[0].reason, "not a regular file");
    }
}
