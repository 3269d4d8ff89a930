//! Consul's KV store: the entries with their locks, the graveyard of tombstones, the lock
//! delays, and the `kvs` and `tombstones` entries of Consul's `index` table, written and read as
//! the state store does it (`agent/consul/state/kvs.go`, `kvs_ce.go`, `graveyard.go`,
//! `delay.go`).

use std::collections::BTreeMap;
use std::ops::Bound;

use tokio::time::Instant;

/// One KV entry, as a test reads it with `ConsulDouble::kv_entry` (Consul's `DirEntry`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvEntry {
    pub key: String,
    /// Empty for a key written without a body: Consul answers `"Value": null` for it.
    pub value: Vec<u8>,
    pub flags: u64,
    /// How many times a session acquired the key (`?acquire=` on a key it did not hold). A plain
    /// PUT writes 0, as Consul's does: `kvsSetTxn` keeps only the `Session` of the entry it
    /// replaces, and the PUT's `DirEntry` carries no LockIndex.
    pub lock_index: u64,
    /// The session holding the lock (`Session`, absent from the JSON when empty).
    pub session: Option<String>,
    pub create_index: u64,
    pub modify_index: u64,
}

/// Cloned whole by a transaction, to be put back if one of its operations fails.
#[derive(Clone, Default)]
pub(super) struct Kv {
    pub(super) entries: BTreeMap<String, KvEntry>,
    /// Key (or deleted prefix) -> the index of its deletion. Consul's leader reaps tombstones
    /// after `TombstoneTTL` (15 minutes) with a raft write of its own; the double keeps them.
    tombstones: BTreeMap<String, u64>,
    /// The `kvs` entry of the index table: the last write that changed an entry.
    kvs_index: u64,
    /// The `tombstones` entry: the last deletion.
    tombstones_index: u64,
    /// Key -> when its lock delay ends (`state.Delay`): set when an invalidated session lets the
    /// key go, kept in memory (not in raft) and checked before a lock goes to raft.
    lock_delays: BTreeMap<String, Instant>,
}

impl Kv {
    /// `kvsMaxIndex`: the later of the `kvs` and `tombstones` table indexes.
    fn max_index(&self) -> u64 {
        self.kvs_index.max(self.tombstones_index)
    }

    pub(super) fn under<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a KvEntry> {
        self.entries
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(move |(key, _)| key.starts_with(prefix))
            .map(|(_, entry)| entry)
    }

    /// `KVS.Get` (`agent/consul/kvs_endpoint.go`): the entry's ModifyIndex, or, for a missing
    /// key, `kvsMaxIndex` (so any KV write moves it: hashicorp/consul#9449). 0 becomes 1 later.
    pub(super) fn get_index(&self, key: &str) -> u64 {
        match self.entries.get(key) {
            Some(entry) => entry.modify_index,
            None => self.max_index(),
        }
    }

