//! The gRPC face of the broker: validates each call, serves it from the
//! cache within the caller's deadline, streams watched tokens, and records
//! a span and metrics per call.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, stream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::cache::quota::Owner;
use crate::cache::{Served, TokenCache, TokenWatch};
use crate::connections::idle::ConnectionInfo;
use crate::error::BrokerError;
use crate::policy::{Caller, Peer, PolicyStore};
use crate::proto::v1 as pb;
use crate::request::{Invalidation, TokenKey, TokenRequest};
use crate::telemetry::metrics::{Metrics, Rpc, code_name};
use crate::token::{Token, TokenKind};
use crate::upstream::limits::{WatchLimits, WatchPermit};

/// Implements `tokenbroker.v1.TokenBroker` over a [`TokenCache`].
#[derive(Clone)]
pub struct BrokerService {
    cache: TokenCache,
    metrics: Metrics,
    policy: Arc<PolicyStore>,
    watch_limits: WatchLimits,
    shutdown: CancellationToken,
}

impl BrokerService {
    /// A service answering from `cache` to the peers `policy` allows; watch
    /// streams are bounded by `watch_limits` and end with `UNAVAILABLE` once
    /// `shutdown` is cancelled.
    pub fn new(
        cache: TokenCache,
        metrics: Metrics,
        policy: Arc<PolicyStore>,
        watch_limits: WatchLimits,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            cache,
            metrics,
            policy,
            watch_limits,
            shutdown,
        }
    }

    /// Validates, serves and records one unary call.
    async fn unary<M>(
        &self,
        rpc: Rpc,
        kind: TokenKind,
        request: Request<M>,
    ) -> Result<Arc<Token>, Status>
    where
        M: TryInto<TokenRequest, Error = BrokerError>,
    {
        let deadline = deadline_of(&request);
        let caller = Caller::Local(peer_of(&request));
        Ok(self
            .token(rpc, kind, request.into_inner().try_into(), caller, deadline)
            .await?)
    }

    /// Serves one token request from any front end (gRPC, the
    /// metadata-compatible endpoint): takes the outcome of its validation,
    /// applies the policy to `caller`, answers from the cache within
    /// `deadline`, and records a span and metrics.
    pub async fn token(
        &self,
        rpc: Rpc,
        kind: TokenKind,
        request: Result<TokenRequest, BrokerError>,
        caller: Caller,
        deadline: Option<Duration>,
    ) -> Result<Arc<Token>, BrokerError> {
        let call = async {
            let request = request.inspect_err(|error| {
                self.report(rpc, Some(kind), None, Err(error));
            })?;
            // Audiences of denied requests never become labels: a denied
            // peer could fill the series cap with them.
            authorize(
                &self.policy,
                &self.metrics,
                rpc,
                kind,
                &caller,
                &request.key,
            )
            .inspect_err(|error| self.report(rpc, Some(kind), None, Err(error)))?;
            let audience = audience(&request.key);
            let owner = owner_of(&caller);
            let result = within(deadline, self.cache.get(&request, owner)).await;
            self.report(rpc, Some(kind), audience, result.as_ref());
            Ok(result?.token)
        };
        call.instrument(rpc_span(rpc, Some(kind))).await
    }

    /// Records the result of a call in the current span and in the metrics,
    /// and logs failures. A watch without a request has no kind and is only
    /// logged.
    fn report(
        &self,
        rpc: Rpc,
        kind: Option<TokenKind>,
        audience: Option<&str>,
        result: Result<&Served, &BrokerError>,
    ) {
        let span = tracing::Span::current();
        match (result, kind) {
            (Ok(served), Some(kind)) => {
                span.record("outcome", served.outcome.as_str());
                let remaining = served.token.remaining(Instant::now());
                self.metrics
                    .served(rpc, kind, served.outcome, remaining, audience);
            }
            (Ok(_), None) => {}
            (Err(error), kind) => {
                let code = error.code();
                span.record("outcome", "error");
                span.record("code", code_name(code));
                if let Some(kind) = kind {
                    self.metrics.failed(rpc, kind, code, audience);
                }
                let (rpc, kind, code) =
                    (rpc.as_str(), kind.map(TokenKind::as_str), code_name(code));
                if error.is_fair_share_refusal() {
                    tracing::debug!(rpc, token_kind = kind, code, %error, "request failed");
                } else {
                    tracing::info!(rpc, token_kind = kind, code, %error, "request failed");
                }
            }
        }
    }
}

