//! Consul's sessions and the KV locks they hold: the `sessions` table with its entry of the
//! `index` table, the session TTL timers of the leader, and what invalidating a session does to
//! its keys. It follows `agent/session_endpoint.go` (HTTP), `agent/consul/session_endpoint.go`
//! (RPC: checks before raft), `agent/consul/session_ttl.go` (timers),
//! `agent/consul/state/session.go`, `session_ce.go` (state) and `agent/structs/structs.go`
//! (`structs.Session`, its JSON decoding and constants).

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::time::Instant;

use super::go::{go_duration_string, go_json_kind, go_parse_duration, go_quote};
use super::state::State;
use super::{Status, DEFAULT_NODE};

/// `structs.SessionTTLMax`.
pub const SESSION_TTL_MAX: Duration = Duration::from_secs(24 * 3600);
/// `session_ttl_min`'s default (`SessionTTLMin` of the server config).
pub const DEFAULT_SESSION_TTL_MIN: Duration = Duration::from_secs(10);
/// `structs.SessionTTLMultiplier`: a session expires TTL × 2 after its last renewal.
pub const SESSION_TTL_MULTIPLIER: u32 = 2;
/// The `LockDelay` of a session created without one (`SessionCreate`).
pub const DEFAULT_LOCK_DELAY: Duration = Duration::from_secs(15);
/// `structs.MaxLockDelay`: the longest lock delay an invalidation applies (a session may be
/// created with a longer one, which is kept and shown as it is).
pub const MAX_LOCK_DELAY: Duration = Duration::from_secs(60);
/// `lockDelayMinThreshold`: a `LockDelay` below 1000 (ns) is taken as seconds.
const LOCK_DELAY_MIN_THRESHOLD: i64 = 1000;
/// `structs.SerfCheckID`, every session's default node check.
pub const SERF_CHECK_ID: &str = "serfHealth";

/// What happens to a session's keys when it is invalidated (`structs.SessionBehavior`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behavior {
    /// The keys are unlocked (`Session` cleared; LockIndex, value and flags kept).
    Release,
    /// The keys are deleted.
    Delete,
}

impl Behavior {
    pub fn as_str(self) -> &'static str {
        match self {
            Behavior::Release => "release",
            Behavior::Delete => "delete",
        }
    }
}

/// `structs.ServiceCheck`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceCheck {
    pub id: String,
    pub namespace: String,
}

/// One session, as a test reads it with `ConsulDouble::sessions` (Consul's `structs.Session`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionEntry {
    pub id: String,
    pub name: String,
    pub node: String,
    /// In nanoseconds, as Consul keeps and writes it (`time.Duration`).
    pub lock_delay: i64,
    pub behavior: Behavior,
    /// As the client wrote it (`""`: no TTL).
    pub ttl: String,
    /// `None` is Go's nil slice: `null` in the JSON.
    pub node_checks: Option<Vec<String>>,
    pub service_checks: Option<Vec<ServiceCheck>>,
    /// The deprecated `Checks`, omitted from the JSON when empty: `SessionCreate` empties it
    /// when it holds only the default `serfHealth` (`fixupEmptySessionChecks`).
    pub checks: Option<Vec<String>>,
    pub create_index: u64,
    pub modify_index: u64,
}

impl SessionEntry {
    /// `Session.CheckIDs`: `Checks`, `NodeChecks`, then the `ServiceChecks`' IDs, all of them
    /// checks of the session's node.
    pub fn check_ids(&self) -> Vec<&str> {
        let checks = self.checks.iter().flatten().map(String::as_str);
        let node_checks = self.node_checks.iter().flatten().map(String::as_str);
        let service_checks = self.service_checks.iter().flatten();
        checks
            .chain(node_checks)
            .chain(service_checks.map(|check| check.id.as_str()))
            .collect()
    }