    /// `kvsListTxn`: under a prefix, the highest ModifyIndex of its entries and of its
    /// tombstones (a tombstone counts when its key starts with the prefix); when that is 0, or
    /// for the empty prefix, `kvsMaxIndex`.
    pub(super) fn list_index(&self, prefix: &str) -> u64 {
        if prefix.is_empty() {
            return self.max_index();
        }
        let entries = self.under(prefix).map(|entry| entry.modify_index);
        let stones = self
            .tombstones
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|(key, _)| key.starts_with(prefix))
            .map(|(_, index)| *index);
        match entries.chain(stones).max().unwrap_or(0) {
            0 => self.max_index(),
            index => index,
        }
    }

    /// `kvsSetTxn` for a plain PUT: an existing key keeps its CreateIndex and its Session (the
    /// lock stays with its holder: Consul's locks are advisory); the LockIndex is the request's,
    /// 0. A write that changes nothing (`DirEntry.Equal`: same value, flags, LockIndex and
    /// Session) keeps its ModifyIndex and moves no table index.
    pub(super) fn set(&mut self, key: &str, value: Vec<u8>, flags: u64, index: u64) {
        let session = self.entries.get(key).and_then(|old| old.session.clone());
        self.write_entry(key, value, flags, 0, session, index);
    }

    /// `kvsSetTxn` with `updateSession`: writes the entry as given (CreateIndex kept), unless it
    /// equals the one there (`DirEntry.Equal`), which keeps its ModifyIndex.
    fn write_entry(
        &mut self,
        key: &str,
        value: Vec<u8>,
        flags: u64,
        lock_index: u64,
        session: Option<String>,
        index: u64,
    ) {
        let create_index = match self.entries.get(key) {
            Some(old)
                if (&old.value, old.flags, old.lock_index, &old.session)
                    == (&value, flags, lock_index, &session) =>
            {
                return
            }
            Some(old) => old.create_index,
            None => index,
        };
        self.entries.insert(
            key.to_string(),
            KvEntry {
                key: key.to_string(),
                value,
                flags,
                lock_index,
                session,
                create_index,
                modify_index: index,
            },
        );
        self.kvs_index = index;
    }

    /// `kvsLockTxn`, for a session the caller found: a key held by another session is `false`;
    /// otherwise the value and flags are written with the session, and a fresh acquisition (a
    /// new key: 1) raises the LockIndex. The holder acquiring again keeps the LockIndex (and,
    /// with the same value and flags, the ModifyIndex).
    pub(super) fn lock(
        &mut self,
        key: &str,
        value: Vec<u8>,
        flags: u64,
        session: &str,
        index: u64,
    ) -> bool {
        let lock_index = match self.entries.get(key) {
            Some(old) if old.session.as_deref() == Some(session) => old.lock_index,
            Some(old) if old.session.is_some() => return false,
            Some(old) => old.lock_index + 1,
            None => 1,
        };
        let session = Some(session.to_string());
        self.write_entry(key, value, flags, lock_index, session, index);
        true
    }

    /// `kvsUnlockTxn`: only the holder releases (a missing key, or another holder, is
    /// `false`); the Session goes, the LockIndex stays, and the release's value and flags are
    /// written (a release without a body empties the value, as Consul's does).
    pub(super) fn unlock(
        &mut self,
        key: &str,
        value: Vec<u8>,
        flags: u64,
        session: &str,
        index: u64,
    ) -> bool {
        let lock_index = match self.entries.get(key) {
            Some(old) if old.session.as_deref() == Some(session) => old.lock_index,
            Some(_) | None => return false,
        };
        self.write_entry(key, value, flags, lock_index, None, index);
        true
    }

    /// The keys a session holds. Consul finds them through the `session` index of the `kvs`
    /// table, a UUID index: the session's ID in any case.
    pub(super) fn held_by(&self, session: &str) -> Vec<String> {
        self.entries
            .values()
            .filter(|entry| {
                entry
                    .session
                    .as_deref()
                    .is_some_and(|holder| holder.eq_ignore_ascii_case(session))
            })
            .map(|entry| entry.key.clone())
            .collect()
    }

    /// What `deleteSessionTxn` does to a held key of a `release` session: the Session goes
    /// (LockIndex, value and flags stay) and the ModifyIndex moves.
    pub(super) fn release(&mut self, key: &str, index: u64) {
        if let Some(old) = self.entries.get(key).cloned() {
            self.write_entry(key, old.value, old.flags, old.lock_index, None, index);
        }
    }

    /// `Delay.SetExpiration`: no lock on `key` until `until`.
    pub(super) fn set_lock_delay(&mut self, key: &str, until: Instant) {
        self.lock_delays.insert(key.to_string(), until);
    }

    /// `KVSLockDelay`: when the key's lock delay ends, if it has not yet (`kvsPreApply` refuses
    /// a lock until then).
    pub(super) fn lock_delay(&self, key: &str, now: Instant) -> Option<Instant> {
        self.lock_delays
            .get(key)
            .copied()
            .filter(|until| *until > now)
    }

    /// `kvsSetCASTxn`: `cas` 0 writes only a missing key, any other only a key whose
    /// ModifyIndex is `cas`.
    pub(super) fn set_cas(
        &mut self,
        key: &str,
        value: Vec<u8>,
        flags: u64,
        cas: u64,
        index: u64,
    ) -> bool {
        let current = self.entries.get(key).map(|entry| entry.modify_index);
        let allowed = match (cas, current) {
            (0, None) => true,
            (0, Some(_)) | (_, None) => false,
            (cas, Some(current)) => cas == current,
        };
        if allowed {
            self.set(key, value, flags, index);
        }
        allowed
    }

    /// `kvsDeleteTxn`: a tombstone for the key and the `kvs` index move; a missing key is a
    /// no-op.
    pub(super) fn delete(&mut self, key: &str, index: u64) {
        if self.entries.remove(key).is_some() {
            self.bury(key, index);
            self.kvs_index = index;
        }
    }

    /// `kvsDeleteCASTxn`: deletes only if the key's ModifyIndex is `cas`. A missing key answers
    /// true (`return entry == nil`), a mismatch false.
    pub(super) fn delete_cas(&mut self, key: &str, cas: u64, index: u64) -> bool {
        match self.entries.get(key) {
            None => true,
            Some(entry) if entry.modify_index != cas => false,
            Some(_) => {
                self.delete(key, index);
                true
            }
        }
    }

    /// `kvsDeleteTreeTxn`: every key under the prefix goes; if any did, one tombstone for the
    /// prefix itself (none for the empty prefix) and the `kvs` index move.
    pub(super) fn delete_tree(&mut self, prefix: &str, index: u64) {
        let doomed: Vec<String> = self.under(prefix).map(|e| e.key.clone()).collect();
        if doomed.is_empty() {
            return;
        }
        for key in doomed {
            self.entries.remove(&key);
        }
        if !prefix.is_empty() {
            self.bury(prefix, index);
        }
        self.kvs_index = index;
    }

    /// `Graveyard.InsertTxn`: the tombstone replaces an older one of the same key, and the
    /// `tombstones` table index moves.
    fn bury(&mut self, key: &str, index: u64) {
        self.tombstones.insert(key.to_string(), index);
        self.tombstones_index = index;
    }
}
