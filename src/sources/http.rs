//! HTTP for the API sources (Consul, Marathon): one request, its body read whole, and errors
//! that say which URL failed and why. URLs are printed through [`redact`] (no userinfo, no
//! secret query values), and redirects are never followed: a 3xx is an error that names where
//! it pointed, so that no token or password is ever sent to another host.

use reqwest::header::{HeaderMap, LOCATION};
use reqwest::{RequestBuilder, StatusCode, Url};

use super::error_chain;
use crate::config::redact;

/// Longest part of an error body kept in a message.
const MAX_BODY_IN_ERROR: usize = 200;
/// The most of an error answer's body read, in bytes: enough for an HTML error page's
/// `<title>` ([`error_text`]), never the whole of a large one.
const MAX_ERROR_BODY: usize = 64 << 10;
/// Longest decode error kept, in bytes: serde's messages quote the input (a string of the
/// wrong type whole), and the message reaches the logs, `/healthz` and the status page.
pub const MAX_DECODE_ERROR: usize = 300;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot build the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    #[error("GET {}: {}", redact(url), error_chain(source))]
    Request {
        url: Url,
        #[source]
        source: reqwest::Error,
    },
    #[error("GET {}: {status}: {body}", redact(url))]
    Status {
        url: Url,
        status: StatusCode,
        body: String,
    },
    #[error("{method} {}: {status}: redirected to {to}; weft follows no redirects (no credential may reach another host): configure the URL that answers itself", redact(url))]
    Redirect {
        method: &'static str,
        url: Box<Url>,
        status: StatusCode,
        /// Where the answer pointed: scheme, host and port only.
        to: String,
    },
    #[error("GET {}: cannot decode the answer: {message}", redact(url))]
    Decode { url: Url, message: String },
    #[error("GET {}: the answer is larger than {} MiB, weft's bound; nothing of it is used", redact(url), .max >> 20)]
    TooLarge { url: Url, max: usize },
}

impl HttpError {
    /// An answer to `url` that does not decode, and why, cut to [`MAX_DECODE_ERROR`].
    pub fn decode(url: Url, message: &str) -> HttpError {
        HttpError::Decode {
            url,
            message: crate::escape::clip(message, MAX_DECODE_ERROR).into_owned(),
        }
    }

    /// A failed request; reqwest's own message would print the URL again, unredacted.
    pub fn request(url: &Url, source: reqwest::Error) -> HttpError {
        HttpError::Request {
            url: url.clone(),
            source: source.without_url(),
        }
    }

    /// The error for a 3xx answer to `method url`, or `None` for any other status.
    pub fn redirect(
        method: &'static str,
        url: &Url,
        status: StatusCode,
        headers: &HeaderMap,
    ) -> Option<HttpError> {
        if !status.is_redirection() {
            return None;
        }
        let to = headers
            .get(LOCATION)
            .and_then(|value| value.to_str().ok())
            .map_or_else(
                || "nowhere (no Location)".to_string(),
                |location| redirect_target(url, location),
            );
        Some(HttpError::Redirect {
            method,
            url: Box::new(url.clone()),
            status,
            to,
        })
    }
}

/// Where a `Location` (absolute or relative to `url`) points, as `scheme://host:port`: never
/// its userinfo, path or query.
fn redirect_target(url: &Url, location: &str) -> String {
    match url.join(location) {
        Ok(target) => {
            let host = target.host_str().unwrap_or("?");
            match target.port() {
                Some(port) => format!("{}://{host}:{port}", target.scheme()),
                None => format!("{}://{host}", target.scheme()),
            }
        }
        Err(_) => "an unreadable Location".to_string(),
    }
}

/// The pages an answer without a Content-Length is read into.
const PAGE: usize = 1 << 20;

/// Where the body of a 2xx answer goes, chunk by chunk, as it comes.
pub trait Sink {
    /// The answer's Content-Length, if it has one (at most the bound), before any chunk.
    fn expect(&mut self, _length: Option<usize>) {}
    fn take(&mut self, chunk: &[u8]);
}

/// A body read whole. Never a buffer doubled as it grows: each doubling copies the body, and
/// the allocator may keep every smaller buffer for a while (a refused 256 MiB answer took weft
/// to 772 MiB that way). With a Content-Length, one allocation of that size; without, pages
/// of 1 MiB filled as the chunks come, joined once at the end.
#[derive(Default)]
pub struct Body {
    known: bool,
    body: Vec<u8>,
    /// Without a Content-Length: full pages, and the one being filled.
    pages: Vec<Vec<u8>>,
    page: Vec<u8>,
}

