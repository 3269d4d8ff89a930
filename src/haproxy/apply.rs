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
//! One apply runs at a time (the caller owns the `Applier`). Which way a change goes is
//! decided by [`super::decision`]; this module carries it out.

use std::path::PathBuf;
use std::time::Duration;

use tracing::{info, warn};

use super::decision::{decide, refresh, Decision, Refresh, Situation};
use super::files::STAGING_DIR;
use super::files::{create_dir, last_good_path, stage, write_atomic, WriteError, PID_FILE};
use super::plan::{runtime_part, runtime_plan, Applied};
use super::process::{self, Gone, Launch, Managed, ProcessError};
use super::runtime::{self, RuntimeError};
use super::validate::{validate, ValidateError};
use crate::config::{HaproxyConfig, HaproxyMode};
use crate::model::RoutingTable;
use crate::render::{
    render_with, RenderSettings, Rendered, ADMIN_SOCKET, CONFIG_FILE, EMPTY_SERVER_STATE,
    SERVER_STATE_FILE,
};
use crate::slots::Slots;

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("rendering the config failed: {0}")]
    Render(#[from] askama::Error),
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error(transparent)]
    Validate(#[from] ValidateError),
    #[error(transparent)]
    Process(#[from] ProcessError),
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
pub type Validation =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), ApplyError>> + Send>>;

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
    /// What HAProxy runs now: the last good state.
    applied: Option<Applied>,
    process: Option<Managed>,
    /// External mode: whether the master answered when last asked, and when it is asked next.
    external_up: bool,
    liveness: process::Liveness,
    generation: u64,
    last_reload: Option<tokio::time::Instant>,
    /// A runtime update failed part way: HAProxy may run something between `applied` and
    /// what was sent. Only a reload brings it back to a known state.
    in_doubt: bool,
}

impl Applier {
    pub fn new(config: HaproxyConfig) -> Self {
        let live = RenderSettings::new(&config, &config.run_dir);
        Applier {
            config,
            live,
            applied: None,
            process: None,
            external_up: true,
            liveness: process::Liveness::default(),
            generation: 0,
            last_reload: None,
            in_doubt: false,
        }
    }

    /// Whether HAProxy runs: a managed one that weft started and has not exited, an external
    /// one whose master answered when last asked.
    pub fn running(&self) -> bool {
        match self.config.mode {
            HaproxyMode::Managed => self.process.is_some(),
            HaproxyMode::External => self.external_up,
        }
    }

    /// What runs, when it is known: not after HAProxy died, not in doubt.
    fn known(&self) -> Option<&Applied> {
        self.applied
            .as_ref()
            .filter(|_| self.running() && !self.in_doubt)
    }

