//! The file source: a TOML list of services, watched with `notify`.
//!
//! ```toml
//! [[service]]
//! name = "shop"
//! hosts = ["shop.example.com"]
//! path = "/"                       # optional path prefix
//! servers = ["10.2.1.5:8080"]
//! balance = "roundrobin"           # optional
//! check = "/health"                # optional HTTP health check path
//! ```
//!
//! The directory is watched (an editor that saves by writing a temporary file and renaming it
//! over the old one replaces the inode); a burst of events is read once, `debounce` after it
//! starts, and the file is also re-read periodically in case an event was missed. A file that
//! does not parse keeps the last good definitions; one broken `[[service]]` entry is rejected
//! alone.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use notify::{RecursiveMode, Watcher};
use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

mod entries;

use super::dir_watch::DirWatch;
use crate::config::FileSourceConfig;
use crate::escape::Escaped;
use crate::model::{CheckDef, Health, Rejected, ServiceDef, SourceId, SourceReport};
use entries::Entries;

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is larger than {max} bytes, the most weft reads of a services file")]
    TooLarge { path: PathBuf, max: u64 },
    #[error("{path} is not valid TOML: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Shape { path: PathBuf, message: String },
    #[error("cannot watch {path}: {source}")]
    Watch {
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
}

/// One `[[service]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileService {
    name: String,
    #[serde(default)]
    hosts: Vec<String>,
    path: Option<String>,
    #[serde(default)]
    servers: Vec<String>,
    balance: Option<String>,
    check: Option<String>,
    check_interval: Option<String>,
    check_fall: Option<u32>,
    /// `timeout check`: how long one check may take (`"2s"`).
    check_timeout: Option<String>,
    /// Services that may add paths under this service's hosts.
    #[serde(default)]
    share: Vec<String>,
    /// `"https"`: redirect HTTP to HTTPS where a certificate covers the host.
    redirect: Option<String>,
    /// `Strict-Transport-Security` on HTTPS answers.
    hsts: Option<bool>,
    /// ACME certificates for the service's hosts (with `tls.acme.opt_in`).
    acme: Option<bool>,
}

fn service_def(service: FileService) -> Result<ServiceDef, String> {
    let check_interval = service
        .check_interval
        .map(|text| {
            humantime::parse_duration(&text).map_err(|err| {
                format!("check_interval {text:?} is not a duration like \"2s\": {err}")
            })
        })
        .transpose()?;
    Ok(ServiceDef {
        origin: service.name.clone(),
        name: service.name,
        hosts: service.hosts,
        path: service.path,
        servers: service.servers,
        balance: service.balance,
        check: service.check.map(CheckDef::Http),
        check_interval,
        check_fall: service.check_fall,
        check_timeout: service.check_timeout,
        share: service.share,
        redirect: service.redirect,
        hsts: service.hsts,
        acme: service.acme,
    })
}

/// Services read from one file, and the entries that could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileContent {
    /// Shared with the pieces remembered ([`entries::Entries`]): a read copies no definition.
    pub services: Vec<std::sync::Arc<ServiceDef>>,
    pub rejected: Vec<Rejected>,
}

/// The largest services file weft reads: some 100,000 services' entries, far above any real
/// estate's file, and a bound on what a runaway generator can make weft hold.
pub const MAX_FILE_BYTES: u64 = 64 << 20;

/// Reads and parses the services file once.
pub async fn read(path: &Path) -> Result<FileContent, FileError> {
    let text = read_text(path).await?;
    parse(&text, path)
}

