//! Bounds that keep the broker and the metadata server safe from load: a
//! global rate and concurrency limit on upstream requests, and limits on
//! open watch streams (in total and per peer uid).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::Semaphore;

use crate::error::BrokerError;
use crate::request::TokenKey;
use crate::token::Token;
use crate::upstream::{FetchError, TokenSource};

/// Default most upstream requests per second (20), well below the metadata
/// server's own limit of about 50 per second for uncached tokens.
pub const DEFAULT_UPSTREAM_MAX_RPS: u32 = 20;
/// Default most upstream requests in flight at once (8).
pub const DEFAULT_UPSTREAM_MAX_CONCURRENCY: usize = 8;
/// Default most open watch streams (10 000).
pub const DEFAULT_MAX_WATCHERS: usize = 10_000;
/// Default most open watch streams of one peer uid (1 000).
pub const DEFAULT_MAX_WATCHERS_PER_UID: usize = 1_000;

/// Spaces out requests to an inner source: at most `max_rps` per second
/// (bursts of a fifth of that) and `max_concurrency` at once. Requests wait
/// their turn; each key's refresh task still makes one at a time, so single
/// flight holds while queued.
pub struct RateLimited<S> {
    inner: S,
    rate: DefaultDirectRateLimiter,
    in_flight: Semaphore,
}

impl<S: TokenSource> RateLimited<S> {
    /// Limits `inner` to `max_rps` requests per second and
    /// `max_concurrency` at once (both at least 1).
    pub fn new(inner: S, max_rps: u32, max_concurrency: usize) -> Self {
        let rps = NonZeroU32::new(max_rps).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(max_rps / 5).unwrap_or(NonZeroU32::MIN);
        Self {
            inner,
            rate: RateLimiter::direct(Quota::per_second(rps).allow_burst(burst)),
            in_flight: Semaphore::new(max_concurrency.max(1)),
        }
    }
}

impl<S: TokenSource> TokenSource for RateLimited<S> {
    fn fetch<'a>(&'a self, key: &'a TokenKey) -> BoxFuture<'a, Result<Token, FetchError>> {
        Box::pin(async move {
            let _permit = self
                .in_flight
                .acquire()
                .await
                .map_err(|_| FetchError::Connect("upstream limiter closed".into()))?;
            self.rate.until_ready().await;
            self.inner.fetch(key).await
        })
    }

    fn admits(&self, key: &TokenKey) -> Result<(), BrokerError> {
        self.inner.admits(key)
    }
}

/// Counts open watch streams against a total and a per-uid bound.
#[derive(Clone)]
pub struct WatchLimits {
    inner: Arc<WatchCounts>,
}

struct WatchCounts {
    max_total: usize,
    max_per_uid: usize,
    open: Mutex<(usize, HashMap<u32, usize>)>,
}

/// One open watch stream; dropping it frees its place.
pub struct WatchPermit {
    limits: Arc<WatchCounts>,
    uid: Option<u32>,
}

impl WatchLimits {
    /// Limits of `max_total` streams, and `max_per_uid` for any one uid.
    pub fn new(max_total: usize, max_per_uid: usize) -> Self {
        Self {
            inner: Arc::new(WatchCounts {
                max_total,
                max_per_uid,
                open: Mutex::new((0, HashMap::new())),
            }),
        }
    }

    /// Takes a place for a stream of the peer `uid` (unknown: only the
    /// total applies), or fails with `RESOURCE_EXHAUSTED`.
    pub fn acquire(&self, uid: Option<u32>) -> Result<WatchPermit, BrokerError> {
        let mut open = self.inner.open.lock().unwrap_or_else(|e| e.into_inner());
        let (total, per_uid) = &mut *open;
        if *total >= self.inner.max_total {
            return Err(BrokerError::LimitExceeded {
                what: "too many open watch streams",
                limit: self.inner.max_total,
            });
        }
        if let Some(uid) = uid {
            let count = per_uid.entry(uid).or_default();
            if *count >= self.inner.max_per_uid {
                return Err(BrokerError::LimitExceeded {
                    what: "too many open watch streams for this uid",
                    limit: self.inner.max_per_uid,
                });
            }
            *count += 1;
        }
        *total += 1;
        Ok(WatchPermit {
            limits: self.inner.clone(),
            uid,
        })
    }
}

impl Drop for WatchPermit {
    fn drop(&mut self) {
        let mut open = self.limits.open.lock().unwrap_or_else(|e| e.into_inner());
        let (total, per_uid) = &mut *open;
        *total -= 1;
        if let Some(uid) = self.uid
            && let Some(count) = per_uid.get_mut(&uid)
        {
            *count -= 1;
            if *count == 0 {
                per_uid.remove(&uid);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_limits_count_per_uid_and_in_total() {
        let limits = WatchLimits::new(3, 2);
        let a1 = limits.acquire(Some(1)).unwrap();
        let _a2 = limits.acquire(Some(1)).unwrap();
        let error = limits.acquire(Some(1)).err().unwrap();
        assert!(matches!(error, BrokerError::LimitExceeded { limit: 2, .. }));
        let _b1 = limits.acquire(Some(2)).unwrap();
        let error = limits.acquire(None).err().unwrap();
        assert!(matches!(error, BrokerError::LimitExceeded { limit: 3, .. }));
        drop(a1);
        assert!(limits.acquire(Some(1)).is_ok());
    }
}
