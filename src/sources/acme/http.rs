//! The ACME client's HTTP: hyper over rustls (ring), as instant-acme's own client, plus what
//! that one lacks: a timeout on every request, a bound on every answer's size, and the CA's
//! `Retry-After` on an error answer (a rate limit, a 503) kept for the host's backoff.

use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::Request;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use instant_acme::{BodyWrapper, BytesResponse, HttpClient};

/// How long one request to the CA may take until its answer's headers.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest answer read from the CA: a certificate chain takes a few KiB, a directory, an
/// order or a problem document less. Past it, the read fails (and the order with it).
pub const MAX_ANSWER: usize = 1 << 20;
/// The longest `Retry-After` taken as it is; a longer one is cut to this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(7 * 24 * 3600);

/// The latest `Retry-After` of an error answer, shared by the client and the backoff.
#[derive(Clone, Default)]
pub struct RetryAfter(Arc<Mutex<Option<SystemTime>>>);

impl RetryAfter {
    /// How long the CA asked to wait, from now (and forgets it).
    pub fn take(&self) -> Option<Duration> {
        let at = self.0.lock().ok()?.take()?;
        Some(
            at.duration_since(SystemTime::now())
                .unwrap_or_default()
                .min(MAX_RETRY_AFTER),
        )
    }

    fn set(&self, at: SystemTime) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(at);
        }
    }
}

/// `Retry-After`: delay-seconds or an HTTP-date (RFC 9110 10.2.3).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<SystemTime> {
    let value = value.trim();
    match value.parse::<u64>() {
        Ok(seconds) => now.checked_add(Duration::from_secs(seconds.min(MAX_RETRY_AFTER.as_secs()))),
        Err(_) => httpdate::parse_http_date(value).ok(),
    }
}

pub struct AcmeHttp {
    client: HyperClient<hyper_rustls::HttpsConnector<HttpConnector>, BodyWrapper<Bytes>>,
    retry_after: RetryAfter,
}

impl AcmeHttp {
    /// A client trusting `ca_file`'s certificates alone, else the web's roots (webpki-roots).
    pub fn new(ca_file: Option<&Path>, retry_after: RetryAfter) -> Result<AcmeHttp, String> {
        let mut roots = rustls::RootCertStore::empty();
        match ca_file {
            Some(path) => {
                let text = std::fs::read(path)
                    .map_err(|err| format!("tls.acme.ca_file {}: {err}", path.display()))?;
                let blocks = pem::parse_many(&text)
                    .map_err(|err| format!("tls.acme.ca_file {}: {err}", path.display()))?;
                for block in blocks.iter().filter(|b| b.tag() == "CERTIFICATE") {
                    roots
                        .add(rustls_pki_types::CertificateDer::from(
                            block.contents().to_vec(),
                        ))
                        .map_err(|err| format!("tls.acme.ca_file {}: {err}", path.display()))?;
                }
                if roots.is_empty() {
                    return Err(format!(
                        "tls.acme.ca_file {}: holds no certificate",
                        path.display()
                    ));
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|err| err.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .build();
        Ok(AcmeHttp {
            client: HyperClient::builder(TokioExecutor::new()).build(connector),
            retry_after,
        })
    }
}

type Answer =
    Pin<Box<dyn std::future::Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>>;

impl HttpClient for AcmeHttp {
    fn request(&self, request: Request<BodyWrapper<Bytes>>) -> Answer {
        let answer = self.client.request(request);
        let retry_after = self.retry_after.clone();
        Box::pin(async move {
            let response = match tokio::time::timeout(REQUEST_TIMEOUT, answer).await {
                Err(_) => {
                    return Err(instant_acme::Error::Str(
                        "the CA did not answer within 30 s",
                    ))
                }
                Ok(Err(err)) => return Err(instant_acme::Error::Other(Box::new(err))),
                Ok(Ok(response)) => response,
            };
            if !response.status().is_success() {
                if let Some(at) = response
                    .headers()
                    .get(http::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| parse_retry_after(v, SystemTime::now()))
                {
                    retry_after.set(at);
                }
            }
            Ok(BytesResponse::from(response.map(|body| {
                http_body_util::Limited::new(body, MAX_ANSWER)
            })))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_takes_seconds_and_http_dates_and_nothing_else() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert_eq!(
            parse_retry_after(" 120 ", now),
            Some(now + Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777))
        );
        assert_eq!(parse_retry_after("soon", now), None);
        // A CA asking for years is held to a week.
        assert_eq!(
            parse_retry_after("999999999999", now),
            Some(now + MAX_RETRY_AFTER)
        );
        let slot = RetryAfter::default();
        slot.set(SystemTime::now() + Duration::from_secs(3600));
        assert!(slot.take().is_some_and(|d| d > Duration::from_secs(3500)));
        assert_eq!(slot.take(), None, "taken once");
    }
}
