//! The claims ledger, kept: loaded, recorded as the model asks, released (or handed to the
//! holder's team) after its holder has been gone for `routing.release_after`.
//!
//! ```text
//! build ──ClaimIntents──> keeper ──create only if absent / check-and-set at the version seen──> store
//!   ^                        │ gone holders: timed here from when this edge last saw them
//!   └────────Ledger──────────┘ <──────── what the store holds (Consul KV, or a local file) ──┘
//! ```
//!
//! The store decides every race: an entry is created only where none exists and replaced or
//! deleted only at the version the model saw, so edges that claim at once all keep the one the
//! store took. A claim this edge routes but could not record yet stays in its ledger as
//! unrecorded, so that a store that fails never hands the host to whatever claims it next.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::escape::{clip, Escaped};
use crate::haproxy::files::write_atomic;
use crate::model::ownership::{Absent, Holder, Holding, Record};
use crate::model::{ClaimIntents, Hostname, Ledger, ServiceName, SourceId, MAX_DROPPED_REASON};
use crate::sources::consul::kv::{KvEntry, KvFolder};
use crate::sources::consul::ConsulError;
use crate::sources::read_own_file;
use crate::sources::START_GRACE;

/// The local ledger's file name in `run_dir`.
pub const LOCAL_LEDGER: &str = "claims.json";
/// The local ledger's largest size: one entry per routed host, about 200 bytes each (10,000
/// services of 64 hosts each would be some 130 MB).
pub const MAX_LOCAL_LEDGER: u64 = 256 << 20;
/// How often release timers are looked at, and failed writes retried.
const TICK: Duration = Duration::from_secs(1);
/// How long a write that failed waits before it is tried again.
const RETRY_WRITES: Duration = Duration::from_secs(5);

