//! Consul's KV store, for the claims ledger and the ACME state: one folder read with blocking
//! queries, entries created only where none exists and replaced or deleted only at the version
//! read (`?cas=`), so that every edge on the same Consul keeps the same holder of a host; locks
//! held by a session that Consul invalidates when its edge stops renewing it.
//!
//! ```text
//! GET    /v1/kv/<prefix>/?recurse&index=..   every entry, blocking; 404: none yet
//! PUT    /v1/kv/<prefix>/<host>?cas=0        record a first claim: true, or false if another edge did
//! PUT    /v1/kv/<prefix>/<host>?cas=<index>  hand a host to its holder's own team
//! DELETE /v1/kv/<prefix>/<host>?cas=<index>  release a host whose holder is gone
//! PUT    /v1/session/create                  a session with a TTL (the ACME locks)
//! PUT    /v1/session/renew/<id>              every TTL/2; 404: invalidated
//! PUT    /v1/kv/<prefix>/<key>?acquire=<id>  take a lock: true, or false if another holds it
//! PUT    /v1/kv/<prefix>/<key>?release=<id>  give it back
//! GET    /v1/kv/<prefix>/<folder>/?keys     the keys below a folder (acknowledgements)
//! GET    /v1/kv/<prefix>/<folder>/?recurse  its entries, with their holders (edges' lists)
//! DELETE /v1/kv/<prefix>/<folder>/?recurse  delete them (a challenge's acknowledgements)
//! PUT    /v1/txn  [check-session <lock>, set|delete <key>]  a write fenced by the lock:
//!                                    409 (rolled back) once the session no longer holds it
//! ```
//!
//! Its connections come out of the source's budget: one blocking read, one write at a time.

use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use http::Method;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::blocking::BlockingQuery;
use super::client::{Client, ConsulError};
use crate::config::{ConsulSourceConfig, CLAIMS_CONNECTIONS};

/// One entry: its key below the folder, its value and its version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEntry {
    pub key: String,
    pub value: Vec<u8>,
    pub modify_index: u64,
    /// The session holding its lock, if any.
    pub session: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawEntry {
    key: String,
    value: Option<String>,
    modify_index: u64,
    /// The session holding the key's lock (`omitempty`: absent when none).
    #[serde(default)]
    session: Option<String>,
}

/// Decodes `GET /v1/kv/<folder>?recurse` (full keys; values in base64, `null` when empty).
pub fn decode_entries(body: &[u8]) -> Result<Vec<KvEntry>, String> {
    let raw: Vec<RawEntry> = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    raw.into_iter()
        .map(|e| {
            let value = match e.value {
                None => Vec::new(),
                Some(text) => base64::engine::general_purpose::STANDARD
                    .decode(text)
                    .map_err(|err| format!("key {:?}: value is not base64: {err}", e.key))?,
            };
            Ok(KvEntry {
                key: e.key,
                value,
                modify_index: e.modify_index,
                session: e.session.filter(|s| !s.is_empty()),
            })
        })
        .collect()
}

/// A KV folder.
pub struct KvFolder {
    client: Arc<Client>,
    /// `weft/claims`, without slashes at either end.
    prefix: String,
    /// What the folder holds, in logs: `claims ledger`.
    what: &'static str,
}

/// `PUT /v1/session/create`'s body (Consul's `api.SessionEntry`).
#[derive(serde::Serialize)]
#[serde(rename_all = "PascalCase")]
struct NewSession<'a> {
    name: &'a str,
    #[serde(rename = "TTL")]
    ttl: String,
    lock_delay: String,
    behavior: &'static str,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CreatedSession {
    #[serde(rename = "ID")]
    id: String,
}

impl KvFolder {
    /// The folder `prefix` on the source's Consul, on `connections` of its own
    /// ([`CLAIMS_CONNECTIONS`], [`crate::config::ACME_CONNECTIONS`]).
    pub fn new(
        mut config: ConsulSourceConfig,
        prefix: &str,
        what: &'static str,
        connections: usize,
    ) -> KvFolder {
        config.max_connections = connections;
        KvFolder {
            client: Arc::new(Client::new(config)),
            prefix: prefix.trim_matches('/').to_string(),
            what,
        }
    }

    /// The claims ledger's folder.
    pub fn claims(config: ConsulSourceConfig, prefix: &str) -> KvFolder {
        KvFolder::new(config, prefix, "claims ledger", CLAIMS_CONNECTIONS)
    }

    /// Creates a session that Consul invalidates when it is not renewed within `ttl` (Consul
    /// waits up to twice that); its locks are released, and none of them can be taken again
    /// for `lock_delay`. Its ID.
    pub async fn create_session(
        &self,
        name: &str,
        ttl: std::time::Duration,
        lock_delay: std::time::Duration,
    ) -> Result<String, ConsulError> {
        let url = self.client.url(&["v1", "session", "create"]);
        let body = NewSession {
            name,
            ttl: format!("{}s", ttl.as_secs()),
            lock_delay: format!("{}s", lock_delay.as_secs()),
            behavior: "release",
        };
        let body = serde_json::to_vec(&body).unwrap_or_default();
        let answer = self
            .client
            .write(Method::PUT, url.clone(), &[], Bytes::from(body))
            .await?;
        let created: CreatedSession = serde_json::from_slice(&answer.body)
            .map_err(|e| ConsulError::decode(url, e.to_string()))?;
        Ok(created.id)
    }

