//! HAProxy's live traffic, as the operator asks for it: `show stat` on the admin socket, read
//! at most every [`MIN_READ_INTERVAL`] and only when someone looks; and HAProxy's own
//! Prometheus exporter, on a unix socket in run_dir ([`PROMETHEUS_SOCKET`]), passed through.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::Mutex;
use tracing::debug;

use super::{cli_command, CliError};

pub use crate::render::PROMETHEUS_SOCKET;
/// The least time between two reads of `show stat`: however many operators refresh the status
/// page, HAProxy answers one read every 2 s at most, and none while nobody looks.
pub const MIN_READ_INTERVAL: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error(transparent)]
    Cli(#[from] CliError),
    #[error("show stat: {0}")]
    Csv(String),
}

/// Responses by class, since HAProxy started (or took the backend over on a reload).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Responses {
    #[serde(rename = "2xx")]
    pub xx2: u64,
    #[serde(rename = "3xx")]
    pub xx3: u64,
    #[serde(rename = "4xx")]
    pub xx4: u64,
    #[serde(rename = "5xx")]
    pub xx5: u64,
}

/// One backend's figures (HAProxy's `BACKEND` row and its servers').
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BackendStats {
    /// Requests per second over the last second (`rate`: in HTTP mode, one per request).
    pub rate: u64,
    /// Requests since the worker started (`stot`).
    pub requests: u64,
    pub responses: Responses,
    /// Average response time over the last 1024 requests, in ms (`rtime`).
    pub response_ms: u64,
    /// Requests in progress (`scur`).
    pub sessions: u64,
    pub servers: Vec<ServerStats>,
}

/// One server slot's state as HAProxy sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ServerStats {
    /// The slot (`s1`...).
    pub slot: String,
    /// `ip:port`, as the slot holds it now.
    pub address: String,
    /// `UP`, `DOWN`, `MAINT`, `UP 1/3` (going down), `no check`...
    pub status: String,
    /// The last check's result (`L7OK`, `L4CON`...) and its description, if checked.
    pub check: String,
    /// Seconds since the status last changed.
    pub since_change: u64,
}

/// Every backend's figures by backend name (`be_...`), from one `show stat`.
pub type Stats = HashMap<String, BackendStats>;

/// Backends (2) and servers (4) of every proxy: no frontend rows.
const SHOW_STAT: &str = "show stat -1 6 -1";

/// The columns of a `show stat` row weft reads; csv matches them by the header's names and
/// skips the others. Empty fields (a server has no `rtime`...) read as `None`.
#[derive(Debug, serde::Deserialize)]
struct Row {
    pxname: String,
    svname: String,
    #[serde(default)]
    status: String,
    #[serde(default, deserialize_with = "csv::invalid_option")]
    lastchg: Option<u64>,
    #[serde(default, deserialize_with = "csv::invalid_option")]
    rate: Option<u64>,
    #[serde(default, deserialize_with = "csv::invalid_option")]
    stot: Option<u64>,
    #[serde(default, deserialize_with = "csv::invalid_option")]
    scur: Option<u64>,
    #[serde(default, deserialize_with = "csv::invalid_option")]
    rtime: Option<u64>,
    #[serde(default, deserialize_with = "csv::invalid_option")]
    hrsp_2xx: Option<u64>,
    #[serde(default, deserialize_with = "csv::invalid_option")]
    hrsp_3xx: Option<u64>,
    #[serde(default, deserialize_with = "csv::invalid_option")]
    hrsp_4xx: Option<u64>,
    #[serde(default, deserialize_with = "csv::invalid_option")]
    hrsp_5xx: Option<u64>,
    #[serde(default)]
    check_status: String,
    #[serde(default)]
    check_desc: String,
    #[serde(default)]
    addr: String,
}

/// Parses `show stat`'s CSV (`# pxname,svname,...` and one row per proxy and server).
pub fn parse(text: &str) -> Result<Stats, StatsError> {
    let text = text
        .strip_prefix("# ")
        .ok_or_else(|| StatsError::Csv(format!("not a show stat answer: {:.80}", text)))?;
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_reader(text.as_bytes());
    let mut stats = Stats::new();
    for row in reader.deserialize::<Row>() {
        let row = row.map_err(|e| StatsError::Csv(e.to_string()))?;
        let backend = stats.entry(row.pxname).or_default();
        if row.svname == "BACKEND" {
            backend.rate = row.rate.unwrap_or(0);
            backend.requests = row.stot.unwrap_or(0);
            backend.sessions = row.scur.unwrap_or(0);
            backend.response_ms = row.rtime.unwrap_or(0);
            backend.responses = Responses {
                xx2: row.hrsp_2xx.unwrap_or(0),
                xx3: row.hrsp_3xx.unwrap_or(0),
                xx4: row.hrsp_4xx.unwrap_or(0),
                xx5: row.hrsp_5xx.unwrap_or(0),
            };
        } else {
            let check = match (row.check_status.is_empty(), row.check_desc.is_empty()) {
                (false, false) => format!("{} {}", row.check_status, row.check_desc),
                _ => row.check_status + &row.check_desc,
            };
            backend.servers.push(ServerStats {
                slot: row.svname,
                address: row.addr,
                status: row.status,
                check,
                since_change: row.lastchg.unwrap_or(0),
            });
        }
    }
    Ok(stats)
}

