//! Retries of one upstream fetch: connect errors, timeouts, 408, 429 and 5xx
//! are tried again with exponential backoff and full jitter, honouring
//! `Retry-After`, within a bounded number of attempts and a time budget, so
//! that during an outage callers hear `UNAVAILABLE` quickly.

use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::time::Instant;

use crate::error::FetchError;
use crate::request::TokenKey;
use crate::request::boundary::AccessBoundary;
use crate::schedule::Backoff;
use crate::token::Token;
use crate::upstream::TokenSource;

/// Default most attempts per fetch (4).
pub const DEFAULT_MAX_ATTEMPTS: u32 = 4;
/// Default time budget of one fetch, all attempts and waits included (10 s).
pub const DEFAULT_RETRY_BUDGET: Duration = Duration::from_secs(10);
/// First wait before a retry (100 ms), doubled per attempt.
pub const RETRY_INITIAL: Duration = Duration::from_millis(100);
/// Longest wait before a retry without `Retry-After` (2 s).
pub const RETRY_MAX: Duration = Duration::from_secs(2);

/// How hard to try one fetch.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// Most attempts, the first included.
    pub max_attempts: u32,
    /// Time for all attempts and the waits between them.
    pub budget: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            budget: DEFAULT_RETRY_BUDGET,
        }
    }
}

/// Retries the fetches of an inner source.
pub struct Retrying<S> {
    inner: S,
    policy: RetryPolicy,
}

impl<S: TokenSource> Retrying<S> {
    /// Retries `inner` under `policy`.
    pub fn new(inner: S, policy: RetryPolicy) -> Self {
        Self { inner, policy }
    }

    /// Runs the request `attempt` makes until it succeeds, fails for
    /// good, or the attempts or the budget run out.
    async fn with_retries<'a>(
        &'a self,
        attempt_once: impl Fn() -> BoxFuture<'a, Result<Token, FetchError>>,
    ) -> Result<Token, FetchError> {
        let deadline = Instant::now() + self.policy.budget;
        let mut backoff = Backoff::new(RETRY_INITIAL, RETRY_MAX);
        let mut attempt = 1;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let error = match tokio::time::timeout(left, attempt_once()).await {
                Ok(Ok(token)) => return Ok(token),
                Ok(Err(error)) => error,
                Err(_) => return Err(FetchError::Timeout(self.policy.budget)),
            };
            if !error.is_transient() || attempt >= self.policy.max_attempts {
                return Err(error);
            }
            let wait = match &error {
                FetchError::Status {
                    retry_after: Some(retry_after),
                    ..
                } => *retry_after,
                _ => backoff.next_delay(fastrand::f64()),
            };
            if wait >= deadline.saturating_duration_since(Instant::now()) {
                return Err(error);
            }
            tracing::debug!(attempt, %error, ?wait, "retrying upstream fetch");
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }
}

impl<S: TokenSource> TokenSource for Retrying<S> {
    fn fetch<'a>(&'a self, key: &'a TokenKey) -> BoxFuture<'a, Result<Token, FetchError>> {
        Box::pin(self.with_retries(|| self.inner.fetch(key)))
    }

    fn fetch_first<'a>(&'a self, key: &'a TokenKey) -> BoxFuture<'a, Result<Token, FetchError>> {
        Box::pin(self.with_retries(|| self.inner.fetch_first(key)))
    }

