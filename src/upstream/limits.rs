//! Bounds that keep the metadata server (and Google's token endpoints) safe
//! from load: a rate and a concurrency limit on upstream requests.

use std::num::NonZeroU32;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::error::BrokerError;
use crate::error::FetchError;
use crate::request::TokenKey;
use crate::token::Token;
use crate::upstream::TokenSource;

/// Default most upstream requests per second (20), well below the metadata
/// server's own limit of about 50 per second for uncached tokens.
pub const DEFAULT_UPSTREAM_MAX_RPS: u32 = 20;
/// Default most upstream requests in flight at once (8).
pub const DEFAULT_UPSTREAM_MAX_CONCURRENCY: usize = 8;

/// Bounds on requests to the token source or the metadata server: at most
/// `max_rps` per second (bursts of a fifth of that) and `max_concurrency` at
/// once. Token fetches have one, the metadata endpoint's pass-through
/// another with the same numbers, so that a flood of pass-through requests
/// never delays a token; clones share the counts.
#[derive(Clone)]
pub struct UpstreamLimits {
    rate: Arc<DefaultDirectRateLimiter>,
    in_flight: Arc<Semaphore>,
}

impl UpstreamLimits {
    /// Limits of `max_rps` requests per second and `max_concurrency` at
    /// once (both at least 1).
    pub fn new(max_rps: u32, max_concurrency: usize) -> Self {
        let rps = NonZeroU32::new(max_rps).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(max_rps / 5).unwrap_or(NonZeroU32::MIN);
        Self {
            rate: Arc::new(RateLimiter::direct(
                Quota::per_second(rps).allow_burst(burst),
            )),
            in_flight: Arc::new(Semaphore::new(max_concurrency.max(1))),
        }
    }

    /// Waits for a place among the requests in flight, then for a turn
    /// within the rate; the place is held until the permit is dropped.
    pub async fn acquire(&self) -> Result<SemaphorePermit<'_>, FetchError> {
        let permit = self
            .in_flight
            .acquire()
            .await
            .map_err(|_| FetchError::Connect("upstream limiter closed".into()))?;
        self.rate.until_ready().await;
        Ok(permit)
    }

    /// Waits for a turn within the rate only: for a long-poll, which waits
    /// upstream for minutes and must not hold a place token fetches need
    /// (long-polls have bounds of their own).
    pub async fn turn(&self) {
        self.rate.until_ready().await;
    }
}

/// Spaces out requests to an inner source within [`UpstreamLimits`].
/// Requests wait their turn; each key's refresh task still makes one at a
/// time, so single flight holds while queued.
pub struct RateLimited<S> {
    inner: S,
    limits: UpstreamLimits,
}

impl<S: TokenSource> RateLimited<S> {
    /// Limits `inner` to `limits`.
    pub fn new(inner: S, limits: UpstreamLimits) -> Self {
        Self { inner, limits }
    }
}

impl<S: TokenSource> TokenSource for RateLimited<S> {
    fn fetch<'a>(&'a self, key: &'a TokenKey) -> BoxFuture<'a, Result<Token, FetchError>> {
        Box::pin(async move {
            let _permit = self.limits.acquire().await?;
            self.inner.fetch(key).await
        })
    }

    fn admits(&self, key: &TokenKey) -> Result<(), BrokerError> {
        self.inner.admits(key)
    }
}
