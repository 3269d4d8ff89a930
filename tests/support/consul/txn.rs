//! Consul's transaction endpoint, `PUT /v1/txn`, for KV operations: the body as Consul's HTTP
//! layer decodes it (`convertOps` in `agent/txn_endpoint.go`: Go's `encoding/json` into
//! `api.TxnOps`, with `DisallowUnknownFields`), the leader's checks before raft (`Txn.preCheck`
//! in `agent/consul/txn_endpoint.go`, `kvsPreApply` in `agent/consul/kvs_endpoint.go`), the
//! operations as the state store runs them in one memdb transaction (`txnKVS`, `txnDispatch`,
//! `TxnRW`, `TxnRO` in `agent/consul/state/txn.go`, the `kvs*Txn` functions of `kvs.go`), and the
//! JSON of `structs.TxnResponse` and `structs.TxnReadResponse` (`agent/structs/txn.go`).

use serde::Serialize;
use serde_json::{Map, Value};
use tokio::time::Instant;

use super::go::{go_base64_decode, go_json_kind, go_quote};
use super::json::KvJson;
use super::kv::KvEntry;
use super::state::State;

/// `maxTxnOps` (`agent/txn_endpoint.go`): the most operations a transaction may hold, 128 since
/// Consul 1.14 (hashicorp/consul#14599; 64 before).
pub const TXN_MAX_OPS: usize = 128;
/// `limits.txn_max_req_len`'s default: the largest body `/v1/txn` reads (`convertOps` takes the
/// larger of it and `kv_max_value_size`, both 512 KiB by default).
pub const TXN_MAX_REQ_LEN: usize = 512 * 1024;
/// Where Consul's 413 for a too large transaction body points.
pub(super) const TXN_MAX_REQ_LEN_DOCS: &str =
    "https://www.consul.io/docs/agent/config/config-files#txn_max_req_len";

/// An `api.KVTxnOp`, as `convertOps` turns it into a `structs.TxnKVOp` (`Index` is the
/// `DirEntry`'s ModifyIndex). `Namespace` and `Partition` are decoded and dropped, as Consul CE
/// does.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct KvOp {
    pub(super) verb: String,
    pub(super) key: String,
    pub(super) value: Vec<u8>,
    pub(super) flags: u64,
    pub(super) index: u64,
    pub(super) session: String,
}

impl KvOp {
    /// `isWrite`: a transaction with one of these goes through raft (`Txn.Apply`); without,
    /// it is a read (`Txn.Read`). An unknown verb is not a write.
    pub(super) fn is_write(&self) -> bool {
        matches!(
            self.verb.as_str(),
            "set" | "delete" | "delete-cas" | "delete-tree" | "cas" | "lock" | "unlock"
        )
    }
}

/// Why a body is not a transaction.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum BodyError {
    /// Nothing but white space: Go's `EOF`.
    Empty,
    /// The JSON stops before its end: Go's `unexpected EOF` (or, when the body was cut at the
    /// size limit, the 413 of `http.MaxBytesReader`).
    Incomplete,
    /// What Go's decoder says (in the double's words for a JSON syntax error).
    Parse(String),
    /// A body the double does not take (see `decode`).
    Unsupported(String),
}

