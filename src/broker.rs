//! The one path from a request to a token, shared by every front door (the
//! gRPC service, the metadata-compatible endpoint, file sinks): the outcome
//! of the request's validation, the access policy, the cache within the
//! caller's deadline, and one span, the metrics and the log of each call.
//! The front doors only translate their requests and answers.

mod pods;
mod watch;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::audit::{AuditLog, Event, EventKind, event};
use crate::cache::quota::Owner;
use crate::cache::{Served, TokenCache};
use crate::error::BrokerError;
use crate::peer::Holder;
use crate::policy::{Caller, Grant, PolicyStore};
use crate::request::{Invalidation, TokenKey, TokenRequest};
use crate::telemetry::RateLimitedLog;
use crate::telemetry::metrics::{Metrics, Rpc, code_name};
use crate::token::{Token, TokenKind};
use crate::workload::{Pod, PodIdentity, Workloads};

pub use watch::{DEFAULT_MAX_WATCHERS, DEFAULT_MAX_WATCHERS_PER_UID, Watch, WatchLimits};

/// Hands out tokens; cloning is cheap (one `Arc`), and every clone serves
/// from the same cache under the same policy.
#[derive(Clone)]
pub struct Broker(Arc<Inner>);

struct Inner {
    cache: TokenCache,
    policy: Arc<PolicyStore>,
    metrics: Metrics,
    watch_limits: WatchLimits,
    /// Denials and failed requests: a peer sending thousands must not
    /// flood the log.
    denials: RateLimitedLog,
    failures: RateLimitedLog,
    /// `--audit-log`, if on.
    audit: Option<AuditLog>,
    /// With `--workload-identity kubernetes`, the node's pods.
    workloads: Option<Workloads>,
}

impl Broker {
    /// A broker answering from `cache` to the callers `policy` allows;
    /// watches are bounded by `watch_limits` and end once `drain` is
    /// cancelled (one task waits for it, not each watch).
    pub fn new(
        cache: TokenCache,
        policy: Arc<PolicyStore>,
        metrics: Metrics,
        watch_limits: WatchLimits,
        drain: CancellationToken,
        audit: Option<AuditLog>,
        workloads: Option<Workloads>,
    ) -> Self {
        let watched = cache.clone();
        tokio::spawn(async move {
            drain.cancelled().await;
            watched.end_watches();
        });
        Self(Arc::new(Inner {
            cache,
            policy,
            metrics,
            watch_limits,
            denials: RateLimitedLog::default(),
            failures: RateLimitedLog::default(),
            audit,
            workloads,
        }))
    }

    /// Serves one token request that came through `rpc`: takes the outcome
    /// of its validation, applies the policy to `caller`, and answers from
    /// the cache within `deadline`.
    pub async fn token(
        &self,
        rpc: Rpc,
        kind: TokenKind,
        request: Result<TokenRequest, BrokerError>,
        caller: Caller,
        deadline: Option<Duration>,
    ) -> Result<Arc<Token>, BrokerError> {
        let call = async {
            let (request, _) = self
                .admit(rpc, Some(kind), request, |r| &mut r.key, &caller)
                .await?;
            let result = within(deadline, self.0.cache.get(&request, owner_of(&caller))).await;
            self.report(rpc, Some(kind), audience(&request.key), result.as_ref());
            self.audit(|| match &result {
                Ok(served) => Event {
                    token: Some(&served.token),
                    cache: Some(served.outcome.as_str()),
                    ..event(EventKind::Grant, rpc, &caller, Some(&request.key))
                },
                Err(error) => Event {
                    code: error.code(),
                    ..event(EventKind::Error, rpc, &caller, Some(&request.key))
                },
            });
            Ok(result?.token)
        };
        call.instrument(rpc_span(rpc, Some(kind))).await
    }

