//! Open watches of one token, and the bounds on how many may be open.
//! Thousands may be open at once, so each holds as little as it can.

use std::sync::Arc;

use tokio::time::Instant;
use tracing::Instrument;

use super::{Admitted, Broker};
use crate::audit::{Event, EventKind, event};
use crate::cache::TokenWatch;
use crate::error::BrokerError;
use crate::peer::Holder;
use crate::policy::{Caller, Grant};
use crate::quota::{Quota, QuotaPermit};
use crate::request::TokenKey;
use crate::telemetry::metrics::Rpc;
use crate::token::{Token, TokenKind};
use crate::workload::PodIdentity;

/// Default most open watch streams (10 000).
pub const DEFAULT_MAX_WATCHERS: usize = 10_000;
/// Default most open watch streams of one peer uid (1 000).
pub const DEFAULT_MAX_WATCHERS_PER_UID: usize = 1_000;

/// Counts open watches against a total and a per-uid bound.
#[derive(Clone)]
pub struct WatchLimits {
    quota: Quota,
}

impl WatchLimits {
    /// Limits of `max_total` watches, and `max_per_uid` for any one uid.
    pub fn new(max_total: usize, max_per_uid: usize) -> Self {
        Self {
            quota: Quota::new(max_total, max_per_uid),
        }
    }

    /// Takes a place for a watch of `holder` (a uid or pod; unknown: only
    /// the total applies), or fails with `RESOURCE_EXHAUSTED`.
    pub fn acquire(&self, holder: Option<Holder>) -> Result<QuotaPermit, BrokerError> {
        self.quota.acquire(holder).map_err(|exceeded| {
            exceeded.into_error(
                "too many open watch streams",
                "too many open watch streams for this uid",
                "too many open watch streams for this pod",
            )
        })
    }
}

/// An open watch: the current token, then each refreshed one. Counted in
/// the `tokenbroker_watchers` gauge and holding its place under the watch
/// limits until dropped.
pub struct Watch {
    /// The token to yield first, until it is yielded.
    first: Option<Arc<Token>>,
    watch: TokenWatch,
    broker: Broker,
    rpc: Rpc,
    /// Who watches, for the policy check of every later token.
    caller: Caller,
    /// The key as the caller asked for it, when the policy limited it to
    /// an access boundary (boxed: most watches have none).
    requested: Option<Box<TokenKey>>,
    /// With workload identity, the watching pod: the watch ends when the
    /// pod goes or maps to another account (boxed: host peers have none).
    pod: Option<Box<PodWatch>>,
    /// The call's span, when it is enabled (boxed: most watches have none,
    /// and each holds only a pointer's worth for it).
    span: Option<Box<tracing::Span>>,
    _permit: QuotaPermit,
}

/// The pod a watch was opened by, and the changes of the node's pods.
struct PodWatch {
    identity: PodIdentity,
    changes: tokio::sync::watch::Receiver<u64>,
}

impl Watch {
    pub(super) fn new(
        broker: Broker,
        rpc: Rpc,
        caller: Caller,
        admitted: Admitted,
        first: Arc<Token>,
        watch: TokenWatch,
        permit: QuotaPermit,
    ) -> Self {
        broker.0.metrics.watchers(watch.key().kind(), 1);
        let pod = admitted.pod.and_then(|identity| {
            let changes = broker.0.workloads.as_ref()?.subscribe_changes();
            Some(Box::new(PodWatch { identity, changes }))
        });
        Self {
            first: Some(first),
            watch,
            broker,
            rpc,
            caller,
            requested: admitted.requested.map(Box::new),
            pod,
            span: None,
            _permit: permit,
        }
    }

    /// The watch, with its later tokens waited for in `span`.
    pub(super) fn in_span(mut self, span: tracing::Span) -> Self {
        self.span = (!span.is_disabled()).then(|| Box::new(span));
        self
    }

    /// The kind of token watched.
    pub fn kind(&self) -> TokenKind {
        self.watch.key().kind()
    }

    /// The current token at first, then each refreshed one. An error ends
    /// the watch: the token expired with no replacement, the broker is
    /// draining, or the policy (which may have been reloaded since the
    /// watch began) no longer lets the caller have it.
    ///
    /// Each token a client receives is audited as `watch_token`; a sink
    /// audits its own write, once the file holds the token.
    pub async fn next(&mut self) -> Result<Arc<Token>, BrokerError> {
        let token = self.next_token().await?;
        if self.caller != Caller::Broker {
            self.broker.audit(|| Event {
                token: Some(&token),
                ..event(
                    EventKind::WatchToken,
                    self.rpc,
                    &self.caller,
                    Some(self.watch.key()),
                )
            });
        }
        Ok(token)
    }