/// Decodes a body as `decodeBody` (`lib.DecodeJSON`) does into `api.TxnOps`: the first JSON
/// value only (Go's `Decoder` stops there: trailing bytes are never looked at); `null` is no
/// operation at all; field names matched without case; an unknown field is `json: unknown
/// field "<name>"`; a wrong type is Go's `UnmarshalTypeError` text; `Value` is base64 (Go's
/// `StdEncoding`, or an array of bytes), and the first error in the body is the one reported.
/// Each element is `Some` for an operation with a `KV` member, `None` for one without (which
/// `convertOps` drops: it is not counted in the `OpIndex` of later operations, but it is in
/// `maxTxnOps`).
///
/// The double refuses, with a 400 of its own, a `Node`, `Service` or `Check` operation (it does
/// not apply catalog operations) and a `null` element (`convertOps` dereferences it: Consul's
/// handler panics and the client gets no answer).
pub(super) fn decode(body: &[u8]) -> Result<Vec<Option<KvOp>>, BodyError> {
    let mut values = serde_json::Deserializer::from_slice(body).into_iter::<Value>();
    let value = match values.next() {
        None => return Err(BodyError::Empty),
        Some(Err(e)) if e.is_eof() => return Err(BodyError::Incomplete),
        Some(Err(e)) => return Err(BodyError::Parse(e.to_string())),
        Some(Ok(value)) => value,
    };
    let items = match value {
        Value::Null => Vec::new(),
        Value::Array(items) => items,
        other => {
            return Err(BodyError::Parse(format!(
                "json: cannot unmarshal {} into Go value of type api.TxnOps",
                go_json_kind(&other)
            )))
        }
    };
    let mut decoder = GoDecoder::default();
    let mut ops = Vec::with_capacity(items.len());
    for item in &items {
        let op = match item {
            Value::Object(fields) => decoder.txn_op(fields),
            Value::Null => {
                decoder.null_op = true;
                None
            }
            other => {
                decoder.save(format!(
                    "json: cannot unmarshal {} into Go value of type api.TxnOp",
                    go_json_kind(other)
                ));
                None
            }
        };
        ops.push(op);
    }
    if let Some(error) = decoder.error {
        return Err(BodyError::Parse(error));
    }
    if decoder.null_op {
        return Err(BodyError::Unsupported(
            "A null operation in a transaction is not answered by Consul (its handler \
             dereferences it) nor by the Consul test double"
                .to_string(),
        ));
    }
    if let Some(kind) = decoder.catalog_op {
        return Err(BodyError::Unsupported(format!(
            "{kind} operations in a transaction are not implemented by the Consul test double"
        )));
    }
    Ok(ops)
}

/// Go's `encoding/json` decoding into `api.TxnOp`: it keeps the first error and goes on.
#[derive(Default)]
struct GoDecoder {
    error: Option<String>,
    null_op: bool,
    catalog_op: Option<&'static str>,
}

const TXN_OP_FIELDS: [&str; 4] = ["KV", "Node", "Service", "Check"];
const KV_TXN_OP_FIELDS: [&str; 8] = [
    "Verb",
    "Key",
    "Value",
    "Flags",
    "Index",
    "Session",
    "Namespace",
    "Partition",
];