    fn downscope<'a>(
        &'a self,
        boundary: &'a AccessBoundary,
        subject: &'a Token,
        established: bool,
    ) -> BoxFuture<'a, Result<Token, FetchError>> {
        Box::pin(self.with_retries(move || self.inner.downscope(boundary, subject, established)))
    }

    fn admits(&self, key: &TokenKey) -> Result<(), crate::error::BrokerError> {
        self.inner.admits(key)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;
    use std::time::SystemTime;

    use super::*;
    use crate::request::{AccessTokenKey, ServiceAccount};
    use crate::secret::Secret;

    /// Answers with a script of results, then with successes; records when
    /// each attempt came.
    struct Scripted {
        script: Mutex<VecDeque<Result<(), FetchError>>>,
        attempts: Mutex<Vec<Instant>>,
        hang: bool,
    }

    impl Scripted {
        fn new(script: Vec<Result<(), FetchError>>) -> Self {
            Self {
                script: Mutex::new(script.into()),
                attempts: Mutex::new(Vec::new()),
                hang: false,
            }
        }

        fn attempts(&self) -> Vec<Instant> {
            self.attempts.lock().unwrap().clone()
        }
    }

    impl TokenSource for Scripted {
        fn fetch<'a>(&'a self, _key: &'a TokenKey) -> BoxFuture<'a, Result<Token, FetchError>> {
            Box::pin(async move {
                self.attempts.lock().unwrap().push(Instant::now());
                if self.hang {
                    std::future::pending::<()>().await;
                }
                let next = self.script.lock().unwrap().pop_front().unwrap_or(Ok(()));
                next.map(|()| {
                    Token::expiring_in(
                        Secret::new("t".into()),
                        "Bearer".into(),
                        Duration::from_secs(3600),
                        (Instant::now(), SystemTime::now()),
                    )
                })
            })
        }
    }

    fn key() -> TokenKey {
        TokenKey::Access(AccessTokenKey {
            account: ServiceAccount::Default,
            scopes: vec![],
        })
    }

    fn status(status: u16, retry_after: Option<u64>) -> Result<(), FetchError> {
        Err(FetchError::Status {
            status,
            retry_after: retry_after.map(Duration::from_secs),
            detail: None,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn transient_errors_are_retried_until_success() {
        let source = Retrying::new(
            Scripted::new(vec![
                status(503, None),
                Err(FetchError::Connect("reset".into())),
                status(408, None),
            ]),
            RetryPolicy::default(),
        );
        assert!(source.fetch(&key()).await.is_ok());
        let attempts = source.inner.attempts();
        assert_eq!(attempts.len(), 4);
        let waits: Vec<Duration> = attempts.windows(2).map(|w| w[1] - w[0]).collect();
        // Full jitter under a doubling ceiling: 100 ms, 200 ms, 400 ms.
        for (wait, ceiling) in waits.iter().zip([100, 200, 400]) {
            assert!(*wait <= Duration::from_millis(ceiling), "{waits:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn other_client_errors_are_not_retried() {
        for code in [400, 403, 404] {
            let source = Retrying::new(
                Scripted::new(vec![status(code, None)]),
                RetryPolicy::default(),
            );
            assert!(source.fetch(&key()).await.is_err());
            assert_eq!(source.inner.attempts().len(), 1, "{code}");
        }
        let malformed = Retrying::new(
            Scripted::new(vec![Err(FetchError::Malformed("x".into()))]),
            RetryPolicy::default(),
        );
        assert!(malformed.fetch(&key()).await.is_err());
        assert_eq!(malformed.inner.attempts().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_are_bounded() {
        let source = Retrying::new(
            Scripted::new(vec![status(503, None); 10]),
            RetryPolicy::default(),
        );
        let error = source.fetch(&key()).await.unwrap_err();
        assert_eq!(error.reason(), "http_5xx");
        assert_eq!(source.inner.attempts().len(), DEFAULT_MAX_ATTEMPTS as usize);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_honoured_within_the_budget() {
        let source = Retrying::new(
            Scripted::new(vec![status(429, Some(3))]),
            RetryPolicy::default(),
        );
        let started = Instant::now();
        assert!(source.fetch(&key()).await.is_ok());
        let attempts = source.inner.attempts();
        assert_eq!(attempts[1] - attempts[0], Duration::from_secs(3));
        assert!(Instant::now() - started < DEFAULT_RETRY_BUDGET);

        // Any Retry-After, however absurd, is compared, never added to a clock.
        let source = Retrying::new(
            Scripted::new(vec![Err(FetchError::Status {
                status: 503,
                retry_after: Some(Duration::MAX),
                detail: None,
            })]),
            RetryPolicy::default(),
        );
        assert!(source.fetch(&key()).await.is_err());

        // A Retry-After beyond the budget fails now rather than waiting.
        let source = Retrying::new(
            Scripted::new(vec![status(429, Some(60))]),
            RetryPolicy::default(),
        );
        let started = Instant::now();
        let error = source.fetch(&key()).await.unwrap_err();
        assert_eq!(error.reason(), "rate_limited");
        assert_eq!(Instant::now(), started);
        assert_eq!(source.inner.attempts().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_upstream_is_cut_off_at_the_budget() {
        let mut scripted = Scripted::new(vec![]);
        scripted.hang = true;
        let policy = RetryPolicy {
            max_attempts: 4,
            budget: Duration::from_secs(2),
        };
        let source = Retrying::new(scripted, policy);
        let started = Instant::now();
        let error = source.fetch(&key()).await.unwrap_err();
        assert_eq!(error, FetchError::Timeout(Duration::from_secs(2)));
        assert_eq!(Instant::now() - started, Duration::from_secs(2));
    }
}
