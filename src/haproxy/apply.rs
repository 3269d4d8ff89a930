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

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tracing::{error, info, warn};

use super::decision::{decide, refresh, Decision, Refresh, Situation};
use super::files::STAGING_DIR;
use super::files::{create_dir, last_good_path, prune_certs, stage, write_atomic, WriteError};
use super::plan::{runtime_part, runtime_plan, Applied};
use super::process::{self, Gone, Launch, Managed, ProcessError};
use super::runtime::{self, RuntimeError};
use super::validate::{validate, ValidateError};
use crate::config::{HaproxyConfig, HaproxyMode, OnExit};
use crate::model::{RoutingTable, ServiceName};
use crate::render::{
    render_with, rerender, RenderSettings, Rendered, ADMIN_SOCKET, CERTS_DIR, CONFIG_FILE,
    DEFAULT_CERT, EMPTY_SERVER_STATE, SERVER_STATE_FILE,
};
use crate::slots::{PoolUse, Slots};

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
    /// Boxed: a whole config, maps and certificates, moved through every step.
    desired: Box<Applied>,
}

impl Candidate {
    fn new(desired: Applied) -> Candidate {
        Candidate {
            desired: Box::new(desired),
        }
    }

    pub fn table(&self) -> &RoutingTable {
        &self.desired.table
    }

    /// The table, shared.
    pub fn shared_table(&self) -> Arc<RoutingTable> {
        Arc::clone(&self.desired.table)
    }

