//! A Consul HTTP API test double: `/v1/catalog/services`, `/v1/health/service/:name`,
//! `/v1/health/state/:state`, the KV store (`/v1/kv/:key`) with its locks, sessions
//! (`/v1/session/...`) and KV transactions (`/v1/txn`), with blocking queries, per-object and
//! per-table raft indexes, ACL tokens, injectable faults and Consul's per-client-IP connection
//! limit, on 127.0.0.1:0 or a given address.
//!
//! It follows the Consul reference notes, the docs samples in tests/fixtures/consul/ and
//! Consul's source. Tests change the catalog with plain methods (`register`, `register_all`,
//! `set_check`, `kv_put`, ...); every write is one raft index, as a Consul server applies one
//! log entry (a KV PUT or DELETE through the API too, a failed check-and-set included).
//!
//! ```text
//! test ── register / set_check / set_fault ──> State (Mutex) ── index ──> watch ──> blocked queries
//! client ──TCP──> front door (per-IP limit, 429) ──> record ──> fault? params? token? ──> block ──> JSON + X-Consul-*
//! ```
//!
//! Indexes, as Consul's state store keeps them (`agent/consul/state/catalog.go`,
//! `catalog_ce.go`): every node, instance and check has a CreateIndex and a ModifyIndex that
//! move when, and only when, that object is written with a change (`IsSame`,
//! `IsSameService`). Each endpoint answers, and blocks on, one entry of Consul's `index`
//! table:
//!
//! | endpoint | `X-Consul-Index` | moved by |
//! |---|---|---|
//! | `/v1/catalog/services` | the services table | an instance registered, changed (address, port, tags, meta) or deregistered |
//! | `/v1/health/service/:name` | `service.<name>` | the same for that service's instances, a change of one of their checks, of their node or of its serfHealth; a service without instances answers the last time any service lost its last instance (or, if none ever did, the latest change of nodes, services or checks) |
//! | `/v1/health/state/:state` | the checks table | a check added, changed (status, output, the service's tags) or removed, and every deregistration |
//! | `/v1/kv/:key` | the key's ModifyIndex; a missing key: the later of the `kvs` and `tombstones` tables (`kvsMaxIndex`) | a write that changes the key; a missing key: any KV write that changes something (as in Consul, hashicorp/consul#9449) |
//! | `/v1/kv/:prefix?recurse`, `?keys` | the highest ModifyIndex under the prefix and of the prefix's tombstones; if 0, or for the empty prefix, `kvsMaxIndex` | a write or deletion under the prefix (an acquisition, a release, and a session's invalidation releasing or deleting its keys included) |
//! | `/v1/session/info/:id`, `/list`, `/node/:node` | the `sessions` table | a session created or invalidated (destroyed, expired, its node or a check failed); not a renewal |
//!
//! So moving an instance (same ID, a new address, its check unchanged) wakes
//! `/v1/catalog/services` (whose body does not change) and that service's health, but not
//! `/v1/health/state/any`; a check's status or Output wakes the checks table and that service's
//! health, not the catalog; a write that changes nothing (an identical re-registration, a check
//! set to the status it has) moves no endpoint's index at all.
//!
//! The KV store follows `agent/kvs_endpoint.go` (HTTP), `agent/consul/kvs_endpoint.go` (RPC,
//! ACLs) and `agent/consul/state/kvs.go`, `kvs_ce.go`, `graveyard.go` (state, indexes):
//!
//! - `GET /v1/kv/:key`: `[{"LockIndex","Key","Flags","Value","Session","CreateIndex",
//!   "ModifyIndex"}]`, `Value` in base64 (`null` when empty), `Session` only on a locked key
//!   (`omitempty`); `?raw`: the value alone, `text/plain`, with
//!   `X-Content-Type-Options: nosniff` and `Content-Security-Policy: sandbox`; `?recurse`: every
//!   entry under the prefix, in key order; `?keys` (`separator`, or the old `seperator`): the
//!   keys, each cut after the first separator past the prefix. Nothing found: a 404 without a
//!   body, with the `X-Consul-*` headers; `?keys` at the root answers `[]` instead. No key and
//!   neither `?recurse` nor `?keys`: `400 Missing key name`.
//! - `PUT /v1/kv/:key` (body: the value): `?flags`, `?cas` (0: only if absent; N: only if the
//!   ModifyIndex is N), `?acquire=<session>`, `?release=<session>` (below). A `Content-Length`
//!   past `KV_MAX_VALUE_SIZE` (512 KiB, `kv_max_value_size`'s default) is Consul's 413.
//!   `DELETE /v1/kv/:key`: `?recurse` (a prefix, one tombstone for it), `?cas` (N: only at
//!   ModifyIndex N; a missing key is `true`). Writes answer the JSON `true`, or the outcome of
//!   the check-and-set, acquisition or release, without `X-Consul-*` headers. Conflicting flags
//!   (two of `cas`, `acquire`, `release`; `recurse` with `cas`) are Consul's
//!   `400 Conflicting flags: <query>`; a `flags` or `cas` that is not a number is Consul's 500
//!   with Go's `strconv.ParseUint` text; other methods a 405.
//! - An entry written with the value, flags, LockIndex and Session it has keeps its ModifyIndex
//!   (`kvsSetTxn`, `DirEntry.Equal`). KV writes move only the KV indexes, catalog writes none
//!   of them.
//! - ACLs (`set_token`): the anonymous token gets `403 Permission denied` for a key and for
//!   every write; its lists are filtered to nothing (a 404, with
//!   `X-Consul-Results-Filtered-By-ACLs: true` when there was something to filter).
//!
//! Locks (`kvsLockTxn`, `kvsUnlockTxn` in `agent/consul/state/kvs.go`, `kvsPreApply` in
//! `agent/consul/kvs_endpoint.go`), all advisory as in Consul:
//!
//! - `?acquire=<session>`: `true` when the key is free (a missing key too) or already held by
//!   that session; the value and flags are written with the `Session`, and the LockIndex goes
//!   up by one on a fresh acquisition (1 for a new key), not when the holder acquires again.
//!   `false` when another session holds it, or within the key's lock delay (refused by the
//!   leader before raft: no index moves). An empty or unknown session is the FSM's error, a
//!   raft entry all the same: `500 raft apply failed: missing session` / `invalid session
//!   "<id>"`.
//! - `?release=<session>`: `true` if that session holds the key: the `Session` goes, the
//!   LockIndex stays, and the release's body becomes the value (a release without a body
//!   empties it, as Consul's does); `false` otherwise (a missing key, another holder). The
//!   session need not exist; an empty one is `500 raft apply failed: missing session`.
//! - A plain PUT (or `?cas`) on a held key writes it and keeps the `Session`, but sets the
//!   LockIndex to 0 (`kvsSetTxn` keeps only the Session of the entry it replaces); a DELETE
//!   deletes it, lock or not, and puts no lock delay on it.
//!
//! Sessions follow `agent/session_endpoint.go` (HTTP), `agent/consul/session_endpoint.go`
//! (RPC), `agent/consul/session_ttl.go` (TTL timers), `agent/consul/state/session.go`,
//! `session_ce.go` (state) and `agent/structs/structs.go` (`structs.Session`):
//!
//! - `PUT /v1/session/create`, body optional (read only with a `Content-Length` above 0; keys
//!   without case): `Name`, `Node` (default: the agent's node, `DEFAULT_NODE`, which joins the
//!   catalog with its `serfHealth` in the session's write if it is not there yet: a real
//!   agent's node always is; any other node must be registered, or it is `500 apply failed:
//!   Missing node registration`), `LockDelay` (a Go duration string or nanoseconds, below 1000
//!   taken as seconds; default 15 s; an invalidation applies at most 60 s, `MaxLockDelay`),
//!   `Behavior` (`release`, the default, or `delete`; else `500 Invalid Behavior setting
//!   '<b>'`), `TTL` (`""` or 0: none; a bad duration is `500 Session TTL '<ttl>' invalid:
//!   <Go's error>`; outside `[session_ttl_min, 24h]` is `500 Invalid Session TTL '<ns>', must
//!   be between [10s=24h0m0s]`), `NodeChecks` (default `["serfHealth"]`), `ServiceChecks`,
//!   and the deprecated `Checks` (`fixupEmptySessionChecks`). Every check must exist on the
//!   node and not be critical (`500 apply failed: Missing check '<id>' registration` / `Check
//!   '<id>' is in critical state`); the double knows `serfHealth` and its instances'
//!   `service:<id>`. A body that does not decode is `400 Request decode failed: ...`. These are
//!   500s because Consul's HTTP layer answers a plain RPC error with a 500 and its text (not a
//!   400). Answers `{"ID":"<uuid>"}`; one raft write.
//! - `PUT /v1/session/renew/:id`: restarts the TTL timer (no raft write) and answers
//!   `[<session>]`; an unknown session is `404 Session id '<id>' not found`.
//!   `PUT /v1/session/destroy/:id`: `true`, unknown session or not (an unknown one is no raft
//!   write). `GET /v1/session/info/:id` (`[<session>]`, or `[]`), `/list`, `/node/:node`:
//!   blocking queries on the `sessions` table index, in ID order. A session is `structs.Session`:
//!   `ID`, `Name`, `Node`, `LockDelay` (ns), `Behavior`, `TTL`, `NodeChecks`, `ServiceChecks`
//!   (`null` when nil), `Checks` (only when not empty), `CreateIndex`, `ModifyIndex`. Other
//!   methods: a 405 (`Allow: OPTIONS,PUT` or `OPTIONS,GET`). ACLs: the anonymous token may not
//!   create, renew or destroy (403 `Permission denied`; renewing or destroying an unknown
//!   session answers as above first) and reads nothing (`[]`, filtered).
//! - TTL: the leader invalidates a session that was not renewed within TTL ×
//!   `SessionTTLMultiplier` (2) of its creation or last renewal, in a raft write of its own.
//!   `ConsulDoubleBuilder::session_ttl_min` lowers the shortest TTL taken (Consul's
//!   `session_ttl_min`, default 10 s), so that a test can watch a short TTL expire.
//! - Invalidation (a destroy, an expired TTL, `invalidate_session`, or a check of the session
//!   turning critical or going away, e.g. `set_node_check(node, Status::Critical)` or the
//!   instance's deregistration, in that write): the session goes, and every key it holds is
//!   released (`release`: `Session` cleared, LockIndex, value and flags kept, ModifyIndex
//!   moved) or deleted (`delete`: a tombstone), with the session's lock delay on each from
//!   then: until it passes, `?acquire=` of the key by any session is `false` (`kvsLockDelay`).
//!
//! Transactions, `PUT /v1/txn` (`agent/txn_endpoint.go` for HTTP, `agent/consul/txn_endpoint.go`
//! for the RPC and its checks, `agent/consul/state/txn.go` and `kvs.go` for the state store;
//! see `txn.rs`):
//!
//! - The body: a JSON array of `{"KV": {"Verb", "Key", "Value" (base64), "Flags", "Index",
//!   "Session"}}`, read as Go's `encoding/json` reads it into `api.TxnOps` (keys without case,
//!   an unknown key refused: `400 Failed to parse body: json: unknown field "X"`; bad base64:
//!   `... illegal base64 data at input byte N`; an empty body: `... EOF`). A `Content-Length`
//!   past `TXN_MAX_REQ_LEN` (512 KiB, `txn_max_req_len`) is `413 Request body(N bytes) too
//!   large, max size: 524288 bytes. See <the docs of txn_max_req_len>.` (without a length,
//!   once the JSON runs past it: `413 Request body too large, max size: ...`); more than
//!   `TXN_MAX_OPS` (128, Consul 1.14 and later) is `413 Transaction contains too many
//!   operations (N > 128)`.
//! - Verbs: `set`, `cas` (`Index` 0: only if absent), `lock` and `unlock` (an `?acquire=` and
//!   a `?release=`: the session must exist, a fresh lock raises the LockIndex, the lock delay
//!   of an invalidated session refuses a `lock`), `get`, `get-or-empty`, `get-tree`,
//!   `check-index`, `check-session`, `check-not-exists`, `delete`, `delete-tree`, `delete-cas`.
//!   Every operation sees what the ones before it wrote.
//! - All or nothing: `200 {"Results": [{"KV": <entry>}, ...], "Errors": null}`, an entry per
//!   operation that answers one (none for a deletion or `check-not-exists`, every entry for
//!   `get-tree`), `Value` only for the reads (`null` for the writes and checks); or `409
//!   {"Results": null, "Errors": [{"OpIndex": i, "What": "..."}]}` with every failed operation
//!   and Consul's texts (e.g. `failed session check for key "k", current session "" != "<id>"`,
//!   `failed index check for key "k", current modify index 7 != 5`, `failed to set key "k",
//!   index is stale`, `key "k" exists`, `key "k" doesn't exist`, `failed to lock key "k", lock
//!   is already held`, `invalid session "<id>"`, `Must provide key`, `Permission denied`),
//!   and nothing of the transaction applied.
//! - A transaction with a write verb goes to the leader: `?dc` and the token only, the leader's
//!   checks (a failure there, e.g. the lock delay or an ACL, is a 409 without a raft write),
//!   then one raft write for the whole transaction: it wakes blocked KV queries as `kv_put`
//!   does; if an operation fails there, the raft index is spent (as a failed `?cas` spends
//!   it) but no KV entry or index moves. The answer has no `X-Consul-*` headers.
//! - One without a write (only reads and checks) is a read: `?stale`, `?consistent`, no
//!   blocking, no raft write, `X-Consul-KnownLeader` and `X-Consul-LastContact` headers, and the
//!   embedded `QueryMeta` in the body (`"Index": 1, "LastContact": 0, "KnownLeader": true,
//!   "ConsistencyLevel": "", "NotModified": false, "Backend": 0, "ResultsFilteredByACLs":
//!   false`; all zero when the leader's checks refused it).
//! - ACLs: the anonymous token may only `get`, `get-tree` and `get-or-empty`, whose results are
//!   filtered away (`"Results": []`); any other verb fails with `Permission denied`.
//! - The double's own: `Node`, `Service` and `Check` operations are a 400 that says the double
//!   does not implement them, and so is a `null` operation (Consul's handler panics on it); a
//!   JSON syntax error is a 400 `Failed to parse body: ` with serde's words, not Go's; a denied
//!   operation's `What` is `Permission denied`, as the double's KV 403s (newer Consul adds
//!   which permission the token lacks); `Namespace` and `Partition` are read and ignored, as
//!   Consul CE does; a `Value` of `""` is stored as no value (`null` when read back).
//!
//! KV and session simplifications: tombstones are never reaped (Consul's leader reaps them
//! after `tombstone_ttl`, 15 minutes, with a raft write). A PUT body without `Content-Length`,
//! which Consul reads whole, gets the 413 past the same bound. Key names are not validated:
//! Consul 1.21.5 and later refuse some keys (path traversal, leading or trailing spaces, and,
//! in some builds, names ending in `.com`, `.json` and the like: hashicorp/consul#22822,
//! #22850), so a client should keep to plain `[a-zA-Z0-9_/-]` keys. No
//! namespaces or partitions, no prepared queries (which a session's invalidation would also
//! delete). Only `serfHealth` and `service:<id>` checks exist for a session to name; a
//! session's checks are looked at after every write (Consul reacts to the check's own
//! write, which comes to the same). `Maintenance` is not critical for a session. A blocking
//! query on a key, or on an unknown session, wakes on whatever moves its index (see the
//! table); Consul wakes on its memdb watches first, which gives the same answers. The text
//! after `Request decode failed: ` is the double's, in Go's words only for a wrong type or a
//! bad `LockDelay` duration. Renewing answers the TTL as created (Consul may answer a longer
//! one under load). Timers and lock delays run on tokio's clock.
//!
//! Simplifications: instance IDs are unique across nodes; registering an ID again under
//! another node or service name deregisters the old instance first (Consul keys instances by
//! node and ID: it would keep both under another node, and under another name it would replace
//! the instance without waking the old name's queries); an instance has at most one
//! check, `service:<id>`, and a registration carries it as an agent's anti-entropy does (an
//! instance registered without a check loses the one it had). `bump_index` moves every catalog
//! index without changing content, which no single Consul write does (the KV indexes stay).
//!
//! `?filter` is not implemented: every endpoint answers it with `400 ?filter is not implemented
//! by the Consul test double` (not Consul's answer: Consul would filter), so that a client that
//! relies on it fails instead of passing on unfiltered data.
//!
//! The connection limit and its 429 are described in `conns.rs`; `connections()` counts what
//! the front door saw, `requests()` what the HTTP server answered.
//!
//! Dropping the double closes its address and kills every open connection, blocked or stalled
//! queries included, so a client sees Consul go away as it would when the agent dies.