    async fn next_token(&mut self) -> Result<Arc<Token>, BrokerError> {
        if let Some(first) = self.first.take() {
            return Ok(first);
        }
        let kind = self.kind();
        let next = async {
            let token = loop {
                let token = match self.pod.as_deref_mut() {
                    None => Some(self.watch.next().await?),
                    Some(pod) => tokio::select! {
                        token = self.watch.next() => Some(token?),
                        changed = pod.changes.changed() => {
                            // The pods are no longer followed: the broker stops.
                            changed.map_err(|_| BrokerError::ShuttingDown)?;
                            None
                        }
                    },
                };
                // A new token, or a change of the pods (the pod went, its
                // account changed, or the policy was reloaded): check now,
                // not at the next token.
                still_allowed(
                    &self.broker,
                    self.rpc,
                    &self.caller,
                    self.pod.as_deref().map(|pod| &pod.identity),
                    self.requested.as_deref(),
                    self.watch.key(),
                )
                .inspect_err(|error| {
                    let key = Some(self.watch.key());
                    self.broker.audit(|| Event {
                        code: error.code(),
                        ..event(EventKind::Deny, self.rpc, &self.caller, key)
                    });
                })?;
                if let Some(token) = token {
                    break token;
                }
            };
            let remaining = token.remaining(Instant::now());
            self.broker.0.metrics.streamed(kind, remaining);
            Ok(token)
        };
        // An instrumented future holds its own span; boxed, it costs the
        // waiting future nothing when the span is off.
        let result = match self.span.as_deref() {
            Some(span) => Box::pin(next.instrument(span.clone())).await,
            None => next.await,
        };
        result.inspect_err(|error| tracing::info!(%error, "watch ended"))
    }
}

/// Whether the stream may go on. With workload identity, the watching
/// pod must still be on the node and served as the same account (see
/// [`still_the_pods`]). The policy in force must still grant `caller` the
/// `watched` key: the key as `requested` (if the policy limited it) is
/// allowed, and limited to the same boundary as when the watch began.
/// Otherwise the watch ends, as a denial or, under another boundary, with
/// `UNAVAILABLE` so that clients watch again and get the token the policy
/// now allows.
fn still_allowed(
    broker: &Broker,
    rpc: Rpc,
    caller: &Caller,
    pod: Option<&PodIdentity>,
    requested: Option<&TokenKey>,
    watched: &TokenKey,
) -> Result<(), BrokerError> {
    let kind = watched.kind();
    if let Some(pod) = pod {
        still_the_pods(broker, rpc, kind, caller, pod)?;
    }
    let asked = requested.unwrap_or(watched);
    let grant = broker.authorize(rpc, kind, caller, pod, asked)?;
    let granted = match &grant {
        Grant::AsAsked => asked,
        Grant::Limited(limited) => limited,
    };
    if granted == watched {
        return Ok(());
    }
    broker.0.metrics.denied(rpc, kind);
    Err(BrokerError::GrantChanged {
        policy: broker
            .0
            .policy
            .path()
            .map_or_else(|| "in force".into(), |path| path.display().to_string()),
    })
}

/// Whether the watching pod is still on the node and still served as the
/// same account; a pod that is gone, or that maps elsewhere now, ends the
/// watch (the latter with `UNAVAILABLE`, so that it watches again).
fn still_the_pods(
    broker: &Broker,
    rpc: Rpc,
    kind: TokenKind,
    caller: &Caller,
    watching: &PodIdentity,
) -> Result<(), BrokerError> {
    let now = broker.current_pod_identity(caller);
    let result = match now {
        Ok(now) if now.as_ref().map(|i| &i.google) == Some(&watching.google) => return Ok(()),
        Ok(_) => Err(BrokerError::PodUnavailable {
            reason: format!(
                "pod {} maps to another Google service account now; watch again",
                watching.pod
            ),
        }),
        Err(error) => Err(error),
    };
    broker.0.metrics.denied(rpc, kind);
    result
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.broker.0.metrics.watchers(self.kind(), -1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_limits_count_per_uid_and_in_total() {
        let limits = WatchLimits::new(3, 2);
        let a1 = limits.acquire(Some(Holder::Uid(1))).unwrap();
        let _a2 = limits.acquire(Some(Holder::Uid(1))).unwrap();
        let error = limits.acquire(Some(Holder::Uid(1))).err().unwrap();
        assert!(matches!(error, BrokerError::LimitExceeded { limit: 2, .. }));
        let _b1 = limits.acquire(Some(Holder::Uid(2))).unwrap();
        let error = limits.acquire(None).err().unwrap();
        assert!(matches!(error, BrokerError::LimitExceeded { limit: 3, .. }));
        drop(a1);
        assert!(limits.acquire(Some(Holder::Uid(1))).is_ok());
    }
}
