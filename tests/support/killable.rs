//! Connections that die with a test double, and panics that do not. Aborting axum's serve
//! task stops accepting, but each connection runs in a task of its own: a blocked query or an
//! open event stream would go on after the test dropped the double. Hyper polls the socket
//! while a request is in flight, so failing the reads and writes once the double is dropped
//! closes every connection.
//!
//! Those connection tasks are axum's, and a panic in one (a handler, or a streamed body) would
//! only close its connection: the client sees an error that the test might even expect. So
//! every handler and streamed body is run under `catch_unwind`, the first panic is kept, and
//! `Served::check` or dropping the double re-raises it in the test.
//!
//! Shared by the Consul and Marathon doubles.

use std::any::Any;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, HttpBody};
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::{FutureExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// The first panic of a handler, kept for the test.
type Panics = Arc<Mutex<Option<Box<dyn Any + Send>>>>;

/// An axum app served on a killable listener: dropping it stops accepting and fails every
/// open connection, and re-raises a panic of a handler (see `check`).
pub struct Served {
    shutdown: CancellationToken,
    task: JoinHandle<()>,
    panics: Panics,
}

impl Served {
    pub fn start(listener: TcpListener, app: axum::Router) -> Served {
        let shutdown = CancellationToken::new();
        let panics = Panics::default();
        let listener = KillableListener {
            inner: listener,
            shutdown: shutdown.clone(),
        };
        let app = app.layer(axum::middleware::from_fn_with_state(
            panics.clone(),
            catch_panics,
        ));
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Served {
            shutdown,
            task,
            panics,
        }
    }

    /// Fails the test with the first panic of a handler or a streamed body so far, as it was
    /// raised. Dropping the double does the same (and also re-raises a panic of the server
    /// task itself).
    pub fn check(&self) {
        if let Some(panic) = self.take_handler_panic() {
            std::panic::resume_unwind(panic);
        }
    }

    fn take_handler_panic(&self) -> Option<Box<dyn Any + Send>> {
        self.panics
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.shutdown.cancel();
        let panic = self
            .take_handler_panic()
            .or_else(|| match (&mut self.task).now_or_never() {
                Some(Err(error)) if error.is_panic() => Some(error.into_panic()),
                _ => None,
            });
        self.task.abort();
        match panic {
            // Already failing: say so, and let the first failure be the one reported.
            Some(panic) if std::thread::panicking() => {
                eprintln!(
                    "a test double's handler panicked too: {}",
                    super::panic_message(&*panic)
                );
            }
            Some(panic) => std::panic::resume_unwind(panic),
            None => {}
        }
    }
}

/// Runs the handler, and then its body if it is streamed, under `catch_unwind`: the first
/// panic is kept in `panics`, and the client gets a 500 or a broken body.
async fn catch_panics(State(panics): State<Panics>, request: Request, next: Next) -> Response {
    let keep = move |panic: Box<dyn Any + Send>| {
        let mut first = panics.lock().unwrap_or_else(PoisonError::into_inner);
        first.get_or_insert(panic);
    };
    let response = match AssertUnwindSafe(next.run(request)).catch_unwind().await {
        Ok(response) => response,
        Err(panic) => {
            keep(panic);
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the test double panicked",
            )
                .into_response();
        }
    };
    // A whole body was made by the handler itself; only a stream runs later.
    if response.body().size_hint().exact().is_some() {
        return response;
    }
    response.map(|body| {
        let stream = AssertUnwindSafe(body.into_data_stream())
            .catch_unwind()
            .map(move |item| {
                item.unwrap_or_else(|panic| {
                    keep(panic);
                    Err(axum::Error::new(io::Error::other(
                        "the test double panicked",
                    )))
                })
            });
        Body::from_stream(stream)
    })
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