#![allow(dead_code, clippy::unwrap_used)]

use super::killable as conn;
mod conns;
mod go;
mod http;
mod json;
mod kv;
mod session;
mod state;
mod txn;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::{get, put, MethodRouter};
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;

// Read by the double's own tests only: the other test crates would call it unused.
#[allow(unused_imports)]
pub use self::conns::TOO_MANY_CONNECTIONS;
pub use self::go::{parse_go_bool, parse_go_duration, parse_go_uint};
pub use self::kv::KvEntry;
// Read by the double's own tests only, some of them.
#[allow(unused_imports)]
pub use self::session::{
    Behavior, ServiceCheck, SessionEntry, DEFAULT_LOCK_DELAY, DEFAULT_SESSION_TTL_MIN,
    MAX_LOCK_DELAY, SESSION_TTL_MAX, SESSION_TTL_MULTIPLIER,
};
// Read by the double's own tests only.
#[allow(unused_imports)]
pub use self::txn::{TXN_MAX_OPS, TXN_MAX_REQ_LEN};

use self::conn::Served;
use self::conns::{FrontDoor, Limiter};
use self::http::{
    catalog_services, health_service, health_state, kv_delete, kv_get, kv_method_not_allowed,
    kv_put, record, session_create, session_destroy, session_info, session_list,
    session_method_not_allowed, session_node, session_renew, txn,
};
use self::state::{session_timers, Shared, State};

