//! The broker's metrics, recorded through the OpenTelemetry API. Names and
//! labels are a contract with operators' dashboards: see the table in
//! docs/observability.md.
//! Labels never hold tokens, and hold audiences only when the operator opts
//! in (`--metrics-label-audience`).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{
    Counter, Histogram, Meter, MeterProvider, NoopMeterProvider, UpDownCounter,
};
use tonic::Code;

use crate::token::TokenKind;

/// The instrumentation scope of every instrument.
pub const METER_NAME: &str = "tokenbroker";

/// Bucket bounds of the upstream fetch duration histogram, in seconds.
const FETCH_SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Bucket bounds of the remaining-lifetime histogram, in seconds.
const REMAINING_SECONDS_BUCKETS: &[f64] = &[
    10.0, 30.0, 60.0, 120.0, 240.0, 300.0, 600.0, 1200.0, 1800.0, 2700.0, 3600.0,
];

/// How a request was served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// From the cache, without waiting.
    Hit,
    /// This request caused an upstream fetch.
    Miss,
    /// This request waited for a fetch another request or a refresh started.
    Coalesced,
}

impl Outcome {
    /// A stable name for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Coalesced => "coalesced",
        }
    }
}

/// The RPC a request came through (the `rpc` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rpc {
    /// `GetAccessToken`.
    GetAccessToken,
    /// `GetIdToken`.
    GetIdToken,
    /// `WatchToken`.
    WatchToken,
    /// `GET …/token` on the metadata-compatible endpoint.
    MetadataToken,
    /// `GET …/identity` on the metadata-compatible endpoint.
    MetadataIdentity,
    /// `InvalidateToken`.
    InvalidateToken,
    /// A file sink's watch of its token.
    Sink,
}

impl Rpc {
    /// The label value: the RPC's name in the proto, or for the
    /// metadata-compatible endpoint `MetadataToken` / `MetadataIdentity`,
    /// and `Sink` for a file sink.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::GetAccessToken => "GetAccessToken",
            Self::GetIdToken => "GetIdToken",
            Self::WatchToken => "WatchToken",
            Self::MetadataToken => "MetadataToken",
            Self::MetadataIdentity => "MetadataIdentity",
            Self::InvalidateToken => "InvalidateToken",
            Self::Sink => "Sink",
        }
    }
}

/// Every instrument the broker records to. Cloning is cheap (one `Arc`),
/// which matters: every open watch stream holds a clone.
#[derive(Clone)]
pub struct Metrics(Arc<Instruments>);

struct Instruments {
    audit_dropped: Counter<u64>,
    requests: Counter<u64>,
    request_errors: Counter<u64>,
    upstream_fetches: Counter<u64>,
    upstream_failures: Counter<u64>,
    upstream_fetch_duration: Histogram<f64>,
    refreshes: Counter<u64>,
    downscope_exchanges: Counter<u64>,
    watchers: UpDownCounter<i64>,
    token_remaining: Histogram<f64>,
    policy_denials: Counter<u64>,
    invalidations: Counter<u64>,
    cache_refusals: Counter<u64>,
    cache_evictions: Counter<u64>,
    label_audience: bool,
}