    /// The folder, without slashes at either end (`weft/acme`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The entries below `folder` (full keys), with their versions and lock holders.
    pub async fn entries(&self, folder: &str) -> Result<Vec<KvEntry>, ConsulError> {
        let url = self.folder_url(folder)?;
        let answer = self.client.get(url.clone(), 0, &[("recurse", "")]).await?;
        decode_entries(&answer.body).map_err(|message| ConsulError::decode(url, message))
    }

    /// `/v1/kv/<prefix>/<folder>/`, `folder`'s segments each escaped; an error for a segment
    /// empty or a dot (the URL would name another folder).
    fn folder_url(&self, folder: &str) -> Result<reqwest::Url, ConsulError> {
        let mut url = self.client.url(&["v1", "kv"]);
        if folder.split('/').any(|s| matches!(s, "" | "." | "..")) {
            return Err(ConsulError::decode(
                url,
                format!("{folder:?} is not a folder weft may name"),
            ));
        }
        if let Ok(mut path) = url.path_segments_mut() {
            path.extend(self.prefix.split('/'))
                .extend(folder.split('/'))
                .push("");
        }
        Ok(url)
    }

    /// The keys below `folder` (below the folder's prefix, without `folder`'s own), none when
    /// there is no such key.
    pub async fn keys(&self, folder: &str) -> Result<Vec<String>, ConsulError> {
        let below = format!("{}/{}/", self.prefix, folder.trim_matches('/'));
        let url = self.folder_url(folder)?;
        let answer = self.client.get(url.clone(), 0, &[("keys", "")]).await?;
        let keys: Vec<String> = serde_json::from_slice(&answer.body)
            .map_err(|e| ConsulError::decode(url, e.to_string()))?;
        Ok(keys
            .into_iter()
            .filter_map(|key| key.strip_prefix(&below).map(str::to_string))
            .collect())
    }

    /// Deletes every key below `folder` (never the whole prefix: `folder` names something).
    pub async fn delete_tree(&self, folder: &str) -> Result<(), ConsulError> {
        let url = self.folder_url(folder)?;
        self.client
            .write(Method::DELETE, url, &[("recurse", "")], Bytes::new())
            .await
            .map(|_| ())
    }

    /// Renews session `id`: `false` when Consul no longer knows it (invalidated).
    pub async fn renew_session(&self, id: &str) -> Result<bool, ConsulError> {
        let url = self.client.url(&["v1", "session", "renew", id]);
        match self.client.write(Method::PUT, url, &[], Bytes::new()).await {
            Ok(_) => Ok(true),
            Err(ConsulError::Http(crate::sources::http::HttpError::Status { status, .. }))
                if status == http::StatusCode::NOT_FOUND =>
            {
                Ok(false)
            }
            Err(err) => Err(err),
        }
    }

    /// Destroys session `id`: its locks are released at once.
    pub async fn destroy_session(&self, id: &str) -> Result<(), ConsulError> {
        let url = self.client.url(&["v1", "session", "destroy", id]);
        self.client
            .write(Method::PUT, url, &[], Bytes::new())
            .await
            .map(|_| ())
    }

    /// Takes the lock of `key` for `session`, writing `value`: whether it was taken (`false`:
    /// another session holds it, or it was released by an invalidation less than the lock
    /// delay ago).
    pub async fn acquire(
        &self,
        key: &str,
        session: &str,
        value: Vec<u8>,
    ) -> Result<bool, ConsulError> {
        let url = self.client.url(&self.segments(key));
        let answer = self
            .client
            .write(
                Method::PUT,
                url,
                &[("acquire", session)],
                Bytes::from(value),
            )
            .await?;
        Ok(answer.body.trim_ascii() == b"true")
    }

    /// Gives the lock of `key` back, if `session` holds it.
    pub async fn release(&self, key: &str, session: &str) -> Result<bool, ConsulError> {
        let url = self.client.url(&self.segments(key));
        let answer = self
            .client
            .write(Method::PUT, url, &[("release", session)], Bytes::new())
            .await?;
        Ok(answer.body.trim_ascii() == b"true")
    }