pub const DATACENTER: &str = "dc1";
pub const CATALOG_SERVICES: &str = "/v1/catalog/services";
pub const HEALTH_SERVICE: &str = "/v1/health/service/";
pub const HEALTH_STATE: &str = "/v1/health/state/";
pub const KV: &str = "/v1/kv/";
/// Every session endpoint (`/v1/session/create`, `/destroy/:id`, `/renew/:id`, `/info/:id`,
/// `/list`, `/node/:node`).
pub const SESSION: &str = "/v1/session/";
/// The transaction endpoint (`PUT /v1/txn`).
pub const TXN: &str = "/v1/txn";
/// `kv_max_value_size`'s default: the largest PUT body the KV store takes.
pub const KV_MAX_VALUE_SIZE: usize = 512 * 1024;
/// The endpoint key in `Requests::by_endpoint` for every other path (404s).
pub const OTHER_PATHS: &str = "other";

/// Consul's `defaultQueryTime` and `maxQueryTime`.
const DEFAULT_WAIT: Duration = Duration::from_secs(5 * 60);
const MAX_WAIT: Duration = Duration::from_secs(10 * 60);
/// Consul adds up to wait/16 of random jitter to every blocking query (`JitterFraction`).
const JITTER_FRACTION: u32 = 16;
/// `limits.http_max_conns_per_client`'s default since Consul 1.7.1.
pub const DEFAULT_MAX_CONNS_PER_CLIENT: usize = 200;
/// The address of a node that `register` creates on its own: TEST-NET-1, never routable, so a
/// client that falls back to it by mistake cannot reach a loopback backend.
pub const DEFAULT_NODE_ADDRESS: &str = "192.0.2.10";
pub const DEFAULT_NODE: &str = "node1";