impl Metrics {
    /// Creates the instruments on `meter`. With `label_audience`, request
    /// metrics of ID tokens carry an `audience` label.
    pub fn new(meter: &Meter, label_audience: bool) -> Self {
        let metrics = Self(Arc::new(Instruments {
            audit_dropped: meter
                .u64_counter("tokenbroker.audit_dropped")
                .with_description(
                    "Audit log lines dropped because the audit log's disk was slower than the traffic.",
                )
                .build(),
            requests: meter
                .u64_counter("tokenbroker.requests")
                .with_description(
                    "Token requests by RPC, token kind and outcome (hit, miss, coalesced, error).",
                )
                .build(),
            request_errors: meter
                .u64_counter("tokenbroker.request_errors")
                .with_description("Failed token requests by gRPC status code.")
                .build(),
            upstream_fetches: meter
                .u64_counter("tokenbroker.upstream_fetches")
                .with_description("Requests to the token source (metadata server, OAuth, IAM) by result (ok, error).")
                .build(),
            upstream_failures: meter
                .u64_counter("tokenbroker.upstream_failures")
                .with_description("Failed requests to the token source by reason.")
                .build(),
            upstream_fetch_duration: meter
                .f64_histogram("tokenbroker.upstream_fetch_duration")
                .with_unit("s")
                .with_description("Time one request to the token source took.")
                .with_boundaries(FETCH_SECONDS_BUCKETS.to_vec())
                .build(),
            refreshes: meter
                .u64_counter("tokenbroker.refreshes")
                .with_description("Background refreshes of cached tokens by result (ok, error).")
                .build(),
            downscope_exchanges: meter
                .u64_counter("tokenbroker.downscope_exchanges")
                .with_description(
                    "Exchanges at Google STS of a source token for a downscoped one, by result (ok, error).",
                )
                .build(),
            watchers: meter
                .i64_up_down_counter("tokenbroker.watchers")
                .with_description("Open WatchToken streams.")
                .build(),
            token_remaining: meter
                .f64_histogram("tokenbroker.token_remaining")
                .with_unit("s")
                .with_description("Remaining lifetime of the tokens handed to clients.")
                .with_boundaries(REMAINING_SECONDS_BUCKETS.to_vec())
                .build(),
            policy_denials: meter
                .u64_counter("tokenbroker.policy_denials")
                .with_description("Requests refused by the access policy, by RPC and token kind.")
                .build(),
            invalidations: meter
                .u64_counter("tokenbroker.invalidations")
                .with_description(
                    "InvalidateToken calls by token kind and result (invalidated, stale).",
                )
                .build(),
            cache_refusals: meter
                .u64_counter("tokenbroker.cache_refusals")
                .with_description(
                    "Requests the cache refused to keep its fair shares, by token kind and reason (max_keys, max_keys_per_uid, min_valid_for_interval).",
                )
                .build(),
            cache_evictions: meter
                .u64_counter("tokenbroker.cache_evictions")
                .with_description(
                    "Keys dropped unused, by token kind and reason (idle: after --idle-timeout; failed: never got a token, after a minute).",
                )
                .build(),
            label_audience,
        }));
        // Gauges read 0 before the first stream, rather than nothing.
        for kind in [TokenKind::Access, TokenKind::Id] {
            metrics.watchers(kind, 0);
        }
        metrics
    }

    /// Instruments that record nothing (metrics off, unit tests).
    pub fn disabled() -> Self {
        Self::new(&NoopMeterProvider::new().meter(METER_NAME), false)
    }

    /// A token handed to a client.
    pub fn served(
        &self,
        rpc: Rpc,
        kind: TokenKind,
        outcome: Outcome,
        remaining: Duration,
        audience: Option<&str>,
    ) {
        let labels = [
            rpc_label(rpc),
            kind_label(kind),
            KeyValue::new("outcome", outcome.as_str()),
        ];
        self.0
            .requests
            .add(1, &self.with_audience(&labels, audience));
        self.0
            .token_remaining
            .record(remaining.as_secs_f64(), &labels[..2]);
    }

    /// A token handed to a watcher after a refresh.
    pub fn streamed(&self, kind: TokenKind, remaining: Duration) {
        let labels = [rpc_label(Rpc::WatchToken), kind_label(kind)];
        self.0
            .token_remaining
            .record(remaining.as_secs_f64(), &labels);
    }

    /// A request that failed with `code`.
    pub fn failed(&self, rpc: Rpc, kind: TokenKind, code: Code, audience: Option<&str>) {
        let mut labels = [
            rpc_label(rpc),
            kind_label(kind),
            KeyValue::new("outcome", "error"),
        ];
        self.0
            .requests
            .add(1, &self.with_audience(&labels, audience));
        labels[2] = KeyValue::new("code", code_name(code));
        self.0
            .request_errors
            .add(1, &self.with_audience(&labels, audience));
    }

    /// Audit log lines dropped: the writer was behind, or the disk failed.
    pub fn audit_dropped(&self, lines: u64) {
        self.0.audit_dropped.add(lines, &[]);
    }

    /// A request refused by the access policy.
    pub fn denied(&self, rpc: Rpc, kind: TokenKind) {
        self.0
            .policy_denials
            .add(1, &[rpc_label(rpc), kind_label(kind)]);
    }

    /// An `InvalidateToken` call that succeeded: `invalidated` if it dropped
    /// the cached token, else the token handed back was already stale.
    pub fn invalidation(&self, kind: TokenKind, invalidated: bool) {
        let result = if invalidated { "invalidated" } else { "stale" };
        self.0
            .invalidations
            .add(1, &[kind_label(kind), KeyValue::new("result", result)]);
    }