    /// The TTL timer's length (`resetSessionTimer`, `createSessionTimer`): TTL ×
    /// `SessionTTLMultiplier`, none without a TTL or with a zero one.
    fn timer(&self) -> Option<Duration> {
        if matches!(self.ttl.as_str(), "" | "0" | "0s" | "0m" | "0h") {
            return None;
        }
        let nanos = go_parse_duration(&self.ttl).ok()?;
        let nanos = u64::try_from(nanos).ok().filter(|nanos| *nanos > 0)?;
        Some(Duration::from_nanos(nanos) * SESSION_TTL_MULTIPLIER)
    }
}

/// The `sessions` table, by lower-case ID: Consul's ID index lower-cases what it looks up
/// (`indexFromQuery`), so an ID in capitals finds its session.
pub(super) struct Sessions {
    live: BTreeMap<String, Live>,
    /// The `sessions` entry of the index table: the last session created or deleted.
    pub(super) index: u64,
    /// The server's `session_ttl_min`.
    pub(super) ttl_min: Duration,
}

struct Live {
    entry: SessionEntry,
    /// When the leader's TTL timer fires, if the session has a TTL.
    expires: Option<Instant>,
}

impl Default for Sessions {
    fn default() -> Sessions {
        Sessions {
            live: BTreeMap::new(),
            index: 0,
            ttl_min: DEFAULT_SESSION_TTL_MIN,
        }
    }
}

impl Sessions {
    pub(super) fn get(&self, id: &str) -> Option<&SessionEntry> {
        self.live
            .get(&id.to_ascii_lowercase())
            .map(|live| &live.entry)
    }

    /// `SessionList`: by ID.
    pub(super) fn all(&self) -> impl Iterator<Item = &SessionEntry> {
        self.live.values().map(|live| &live.entry)
    }

    /// `NodeSessions`: the node's sessions (the node index is case-insensitive), by ID.
    pub(super) fn on_node<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a SessionEntry> {
        self.all()
            .filter(move |session| session.node.eq_ignore_ascii_case(node))
    }

    /// `resetSessionTimer` after a create or a renewal: the timer restarts at TTL × 2 from
    /// `now`. `None` for an unknown session.
    pub(super) fn reset_timer(&mut self, id: &str, now: Instant) -> Option<SessionEntry> {
        let live = self.live.get_mut(&id.to_ascii_lowercase())?;
        live.expires = live.entry.timer().map(|timer| now + timer);
        Some(live.entry.clone())
    }

    /// A session whose timer has run out.
    pub(super) fn first_due(&self, now: Instant) -> Option<String> {
        self.live
            .values()
            .find(|live| live.expires.is_some_and(|expires| expires <= now))
            .map(|live| live.entry.id.clone())
    }

    /// When the next timer fires.
    pub(super) fn next_expiry(&self) -> Option<Instant> {
        self.live.values().filter_map(|live| live.expires).min()
    }

    pub(super) fn len(&self) -> usize {
        self.live.len()
    }
}

/// A `PUT /v1/session/create` body, with `SessionCreate`'s defaults: the agent's node, its
/// `serfHealth`, a 15 s lock delay, `release`, no TTL.
pub(super) struct NewSession {
    pub(super) name: String,
    pub(super) node: String,
    pub(super) lock_delay: i64,
    pub(super) behavior: String,
    pub(super) ttl: String,
    pub(super) checks: Option<Vec<String>>,
    pub(super) node_checks: Option<Vec<String>>,
    pub(super) service_checks: Option<Vec<ServiceCheck>>,
}

impl Default for NewSession {
    fn default() -> NewSession {
        NewSession {
            name: String::new(),
            node: DEFAULT_NODE.to_string(),
            lock_delay: nanos(DEFAULT_LOCK_DELAY),
            behavior: Behavior::Release.as_str().to_string(),
            ttl: String::new(),
            checks: Some(vec![SERF_CHECK_ID.to_string()]),
            node_checks: Some(vec![SERF_CHECK_ID.to_string()]),
            service_checks: None,
        }
    }
}

