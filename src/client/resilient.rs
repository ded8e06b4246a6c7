//! A watch that rides through broker restarts: when the stream ends or the
//! connection drops, it subscribes again after a jittered backoff, and it
//! never yields a token that has already expired.

use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use futures_util::stream;
use tonic::Code;
use tonic::transport::Channel;

use super::{ClientError, TokenStream};
use crate::proto::v1 as pb;
use crate::proto::v1::token_broker_client::TokenBrokerClient;

/// How long a resilient watch waits before subscribing again: a random
/// delay up to `initial * 2^(failures - 1)`, capped at `max` ("full
/// jitter", so that thousands of clients of a restarted broker do not come
/// back in step).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// The bound of the first wait.
    pub initial: Duration,
    /// The bound no wait exceeds.
    pub max: Duration,
}

impl Default for Backoff {
    /// 50 ms at first, doubling to at most 5 s.
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(50),
            max: Duration::from_secs(5),
        }
    }
}

impl Backoff {
    /// The bound of the wait after `failures` failed attempts in a row.
    pub fn bound(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(31);
        self.initial.saturating_mul(1 << doublings).min(self.max)
    }

    /// A random wait after `failures` failed attempts in a row.
    pub fn delay(&self, failures: u32) -> Duration {
        self.bound(failures).mul_f64(fastrand::f64())
    }
}

/// Whether a watch that failed with `code` is worth subscribing again: the
/// broker was away or stopping, or the connection broke. A refusal of the
/// request itself (bad argument, denied, unknown account, a broker limit
/// such as too many watch streams) is the caller's to see.
pub fn is_transient(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::Aborted
            | Code::DeadlineExceeded
            | Code::Internal
    )
}

/// The state carried from one token of a resilient watch to the next.
struct Resilient {
    client: TokenBrokerClient<Channel>,
    request: pb::WatchTokenRequest,
    backoff: Backoff,
    stream: Option<tonic::Streaming<pb::Token>>,
    /// Failed attempts since the last token.
    failures: u32,
    /// Set after a permanent error has been yielded.
    ended: bool,
}

/// The stream of [`super::Client::watch_resilient_with`].
pub(super) fn watch(
    client: TokenBrokerClient<Channel>,
    request: pb::WatchTokenRequest,
    backoff: Backoff,
) -> TokenStream {
    let state = Resilient {
        client,
        request,
        backoff,
        stream: None,
        failures: 0,
        ended: false,
    };
    stream::unfold(state, Resilient::next).boxed()
}

impl Resilient {
    async fn next(mut self) -> Option<(Result<pb::token::Token, ClientError>, Self)> {
        while !self.ended {
            let outcome = match self.stream.as_mut() {
                Some(stream) => stream.message().await,
                None => match self.subscribe().await {
                    Ok(()) => continue,
                    Err(status) => Err(status),
                },
            };
            match outcome {
                Ok(Some(message)) => match message.token {
                    Some(token) if is_unexpired(&token, SystemTime::now()) => {
                        self.failures = 0;
                        return Some((Ok(token), self));
                    }
                    // The broker never sends an expired token; a clock
                    // jump here could make one look so. Wait for the next.
                    Some(_) => {}
                    None => return Some((Err(self.end(ClientError::EmptyMessage)), self)),
                },
                // The broker ended the stream: subscribe again.
                Ok(None) => self.failed(),
                Err(status) if is_transient(status.code()) => {
                    tracing::debug!(code = ?status.code(), message = status.message(), "watch broke; subscribing again");
                    self.failed();
                }
                Err(status) => return Some((Err(self.end(status.into())), self)),
            }
        }
        None
    }

    /// Opens the watch, after the backoff if the last attempts failed.
    async fn subscribe(&mut self) -> Result<(), tonic::Status> {
        if self.failures > 0 {
            tokio::time::sleep(self.backoff.delay(self.failures)).await;
        }
        let stream = self.client.watch_token(self.request.clone()).await?;
        self.stream = Some(stream.into_inner());
        Ok(())
    }

    fn failed(&mut self) {
        self.stream = None;
        self.failures = self.failures.saturating_add(1);
    }

    fn end(&mut self, error: ClientError) -> ClientError {
        self.ended = true;
        self.stream = None;
        error
    }
}

/// Whether `token` is still valid at `now` (a token without an expiry
/// counts as valid: the broker always sets one).
fn is_unexpired(token: &pb::token::Token, now: SystemTime) -> bool {
    token.expire_time().is_none_or(|expiry| expiry > now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_doubles_up_to_its_cap() {
        let backoff = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        let bounds: Vec<u128> = (1..=6).map(|n| backoff.bound(n).as_millis()).collect();
        assert_eq!(bounds, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(backoff.bound(u32::MAX), Duration::from_secs(1));
        for failures in 1..10 {
            assert!(backoff.delay(failures) <= backoff.bound(failures));
        }
    }

    #[test]
    fn the_jitter_spreads_the_waits() {
        let backoff = Backoff::default();
        let mut delays: Vec<Duration> = (0..20).map(|_| backoff.delay(3)).collect();
        delays.sort();
        delays.dedup();
        assert!(delays.len() > 10, "{delays:?}");
    }

    #[test]
    fn only_refusals_of_the_request_end_the_watch() {
        for code in [Code::Unavailable, Code::Unknown, Code::Cancelled] {
            assert!(is_transient(code), "{code:?}");
        }
        for code in [
            Code::InvalidArgument,
            Code::PermissionDenied,
            Code::NotFound,
            Code::ResourceExhausted,
            Code::Unauthenticated,
            Code::Unimplemented,
        ] {
            assert!(!is_transient(code), "{code:?}");
        }
    }

    #[test]
    fn expired_tokens_are_never_yielded() {
        let now = SystemTime::now();
        let token = |expiry: SystemTime| {
            pb::token::Token::IdToken(pb::IdToken {
                token: "t".into(),
                expire_time: Some(expiry.into()),
            })
        };
        assert!(is_unexpired(&token(now + Duration::from_secs(1)), now));
        assert!(!is_unexpired(&token(now), now));
        assert!(!is_unexpired(&token(now - Duration::from_secs(1)), now));
    }
}
