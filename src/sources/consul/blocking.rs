//! The blocking-query loop, written once: Consul's client rules (reset the index when it goes
//! backwards, never block below 1, a client timeout above wait * 17/16, a token bucket per
//! watch), backoff with jitter on failure, and what the answers say besides their content.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use reqwest::Url;
use tokio_util::sync::CancellationToken;

use super::api::next_index;
use super::client::{Client, ConsulError, Notices};
use crate::sources::Backoff;

/// Burst of the per-watch token bucket.
pub const RATE_BURST: u32 = 5;

/// A token bucket per watch: at most `rate` requests a second after a burst.
fn rate_limiter(rate: NonZeroU32) -> DefaultDirectRateLimiter {
    let burst = NonZeroU32::new(RATE_BURST).unwrap_or(NonZeroU32::MIN);
    RateLimiter::direct(Quota::per_second(rate).allow_burst(burst))
}

/// One endpoint watched with blocking queries.
pub struct BlockingQuery {
    url: Url,
    what: &'static str,
    params: &'static [(&'static str, &'static str)],
    index: u64,
    limiter: DefaultDirectRateLimiter,
    backoff: Backoff,
    notices: Notices,
}

impl BlockingQuery {
    pub fn new(
        client: &Client,
        what: &'static str,
        segments: &[&str],
        params: &'static [(&'static str, &'static str)],
    ) -> BlockingQuery {
        BlockingQuery {
            url: client.url(segments),
            what,
            params,
            index: 0,
            limiter: rate_limiter(client.config.max_rate),
            backoff: Backoff::default(),
            notices: Notices::default(),
        }
    }

    /// The next answer, decoded: the first one at once, then each when Consul's index moves
    /// (or its wait ends). A failure is handed to `failed` with the delay before the next try,
    /// and tried again after it. `None` once `stop` is cancelled.
    pub async fn next<T>(
        &mut self,
        client: &Client,
        decode: fn(&[u8]) -> Result<T, String>,
        stop: &CancellationToken,
        mut failed: impl FnMut(&ConsulError, Duration),
    ) -> Option<T> {
        loop {
            let answer = tokio::select! {
                _ = stop.cancelled() => return None,
                answer = async {
                    self.limiter.until_ready().await;
                    client.get(self.url.clone(), self.index, self.params).await
                } => answer,
            };
            let decoded = answer.and_then(|answer| {
                self.notices.observe(&answer, self.what);
                let value = decode(&answer.body)
                    .map_err(|message| ConsulError::decode(self.url.clone(), message))?;
                Ok((answer.index, value))
            });
            match decoded {
                Ok((index, value)) => {
                    self.index = next_index(self.index, index);
                    self.backoff.reset();
                    return Some(value);
                }
                Err(err) => {
                    let delay = self.backoff.next_delay();
                    self.index = 0;
                    failed(&err, delay);
                    tokio::select! {
                        _ = stop.cancelled() => return None,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts and lower bounds only: a loaded machine makes the requests later, never sooner.
    #[tokio::test]
    async fn the_rate_limit_spaces_requests_after_the_burst() {
        // Taken before the limiter exists, so that it cannot have counted from earlier.
        let start = std::time::Instant::now();
        let limiter = rate_limiter(NonZeroU32::new(10).unwrap());
        // The whole burst is there at once: no request of it waits.
        for i in 0..RATE_BURST {
            assert!(
                limiter.check().is_ok(),
                "request {i} of the burst had to wait"
            );
        }
        // 5 more at 10/s cannot all pass before about 0.5 s.
        for _ in 0..5 {
            limiter.until_ready().await;
        }
        assert!(
            start.elapsed() >= Duration::from_millis(400),
            "{:?}",
            start.elapsed()
        );
    }
}
