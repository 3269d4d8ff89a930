//! Where the ACME state lives: Consul's KV, shared by every edge, or `<run_dir>/acme/` for a
//! single edge. Both hold the same keys, below the folder:
//!
//! ```text
//! account               the ACME account: its key and URL (instant-acme's credentials, JSON)
//! certs/<host>          the host's certificate chain and private key, PEM
//! orders/<host>         the URL of the order in flight (another edge resumes it)
//! challenges/<host>/<token>  a pending HTTP-01 challenge's key authorization: every edge answers it
//! failures/<host>       the last failure, its reason and when the next order may start (JSON)
//! locks/<host>          held by the edge ordering the host (a Consul session's lock)
//! acks/<host>/<token>/<session>  an edge's HAProxy answers the challenge (Consul only)
//! wanted/<session>      the hosts an edge certifies, one per line, locked by its session:
//!                       no edge collects what another edge alive still wants (Consul only)
//! ```
//!
//! The lock is taken with the session of this edge; Consul releases it when the edge stops
//! renewing the session (it died), and nobody can take it again for [`LOCK_DELAY`]. Every edge
//! keeps its session from the start (named `weft-acme <folder> <edge>`) and holds its list
//! `wanted/<session>` with it: the lists held are the edges alive, whose acknowledgements the
//! ordering edge waits for, and whose hosts no edge collects.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::sources::consul::kv::{KvFolder, KvWatch};

/// How long a lock released by an invalidated session stays untakeable (Consul's `LockDelay`):
/// the dead edge's last request has reached the CA by then.
pub const LOCK_DELAY: Duration = Duration::from_secs(5);
/// The file of the local store, in `<run_dir>/acme/`.
pub const LOCAL_FILE: &str = "state.json";
/// The local state's largest size: an account, and a certificate and key for each host (some
/// 10 KB each with long chains: 5,000 hosts are about 50 MB).
pub const MAX_LOCAL_FILE: u64 = 256 << 20;

/// The folder's entries, by key below the folder (values are text: PEM, JSON, tokens).
pub type State = BTreeMap<String, String>;

