//! Everything that talks to HAProxy. Nothing outside this module touches HAProxy's files,
//! sockets or process.
//!
//! - `process`: start and supervise HAProxy in master-worker mode; the master CLI.
//! - `runtime`: the admin stats socket (server state).
//! - `stats`: live traffic per backend (`show stat`, bounded rate), the Prometheus exporter.
//! - `plan`: what a change takes: runtime commands or a reload (pure).
//! - `decision`: which way an apply goes: unchanged, runtime, deferred or reload (pure).
//! - `files`: HAProxy's files on disk, written atomically; the staged set.
//! - `validate`: `haproxy -c` and the service it blames.
//! - `apply`: the only writer: runtime updates, or validate, install, reload, confirm.
//! - `listeners`: who else listens on HAProxy's binds (a foreign `SO_REUSEPORT` listener).
//! - `tls`: weft's default certificate for the TLS bind.

pub mod apply;
pub mod decision;
pub mod files;
pub mod listeners;
pub mod plan;
pub mod process;
pub mod runtime;
pub mod stats;
pub mod tls;
pub mod validate;

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// The only variables of weft's environment HAProxy gets (everything else, such as
/// `CONSUL_HTTP_TOKEN`, would be readable with `show env` on its CLI): PATH, and the time zone
/// and locale its log lines use.
pub const KEPT_ENV: [&str; 4] = ["PATH", "TZ", "LANG", "LC_ALL"];

/// `command` with a scrubbed environment: only [`KEPT_ENV`] of weft's own. Applied to the
/// first exec of the managed master, whose reloads re-execute it with its own environment, so
/// every later master and worker is as clean; and to every `haproxy -c`.
pub fn scrub_env(command: &mut tokio::process::Command) -> &mut tokio::process::Command {
    command.env_clear();
    for name in KEPT_ENV {
        if let Some(value) = std::env::var_os(name) {
            command.env(name, value);
        }
    }
    command
}

/// The longest a CLI command may take, connect to last byte.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot connect to {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{command:?} on {path}: {source}")]
    Io {
        path: PathBuf,
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command:?} on {path}: no answer within {timeout:?}")]
    Timeout {
        path: PathBuf,
        command: String,
        timeout: Duration,
    },
}

impl CliError {
    /// The master refuses connections for a moment during a reload: worth a retry.
    pub fn is_refused(&self) -> bool {
        matches!(self, CliError::Connect { source, .. }
            if matches!(source.kind(), ErrorKind::ConnectionRefused | ErrorKind::NotFound))
    }
}

/// Sends one command line to an HAProxy CLI socket (master or stats) and returns the whole
/// answer. The stats socket closes after one command, but 2.6's master CLI keeps the
/// connection open: a trailing `quit` makes both close once they have answered.
pub async fn cli_command(path: &Path, command: &str) -> Result<String, CliError> {
    exchange(path, command, format!("{command};quit\n")).await
}

/// Sends one command line that ends in `<<` followed by its payload (HAProxy's CLI reads the
/// payload up to the first empty line) on the stats socket, which answers and closes. The
/// payload's lines must not be empty; trailing newlines are dropped.
pub async fn cli_payload(path: &Path, command: &str, payload: &str) -> Result<String, CliError> {
    let payload = payload.trim_end_matches('\n');
    if payload
        .split('\n')
        .any(|line| line.trim_end_matches('\r').is_empty())
    {
        return Err(CliError::Io {
            path: path.to_path_buf(),
            command: command.to_string(),
            source: std::io::Error::new(
                ErrorKind::InvalidInput,
                "a payload with an empty line would end early",
            ),
        });
    }
    exchange(path, command, format!("{command} <<\n{payload}\n\n")).await
}

/// Writes `bytes` to the socket and reads the answer to its end, within [`CLI_TIMEOUT`];
/// `command` names it in errors.
async fn exchange(path: &Path, command: &str, bytes: String) -> Result<String, CliError> {
    let exchange = async {
        let mut stream = UnixStream::connect(path)
            .await
            .map_err(|source| CliError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        let io_err = |source| CliError::Io {
            path: path.to_path_buf(),
            command: command.to_string(),
            source,
        };
        stream.write_all(bytes.as_bytes()).await.map_err(io_err)?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.map_err(io_err)?;
        Ok(answer)
    };
    tokio::time::timeout(CLI_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(CliError::Timeout {
                path: path.to_path_buf(),
                command: command.to_string(),
                timeout: CLI_TIMEOUT,
            })
        })
}