/// The status of a health check, as Consul spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Passing,
    Warning,
    Critical,
    /// A shortcut of the double: Consul refuses this status for a check (`Bad check status`)
    /// and shows maintenance mode as an extra critical check, `_service_maintenance:<id>`.
    Maintenance,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Passing => "passing",
            Status::Warning => "warning",
            Status::Critical => "critical",
            Status::Maintenance => "maintenance",
        }
    }
}

/// What goes wrong with every request until the next `set_fault`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    None,
    /// No leader: `500 No cluster leader`, except to `?stale` reads, which the server answers
    /// from its own state with `X-Consul-KnownLeader: false` and a large `LastContact`.
    NoLeader,
    /// `429 RPC rate limit exceeded`.
    RateLimited,
    /// The connection is accepted and the request read, but no answer ever comes.
    Stall,
    /// `200` with every usual header and a truncated JSON body.
    Garbage,
    /// Answers carry an `X-Consul-Index` lower than before, as after a snapshot restore; the
    /// lower numbering is consistent (a blocking query on it blocks) until the fault is cleared.
    IndexBackwards,
}

/// One service instance, registered with `ConsulDouble::register`.
///
/// `address` stays a string: Consul's `Service.Address` may be empty (use the node's address),
/// an IP or a host name, and the double must hand out exactly what a registrator wrote.
#[derive(Clone, Debug)]
pub struct Instance {
    pub service: String,
    pub id: String,
    pub address: String,
    pub port: u16,
    pub tags: Vec<String>,
    pub meta: BTreeMap<String, String>,
    pub node: String,
    /// Extra `Service.TaggedAddresses`; `lan_ipv4`/`wan_ipv4` (or `_ipv6`) are added from
    /// `address` like a real agent does.
    pub tagged_addresses: BTreeMap<String, (String, u16)>,
    /// The status of the instance's one service check (`service:<id>`); `None`: no check.
    pub check: Option<Status>,
    pub output: String,
}