/// The services file's text, within [`MAX_FILE_BYTES`].
async fn read_text(path: &Path) -> Result<String, FileError> {
    use tokio::io::AsyncReadExt;
    let read_err = |source| FileError::Read {
        path: path.to_path_buf(),
        source,
    };
    // Anything but a regular file (a FIFO at the path would block the read until a writer
    // came) is refused.
    let opened = {
        let path = path.to_path_buf();
        tokio::task::spawn_blocking(move || crate::sources::open_regular(&path))
            .await
            .unwrap_or_else(|join| Err(std::io::Error::other(join.to_string())))
    };
    let file = tokio::fs::File::from_std(opened.map_err(read_err)?);
    // Sized to the file as it is now (within the bound): read in a few large reads, not in a
    // doubling series of small ones, each a trip to tokio's blocking pool.
    let size = file.metadata().await.map_or(0, |m| m.len());
    let too_large = || FileError::TooLarge {
        path: path.to_path_buf(),
        max: MAX_FILE_BYTES,
    };
    // Refused unread when it is larger already; the read stays bounded for one that grows.
    if size > MAX_FILE_BYTES {
        return Err(too_large());
    }
    let mut bytes = Vec::with_capacity(size as usize + 1);
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .await
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(too_large());
    }
    String::from_utf8(bytes)
        .map_err(|err| read_err(std::io::Error::new(std::io::ErrorKind::InvalidData, err)))
}

/// Parses the services file. Syntax errors and unknown top-level keys fail the whole file (a
/// typo like `[[services]]` must not read as "no services"); a broken entry is rejected alone.
pub fn parse(text: &str, path: &Path) -> Result<FileContent, FileError> {
    let entries = parse_entries(text).map_err(|failure| failure.into_error(text, path))?;
    let count = entries.len();
    Ok(number(entries.into_iter(), count))
}

/// One `[[service]]` entry as read: its service, or the name it gives (`" (\"shop\")"`, or
/// empty) and why it was rejected.
pub(crate) type Entry = Result<std::sync::Arc<ServiceDef>, (String, String)>;

/// Why a document fails whole.
pub(crate) enum Failure {
    Syntax(toml::de::Error),
    Shape(String),
}

impl Failure {
    fn into_error(self, text: &str, path: &Path) -> FileError {
        match self {
            Failure::Syntax(err) => FileError::Parse {
                path: path.to_path_buf(),
                message: one_line(text, &err),
            },
            Failure::Shape(message) => FileError::Shape {
                path: path.to_path_buf(),
                message,
            },
        }
    }
}

/// The entries of one TOML document, in order.
pub(crate) fn parse_entries(text: &str) -> Result<Vec<Entry>, Failure> {
    use toml::de::{DeTable, DeValue, ValueDeserializer};
    // toml's own document tree, which borrows its strings from `text`: each entry is
    // deserialized from it directly, with no owned `toml::Value` tree in between (at 10,000
    // services that tree was a third of a read).
    let mut document = DeTable::parse(text).map_err(Failure::Syntax)?.into_inner();
    let entries = match document.remove("service").map(|v| v.into_inner()) {
        None => Default::default(),
        Some(DeValue::Array(entries)) => entries,
        Some(_) => {
            return Err(Failure::Shape(
                "`service` must be an array of tables ([[service]])".into(),
            ))
        }
    };
    if let Some(key) = document.keys().next() {
        return Err(Failure::Shape(format!(
            "unknown top-level key `{}` (expected [[service]] entries)",
            key.get_ref()
        )));
    }
    let parsed = entries.into_iter().map(|entry| {
        let name = match entry.get_ref() {
            DeValue::Table(table) => match table.get("name").map(|n| n.get_ref()) {
                Some(DeValue::String(n)) => format!(" ({n:?})"),
                _ => String::new(),
            },
            _ => String::new(),
        };
        FileService::deserialize(ValueDeserializer::from(entry))
            .map_err(|err| err.to_string().trim().to_string())
            .and_then(service_def)
            .map(std::sync::Arc::new)
            .map_err(|reason| (name, reason))
    });
    Ok(parsed.collect())
}

/// The file's content from its entries in file order: rejected ones named by their place.
/// `count`: how many entries there are (the list is sized once: growing one of 10,000
/// definitions moved megabytes several times).
pub(crate) fn number(entries: impl Iterator<Item = Entry>, count: usize) -> FileContent {
    let mut content = FileContent {
        services: Vec::with_capacity(count),
        rejected: Vec::new(),
    };
    for (i, entry) in entries.enumerate() {
        match entry {
            Ok(service) => content.services.push(service),
            Err((name, reason)) => content.rejected.push(Rejected {
                subject: format!("service #{}{name}", i + 1),
                reason,
            }),
        }
    }
    content
}