fn nanos(duration: Duration) -> i64 {
    i64::try_from(duration.as_nanos()).unwrap_or(i64::MAX)
}

impl NewSession {
    /// Decodes a body over the defaults as Go's `encoding/json` does into `structs.Session`:
    /// keys matched without case, unknown keys ignored, `null` leaves a field as it is
    /// (a slice becomes nil), then `Session.UnmarshalJSON` for `LockDelay` (a duration string, or
    /// a number of nanoseconds; below 1000 it is taken as seconds; another type gives 0). The
    /// error is the text after Consul's `Request decode failed: `;
    /// Go's own wording is imitated for a wrong type and a bad duration only.
    pub(super) fn decode(body: &[u8]) -> Result<NewSession, String> {
        let value: Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
        let Value::Object(object) = value else {
            return Err(format!(
                "json: cannot unmarshal {} into Go value of type structs.Alias",
                go_json_kind(&value)
            ));
        };
        let mut session = NewSession::default();
        if let Some(name) = string_field(&object, "Name")? {
            session.name = name;
        }
        if let Some(node) = string_field(&object, "Node")? {
            session.node = node;
        }
        if let Some(behavior) = string_field(&object, "Behavior")? {
            session.behavior = behavior;
        }
        if let Some(ttl) = string_field(&object, "TTL")? {
            session.ttl = ttl;
        }
        if let Some(checks) = strings_field(&object, "Checks")? {
            session.checks = checks;
        }
        if let Some(checks) = strings_field(&object, "NodeChecks")? {
            session.node_checks = checks;
        }
        if let Some(value) = field(&object, "ServiceChecks") {
            session.service_checks = service_checks(value)?;
        }
        if let Some(value) = field(&object, "LockDelay").filter(|value| !value.is_null()) {
            let delay = match value {
                Value::String(text) => go_parse_duration(text)?,
                // `time.Duration(v)` of a float64: truncated toward zero, saturating.
                #[allow(clippy::cast_possible_truncation)]
                Value::Number(number) => number.as_f64().map_or(0, |v| v as i64),
                _ => 0,
            };
            session.lock_delay = if delay < LOCK_DELAY_MIN_THRESHOLD {
                delay.saturating_mul(1_000_000_000)
            } else {
                delay
            };
        }
        Ok(session)
    }

    /// `fixupEmptySessionChecks`: an empty `Checks` empties `NodeChecks`; `Checks` holding only
    /// `serfHealth` (the default) goes; an empty `NodeChecks` empties `Checks`.
    /// `SessionCreate` applies it with or without a body.
    pub(super) fn fixup_empty_checks(&mut self) {
        let checks = self.checks.as_deref().unwrap_or_default();
        if checks.is_empty() {
            self.node_checks = Some(Vec::new());
        } else if checks == [SERF_CHECK_ID]
            || self.node_checks.as_deref().unwrap_or_default().is_empty()
        {
            self.checks = None;
        }
    }

    /// `Session.Apply`'s checks before raft, in its order after `Must provide Node` and the
    /// ACL: the behavior (`""` is `release`), then the TTL (a Go duration; 0 is no TTL;
    /// otherwise within `[session_ttl_min, 24h]`). The errors are Consul's.
    pub(super) fn check(&self, ttl_min: Duration) -> Result<Behavior, String> {
        let behavior = match self.behavior.as_str() {
            "" | "release" => Behavior::Release,
            "delete" => Behavior::Delete,
            other => return Err(format!("Invalid Behavior setting '{other}'")),
        };
        if !self.ttl.is_empty() {
            let ttl = go_parse_duration(&self.ttl)
                .map_err(|e| format!("Session TTL '{}' invalid: {e}", self.ttl))?;
            let (min, max) = (nanos(ttl_min), nanos(SESSION_TTL_MAX));
            if ttl != 0 && (ttl < min || ttl > max) {
                return Err(format!(
                    "Invalid Session TTL '{ttl}', must be between [{}={}]",
                    go_duration_string(min),
                    go_duration_string(max)
                ));
            }
        }
        Ok(behavior)
    }
}

