//! Connections that die with a test double. Aborting axum's serve task stops accepting, but
//! each connection runs in a task of its own: a blocked query or an open event stream would go
//! on after the test dropped the double. Hyper polls the socket while a request is in flight,
//! so failing the reads and writes once the double is dropped closes every connection.
//!
//! Shared by the Consul and Marathon doubles.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// An axum app served on a killable listener: dropping it stops accepting and fails every
/// open connection.
pub struct Served {
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Served {
    pub fn start(listener: TcpListener, app: axum::Router) -> Served {
        let shutdown = CancellationToken::new();
        let listener = KillableListener {
            inner: listener,
            shutdown: shutdown.clone(),
        };
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Served { shutdown, task }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.task.abort();
    }
}

/// Accepts like a `TcpListener`; every connection fails once `shutdown` is cancelled.
pub struct KillableListener {
    pub inner: TcpListener,
    pub shutdown: CancellationToken,
}

impl axum::serve::Listener for KillableListener {
    type Io = KillableStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (KillableStream, SocketAddr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    let stream = KillableStream {
                        stream,
                        shutdown: self.shutdown.clone(),
                        killed: Box::pin(self.shutdown.clone().cancelled_owned()),
                    };
                    return (stream, addr);
                }
                // Out of file descriptors and the like: retry, as axum's own listener does.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

pub struct KillableStream {
    stream: TcpStream,
    shutdown: CancellationToken,
    killed: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl KillableStream {
    /// Ready with an error once the double is dropped; registers the waker otherwise.
    fn poll_killed(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        if self.shutdown.is_cancelled() || self.killed.as_mut().poll(cx).is_ready() {
            Poll::Ready(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "test double dropped",
            ))
        } else {
            Poll::Pending
        }
    }
}

impl AsyncRead for KillableStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Poll::Ready(error) = this.poll_killed(cx) {
            return Poll::Ready(Err(error));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for KillableStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Poll::Ready(error) = this.poll_killed(cx) {
            return Poll::Ready(Err(error));
        }
        Pin::new(&mut this.stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Poll::Ready(error) = this.poll_killed(cx) {
            return Poll::Ready(Err(error));
        }
        Pin::new(&mut this.stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
