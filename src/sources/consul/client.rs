//! HTTP to Consul: one client for every request of the source, inside a connection budget.
//!
//! Every request holds one of `max_connections` permits while it runs, and the pool keeps at
//! most that many idle connections, which the next requests reuse: however big the catalog,
//! weft runs at most `max_connections` requests at once. The pool hands a finished request's
//! connection back a moment after the request ends, and a request that starts in that moment
//! may open one more (seen: the budget + 1, for a moment); a pool of connections weft owns
//! itself would make the bound exact (not done: reqwest does not offer it).

use std::sync::Arc;
use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::{StatusCode, Url};
use tokio::sync::Semaphore;
use tracing::{info, warn};

use super::api::{client_timeout, wait_param};
use crate::config::{Consistency, ConsulSourceConfig};
use crate::sources::http::{fetch, HttpError};

/// The longest a read that does not block may take (or a blocking one's timeout, if shorter).
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// What Consul 1.8+ writes with the 429 it answers past `limits.http_max_conns_per_client`.
const TOO_MANY_CONNECTIONS: &str = "too many concurrent connections";

#[derive(Debug, thiserror::Error)]
pub enum ConsulError {
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("GET {url}: 429: consul refuses more connections from this host's IP (its limits.http_max_conns_per_client); weft holds at most {budget} (sources.consul.max_connections), so the rest are other clients on this host")]
    TooManyConnections { url: Url, budget: usize },
}

/// One answer of a (blocking) query.
pub struct Answer {
    pub index: Option<u64>,
    pub body: Vec<u8>,
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
    http: reqwest::Client,
    pub config: ConsulSourceConfig,
    budget: Arc<Semaphore>,
}

impl Client {
    pub fn new(config: ConsulSourceConfig) -> Result<Client, reqwest::Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .pool_max_idle_per_host(config.max_connections)
            // Never follow a redirect: the token would go with it.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let budget = Arc::new(Semaphore::new(config.max_connections));
        Ok(Client {
            http,
            config,
            budget,
        })
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
        let mut request = self.http.get(url.clone()).timeout(timeout);
        if let Some(token) = &self.config.token {
            request = request.header("X-Consul-Token", token.expose());
        }
        // Closed only if the client is dropped, when no request runs any more.
        let _permit = self.budget.acquire().await;
        let (headers, body) = fetch(request, &url).await.map_err(|err| match err {
            HttpError::Status { status, body, .. }
                if status == StatusCode::TOO_MANY_REQUESTS
                    && body.contains(TOO_MANY_CONNECTIONS) =>
            {
                ConsulError::TooManyConnections {
                    url: url.clone(),
                    budget: self.config.max_connections,
                }
            }
            other => other.into(),
        })?;
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        Ok(Answer {
            index: consul_index(&headers),
            body,
            acl_filtered: header("X-Consul-Results-Filtered-By-ACLs") == Some("true"),
            known_leader: header("X-Consul-KnownLeader").and_then(|v| v.parse().ok()),
        })
    }
}

fn consul_index(headers: &HeaderMap) -> Option<u64> {
    headers.get("X-Consul-Index")?.to_str().ok()?.parse().ok()
}
