//! HTTP to Consul: every request of the source on one budget of connections
//! ([`Connections`]), so that weft never holds more than `max_connections` to Consul, whatever
//! the catalog's size; the URL, the token and the answers as Consul's API has them.

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{Method, StatusCode, Uri};
use reqwest::Url;
use tracing::{info, warn};

use super::api::{client_timeout, wait_param};
use super::connections::{ConnectionError, Connections};
use crate::config::{redact, Consistency, ConsulSourceConfig};
use crate::sources::http::{error_text, HttpError};

/// The longest a read that does not block may take (or a blocking one's timeout, if shorter).
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// What Consul 1.8+ writes with the 429 it answers past `limits.http_max_conns_per_client`.
const TOO_MANY_CONNECTIONS: &str = "too many concurrent connections";

#[derive(Debug, thiserror::Error)]
pub enum ConsulError {
    #[error("{method} {}: {source}", redact(url))]
    Request {
        method: &'static str,
        url: Box<Url>,
        #[source]
        source: ConnectionError,
    },
    /// An answer that is not a 2xx (with the start of its body), or that does not decode.
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("{}: 429: consul refuses more connections from this host's IP (its limits.http_max_conns_per_client); weft holds at most {budget} (sources.consul.max_connections), so the rest are other clients on this host", redact(url))]
    TooManyConnections { url: Url, budget: usize },
}

/// One answer of a (blocking) query.
pub struct Answer {
    pub index: Option<u64>,
    pub body: Bytes,
    /// `X-Consul-Results-Filtered-By-ACLs: true`: the token could not read everything.
    pub acl_filtered: bool,
    /// `X-Consul-KnownLeader`.
    pub known_leader: Option<bool>,
}

/// What Consul's answers say besides their content, logged when it changes: results filtered
/// by ACLs (a catalog that shrinks may be a token problem, not a change), an answer from a
/// server that knows no leader (a stale read, possibly old).
#[derive(Default)]
pub struct Notices {
    acl_filtered: bool,
    leaderless: bool,
}

impl Notices {
    pub fn observe(&mut self, answer: &Answer, what: &str) {
        if answer.acl_filtered != self.acl_filtered {
            self.acl_filtered = answer.acl_filtered;
            if self.acl_filtered {
                warn!(what, "consul filtered the answer by ACLs: what weft's token cannot read is left out; give the token service:read and node:read");
            } else {
                info!(what, "consul no longer filters the answer by ACLs");
            }
        }
        let leaderless = answer.known_leader == Some(false);
        if leaderless != self.leaderless {
            self.leaderless = leaderless;
            if leaderless {
                warn!(what, "consul answered without a known leader (a stale read): the services may be out of date");
            } else {
                info!(what, "consul answers with a known leader again");
            }
        }
    }
}

/// The HTTP side, shared by every watch and read of the source.
pub struct Client {
    connections: Connections,
    pub config: ConsulSourceConfig,
}

impl ConsulError {
    pub fn decode(url: Url, message: String) -> ConsulError {
        HttpError::decode(url, &message).into()
    }
}

impl Client {
    pub fn new(config: ConsulSourceConfig) -> Client {
        Client {
            connections: Connections::new(config.max_connections, CONNECT_TIMEOUT),
            config,
        }
    }

    pub fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.config.url.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    /// GET `url` with the source's datacenter, consistency and token; blocking on `index`
    /// when it is above 0 (up to the configured `wait`).
    pub async fn get(
        &self,
        mut url: Url,
        index: u64,
        extra: &[(&str, &str)],
    ) -> Result<Answer, ConsulError> {
        let mut pairs: Vec<(&str, String)> =
            extra.iter().map(|(k, v)| (*k, v.to_string())).collect();
        if let Some(dc) = &self.config.datacenter {
            pairs.push(("dc", dc.clone()));
        }
        if self.config.consistency == Consistency::Stale {
            pairs.push(("stale", String::new()));
        }
        let timeout = if index > 0 {
            pairs.push(("index", index.to_string()));
            pairs.push(("wait", wait_param(self.config.wait)));
            client_timeout(self.config.wait)
        } else {
            READ_TIMEOUT.min(client_timeout(self.config.wait))
        };
        if !pairs.is_empty() {
            url.query_pairs_mut().extend_pairs(pairs);
        }
        self.send(Method::GET, url, Bytes::new(), timeout).await
    }

