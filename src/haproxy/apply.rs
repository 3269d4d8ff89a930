//! Apply: the only writer to HAProxy.
//!
//! ```text
//! table ─render─> staging/ ─haproxy -c─> ok? ─atomic rename─> run_dir ─reload─> show proc
//!                 (maps point             │                  (previous files    counter rose,
//!                  at staging/)           └ no: nothing        kept as           failed: 0?
//!                                           installed;         *.last-good)      no: restore
//!                                           culprit named                        last good
//! ```
//!
//! One apply runs at a time (the caller owns the `Applier`); nothing is done when the rendered
//! files equal what HAProxy already runs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::process::Command;
use tracing::{debug, info, warn};

use super::plan::{filter_server_state, runtime_part, runtime_plan, same_structure, Applied};
use super::process::{show_proc, Launch, Managed, ProcessError};
use super::runtime::{replace_map, run_commands, show_servers_state, verify_servers, RuntimeError};
use super::CliError;
use crate::config::{HaproxyConfig, HaproxyMode, RuntimeUpdates};
use crate::model::RoutingTable;
use crate::render::{render_with, RenderSettings, Rendered};
use crate::slots::Slots;

const STAGING_DIR: &str = "staging";
const SERVER_STATE_FILE: &str = "server-state";
const PID_FILE: &str = "haproxy.pid";
/// The admin stats socket the rendered config opens.
const ADMIN_SOCKET: &str = "admin.sock";
const POLL: Duration = Duration::from_millis(5);
/// An empty server-state file in the format HAProxy writes: version line only. Without it
/// HAProxy warns that it cannot read the file.
const EMPTY_SERVER_STATE: &str = "1\n";

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("rendering the config failed: {0}")]
    Render(#[from] askama::Error),
    #[error("cannot write {path}: {source}")]
    WriteFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot run {binary} -c: {source}")]
    RunCheck {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("haproxy rejected the config{}: {stderr}", culprit.as_ref().map(|c| format!(" in backend {c}")).unwrap_or_default())]
    Validate {
        stderr: String,
        /// The backend whose lines HAProxy complained about, if the error lies in one.
        culprit: Option<String>,
    },
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error("reload: {0}")]
    Reload(#[source] CliError),
    #[error(
        "reload not confirmed within {timeout:?}: the master's reload counter stayed at {reloads}"
    )]
    ReloadTimeout { timeout: Duration, reloads: u64 },
    #[error("haproxy failed to load the new config (show proc: failed: {failed}); the last good files are restored and the old worker keeps serving")]
    ReloadFailed { failed: u64 },
    #[error("runtime update: {0}")]
    Runtime(#[from] RuntimeError),
}

/// What one apply did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The files already say this: nothing touched.
    Unchanged,
    /// HAProxy was started on the new files.
    Started,
    /// Applied through the runtime API, no reload: `updates` servers and maps changed.
    Runtime { updates: usize },
    /// A reload was confirmed; the master's reload counter now reads `reloads`.
    Reloaded { reloads: u64 },
    /// What could go through the runtime API did (`updates`); the rest needs a reload that
    /// `min_reload_interval` holds back until `until`.
    Deferred {
        updates: usize,
        until: tokio::time::Instant,
    },
}

/// What `apply` did, or the reload it needs.
pub enum Step {
    Done(Outcome),
    /// Validate the candidate (`Applier::validation`), then `Applier::commit` it.
    Reload(Candidate),
}

/// A config to reload into, once `haproxy -c` accepted it.
#[derive(Debug, Clone)]
pub struct Candidate {
    desired: Applied,
}

impl Candidate {
    pub fn table(&self) -> &RoutingTable {
        &self.desired.table
    }
}

/// `haproxy -c` on a staged candidate, running on its own.
pub struct Validation {
    pub check: std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), ApplyError>> + Send>>,
}

/// What a validated candidate becomes when the routing moved on during the validation.
pub enum Refreshed {
    Reload(Candidate),
    Revalidate,
    NotNeeded,
}