/// A TOML error as one log-friendly line: `line 3, column 9: invalid table header`.
fn one_line(text: &str, err: &toml::de::Error) -> String {
    let message = err
        .message()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    match err.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line}, column {column}: {message}")
        }
        None => message,
    }
}

/// Runs the file source until `shutdown`: publishes the file's content on every change.
pub async fn run(
    config: FileSourceConfig,
    tx: watch::Sender<SourceReport>,
    shutdown: CancellationToken,
) -> Result<(), FileError> {
    let dir = config
        .path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    // What the watcher's events are matched against; a symlink's can change at every read.
    let names = Arc::new(Mutex::new(Vec::new()));
    let matched = names.clone();
    let mut watch = DirWatch::new(&dir, config.debounce, move |path| {
        let names = matched.lock().map(|n| n.clone()).unwrap_or_default();
        path.file_name()
            .is_some_and(|n| names.iter().any(|name| name == n))
    })
    .map_err(|source| FileError::Watch {
        path: dir.clone(),
        source,
    })?;
    let mut link = Link::default();
    link.follow(&config.path, &dir, watch.watcher(), &names);
    let mut entries = Entries::default();
    info!(path = %config.path.display(), symlinked = link.symlinked, "watching services file");

    loop {
        refresh(&config.path, &tx, &mut entries).await;
        link.follow(&config.path, &dir, watch.watcher(), &names);
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            () = watch.changed() => {
                debug!(path = %config.path.display(), "services file changed");
            }
        }
    }
}

/// Where a symlinked services file leads, re-resolved after every read: a link re-pointed
/// elsewhere, a file replaced by a link (or back), a target directory swapped away (as a
/// Kubernetes ConfigMap does) are all followed.
#[derive(Default)]
struct Link {
    symlinked: bool,
    /// The target's directory, watched besides the file's own, when it is another one.
    target_dir: Option<PathBuf>,
}

impl Link {
    fn follow(
        &mut self,
        path: &Path,
        dir: &Path,
        watcher: &mut impl Watcher,
        names: &Mutex<Vec<std::ffi::OsString>>,
    ) {
        self.symlinked = std::fs::symlink_metadata(path).is_ok_and(|m| m.is_symlink());
        if let Ok(mut names) = names.lock() {
            *names = watched_names(path, self.symlinked);
        }
        let target_dir = self
            .symlinked
            .then(|| std::fs::canonicalize(path).ok())
            .flatten()
            .and_then(|target| target.parent().map(Path::to_path_buf))
            .filter(|target_dir| std::fs::canonicalize(dir).ok().as_ref() != Some(target_dir));
        if target_dir == self.target_dir {
            return;
        }
        if let Some(old) = self.target_dir.take() {
            // Gone already when the directory was deleted: nothing to undo.
            let _ = watcher.unwatch(&old);
        }
        if let Some(new) = target_dir {
            // Not fatal: the periodic re-read still sees the file; the next read tries again.
            match watcher.watch(&new, RecursiveMode::NonRecursive) {
                Ok(()) => self.target_dir = Some(new),
                Err(err) => {
                    warn!(dir = %new.display(), error = %err, "cannot watch the services file's target directory; re-reading every 30 s")
                }
            }
        }
    }
}

/// The names whose changes mean the services file may have changed: its own, and for a
/// symlink the first step of the link (a Kubernetes ConfigMap's `services.toml ->
/// ..data/services.toml` changes by swapping `..data`) and the target's name (in the
/// target's directory, watched too).
fn watched_names(path: &Path, symlinked: bool) -> Vec<std::ffi::OsString> {
    let mut names: Vec<std::ffi::OsString> = path.file_name().map(Into::into).into_iter().collect();
    if symlinked {
        if let Ok(link) = std::fs::read_link(path) {
            if let Some(std::path::Component::Normal(first)) = link.components().next() {
                names.push(first.to_os_string());
            }
        }
        if let Some(name) = std::fs::canonicalize(path)
            .ok()
            .and_then(|t| t.file_name().map(Into::into))
        {
            names.push(name);
        }
    }
    names
}