impl Instance {
    /// A passing instance of `service` on node `node1`.
    pub fn new(service: &str, id: &str, address: &str, port: u16) -> Instance {
        Instance {
            service: service.to_string(),
            id: id.to_string(),
            address: address.to_string(),
            port,
            tags: Vec::new(),
            meta: BTreeMap::new(),
            node: DEFAULT_NODE.to_string(),
            tagged_addresses: BTreeMap::new(),
            check: Some(Status::Passing),
            output: String::new(),
        }
    }

    pub fn tag(mut self, tag: &str) -> Instance {
        self.tags.push(tag.to_string());
        self
    }

    pub fn meta(mut self, key: &str, value: &str) -> Instance {
        self.meta.insert(key.to_string(), value.to_string());
        self
    }

    /// The node the instance runs on; created with `DEFAULT_NODE_ADDRESS` if not registered.
    pub fn node(mut self, node: &str) -> Instance {
        self.node = node.to_string();
        self
    }

    pub fn tagged_address(mut self, name: &str, address: &str, port: u16) -> Instance {
        self.tagged_addresses
            .insert(name.to_string(), (address.to_string(), port));
        self
    }

    pub fn status(mut self, status: Status) -> Instance {
        self.check = Some(status);
        self
    }

    pub fn output(mut self, output: &str) -> Instance {
        self.output = output.to_string();
        self
    }

    /// No service check at all: the instance counts as passing, as in Consul.
    pub fn without_check(mut self) -> Instance {
        self.check = None;
        self
    }
}

/// How many requests the double's HTTP server received, and the bodies it answered with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Requests {
    pub total: u64,
    pub by_path: BTreeMap<String, u64>,
    /// The length of every response body the double handed to a connection (a client that goes
    /// away early may have read less). Refused connections' 429s are not requests: see
    /// `Connections::refused`.
    pub body_bytes: u64,
    /// Per endpoint: `CATALOG_SERVICES`, `HEALTH_SERVICE`, `HEALTH_STATE`, `KV` (every method),
    /// `SESSION` (all of them), `TXN`, or `OTHER_PATHS`.
    pub by_endpoint: BTreeMap<&'static str, Traffic>,
}

/// Requests to one endpoint and the body bytes it answered with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub requests: u64,
    pub body_bytes: u64,
}

impl Requests {
    /// Requests to `path`, e.g. `/v1/health/service/shop`.
    pub fn count(&self, path: &str) -> u64 {
        self.by_path.get(path).copied().unwrap_or(0)
    }

    /// What one endpoint (`CATALOG_SERVICES`, `HEALTH_SERVICE`, ...) received and answered.
    pub fn endpoint(&self, endpoint: &str) -> Traffic {
        self.by_endpoint.get(endpoint).copied().unwrap_or_default()
    }
}

