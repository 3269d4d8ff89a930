//! Forwarded headers: HAProxy builds `X-Forwarded-For`, `-Proto` and `-Port` itself; a client's
//! own never reach a backend as sent, unless it is a trusted proxy (`haproxy.trusted_proxies`);
//! with `haproxy.proxy_protocol = "accept"` the client's address comes from a PROXY header.

#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::Request;
use axum::Router;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use support::{eventually, patience, service, Weft};

/// A backend that answers with the `X-Forwarded-*` headers it got, one line per field as
/// received (`x-forwarded-for: 1.2.3.4`), sorted by name, fields of one name in order.
struct HeaderEcho {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl HeaderEcho {
    async fn start() -> HeaderEcho {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().fallback(|request: Request| async move {
            let mut lines = Vec::new();
            for name in ["x-forwarded-for", "x-forwarded-port", "x-forwarded-proto"] {
                for value in request.headers().get_all(name) {
                    lines.push(format!("{name}: {}", value.to_str().unwrap_or("?")));
                }
            }
            lines.join("\n")
        });
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        HeaderEcho { addr, task }
    }
}

impl Drop for HeaderEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One request on a fresh connection to HAProxy: `preamble` (a PROXY header, or nothing),
/// then `GET /` for `fwd.test` with `headers`. The answer's body, or why there is none.
async fn send(port: u16, preamble: &str, headers: &[(&str, &str)]) -> Result<String, String> {
    let exchange = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| e.to_string())?;
        let mut request = format!("{preamble}GET / HTTP/1.1\r\nHost: fwd.test\r\n");
        for (name, value) in headers {
            request += &format!("{name}: {value}\r\n");
        }
        request += "Connection: close\r\n\r\n";
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut answer = String::new();
        stream
            .read_to_string(&mut answer)
            .await
            .map_err(|e| e.to_string())?;
        match answer.split_once("\r\n\r\n") {
            Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_string()),
            _ => Err(format!("no 200 answer: {answer:?}")),
        }
    };
    tokio::time::timeout(patience(Duration::from_secs(5)), exchange)
        .await
        .map_err(|_| "timed out".to_string())?
}

/// weft routing `fwd.test` to `echo`, with these `[haproxy]` keys, once it serves it.
async fn weft_for(echo: &HeaderEcho, keys: &[(&str, &str)], preamble: &str) -> Weft {
    let mut builder = Weft::builder().services(&service("fwd", &["fwd.test"], None, &[echo.addr]));
    for (key, value) in keys {
        builder = builder.haproxy_key(key, value);
    }
    let weft = builder.start().await;
    eventually(Duration::from_secs(10), "fwd.test is routed", || {
        send(weft.port, preamble, &[])
    })
    .await;
    weft
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_forwarded_headers_never_reach_a_backend_as_sent() {
    let echo = HeaderEcho::start().await;
    let weft = weft_for(&echo, &[], "").await;
    let port = weft.port;

    let body = send(port, "", &[]).await.unwrap();
    assert_eq!(
        body,
        format!("x-forwarded-for: 127.0.0.1\nx-forwarded-port: {port}\nx-forwarded-proto: http")
    );
    // A client that lies, in one header, in a list and in several fields, in any case.
    let lies = [
        ("X-Forwarded-For", "1.2.3.4"),
        ("x-forwarded-for", "5.6.7.8, 9.9.9.9"),
        ("X-FORWARDED-PROTO", "https"),
        ("X-Forwarded-Port", "443"),
    ];
    let body = send(port, "", &lies).await.unwrap();
    assert_eq!(
        body,
        format!("x-forwarded-for: 127.0.0.1\nx-forwarded-port: {port}\nx-forwarded-proto: http")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_proxys_forwarded_headers_are_kept_and_appended_to() {
    let echo = HeaderEcho::start().await;
    // The test connects from 127.0.0.1: a trusted proxy here.
    let weft = weft_for(&echo, &[("trusted_proxies", "[\"127.0.0.0/8\"]")], "").await;
    let port = weft.port;

    let body = send(
        port,
        "",
        &[
            ("X-Forwarded-For", "1.2.3.4"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Port", "443"),
        ],
    )
    .await
    .unwrap();
    // HAProxy appends a field of its own: the proxy that handed the request over.
    assert_eq!(
        body,
        "x-forwarded-for: 1.2.3.4\nx-forwarded-for: 127.0.0.1\nx-forwarded-port: 443\nx-forwarded-proto: https"
    );
    // A trusted proxy that sends none gets HAProxy's own.
    let body = send(port, "", &[]).await.unwrap();
    assert_eq!(
        body,
        format!("x-forwarded-for: 127.0.0.1\nx-forwarded-port: {port}\nx-forwarded-proto: http")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_protocol_header_gives_the_clients_address() {
    let echo = HeaderEcho::start().await;
    let preamble = "PROXY TCP4 192.0.2.7 127.0.0.1 40000 443\r\n";
    let weft = weft_for(&echo, &[("proxy_protocol", "\"accept\"")], preamble).await;

    // The load balancer says who the client is, and where it connected; the client's own
    // X-Forwarded-For is not trusted (192.0.2.7 is no trusted proxy).
    let body = send(weft.port, preamble, &[("X-Forwarded-For", "1.2.3.4")])
        .await
        .unwrap();
    assert_eq!(
        body,
        "x-forwarded-for: 192.0.2.7\nx-forwarded-port: 443\nx-forwarded-proto: http"
    );
    // A connection without the PROXY header is refused.
    let refused = send(weft.port, "", &[]).await;
    assert!(refused.is_err(), "{refused:?}");
}