impl Sink for Body {
    fn expect(&mut self, length: Option<usize>) {
        self.known = length.is_some();
        self.body = Vec::with_capacity(length.unwrap_or(0));
    }

    fn take(&mut self, chunk: &[u8]) {
        if self.known {
            self.body.extend_from_slice(chunk);
            return;
        }
        let mut rest = chunk;
        while !rest.is_empty() {
            self.page.reserve_exact(PAGE - self.page.len());
            let (now, later) = rest.split_at(rest.len().min(PAGE - self.page.len()));
            self.page.extend_from_slice(now);
            rest = later;
            if self.page.len() == PAGE {
                self.pages.push(std::mem::take(&mut self.page));
            }
        }
    }
}

impl Body {
    pub fn into_vec(mut self) -> Vec<u8> {
        if !self.known {
            self.pages.push(self.page);
            self.body = self.pages.concat();
        }
        self.body
    }
}

/// Sends `request` (for `url`) and returns the headers and body of a 2xx answer, of at most
/// `max` bytes (read as it comes: a larger answer is cut off there, never held whole); any
/// other status is an error carrying the start of the body (Consul's and Marathon's error
/// texts).
pub async fn fetch(
    request: RequestBuilder,
    url: &Url,
    max: usize,
) -> Result<(HeaderMap, Vec<u8>), HttpError> {
    let mut body = Body::default();
    let (headers, _) = fetch_into(request, url, max, &mut body).await?;
    Ok((headers, body.into_vec()))
}

/// [`fetch`], the body of a 2xx answer handed to `sink` as it comes (at most `max` bytes: past
/// that, an error, and the sink has had part of it); the headers and the body's length are
/// returned.
pub async fn fetch_into(
    request: RequestBuilder,
    url: &Url,
    max: usize,
    sink: &mut (impl Sink + Send),
) -> Result<(HeaderMap, usize), HttpError> {
    let failed = |source| HttpError::request(url, source);
    let mut response = request.send().await.map_err(failed)?;
    let status = response.status();
    let headers = response.headers().clone();
    if let Some(redirect) = HttpError::redirect("GET", url, status, &headers) {
        return Err(redirect);
    }
    if !status.is_success() {
        // An error's text is the start of its body: the rest is not read (nor held), and the
        // connection is not reused. The status is the error, whether the body reads or not.
        let mut start = Vec::new();
        while start.len() < MAX_ERROR_BODY {
            let Ok(Some(chunk)) = response.chunk().await else {
                break;
            };
            let room = MAX_ERROR_BODY - start.len();
            start.extend_from_slice(&chunk[..chunk.len().min(room)]);
        }
        return Err(HttpError::Status {
            url: url.clone(),
            status,
            body: error_text(&start),
        });
    }
    let too_large = || HttpError::TooLarge {
        url: url.clone(),
        max,
    };
    if response.content_length().is_some_and(|n| n > max as u64) {
        return Err(too_large());
    }
    let known = response
        .content_length()
        .and_then(|n| usize::try_from(n.min(max as u64)).ok());
    sink.expect(known);
    let mut length = 0;
    while let Some(chunk) = response.chunk().await.map_err(failed)? {
        length += chunk.len();
        if length > max {
            return Err(too_large());
        }
        sink.take(&chunk);
    }
    Ok((headers, length))
}

/// The start of an error body as text, cut on a character boundary (any bytes, any encoding).
/// An HTML error page (Jetty's, in front of Marathon during a leader election, or a proxy's)
/// is reduced to its title.
pub(crate) fn error_text(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = html_title(&text).unwrap_or(text.trim());
    let end = text
        .char_indices()
        .map(|(i, c)| i + c.len_utf8())
        .take_while(|end| *end <= MAX_BODY_IN_ERROR)
        .last()
        .unwrap_or(0);
    text[..end].to_string()
}

