//! A client for looking at the double from tests: plain GETs, an SSE reader over `chunk()`
//! (CRLF, LF or CR line endings; heartbeats skipped), fixtures and a JSON shape comparison.

use std::time::Duration;

use serde_json::Value;

use super::MarathonDouble;
use crate::support::fixtures::{self, ShapeRules};
use crate::support::{patience, Answer};

/// Bounds every wait of these tests: 10 s, scaled by patience.
pub fn wait() -> Duration {
    patience(Duration::from_secs(10))
}

/// How long a stream must stay quiet to count as silent: 300 ms, scaled by patience (a slow
/// machine is slow to send too).
fn quiet() -> Duration {
    patience(Duration::from_millis(300))
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(patience(Duration::from_secs(2)))
        .build()
        .unwrap()
}

pub async fn get(marathon: &MarathonDouble, path: &str) -> Answer {
    get_with(marathon, path, &[]).await
}

pub async fn get_with(marathon: &MarathonDouble, path: &str, headers: &[(&str, &str)]) -> Answer {
    let url = format!("{}{path}", marathon.url());
    crate::support::get_answer(&url, headers, Duration::from_secs(10)).await
}

/// An open `/v2/events` response, read with `chunk()` and parsed as SSE (CRLF, LF or CR).
pub struct EventStream {
    pub response: reqwest::Response,
    pub buf: Vec<u8>,
}

pub async fn open_stream(marathon: &MarathonDouble, path: &str) -> EventStream {
    open_stream_with(
        marathon,
        path,
        client().get(format!("{}{path}", marathon.url())),
    )
    .await
}

pub async fn open_stream_with(
    marathon: &MarathonDouble,
    path: &str,
    request: reqwest::RequestBuilder,
) -> EventStream {
    let response =
        tokio::time::timeout(wait(), request.header("Accept", "text/event-stream").send())
            .await
            .unwrap_or_else(|_| {
                panic!("{path}: no headers after {:?} ({})", wait(), marathon.url())
            })
            .unwrap();
    assert_eq!(response.status(), 200, "{path}");
    assert_eq!(
        response.headers()["content-type"],
        "text/event-stream;charset=utf-8"
    );
    EventStream {
        response,
        buf: Vec::new(),
    }
}

impl EventStream {
    /// Reads one more chunk into the buffer; panics at the end of the body or after `wait()`.
    pub async fn fill(&mut self) {
        let chunk = tokio::time::timeout(wait(), self.response.chunk())
            .await
            .unwrap_or_else(|_| panic!("nothing for {:?}; have {:?}", wait(), self.text()))
            .unwrap()
            .unwrap_or_else(|| panic!("stream ended; have {:?}", self.text()));
        self.buf.extend_from_slice(&chunk);
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf).into_owned()
    }

    /// The next `len` bytes, exactly as sent.
    pub async fn raw(&mut self, len: usize) -> String {
        while self.buf.len() < len {
            self.fill().await;
        }
        String::from_utf8(self.buf.drain(..len).collect()).unwrap()
    }

    /// The next raw CRLF frame, up to and including its blank line.
    pub async fn raw_frame(&mut self) -> String {
        loop {
            if let Some(end) = self.text().find("\r\n\r\n") {
                return self.raw(end + 4).await;
            }
            self.fill().await;
        }
    }

    fn take_line(&mut self) -> Option<String> {
        let end = self.buf.iter().position(|b| *b == b'\n' || *b == b'\r')?;
        if self.buf[end] == b'\r' && end + 1 == self.buf.len() {
            return None; // a LF may follow
        }
        let width = if self.buf[end..].starts_with(b"\r\n") {
            2
        } else {
            1
        };
        let line = String::from_utf8(self.buf[..end].to_vec()).unwrap();
        self.buf.drain(..end + width);
        Some(line)
    }

    /// The next event (type, data), skipping blank lines such as heartbeats.
    pub async fn next_event(&mut self) -> (String, Value) {
        let mut event_type = None;
        let mut data: Option<String> = None;
        loop {
            let Some(line) = self.take_line() else {
                self.fill().await;
                continue;
            };
            if line.is_empty() {
                if let Some(data) = data.take() {
                    let value = serde_json::from_str(&data).unwrap();
                    return (event_type.unwrap_or_else(|| "message".to_string()), value);
                }
            } else if let Some(value) = line.strip_prefix("event: ") {
                event_type = Some(value.to_string());
            } else if let Some(value) = line.strip_prefix("data: ") {
                data = Some(value.to_string());
            } else {
                panic!("unexpected SSE line {line:?}");
            }
        }
    }

    pub async fn next_of(&mut self, wanted: &str) -> Value {
        loop {
            let (event_type, data) = self.next_event().await;
            if event_type == wanted {
                return data;
            }
        }
    }

    pub async fn types(&mut self, count: usize) -> Vec<String> {
        let mut types = Vec::new();
        for _ in 0..count {
            types.push(self.next_event().await.0);
        }
        types
    }

    /// True if nothing at all (not even the end) arrives for `quiet()`.
    pub async fn is_silent(&mut self) -> bool {
        match tokio::time::timeout(quiet(), self.response.chunk()).await {
            Err(_) => self.buf.is_empty(),
            Ok(read) => panic!("expected silence, got {read:?} after {:?}", self.text()),
        }
    }

    /// Like `is_silent`, after at most one heartbeat that may have left before a stall.
    pub async fn is_silent_after_stall(&mut self) -> bool {
        match tokio::time::timeout(quiet(), self.response.chunk()).await {
            Err(_) => self.buf.is_empty(),
            Ok(Ok(Some(beat))) if &beat[..] == b"\r\n" => self.is_silent().await,
            Ok(read) => panic!("expected silence, got {read:?} after {:?}", self.text()),
        }
    }

    /// How the body ends: Ok(()) for a clean end, Err for a broken connection.
    pub async fn end(&mut self) -> Result<(), reqwest::Error> {
        loop {
            match tokio::time::timeout(wait(), self.response.chunk()).await {
                Err(_) => panic!("the stream did not end within {:?}", wait()),
                Ok(Ok(Some(chunk))) => self.buf.extend_from_slice(&chunk),
                Ok(Ok(None)) => return Ok(()),
                Ok(Err(error)) => return Err(error),
            }
        }
    }
}

pub fn read_fixture(name: &str) -> Value {
    fixtures::read("marathon", name)
}

/// Array items are compared with ours at the same index, or our last one. Exceptions: the keys
/// inside `labels` (data, not schema), and `ports`, the pre-1.0 twin of `portDefinitions` in
/// nginx-blue, which Marathon 1.x no longer writes.
pub struct MarathonShape;

impl ShapeRules for MarathonShape {
    fn skip(&self, path: &str) -> bool {
        path.ends_with(".labels")
    }

    fn optional(&self, key: &str, path: &str) -> bool {
        key == "ports" && path.ends_with(']')
    }

    fn item<'a>(&self, ours: &'a [Value], i: usize, _fixture: &Value) -> Option<&'a Value> {
        ours.get(i).or(ours.last())
    }
}