    /// Drops the cached token a service rejected, if it is still the one
    /// cached, so that a new one is fetched for everybody. `kind` is the
    /// request's, when it named one. Returns whether it was dropped.
    pub async fn invalidate(
        &self,
        kind: Option<TokenKind>,
        request: Result<Invalidation, BrokerError>,
        caller: Caller,
    ) -> Result<bool, BrokerError> {
        let rpc = Rpc::InvalidateToken;
        let call = async {
            let (invalidation, _) = self
                .admit(rpc, kind, request, |i| &mut i.key, &caller)
                .await?;
            let kind = invalidation.key.kind();
            let result = self
                .0
                .cache
                .invalidate(&invalidation.key, &invalidation.token);
            self.audit(|| Event {
                handed_back: Some(invalidation.token.expose()),
                code: result
                    .as_ref()
                    .err()
                    .map_or(tonic::Code::Ok, BrokerError::code),
                ..event(
                    if result.is_ok() {
                        EventKind::Invalidate
                    } else {
                        EventKind::Error
                    },
                    rpc,
                    &caller,
                    Some(&invalidation.key),
                )
            });
            match &result {
                Ok(invalidated) => {
                    let outcome = if *invalidated { "invalidated" } else { "stale" };
                    tracing::Span::current().record("outcome", outcome);
                    self.0.metrics.invalidation(kind, *invalidated);
                }
                Err(error) => {
                    let audience = audience(&invalidation.key);
                    self.report(rpc, Some(kind), audience, Err(error))
                }
            }
            result
        };
        call.instrument(rpc_span(rpc, kind)).await
    }

    /// Opens a watch of one token for `caller`: the current token, then each
    /// refreshed one (see [`Watch`]). `kind` is the request's, when it named
    /// one.
    pub async fn watch(
        &self,
        rpc: Rpc,
        kind: Option<TokenKind>,
        request: Result<TokenRequest, BrokerError>,
        caller: Caller,
        deadline: Option<Duration>,
    ) -> Result<Watch, BrokerError> {
        let span = rpc_span(rpc, kind);
        let call = async {
            let (request, admitted) = self
                .admit(rpc, kind, request, |r| &mut r.key, &caller)
                .await?;
            let kind = request.key.kind();
            let audience = audience(&request.key);
            let permit = self
                .0
                .watch_limits
                .acquire(caller.holder())
                .inspect_err(|error| self.report(rpc, Some(kind), audience, Err(error)))?;
            let result = within(deadline, self.0.cache.watch(&request, owner_of(&caller))).await;
            self.report(
                rpc,
                Some(kind),
                audience,
                result.as_ref().map(|(served, _)| served),
            );
            if let Err(error) = &result {
                self.audit(|| Event {
                    code: error.code(),
                    ..event(EventKind::Error, rpc, &caller, Some(&request.key))
                });
            }
            let (first, watch) = result?;
            Ok(Watch::new(
                self.clone(),
                rpc,
                caller,
                admitted,
                first.token,
                watch,
                permit,
            ))
        };
        let watch = call.instrument(span.clone()).await?;
        Ok(watch.in_span(span))
    }

    /// The request (a token request or an invalidation, whose key `key`
    /// reaches), once validated and allowed, with its key rewritten to the
    /// caller's pod's account (workload identity) and limited to the
    /// access boundary the policy sets, if any; then also how it was
    /// admitted. A refusal is reported. Audiences of refused requests
    /// never become labels: a denied peer could fill the series cap with
    /// them.
    async fn admit<R>(
        &self,
        rpc: Rpc,
        kind: Option<TokenKind>,
        request: Result<R, BrokerError>,
        key: impl Fn(&mut R) -> &mut TokenKey,
        caller: &Caller,
    ) -> Result<(R, Admitted), BrokerError> {
        let mut request = request.inspect_err(|error| {
            self.report(rpc, kind, None, Err(error));
            self.audit(|| Event {
                code: error.code(),
                ..event(EventKind::Error, rpc, caller, None)
            });
        })?;
        let key = key(&mut request);
        let kind = key.kind();
        let refused = |error: &BrokerError, key: &TokenKey| {
            self.report(rpc, Some(kind), None, Err(error));
            self.audit(|| Event {
                code: error.code(),
                ..event(EventKind::Deny, rpc, caller, Some(key))
            });
        };
        let denied = |error: &BrokerError, pod: Option<&Pod>, key: &TokenKey| {
            self.0.metrics.denied(rpc, kind);
            self.log_denial(caller, pod, error);
            refused(error, key);
        };
        let pod = self
            .pod_identity(caller)
            .await
            .inspect_err(|error| denied(error, None, key))?;
        if let Some(identity) = &pod {
            pods::serve_as(key, identity)
                .inspect_err(|error| denied(error, Some(&identity.pod), key))?;
        }
        let grant = self
            .authorize(rpc, kind, caller, pod.as_ref(), key)
            .inspect_err(|error| refused(error, key))?;
        let requested = match grant {
            Grant::AsAsked => None,
            Grant::Limited(limited) => Some(std::mem::replace(key, limited)),
        };
        Ok((request, Admitted { requested, pod }))
    }

