//! The double's front door: Consul's per-client-IP limit on concurrent HTTP connections
//! (`limits.http_max_conns_per_client`) and the connection counters.
//!
//! What Consul does, from its source: `agent/agent.go` (`listenHTTP`, 1.8.0 and later) sets
//! the HTTP server's `ConnState` hook to `httpConnLimiter.HTTPConnStateFuncWithDefault429Handler
//! (10 * time.Millisecond)` of hashicorp/go-connlimit (`connlimit.go`, the 429 came in v0.3.0,
//! commit cf3e679 of 2020-06-22, hashicorp/consul#8221). On `StateNew`, right after accept and
//! before any request is read, `Limiter.Accept` counts the connection under `"ip:" +
//! RemoteAddr.IP`; if that IP already holds `MaxConnsPerClientIP` (0: no limit) it sets a
//! 10 ms deadline, writes `tooManyRequestsResponse` (below, byte for byte) and closes. The
//! count is freed on `StateClosed` (or `StateHijacked`): a connection counts from accept to
//! close, idle keep-alive time and blocked queries included (Consul's `http.Server` sets no
//! idle or read timeout, and neither does the double's: `axum::serve` gives hyper no timer).
//! Lowering the limit closes nothing that is already open.
//!
//! Because the 429 goes out before the request is read, a client that has already sent its
//! request may see the close as a reset (the kernel resets a socket closed with unread data)
//! instead of the 429: so may a client of a real Consul.
//!
//! How: the double's address is this front door, which counts and limits, and splices each
//! admitted connection to the HTTP server on a private loopback port (the shared
//! `killable::Served`, which takes a plain listener). Dropping the door closes its listener and
//! every client connection at once.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::Connections;

/// go-connlimit's `tooManyRequestsResponse`, byte for byte: the message ends with a newline
/// and `Content-Length` counts it.
pub const TOO_MANY_CONNECTIONS: &[u8] = b"HTTP/1.1 429 Too Many Requests\r\n\
Content-Type: text/plain\r\n\
Content-Length: 81\r\n\
Connection: close\r\n\
\r\n\
Your IP is issuing too many concurrent connections, please rate limit your calls\n";

/// `HTTPConnStateFuncWithDefault429Handler(10 * time.Millisecond)`: "we don't care about slow
/// players".
const REFUSAL_DEADLINE: Duration = Duration::from_millis(10);

/// The per-IP count and its limit, with the counters tests read.
pub(super) struct Limiter {
    /// 0: unlimited.
    max_per_ip: AtomicUsize,
    counts: Mutex<Connections>,
}

impl Limiter {
    pub(super) fn new(max_per_ip: usize) -> Limiter {
        Limiter {
            max_per_ip: AtomicUsize::new(max_per_ip),
            counts: Mutex::new(Connections::default()),
        }
    }

    pub(super) fn set_max_per_ip(&self, max: usize) {
        self.max_per_ip.store(max, Ordering::Relaxed);
    }

    pub(super) fn counts(&self) -> Connections {
        self.lock().clone()
    }

    fn lock(&self) -> MutexGuard<'_, Connections> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `Limiter.Accept`: counts the connection, or refuses it (`None`) when `ip` is at the limit.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Admitted> {
        let max = self.max_per_ip.load(Ordering::Relaxed);
        let mut counts = self.lock();
        let open = counts.open.get(&ip).copied().unwrap_or(0);
        if max > 0 && open >= max {
            *counts.refused.entry(ip).or_default() += 1;
            return None;
        }
        counts.open.insert(ip, open + 1);
        let peak = counts.peak.entry(ip).or_default();
        *peak = (*peak).max(open + 1);
        counts.accepted += 1;
        counts.peak_total = counts.peak_total.max(counts.open_total());
        Some(Admitted {
            limiter: self.clone(),
            ip,
        })
    }
}

/// One counted connection; dropping it frees the count (`freeConn`).
struct Admitted {
    limiter: Arc<Limiter>,
    ip: IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut counts = self.limiter.lock();
        if let Some(open) = counts.open.get_mut(&self.ip) {
            *open -= 1;
            if *open == 0 {
                counts.open.remove(&self.ip);
            }
        }
    }
}

/// Accepts on the double's address; see the module doc.
pub(super) struct FrontDoor {
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl FrontDoor {
    pub(super) fn start(listener: TcpListener, server: SocketAddr, limiter: Arc<Limiter>) -> Self {
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(accept_loop(listener, server, limiter, shutdown.clone()));
        FrontDoor { shutdown, task }
    }
}

impl Drop for FrontDoor {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.task.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    server: SocketAddr,
    limiter: Arc<Limiter>,
    shutdown: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((client, peer)) = accepted else {
            // Out of file descriptors and the like: retry, as Go's http.Server does.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        // Go prints an IPv4-mapped IPv6 address as IPv4: one client, one key.
        match limiter.admit(peer.ip().to_canonical()) {
            Some(admitted) => {
                tokio::spawn(splice(client, server, admitted, shutdown.clone()));
            }
            // On the accept path, as Consul's ConnState hook runs in its accept loop.
            None => refuse(client).await,
        }
    }
}

/// The 429, within the deadline, then the close (dropping the stream), unread request and all.
async fn refuse(mut client: TcpStream) {
    let _ = tokio::time::timeout(REFUSAL_DEADLINE, client.write_all(TOO_MANY_CONNECTIONS)).await;
}

/// Carries one admitted connection to the HTTP server until either side closes it or the
/// double goes; the count is freed when it ends.
async fn splice(
    mut client: TcpStream,
    server: SocketAddr,
    admitted: Admitted,
    shutdown: CancellationToken,
) {
    let Ok(mut upstream) = TcpStream::connect(server).await else {
        return;
    };
    // No Nagle delays on the extra hop (Go sets TCP_NODELAY on every connection too).
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    tokio::select! {
        () = shutdown.cancelled() => {}
        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
    }
    drop(admitted);
}

impl Connections {
    /// Open right now, all clients together.
    pub fn open_total(&self) -> usize {
        self.open.values().sum()
    }

    pub fn open_from(&self, ip: IpAddr) -> usize {
        self.open.get(&ip).copied().unwrap_or(0)
    }

    pub fn peak_from(&self, ip: IpAddr) -> usize {
        self.peak.get(&ip).copied().unwrap_or(0)
    }

    pub fn refused_total(&self) -> u64 {
        self.refused.values().sum()
    }

    pub fn refused_from(&self, ip: IpAddr) -> u64 {
        self.refused.get(&ip).copied().unwrap_or(0)
    }
}