/// One entry as it is stored: `{"source":"consul","service":"shop","team":"@consul:shop"}`.
/// Unknown fields are ignored, so a newer weft's entries still read.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoredHolding {
    pub source: String,
    pub service: String,
    pub team: String,
    /// The local ledger's own version of the entry (Consul keeps its ModifyIndex instead).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub version: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl StoredHolding {
    pub fn of(record: &Record) -> StoredHolding {
        StoredHolding {
            source: record.holder.source.to_string(),
            service: record.holder.service.as_str().to_string(),
            team: record.team.key(),
            version: 0,
        }
    }

    /// Back into the model's form; `Err` for an entry weft did not write.
    pub fn holding(&self, version: u64) -> Result<Holding, String> {
        let source = SourceId::parse(&self.source)
            .ok_or_else(|| format!("unknown source {:?}", self.source))?;
        let service = ServiceName::parse(&self.service)
            .map_err(|reason| format!("service {:?} {reason}", self.service))?;
        Ok(Holding {
            holder: Holder { source, service },
            team: self.team.clone(),
            version,
            recorded: true,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClaimsError {
    #[error("cannot read the claims ledger {path}: {reason}; it records who holds each host: repair it, or remove it to let every host be claimed afresh")]
    Local { path: PathBuf, reason: String },
}

/// A write the store could not make: said once in the log and on the status page.
#[derive(Debug)]
struct WriteFailed(String);

/// The local ledger: one JSON file, this edge's alone.
pub struct LocalStore {
    path: PathBuf,
    entries: BTreeMap<Hostname, StoredHolding>,
    next_version: u64,
}

impl LocalStore {
    pub fn open(run_dir: &Path) -> Result<LocalStore, ClaimsError> {
        let path = run_dir.join(LOCAL_LEDGER);
        let failed = |reason: String| ClaimsError::Local {
            path: path.clone(),
            reason,
        };
        let raw: BTreeMap<String, StoredHolding> = match read_own_file(&path, MAX_LOCAL_LEDGER) {
            Ok(text) => serde_json::from_slice(&text).map_err(|e| failed(e.to_string()))?,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(err) => return Err(failed(err.to_string())),
        };
        let mut entries = BTreeMap::new();
        for (host, stored) in raw {
            let host = Hostname::parse(&host).map_err(|r| failed(format!("host {host:?} {r}")))?;
            stored
                .holding(stored.version)
                .map_err(|r| failed(format!("host {host}: {r}")))?;
            entries.insert(host, stored);
        }
        let next_version = entries.values().map(|e| e.version).max().unwrap_or(0) + 1;
        Ok(LocalStore {
            path,
            entries,
            next_version,
        })
    }

    pub fn ledger(&self) -> Ledger {
        Ledger {
            hosts: self
                .entries
                .iter()
                .filter_map(|(h, s)| Some((h.clone(), s.holding(s.version).ok()?)))
                .collect(),
            ..Ledger::default()
        }
    }

    /// Writes `record` if the entry's version is `cas` (0: only if there is none); whether it
    /// was written.
    fn put(&mut self, record: &Record, cas: u64) -> bool {
        let current = self.entries.get(&record.host).map_or(0, |e| e.version);
        if current != cas {
            return false;
        }
        let mut stored = StoredHolding::of(record);
        stored.version = self.next_version;
        self.next_version += 1;
        self.entries.insert(record.host.clone(), stored);
        true
    }

    fn delete(&mut self, host: &Hostname, cas: u64) -> bool {
        if self.entries.get(host).map(|e| e.version) != Some(cas) {
            return false;
        }
        self.entries.remove(host);
        true
    }

    fn save(&self) -> Result<(), WriteFailed> {
        let raw: BTreeMap<&str, &StoredHolding> =
            self.entries.iter().map(|(h, s)| (h.as_str(), s)).collect();
        let text = serde_json::to_string_pretty(&raw).map_err(|e| WriteFailed(e.to_string()))?;
        // Kept in memory when it fails: this weft still routes by it; a restart would lose
        // the newest entries.
        write_atomic(&self.path, &text).map_err(|e| WriteFailed(e.to_string()))
    }
}

/// A host's key in the Consul folder: its labels reversed, one per segment
/// (`shop.example.com` -> `com/example/shop`, `*.shop.example.com` -> `com/example/shop/*`).
/// No key then ends in something like a file extension, which Consul 1.21.5+ may refuse, and
/// an operator finds a domain's hosts together (`consul kv get -recurse weft/claims/com/example`).
pub fn kv_key(host: &Hostname) -> String {
    host.as_str().rsplit('.').collect::<Vec<_>>().join("/")
}

/// The host of a key written by [`kv_key`].
fn host_of_key(key: &str) -> Result<Hostname, String> {
    let host = key.rsplit('/').collect::<Vec<_>>().join(".");
    Hostname::parse(&host).map_err(|r| format!("key {key:?} is not a host: {r}"))
}

/// The Consul folder's entries, as the model reads them; entries weft did not write are
/// skipped (and named once: `skipped` remembers those of this listing, and forgets a key once
/// it is gone, so it never holds more than the folder does).
fn hosts_of(
    entries: Vec<KvEntry>,
    skipped: &mut BTreeMap<String, u64>,
) -> BTreeMap<Hostname, Holding> {
    let mut hosts = BTreeMap::new();
    let before = std::mem::take(skipped);
    for entry in entries {
        let parsed = host_of_key(&entry.key).and_then(|host| {
            let stored: StoredHolding = serde_json::from_slice(&entry.value)
                .map_err(|e| format!("key {:?}: {e}", entry.key))?;
            Ok((host, stored.holding(entry.modify_index)?))
        });
        match parsed {
            Ok((host, holding)) => {
                hosts.insert(host, holding);
            }
            Err(reason) => {
                if before.get(&entry.key) != Some(&entry.modify_index) {
                    warn!(
                        reason = %Escaped(clip(&reason, MAX_DROPPED_REASON)),
                        "claims ledger: an entry weft cannot read is skipped"
                    );
                }
                skipped.insert(entry.key, entry.modify_index);
            }
        }
    }
    hosts
}

/// What the Consul folder's watch has seen last.
enum KvView {
    Waiting,
    Entries(Vec<KvEntry>),
    Failing(String),
}

/// The store behind the keeper.
pub enum Store {
    Local(LocalStore),
    Consul(ConsulStore),
}

/// The Consul folder, and what this edge knows of it.
pub struct ConsulStore {
    folder: KvFolder,
    /// The folder as last read; `None` before the first answer.
    hosts: Option<BTreeMap<Hostname, Holding>>,
    /// Claims this edge routes by but that the folder does not show yet.
    pending: BTreeMap<Hostname, Holding>,
    skipped: BTreeMap<String, u64>,
    /// A read that fails now.
    read_trouble: Option<String>,
}

impl ConsulStore {
    pub fn new(folder: KvFolder) -> ConsulStore {
        ConsulStore {
            folder,
            hosts: None,
            pending: BTreeMap::new(),
            skipped: BTreeMap::new(),
            read_trouble: None,
        }
    }
}

impl Store {
    /// What the model settles by now; `None` while a Consul folder has not answered and the
    /// start grace has not passed.
    fn ledger(&self, grace_over: bool, write_trouble: &Option<String>) -> Option<Ledger> {
        match self {
            Store::Local(store) => Some(Ledger {
                trouble: write_trouble.clone(),
                ..store.ledger()
            }),
            Store::Consul(store) => {
                let trouble = store.read_trouble.clone().or(write_trouble.clone());
                let Some(hosts) = &store.hosts else {
                    return grace_over.then(|| Ledger::unread(trouble));
                };
                let mut hosts = hosts.clone();
                for (host, holding) in &store.pending {
                    hosts.entry(host.clone()).or_insert_with(|| holding.clone());
                }
                Some(Ledger {
                    hosts,
                    unread: false,
                    trouble,
                })
            }
        }
    }

    /// Creates the entries of first claims; stops at the first write that fails.
    async fn record(&mut self, records: &[Record]) -> Result<bool, WriteFailed> {
        match self {
            Store::Local(store) => {
                let mut changed = false;
                for record in records {
                    if store.put(record, 0) {
                        info!(host = %record.host, holder = %record.holder, team = %record.team, "host claimed");
                        changed = true;
                    }
                }
                if changed {
                    store.save()?;
                }
                Ok(changed)
            }
            Store::Consul(store) => {
                // A pending claim whose holder the model no longer asks for is forgotten.
                let before = store.pending.len();
                store
                    .pending
                    .retain(|host, _| records.iter().any(|r| r.host == *host));
                let mut changed = store.pending.len() != before;
                for record in records {
                    if store
                        .hosts
                        .as_ref()
                        .is_some_and(|h| h.contains_key(&record.host))
                    {
                        continue;
                    }
                    let unrecorded = Holding {
                        holder: record.holder.clone(),
                        team: record.team.key(),
                        version: 0,
                        recorded: false,
                    };
                    match put(&store.folder, record, 0).await {
                        Ok(true) => {
                            info!(host = %record.host, holder = %record.holder, team = %record.team, "host claimed");
                            // Until the folder's next answer shows it.
                            let recorded = Holding {
                                recorded: true,
                                ..unrecorded
                            };
                            store.pending.insert(record.host.clone(), recorded);
                            changed = true;
                        }
                        // Another edge recorded it first: its entry comes with the next read.
                        Ok(false) => changed |= store.pending.remove(&record.host).is_some(),
                        Err(err) => {
                            store.pending.insert(record.host.clone(), unrecorded);
                            return Err(WriteFailed(format!(
                                "cannot record a claim on {}: {err}",
                                record.host
                            )));
                        }
                    }
                }
                Ok(changed)
            }
        }
    }

    /// Releases `absent`'s entry, or hands it to its heir, at the version seen.
    async fn release(&mut self, absent: &Absent) -> Result<bool, WriteFailed> {
        let failed = |err: ConsulError| {
            WriteFailed(format!(
                "cannot release the claim on {}: {err}",
                absent.host
            ))
        };
        let done = match (self, &absent.heir) {
            (Store::Local(store), Some(heir)) => store.put(heir, absent.version),
            (Store::Local(store), None) => store.delete(&absent.host, absent.version),
            (Store::Consul(store), Some(heir)) => put(&store.folder, heir, absent.version)
                .await
                .map_err(failed)?,
            (Store::Consul(store), None) => store
                .folder
                .delete(&kv_key(&absent.host), absent.version)
                .await
                .map_err(failed)?,
        };
        Ok(done)
    }

    fn save(&self) -> Result<(), WriteFailed> {
        match self {
            Store::Local(store) => store.save(),
            Store::Consul(_) => Ok(()),
        }
    }
}

async fn put(folder: &KvFolder, record: &Record, cas: u64) -> Result<bool, ConsulError> {
    let value = serde_json::to_vec(&StoredHolding::of(record)).unwrap_or_default();
    folder.put(&kv_key(&record.host), value, cas).await
}

/// When each host's holder was first seen gone, by this edge.
#[derive(Default)]
struct Absences {
    since: BTreeMap<Hostname, Instant>,
}

impl Absences {
    /// Starts a timer for each newly absent host, drops those whose holder is back.
    fn update(&mut self, absent: &[Absent], now: Instant) {
        self.since
            .retain(|host, _| absent.iter().any(|a| a.host == *host));
        for a in absent {
            self.since.entry(a.host.clone()).or_insert(now);
        }
    }

    /// The hosts absent for `after` or longer.
    fn due(&self, after: Duration, now: Instant) -> Vec<Hostname> {
        self.since
            .iter()
            .filter(|(_, since)| now.duration_since(**since) >= after)
            .map(|(host, _)| host.clone())
            .collect()
    }
}

/// Keeps the ledger until `shutdown`: publishes what the store holds, records what the model
/// asks, releases what has been gone for `release_after`.
pub async fn keep(
    mut store: Store,
    release_after: Duration,
    mut intents: watch::Receiver<ClaimIntents>,
    ledger: watch::Sender<Option<Ledger>>,
    shutdown: CancellationToken,
) {
    let (view_tx, mut view_rx) = watch::channel(KvView::Waiting);
    if let Store::Consul(consul) = &store {
        let mut kv_watch = consul.folder.watch();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            while let Some(entries) = kv_watch
                .next(&shutdown, |err, _| {
                    view_tx.send_replace(KvView::Failing(err.to_string()));
                })
                .await
            {
                view_tx.send_replace(KvView::Entries(entries));
            }
        });
    }
    let started = Instant::now();
    let mut absences = Absences::default();
    let mut tick = tokio::time::interval(TICK);
    let mut write_trouble: Option<String> = None;
    let mut last_failure: Option<Instant> = None;
    let mut said: Option<String> = None;
    let mut grace_was = false;
    // A local ledger is read already; a Consul folder publishes once it answers.
    ledger.send_replace(store.ledger(false, &None));
    loop {
        let mut write = false;
        let mut store_read = false;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = intents.changed() => {
                if changed.is_err() {
                    // The build loop ended: whatever ended it says why; this waits for the
                    // shutdown that follows, so that it is never taken for the cause.
                    shutdown.cancelled().await;
                    return;
                }
                write = true;
            }
            changed = view_rx.changed() => {
                if changed.is_err() {
                    shutdown.cancelled().await;
                    return;
                }
                store_read = true;
                if let Store::Consul(consul) = &mut store {
                    match &*view_rx.borrow_and_update() {
                        KvView::Waiting => {}
                        KvView::Entries(entries) => {
                            let hosts = hosts_of(entries.clone(), &mut consul.skipped);
                            consul.pending.retain(|host, _| !hosts.contains_key(host));
                            consul.hosts = Some(hosts);
                            consul.read_trouble = None;
                        }
                        KvView::Failing(err) => {
                            consul.read_trouble = Some(format!("cannot read consul: {err}"));
                        }
                    }
                }
            }
            _ = tick.tick() => {
                write = last_failure.is_some_and(|t| t.elapsed() >= RETRY_WRITES);
            }
        }
        let wanted = intents.borrow_and_update().clone();
        absences.update(&wanted.absent, Instant::now());
        let mut changed = false;
        if write {
            last_failure = None;
            let outcome = tokio::select! {
                _ = shutdown.cancelled() => return,
                outcome = store.record(&wanted.record) => outcome,
            };
            match outcome {
                Ok(recorded) => {
                    changed |= recorded;
                    write_trouble = None;
                }
                Err(WriteFailed(err)) => {
                    write_trouble = Some(err);
                    last_failure = Some(Instant::now());
                    changed = true;
                }
            }
        }
        for host in absences.due(release_after, Instant::now()) {
            let Some(absent) = wanted.absent.iter().find(|a| a.host == host) else {
                continue;
            };
            match store.release(absent).await {
                Ok(done) => {
                    if done {
                        let to = absent
                            .heir
                            .as_ref()
                            .map_or_else(|| "nobody".to_string(), |h| h.holder.to_string());
                        info!(host = %host, after = %humantime::format_duration(release_after), to, "host released: its holder claimed it no more");
                        changed = true;
                    }
                    absences.since.remove(&host);
                }
                Err(WriteFailed(err)) => {
                    write_trouble = Some(err);
                    changed = true;
                }
            }
        }
        if changed {
            if let Err(WriteFailed(err)) = store.save() {
                write_trouble = Some(format!("cannot save the claims ledger: {err}"));
            }
        }
        // Published only when something may have changed: the store, a write's outcome, the
        // start grace ending; not every tick (the ledger can hold every routed host).
        let grace_over = started.elapsed() >= START_GRACE;
        if !(changed || store_read || write || grace_over != grace_was) {
            continue;
        }
        grace_was = grace_over;
        let now = store.ledger(grace_over, &write_trouble);
        let trouble = now.as_ref().and_then(|l| l.trouble.clone());
        if trouble != said {
            match &trouble {
                Some(trouble) => {
                    warn!(%trouble, "claims ledger: hosts stay with the holders this edge knows; new claims are retried every 5 s")
                }
                None => info!("claims ledger: its store works again"),
            }
            said = trouble;
        }
        ledger.send_if_modified(|old| {
            if *old == now {
                return false;
            }
            *old = now;
            true
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ownership::TeamId;

    fn record(host: &str, name: &str) -> Record {
        let holder = Holder {
            source: SourceId::Consul,
            service: ServiceName::parse(name).unwrap(),
        };
        Record {
            host: Hostname::parse(host).unwrap(),
            team: TeamId::Alone(holder.clone()),
            holder,
        }
    }

    #[test]
    fn the_local_ledger_creates_once_replaces_at_its_version_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = LocalStore::open(dir.path()).unwrap();
        assert!(store.put(&record("a.example.com", "first"), 0));
        assert!(!store.put(&record("a.example.com", "second"), 0));
        let version = store.entries[&Hostname::parse("a.example.com").unwrap()].version;
        assert!(!store.put(&record("a.example.com", "stale"), version + 5));
        assert!(store.put(&record("a.example.com", "heir"), version));
        store.save().unwrap();
        let reopened = LocalStore::open(dir.path()).unwrap();
        assert_eq!(reopened.ledger(), store.ledger());
        let holding = &reopened.ledger().hosts[&Hostname::parse("a.example.com").unwrap()];
        assert_eq!(holding.holder.service.as_str(), "heir");
        assert!(reopened.next_version > holding.version);
        let mut reopened = reopened;
        assert!(!reopened.delete(&Hostname::parse("a.example.com").unwrap(), 1));
        assert!(reopened.delete(&Hostname::parse("a.example.com").unwrap(), holding.version));
    }

    #[test]
    fn kv_keys_reverse_the_labels_and_read_back() {
        for (host, key) in [
            ("shop.example.com", "com/example/shop"),
            ("*.shop.example.com", "com/example/shop/*"),
        ] {
            let host = Hostname::parse(host).unwrap();
            assert_eq!(kv_key(&host), key);
            assert_eq!(host_of_key(key).unwrap(), host);
        }
        assert!(host_of_key("com//shop").is_err());
    }

    #[test]
    fn entries_weft_did_not_write_are_skipped_and_newer_fields_ignored() {
        let entry = |key: &str, value: &str| KvEntry {
            key: key.into(),
            value: value.as_bytes().to_vec(),
            modify_index: 3,
            session: None,
        };
        let mut skipped = BTreeMap::new();
        let hosts = hosts_of(
            vec![
                entry(
                    "com/example/shop",
                    r#"{"source":"consul","service":"shop","team":"@consul:shop","since":"later"}"#,
                ),
                entry("com/example/junk", "not json"),
                entry(
                    "com/example/odd",
                    r#"{"source":"ldap","service":"x","team":"t"}"#,
                ),
            ],
            &mut skipped,
        );
        assert_eq!(hosts.len(), 1);
        assert_eq!(
            hosts[&Hostname::parse("shop.example.com").unwrap()].version,
            3
        );
        let names: Vec<&str> = skipped.keys().map(String::as_str).collect();
        assert_eq!(names, ["com/example/junk", "com/example/odd"]);
        // Deleted from the folder, forgotten: what is remembered never outgrows the folder.
        hosts_of(vec![entry("com/example/other", "x")], &mut skipped);
        let names: Vec<&str> = skipped.keys().map(String::as_str).collect();
        assert_eq!(names, ["com/example/other"]);
    }

    #[test]
    fn a_broken_ledger_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(LOCAL_LEDGER), "{ not json").unwrap();
        let err = LocalStore::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("claims.json"), "{err}");
        // Past its bound (a sparse file): refused, read no further than the bound.
        let file = std::fs::File::create(dir.path().join(LOCAL_LEDGER)).unwrap();
        file.set_len(MAX_LOCAL_LEDGER + 1).unwrap();
        let err = LocalStore::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("larger than 256 MiB"), "{err}");
        // A FIFO: refused, not waited on.
        std::fs::remove_file(dir.path().join(LOCAL_LEDGER)).unwrap();
        let path = dir.path().to_path_buf();
        let err = crate::sources::read_beside_a_fifo(&dir.path().join(LOCAL_LEDGER), move || {
            LocalStore::open(&path).err().map(|e| e.to_string())
        })
        .unwrap();
        assert!(err.contains("not a regular file"), "{err}");
    }

    #[test]
    fn absences_are_timed_from_first_sight_and_forgotten_on_return() {
        let mut absences = Absences::default();
        let host = Hostname::parse("a.example.com").unwrap();
        let absent = [Absent {
            host: host.clone(),
            version: 1,
            heir: None,
        }];
        let start = Instant::now();
        absences.update(&absent, start);
        absences.update(&absent, start + Duration::from_secs(5));
        assert!(absences
            .due(Duration::from_secs(10), start + Duration::from_secs(9))
            .is_empty());
        assert_eq!(
            absences.due(Duration::from_secs(10), start + Duration::from_secs(10)),
            std::slice::from_ref(&host)
        );
        absences.update(&[], start + Duration::from_secs(11));
        assert!(absences
            .due(Duration::ZERO, start + Duration::from_secs(12))
            .is_empty());
    }
}