#[tonic::async_trait]
impl pb::token_broker_server::TokenBroker for BrokerService {
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
        let rpc = Rpc::InvalidateToken;
        let kind = match &request.get_ref().request {
            Some(pb::invalidate_token_request::Request::AccessToken(_)) => Some(TokenKind::Access),
            Some(pb::invalidate_token_request::Request::IdToken(_)) => Some(TokenKind::Id),
            None => None,
        };
        let caller = Caller::Local(peer_of(&request));
        let call = async {
            let invalidation: Invalidation =
                request.into_inner().try_into().inspect_err(|error| {
                    self.report(rpc, kind, None, Err(error));
                })?;
            let kind = invalidation.key.kind();
            let allowed = authorize(
                &self.policy,
                &self.metrics,
                rpc,
                kind,
                &caller,
                &invalidation.key,
            );
            let audience = allowed
                .is_ok()
                .then(|| audience(&invalidation.key))
                .flatten();
            let result = allowed.and_then(|()| {
                self.cache
                    .invalidate(&invalidation.key, &invalidation.token)
            });
            match &result {
                Ok(invalidated) => {
                    tracing::Span::current().record(
                        "outcome",
                        if *invalidated { "invalidated" } else { "stale" },
                    );
                    self.metrics.invalidation(kind, *invalidated);
                }
                Err(error) => self.report(rpc, Some(kind), audience, Err(error)),
            }
            result
        };
        let invalidated = call.instrument(rpc_span(rpc, kind)).await?;
        Ok(Response::new(pb::InvalidateTokenResponse { invalidated }))
    }

    type WatchTokenStream = Pin<Box<dyn Stream<Item = Result<pb::Token, Status>> + Send>>;

    async fn watch_token(
        &self,
        request: Request<pb::WatchTokenRequest>,
    ) -> Result<Response<Self::WatchTokenStream>, Status> {
        let deadline = deadline_of(&request);
        let kind = match &request.get_ref().request {
            Some(pb::watch_token_request::Request::AccessToken(_)) => Some(TokenKind::Access),
            Some(pb::watch_token_request::Request::IdToken(_)) => Some(TokenKind::Id),
            None => None,
        };
        let span = rpc_span(Rpc::WatchToken, kind);
        let peer = peer_of(&request);
        let caller = Caller::Local(peer);
        let call = async {
            let request: TokenRequest = request.into_inner().try_into().inspect_err(|error| {
                self.report(Rpc::WatchToken, kind, None, Err(error));
            })?;
            let kind = request.key.kind();
            authorize(
                &self.policy,
                &self.metrics,
                Rpc::WatchToken,
                kind,
                &caller,
                &request.key,
            )
            .inspect_err(|error| self.report(Rpc::WatchToken, Some(kind), None, Err(error)))?;
            let audience = audience(&request.key);
            let permit = self
                .watch_limits
                .acquire(peer.map(|p| p.uid))
                .inspect_err(|error| {
                    self.report(Rpc::WatchToken, Some(kind), audience, Err(error))
                })?;
            let owner = owner_of(&caller);
            let result = within(deadline, self.cache.watch(&request, owner)).await;
            self.report(
                Rpc::WatchToken,
                Some(kind),
                audience,
                result.as_ref().map(|(served, _)| served),
            );
            Ok::<_, BrokerError>((kind, permit, result?))
        };
        let (kind, permit, (first, watch)) = call.instrument(span.clone()).await?;
        let watcher = Watcher::new(self, kind, caller, permit);
        let stream = watch_stream(first.token, watch, watcher, self.shutdown.clone(), span);
        Ok(Response::new(Box::pin(stream)))
    }
}

/// An open watch stream: counted in the `tokenbroker_watchers` gauge and
/// holding its place under the watch limits until dropped.
struct Watcher {
    metrics: Metrics,
    kind: TokenKind,
    /// Who watches, for the policy check of every token sent.
    caller: Caller,
    policy: Arc<PolicyStore>,
    _permit: WatchPermit,
}