/// Reads `show stat` once.
pub async fn read(admin: &Path) -> Result<Stats, StatsError> {
    parse(&cli_command(admin, SHOW_STAT).await?)
}

/// `show stat`, read when asked for and at most every [`MIN_READ_INTERVAL`]; a failed read
/// is `None` (HAProxy not running, or reloading).
#[derive(Debug)]
pub struct StatsCache {
    admin: PathBuf,
    last: Mutex<Option<(tokio::time::Instant, Option<Arc<Stats>>)>>,
}

impl StatsCache {
    pub fn new(admin: PathBuf) -> StatsCache {
        StatsCache {
            admin,
            last: Mutex::new(None),
        }
    }

    /// The figures, read anew if the last read is older than [`MIN_READ_INTERVAL`]. Callers
    /// that come during a read wait for it rather than read again.
    pub async fn get(&self) -> Option<Arc<Stats>> {
        let mut last = self.last.lock().await;
        let now = tokio::time::Instant::now();
        if let Some((at, stats)) = last.as_ref() {
            if now.saturating_duration_since(*at) < MIN_READ_INTERVAL {
                return stats.clone();
            }
        }
        let stats = match read(&self.admin).await {
            Ok(stats) => Some(Arc::new(stats)),
            Err(err) => {
                debug!(error = %err, "cannot read haproxy's traffic figures");
                None
            }
        };
        *last = Some((now, stats.clone()));
        stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exporters_query_holds_scopes_and_no_maint_alone() {
        for ok in [
            "scope=backend",
            "scope=backend&scope=server",
            "no-maint",
            "scope=sticktable&no-maint",
        ] {
            assert!(query_is_safe(ok), "{ok}");
        }
        let long = "scope=backend&".repeat(20);
        for bad in [
            "scope=",
            "x=1",
            "scope=backend&x",
            "no-maint=1",
            "scope=a b",
            "&",
            long.trim_end_matches('&'),
        ] {
            assert!(!query_is_safe(bad), "{bad}");
        }
    }

    const ANSWER: &str = "# pxname,svname,qcur,scur,stot,status,lastchg,rate,check_status,hrsp_2xx,hrsp_3xx,hrsp_4xx,hrsp_5xx,rtime,check_desc,addr,\n\
be_shop,s1,0,2,40,UP,12,3,L7OK,30,1,2,7,,Layer7 check passed,10.2.1.5:8080,\n\
be_shop,s2,0,0,0,MAINT,99,0,,0,0,0,0,,,127.0.0.1:1,\n\
be_shop,BACKEND,0,2,40,UP,12,3,,30,1,2,7,15,,,\n\n";

    #[test]
    fn backends_and_their_servers_are_read_by_column_name() {
        let stats = parse(ANSWER).unwrap();
        let shop = &stats["be_shop"];
        assert_eq!(
            (shop.rate, shop.requests, shop.sessions, shop.response_ms),
            (3, 40, 2, 15)
        );
        assert_eq!(
            shop.responses,
            Responses {
                xx2: 30,
                xx3: 1,
                xx4: 2,
                xx5: 7
            }
        );
        assert_eq!(shop.servers.len(), 2);
        assert_eq!(shop.servers[0].address, "10.2.1.5:8080");
        assert_eq!(shop.servers[0].check, "L7OK Layer7 check passed");
        assert_eq!(shop.servers[1].status, "MAINT");
        assert_eq!(shop.servers[1].since_change, 99);
    }

    #[tokio::test]
    async fn spares_in_use_are_named_after_their_services_across_chunks() {
        use futures::StreamExt;
        let chunks = [
            "m{proxy=\"spare_1\"} 1\nm{proxy=\"spa",
            "re_1\",server=\"s1\"} 2\nm{proxy=\"spare_10\"} 3\nm{proxy=\"be_x\"} 4",
        ];
        let frames = chunks.map(|c| {
            Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(bytes::Bytes::from(c)))
        });
        let body = http_body_util::StreamBody::new(futures::stream::iter(frames));
        let renames = vec![("proxy=\"spare_1\"".into(), "proxy=\"be_shop\"".into())];
        let parts: Vec<bytes::Bytes> = spares_renamed(body, renames)
            .map(Result::unwrap)
            .collect()
            .await;
        let text: String = parts
            .iter()
            .map(|b| std::str::from_utf8(b).unwrap())
            .collect();
        assert_eq!(
            text,
            "m{proxy=\"be_shop\"} 1\nm{proxy=\"be_shop\",server=\"s1\"} 2\n\
             m{proxy=\"spare_10\"} 3\nm{proxy=\"be_x\"} 4"
        );
    }

