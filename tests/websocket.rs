//! Long-lived connections: a WebSocket through HAProxy idles past `timeout client`/`server`
//! (30 s) under `timeout tunnel` (haproxy.tunnel_timeout, 1 h), and survives a reload; the old
//! worker that holds it after a reload cuts it at `hard_stop_after`.

#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::extract::ws::{Message as ServerMessage, WebSocket, WebSocketUpgrade};
use axum::routing::get;
use axum::Router;
use futures::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use support::{eventually, patience, reloading_service, service, Backend, Weft};

/// A WebSocket echo server on 127.0.0.1:0: every text or binary message comes back.
struct EchoServer {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl EchoServer {
    async fn start() -> EchoServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route(
            "/",
            get(|ws: WebSocketUpgrade| async move { ws.on_upgrade(echo) }),
        );
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        EchoServer { addr, task }
    }
}

async fn echo(mut socket: WebSocket) {
    while let Some(Ok(message)) = socket.recv().await {
        let echoed = match message {
            ServerMessage::Text(_) | ServerMessage::Binary(_) => socket.send(message).await,
            ServerMessage::Close(_) => return,
            _ => Ok(()),
        };
        if echoed.is_err() {
            return;
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Client = WebSocketStream<TcpStream>;

/// A WebSocket to `ws://ws.test/` through HAProxy on `port`.
async fn open(port: u16) -> Result<Client, String> {
    let stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let handshake = tokio_tungstenite::client_async("ws://ws.test/", stream);
    let (client, _) = tokio::time::timeout(patience(Duration::from_secs(5)), handshake)
        .await
        .map_err(|_| "handshake timed out".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(client)
}

/// Sends `text` and waits for it to come back.
async fn round_trip(client: &mut Client, text: &str) -> Result<(), String> {
    client
        .send(Message::text(text))
        .await
        .map_err(|e| format!("send: {e}"))?;
    let answer = tokio::time::timeout(patience(Duration::from_secs(5)), client.next())
        .await
        .map_err(|_| "no echo within 5 s".to_string())?;
    match answer {
        Some(Ok(Message::Text(echoed))) if echoed.as_str() == text => Ok(()),
        other => Err(format!("expected the echo of {text:?}, got {other:?}")),
    }
}

/// weft routing `ws.test` to `server`, once a WebSocket through it echoes.
async fn weft_for(server: &EchoServer, hard_stop_after: Duration) -> Weft {
    let weft = Weft::builder()
        .services(&service("ws", &["ws.test"], None, &[server.addr]))
        .hard_stop_after(hard_stop_after)
        .start()
        .await;
    eventually(
        Duration::from_secs(10),
        "a WebSocket to ws.test",
        || async {
            let mut client = open(weft.port).await?;
            round_trip(&mut client, "ready").await
        },
    )
    .await;
    weft
}

/// Adds a service no spare can take (a new backend: a reload) and waits until the master
/// counted the reload.
async fn reload(weft: &Weft, server: &EchoServer, other: &Backend) {
    let before = weft.show_proc().await.unwrap().0;
    weft.write_services(
        &(service("ws", &["ws.test"], None, &[server.addr])
            + &reloading_service("other", &["other.test"], &[other.addr])),
    );
    eventually(Duration::from_secs(10), "a reload", || async {
        let (reloads, failed, _) = weft.show_proc().await?;
        if reloads > before && failed == 0 {
            Ok(())
        } else {
            Err(format!(
                "reloads {reloads} (before {before}), failed {failed}"
            ))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_idle_for_40_s_stays_open_across_a_reload() {
    const IDLE: Duration = Duration::from_secs(40);
    let server = EchoServer::start().await;
    let other = Backend::start("other").await;
    // The old worker keeps the WebSocket after the reload: it must outlive the idle time.
    let weft = weft_for(&server, Duration::from_secs(120)).await;
    let config = std::fs::read_to_string(weft.run_dir().join("haproxy.cfg")).unwrap();
    assert!(config.contains("timeout client 30s"), "{config}");
    assert!(config.contains("timeout tunnel 3600s"), "{config}");

    let mut client = open(weft.port).await.unwrap();
    round_trip(&mut client, "hello").await.unwrap();
    let idle_since = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    reload(&weft, &server, &other).await;
    // The idle time is what is tested: nothing crosses the WebSocket meanwhile (tungstenite
    // sends no pings of its own), longer than timeout client/server (30 s).
    tokio::time::sleep_until((idle_since + IDLE).into()).await;
    round_trip(&mut client, "still here").await.unwrap();
    client.close(None).await.unwrap();
    // New WebSockets go to the new worker.
    let mut fresh = open(weft.port).await.unwrap();
    round_trip(&mut fresh, "new worker").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_is_cut_at_hard_stop_after_a_reload() {
    const HARD_STOP_AFTER: Duration = Duration::from_secs(5);
    let server = EchoServer::start().await;
    let other = Backend::start("other").await;
    let weft = weft_for(&server, HARD_STOP_AFTER).await;

    let mut client = open(weft.port).await.unwrap();
    round_trip(&mut client, "hello").await.unwrap();
    reload(&weft, &server, &other).await;
    let reloaded = Instant::now();
    // The old worker still serves it after the reload...
    round_trip(&mut client, "after the reload").await.unwrap();
    // ...until hard_stop_after, when it is stopped and the connection with it.
    let end = tokio::time::timeout(patience(Duration::from_secs(30)), client.next())
        .await
        .expect("the WebSocket outlived hard_stop_after by far");
    let cut_after = reloaded.elapsed();
    assert!(
        matches!(end, None | Some(Err(_)) | Some(Ok(Message::Close(_)))),
        "{end:?}"
    );
    // Not before hard_stop_after (less the time the reload took to be confirmed).
    assert!(
        cut_after + Duration::from_secs(2) >= HARD_STOP_AFTER,
        "cut after {cut_after:?}"
    );
    eprintln!("the WebSocket was cut {cut_after:?} after the reload was confirmed: {end:?}");
    let mut fresh = open(weft.port).await.unwrap();
    round_trip(&mut fresh, "new worker").await.unwrap();
}

/// The backend pool: services added and removed while a WebSocket is open reload nothing, so
/// the WebSocket is never cut (with a reload it would be, at `hard_stop_after`: 2 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_stays_open_while_services_come_and_go() {
    let server = EchoServer::start().await;
    let weft = weft_for(&server, Duration::from_secs(2)).await;
    let before = weft.show_proc().await.unwrap().0;
    let mut client = open(weft.port).await.unwrap();
    round_trip(&mut client, "hello").await.unwrap();
    let others: Vec<Backend> =
        futures::future::join_all(["one", "two", "three"].map(Backend::start)).await;
    let ws = service("ws", &["ws.test"], None, &[server.addr]);
    for (i, other) in others.iter().enumerate() {
        let name = format!("other{i}");
        let host = format!("{name}.test");
        weft.write_services(&(ws.clone() + &service(&name, &[&host], None, &[other.addr])));
        support::wait_for_backends(&weft, &host, "/", &[other.name.as_str()]).await;
        round_trip(&mut client, &format!("after {name} came"))
            .await
            .unwrap();
    }
    // All gone again: their hosts answer 404 and their spares go back to the pool.
    weft.write_services(&ws);
    support::wait_for_404(&weft, "other2.test", "/").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    round_trip(&mut client, "still here").await.unwrap();
    assert_eq!(weft.show_proc().await.unwrap().0, before, "no reload");
}
