//! `haproxy -c`: whether HAProxy accepts a config, and which service it blames when it does not.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum ValidateError {
    #[error("cannot run {binary} -c: {source}")]
    RunCheck {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{binary} -c did not finish within {after:?}: killed, and the config counts as not checked"
    )]
    TimedOut { binary: PathBuf, after: Duration },
    #[error("haproxy rejected the config{}: {stderr}", culprit.as_ref().map(|c| format!(" in backend {c}")).unwrap_or_default())]
    Rejected {
        stderr: String,
        /// The backend whose lines HAProxy complained about, if the error lies in one.
        culprit: Option<String>,
    },
}

/// `haproxy -c -f <file>`, stderr kept (never `-q`: it hides the ALERTs too).
pub async fn check_config(
    binary: &Path,
    config: &Path,
) -> Result<std::process::Output, ValidateError> {
    check_within(binary, config, CHECK_TIMEOUT).await
}

/// The longest `haproxy -c` may take: 10,000 backends check in about 0.7 s here, and a check
/// that hangs (a resolver, a stuck file system) must not stop every later change.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(60);

async fn check_within(
    binary: &Path,
    config: &Path,
    after: Duration,
) -> Result<std::process::Output, ValidateError> {
    let check = super::scrub_env(&mut Command::new(binary))
        .arg("-c")
        .arg("-f")
        .arg(config)
        // Dropped at the timeout: killed, never left behind.
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(after, check).await {
        Ok(output) => output.map_err(|source| ValidateError::RunCheck {
            binary: binary.to_path_buf(),
            source,
        }),
        Err(_) => Err(ValidateError::TimedOut {
            binary: binary.to_path_buf(),
            after,
        }),
    }
}

/// Checks the config at `path`, whose text is `config`; a rejection names its culprit.
pub async fn validate(binary: &Path, path: &Path, config: &str) -> Result<(), ValidateError> {
    let output = check_config(binary, path).await?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
    let culprit = culprit(&stderr, config);
    Err(ValidateError::Rejected { stderr, culprit })
}

/// Finds the service backend whose section holds the line HAProxy's first ALERT names
/// (`parsing [file:LINE]`, also spelled `Parsing [`). Warnings blame nobody.
fn culprit(stderr: &str, config: &str) -> Option<String> {
    const MARK: &str = "parsing [";
    let line: usize = stderr
        .lines()
        .filter(|l| l.contains("[ALERT]"))
        .find_map(|l| {
            // ASCII lowercasing keeps byte offsets.
            let start = l.to_ascii_lowercase().find(MARK)? + MARK.len();
            let rest = &l[start..];
            let end = rest.find(']')?;
            rest[..end].rsplit_once(':')?.1.parse().ok()
        })?;
    config
        .lines()
        .take(line)
        .filter_map(|l| l.strip_prefix("backend "))
        .last()
        .map(|b| b.trim().to_string())
        .filter(|b| {
            b.starts_with(crate::model::BACKEND_PREFIX) || b.starts_with(crate::slots::SPARE_PREFIX)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `haproxy -c` sees only the kept variables: a stand-in binary prints its environment.
    #[tokio::test]
    async fn the_check_runs_with_a_scrubbed_environment() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let binary = dir.path().join("haproxy");
        std::fs::write(&binary, "#!/bin/sh\nexec env\n").unwrap();
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
        let output = check_config(&binary, Path::new("/dev/null")).await.unwrap();
        let env = String::from_utf8_lossy(&output.stdout);
        let names: Vec<&str> = env.lines().filter_map(|l| l.split('=').next()).collect();
        // The test process runs with CARGO_* and the like; none may pass.
        assert!(std::env::var_os("CARGO_PKG_NAME").is_some() || std::env::var_os("HOME").is_some());
        for name in &names {
            // sh adds PWD (and SHLVL, _) itself.
            assert!(
                super::super::KEPT_ENV.contains(name) || ["PWD", "SHLVL", "_"].contains(name),
                "{name} passed to haproxy -c:\n{env}"
            );
        }
    }

    /// A check that hangs is killed at the timeout, not waited for.
    #[tokio::test]
    async fn a_check_that_hangs_is_killed_at_the_timeout() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let binary = dir.path().join("haproxy");
        let pid_file = dir.path().join("pid");
        std::fs::write(
            &binary,
            format!(
                "#!/bin/sh\necho $$ > {}\nexec sleep 30\n",
                pid_file.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = check_within(&binary, Path::new("/dev/null"), Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(err, ValidateError::TimedOut { .. }), "{err}");
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // kill_on_drop sends SIGKILL; the reaper may take a moment.
        let gone = (0..100).any(|_| {
            std::thread::sleep(Duration::from_millis(20));
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            stat.is_empty()
                || stat
                    .rsplit_once(')')
                    .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        });
        assert!(gone, "the hung check {pid} is still running");
    }

    #[test]
    fn culprit_is_the_enclosing_backend() {
        let config = "global\n\nbackend no_route\n    x\nbackend be_shop\n    balance bogus\n    server a 1.2.3.4:80\n";
        let stderr = "[NOTICE]   (1) : haproxy version is 2.6.12\n[ALERT]    (1) : config : parsing [/run/staging/haproxy.cfg:6] : unknown balance\n";
        assert_eq!(culprit(stderr, config).as_deref(), Some("be_shop"));
        let capital = "[ALERT]    (1) : config : Parsing [/x/haproxy.cfg:7]: bad server\n";
        assert_eq!(culprit(capital, config).as_deref(), Some("be_shop"));
        let warning = "[WARNING]  (1) : config : parsing [/x/haproxy.cfg:6] : meh\n[ALERT]    (1) : config : parsing [/x/haproxy.cfg:1] : bad\n";
        assert_eq!(culprit(warning, config), None);
        let global = "[ALERT] (1) : config : parsing [/x/haproxy.cfg:1] : bad";
        assert_eq!(culprit(global, config), None);
        let default = "[ALERT] (1) : config : parsing [/x/haproxy.cfg:4] : bad";
        assert_eq!(culprit(default, config), None);
    }
}
