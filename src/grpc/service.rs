//! `tokenbroker.v1.TokenBroker`: each call's message validated into a
//! request, its caller and deadline read from the connection, answered by
//! the [`Broker`], and the answer turned back into messages.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, stream};
use tonic::{Request, Response, Status};

use crate::broker::{Broker, Watch};
use crate::connections::idle::ConnectionInfo;
use crate::error::BrokerError;
use crate::policy::Caller;
use crate::proto::v1 as pb;
use crate::request::TokenRequest;
use crate::telemetry::metrics::Rpc;
use crate::token::{Token, TokenKind};

/// The gRPC service, a thin adapter over the [`Broker`].
#[derive(Clone)]
pub struct TokenBrokerService {
    broker: Broker,
}

impl TokenBrokerService {
    /// A service answering from `broker`.
    pub fn new(broker: Broker) -> Self {
        Self { broker }
    }

    /// Validates and serves one unary token call.
    async fn unary<M>(
        &self,
        rpc: Rpc,
        kind: TokenKind,
        request: Request<M>,
    ) -> Result<Arc<Token>, Status>
    where
        M: TryInto<TokenRequest, Error = BrokerError>,
    {
        let (caller, deadline) = (caller_of(&request), deadline_of(&request));
        let request = request.into_inner().try_into();
        Ok(self
            .broker
            .token(rpc, kind, request, caller, deadline)
            .await?)
    }
}

#[tonic::async_trait]
impl pb::token_broker_server::TokenBroker for TokenBrokerService {
    async fn get_access_token(
        &self,
        request: Request<pb::GetAccessTokenRequest>,
    ) -> Result<Response<pb::AccessToken>, Status> {
        let token = self
            .unary(Rpc::GetAccessToken, TokenKind::Access, request)
            .await?;
        Ok(Response::new(access_token(&token)))
    }

    async fn get_id_token(
        &self,
        request: Request<pb::GetIdTokenRequest>,
    ) -> Result<Response<pb::IdToken>, Status> {
        let token = self.unary(Rpc::GetIdToken, TokenKind::Id, request).await?;
        Ok(Response::new(id_token(&token)))
    }

    async fn invalidate_token(
        &self,
        request: Request<pb::InvalidateTokenRequest>,
    ) -> Result<Response<pb::InvalidateTokenResponse>, Status> {
        let caller = caller_of(&request);
        let kind = match &request.get_ref().request {
            Some(pb::invalidate_token_request::Request::AccessToken(_)) => Some(TokenKind::Access),
            Some(pb::invalidate_token_request::Request::IdToken(_)) => Some(TokenKind::Id),
            None => None,
        };
        let request = request.into_inner().try_into();
        let invalidated = self.broker.invalidate(kind, request, caller).await?;
        Ok(Response::new(pb::InvalidateTokenResponse { invalidated }))
    }

    type WatchTokenStream = Pin<Box<dyn Stream<Item = Result<pb::Token, Status>> + Send>>;

    async fn watch_token(
        &self,
        request: Request<pb::WatchTokenRequest>,
    ) -> Result<Response<Self::WatchTokenStream>, Status> {
        let (caller, deadline) = (caller_of(&request), deadline_of(&request));
        let kind = match &request.get_ref().request {
            Some(pb::watch_token_request::Request::AccessToken(_)) => Some(TokenKind::Access),
            Some(pb::watch_token_request::Request::IdToken(_)) => Some(TokenKind::Id),
            None => None,
        };
        let request = request.into_inner().try_into();
        let watch = self
            .broker
            .watch(Rpc::WatchToken, kind, request, caller, deadline)
            .await?;
        Ok(Response::new(Box::pin(token_stream(watch))))
    }
}

/// The watch's tokens as messages, ending with the error that ended it.
fn token_stream(watch: Watch) -> impl Stream<Item = Result<pb::Token, Status>> + Send {
    // Every open stream holds this state, so the step future works on it
    // in place, through a reference: moving the watch out of `state` into
    // a local would store it twice in the future.
    stream::unfold(Some(watch), |mut state| async move {
        let watch = state.as_mut()?;
        match watch.next().await {
            Ok(token) => {
                let message = token_message(watch.kind(), &token);
                Some((Ok(message), state))
            }
            Err(error) => Some((Err(error.into()), None)),
        }
    })
}

/// The caller: the connecting process, from the Unix socket's peer
/// credentials.
fn caller_of<T>(request: &Request<T>) -> Caller {
    let peer = request
        .extensions()
        .get::<ConnectionInfo>()
        .and_then(|connection| connection.peer);
    Caller::Local(peer)
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
}
