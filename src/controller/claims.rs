//! The claims ledger, kept: loaded, recorded as the model asks, released after its holder has
//! been gone for `routing.release_after`.
//!
//! ```text
//! build ──ClaimIntents──> keeper ──record (create only if absent / check-and-set)──> store
//!   ^                        │ absent holders: timed here, released after release_after
//!   └────────Ledger──────────┘ <──────── what the store holds (local file, Consul KV) ──┘
//! ```
//!
//! The store decides every race: a record is created only where none exists and replaced only
//! at the version the model saw, so two edges that claim at once keep the one the store took.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::haproxy::files::write_atomic;
use crate::model::ownership::{Holder, Holding, Record};
use crate::model::{ClaimIntents, Hostname, Ledger, ServiceName, SourceId};
use crate::sources::consul::kv::{KvEntry, KvFolder};

/// The local ledger's file name in `run_dir`.
pub const LOCAL_LEDGER: &str = "claims.json";
/// How often release timers are looked at.
const RELEASE_TICK: Duration = Duration::from_secs(1);

/// One entry as it is stored: `{"source":"consul","service":"shop","team":"@consul"}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
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
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClaimsError {
    #[error("cannot read the claims ledger {path}: {reason}; it records who holds each host: repair it, or remove it to let every host be claimed afresh")]
    Local { path: PathBuf, reason: String },
}

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
        let raw: BTreeMap<String, StoredHolding> = match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| failed(e.to_string()))?,
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
            unread: false,
        }
    }

    /// Records `record` unless another got there first; whether it was recorded.
    fn record(&mut self, record: &Record) -> bool {
        let current = self.entries.get(&record.host).map(|e| e.version);
        if current != record.replaces {
            return false;
        }
        let mut stored = StoredHolding::of(record);
        stored.version = self.next_version;
        self.next_version += 1;
        self.entries.insert(record.host.clone(), stored);
        true
    }

    fn release(&mut self, host: &Hostname, version: u64) -> bool {
        if self.entries.get(host).map(|e| e.version) != Some(version) {
            return false;
        }
        self.entries.remove(host);
        true
    }

    fn save(&self) {
        let raw: BTreeMap<&str, &StoredHolding> =
            self.entries.iter().map(|(h, s)| (h.as_str(), s)).collect();
        let text = match serde_json::to_string_pretty(&raw) {
            Ok(text) => text,
            Err(err) => {
                warn!(error = %err, "cannot encode the claims ledger");
                return;
            }
        };
        if let Err(err) = write_atomic(&self.path, &text) {
            // Kept in memory: this weft still routes by it; a restart would lose the newest.
            warn!(error = %err, "cannot save the claims ledger");
        }
    }
}

/// The timers of hosts whose holder claims them no more.
#[derive(Default)]
struct Absences {
    since: BTreeMap<Hostname, Instant>,
}

impl Absences {
    /// Starts a timer for each newly absent host, drops those whose holder is back.
    fn update(&mut self, absent: &[Hostname], now: Instant) {
        self.since.retain(|host, _| absent.contains(host));
        for host in absent {
            self.since.entry(host.clone()).or_insert(now);
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

/// Keeps the local ledger until `shutdown`: records what the model asks, releases what has
/// been absent long enough, publishes every change.
pub async fn keep_local(
    mut store: LocalStore,
    release_after: Duration,
    mut intents: watch::Receiver<ClaimIntents>,
    ledger: watch::Sender<Option<Ledger>>,
    shutdown: CancellationToken,
) {
    ledger.send_replace(Some(store.ledger()));
    let mut absences = Absences::default();
    let mut tick = tokio::time::interval(RELEASE_TICK);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = intents.changed() => {
                if changed.is_err() {
                    return;
                }
                let wanted = intents.borrow_and_update().clone();
                absences.update(&wanted.absent, Instant::now());
                let mut changed = false;
                for record in &wanted.record {
                    if store.record(record) {
                        info!(host = %record.host, holder = %record.holder, team = %record.team, "host claimed");
                        changed = true;
                    }
                }
                if changed {
                    store.save();
                    ledger.send_replace(Some(store.ledger()));
                }
            }
            _ = tick.tick() => {
                let due = absences.due(release_after, Instant::now());
                let mut changed = false;
                for host in due {
                    let Some(version) = store.entries.get(&host).map(|e| e.version) else {
                        continue;
                    };
                    if store.release(&host, version) {
                        info!(host = %host, after = %humantime::format_duration(release_after), "host released: its holder claimed it no more");
                        absences.since.remove(&host);
                        changed = true;
                    }
                }
                if changed {
                    store.save();
                    ledger.send_replace(Some(store.ledger()));
                }
            }
        }
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

/// How long a record that did not reach Consul waits before it is tried again.
const RETRY_RECORDS: Duration = Duration::from_secs(5);

/// The Consul ledger's entries, as the model reads them; entries weft did not write are
/// skipped (and named once).
fn ledger_of(entries: Vec<KvEntry>, skipped: &mut BTreeMap<String, u64>) -> Ledger {
    let mut hosts = BTreeMap::new();
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
                if skipped.insert(entry.key.clone(), entry.modify_index) != Some(entry.modify_index)
                {
                    warn!(%reason, "claims ledger: an entry weft cannot read is skipped");
                }
            }
        }
    }
    Ledger {
        hosts,
        unread: false,
    }
}