impl Watcher {
    fn new(service: &BrokerService, kind: TokenKind, caller: Caller, permit: WatchPermit) -> Self {
        service.metrics.watchers(kind, 1);
        Self {
            metrics: service.metrics.clone(),
            kind,
            caller,
            policy: service.policy.clone(),
            _permit: permit,
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.metrics.watchers(self.kind, -1);
    }
}

/// The first token, then each refreshed one; ends with an error status when
/// the token expires unreplaced or the broker shuts down. Runs in the call's
/// span. Every open stream holds this state, so it is kept lean.
fn watch_stream(
    first: Arc<Token>,
    watch: TokenWatch,
    watcher: Watcher,
    shutdown: CancellationToken,
    span: tracing::Span,
) -> impl Stream<Item = Result<pb::Token, Status>> + Send {
    let state = WatchState {
        first: Some(first),
        watch,
        watcher,
        shutdown,
        ended: false,
    };
    // The step future captures the state and works on it in place: an
    // `async fn` taking it by value would hold it twice.
    stream::unfold(state, move |mut state| {
        async move {
            let message = state.next_message().await?;
            Some((message, state))
        }
        .instrument(span.clone())
    })
}

/// What a watch stream holds between messages.
struct WatchState {
    /// The token to send first, until it is sent.
    first: Option<Arc<Token>>,
    watch: TokenWatch,
    watcher: Watcher,
    shutdown: CancellationToken,
    /// Set once the final error is sent.
    ended: bool,
}

impl WatchState {
    /// The next message of the stream: a token, or the final error; `None`
    /// after that.
    async fn next_message(&mut self) -> Option<Result<pb::Token, Status>> {
        if self.ended {
            return None;
        }
        let kind = self.watcher.kind;
        if let Some(first) = self.first.take() {
            return Some(Ok(token_message(kind, &first)));
        }
        // The policy may have been reloaded since the stream began: a peer
        // that lost its rule gets no more tokens.
        let next = self.watch.next(&self.shutdown).await.and_then(|token| {
            let watcher = &self.watcher;
            authorize(
                &watcher.policy,
                &watcher.metrics,
                Rpc::WatchToken,
                kind,
                &watcher.caller,
                self.watch.key(),
            )
            .map(|()| token)
        });
        match next {
            Ok(token) => {
                let remaining = token.remaining(Instant::now());
                self.watcher.metrics.streamed(kind, remaining);
                Some(Ok(token_message(kind, &token)))
            }
            Err(error) => {
                tracing::info!(%error, "watch ended");
                self.ended = true;
                Some(Err(error.into()))
            }
        }
    }
}

/// Applies the access policy, logging and counting denials.
fn authorize(
    policy: &PolicyStore,
    metrics: &Metrics,
    rpc: Rpc,
    kind: TokenKind,
    caller: &Caller,
    key: &TokenKey,
) -> Result<(), BrokerError> {
    policy.check(caller, key).inspect_err(|error| {
        let peer = match caller {
            Caller::Local(peer) => peer.as_ref(),
            Caller::Loopback => None,
        };
        metrics.denied(rpc, kind);
        tracing::warn!(
            uid = peer.map(|p| p.uid),
            gid = peer.map(|p| p.gid),
            pid = peer.and_then(|p| p.pid),
            %error,
            "request denied by policy"
        );
    })
}

/// Whom the keys a caller creates are charged to: its uid, or the shared
/// bucket of callers without one.
fn owner_of(caller: &Caller) -> Owner {
    match caller {
        Caller::Local(Some(peer)) => Owner::Uid(peer.uid),
        Caller::Local(None) | Caller::Loopback => Owner::Unidentified,
    }
}

/// The connecting process, from the Unix socket's peer credentials.
fn peer_of<T>(request: &Request<T>) -> Option<Peer> {
    let credentials = request
        .extensions()
        .get::<ConnectionInfo>()?
        .uds
        .peer_cred?;
    Some(Peer {
        uid: credentials.uid(),
        gid: credentials.gid(),
        pid: credentials.pid(),
    })
}

/// The span of one call: at debug level, so that it costs nothing unless
/// debug logs or trace export ask for it.
fn rpc_span(rpc: Rpc, kind: Option<TokenKind>) -> tracing::Span {
    tracing::debug_span!(
        "rpc",
        rpc = rpc.as_str(),
        token_kind = kind.map(TokenKind::as_str),
        outcome = tracing::field::Empty,
        code = tracing::field::Empty,
    )
}

fn audience(key: &TokenKey) -> Option<&str> {
    match key {
        TokenKey::Id(key) => Some(&key.audience),
        TokenKey::Access(_) => None,
    }
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