/// Reads the file and publishes what changed; on failure keeps the last good services.
async fn refresh(path: &Path, tx: &watch::Sender<SourceReport>, entries: &mut Entries) {
    let result = match read_text(path).await {
        Ok(text) => entries.parse(&text, path),
        Err(err) => Err(err),
    };
    // Compared and moved in place: no copy of the whole report (10,000 services) per read.
    tx.send_if_modified(|report| match result {
        Ok(content) => {
            if report.health != Health::Ok && report.health != Health::Starting {
                info!(path = %path.display(), "services file readable again");
            }
            let changed = report.services != content.services
                || report.rejected != content.rejected
                || report.health != Health::Ok;
            if changed {
                report.services = content.services;
                report.rejected = content.rejected;
                report.health = Health::Ok;
            }
            changed
        }
        Err(err) => {
            let reason = err.to_string();
            let changed = report.degrade(reason.clone());
            if changed {
                warn!(error = %Escaped(&reason), services = report.services.len(), "services file unusable, keeping the last good services");
            }
            changed
        }
    });
}

/// The report of a single read, for `weft render` and `weft check`.
pub async fn read_once(path: &Path) -> Result<SourceReport, FileError> {
    let content = read(path).await?;
    Ok(SourceReport {
        certificates: Default::default(),
        challenges: Default::default(),
        source: SourceId::File,
        services: content.services,
        rejected: content.rejected,
        health: Health::Ok,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_file_over_the_bound_is_refused_unread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("services.toml");
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(MAX_FILE_BYTES + 1).unwrap();
        let err = read(&path).await.unwrap_err().to_string();
        assert!(err.contains("larger than 67108864 bytes"), "{err}");
        file.set_len(0).unwrap();
        assert!(read(&path).await.unwrap().services.is_empty());
    }

    #[test]
    fn a_fifo_is_refused_not_waited_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("services.toml");
        let read_path = path.clone();
        let err = crate::sources::read_beside_a_fifo(&path, move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(read(&read_path)).unwrap_err().to_string()
        });
        assert!(err.ends_with("not a regular file"), "{err}");
    }

    #[test]
    fn parses_services() {
        let text = r#"
[[service]]
name = "shop"
hosts = ["shop.example.com"]
servers = ["10.2.1.5:8080"]
check = "/health"
check_timeout = "2s"
"#;
        let content = parse(text, Path::new("s.toml")).unwrap();
        assert_eq!(content.services.len(), 1);
        assert_eq!(
            content.services[0].check,
            Some(CheckDef::Http("/health".into()))
        );
        assert_eq!(content.services[0].check_timeout.as_deref(), Some("2s"));
        assert!(content.rejected.is_empty());
    }

    #[test]
    fn a_broken_entry_is_rejected_alone() {
        let text = r#"
[[service]]
name = "shop"
hosts = ["shop.example.com"]
servers = ["10.2.1.5:8080"]

[[service]]
name = "typo"
hostz = ["x.example.com"]

[[service]]
name = "wrongtype"
servers = "10.2.1.5:8080"
"#;
        let content = parse(text, Path::new("s.toml")).unwrap();
        assert_eq!(content.services.len(), 1);
        assert_eq!(content.rejected.len(), 2);
        assert_eq!(content.rejected[0].subject, "service #2 (\"typo\")");
        assert!(content.rejected[0].reason.contains("hostz"));
    }

    #[test]
    fn syntax_errors_are_one_line_with_a_position() {
        let err = parse(
            "[[service]]\nname = \"x\"\n[[service\n",
            Path::new("s.toml"),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "s.toml is not valid TOML: line 3, column 10: unclosed array table, expected `]]`"
        );
    }

    #[test]
    fn whole_file_errors() {
        assert!(matches!(
            parse("[[service]\n", Path::new("s.toml")),
            Err(FileError::Parse { .. })
        ));
        assert!(matches!(
            parse("[[services]]\nname = \"x\"\n", Path::new("s.toml")),
            Err(FileError::Shape { .. })
        ));
        assert!(matches!(
            parse("service = 3\n", Path::new("s.toml")),
            Err(FileError::Shape { .. })
        ));
        assert_eq!(parse("", Path::new("s.toml")).unwrap().services.len(), 0);
    }
}