/// The `<title>` of an HTML page.
fn html_title(text: &str) -> Option<&str> {
    if !text.trim_start().starts_with('<') {
        return None;
    }
    let lower = text.to_ascii_lowercase();
    let start = lower.find("<title>")? + "<title>".len();
    let end = start + lower[start..].find("</title>")?;
    Some(text[start..end].trim()).filter(|title| !title.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// serde quotes a string of the wrong type whole: a megabyte of it reaches no log.
    #[test]
    fn a_decode_error_is_cut_to_its_bound() {
        let answer = format!(r#"{{"port":"{}"}}"#, "9".repeat(1 << 20));
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Answer {
            port: u16,
        }
        let message = serde_json::from_str::<Answer>(&answer)
            .unwrap_err()
            .to_string();
        assert!(message.len() > 1 << 20);
        let url = Url::parse("http://consul:8500/v1/health/state/any").unwrap();
        let err = HttpError::decode(url, &message).to_string();
        assert!(err.starts_with("GET http://consul:8500/v1/health/state/any: cannot decode"));
        assert!(err.ends_with('…'), "{err}");
        assert!(err.len() < MAX_DECODE_ERROR + 100, "{} bytes", err.len());
    }

    #[test]
    fn errors_print_urls_without_credentials() {
        let url = Url::parse("http://user:pass@consul:8500/v1/kv/x?token=t0k&dc=a").unwrap();
        let status = HttpError::Status {
            url: url.clone(),
            status: StatusCode::FORBIDDEN,
            body: "ACL not found".into(),
        };
        assert_eq!(
            status.to_string(),
            "GET http://consul:8500/v1/kv/x?token=redacted&dc=a: 403 Forbidden: ACL not found"
        );
        let mut headers = HeaderMap::new();
        headers.insert(
            LOCATION,
            "http://evil:pw@other.example:9000/steal?token=x"
                .parse()
                .unwrap(),
        );
        let redirect = HttpError::redirect("GET", &url, StatusCode::FOUND, &headers).unwrap();
        let text = redirect.to_string();
        assert!(
            text.contains("302 Found: redirected to http://other.example:9000;"),
            "{text}"
        );
        for secret in ["pass", "t0k", "evil", "pw", "steal"] {
            assert!(!text.contains(secret), "{text}");
        }
        headers.insert(LOCATION, "/elsewhere".parse().unwrap());
        let relative = HttpError::redirect("GET", &url, StatusCode::MOVED_PERMANENTLY, &headers);
        assert!(relative
            .unwrap()
            .to_string()
            .contains("redirected to http://consul:8500;"));
        assert!(HttpError::redirect("GET", &url, StatusCode::OK, &headers).is_none());
    }

    #[test]
    fn an_html_error_page_reads_as_its_title() {
        let jetty = b"<html>\n<head>\n<meta http-equiv=\"Content-Type\" content=\"text/html;charset=ISO-8859-1\"/>\n<title>Error 503 Could not determine the current leader</title>\n</head>\n<body><h2>HTTP ERROR 503</h2></body>\n</html>\n";
        assert_eq!(
            error_text(jetty),
            "Error 503 Could not determine the current leader"
        );
        assert_eq!(
            error_text(b"<html><body>no title</body></html>"),
            "<html><body>no title</body></html>"
        );
        assert_eq!(
            error_text(b"{\"message\":\"<title>x</title>\"}"),
            "{\"message\":\"<title>x</title>\"}"
        );
    }

    #[test]
    fn error_text_is_cut_on_a_character_boundary() {
        // Latin-1 bytes become three-byte replacement characters.
        let body: Vec<u8> = std::iter::repeat(0xe9).take(300).collect();
        let text = error_text(&body);
        assert!(text.len() <= MAX_BODY_IN_ERROR && text.len() > MAX_BODY_IN_ERROR - 4);
        assert_eq!(error_text(b"  No cluster leader\n"), "No cluster leader");
        assert_eq!(error_text(&[b'x'; 500]).len(), MAX_BODY_IN_ERROR);
    }

    /// An error answer that says it is huge, sends a megabyte and then nothing more: its status
    /// and the start of its text come back at once, and little of it is held.
    #[tokio::test]
    async fn an_error_answer_is_read_only_for_its_start() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = Url::parse(&format!(
            "http://{}/v2/apps",
            listener.local_addr().unwrap()
        ))
        .unwrap();
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = [0; 4096];
            let _ = stream.read(&mut request).await.unwrap();
            let head = "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 536870912\r\n\r\n";
            stream.write_all(head.as_bytes()).await.unwrap();
            stream
                .write_all(b"<html><head><title>Leader election</title>")
                .await
                .unwrap();
            // Then a megabyte, and the connection stays open with the rest unsent.
            let _ = stream.write_all(&vec![b' '; 1 << 20]).await;
            tokio::time::sleep(std::time::Duration::from_secs(30)).await;
        });
        let client = reqwest::Client::new();
        let mut body = Body::default();
        let fetched = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            fetch_into(client.get(url.clone()), &url, 1 << 30, &mut body),
        )
        .await
        .expect("an error answer does not wait for its whole body");
        match fetched {
            Err(HttpError::Status { status, body, .. }) => {
                assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
                assert_eq!(body, "Leader election");
            }
            other => panic!("{other:?}"),
        }
        assert!(body.into_vec().is_empty());
        server.abort();
    }
}
