//! The connections weft holds to Consul: at most `max_connections`, exactly.
//!
//! ```text
//! request ──> permit (one of max_connections) ──> an idle connection, or a new one if none
//!                                                  └─ answered: back to idle, then the permit
//!                                                  └─ failed, timed out, closed by Consul:
//!                                                     closed, and its socket gone, before the
//!                                                     permit is
//! ```
//!
//! A connection is either idle or held by a permit, and a new one is opened only when none is
//! idle, so there are never more than there are permits. reqwest's pool cannot promise that:
//! it hands a connection back a moment after the request ends, and a request that starts in
//! that moment opens another.

use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue, HOST};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tower_service::Service;

use crate::sources::error_chain;

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("{0}")]
    Connect(String),
    #[error("{0}")]
    Exchange(String),
    #[error("operation timed out after {0:?}")]
    Timeout(Duration),
    #[error("the answer is larger than {} MiB, weft's bound; nothing of it is used", .0 >> 20)]
    TooLarge(usize),
}

/// The largest answer weft reads from Consul: the whole health state of 10,000 services with
/// two instances each is about 6.5 MiB.
pub const MAX_ANSWER: usize = 64 << 20;

/// An answer: its status, headers and whole body.
pub struct Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// One HTTP/1.1 connection, and the task that drives it.
struct Connection {
    sender: SendRequest<Full<Bytes>>,
    driver: JoinHandle<()>,
}

impl Connection {
    /// Closes it, and waits until its socket is gone.
    async fn close(self) {
        drop(self.sender);
        self.driver.abort();
        let _ = self.driver.await;
    }
}

pub struct Connections {
    permits: Semaphore,
    idle: Mutex<Vec<Connection>>,
    connector: HttpsConnector<HttpConnector>,
}

impl Connections {
    pub fn new(max: usize, connect_timeout: Duration) -> Connections {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(connect_timeout));
        http.set_nodelay(true);
        http.enforce_http(false);
        let connector = HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Connections {
            permits: Semaphore::new(max),
            idle: Mutex::new(Vec::new()),
            connector,
        }
    }

    /// `method` `uri` with `headers` and `body`, on a connection of the budget, within
    /// `timeout` (connecting included).
    pub async fn send(
        &self,
        method: Method,
        uri: Uri,
        headers: &[(HeaderName, HeaderValue)],
        body: Bytes,
        timeout: Duration,
    ) -> Result<Response, ConnectionError> {
        let message = Message {
            method,
            uri,
            headers,
            body,
        };
        // Closed only when `self` is dropped, when no request runs any more.
        let _permit = self.permits.acquire().await;
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop();
        let mut connection = match idle {
            Some(connection) if !connection.sender.is_closed() => Some(connection),
            Some(closed) => {
                closed.close().await;
                None
            }
            None => None,
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let reused = connection.is_some();
        let mut result = self
            .exchange_by(deadline, timeout, &mut connection, &message)
            .await;
        // A kept-alive connection that Consul (or a proxy) closed between two requests fails
        // before it answers: once, on a new connection. A GET may be sent again, and so may
        // the source's writes, which are all check-and-set: a repeat of one that took effect
        // answers `false`, and the next read shows what the first did.
        if reused && matches!(result, Err(ConnectionError::Exchange(_))) {
            if let Some(stale) = connection.take() {
                stale.close().await;
            }
            result = self
                .exchange_by(deadline, timeout, &mut connection, &message)
                .await;
        }
        if let Some(connection) = connection {
            if result.is_ok() && !connection.sender.is_closed() {
                self.idle
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(connection);
            } else {
                // Its state is unknown (or Consul closed it): never reused.
                connection.close().await;
            }
        }
        result
    }

    /// One request on `connection` (opened first when there is none), by `deadline`.
    async fn exchange_by(
        &self,
        deadline: tokio::time::Instant,
        timeout: Duration,
        connection: &mut Option<Connection>,
        message: &Message<'_>,
    ) -> Result<Response, ConnectionError> {
        let Message {
            method,
            uri,
            headers,
            body,
        } = message;
        let exchange = async {
            let sender = match connection {
                Some(connection) => connection,
                None => connection.insert(self.connect(uri).await?),
            };
            let mut request = Request::builder()
                .method(method.clone())
                .uri(origin_form(uri))
                .body(Full::new(body.clone()));
            if let Ok(request) = &mut request {
                if let Some(authority) = uri.authority() {
                    if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
                        request.headers_mut().insert(HOST, host);
                    }
                }
                for (name, value) in headers.iter() {
                    request.headers_mut().insert(name.clone(), value.clone());
                }
            }
            let request = request.map_err(|e| ConnectionError::Exchange(e.to_string()))?;
            let exchanged = |e: hyper::Error| ConnectionError::Exchange(error_chain(&e));
            sender.sender.ready().await.map_err(exchanged)?;
            let response = sender
                .sender
                .send_request(request)
                .await
                .map_err(exchanged)?;
            let (parts, body) = response.into_parts();
            let body = http_body_util::Limited::new(body, MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        ConnectionError::TooLarge(MAX_ANSWER)
                    } else {
                        ConnectionError::Exchange(error_chain(e.as_ref()))
                    }
                })?
                .to_bytes();
            Ok(Response {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout_at(deadline, exchange)
            .await
            .unwrap_or(Err(ConnectionError::Timeout(timeout)))
    }

    async fn connect(&self, uri: &Uri) -> Result<Connection, ConnectionError> {
        let mut connector = self.connector.clone();
        let stream: MaybeHttpsStream<TokioIo<tokio::net::TcpStream>> = connector
            .call(uri.clone())
            .await
            .map_err(|e| ConnectionError::Connect(error_chain(e.as_ref())))?;
        let (sender, driver) = http1::handshake(stream)
            .await
            .map_err(|e| ConnectionError::Connect(error_chain(&e)))?;
        let driver = tokio::spawn(async move {
            let _ = driver.await;
        });
        Ok(Connection { sender, driver })
    }
}

/// One request, as it may be sent twice.
struct Message<'a> {
    method: Method,
    uri: Uri,
    headers: &'a [(HeaderName, HeaderValue)],
    body: Bytes,
}

/// `/path?query` of `uri`, as an HTTP/1.1 request line names it.
fn origin_form(uri: &Uri) -> String {
    uri.path_and_query()
        .map_or_else(|| "/".to_string(), |p| p.as_str().to_string())
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A server that answers one request per connection and closes it on the next, without an
    /// answer and without having said so (no `Connection: close`): as a proxy or an idle
    /// timeout closes a kept-alive connection under a request that was on its way.
    async fn one_answer_per_connection() -> (std::net::SocketAddr, JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut request = Vec::new();
                let mut buffer = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buffer[..n]),
                    }
                }
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await;
                // The next request on this connection: read, never answered, closed.
                let _ = stream.read(&mut buffer).await;
            }
        });
        (addr, server)
    }

    #[tokio::test]
    async fn a_connection_closed_between_requests_is_replaced_not_failed() {
        let (addr, server) = one_answer_per_connection().await;
        let connections = Connections::new(1, Duration::from_secs(1));
        let uri: Uri = format!("http://{addr}/v1/health/state/any")
            .parse()
            .unwrap();
        for round in 0..20 {
            let answer = connections
                .send(
                    Method::GET,
                    uri.clone(),
                    &[],
                    Bytes::new(),
                    Duration::from_secs(5),
                )
                .await
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert_eq!(&answer.body[..], b"ok");
        }
        server.abort();
    }
}