/// The Go field a JSON key decodes into: an exact match, else one without case.
fn go_field(name: &str, fields: &[&'static str]) -> Option<&'static str> {
    let exact = fields.iter().find(|field| **field == name);
    exact
        .or_else(|| fields.iter().find(|field| field.eq_ignore_ascii_case(name)))
        .copied()
}

impl GoDecoder {
    fn save(&mut self, error: String) {
        self.error.get_or_insert(error);
    }

    /// `UnmarshalTypeError` in a field of `api.KVTxnOp` (the path starts at `TxnOp`).
    fn kv_type_error(&mut self, value: &str, field: &str, go_type: &str) {
        self.save(format!(
            "json: cannot unmarshal {value} into Go struct field KVTxnOp.KV.{field} of type \
             {go_type}"
        ));
    }

    fn txn_op(&mut self, fields: &Map<String, Value>) -> Option<KvOp> {
        let mut kv = None;
        for (name, value) in fields {
            match go_field(name, &TXN_OP_FIELDS) {
                Some("KV") => match value {
                    Value::Null => kv = None,
                    Value::Object(fields) => kv = Some(self.kv_op(fields)),
                    other => self.save(format!(
                        "json: cannot unmarshal {} into Go struct field TxnOp.KV of type \
                         api.KVTxnOp",
                        go_json_kind(other)
                    )),
                },
                Some(kind) => {
                    if !value.is_null() {
                        self.catalog_op.get_or_insert(kind);
                    }
                }
                None => self.save(format!("json: unknown field {}", go_quote(name))),
            }
        }
        kv
    }

    fn kv_op(&mut self, fields: &Map<String, Value>) -> KvOp {
        let mut op = KvOp::default();
        for (name, value) in fields {
            let Some(field) = go_field(name, &KV_TXN_OP_FIELDS) else {
                self.save(format!("json: unknown field {}", go_quote(name)));
                continue;
            };
            match field {
                "Verb" => self.string(value, field, "api.KVOp", &mut op.verb),
                "Key" => self.string(value, field, "string", &mut op.key),
                "Session" => self.string(value, field, "string", &mut op.session),
                "Namespace" | "Partition" => {
                    self.string(value, field, "string", &mut String::new())
                }
                "Value" => op.value = self.bytes(value),
                "Flags" => self.uint(value, field, &mut op.flags),
                _ => self.uint(value, field, &mut op.index),
            }
        }
        op
    }

    /// A string field (`null` leaves it as it is).
    fn string(&mut self, value: &Value, field: &str, go_type: &str, into: &mut String) {
        match value {
            Value::Null => {}
            Value::String(text) => *into = text.clone(),
            other => self.kv_type_error(go_json_kind(other), field, go_type),
        }
    }

    /// A `uint64` field: `strconv.ParseUint` of the number's text.
    fn uint(&mut self, value: &Value, field: &str, into: &mut u64) {
        match value {
            Value::Null => {}
            Value::Number(number) => match number.as_u64() {
                Some(number) => *into = number,
                None => self.kv_type_error(&format!("number {number}"), field, "uint64"),
            },
            other => self.kv_type_error(go_json_kind(other), field, "uint64"),
        }
    }

    /// A `[]byte`: a base64 string (`StdEncoding`), or an array of numbers 0-255.
    fn bytes(&mut self, value: &Value) -> Vec<u8> {
        match value {
            Value::Null => Vec::new(),
            Value::String(text) => go_base64_decode(text.as_bytes()).unwrap_or_else(|at| {
                self.save(format!("illegal base64 data at input byte {at}"));
                Vec::new()
            }),
            Value::Array(items) => items
                .iter()
                .map(|item| match item {
                    Value::Null => 0,
                    Value::Number(number) => match number.as_u64().map(u8::try_from) {
                        Some(Ok(byte)) => byte,
                        _ => {
                            self.kv_type_error(&format!("number {number}"), "Value", "uint8");
                            0
                        }
                    },
                    other => {
                        self.kv_type_error(go_json_kind(other), "Value", "uint8");
                        0
                    }
                })
                .collect(),
            other => {
                self.kv_type_error(go_json_kind(other), "Value", "[]uint8");
                Vec::new()
            }
        }
    }
}

/// `structs.TxnError`: which operation failed (its place among the KV operations) and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct TxnError {
    pub(super) op_index: usize,
    pub(super) what: String,
}

/// What a KV operation hands back: the entry, and whether its `Value` is shown (only `get`,
/// `get-or-empty` and `get-tree` show it; the others blank it to save space).
#[derive(Clone, Debug)]
pub(super) struct TxnResult {
    entry: KvEntry,
    with_value: bool,
}

impl TxnResult {
    fn read(entry: &KvEntry) -> TxnResult {
        TxnResult {
            entry: entry.clone(),
            with_value: true,
        }
    }

    fn written(entry: &KvEntry) -> TxnResult {
        TxnResult {
            entry: entry.clone(),
            with_value: false,
        }
    }
}

impl State {
    /// `Txn.preCheck` for KV operations, before raft and before a read: each operation passes
    /// `kvsPreApply` or gives one error (every operation is looked at). A key is required but
    /// for `delete-tree` (`Must provide key`); with ACLs, the anonymous token may run
    /// `get`, `get-tree` and `get-or-empty` (their results are filtered afterwards), nothing
    /// else (`check-session` and `check-index` need `key:read`, `delete-tree` `key:write` on
    /// the prefix, every other verb, `check-not-exists` and unknown ones included, `key:write`);
    /// a `lock` within the key's lock delay fails (`failed to lock key "<key>" due to lock
    /// delay`).
    pub(super) fn txn_pre_check(
        &self,
        ops: &[KvOp],
        anonymous: bool,
        denied: &str,
        now: Instant,
    ) -> Vec<TxnError> {
        let check = |op: &KvOp| {
            if op.key.is_empty() && op.verb != "delete-tree" {
                return Err("Must provide key".to_string());
            }
            let read = matches!(op.verb.as_str(), "get" | "get-tree" | "get-or-empty");
            if anonymous && !read {
                return Err(denied.to_string());
            }
            if op.verb == "lock" && self.kv.lock_delay(&op.key, now).is_some() {
                return Err(format!(
                    "failed to lock key {} due to lock delay",
                    go_quote(&op.key)
                ));
            }
            Ok(())
        };
        ops.iter()
            .enumerate()
            .filter_map(|(op_index, op)| check(op).err().map(|what| TxnError { op_index, what }))
            .collect()
    }

    /// `TxnRW`, the FSM's side of `Txn.Apply`: every operation runs at `index`, in order, each
    /// seeing what the ones before it wrote (`txnDispatch` goes on after a failure and reports
    /// every one). If any failed, the memdb transaction is aborted: the KV store is put back as
    /// it was, no entry and no KV index moves (the raft entry was spent all the same).
    pub(super) fn txn_write(
        &mut self,
        ops: &[KvOp],
        index: u64,
    ) -> Result<Vec<TxnResult>, Vec<TxnError>> {
        let before = self.kv.clone();
        let outcome = self.txn_dispatch(ops, index);
        if outcome.is_err() {
            self.kv = before;
        }
        outcome
    }

    /// `TxnRO`, for `Txn.Read`: a transaction without a write verb, so nothing changes.
    pub(super) fn txn_read(&mut self, ops: &[KvOp]) -> Result<Vec<TxnResult>, Vec<TxnError>> {
        debug_assert!(!ops.iter().any(KvOp::is_write));
        let index = self.index;
        self.txn_dispatch(ops, index)
    }

    /// `txnDispatch`.
    fn txn_dispatch(&mut self, ops: &[KvOp], index: u64) -> Result<Vec<TxnResult>, Vec<TxnError>> {
        let mut results = Vec::new();
        let mut errors = Vec::new();
        for (op_index, op) in ops.iter().enumerate() {
            match self.txn_kv(op, index) {
                Ok(entries) => results.extend(entries),
                Err(what) => errors.push(TxnError { op_index, what }),
            }
        }
        if errors.is_empty() {
            Ok(results)
        } else {
            Err(errors)
        }
    }

    /// `txnKVS`: one operation, with the state store's own errors. The writes are those of the
    /// KV endpoint (`kvsSetTxn`, `kvsSetCASTxn`, `kvsLockTxn`, `kvsUnlockTxn`, `kvsDeleteTxn`,
    /// `kvsDeleteCASTxn`, `kvsDeleteTreeTxn`), so a `lock` is an `?acquire=` (the session must
    /// exist; a fresh lock raises the LockIndex) and an `unlock` a `?release=`. A write answers
    /// the entry as written without its value; a deletion answers nothing.
    fn txn_kv(&mut self, op: &KvOp, index: u64) -> Result<Vec<TxnResult>, String> {
        let key = op.key.as_str();
        let quoted = go_quote(key);
        let value = || op.value.clone();
        match op.verb.as_str() {
            "set" => self.kv.set(key, value(), op.flags, index),
            "cas" => {
                if !self.kv.set_cas(key, value(), op.flags, op.index, index) {
                    return Err(format!("failed to set key {quoted}, index is stale"));
                }
            }
            "lock" => {
                if !self.kv_lock(key, value(), op.flags, &op.session, index)? {
                    return Err(format!("failed to lock key {quoted}, lock is already held"));
                }
            }
            "unlock" => {
                if !self.kv_unlock(key, value(), op.flags, &op.session, index)? {
                    return Err(format!(
                        "failed to unlock key {quoted}, lock isn't held, or is held by another \
                         session"
                    ));
                }
            }
            "delete" => {
                self.kv.delete(key, index);
                return Ok(Vec::new());
            }
            "delete-cas" => {
                if !self.kv.delete_cas(key, op.index, index) {
                    return Err(format!("failed to delete key {quoted}, index is stale"));
                }
                return Ok(Vec::new());
            }
            "delete-tree" => {
                self.kv.delete_tree(key, index);
                return Ok(Vec::new());
            }
            "get" => {
                return match self.kv.entries.get(key) {
                    Some(entry) => Ok(vec![TxnResult::read(entry)]),
                    None => Err(format!("key {quoted} doesn't exist")),
                }
            }
            // A missing key answers the operation's own entry, without a value.
            "get-or-empty" => {
                let entry = self
                    .kv
                    .entries
                    .get(key)
                    .cloned()
                    .unwrap_or_else(|| KvEntry {
                        key: key.to_string(),
                        value: Vec::new(),
                        flags: op.flags,
                        lock_index: 0,
                        session: (!op.session.is_empty()).then(|| op.session.clone()),
                        create_index: 0,
                        modify_index: op.index,
                    });
                return Ok(vec![TxnResult::read(&entry)]);
            }
            "get-tree" => return Ok(self.kv.under(key).map(TxnResult::read).collect()),
            "check-session" => {
                let entry = self.kv.entries.get(key).ok_or_else(|| {
                    format!("failed to check session, key {quoted} doesn't exist")
                })?;
                let current = entry.session.as_deref().unwrap_or_default();
                if current != op.session {
                    return Err(format!(
                        "failed session check for key {quoted}, current session {} != {}",
                        go_quote(current),
                        go_quote(&op.session)
                    ));
                }
                return Ok(vec![TxnResult::written(entry)]);
            }
            "check-index" => {
                let entry =
                    self.kv.entries.get(key).ok_or_else(|| {
                        format!("failed to check index, key {quoted} doesn't exist")
                    })?;
                if entry.modify_index != op.index {
                    return Err(format!(
                        "failed index check for key {quoted}, current modify index {} != {}",
                        entry.modify_index, op.index
                    ));
                }
                return Ok(vec![TxnResult::written(entry)]);
            }
            "check-not-exists" => {
                if self.kv.entries.contains_key(key) {
                    return Err(format!("key {quoted} exists"));
                }
                return Ok(Vec::new());
            }
            verb => return Err(format!("unknown KV verb {}", go_quote(verb))),
        }
        // The entry as the write left it (`kvsSetTxn` hands back the stored one when nothing
        // changed).
        Ok(self
            .kv
            .entries
            .get(key)
            .map(TxnResult::written)
            .into_iter()
            .collect())
    }
}

/// `structs.TxnResponse`: `Results` on success (`[]` when no operation answers anything),
/// `null` on failure; `Errors` the other way round.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct TxnResponseJson {
    results: Option<Vec<TxnResultJson>>,
    errors: Option<Vec<TxnErrorJson>>,
}