/// One read of the folder: its entries, with (in Consul) each one's version and the keys a
/// session holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Read {
    pub state: State,
    /// Each key's `ModifyIndex`; empty for the local store.
    pub versions: BTreeMap<String, u64>,
    /// The keys whose lock a session holds; empty for the local store.
    pub held: BTreeSet<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Consul(#[from] crate::sources::consul::ConsulError),
    #[error("{0}")]
    Refused(String),
    #[error("{path}: {source}")]
    Local {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Writes and locks, shared by the order tasks.
#[derive(Clone)]
pub enum Store {
    Consul(Arc<ConsulStore>),
    Local(Arc<LocalStore>),
}

pub struct ConsulStore {
    folder: KvFolder,
    /// This edge's session, created at the start; `None` again once Consul forgot it.
    session: tokio::sync::Mutex<Option<String>>,
    /// `weft-acme <folder> <edge>`.
    name: String,
    ttl: Duration,
}

pub struct LocalStore {
    path: PathBuf,
    state: Mutex<State>,
    locks: Mutex<BTreeSet<String>>,
    changed: watch::Sender<State>,
}

/// The state, each time it changes.
pub enum StoreWatch {
    Consul(Box<KvWatch>),
    Local(watch::Receiver<State>, bool),
}

impl Store {
    /// The Consul store on `folder`, its locks held by the session of edge `edge` with `ttl`.
    pub fn consul(folder: KvFolder, edge: &str, ttl: Duration) -> (Store, StoreWatch) {
        let watch = folder.watch();
        let name = format!("weft-acme {} {edge}", folder.prefix());
        let store = ConsulStore {
            folder,
            session: tokio::sync::Mutex::new(None),
            name,
            ttl,
        };
        (
            Store::Consul(Arc::new(store)),
            StoreWatch::Consul(Box::new(watch)),
        )
    }

    /// The local store in `dir` (created, private to weft), read back from its file.
    pub fn local(dir: &Path) -> Result<(Store, StoreWatch), StoreError> {
        use std::os::unix::fs::DirBuilderExt;
        let local = |source| StoreError::Local {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(local)?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(local)?;
        }
        let path = dir.join(LOCAL_FILE);
        let state: State = match crate::sources::read_own_file(&path, MAX_LOCAL_FILE) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|err| {
                warn!(path = %path.display(), error = %err, "the ACME state file does not decode; starting from none");
                State::new()
            }),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => State::new(),
            Err(source) => return Err(StoreError::Local { path, source }),
        };
        let (changed, receiver) = watch::channel(state.clone());
        let store = LocalStore {
            path,
            state: Mutex::new(state),
            locks: Mutex::new(BTreeSet::new()),
            changed,
        };
        Ok((
            Store::Local(Arc::new(store)),
            StoreWatch::Local(receiver, false),
        ))
    }

    /// Writes `value` at `key`; with `create_only`, only if there is none (whether written).
    pub async fn put(&self, key: &str, value: &str, create_only: bool) -> Result<bool, StoreError> {
        match self {
            Store::Consul(store) if create_only => {
                Ok(store.folder.put(key, value.as_bytes().to_vec(), 0).await?)
            }
            Store::Consul(store) => {
                Ok(store.folder.put_any(key, value.as_bytes().to_vec()).await?)
            }
            Store::Local(store) => store.update(|state| {
                if create_only && state.contains_key(key) {
                    return false;
                }
                state.insert(key.to_string(), value.to_string());
                true
            }),
        }
    }

    /// The value at `key`, read from the store itself (not the watch's last answer).
    pub async fn get(&self, key: &str) -> Result<Option<String>, StoreError> {
        match self {
            Store::Consul(store) => Ok(store
                .folder
                .get(key)
                .await?
                .and_then(|value| String::from_utf8(value).ok())),
            Store::Local(store) => Ok(store
                .state
                .lock()
                .ok()
                .and_then(|state| state.get(key).cloned())),
        }
    }

    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match self {
            Store::Consul(store) => Ok(store.folder.delete_any(key).await?),
            Store::Local(store) => store
                .update(|state| state.remove(key).is_some())
                .map(|_| ()),
        }
    }

    /// Writes `value` at `key` (deletes `key` with `None`) only while this edge holds the lock
    /// of `host`: `false` when it lost it (its session expired and another edge may hold it
    /// now), nothing written. In Consul the check and the write are one transaction, so a
    /// write of an edge that stalled past its session's TTL cannot land after the next
    /// holder's.
    pub async fn write_locked(
        &self,
        host: &str,
        key: &str,
        value: Option<&str>,
    ) -> Result<bool, StoreError> {
        match self {
            Store::Consul(store) => {
                let session = store.session.lock().await.clone();
                let Some(session) = session else {
                    return Ok(false);
                };
                let lock = format!("locks/{host}");
                Ok(store
                    .folder
                    .write_locked(&lock, &session, key, value.map(str::as_bytes))
                    .await?)
            }
            Store::Local(store) => {
                let lock = format!("locks/{host}");
                if !store.locks.lock().is_ok_and(|l| l.contains(&lock)) {
                    return Ok(false);
                }
                store
                    .update(|state| match value {
                        Some(value) => {
                            state.insert(key.to_string(), value.to_string());
                            true
                        }
                        None => state.remove(key).is_some(),
                    })
                    .map(|_| true)
            }
        }
    }

    /// The sessions of the edges alive that certify `host`: their lists `wanted/<session>`,
    /// held by their sessions, name it (`None` for the local store: one edge).
    pub async fn edges_certifying(
        &self,
        host: &str,
    ) -> Result<Option<BTreeSet<String>>, StoreError> {
        let Store::Consul(store) = self else {
            return Ok(None);
        };
        Ok(Some(
            store
                .folder
                .entries("wanted")
                .await?
                .into_iter()
                .filter(|entry| entry.session.is_some())
                .filter(|entry| {
                    std::str::from_utf8(&entry.value)
                        .is_ok_and(|text| text.lines().any(|l| l == host))
                })
                .filter_map(|entry| entry.key.rsplit('/').next().map(str::to_string))
                .collect(),
        ))
    }

    /// Says this edge's HAProxy answers `token` of `host`: `acks/<host>/<token>/<session>`.
    /// Nothing for the local store.
    pub async fn ack(&self, host: &str, token: &str) -> Result<(), StoreError> {
        let Store::Consul(store) = self else {
            return Ok(());
        };
        let session = store.session().await?;
        let key = format!("acks/{host}/{token}/{session}");
        store
            .folder
            .put_any(&key, store.name.as_bytes().to_vec())
            .await?;
        Ok(())
    }

    /// The sessions of the edges that acknowledged `token` of `host`.
    pub async fn acks(&self, host: &str, token: &str) -> Result<BTreeSet<String>, StoreError> {
        let Store::Consul(store) = self else {
            return Ok(BTreeSet::new());
        };
        Ok(store
            .folder
            .keys(&format!("acks/{host}/{token}"))
            .await?
            .into_iter()
            .collect())
    }

    /// Deletes the acknowledgements of `token` of `host`.
    pub async fn delete_acks(&self, host: &str, token: &str) -> Result<(), StoreError> {
        let Store::Consul(store) = self else {
            return Ok(());
        };
        Ok(store
            .folder
            .delete_tree(&format!("acks/{host}/{token}"))
            .await?)
    }

    /// Deletes what [`super::Seen::garbage`] found, each key at the version read (Consul's
    /// `ModifyIndex`, the local store's [`local_version`]): an entry written or locked since is
    /// left alone. The entries deleted, and the first error.
    pub async fn collect(&self, garbage: &[(String, u64)]) -> (usize, Option<StoreError>) {
        let mut deleted = 0;
        let mut first = None;
        for (key, version) in garbage {
            let done = match self {
                // Consul's cas=0 deletes nothing: a key without a version is left alone.
                Store::Consul(_) if *version == 0 => Ok(false),
                Store::Consul(store) => store
                    .folder
                    .delete(key, *version)
                    .await
                    .map_err(StoreError::from),
                Store::Local(store) => store.update(|state| {
                    if state.get(key).map(|v| local_version(v)) != Some(*version) {
                        return false;
                    }
                    state.remove(key);
                    true
                }),
            };
            match done {
                Ok(true) => deleted += 1,
                Ok(false) => {}
                Err(err) => {
                    first.get_or_insert(err);
                }
            }
        }
        (deleted, first)
    }

    /// Says which hosts this edge certifies: `wanted/<session>`, held by its session (gone
    /// with it). The session, `None` for the local store (nothing to write).
    pub async fn publish_wanted(
        &self,
        hosts: &BTreeSet<String>,
    ) -> Result<Option<String>, StoreError> {
        let Store::Consul(store) = self else {
            return Ok(None);
        };
        let session = store.session().await?;
        let text = hosts
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join("\n");
        let key = format!("wanted/{session}");
        if !store
            .folder
            .acquire(&key, &session, text.into_bytes())
            .await?
        {
            return Err(StoreError::Refused(format!(
                "Consul did not let this edge's session take {key}"
            )));
        }
        Ok(Some(session))
    }

    /// Takes `locks/<host>` for this edge: whether it holds it now.
    pub async fn lock(&self, host: &str) -> Result<bool, StoreError> {
        let key = format!("locks/{host}");
        match self {
            Store::Consul(store) => {
                let session = store.session().await?;
                Ok(store
                    .folder
                    .acquire(&key, &session, store.name.as_bytes().to_vec())
                    .await?)
            }
            Store::Local(store) => Ok(store.locks.lock().is_ok_and(|mut l| l.insert(key))),
        }
    }

    pub async fn unlock(&self, host: &str) -> Result<(), StoreError> {
        let key = format!("locks/{host}");
        match self {
            Store::Consul(store) => {
                let session = store.session.lock().await.clone();
                if let Some(session) = session {
                    store.folder.release(&key, &session).await?;
                }
                Ok(())
            }
            Store::Local(store) => {
                if let Ok(mut locks) = store.locks.lock() {
                    locks.remove(&key);
                }
                Ok(())
            }
        }
    }

    /// Keeps this edge's session alive (renewed every TTL/3) until `stop`, then destroys it,
    /// releasing its locks at once. Nothing for the local store.
    pub async fn keep_session(self, stop: CancellationToken) {
        let Store::Consul(store) = self else {
            return;
        };
        let mut tick = tokio::time::interval(store.ttl / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            // From the start, and again after Consul forgot it: the session says this edge is
            // alive (the ordering edge waits for its acknowledgements).
            if let Err(err) = store.session().await {
                warn!(error = %err, "cannot create this edge's ACME session");
                continue;
            }
            let mut session = store.session.lock().await;
            let Some(id) = session.clone() else { continue };
            match store.folder.renew_session(&id).await {
                Ok(true) => {}
                Ok(false) => {
                    warn!(session = %id, "Consul no longer knows this edge's ACME session (it expired): its locks are gone; a new one is made at the next order");
                    *session = None;
                }
                Err(err) => {
                    warn!(session = %id, error = %err, "cannot renew this edge's ACME session")
                }
            }
        }
        let last = store.session.lock().await.take();
        if let Some(id) = last {
            match store.folder.destroy_session(&id).await {
                Ok(()) => info!(session = %id, "ACME session destroyed, its locks released"),
                Err(err) => {
                    warn!(session = %id, error = %err, "cannot destroy this edge's ACME session: its locks go when its TTL ends")
                }
            }
        }
    }
}