/// The TCP connections the double's address saw, per client IP (as Consul counts them: from
/// accept to close, idle keep-alive time and blocked queries included).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Connections {
    /// Open right now (an IP without open connections is absent).
    pub open: BTreeMap<IpAddr, usize>,
    /// The most that were open at once.
    pub peak: BTreeMap<IpAddr, usize>,
    /// The most that were open at once, all clients together.
    pub peak_total: usize,
    /// Admitted since the start, all clients together.
    pub accepted: u64,
    /// Answered with the 429 and closed, past `max_conns_per_client`.
    pub refused: BTreeMap<IpAddr, u64>,
}

/// What a `ConsulDouble` starts with: 127.0.0.1:0 and Consul's default connection limit.
#[must_use]
pub struct ConsulDoubleBuilder {
    addr: SocketAddr,
    max_conns_per_client: usize,
    session_ttl_min: Duration,
}

impl ConsulDoubleBuilder {
    /// Listens on `addr` (e.g. an address on a test bridge) instead of 127.0.0.1:0.
    pub fn bind(mut self, addr: SocketAddr) -> ConsulDoubleBuilder {
        self.addr = addr;
        self
    }

    /// `limits.http_max_conns_per_client`: concurrent connections per client IP; 0: no limit.
    pub fn max_conns_per_client(mut self, max: usize) -> ConsulDoubleBuilder {
        self.max_conns_per_client = max;
        self
    }

    /// The server's `session_ttl_min` (default 10 s): the shortest session TTL it takes. A test
    /// that watches a session expire sets it low and creates a session with a short TTL (it
    /// still expires after twice its TTL).
    pub fn session_ttl_min(mut self, min: Duration) -> ConsulDoubleBuilder {
        self.session_ttl_min = min;
        self
    }

    /// Starts an empty catalog (the index is 1).
    pub async fn start(self) -> ConsulDouble {
        let listener = TcpListener::bind(self.addr)
            .await
            .unwrap_or_else(|e| panic!("the Consul double cannot listen on {}: {e}", self.addr));
        let addr = listener.local_addr().unwrap();
        // The HTTP server itself, behind the front door (see conns.rs).
        let server_listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let server_addr = server_listener.local_addr().unwrap();
        let (changes, _) = watch::channel(1);
        let mut state = State::new();
        state.sessions.ttl_min = self.session_ttl_min;
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            changes,
            session_timers: tokio::sync::Notify::new(),
        });
        let app = Router::new()
            .route(CATALOG_SERVICES, get(catalog_services))
            .route(HEALTH_SERVICE, get(health_service))
            .route("/v1/health/service/{*name}", get(health_service))
            .route(HEALTH_STATE, get(health_state))
            .route("/v1/health/state/{*state}", get(health_state))
            .route(KV, kv_routes())
            .route("/v1/kv/{*key}", kv_routes())
            .route("/v1/session/create", session_put(put(session_create)))
            .route("/v1/session/destroy/", session_put(put(session_destroy)))
            .route(
                "/v1/session/destroy/{*id}",
                session_put(put(session_destroy)),
            )
            .route("/v1/session/renew/", session_put(put(session_renew)))
            .route("/v1/session/renew/{*id}", session_put(put(session_renew)))
            .route("/v1/session/info/", session_get(get(session_info)))
            .route("/v1/session/info/{*id}", session_get(get(session_info)))
            .route("/v1/session/list", session_get(get(session_list)))
            .route("/v1/session/node/", session_get(get(session_node)))
            .route("/v1/session/node/{*node}", session_get(get(session_node)))
            .route(TXN, session_put(put(txn)))
            .fallback(|| async { (StatusCode::NOT_FOUND, "404 page not found") })
            .layer(axum::middleware::from_fn_with_state(shared.clone(), record))
            .with_state(shared.clone());
        let limiter = Arc::new(Limiter::new(self.max_conns_per_client));
        let timers = SessionTimers(tokio::spawn(session_timers(shared.clone())));
        ConsulDouble {
            addr,
            shared,
            front: FrontDoor::start(listener, server_addr, limiter.clone()),
            limiter,
            server: Served::start(server_listener, app),
            _timers: timers,
        }
    }
}

/// A PUT-only endpoint (`/v1/session/create`, `/destroy`, `/renew`, `/v1/txn`).
fn session_put(router: MethodRouter<Arc<Shared>>) -> MethodRouter<Arc<Shared>> {
    router.fallback(session_method_not_allowed("OPTIONS,PUT"))
}

fn session_get(router: MethodRouter<Arc<Shared>>) -> MethodRouter<Arc<Shared>> {
    router.fallback(session_method_not_allowed("OPTIONS,GET"))
}

/// The leader's session TTL timers, stopped with the double.
struct SessionTimers(tokio::task::JoinHandle<()>);

