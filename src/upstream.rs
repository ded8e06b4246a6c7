//! Where tokens come from: the [`TokenSource`] trait the cache fetches
//! through, and the [`FetchError`] every source reports.

use std::time::Duration;

use futures_util::future::BoxFuture;
use tracing::Instrument;

use crate::error::BrokerError;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::request::TokenKey;
use crate::token::Token;

/// Fetches one token for one key. The cache calls it from the key's refresh
/// task, at most once at a time per key.
pub trait TokenSource: Send + Sync + 'static {
    /// Fetches a fresh token for `key`.
    fn fetch<'a>(&'a self, key: &'a TokenKey) -> BoxFuture<'a, Result<Token, FetchError>>;

    /// Refuses, before anything is cached or fetched, a key this source
    /// can never serve (another account than a key file's own, a format
    /// only the metadata server knows). The default admits every key.
    fn admits(&self, key: &TokenKey) -> Result<(), BrokerError> {
        let _ = key;
        Ok(())
    }
}

/// Why a fetch failed. Messages never contain a token or a response body.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// No connection could be made, or it broke before a response arrived.
    /// The message names the service first, e.g. "the metadata server: …".
    #[error("cannot reach {0}")]
    Connect(String),
    /// No complete response within the upstream timeout.
    #[error("the token source did not answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// A status other than 200.
    #[error("the token source answered HTTP {status}{}", detail.as_ref().map(|d| format!(": {d}")).unwrap_or_default())]
    Status {
        /// The HTTP status code.
        status: u16,
        /// The server's `Retry-After`, if it sent one.
        retry_after: Option<Duration>,
        /// The service and its explanation, when it gave one (the OAuth and
        /// IAM APIs do; the metadata server does not). Never a token.
        detail: Option<String>,
    },
    /// A 200 whose body or headers cannot be trusted as a token, or a
    /// request that could not be made at all (e.g. a JWT that cannot be
    /// signed).
    #[error("the token source sent an unusable response: {0}")]
    Malformed(String),
}

impl FetchError {
    /// Whether trying again may succeed: connect errors, timeouts, 408, 429
    /// and 5xx.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Connect(_) | Self::Timeout(_) => true,
            Self::Status { status, .. } => matches!(status, 408 | 429 | 500..=599),
            Self::Malformed(_) => false,
        }
    }

    /// Whether the token source could not be reached at all: no
    /// connection, no answer in time, or a 5xx from something in between.
    pub fn is_unreachable(&self) -> bool {
        match self {
            Self::Connect(_) | Self::Timeout(_) => true,
            Self::Status { status, .. } => *status >= 500,
            Self::Malformed(_) => false,
        }
    }

    /// A bounded label for metrics: `http_4xx`, `http_5xx`, `rate_limited`,
    /// `timeout`, `connect` or `malformed`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Connect(_) => "connect",
            Self::Timeout(_) => "timeout",
            Self::Status { status: 429, .. } => "rate_limited",
            Self::Status { status, .. } if *status >= 500 => "http_5xx",
            Self::Status { .. } => "http_4xx",
            Self::Malformed(_) => "malformed",
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

#[cfg(test)]
mod tests {
    use super::*;

    fn status(status: u16) -> FetchError {
        FetchError::Status {
            status,
            retry_after: None,
            detail: None,
        }
    }

    #[test]
    fn transient_errors_are_those_worth_retrying() {
        assert!(FetchError::Connect("refused".into()).is_transient());
        assert!(FetchError::Timeout(Duration::from_secs(1)).is_transient());
        for code in [408, 429, 500, 503] {
            assert!(status(code).is_transient(), "{code}");
        }
        for code in [400, 403, 404] {
            assert!(!status(code).is_transient(), "{code}");
        }
        assert!(!FetchError::Malformed("x".into()).is_transient());
    }

    #[test]
    fn reasons_are_the_documented_labels() {
        assert_eq!(status(429).reason(), "rate_limited");
        assert_eq!(status(503).reason(), "http_5xx");
        assert_eq!(status(404).reason(), "http_4xx");
        assert_eq!(FetchError::Timeout(Duration::ZERO).reason(), "timeout");
        assert_eq!(FetchError::Connect(String::new()).reason(), "connect");
        assert_eq!(FetchError::Malformed(String::new()).reason(), "malformed");
    }
}