/// Owns HAProxy's files and (in managed mode) its process.
pub struct Applier {
    config: HaproxyConfig,
    live: RenderSettings,
    staging: RenderSettings,
    /// What HAProxy runs now: the last good state.
    applied: Option<Applied>,
    process: Option<Managed>,
    generation: u64,
    last_reload: Option<tokio::time::Instant>,
    /// A runtime update failed part way: HAProxy may run something between `applied` and
    /// what was sent. Only a reload brings it back to a known state.
    in_doubt: bool,
}

impl Applier {
    pub fn new(config: HaproxyConfig) -> Self {
        let live = RenderSettings {
            bind: config.bind,
            run_dir: config.run_dir.clone(),
            map_dir: config.run_dir.clone(),
            hard_stop_after: config.hard_stop_after,
            max_reloads: config.max_reloads,
            slots: config.server_slots,
            log: config.log.clone(),
        };
        let staging = RenderSettings {
            map_dir: config.run_dir.join(STAGING_DIR),
            ..live.clone()
        };
        Applier {
            config,
            live,
            staging,
            applied: None,
            process: None,
            generation: 0,
            last_reload: None,
            in_doubt: false,
        }
    }

    /// Whether HAProxy runs (always assumed in external mode).
    pub fn running(&self) -> bool {
        self.process.is_some() || self.config.mode == HaproxyMode::External
    }

    /// Brings HAProxy to `table`: through the runtime API where the config's structure stays,
    /// else (and to start a managed HAProxy) validate, install, reload or start, confirm.
    #[tracing::instrument(name = "apply", skip_all, fields(generation = self.generation + 1))]
    pub async fn apply(&mut self, table: &RoutingTable) -> Result<Step, ApplyError> {
        self.generation += 1;
        let desired = self.desired(table)?;
        // Not running yet (or it died): `commit` starts it on the validated files.
        if !self.running() {
            return Ok(Step::Reload(Candidate { desired }));
        }
        let Some(applied) = self.applied.clone() else {
            // External mode, first apply: nothing of ours runs yet.
            return Ok(Step::Reload(Candidate { desired }));
        };
        // In doubt, only a reload restores a known state; runtime changes still go out first.
        if !self.in_doubt && applied.rendered == desired.rendered {
            return Ok(Step::Done(Outcome::Unchanged));
        }
        let runtime = self.config.runtime_updates == RuntimeUpdates::On;
        if runtime && !self.in_doubt && same_structure(&applied, &desired.table, &desired.slots) {
            match self.runtime(&applied, &desired).await {
                Ok(updates) => {
                    self.applied = Some(desired);
                    return Ok(Step::Done(Outcome::Runtime { updates }));
                }
                Err(err) => {
                    warn!(error = %err, "runtime update failed, reloading instead");
                    self.in_doubt = true;
                    return Ok(Step::Reload(Candidate { desired }));
                }
            }
        }
        // A reload is needed; what fits the running config goes through the runtime API now,
        // so that server changes do not wait for the reload.
        let updates = if runtime {
            self.apply_runtime_part(&applied, table).await
        } else {
            0
        };
        let until = self
            .last_reload
            .map(|at| at + self.config.min_reload_interval);
        match until {
            Some(until) if until > tokio::time::Instant::now() => {
                Ok(Step::Done(Outcome::Deferred { updates, until }))
            }
            _ => {
                let desired = self.desired(table)?;
                Ok(Step::Reload(Candidate { desired }))
            }
        }
    }

    /// Slots and files for `table`, slots assigned from what runs.
    fn desired(&self, table: &RoutingTable) -> Result<Applied, ApplyError> {
        let previous = self.applied.as_ref().map(|a| &a.slots);
        let slots = Slots::assign(
            previous.unwrap_or(&Slots::default()),
            table,
            self.live.slots,
        );
        let rendered = render_with(table, &slots, &self.live)?;
        Ok(Applied {
            table: table.clone(),
            slots,
            rendered,
        })
    }

