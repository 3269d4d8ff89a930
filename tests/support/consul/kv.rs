//! Consul's KV store: the entries, the graveyard of tombstones, and the `kvs` and `tombstones`
//! entries of Consul's `index` table, written and read as the state store does it
//! (`agent/consul/state/kvs.go`, `kvs_ce.go`, `graveyard.go`).

use std::collections::BTreeMap;
use std::ops::Bound;

/// One KV entry, as a test reads it with `ConsulDouble::kv_entry` (Consul's `DirEntry`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvEntry {
    pub key: String,
    /// Empty for a key written without a body: Consul answers `"Value": null` for it.
    pub value: Vec<u8>,
    pub flags: u64,
    /// Always 0: the double has no sessions, so no key is ever locked.
    pub lock_index: u64,
    pub create_index: u64,
    pub modify_index: u64,
}

#[derive(Default)]
pub(super) struct Kv {
    pub(super) entries: BTreeMap<String, KvEntry>,
    /// Key (or deleted prefix) -> the index of its deletion. Consul's leader reaps tombstones
    /// after `TombstoneTTL` (15 minutes) with a raft write of its own; the double keeps them.
    tombstones: BTreeMap<String, u64>,
    /// The `kvs` entry of the index table: the last write that changed an entry.
    kvs_index: u64,
    /// The `tombstones` entry: the last deletion.
    tombstones_index: u64,
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

    /// `kvsSetTxn`: an existing key keeps its CreateIndex; a write that changes nothing
    /// (`DirEntry.Equal`: same value and flags, no lock) keeps its ModifyIndex and moves no
    /// table index.
    pub(super) fn set(&mut self, key: &str, value: Vec<u8>, flags: u64, index: u64) {
        let create_index = match self.entries.get(key) {
            Some(old) if old.value == value && old.flags == flags => return,
            Some(old) => old.create_index,
            None => index,
        };
        self.entries.insert(
            key.to_string(),
            KvEntry {
                key: key.to_string(),
                value,
                flags,
                lock_index: 0,
                create_index,
                modify_index: index,
            },
        );
        self.kvs_index = index;
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