    /// Records the event `make` builds in the audit trail, if it is on.
    pub(crate) fn audit<'a>(&self, make: impl FnOnce() -> Event<'a>) {
        if let Some(audit) = &self.0.audit {
            audit.record(&make());
        }
    }

    /// With workload identity, the Google service account `caller`'s pod
    /// is served as: `None` for a host process, and for a pod served as
    /// the node (`--unmapped-pods node`).
    pub async fn pod_account(&self, caller: &Caller) -> Result<Option<Arc<str>>, BrokerError> {
        let identity = self.pod_identity(caller).await?;
        Ok(identity.and_then(|identity| identity.google))
    }

    /// Whether the policy lets `caller` read the metadata `path` (below
    /// `/computeMetadata/v1/`, `recursive` or not) beyond
    /// `--metadata-passthrough`.
    /// A peer the broker refuses (an unknown one, a pod that is gone or
    /// maps to nothing) is shown nothing.
    pub fn reveals(&self, caller: &Caller, path: &str, recursive: bool) -> bool {
        let Ok(pod) = self.current_pod_identity(caller) else {
            return false;
        };
        let pod = pod.as_ref().map(|identity| &*identity.pod);
        self.0.policy.reveals(caller, pod, path, recursive)
    }

    /// Applies the access policy to `caller` in `pod`, logging and
    /// counting denials.
    fn authorize(
        &self,
        rpc: Rpc,
        kind: TokenKind,
        caller: &Caller,
        pod: Option<&PodIdentity>,
        key: &TokenKey,
    ) -> Result<Grant, BrokerError> {
        let pod = pod.map(|identity| &*identity.pod);
        self.0.policy.check(caller, pod, key).inspect_err(|error| {
            self.0.metrics.denied(rpc, kind);
            self.log_denial(caller, pod, error);
        })
    }

    /// Logs a denial, naming the peer and its pod (rate-limited).
    fn log_denial(&self, caller: &Caller, pod: Option<&Pod>, error: &BrokerError) {
        let peer = caller.peer();
        self.0.denials.warn(|denials| {
            tracing::warn!(
                uid = peer.map(|p| p.uid),
                gid = peer.map(|p| p.gid),
                pid = peer.and_then(|p| p.pid),
                pod = pod.map(tracing::field::display),
                kubernetes_service_account = pod.map(Pod::kubernetes_service_account),
                %error,
                denials,
                "request denied (logged at most once a second, with the count since)"
            )
        });
    }

    /// Records the result of a call in the current span and in the metrics,
    /// and logs failures. A call whose request named no token kind is only
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
                self.0
                    .metrics
                    .served(rpc, kind, served.outcome, remaining, audience);
            }
            (Ok(_), None) => {}
            (Err(error), kind) => {
                let code = error.code();
                span.record("outcome", "error");
                span.record("code", code_name(code));
                if let Some(kind) = kind {
                    self.0.metrics.failed(rpc, kind, code, audience);
                }
                let (rpc, kind, code) =
                    (rpc.as_str(), kind.map(TokenKind::as_str), code_name(code));
                if error.is_fair_share_refusal() {
                    tracing::debug!(rpc, token_kind = kind, code, %error, "request failed");
                } else {
                    self.0.failures.warn(|failures| {
                        tracing::info!(
                            rpc,
                            token_kind = kind,
                            code,
                            %error,
                            failures,
                            "request failed (logged at most once a second, with the count since)"
                        )
                    });
                }
            }
        }
    }
}

/// How a request was admitted: the key as the caller asked for it, when
/// the policy limited it to an access boundary; the caller's pod, with
/// workload identity.
#[derive(Default)]
pub(crate) struct Admitted {
    /// The key as asked for, if the policy limited it.
    pub requested: Option<TokenKey>,
    /// The caller's pod and account.
    pub pod: Option<PodIdentity>,
}

/// Whom the keys a caller creates are charged to: its uid, the shared
/// bucket of callers without one, or nobody (the broker's own sinks).
fn owner_of(caller: &Caller) -> Owner {
    match caller {
        Caller::Local(Some(peer)) => match peer.holder() {
            Holder::Uid(uid) => Owner::Uid(uid),
            Holder::Pod(pod) => Owner::Pod(pod),
            Holder::Unknown => Owner::Unidentified,
        },
        Caller::Local(None) | Caller::Loopback => Owner::Unidentified,
        Caller::Broker => Owner::Broker,
    }
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
        TokenKey::Access(_) | TokenKey::Downscoped(_) => None,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_deadline_turns_into_a_clear_error() {
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