/// Keeps the ledger in a Consul KV folder until `shutdown`: watches it (every edge's records),
/// records what the model asks with check-and-set, releases what has been absent long enough.
pub async fn keep_consul(
    folder: KvFolder,
    release_after: Duration,
    mut intents: watch::Receiver<ClaimIntents>,
    ledger: watch::Sender<Option<Ledger>>,
    shutdown: CancellationToken,
) {
    let mut kv_watch = folder.watch();
    let watcher = {
        let ledger = ledger.clone();
        let shutdown = shutdown.clone();
        async move {
            let mut skipped = BTreeMap::new();
            let mut failing = false;
            loop {
                let next = kv_watch
                    .next(&shutdown, |err, delay| {
                        if !std::mem::replace(&mut failing, true) {
                            warn!(error = %err, retry_in = ?delay, "claims ledger: cannot read consul; routing by the last ledger read");
                        }
                    })
                    .await;
                let Some(entries) = next else { return };
                if std::mem::replace(&mut failing, false) {
                    info!("claims ledger: read from consul again");
                }
                ledger.send_replace(Some(ledger_of(entries, &mut skipped)));
            }
        }
    };
    tokio::pin!(watcher);
    // A Consul that does not answer at start must not hold back every route: after the
    // sources' start grace, the uncontested hosts route without the ledger.
    let stand_in = ledger.clone();
    crate::sources::after_start_grace(shutdown.clone(), move || {
        stand_in.send_if_modified(|now| {
            if now.is_some() {
                return false;
            }
            warn!(after = ?crate::sources::START_GRACE, "claims ledger: consul has not answered; hosts claimed by one team alone route meanwhile, contested ones wait");
            *now = Some(Ledger::unread());
            true
        });
    });
    let mut absences = Absences::default();
    let mut tick = tokio::time::interval(RELEASE_TICK);
    let mut last_try: Option<Instant> = None;
    loop {
        let retry = tokio::select! {
            _ = shutdown.cancelled() => return,
            () = &mut watcher => return,
            changed = intents.changed() => {
                if changed.is_err() {
                    return;
                }
                true
            }
            _ = tick.tick() => last_try.is_some_and(|t| t.elapsed() >= RETRY_RECORDS),
        };
        let wanted = intents.borrow_and_update().clone();
        absences.update(&wanted.absent, Instant::now());
        if retry && !wanted.record.is_empty() {
            last_try = None;
            for record in &wanted.record {
                let value = match serde_json::to_vec(&StoredHolding::of(record)) {
                    Ok(value) => value,
                    Err(_) => continue,
                };
                let put = folder
                    .put(&kv_key(&record.host), value, record.replaces.unwrap_or(0))
                    .await;
                match put {
                    Ok(true) => {
                        info!(host = %record.host, holder = %record.holder, team = %record.team, "host claimed")
                    }
                    // Another edge recorded it first: its record comes with the next read.
                    Ok(false) => {}
                    Err(err) => {
                        warn!(host = %record.host, error = %err, "claims ledger: cannot record a claim; tried again in 5 s");
                        last_try = Some(Instant::now());
                        break;
                    }
                }
            }
        }
        let due = absences.due(release_after, Instant::now());
        let versions: Vec<(Hostname, u64)> = {
            let current = ledger.borrow();
            due.into_iter()
                .filter_map(|host| {
                    let version = current.as_ref()?.hosts.get(&host)?.version;
                    Some((host, version))
                })
                .collect()
        };
        for (host, version) in versions {
            match folder.delete(&kv_key(&host), version).await {
                Ok(released) => {
                    if released {
                        info!(host = %host, after = %humantime::format_duration(release_after), "host released: its holder claimed it no more");
                    }
                    absences.since.remove(&host);
                }
                Err(err) => {
                    warn!(host = %host, error = %err, "claims ledger: cannot release a host")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ownership::TeamId;

    fn record(host: &str, name: &str, replaces: Option<u64>) -> Record {
        Record {
            host: Hostname::parse(host).unwrap(),
            holder: Holder {
                source: SourceId::Consul,
                service: ServiceName::parse(name).unwrap(),
            },
            team: TeamId::Source(SourceId::Consul),
            replaces,
        }
    }

    #[test]
    fn the_local_ledger_creates_once_replaces_at_its_version_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = LocalStore::open(dir.path()).unwrap();
        assert!(store.record(&record("a.example.com", "first", None)));
        assert!(!store.record(&record("a.example.com", "second", None)));
        let version = store.entries[&Hostname::parse("a.example.com").unwrap()].version;
        assert!(!store.record(&record("a.example.com", "stale", Some(version + 5))));
        assert!(store.record(&record("a.example.com", "heir", Some(version))));
        store.save();
        let reopened = LocalStore::open(dir.path()).unwrap();
        assert_eq!(reopened.ledger(), store.ledger());
        let holding = &reopened.ledger().hosts[&Hostname::parse("a.example.com").unwrap()];
        assert_eq!(holding.holder.service.as_str(), "heir");
        assert!(reopened.next_version > holding.version);
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
    fn a_broken_ledger_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(LOCAL_LEDGER), "{ not json").unwrap();
        let err = LocalStore::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("claims.json"), "{err}");
    }

    #[test]
    fn absences_are_timed_from_first_sight_and_forgotten_on_return() {
        let mut absences = Absences::default();
        let host = Hostname::parse("a.example.com").unwrap();
        let start = Instant::now();
        absences.update(std::slice::from_ref(&host), start);
        absences.update(std::slice::from_ref(&host), start + Duration::from_secs(5));
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
