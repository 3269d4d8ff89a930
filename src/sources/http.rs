//! HTTP for the API sources (Consul, Marathon): one request, its body read whole, and errors
//! that say which URL failed and why.

use reqwest::header::HeaderMap;
use reqwest::{RequestBuilder, StatusCode, Url};

use super::error_chain;

/// Longest part of an error body kept in a message.
const MAX_BODY_IN_ERROR: usize = 200;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot build the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    #[error("GET {url}: {}", error_chain(source))]
    Request {
        url: Url,
        #[source]
        source: reqwest::Error,
    },
    #[error("GET {url}: {status}: {body}")]
    Status {
        url: Url,
        status: StatusCode,
        body: String,
    },
    #[error("GET {url}: cannot decode the answer: {message}")]
    Decode { url: Url, message: String },
}

/// Sends `request` (for `url`) and returns the headers and body of a 2xx answer; any other
/// status is an error carrying the start of the body (Consul's and Marathon's error texts).
pub async fn fetch(request: RequestBuilder, url: &Url) -> Result<(HeaderMap, Vec<u8>), HttpError> {
    let failed = |source| HttpError::Request {
        url: url.clone(),
        source,
    };
    let response = request.send().await.map_err(failed)?;
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.bytes().await.map_err(failed)?.to_vec();
    if !status.is_success() {
        let mut text = String::from_utf8_lossy(&body).trim().to_string();
        text.truncate(MAX_BODY_IN_ERROR);
        return Err(HttpError::Status {
            url: url.clone(),
            status,
            body: text,
        });
    }
    Ok((headers, body))
}