    /// Brings HAProxy to `table`: through the runtime API where the config's structure stays,
    /// else (and to start a managed HAProxy) validate, install, reload or start, confirm.
    #[tracing::instrument(name = "apply", skip_all, fields(generation = self.generation + 1))]
    pub async fn apply(&mut self, table: &RoutingTable) -> Result<Step, ApplyError> {
        self.generation += 1;
        let desired = self.desired(table)?;
        let situation = Situation {
            applied: self.applied.as_ref().filter(|_| self.running()),
            in_doubt: self.in_doubt,
            runtime_updates: self.config.runtime_updates,
            next_reload: self
                .last_reload
                .map(|at| at + self.config.min_reload_interval),
        };
        let decision = decide(&situation, &desired, tokio::time::Instant::now());
        let applied = situation.applied.cloned();
        match (decision, applied) {
            (Decision::Unchanged, _) => Ok(Step::Done(Outcome::Unchanged)),
            (Decision::Runtime, Some(applied)) => match self.runtime(&applied, &desired).await {
                Ok(updates) => {
                    self.applied = Some(desired);
                    Ok(Step::Done(Outcome::Runtime { updates }))
                }
                Err(err) => {
                    warn!(error = %err, "runtime update failed, reloading instead");
                    self.in_doubt = true;
                    Ok(Step::Reload(Candidate { desired }))
                }
            },
            (
                Decision::Reload {
                    runtime_part,
                    deferred_until,
                },
                Some(applied),
            ) => {
                // Server changes do not wait for the reload.
                let updates = if runtime_part {
                    self.apply_runtime_part(&applied, table).await
                } else {
                    0
                };
                match deferred_until {
                    Some(until) => Ok(Step::Done(Outcome::Deferred { updates, until })),
                    // The slots start from what runs now, the runtime part included.
                    None => Ok(Step::Reload(Candidate {
                        desired: self.desired(table)?,
                    })),
                }
            }
            _ => Ok(Step::Reload(Candidate { desired })),
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
        let dir = self.config.run_dir.join(STAGING_DIR);
        // Only the maps are read from the staging directory: the rest is as it will run.
        let settings = RenderSettings {
            map_dir: dir.clone(),
            ..self.live.clone()
        };
        let staged = render_with(
            &candidate.desired.table,
            &candidate.desired.slots,
            &settings,
        )?;
        stage(&dir, &staged)?;
        let binary = self.config.binary.clone();
        Ok(Box::pin(async move {
            let path = dir.join(CONFIG_FILE);
            Ok(validate(&binary, &path, &staged.config).await?)
        }))
    }

    /// After a validation: the candidate to reload, brought up to `table` when the routing
    /// moved on meanwhile, if it kept the validated structure.
    pub fn refresh(
        &self,
        candidate: Candidate,
        table: &RoutingTable,
    ) -> Result<Refreshed, ApplyError> {
        if candidate.desired.table == *table {
            return Ok(Refreshed::Reload(candidate));
        }
        let latest = self.desired(table)?;
        Ok(match refresh(&candidate.desired, &latest, self.known()) {
            Refresh::Candidate => Refreshed::Reload(candidate),
            Refresh::Latest => Refreshed::Reload(Candidate { desired: latest }),
            Refresh::Revalidate => Refreshed::Revalidate,
            Refresh::NotNeeded => Refreshed::NotNeeded,
        })
    }

    /// Starts a managed HAProxy that does not run on the last good files (validated when they
    /// were installed): for when the desired config is rejected and nothing serves.
    pub async fn start_last_good(&mut self) -> Result<Option<Outcome>, ApplyError> {
        if self.config.mode == HaproxyMode::External || self.running() {
            return Ok(None);
        }
        let Some(good) = self.applied.clone() else {
            return Ok(None);
        };
        self.start(&good.rendered, LastGood::Skip).await?;
        Ok(Some(Outcome::Started))
    }

    /// Reloads HAProxy on a validated candidate and confirms it; starts a managed HAProxy
    /// that does not run (yet) on it instead. An external HAProxy is only ever reloaded.
    #[tracing::instrument(name = "reload", skip_all, fields(generation = self.generation))]
    pub async fn commit(&mut self, candidate: Candidate) -> Result<Outcome, ApplyError> {
        if self.config.mode == HaproxyMode::External || self.running() {
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
        runtime::execute(&self.admin_socket(), &self.config.run_dir, &plan).await?;
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

    /// Writes the files HAProxy reads that differ from `previous` (all of them without one);
    /// with `LastGood::Keep`, the version each replaces is kept as `.last-good`.
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
            let path = match name {
                CONFIG_FILE => self.config.config_file.clone(),
                _ => self.config.run_dir.join(name),
            };
            if last_good == LastGood::Keep && path.exists() {
                let _ = std::fs::copy(&path, last_good_path(&path));
            }
            write_atomic(&path, content)?;
        }
        Ok(())
    }

    /// Starts a managed HAProxy on `rendered` (written first), with no server state: a state
    /// file from an earlier run describes servers this config may not have.
    async fn start(&mut self, rendered: &Rendered, last_good: LastGood) -> Result<(), ApplyError> {
        write_atomic(&self.server_state_path(), EMPTY_SERVER_STATE)?;
        self.write_files(None, rendered, last_good)?;
        let launch = Launch {
            binary: self.config.binary.clone(),
            master_socket: self.config.master_socket.clone(),
            config_file: self.config.config_file.clone(),
            pid_file: self.config.run_dir.join(PID_FILE),
        };
        self.process = Some(Managed::start(&launch).await?);
        self.in_doubt = false;
        Ok(())
    }

    async fn reload(&mut self, desired: Applied) -> Result<Outcome, ApplyError> {
        let started = std::time::Instant::now();
        let (socket, timeout) = (&self.config.master_socket, self.config.reload_timeout);
        let before = process::master_status(socket, timeout)
            .await
            .inspect_err(|_| {
                // An external master that does not answer is not running, whatever was last seen.
                self.external_up &= self.config.mode == HaproxyMode::Managed;
            })?;
        let state = self.server_state_path();
        runtime::save_server_state(&self.admin_socket(), &state, &desired.slots).await;
        self.write_files(None, &desired.rendered, LastGood::Keep)?;
        let installed = started.elapsed();
        let result = process::reload(socket, before.reloads, timeout).await;
        self.last_reload = Some(tokio::time::Instant::now());
        match result {
            Ok(reloads) => {
                info!(reloads, ?installed, took = ?started.elapsed(), "haproxy reloaded");
                self.applied = Some(desired);
                self.in_doubt = false;
                self.external_up = true;
                Ok(Outcome::Reloaded { reloads })
            }
            Err(err) => {
                if let Some(good) = &self.applied {
                    warn!(error = %err, "reload failed, restoring the last good files");
                    // The `.last-good` copies stay those of the good files, not the rejected.
                    self.write_files(None, &good.rendered, LastGood::Skip)?;
                }
                Err(err.into())
            }
        }
    }

    /// Resolves when HAProxy stops running: a managed master exits, or an external one stops
    /// answering `show proc`. Never while nothing runs.
    pub async fn gone(&mut self) -> Gone {
        match (&mut self.process, self.config.mode) {
            (Some(process), _) => Gone::Exited(process.wait().await),
            (None, HaproxyMode::External) if self.external_up => {
                Gone::Silent(self.liveness.until_silent(&self.config.master_socket).await)
            }
            _ => std::future::pending().await,
        }
    }

    /// Forgets the process after it is gone: the next apply starts a managed one, and
    /// reloads an external one (its files are weft's last good ones) once it answers again.
    pub fn mark_gone(&mut self) {
        self.process = None;
        self.external_up = false;
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

/// Whether installing keeps the previous files as `.last-good`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LastGood {
    Keep,
    /// Runtime changes: the copies stay those of the last reload.
    Skip,
}
