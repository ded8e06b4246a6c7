//! The gRPC face of the broker: validates each call, serves it from the
//! cache within the caller's deadline, and streams watched tokens.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt, stream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::cache::{Served, TokenCache, TokenWatch};
use crate::error::BrokerError;
use crate::proto::v1 as pb;
use crate::request::TokenRequest;
use crate::token::{Token, TokenKind};

/// Implements `tokenbroker.v1.TokenBroker` over a [`TokenCache`].
#[derive(Clone)]
pub struct BrokerService {
    cache: TokenCache,
    shutdown: CancellationToken,
}

impl BrokerService {
    /// A service answering from `cache`; watch streams end with
    /// `UNAVAILABLE` once `shutdown` is cancelled.
    pub fn new(cache: TokenCache, shutdown: CancellationToken) -> Self {
        Self { cache, shutdown }
    }

    async fn token(
        &self,
        request: TokenRequest,
        deadline: Option<Duration>,
    ) -> Result<Served, Status> {
        let kind = request.key.kind();
        let result = within(deadline, self.cache.get(&request)).await;
        log_result(kind, result.as_ref());
        Ok(result?)
    }
}

#[tonic::async_trait]
impl pb::token_broker_server::TokenBroker for BrokerService {
    async fn get_access_token(
        &self,
        request: Request<pb::GetAccessTokenRequest>,
    ) -> Result<Response<pb::AccessToken>, Status> {
        let deadline = deadline_of(&request);
        let request = TokenRequest::try_from(request.into_inner())?;
        let served = self.token(request, deadline).await?;
        Ok(Response::new(access_token(&served.token)))
    }

    async fn get_id_token(
        &self,
        request: Request<pb::GetIdTokenRequest>,
    ) -> Result<Response<pb::IdToken>, Status> {
        let deadline = deadline_of(&request);
        let request = TokenRequest::try_from(request.into_inner())?;
        let served = self.token(request, deadline).await?;
        Ok(Response::new(id_token(&served.token)))
    }

    type WatchTokenStream = Pin<Box<dyn Stream<Item = Result<pb::Token, Status>> + Send>>;

    async fn watch_token(
        &self,
        request: Request<pb::WatchTokenRequest>,
    ) -> Result<Response<Self::WatchTokenStream>, Status> {
        let deadline = deadline_of(&request);
        let request = TokenRequest::try_from(request.into_inner())?;
        let kind = request.key.kind();
        let result = within(deadline, self.cache.watch(&request)).await;
        log_result(kind, result.as_ref().map(|(served, _)| served));
        let (first, watch) = result?;
        let stream = watch_stream(first.token, watch, kind, self.shutdown.clone());
        Ok(Response::new(Box::pin(stream)))
    }
}

/// The first token, then each refreshed one; ends with an error status when
/// the token expires unreplaced or the broker shuts down.
fn watch_stream(
    first: Arc<Token>,
    watch: TokenWatch,
    kind: TokenKind,
    shutdown: CancellationToken,
) -> impl Stream<Item = Result<pb::Token, Status>> + Send {
    let first = stream::once(std::future::ready(Ok(token_message(kind, &first))));
    let rest = stream::unfold(Some((watch, shutdown)), move |state| async move {
        let (mut watch, shutdown) = state?;
        let next = tokio::select! {
            () = shutdown.cancelled() => Err(BrokerError::ShuttingDown),
            next = watch.next() => next,
        };
        match next {
            Ok(token) => Some((Ok(token_message(kind, &token)), Some((watch, shutdown)))),
            Err(error) => {
                tracing::debug!(kind = kind.as_str(), %error, "watch ended");
                Some((Err(error.into()), None))
            }
        }
    });
    first.chain(rest)
}

fn token_message(kind: TokenKind, token: &Token) -> pb::Token {
    let token = match kind {
        TokenKind::Access => pb::token::Token::AccessToken(access_token(token)),
        TokenKind::Id => pb::token::Token::IdToken(id_token(token)),
    };
    pb::Token { token: Some(token) }
}

fn access_token(token: &Token) -> pb::AccessToken {
    pb::AccessToken {
        token: token.secret().expose().to_string(),
        token_type: token.token_type().to_string(),
        expire_time: Some(token.expire_time().into()),
    }
}

fn id_token(token: &Token) -> pb::IdToken {
    pb::IdToken {
        token: token.secret().expose().to_string(),
        expire_time: Some(token.expire_time().into()),
    }
}

fn log_result(kind: TokenKind, result: Result<&Served, &BrokerError>) {
    match result {
        Ok(served) => tracing::debug!(
            kind = kind.as_str(),
            outcome = served.outcome.as_str(),
            "served"
        ),
        Err(error) => {
            tracing::info!(kind = kind.as_str(), code = ?error.code(), %error, "request failed")
        }
    }
}

/// Runs `future` within the caller's deadline, answering a little before it
/// so the caller gets the broker's explanation rather than a bare timeout.
async fn within<T>(
    deadline: Option<Duration>,
    future: impl Future<Output = Result<T, BrokerError>>,
) -> Result<T, BrokerError> {
    match deadline {
        Some(deadline) => tokio::time::timeout(deadline - deadline / 20, future)
            .await
            .unwrap_or(Err(BrokerError::DeadlineExceeded(deadline))),
        None => future.await,
    }
}

/// The call's deadline, from the `grpc-timeout` header.
fn deadline_of<T>(request: &Request<T>) -> Option<Duration> {
    parse_grpc_timeout(request.metadata().get("grpc-timeout")?.to_str().ok()?)
}

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (H M S m u n).
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_header_is_parsed() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(
            parse_grpc_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "S", "10", "10x", "-1S", "123456789S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
        }
    }

    #[tokio::test]
    async fn deadline_turns_into_a_clear_error() {
        let slow = std::future::pending::<Result<(), BrokerError>>();
        let error = within(Some(Duration::from_millis(20)), slow)
            .await
            .unwrap_err();
        assert_eq!(
            error,
            BrokerError::DeadlineExceeded(Duration::from_millis(20))
        );
    }
}