/// The version of an entry of the local store: its value's hash (the local store keeps no
/// index), never 0.
pub fn local_version(value: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish().max(1)
}

impl ConsulStore {
    /// This edge's session, created if there is none.
    async fn session(&self) -> Result<String, StoreError> {
        let mut session = self.session.lock().await;
        if let Some(id) = session.as_ref() {
            return Ok(id.clone());
        }
        let id = self
            .folder
            .create_session(&self.name, self.ttl, LOCK_DELAY)
            .await?;
        info!(session = %id, ttl = ?self.ttl, "ACME session created");
        *session = Some(id.clone());
        Ok(id)
    }
}

impl LocalStore {
    /// Changes the state with `change`; when it says it changed something, writes the file
    /// (atomically, readable by weft alone) and tells the watch.
    fn update(&self, change: impl FnOnce(&mut State) -> bool) -> Result<bool, StoreError> {
        let Ok(mut state) = self.state.lock() else {
            return Ok(false);
        };
        if !change(&mut state) {
            return Ok(false);
        }
        let failed = |source| StoreError::Local {
            path: self.path.clone(),
            source,
        };
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let mut file = tempfile::NamedTempFile::new_in(dir).map_err(failed)?;
        serde_json::to_writer(&mut file, &*state).map_err(|e| failed(e.into()))?;
        file.as_file().sync_all().map_err(failed)?;
        file.persist(&self.path).map_err(|e| failed(e.error))?;
        self.changed.send_replace(state.clone());
        Ok(true)
    }
}

impl StoreWatch {
    /// The state: at once the first time, then each time it changes. `None` at `stop`.
    pub async fn next(
        &mut self,
        stop: &CancellationToken,
        mut failed: impl FnMut(String),
    ) -> Option<Read> {
        match self {
            StoreWatch::Consul(watch) => {
                let entries = watch
                    .next(stop, |err, retry| {
                        failed(format!("{err} (retry in {retry:?})"));
                    })
                    .await?;
                let mut read = Read::default();
                for entry in entries {
                    let Ok(value) = String::from_utf8(entry.value) else {
                        continue;
                    };
                    read.versions.insert(entry.key.clone(), entry.modify_index);
                    if entry.session.is_some() {
                        read.held.insert(entry.key.clone());
                    }
                    read.state.insert(entry.key, value);
                }
                Some(read)
            }
            StoreWatch::Local(receiver, seen) => {
                if *seen {
                    tokio::select! {
                        _ = stop.cancelled() => return None,
                        changed = receiver.changed() => changed.ok()?,
                    }
                }
                *seen = true;
                Some(Read {
                    state: receiver.borrow_and_update().clone(),
                    ..Read::default()
                })
            }
        }
    }
}
