//! Bounds that keep the metadata server (and Google's token endpoints) safe
//! from load: a rate and a concurrency limit on upstream requests.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::future::BoxFuture;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::time::Instant;

use crate::error::BrokerError;
use crate::error::FetchError;
use crate::request::TokenKey;
use crate::request::boundary::AccessBoundary;
use crate::token::Token;
use crate::upstream::TokenSource;

/// Default most upstream requests per second (20), well below the metadata
/// server's own limit of about 50 per second for uncached tokens.
pub const DEFAULT_UPSTREAM_MAX_RPS: u32 = 20;
/// Default most upstream requests in flight at once (8).
pub const DEFAULT_UPSTREAM_MAX_CONCURRENCY: usize = 8;

/// Bounds on requests to the token source or the metadata server: at most
/// `max_rps` in any one second (spaced out, in bursts of at most a fifth
/// of that) and `max_concurrency` at once. Token fetches have one, the
/// metadata endpoint's pass-through another with the same numbers, so that
/// a flood of pass-through requests never delays a token; clones share the
/// counts.
///
/// First fetches of new keys ([`UpstreamLimits::acquire_first`]) get three
/// quarters of each bound at most: anyone can ask for new keys, and a
/// flood of them (or a backlog of them behind a hung upstream) must not
/// hold every place while the tokens other clients use run out. Refreshes
/// of keys that have a token always find the last quarter.
#[derive(Clone)]
pub struct UpstreamLimits {
    rate: Arc<DefaultDirectRateLimiter>,
    per_second: Arc<PerSecond>,
    in_flight: Arc<Semaphore>,
    /// The share of first fetches, taken on top of the shared bounds.
    first_per_second: Arc<PerSecond>,
    first_in_flight: Arc<Semaphore>,
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
            per_second: Arc::new(PerSecond::new(rps.get())),
            in_flight: Arc::new(Semaphore::new(max_concurrency.max(1))),
            first_per_second: Arc::new(PerSecond::new(first_share(rps.get() as usize) as u32)),
            first_in_flight: Arc::new(Semaphore::new(first_share(max_concurrency))),
        }
    }

    /// [`UpstreamLimits::acquire`] for the first fetch of a new key: first
    /// a place within the first fetches' share, then one within the whole.
    pub async fn acquire_first(&self) -> Result<FirstPermit<'_>, FetchError> {
        let closed = |_| FetchError::Connect("upstream limiter closed".into());
        let first = self.first_in_flight.acquire().await.map_err(closed)?;
        let shared = self.in_flight.acquire().await.map_err(closed)?;
        self.rate.until_ready().await;
        tokio::time::sleep_until(self.first_per_second.reserve(Instant::now())).await;
        tokio::time::sleep_until(self.per_second.reserve(Instant::now())).await;
        Ok(FirstPermit {
            _first: first,
            _shared: shared,
        })
    }

    /// Waits for a place among the requests in flight, then for a turn
    /// within the rate; the place is held until the permit is dropped.
    pub async fn acquire(&self) -> Result<SemaphorePermit<'_>, FetchError> {
        let permit = self
            .in_flight
            .acquire()
            .await
            .map_err(|_| FetchError::Connect("upstream limiter closed".into()))?;
        self.turn().await;
        Ok(permit)
    }

    /// Waits for a turn within the rate only: for a long-poll, which waits
    /// upstream for minutes and must not hold a place token fetches need
    /// (long-polls have bounds of their own).
    pub async fn turn(&self) {
        self.rate.until_ready().await;
        tokio::time::sleep_until(self.per_second.reserve(Instant::now())).await;
    }
}

/// The places a first fetch holds until it is dropped.
pub struct FirstPermit<'a> {
    _first: SemaphorePermit<'a>,
    _shared: SemaphorePermit<'a>,
}

/// Three quarters of `total` (at least 1): what first fetches may take.
fn first_share(total: usize) -> usize {
    let reserved = (total / 4).max(1);
    total.saturating_sub(reserved).max(1)
}

/// The hard bound under the spacing: at most `max` starts in any one
/// second. The rate limiter alone lets `max` plus a burst through in a
/// second that starts with a burst; this delays whatever would exceed
/// `max`. Its window is a second and [`PerSecond::GUARD`], so that requests
/// whose trip to the server varies by up to that much still arrive at most
/// `max` in any second there.
struct PerSecond {
    max: usize,
    /// The start times reserved within the last second (or later), in order.
    starts: Mutex<VecDeque<Instant>>,
}