impl Drop for SessionTimers {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn kv_routes() -> MethodRouter<Arc<Shared>> {
    get(kv_get)
        .put(kv_put)
        .delete(kv_delete)
        .fallback(kv_method_not_allowed)
}

/// A running double; stopped when dropped.
pub struct ConsulDouble {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    limiter: Arc<Limiter>,
    /// Dropped first: the address closes and every client connection with it.
    front: FrontDoor,
    /// Dropped with the double: the server and every open connection go, and a panic of a
    /// handler fails the test.
    server: Served,
    _timers: SessionTimers,
}

impl ConsulDouble {
    pub fn builder() -> ConsulDoubleBuilder {
        ConsulDoubleBuilder {
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            max_conns_per_client: DEFAULT_MAX_CONNS_PER_CLIENT,
            session_ttl_min: DEFAULT_SESSION_TTL_MIN,
        }
    }

    /// An empty catalog on 127.0.0.1:0, with Consul's default connection limit.
    pub async fn start() -> ConsulDouble {
        ConsulDouble::builder().start().await
    }

    /// An empty catalog on `addr`, with Consul's default connection limit.
    pub async fn start_on(addr: SocketAddr) -> ConsulDouble {
        ConsulDouble::builder().bind(addr).start().await
    }

    /// `http://<addr>`, without a trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Fails the test with the first panic of one of the double's handlers so far (dropping
    /// the double does it too).
    pub fn check(&self) {
        self.server.check();
    }

    /// The raft index of the last write.
    pub fn index(&self) -> u64 {
        self.shared.lock().index
    }

    /// Registers a node (or moves it to `address`), with a passing `serfHealth` check.
    pub fn register_node(&self, name: &str, address: &str) {
        self.shared.write(|state, index| {
            state.ensure_node(name, Some(address), index);
            Ok(())
        });
    }

    pub fn set_node_meta(&self, node: &str, key: &str, value: &str) {
        self.shared
            .write(|state, index| state.set_node_meta(node, key, value, index));
    }

    /// Registers an instance, replacing one with the same ID (which keeps its CreateIndex; its
    /// ModifyIndex, and the indexes that wake queries, move only if something changed).
    pub fn register(&self, instance: Instance) {
        self.register_all([instance]);
    }

    /// Registers many instances in one write (one index), e.g. a catalog of 10,000 services.
    pub fn register_all(&self, instances: impl IntoIterator<Item = Instance>) {
        self.shared.write(|state, index| {
            for instance in instances {
                state.ensure_instance(instance, index);
            }
            Ok(())
        });
    }

    /// Serves `entry`, as it is, in place of the `/v1/health/service/:name` entry of the
    /// registered instance `service_id` (whose catalog entry, checks and indexes stay its own):
    /// a record no Consul writes (`"Port": -1`, `"Port": "8080"`), for a client's decoder.
    /// `None` serves the instance again. It moves no index: set it before the service is read,
    /// or follow it with a write that wakes the service.
    pub fn set_raw_health_entry(&self, service_id: &str, entry: Option<serde_json::Value>) {
        let mut state = self.shared.lock();
        match entry {
            Some(entry) => state
                .raw_health_entries
                .insert(service_id.to_string(), entry),
            None => state.raw_health_entries.remove(service_id),
        };
    }

    /// Deregisters the instance and its check; a session that names the check is invalidated
    /// in the same write.
    pub fn deregister(&self, service_id: &str) {
        self.shared
            .write(|state, index| state.remove_instance(service_id, index));
    }

    /// Sets the status of the instance's service check. Setting the status it has is a write
    /// that changes nothing: no query wakes. Critical invalidates the sessions that name the
    /// check (`service:<id>`) in the same write.
    pub fn set_check(&self, service_id: &str, status: Status) {
        self.shared.write(|state, index| {
            state.update_check(service_id, index, |check| check.status = status)
        });
    }

    /// Changes only the check's Output text: the indexes move, nothing a router uses changes.
    pub fn set_check_output(&self, service_id: &str, output: &str) {
        self.shared.write(|state, index| {
            state.update_check(service_id, index, |check| check.output = output.to_string())
        });
    }

    /// Sets the node's `serfHealth`: anything but passing hides all its instances from
    /// `?passing`; critical also invalidates, in the same write, every session of the node
    /// that names `serfHealth` (the default), as a failed node does.
    pub fn set_node_check(&self, node: &str, status: Status) {
        self.shared
            .write(|state, index| state.set_node_check(node, status, index));
    }

    /// A write that moves every catalog endpoint's index without changing content: every
    /// blocked catalog or health query returns the same data again (KV queries stay blocked).
    pub fn bump_index(&self) {
        self.shared.write(|state, index| {
            state.bump(index);
            Ok(())
        });
    }

    /// Writes `value` at `key` (flags 0) as one raft write, like `PUT /v1/kv/:key`: a new key's
    /// CreateIndex and ModifyIndex are the write's index; the same value again changes nothing.
    pub fn kv_put(&self, key: &str, value: impl AsRef<[u8]>) {
        let value = value.as_ref().to_vec();
        self.shared.write(|state, index| {
            state.kv.set(key, value, 0, index);
            Ok(())
        });
    }