    /// Writes `value` at `key` (deletes `key` with `None`) only while `session` holds the lock
    /// of `lock`: one transaction, Consul's `check-session` then the write. `false`: the
    /// session no longer holds the lock (it expired, another edge took it), nothing written.
    pub async fn write_locked(
        &self,
        lock: &str,
        session: &str,
        key: &str,
        value: Option<&[u8]>,
    ) -> Result<bool, ConsulError> {
        let full = |key: &str| format!("{}/{key}", self.prefix);
        let write = match value {
            Some(value) => serde_json::json!({"KV": {
                "Verb": "set",
                "Key": full(key),
                "Value": base64::engine::general_purpose::STANDARD.encode(value),
            }}),
            None => serde_json::json!({"KV": {"Verb": "delete", "Key": full(key)}}),
        };
        let ops = serde_json::json!([
            {"KV": {"Verb": "check-session", "Key": full(lock), "Session": session}},
            write,
        ]);
        let url = self.client.url(&["v1", "txn"]);
        let body = Bytes::from(ops.to_string());
        match self.client.write(Method::PUT, url, &[], body).await {
            Ok(_) => Ok(true),
            // Rolled back because the check (operation 0) failed: the lock is not this
            // session's. Any other rollback (the token may not write the key) is an error.
            Err(ConsulError::Http(crate::sources::http::HttpError::Status {
                status,
                ref body,
                ..
            })) if status == http::StatusCode::CONFLICT && body.contains("\"OpIndex\":0") => {
                Ok(false)
            }
            Err(err) => Err(err),
        }
    }

    fn segments<'a>(&'a self, key: &'a str) -> Vec<&'a str> {
        let mut segments = vec!["v1", "kv"];
        segments.extend(self.prefix.split('/'));
        segments.push(key);
        segments
    }

    /// A blocking watch of every entry in the folder.
    pub fn watch(&self) -> KvWatch {
        KvWatch {
            query: BlockingQuery::new(
                &self.client,
                self.what,
                &self.segments(""),
                &[("recurse", "")],
            ),
            client: self.client.clone(),
            prefix: format!("{}/", self.prefix),
        }
    }

    /// Writes `value` at `key` if its version is `cas` (0: only if there is none). Whether it
    /// was written.
    pub async fn put(&self, key: &str, value: Vec<u8>, cas: u64) -> Result<bool, ConsulError> {
        let url = self.client.url(&self.segments(key));
        let cas = cas.to_string();
        let answer = self
            .client
            .write(Method::PUT, url, &[("cas", &cas)], Bytes::from(value))
            .await?;
        Ok(answer.body.trim_ascii() == b"true")
    }

    /// The value at `key` (a read that does not block); `None` when there is no such key.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, ConsulError> {
        let url = self.client.url(&self.segments(key));
        let answer = self.client.get(url.clone(), 0, &[]).await?;
        let entries =
            decode_entries(&answer.body).map_err(|message| ConsulError::decode(url, message))?;
        Ok(entries.into_iter().next().map(|entry| entry.value))
    }

    /// Writes `value` at `key`, whatever is there. Whether it was written.
    pub async fn put_any(&self, key: &str, value: Vec<u8>) -> Result<bool, ConsulError> {
        let url = self.client.url(&self.segments(key));
        let answer = self
            .client
            .write(Method::PUT, url, &[], Bytes::from(value))
            .await?;
        Ok(answer.body.trim_ascii() == b"true")
    }

    /// Deletes `key`, if there is one.
    pub async fn delete_any(&self, key: &str) -> Result<(), ConsulError> {
        let url = self.client.url(&self.segments(key));
        self.client
            .write(Method::DELETE, url, &[], Bytes::new())
            .await
            .map(|_| ())
    }

    /// Deletes `key` if its version is `cas`. Whether it was deleted.
    pub async fn delete(&self, key: &str, cas: u64) -> Result<bool, ConsulError> {
        let url = self.client.url(&self.segments(key));
        let cas = cas.to_string();
        let answer = self
            .client
            .write(Method::DELETE, url, &[("cas", &cas)], Bytes::new())
            .await?;
        Ok(answer.body.trim_ascii() == b"true")
    }
}

/// The folder, watched.
pub struct KvWatch {
    query: BlockingQuery,
    client: Arc<Client>,
    prefix: String,
}

impl KvWatch {
    /// The folder's entries (keys below the folder) each time they change; failures are handed
    /// to `failed` and tried again. `None` at `stop`.
    pub async fn next(
        &mut self,
        stop: &CancellationToken,
        failed: impl FnMut(&ConsulError, std::time::Duration),
    ) -> Option<Vec<KvEntry>> {
        let entries = self
            .query
            .next(&self.client, decode_entries, stop, failed)
            .await?;
        Some(
            entries
                .into_iter()
                .filter_map(|mut e| {
                    e.key = e.key.strip_prefix(&self.prefix)?.to_string();
                    Some(e)
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_decode_as_consul_writes_them() {
        let body = br#"[{"LockIndex":0,"Key":"weft/claims/a.example.com","Flags":0,"Value":"eyJhIjoxfQ==","CreateIndex":10,"ModifyIndex":12},
                       {"LockIndex":0,"Key":"weft/claims/empty","Flags":0,"Value":null,"CreateIndex":11,"ModifyIndex":11}]"#;
        let entries = decode_entries(body).unwrap();
        assert_eq!(entries[0].value, br#"{"a":1}"#);
        assert_eq!(entries[0].modify_index, 12);
        assert!(entries[1].value.is_empty());
        assert!(decode_entries(br#"[{"Key":"k","Value":"%%%","ModifyIndex":1}]"#).is_err());
    }
}