    /// A write (`PUT`, `DELETE`) to `url` with `body`, with the source's datacenter and token.
    pub async fn write(
        &self,
        method: Method,
        mut url: Url,
        extra: &[(&str, &str)],
        body: Bytes,
    ) -> Result<Answer, ConsulError> {
        {
            let mut pairs = url.query_pairs_mut();
            pairs.extend_pairs(extra);
            if let Some(dc) = &self.config.datacenter {
                pairs.append_pair("dc", dc);
            }
        }
        if url.query() == Some("") {
            url.set_query(None);
        }
        self.send(method, url, body, READ_TIMEOUT).await
    }

    async fn send(
        &self,
        method: Method,
        url: Url,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Answer, ConsulError> {
        let verb = match method {
            Method::PUT => "PUT",
            Method::DELETE => "DELETE",
            _ => "GET",
        };
        let failed = |source| ConsulError::Request {
            method: verb,
            url: Box::new(url.clone()),
            source,
        };
        let uri = Uri::try_from(url.as_str())
            .map_err(|e| failed(ConnectionError::Connect(e.to_string())))?;
        let mut headers = Vec::new();
        if let Some(token) = &self.config.token {
            let mut value = HeaderValue::from_str(token.expose()).map_err(|_| {
                failed(ConnectionError::Connect(
                    "the token is not a valid header value".into(),
                ))
            })?;
            // Never in a debug print of the request.
            value.set_sensitive(true);
            headers.push((HeaderName::from_static("x-consul-token"), value));
        }
        let response = self
            .connections
            .send(method.clone(), uri, &headers, body, timeout)
            .await
            .map_err(failed)?;
        // A KV read that matches no key is answered 404, with its index: an empty folder.
        let kv_read = method == Method::GET
            && url
                .path_segments()
                .is_some_and(|mut s| s.any(|x| x == "v1") && s.next() == Some("kv"));
        if response.status == StatusCode::NOT_FOUND && kv_read {
            let header = |name: &str| response.headers.get(name).and_then(|v| v.to_str().ok());
            return Ok(Answer {
                index: header("X-Consul-Index").and_then(|v| v.parse().ok()),
                acl_filtered: false,
                known_leader: header("X-Consul-KnownLeader").and_then(|v| v.parse().ok()),
                body: Bytes::from_static(b"[]"),
            });
        }
        // The connections follow no redirect: a 3xx is an error naming where it pointed.
        if let Some(redirect) = HttpError::redirect(verb, &url, response.status, &response.headers)
        {
            return Err(redirect.into());
        }
        if !response.status.is_success() {
            let body = error_text(&response.body);
            if response.status == StatusCode::TOO_MANY_REQUESTS
                && body.contains(TOO_MANY_CONNECTIONS)
            {
                return Err(ConsulError::TooManyConnections {
                    url,
                    budget: self.config.max_connections,
                });
            }
            let status = response.status;
            return Err(HttpError::Status { url, status, body }.into());
        }
        let header = |name: &str| response.headers.get(name).and_then(|v| v.to_str().ok());
        Ok(Answer {
            index: header("X-Consul-Index").and_then(|v| v.parse().ok()),
            acl_filtered: header("X-Consul-Results-Filtered-By-ACLs") == Some("true"),
            known_leader: header("X-Consul-KnownLeader").and_then(|v| v.parse().ok()),
            body: response.body,
        })
    }
}