impl PerSecond {
    /// Allowance for the spread of trip times to the server (50 ms).
    const GUARD: Duration = Duration::from_millis(50);
    const WINDOW: Duration = Duration::from_secs(1).saturating_add(Self::GUARD);

    fn new(max: u32) -> Self {
        Self {
            max: max.max(1) as usize,
            starts: Mutex::new(VecDeque::new()),
        }
    }

    /// Reserves the earliest start at or after `now` that keeps every
    /// one-second window within `max`; the caller starts then. A caller
    /// that gives up meanwhile still counts, which only errs on the safe
    /// side.
    fn reserve(&self, now: Instant) -> Instant {
        let mut starts = self.starts.lock().unwrap_or_else(PoisonError::into_inner);
        while starts
            .front()
            .is_some_and(|start| *start + Self::WINDOW <= now)
        {
            starts.pop_front();
        }
        let mut at = now.max(starts.back().copied().unwrap_or(now));
        if starts.len() >= self.max {
            at = at.max(starts[starts.len() - self.max] + Self::WINDOW);
        }
        starts.push_back(at);
        at
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

    fn fetch_first<'a>(&'a self, key: &'a TokenKey) -> BoxFuture<'a, Result<Token, FetchError>> {
        Box::pin(async move {
            let _permit = self.limits.acquire_first().await?;
            self.inner.fetch_first(key).await
        })
    }

    fn downscope<'a>(
        &'a self,
        boundary: &'a AccessBoundary,
        subject: &'a Token,
        established: bool,
    ) -> BoxFuture<'a, Result<Token, FetchError>> {
        Box::pin(async move {
            let exchange = self.inner.downscope(boundary, subject, established);
            // A first exchange waits as a first fetch: a flood of new
            // boundaries must leave refreshes their share.
            if established {
                let _permit = self.limits.acquire().await?;
                exchange.await
            } else {
                let _permit = self.limits.acquire_first().await?;
                exchange.await
            }
        })
    }

    fn admits(&self, key: &TokenKey) -> Result<(), BrokerError> {
        self.inner.admits(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_second_holds_more_than_the_maximum() {
        let window = PerSecond::new(5);
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // Thirteen at once, then more while the first ones are queued.
        let mut starts: Vec<Instant> = (0..13).map(|_| window.reserve(t0)).collect();
        starts.extend((0..7).map(|n| window.reserve(t0 + ms(300 * n))));
        for (n, start) in starts.iter().enumerate() {
            let within = starts
                .iter()
                .filter(|other| **other >= *start && **other < *start + PerSecond::WINDOW)
                .count();
            assert!(within <= 5, "{within} starts in the second from start {n}");
        }
        // The first five go at once; none is held longer than it must be.
        assert!(starts[..5].iter().all(|start| *start == t0));
        assert_eq!(starts[5], t0 + PerSecond::WINDOW);
        assert_eq!(starts[12], t0 + 2 * PerSecond::WINDOW);
    }

    #[test]
    fn first_fetches_get_three_quarters_and_leave_at_least_one() {
        assert_eq!(first_share(8), 6);
        assert_eq!(first_share(20), 15);
        assert_eq!(first_share(2), 1);
        assert_eq!(first_share(1), 1);
    }

    #[tokio::test]
    async fn first_fetches_never_take_the_last_places() {
        let limits = UpstreamLimits::new(1_000, 4);
        let mut first = Vec::new();
        for _ in 0..3 {
            first.push(limits.acquire_first().await.unwrap());
        }
        let fourth = tokio::time::timeout(Duration::from_millis(50), limits.acquire_first()).await;
        assert!(fourth.is_err(), "a fourth first fetch waits");
        let refresh = tokio::time::timeout(Duration::from_secs(5), limits.acquire()).await;
        assert!(refresh.is_ok(), "a refresh still finds a place");
        drop(refresh);
        first.pop();
        let again = tokio::time::timeout(Duration::from_secs(5), limits.acquire_first()).await;
        assert!(again.is_ok(), "a place given back is taken again");
    }

    #[test]
    fn an_idle_second_frees_every_place() {
        let window = PerSecond::new(2);
        let t0 = Instant::now();
        window.reserve(t0);
        window.reserve(t0);
        let later = t0 + Duration::from_secs(5);
        assert_eq!(window.reserve(later), later);
        assert_eq!(window.reserve(later), later);
        assert_eq!(
            window.starts.lock().unwrap().len(),
            2,
            "old starts are dropped"
        );
    }
}