    /// Writes the candidate's files into the staging directory and returns `haproxy -c` on
    /// them as a future of its own: the caller keeps applying runtime changes meanwhile.
    pub fn validation(&self, candidate: &Candidate) -> Result<Validation, ApplyError> {
        let staged = render_with(
            &candidate.desired.table,
            &candidate.desired.slots,
            &self.staging,
        )?;
        let dir = &self.staging.map_dir;
        create_dir(dir)?;
        for (name, content) in staged.files() {
            write_atomic(&dir.join(name), content)?;
        }
        let binary = self.config.binary.clone();
        let config_path = dir.join(crate::render::CONFIG_FILE);
        let staged_config = staged.config;
        let check = async move {
            let output = check_config(&binary, &config_path).await?;
            if output.status.success() {
                return Ok(());
            }
            let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
            let culprit = culprit(&stderr, &staged_config);
            Err(ApplyError::Validate { stderr, culprit })
        };
        Ok(Validation {
            check: Box::pin(check),
        })
    }

    /// After a validation: the candidate to reload, brought up to `table` when the routing
    /// moved on meanwhile. `None` when `table` has another structure (validate again) or needs
    /// no reload any more.
    pub fn refresh(
        &self,
        candidate: Candidate,
        table: &RoutingTable,
    ) -> Result<Refreshed, ApplyError> {
        if candidate.desired.table == *table {
            return Ok(Refreshed::Reload(candidate));
        }
        let latest = self.desired(table)?;
        if let Some(applied) = self
            .applied
            .as_ref()
            .filter(|_| self.running() && !self.in_doubt)
        {
            if applied.rendered == latest.rendered {
                return Ok(Refreshed::NotNeeded);
            }
        }
        if same_structure(&candidate.desired, &latest.table, &latest.slots) {
            return Ok(Refreshed::Reload(Candidate { desired: latest }));
        }
        Ok(Refreshed::Revalidate)
    }

    /// Starts a managed HAProxy that does not run on the last good files (validated when they
    /// were installed): for when the desired config is rejected and nothing serves.
    pub async fn start_last_good(&mut self) -> Result<Option<Outcome>, ApplyError> {
        let Some(good) = self.applied.clone().filter(|_| !self.running()) else {
            return Ok(None);
        };
        self.start(&good.rendered, LastGood::Skip).await?;
        Ok(Some(Outcome::Started))
    }

    /// Reloads HAProxy on a validated candidate and confirms it; starts a managed HAProxy
    /// that does not run (yet) on it instead.
    #[tracing::instrument(name = "reload", skip_all, fields(generation = self.generation))]
    pub async fn commit(&mut self, candidate: Candidate) -> Result<Outcome, ApplyError> {
        if self.running() {
            return self.reload(candidate.desired).await;
        }
        self.start(&candidate.desired.rendered, LastGood::Keep)
            .await?;
        self.applied = Some(candidate.desired);
        Ok(Outcome::Started)
    }

    /// While a reload waits: the changes that fit the running config, at runtime.
    async fn apply_runtime_part(&mut self, applied: &Applied, table: &RoutingTable) -> usize {
        let part = runtime_part(applied, table);
        let slots = Slots::assign(&applied.slots, &part, self.live.slots);
        let Ok(rendered) = render_with(&part, &slots, &self.live) else {
            return 0;
        };
        if rendered == applied.rendered {
            return 0;
        }
        let partial = Applied {
            table: part,
            slots,
            rendered,
        };
        match self.runtime(applied, &partial).await {
            Ok(updates) => {
                self.applied = Some(partial);
                updates
            }
            // The reload that follows brings everything in line.
            Err(err) => {
                warn!(error = %err, "runtime update failed, the coming reload will apply it");
                self.in_doubt = true;
                0
            }
        }
    }