/// `structs.TxnResult`: only the `KV` member is set (the others are `omitempty`).
#[derive(Serialize)]
struct TxnResultJson {
    #[serde(rename = "KV")]
    kv: KvJson,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct TxnErrorJson {
    op_index: usize,
    what: String,
}

impl TxnResponseJson {
    /// A transaction's outcome. `readable` is `FilterTxnResults`: without it (the anonymous
    /// token) every KV result is filtered away.
    pub(super) fn new(
        outcome: Result<Vec<TxnResult>, Vec<TxnError>>,
        readable: bool,
    ) -> TxnResponseJson {
        match outcome {
            Ok(results) => TxnResponseJson {
                results: Some(
                    results
                        .into_iter()
                        .filter(|_| readable)
                        .map(|result| {
                            let mut entry = result.entry;
                            if !result.with_value {
                                entry.value.clear();
                            }
                            TxnResultJson {
                                kv: KvJson::new(&entry),
                            }
                        })
                        .collect(),
                ),
                errors: None,
            },
            Err(errors) => TxnResponseJson {
                results: None,
                errors: Some(
                    errors
                        .into_iter()
                        .map(|error| TxnErrorJson {
                            op_index: error.op_index,
                            what: error.what,
                        })
                        .collect(),
                ),
            },
        }
    }
}

/// `structs.TxnReadResponse`, the answer of a transaction without writes: the
/// `TxnResponse` and the embedded `structs.QueryMeta`, whose fields Go writes beside
/// `Results` and `Errors`.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct TxnReadJson {
    #[serde(flatten)]
    response: TxnResponseJson,
    index: u64,
    /// Nanoseconds (`time.Duration`).
    last_contact: u64,
    known_leader: bool,
    consistency_level: &'static str,
    not_modified: bool,
    backend: u8,
    #[serde(rename = "ResultsFilteredByACLs")]
    results_filtered_by_acls: bool,
}

impl TxnReadJson {
    /// `meta`: `Some((last_contact_ns, known_leader))` once `SetQueryMeta` ran (after the
    /// read: `Index` is then at least 1); `None` when `preCheck` failed and `Txn.Read` returned
    /// before it (every field zero). `ResultsFilteredByACLs` stays false: `SetQueryMeta` masks it
    /// for the anonymous token, and a valid token reads everything.
    pub(super) fn new(response: TxnResponseJson, meta: Option<(u64, bool)>) -> TxnReadJson {
        let (index, last_contact, known_leader) = match meta {
            Some((last_contact, known_leader)) => (1, last_contact, known_leader),
            None => (0, 0, false),
        };
        TxnReadJson {
            response,
            index,
            last_contact,
            known_leader,
            consistency_level: "",
            not_modified: false,
            backend: 0,
            results_filtered_by_acls: false,
        }
    }
}