    /// The value at `key` (empty for a key written without a body).
    pub fn kv_get(&self, key: &str) -> Option<Vec<u8>> {
        self.kv_entry(key).map(|entry| entry.value)
    }

    /// The entry at `key`, with its flags and raft indexes.
    pub fn kv_entry(&self, key: &str) -> Option<KvEntry> {
        self.shared.lock().kv.entries.get(key).cloned()
    }

    /// Every key that starts with `prefix` (`""`: all), in order.
    pub fn kv_keys(&self, prefix: &str) -> Vec<String> {
        let state = self.shared.lock();
        state.kv.under(prefix).map(|e| e.key.clone()).collect()
    }

    /// Deletes `key` (a tombstone remembers the deletion's index), like `DELETE /v1/kv/:key`;
    /// a missing key is a write that changes nothing.
    pub fn kv_delete(&self, key: &str) {
        self.shared.write(|state, index| {
            state.kv.delete(key, index);
            Ok(())
        });
    }

    /// Deletes every key under `prefix`, like `DELETE /v1/kv/:prefix?recurse`.
    pub fn kv_delete_tree(&self, prefix: &str) {
        self.shared.write(|state, index| {
            state.kv.delete_tree(prefix, index);
            Ok(())
        });
    }

    /// The session holding the lock on `key`, if the key exists and is locked.
    pub fn kv_lock_holder(&self, key: &str) -> Option<String> {
        self.kv_entry(key).and_then(|entry| entry.session)
    }

    /// How long `?acquire=` of `key` stays refused: what is left of the lock delay an
    /// invalidated session put on it (`None`: none, or it has passed).
    pub fn kv_lock_delay(&self, key: &str) -> Option<Duration> {
        let now = tokio::time::Instant::now();
        let until = self.shared.lock().kv.lock_delay(key, now)?;
        Some(until - now)
    }

    /// Every live session, by ID.
    pub fn sessions(&self) -> Vec<SessionEntry> {
        self.shared.lock().sessions.all().cloned().collect()
    }

    pub fn session(&self, id: &str) -> Option<SessionEntry> {
        self.shared.lock().sessions.get(id).cloned()
    }

    pub fn session_exists(&self, id: &str) -> bool {
        self.session(id).is_some()
    }

    /// Invalidates a session as Consul does when its node or one of its checks fails, or its
    /// TTL runs out: one raft write; its keys are released or deleted (its behavior) and its
    /// lock delay starts on them. Fails the test for an unknown session.
    pub fn invalidate_session(&self, id: &str) {
        self.shared.write(|state, index| {
            if state.invalidate_session(id, index) {
                Ok(())
            } else {
                Err(format!("no session {id:?} to invalidate"))
            }
        });
    }

    /// With `Some(token)`, ACLs are on with a default policy of deny: `X-Consul-Token`,
    /// `Authorization: Bearer` or `?token=` must carry `token` to read anything. No token
    /// reads as anonymous (filtered: `200 []`, a catalog without services); any other token
    /// is unknown to Consul: `403 ACL not found`. In the KV store, the anonymous token gets
    /// `403 Permission denied` for a key and for every write, and a 404 for a list (`?recurse`,
    /// `?keys`; at the root `?keys` is `200 []`), as ACLs filtered every entry away.
    pub fn set_token(&self, token: Option<String>) {
        self.shared.lock().token = token;
    }

    pub fn set_fault(&self, fault: Fault) {
        let mut state = self.shared.lock();
        if fault == Fault::IndexBackwards && state.fault != Fault::IndexBackwards {
            state.index_offset = (state.index / 2).max(1);
        } else if fault != Fault::IndexBackwards {
            state.index_offset = 0;
        }
        state.fault = fault;
    }

    /// Changes `limits.http_max_conns_per_client` (0: no limit) as a config reload does: open
    /// connections stay open, even past a lowered limit.
    pub fn set_max_conns_per_client(&self, max: usize) {
        self.limiter.set_max_per_ip(max);
    }

    pub fn connections(&self) -> Connections {
        self.limiter.counts()
    }

    pub fn requests(&self) -> Requests {
        self.shared.lock().requests.clone()
    }

    /// The raw query string of the last request to `path` (`""` without one).
    pub fn last_query(&self, path: &str) -> Option<String> {
        self.shared.lock().last_query.get(path).cloned()
    }

    /// How many blocking queries on `path` are waiting right now.
    pub fn blocked_queries(&self, path: &str) -> usize {
        self.shared.lock().blocked.get(path).copied().unwrap_or(0)
    }

    /// Waits until at least `count` blocking queries wait on `path`; panics after 10 s (scaled).
    pub async fn wait_for_blocked_queries(&self, path: &str, count: usize) {
        let what = format!("{count} blocking queries on {path}");
        crate::support::eventually(Duration::from_secs(10), &what, || async {
            match self.blocked_queries(path) {
                blocked if blocked >= count => Ok(()),
                blocked => Err(blocked),
            }
        })
        .await
    }
}