/// The value of the key that matches `name` without case (an exact match first), as Go's
/// decoder finds a struct field.
fn field<'a>(object: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    object.get(name).or_else(|| {
        object
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value)
    })
}

fn string_field(object: &Map<String, Value>, name: &str) -> Result<Option<String>, String> {
    match field(object, name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text.clone())),
        Some(other) => Err(type_error(other, name, "string")),
    }
}

/// `Some(None)`: the key is there with `null` (a nil slice).
fn strings_field(
    object: &Map<String, Value>,
    name: &str,
) -> Result<Option<Option<Vec<String>>>, String> {
    match field(object, name) {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(None)),
        Some(Value::Array(items)) => {
            let strings = items.iter().map(|item| match item {
                Value::String(text) => Ok(text.clone()),
                // Go decodes null into a string element as "".
                Value::Null => Ok(String::new()),
                other => Err(type_error(other, name, "string")),
            });
            Ok(Some(Some(strings.collect::<Result<_, _>>()?)))
        }
        Some(other) => Err(type_error(other, name, "[]string")),
    }
}

fn service_checks(value: &Value) -> Result<Option<Vec<ServiceCheck>>, String> {
    let items = match value {
        Value::Null => return Ok(None),
        Value::Array(items) => items,
        other => return Err(type_error(other, "ServiceChecks", "[]structs.ServiceCheck")),
    };
    let mut checks = Vec::new();
    for item in items {
        let check = match item {
            Value::Object(object) => ServiceCheck {
                id: string_field(object, "ID")?.unwrap_or_default(),
                namespace: string_field(object, "Namespace")?.unwrap_or_default(),
            },
            Value::Null => ServiceCheck {
                id: String::new(),
                namespace: String::new(),
            },
            other => return Err(type_error(other, "ServiceChecks", "structs.ServiceCheck")),
        };
        checks.push(check);
    }
    Ok(Some(checks))
}

/// Go's `UnmarshalTypeError` text.
fn type_error(value: &Value, field: &str, go_type: &str) -> String {
    format!(
        "json: cannot unmarshal {} into Go struct field Alias.{field} of type {go_type}",
        go_json_kind(value)
    )
}

