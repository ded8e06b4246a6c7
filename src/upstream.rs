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
use crate::request::boundary::AccessBoundary;
use crate::telemetry::health::Health;
use crate::telemetry::metrics::Metrics;
use crate::token::{Token, TokenKind};

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

    /// Exchanges `subject`, an access token this source gave, for one
    /// limited to `boundary` (Google STS). The cache calls it for a
    /// downscoped key, with the cached token of the key's source key;
    /// unless the key is `established` (once had a token), as a first
    /// fetch. The default has no STS to ask.
    fn downscope<'a>(
        &'a self,
        boundary: &'a AccessBoundary,
        subject: &'a Token,
        established: bool,
    ) -> BoxFuture<'a, Result<Token, FetchError>> {
        let _ = (boundary, subject, established);
        Box::pin(std::future::ready(Err(FetchError::downscoped_key())))
    }

    /// Refuses, before anything is cached or fetched, a key this source
    /// can never serve (another account than a key file's own, a format
    /// only the metadata server knows). The default admits every key.
    fn admits(&self, key: &TokenKey) -> Result<(), BrokerError> {
        let _ = key;
        Ok(())
    }
}

/// Which upstream request [`Instrumented`] records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Operation {
    /// A token from the source.
    Fetch,
    /// An exchange for a downscoped token.
    Downscope,
}

impl Operation {
    fn as_str(self) -> &'static str {
        match self {
            Self::Fetch => "fetch",
            Self::Downscope => "downscope",
        }
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

    /// Runs one upstream request of a `kind` token in its span, and
    /// records it.
    async fn record(
        &self,
        kind: TokenKind,
        operation: Operation,
        request: BoxFuture<'_, Result<Token, FetchError>>,
    ) -> Result<Token, FetchError> {
        let span = tracing::debug_span!(
            "upstream_fetch",
            token_kind = kind.as_str(),
            operation = operation.as_str(),
            result = tracing::field::Empty,
            reason = tracing::field::Empty,
            duration_ms = tracing::field::Empty,
        );
        let recorded = async move {
            let started = tokio::time::Instant::now();
            let result = request.await;
            let elapsed = started.elapsed();
            let outcome = result.as_ref().map(|_| ()).map_err(FetchError::reason);
            self.metrics.upstream_fetch(kind, outcome, elapsed);
            // Health follows the token source; STS is another service.
            if operation == Operation::Fetch {
                self.health.record(&result);
            }
            let span = tracing::Span::current();
            span.record("result", if outcome.is_ok() { "ok" } else { "error" });
            if let Err(reason) = outcome {
                span.record("reason", reason);
            }
            span.record("duration_ms", elapsed.as_secs_f64() * 1000.0);
            result
        };
        recorded.instrument(span).await
    }
}

impl<S: TokenSource> TokenSource for Instrumented<S> {
    fn fetch<'a>(&'a self, key: &'a TokenKey) -> BoxFuture<'a, Result<Token, FetchError>> {
        Box::pin(self.record(key.kind(), Operation::Fetch, self.inner.fetch(key)))
    }

    fn downscope<'a>(
        &'a self,
        boundary: &'a AccessBoundary,
        subject: &'a Token,
        established: bool,
    ) -> BoxFuture<'a, Result<Token, FetchError>> {
        Box::pin(async move {
            let exchange = self.inner.downscope(boundary, subject, established);
            let result = self
                .record(TokenKind::Access, Operation::Downscope, exchange)
                .await;
            self.metrics.downscope_exchange(result.is_ok());
            result
        })
    }

    fn admits(&self, key: &TokenKey) -> Result<(), BrokerError> {
        self.inner.admits(key)
    }
}