    /// Applies a same-structure change through the admin socket, then confirms it. The files
    /// are written first: a reload at any later moment reproduces what runs.
    async fn runtime(&self, applied: &Applied, desired: &Applied) -> Result<usize, ApplyError> {
        let plan = runtime_plan(applied, &desired.slots, &desired.rendered);
        self.write_files(Some(&applied.rendered), &desired.rendered, LastGood::Skip)?;
        let admin = self.admin_socket();
        run_commands(&admin, &plan.enable).await?;
        for (file, entries) in &plan.maps {
            let entries: Vec<(&str, &str)> = entries
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            replace_map(&admin, &self.config.run_dir.join(file), &entries).await?;
        }
        run_commands(&admin, &plan.disable).await?;
        verify_servers(&admin, &plan.expected).await?;
        let updates = plan.updates();
        if updates > 0 {
            info!(updates, "haproxy updated at runtime, no reload");
        }
        Ok(updates)
    }

    fn admin_socket(&self) -> PathBuf {
        self.config.run_dir.join(ADMIN_SOCKET)
    }

    fn server_state_path(&self) -> PathBuf {
        self.config.run_dir.join(SERVER_STATE_FILE)
    }

    /// Writes the files HAProxy reads; before a reload the previous version of each is kept
    /// as `.last-good`.
    fn install(&self, rendered: &Rendered) -> Result<(), ApplyError> {
        self.write_files(None, rendered, LastGood::Keep)
    }

    /// Writes the files that differ from `previous` (all of them without one).
    fn write_files(
        &self,
        previous: Option<&Rendered>,
        rendered: &Rendered,
        last_good: LastGood,
    ) -> Result<(), ApplyError> {
        create_dir(&self.config.run_dir)?;
        let state = self.server_state_path();
        if !state.exists() {
            write_atomic(&state, EMPTY_SERVER_STATE)?;
        }
        let before = previous.map(Rendered::files);
        for (i, (name, content)) in rendered.files().into_iter().enumerate() {
            if before.is_some_and(|files| files[i].1 == content) {
                continue;
            }
            let path = self.file_path(name);
            if last_good == LastGood::Keep && path.exists() {
                let _ = std::fs::copy(&path, last_good_path(&path));
            }
            write_atomic(&path, content)?;
        }
        Ok(())
    }

    fn file_path(&self, name: &str) -> PathBuf {
        if name == crate::render::CONFIG_FILE {
            self.config.config_file.clone()
        } else {
            self.config.run_dir.join(name)
        }
    }

    fn launch(&self) -> Launch {
        Launch {
            binary: self.config.binary.clone(),
            master_socket: self.config.master_socket.clone(),
            config_file: self.config.config_file.clone(),
            pid_file: self.config.run_dir.join(PID_FILE),
        }
    }

    /// Starts a managed HAProxy on `rendered` (written first), with no server state: a state
    /// file from an earlier run describes servers this config may not have.
    async fn start(&mut self, rendered: &Rendered, last_good: LastGood) -> Result<(), ApplyError> {
        write_atomic(&self.server_state_path(), EMPTY_SERVER_STATE)?;
        self.write_files(None, rendered, last_good)?;
        self.process = Some(Managed::start(&self.launch()).await?);
        self.in_doubt = false;
        Ok(())
    }

    async fn reload(&mut self, desired: Applied) -> Result<Outcome, ApplyError> {
        let started = std::time::Instant::now();
        let before = self.master_status().await?;
        self.save_server_state(&desired.slots).await;
        self.install(&desired.rendered)?;
        let installed = started.elapsed();
        let result = self.reload_and_confirm(before.reloads).await;
        self.last_reload = Some(tokio::time::Instant::now());
        match result {
            Ok(reloads) => {
                info!(reloads, ?installed, took = ?started.elapsed(), "haproxy reloaded");
                self.applied = Some(desired);
                self.in_doubt = false;
                Ok(Outcome::Reloaded { reloads })
            }
            Err(err) => {
                if let Some(good) = &self.applied {
                    warn!(error = %err, "reload failed, restoring the last good files");
                    // The `.last-good` copies stay those of the good files, not the rejected.
                    self.write_files(None, &good.rendered, LastGood::Skip)?;
                }
                Err(err)
            }
        }
    }