/// A new session ID as `uuid.GenerateUUID` (hashicorp/go-uuid) makes it: 16 random bytes in
/// the 8-4-4-4-12 form, without version bits.
pub(super) fn generate_id() -> String {
    let bytes = fastrand::u128(..).to_be_bytes();
    let hex: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

impl State {
    /// `sessionCreateTxn`: the node must exist (the agent's own node is registered in the same
    /// write if it is not: a real agent registers itself when it starts, the double's catalog
    /// starts empty), and every check of the session must exist on it and not be critical
    /// (`validateSessionChecksTxn`). The `Err` is the FSM's error, which `Session.Apply` wraps
    /// in `apply failed: `.
    pub(super) fn create_session(
        &mut self,
        new: NewSession,
        behavior: Behavior,
        id: String,
        index: u64,
    ) -> Result<(), String> {
        if new.node == DEFAULT_NODE {
            self.ensure_node(DEFAULT_NODE, None, index);
        }
        if !self.nodes.contains_key(&new.node) {
            return Err("Missing node registration".to_string());
        }
        let entry = SessionEntry {
            id: id.to_ascii_lowercase(),
            name: new.name,
            node: new.node,
            lock_delay: new.lock_delay,
            behavior,
            ttl: new.ttl,
            node_checks: new.node_checks,
            service_checks: new.service_checks,
            checks: new.checks,
            create_index: index,
            modify_index: index,
        };
        for check in entry.check_ids() {
            match self.check_status(&entry.node, check) {
                None => return Err(format!("Missing check '{check}' registration")),
                Some(Status::Critical) => {
                    return Err(format!("Check '{check}' is in critical state"))
                }
                Some(_) => {}
            }
        }
        self.sessions.index = index;
        self.sessions.live.insert(
            entry.id.clone(),
            Live {
                entry,
                expires: None,
            },
        );
        Ok(())
    }

    /// The status of a check of `node` the double knows: the node's `serfHealth`, or the
    /// `service:<id>` check of an instance on it.
    fn check_status(&self, node: &str, check: &str) -> Option<Status> {
        if check.eq_ignore_ascii_case(SERF_CHECK_ID) {
            return self.nodes.get(node).map(|node| node.serf.status);
        }
        let id = check.strip_prefix("service:")?;
        let instance = self.instances.get(id).filter(|i| i.spec.node == node)?;
        instance.check.as_ref().map(|check| check.status)
    }

    /// `deleteSessionTxn`, for a destroy, an expired TTL or a failed check: the session goes
    /// (the `sessions` index moves) and each key it holds is released or deleted as its
    /// behavior says, with the session's lock delay (at most `MaxLockDelay`) on it from now.
    /// `false` if there was no such session.
    pub(super) fn invalidate_session(&mut self, id: &str, index: u64) -> bool {
        let Some(live) = self.sessions.live.remove(&id.to_ascii_lowercase()) else {
            return false;
        };
        let session = live.entry;
        self.sessions.index = index;
        let delay = u64::try_from(session.lock_delay).unwrap_or(0);
        let delay = Duration::from_nanos(delay).min(MAX_LOCK_DELAY);
        let now = Instant::now();
        for key in self.kv.held_by(&session.id) {
            match session.behavior {
                Behavior::Release => self.kv.release(&key, index),
                Behavior::Delete => self.kv.delete(&key, index),
            }
            if !delay.is_zero() {
                self.kv.set_lock_delay(&key, now + delay);
            }
        }
        true
    }

    /// What `ensureCheckTxn` (a check turning critical) and `deleteCheckTxn` (a check going
    /// away, with its instance) do to the sessions that name the check: they are invalidated in
    /// the same write. The double looks after every write for a session with a check missing
    /// or critical, which comes to the same.
    pub(super) fn invalidate_unhealthy_sessions(&mut self, index: u64) {
        if self.sessions.live.is_empty() {
            return;
        }
        let doomed: Vec<String> = self
            .sessions
            .all()
            .filter(|session| {
                session.check_ids().into_iter().any(|check| {
                    !matches!(self.check_status(&session.node, check), Some(status) if status != Status::Critical)
                })
            })
            .map(|session| session.id.clone())
            .collect();
        for id in doomed {
            self.invalidate_session(&id, index);
        }
    }

    /// `kvsLockTxn`'s checks: a session is named and exists. The `Err` is the FSM's, which
    /// `KVS.Apply` wraps in `raft apply failed: `.
    pub(super) fn kv_lock(
        &mut self,
        key: &str,
        value: Vec<u8>,
        flags: u64,
        session: &str,
        index: u64,
    ) -> Result<bool, String> {
        if session.is_empty() {
            return Err("missing session".to_string());
        }
        if self.sessions.get(session).is_none() {
            return Err(format!("invalid session {}", go_quote(session)));
        }
        Ok(self.kv.lock(key, value, flags, session, index))
    }

    /// `kvsUnlockTxn`: a session must be named (it need not exist).
    pub(super) fn kv_unlock(
        &mut self,
        key: &str,
        value: Vec<u8>,
        flags: u64,
        session: &str,
        index: u64,
    ) -> Result<bool, String> {
        if session.is_empty() {
            return Err("missing session".to_string());
        }
        Ok(self.kv.unlock(key, value, flags, session, index))
    }
}