    /// The service the candidate's backend `backend` serves.
    pub fn service_of(&self, backend: &str) -> Option<&ServiceName> {
        self.desired.slots.service_of(backend)
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
        // Made once, kept in run_dir: every reload and restart serves the same one.
        let default_cert = match &config.tls {
            Some(_) => super::tls::default_certificate(&config.run_dir).unwrap_or_else(|err| {
                error!(error = %err, "HTTPS cannot start without a default certificate");
                String::new()
            }),
            None => String::new(),
        };
        let live = RenderSettings::new(&config, &config.run_dir, &default_cert);
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

    /// The HAProxy backend that serves each service, as last installed.
    pub fn serving(&self) -> Option<&BTreeMap<ServiceName, String>> {
        self.applied.as_ref().map(|a| &a.slots.serving)
    }

    /// How much of the backend pool the installed config uses.
    pub fn pool(&self) -> Option<PoolUse> {
        self.applied.as_ref().map(|a| a.slots.spares())
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

    /// Managed mode, before the first apply: takes over the HAProxy an earlier weft left
    /// serving on this run_dir, so that a restart of weft costs no request. What it runs is
    /// not known here: the first apply validates and reloads. Returns whether it adopted one.
    pub async fn adopt(&mut self) -> bool {
        if self.config.mode != HaproxyMode::Managed || self.process.is_some() {
            return false;
        }
        self.process = Managed::adopt(&self.launch()).await;
        self.process.is_some()
    }

    /// A managed HAProxy that died comes back at once on what it ran, from memory: no render,
    /// no `haproxy -c`, and no write where the files on disk already say it (so a full disk
    /// does not keep it down). Nothing happens when nothing ran before, or when it runs.
    /// Returns whether it started one.
    async fn restart_from_memory(&mut self) -> bool {
        if self.config.mode != HaproxyMode::Managed || self.process.is_some() {
            return false;
        }
        let Some(good) = self.applied.clone() else {
            return false;
        };
        let started = std::time::Instant::now();
        let result = async {
            self.restore_files(&good.rendered)?;
            // A state file describes servers as they were at the last reload, not now.
            let _ = std::fs::remove_file(self.server_state_path());
            self.process = Some(Managed::start(&self.launch()).await?);
            Ok::<(), ApplyError>(())
        }
        .await;
        match result {
            Ok(()) => {
                self.in_doubt = false;
                info!(took = ?started.elapsed(), "haproxy started again on the last good config");
                true
            }
            // The apply goes on without it: render, validate, start.
            Err(err) => {
                warn!(error = %err, "cannot start haproxy again on the last good config");
                false
            }
        }
    }

    /// Makes the installed files say `rendered`, writing only those that differ.
    fn restore_files(&self, rendered: &Rendered) -> Result<(), ApplyError> {
        for (name, content) in rendered.files() {
            let path = self.installed_path(&name);
            if std::fs::read(&path).is_ok_and(|on_disk| on_disk == content.as_bytes()) {
                continue;
            }
            write_atomic(&path, content)?;
        }
        prune_certs(&self.config.run_dir, rendered);
        Ok(())
    }

    /// Brings HAProxy to `table`: through the runtime API where the config's structure stays,
    /// else (and to start a managed HAProxy) validate, install, reload or start, confirm.
    #[tracing::instrument(name = "apply", skip_all, fields(generation = self.generation + 1))]
    pub async fn apply(&mut self, table: &Arc<RoutingTable>) -> Result<Step, ApplyError> {
        self.generation += 1;
        let restarted = self.restart_from_memory().await;
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
        // What runs, moved out while it is compared (never copied: at 10,000 services it is
        // megabytes); put back below unless replaced.
        let running = self.running();
        let applied = if running { self.applied.take() } else { None };
        let step = match (decision, &applied) {
            // A restart counts as one, so that quick repeated deaths back off.
            (Decision::Unchanged, _) if restarted => Ok(Step::Done(Outcome::Started)),
            (Decision::Unchanged, _) => Ok(Step::Done(Outcome::Unchanged)),
            (Decision::Runtime, Some(applied)) => match self.runtime(applied, &desired).await {
                Ok(updates) => {
                    self.applied = Some(desired);
                    Ok(Step::Done(Outcome::Runtime { updates }))
                }
                Err(err) => {
                    warn!(error = %err, "runtime update failed, reloading instead");
                    self.in_doubt = true;
                    Ok(Step::Reload(Candidate::new(desired)))
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
                    self.apply_runtime_part(applied, table).await
                } else {
                    0
                };
                match deferred_until {
                    Some(until) => Ok(Step::Done(Outcome::Deferred { updates, until })),
                    // The slots start from what runs now, the runtime part included.
                    None => {
                        // From what runs now: the runtime part, if it went out.
                        let runs = self.applied.as_ref().unwrap_or(applied);
                        self.packed(table, Some(&runs.slots), desired)
                            .map(|d| Step::Reload(Candidate::new(d)))
                    }
                }
            }
            (_, applied) => {
                let previous = self.applied.as_ref().or(applied.as_ref());
                self.packed(table, previous.map(|a| &a.slots), desired)
                    .map(|d| Step::Reload(Candidate::new(d)))
            }
        };
        if self.applied.is_none() {
            self.applied = applied;
        }
        step
    }

    /// For a reload: every service on a backend of its own, the pool full again (servers
    /// keep their slots where they stay on the same backend as in `previous`). `placed`, the
    /// same table as [`Self::desired`] gave it, is taken as it is when it is packed already
    /// (it is whenever the table did not fit what runs): a 10,000-service config is not
    /// rendered twice.
    fn packed(
        &self,
        table: &Arc<RoutingTable>,
        previous: Option<&Slots>,
        placed: Applied,
    ) -> Result<Applied, ApplyError> {
        let slots = Slots::pack(previous.unwrap_or(&Slots::default()), table, self.live.pool);
        if placed.slots == slots {
            return Ok(placed);
        }
        let rendered = rerender((&placed.slots, &placed.rendered), table, &slots, &self.live)?;
        Ok(Applied {
            table: Arc::clone(table),
            slots,
            rendered,
        })
    }

    /// Slots and files for `table`, slots assigned from what runs (and the sections of the
    /// backends that did not change copied from its files).
    fn desired(&self, table: &Arc<RoutingTable>) -> Result<Applied, ApplyError> {
        let (slots, rendered) = match &self.applied {
            Some(applied) => {
                let slots = Slots::assign(&applied.slots, table, self.live.pool);
                let previous = (&applied.slots, &applied.rendered);
                let rendered = rerender(previous, table, &slots, &self.live)?;
                (slots, rendered)
            }
            None => {
                let slots = Slots::assign(&Slots::default(), table, self.live.pool);
                let rendered = render_with(table, &slots, &self.live)?;
                (slots, rendered)
            }
        };
        Ok(Applied {
            table: Arc::clone(table),
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
        let desired = &candidate.desired;
        let staged = rerender(
            (&desired.slots, &desired.rendered),
            &desired.table,
            &desired.slots,
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
        table: &Arc<RoutingTable>,
    ) -> Result<Refreshed, ApplyError> {
        if candidate.desired.table == *table {
            return Ok(Refreshed::Reload(candidate));
        }
        // The routing went back to what runs: nothing to reload.
        let placed = self.desired(table)?;
        if self
            .known()
            .is_some_and(|known| placed.rendered == known.rendered)
        {
            return Ok(Refreshed::NotNeeded);
        }
        let previous = self.applied.as_ref().map(|a| &a.slots);
        let latest = self.packed(table, previous, placed)?;
        Ok(match refresh(&candidate.desired, &latest, self.known()) {
            Refresh::Candidate => Refreshed::Reload(candidate),
            Refresh::Latest => Refreshed::Reload(Candidate::new(latest)),
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
            return self.reload(*candidate.desired).await;
        }
        self.start(&candidate.desired.rendered, LastGood::Keep)
            .await?;
        self.applied = Some(*candidate.desired);
        Ok(Outcome::Started)
    }

    /// While a reload waits: the changes that fit the running config, at runtime.
    async fn apply_runtime_part(&mut self, applied: &Applied, table: &RoutingTable) -> usize {
        let part = runtime_part(applied, table);
        let slots = Slots::assign(&applied.slots, &part, self.live.pool);
        let previous = (&applied.slots, &applied.rendered);
        let Ok(rendered) = rerender(previous, &part, &slots, &self.live) else {
            return 0;
        };
        if rendered == applied.rendered {
            return 0;
        }
        let partial = Applied {
            table: Arc::new(part),
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

    /// Applies a same-structure change through the admin socket, confirms it, and writes the
    /// files, so that a reload at any later moment reproduces what runs.
    ///
    /// A managed HAProxy is changed first and its files right after: nothing but weft reloads
    /// it, and the change reaches traffic without waiting for the disk (a 10,000-service config
    /// is megabytes, each file synced). A weft that dies between the two leaves HAProxy ahead
    /// of its files; the next weft adopts it and reloads on its own files anyway. An external
    /// HAProxy gets its files first: its operator may reload it at any moment.
    async fn runtime(&self, applied: &Applied, desired: &Applied) -> Result<usize, ApplyError> {
        let plan = runtime_plan(applied, &desired.slots, &desired.rendered);
        let files_first = self.config.mode == HaproxyMode::External;
        if files_first {
            self.write_files(Some(&applied.rendered), &desired.rendered, LastGood::Skip)?;
        }
        runtime::execute(&self.admin_socket(), &self.config.run_dir, &plan).await?;
        if !files_first {
            self.write_files(Some(&applied.rendered), &desired.rendered, LastGood::Skip)?;
        }
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
    /// with `LastGood::Keep`, the version each replaces (as weft last installed it, from
    /// memory: never a copy of whatever the path holds now) is kept as `.last-good`.
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
        let before: BTreeMap<String, &str> = previous
            .map(|p| p.files().into_iter().collect())
            .unwrap_or_default();
        let good: BTreeMap<String, &str> = match last_good {
            LastGood::Keep => self
                .applied
                .as_ref()
                .map(|a| a.rendered.files().into_iter().collect())
                .unwrap_or_default(),
            LastGood::Skip => BTreeMap::new(),
        };
        for (name, content) in rendered.files() {
            if before.get(&name) == Some(&content) {
                continue;
            }
            let path = self.installed_path(&name);
            // No second copy of a private key: a failed reload restores from memory anyway.
            let keyless = !name.starts_with(CERTS_DIR) && name != DEFAULT_CERT;
            if let Some(good) = good.get(&name).filter(|_| keyless) {
                write_atomic(&last_good_path(&path), good)?;
            }
            write_atomic(&path, content)?;
        }
        prune_certs(&self.config.run_dir, rendered);
        Ok(())
    }

    /// Where an installed file of HAProxy's lives.
    fn installed_path(&self, name: &str) -> PathBuf {
        match name {
            CONFIG_FILE => self.config.config_file.clone(),
            _ => self.config.run_dir.join(name),
        }
    }

    fn launch(&self) -> Launch {
        Launch::new(&self.config)
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

    /// weft exits: a managed HAProxy keeps serving for the next weft, or stops gracefully,
    /// as `haproxy.on_exit` says (`handover`: it keeps serving regardless); an external one
    /// is left as configured.
    pub async fn stop(&mut self, handover: bool) {
        let Some(process) = self.process.take() else {
            return;
        };
        match self.config.on_exit {
            _ if handover => process.release(),
            OnExit::Keep => process.release(),
            OnExit::Stop => {
                process
                    .stop(self.config.hard_stop_after + Duration::from_secs(5))
                    .await
            }
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