    async fn reload_and_confirm(&self, before: u64) -> Result<u64, ApplyError> {
        let socket = &self.config.master_socket;
        let deadline = tokio::time::Instant::now() + self.config.reload_timeout;
        // The master refuses connections for a moment after a reload: retry until accepted.
        loop {
            match super::cli_command(socket, "reload").await {
                Ok(_) => break,
                Err(err) if err.is_refused() && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(POLL).await
                }
                Err(err) => return Err(ApplyError::Reload(err)),
            }
        }
        loop {
            match show_proc(socket).await {
                Ok(proc) if proc.reloads > before => {
                    if proc.failed > 0 {
                        return Err(ApplyError::ReloadFailed {
                            failed: proc.failed,
                        });
                    }
                    return Ok(proc.reloads);
                }
                Ok(_) => {}
                Err(err) => debug!(error = %err, "show proc during reload"),
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ApplyError::ReloadTimeout {
                    timeout: self.config.reload_timeout,
                    reloads: before,
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn master_status(&self) -> Result<super::process::ProcStatus, ApplyError> {
        let deadline = tokio::time::Instant::now() + self.config.reload_timeout;
        loop {
            match show_proc(&self.config.master_socket).await {
                Ok(proc) => return Ok(proc),
                Err(ProcessError::Cli(err))
                    if err.is_refused() && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(POLL).await
                }
                Err(err) => return Err(err.into()),
            }
        }
    }

    /// Dumps the running servers' state for the next worker, without the servers whose slot
    /// changes address (HAProxy would restore the old address over the new config's). A
    /// failure only costs the state.
    async fn save_server_state(&self, slots: &Slots) {
        match show_servers_state(&self.admin_socket(), None).await {
            Ok(state) if state.starts_with('1') => {
                let kept = filter_server_state(&state, slots);
                if let Err(err) = write_atomic(&self.server_state_path(), &kept) {
                    warn!(error = %err, "cannot save server state");
                }
            }
            Ok(other) => warn!(answer = %other.trim(), "unexpected server state answer"),
            Err(err) => warn!(error = %err, "cannot read server state"),
        }
    }

    /// Resolves when a managed HAProxy exits; never in external mode or before the start.
    pub async fn exited(&mut self) -> std::io::Result<std::process::ExitStatus> {
        match self.process.as_mut() {
            Some(process) => process.wait().await,
            None => std::future::pending().await,
        }
    }

    /// Forgets the process after it exited, so that the next apply starts it.
    pub fn mark_exited(&mut self) {
        self.process = None;
    }

    /// Stops a managed HAProxy gracefully; leaves an external one as configured.
    pub async fn stop(&mut self) {
        if let Some(process) = self.process.take() {
            process
                .stop(self.config.hard_stop_after + Duration::from_secs(5))
                .await;
        }
    }
}

/// `haproxy -c -f <file>`, stderr kept (never `-q`: it hides the ALERTs too).
pub async fn check_config(
    binary: &Path,
    config: &Path,
) -> Result<std::process::Output, ApplyError> {
    Command::new(binary)
        .arg("-c")
        .arg("-f")
        .arg(config)
        .output()
        .await
        .map_err(|source| ApplyError::RunCheck {
            binary: binary.to_path_buf(),
            source,
        })
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
        .filter(|b| b.starts_with(crate::model::BACKEND_PREFIX))
}

/// Whether installing keeps the previous files as `.last-good`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LastGood {
    Keep,
    /// Runtime changes: the copies stay those of the last reload.
    Skip,
}

fn last_good_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".last-good");
    path.with_file_name(name)
}

fn create_dir(dir: &Path) -> Result<(), ApplyError> {
    std::fs::create_dir_all(dir).map_err(|source| ApplyError::WriteFile {
        path: dir.to_path_buf(),
        source,
    })
}

/// Writes to a temporary file beside `path` and renames it over: readers see the old file or
/// the new one, never half of one.
pub fn write_atomic(path: &Path, content: &str) -> Result<(), ApplyError> {
    let err = |source| ApplyError::WriteFile {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(err)?;
    std::io::Write::write_all(&mut tmp, content.as_bytes()).map_err(err)?;
    tmp.as_file().sync_all().map_err(err)?;
    tmp.persist(path).map_err(|e| err(e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