    /// A request the cache refused for `reason`: `max_keys`,
    /// `max_keys_per_uid` or `min_valid_for_interval`.
    pub fn cache_refused(&self, kind: TokenKind, reason: &'static str) {
        self.0
            .cache_refusals
            .add(1, &[kind_label(kind), KeyValue::new("reason", reason)]);
    }

    /// A key dropped unused: `idle`, or `failed` (it never got a token).
    pub fn cache_evicted(&self, kind: TokenKind, reason: &'static str) {
        self.0
            .cache_evictions
            .add(1, &[kind_label(kind), KeyValue::new("reason", reason)]);
    }

    /// One request to the token source: `Err` holds the failure reason.
    pub fn upstream_fetch(
        &self,
        kind: TokenKind,
        result: Result<(), &'static str>,
        duration: Duration,
    ) {
        let kind = kind_label(kind);
        self.0
            .upstream_fetch_duration
            .record(duration.as_secs_f64(), std::slice::from_ref(&kind));
        let outcome = if result.is_ok() { "ok" } else { "error" };
        self.0
            .upstream_fetches
            .add(1, &[kind.clone(), KeyValue::new("result", outcome)]);
        if let Err(reason) = result {
            self.0
                .upstream_failures
                .add(1, &[kind, KeyValue::new("reason", reason)]);
        }
    }

    /// An exchange for a downscoped token finished.
    pub fn downscope_exchange(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.0
            .downscope_exchanges
            .add(1, &[KeyValue::new("result", result)]);
    }

    /// A scheduled background refresh finished.
    pub fn refreshed(&self, kind: TokenKind, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.0
            .refreshes
            .add(1, &[kind_label(kind), KeyValue::new("result", result)]);
    }

    /// A watch stream opened (`+1`) or closed (`-1`).
    pub fn watchers(&self, kind: TokenKind, delta: i64) {
        self.0.watchers.add(delta, &[kind_label(kind)]);
    }

    /// `labels`, plus the audience when the operator opted in (the only
    /// case that allocates).
    fn with_audience<'a>(
        &self,
        labels: &'a [KeyValue],
        audience: Option<&str>,
    ) -> Cow<'a, [KeyValue]> {
        match audience.filter(|_| self.0.label_audience) {
            Some(audience) => {
                let mut labels = labels.to_vec();
                labels.push(KeyValue::new("audience", audience.to_string()));
                Cow::Owned(labels)
            }
            None => Cow::Borrowed(labels),
        }
    }
}

/// Registers the `tokenbroker.cache_entries` gauge, read from `entries` at
/// each collection.
pub fn register_cache_gauge(
    meter: &Meter,
    entries: impl Fn(TokenKind) -> usize + Send + Sync + 'static,
) {
    meter
        .u64_observable_gauge("tokenbroker.cache_entries")
        .with_description("Keys held in the cache by token kind.")
        .with_callback(move |observer| {
            for kind in [TokenKind::Access, TokenKind::Id] {
                observer.observe(entries(kind) as u64, &[kind_label(kind)]);
            }
        })
        .build();
}

/// Registers the `tokenbroker.runtime_tasks` gauge: the tasks alive on
/// `runtime` at each collection (one per connection, watch, refresh, ...;
/// a leak shows as growth that does not come back when the load goes).
pub fn register_runtime_gauge(meter: &Meter, runtime: tokio::runtime::Handle) {
    meter
        .u64_observable_gauge("tokenbroker.runtime_tasks")
        .with_description("Tasks alive on the broker's async runtime.")
        .with_callback(move |observer| {
            observer.observe(runtime.metrics().num_alive_tasks() as u64, &[]);
        })
        .build();
}

/// Registers the `tokenbroker.workload_pods` gauge: the pods of this node
/// the broker knows (workload identity).
pub fn register_workload_gauge(meter: &Meter, pods: impl Fn() -> usize + Send + Sync + 'static) {
    meter
        .u64_observable_gauge("tokenbroker.workload_pods")
        .with_description("Pods known on this node (--workload-identity kubernetes).")
        .with_callback(move |observer| observer.observe(pods() as u64, &[]))
        .build();
}

fn rpc_label(rpc: Rpc) -> KeyValue {
    KeyValue::new("rpc", rpc.as_str())
}

fn kind_label(kind: TokenKind) -> KeyValue {
    KeyValue::new("token_kind", kind.as_str())
}

/// The canonical name of a gRPC status code, e.g. `UNAVAILABLE`.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