    #[test]
    fn an_answer_without_the_columns_is_an_error() {
        assert!(parse("Unknown command\n").is_err());
    }
}

/// The exporter's answer with each spare in use named as its service's own backend
/// (`proxy="spare_3"` -> `proxy="be_shop"`; `renames` holds such pairs of label texts): a
/// service's series carry its name from its first request on, and keep it after the reload
/// that packs the service onto its own backend. Line by line, as the body streams; nothing is
/// held but the line a chunk ends inside.
pub fn spares_renamed<B>(
    body: B,
    renames: Vec<(String, String)>,
) -> impl futures::Stream<Item = Result<bytes::Bytes, B::Error>>
where
    B: hyper::body::Body<Data = bytes::Bytes>,
{
    use futures::StreamExt;
    use http_body_util::BodyExt;
    let pending = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let tail = pending.clone();
    let renames = std::sync::Arc::new(renames);
    let at_end = renames.clone();
    let lines = body.into_data_stream().map(move |chunk| {
        chunk.map(|bytes| {
            let mut pending = pending.lock().unwrap_or_else(|e| e.into_inner());
            pending.extend_from_slice(&bytes);
            let cut = pending
                .iter()
                .rposition(|b| *b == b'\n')
                .map_or(0, |i| i + 1);
            let whole: Vec<u8> = pending.drain(..cut).collect();
            rename(whole, &renames)
        })
    });
    let rest = futures::stream::once(async move {
        let rest = std::mem::take(&mut *tail.lock().unwrap_or_else(|e| e.into_inner()));
        Ok(rename(rest, &at_end))
    });
    lines.chain(rest)
}

fn rename(text: Vec<u8>, renames: &[(String, String)]) -> bytes::Bytes {
    if renames.is_empty() {
        return text.into();
    }
    let mut text = String::from_utf8(text)
        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
    for (from, to) in renames {
        if text.contains(from.as_str()) {
            text = text.replace(from.as_str(), to);
        }
    }
    text.into()
}

/// The longest query passed on to the exporter.
pub const MAX_EXPORTER_QUERY: usize = 256;

/// The exporter's scopes and flags a query may name (`scope=backend&scope=server`,
/// `no-maint`), and nothing else: every part is `scope=` and a name of letters, digits, `_`
/// and `-`, or `no-maint`.
fn query_is_safe(query: &str) -> bool {
    query.len() <= MAX_EXPORTER_QUERY
        && query.split('&').all(|part| {
            part == "no-maint"
                || part.strip_prefix("scope=").is_some_and(|scope| {
                    !scope.is_empty()
                        && scope
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
                })
        })
}

#[derive(Debug, thiserror::Error)]
pub enum ExporterError {
    #[error("the query may hold only scope=... and no-maint")]
    Query,
    #[error("haproxy's exporter at {path}: {reason}")]
    Unreachable { path: PathBuf, reason: String },
}

/// HAProxy's Prometheus exporter's answer to `/metrics?query`, its body streamed as HAProxy
/// sends it (weft holds none of it: at 10,000 services it is tens of MB).
pub async fn exporter(
    socket: &Path,
    query: Option<&str>,
) -> Result<hyper::Response<hyper::body::Incoming>, ExporterError> {
    let query = query.filter(|q| !q.is_empty());
    if query.is_some_and(|q| !query_is_safe(q)) {
        return Err(ExporterError::Query);
    }
    let unreachable = |reason: String| ExporterError::Unreachable {
        path: socket.to_path_buf(),
        reason,
    };
    let exchange = async {
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| unreachable(e.to_string()))?;
        tokio::spawn(connection);
        let uri = match query {
            Some(query) => format!("/metrics?{query}"),
            None => "/metrics".to_string(),
        };
        let request = hyper::Request::get(uri)
            .header(hyper::header::HOST, "weft")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .map_err(|e| unreachable(e.to_string()))?;
        sender
            .send_request(request)
            .await
            .map_err(|e| unreachable(e.to_string()))
    };
    tokio::time::timeout(super::CLI_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| Err(unreachable("no answer within 5 s".into())))
}
