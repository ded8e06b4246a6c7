//! Where tokens come from: the [`TokenSource`] trait the cache fetches
//! through, with the wrappers every source runs under: instrumentation,
//! the global rate and concurrency limits ([`limits`]) and retries
//! ([`retry`]).

pub mod limits;
pub mod retry;

use futures_util::future::BoxFuture;
use tracing::Instrument;

use crate::error::{BrokerError, FetchError};
use crate::request::TokenKey;
use crate::telemetry::health::Health;
use crate::telemetry::metrics::Metrics;
use crate::token::Token;

/// Fetches one token for one key. The cache calls it from the key's refresh
/// task, at most once at a time per key.
pub trait TokenSource: Send + Sync + 'static {
    /// Fetches a fresh token for `key`.
    fn fetch<'a>(&'a self, key: &'a TokenKey) -> BoxFuture<'a, Result<Token, FetchError>>;

    /// Fetches the first token of a key that has never had one. Sources
    /// that wait for the upstream limits give these a share of them only
    /// (see [`limits::UpstreamLimits`]); the default is [`TokenSource::fetch`].
    fn fetch_first<'a>(&'a self, key: &'a TokenKey) -> BoxFuture<'a, Result<Token, FetchError>> {
        self.fetch(key)
    }

    /// Refuses, before anything is cached or fetched, a key this source
    /// can never serve (another account than a key file's own, a format
    /// only the metadata server knows). The default admits every key.
    fn admits(&self, key: &TokenKey) -> Result<(), BrokerError> {
        let _ = key;
        Ok(())
    }
}

/// Wraps a source to record every fetch: metrics, health and a tracing
/// span (token kind, result, duration; never the token).
pub struct Instrumented<S> {
    inner: S,
    metrics: Metrics,
    health: Health,
}

impl<S: TokenSource> Instrumented<S> {
    /// Records the fetches of `inner`.
    pub fn new(inner: S, metrics: Metrics, health: Health) -> Self {
        Self {
            inner,
            metrics,
            health,
        }
    }
}

impl<S: TokenSource> TokenSource for Instrumented<S> {
    fn fetch<'a>(&'a self, key: &'a TokenKey) -> BoxFuture<'a, Result<Token, FetchError>> {
        let kind = key.kind();
        let span = tracing::debug_span!(
            "upstream_fetch",
            token_kind = kind.as_str(),
            result = tracing::field::Empty,
            reason = tracing::field::Empty,
            duration_ms = tracing::field::Empty,
        );
        let fetch = async move {
            let started = tokio::time::Instant::now();
            let result = self.inner.fetch(key).await;
            let elapsed = started.elapsed();
            let outcome = result.as_ref().map(|_| ()).map_err(FetchError::reason);
            self.metrics.upstream_fetch(kind, outcome, elapsed);
            self.health.record(&result);
            let span = tracing::Span::current();
            span.record("result", if outcome.is_ok() { "ok" } else { "error" });
            if let Err(reason) = outcome {
                span.record("reason", reason);
            }
            span.record("duration_ms", elapsed.as_secs_f64() * 1000.0);
            result
        };
        Box::pin(fetch.instrument(span))
    }

    fn admits(&self, key: &TokenKey) -> Result<(), BrokerError> {
        self.inner.admits(key)
    }
}
