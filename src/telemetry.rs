//! Logs, metrics and traces: `tracing` to stderr (text or JSON), metrics
//! through the OpenTelemetry SDK to a Prometheus registry and, when the
//! standard `OTEL_EXPORTER_OTLP_*` variables are set, to an OTLP collector
//! together with the spans.

pub mod health;
pub mod metrics;

use std::error::Error;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use clap::ValueEnum;
use opentelemetry::metrics::{Meter, MeterProvider, NoopMeterProvider};
use opentelemetry::trace::TracerProvider;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tokio::time::Instant;
use tracing::Level;
use tracing_subscriber::filter::{FilterExt, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::telemetry::metrics::METER_NAME;

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Text on a terminal, JSON otherwise.
    #[default]
    Auto,
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// What [`init`] should set up besides logs.
#[derive(Clone, Copy, Debug, Default)]
pub struct Exports {
    /// Keep a Prometheus registry for `/metrics`.
    pub prometheus: bool,
    /// Export to OTLP if the environment asks for it.
    pub otlp: bool,
}

/// The installed telemetry; call [`Telemetry::shutdown`] before exiting so
/// that OTLP exporters flush.
pub struct Telemetry {
    /// `None` when no metric exporter is configured.
    meter_provider: Option<SdkMeterProvider>,
    tracer_provider: Option<SdkTracerProvider>,
    registry: Option<prometheus::Registry>,
}

impl Telemetry {
    /// The broker's meter.
    /// The broker's meter; a no-op one when no metric exporter is
    /// configured, so that recording costs nothing.
    pub fn meter(&self) -> Meter {
        match &self.meter_provider {
            Some(provider) => provider.meter(METER_NAME),
            None => NoopMeterProvider::new().meter(METER_NAME),
        }
    }

    /// The Prometheus registry, if one was asked for.
    pub fn registry(&self) -> Option<&prometheus::Registry> {
        self.registry.as_ref()
    }

    /// Flushes and stops the exporters.
    pub fn shutdown(self) {
        if let Some(meter_provider) = self.meter_provider
            && let Err(error) = meter_provider.shutdown()
        {
            tracing::debug!(%error, "metrics shutdown");
        }
        if let Some(tracer_provider) = self.tracer_provider
            && let Err(error) = tracer_provider.shutdown()
        {
            tracing::debug!(%error, "tracer shutdown");
        }
    }
}

/// Installs the global `tracing` subscriber and the metric and span
/// exporters. `default_filter` applies when `RUST_LOG` is unset. Must run
/// inside a tokio runtime (the OTLP exporters use it).
pub fn init(
    format: LogFormat,
    default_filter: &str,
    exports: Exports,
) -> Result<Telemetry, Box<dyn Error + Send + Sync>> {
    let resource = resource();
    let mut meter_provider = SdkMeterProvider::builder().with_resource(resource.clone());
    let mut registry = None;
    if exports.prometheus {
        let prometheus = prometheus::Registry::new();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(prometheus.clone())
            .scope_info_enabled(false)
            .build()?;
        meter_provider = meter_provider.with_reader(exporter);
        registry = Some(prometheus);
    }
    let otlp_metrics = exports.otlp && otlp_configured("METRICS");
    if otlp_metrics {
        let exporter = opentelemetry_otlp::MetricExporter::builder()
            .with_tonic()
            .build()?;
        meter_provider = meter_provider.with_periodic_exporter(exporter);
    }
    let tracer_provider = if exports.otlp && otlp_configured("TRACES") {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()?;
        Some(
            SdkTracerProvider::builder()
                .with_resource(resource)
                .with_batch_exporter(exporter)
                .build(),
        )
    } else {
        None
    };

    // aws-sigv4 traces the request it signs and its canonical form, session
    // token included: never shown, whatever RUST_LOG says (a more specific
    // target or a span directive would get past an `aws_sigv4=off`
    // directive, so the target is dropped by a filter of its own). Both
    // decide per callsite, so a disabled span still costs nothing.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(default_filter))
        .and(silenced_targets());
    let json = match format {
        LogFormat::Auto => !std::io::stderr().is_terminal(),
        LogFormat::Text => false,
        LogFormat::Json => true,
    };
    // Each layer has its own filter: the logs follow RUST_LOG, and the span
    // exporter takes the broker's spans (debug level) only when OTLP is on.
    // With neither interested, a span callsite is disabled and costs nothing
    // on the request path.
    let logs = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .with_filter(filter)
            .boxed()
    };
    let spans = tracer_provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("tokenbroker"))
            .with_filter(Targets::new().with_target("tokenbroker", Level::DEBUG))
    });
    tracing_subscriber::registry()
        .with(logs)
        .with(spans)
        .try_init()?;
    if otlp_metrics || tracer_provider.is_some() {
        tracing::info!(
            metrics = otlp_metrics,
            traces = tracer_provider.is_some(),
            "exporting over OTLP"
        );
    }
    Ok(Telemetry {
        meter_provider: (registry.is_some() || otlp_metrics).then(|| meter_provider.build()),
        tracer_provider,
        registry,
    })
}

/// `service.name` is `tokenbroker` unless `OTEL_SERVICE_NAME` or
/// `OTEL_RESOURCE_ATTRIBUTES` say otherwise.
fn resource() -> Resource {
    let named = std::env::var_os("OTEL_SERVICE_NAME").is_some()
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|a| a.contains("service.name="));
    let builder = Resource::builder();
    if named {
        builder.build()
    } else {
        builder.with_service_name("tokenbroker").build()
    }
}

/// Whether the environment names an OTLP endpoint for `signal` (`METRICS`
/// or `TRACES`), and the SDK is not disabled.
fn otlp_configured(signal: &str) -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    !disabled
        && (set("OTEL_EXPORTER_OTLP_ENDPOINT")
            || set(&format!("OTEL_EXPORTER_OTLP_{signal}_ENDPOINT")))
}

/// A repeated warning (failed accepts, refused connections, denials) is
/// logged at most this often, with the count since the last one.
pub const LOG_EVERY: Duration = Duration::from_secs(1);

/// A warning logged at most once per interval ([`LOG_EVERY`] by default),
/// with how many times it happened since it was last logged. Between two
/// warnings an occurrence costs two atomic operations, no lock: callers
/// count on every request thread.
pub struct RateLimitedLog {
    every: Duration,
    origin: Instant,
    /// When the next warning may be logged, in milliseconds since `origin`.
    next_ms: AtomicU64,
    state: Mutex<Option<Instant>>,
    since: AtomicU64,
}

impl Default for RateLimitedLog {
    fn default() -> Self {
        Self::every(LOG_EVERY)
    }
}

impl RateLimitedLog {
    /// A warning logged at most once per `every`.
    pub fn every(every: Duration) -> Self {
        Self {
            every,
            origin: Instant::now(),
            next_ms: AtomicU64::new(0),
            state: Mutex::new(None),
            since: AtomicU64::new(0),
        }
    }

    /// Counts one occurrence, and calls `log` with the count if the last
    /// warning is old enough.
    pub fn warn(&self, log: impl FnOnce(u64)) {
        self.warn_many(1, log);
    }

    /// Counts `occurrences`, and calls `log` with the count since the last
    /// warning if that one is old enough.
    pub fn warn_many(&self, occurrences: u64, log: impl FnOnce(u64)) {
        let count = self.since.fetch_add(occurrences, Ordering::Relaxed) + occurrences;
        let now = Instant::now();
        if self.millis(now) < self.next_ms.load(Ordering::Relaxed) {
            return;
        }
        let mut last = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|at| now < at + self.every) {
            return;
        }
        *last = Some(now);
        self.next_ms
            .store(self.millis(now + self.every), Ordering::Relaxed);
        self.since.fetch_sub(count, Ordering::Relaxed);
        drop(last);
        log(count);
    }

    /// `at`, in whole milliseconds since `origin`, rounded down: the fast
    /// path lets through at most one millisecond early, and the lock then
    /// decides exactly.
    fn millis(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.origin).as_millis() as u64
    }
}

/// What never reaches the logs: `aws_sigv4`, which logs what it signs,
/// secrets included. Everything else is left to `RUST_LOG`.
fn silenced_targets() -> Targets {
    Targets::new()
        .with_default(LevelFilter::TRACE)
        .with_target("aws_sigv4", LevelFilter::OFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn repeated_warnings_are_logged_once_a_second_with_a_count() {
        let log = RateLimitedLog::default();
        let mut logged = Vec::new();
        for _ in 0..1000 {
            log.warn(|count| logged.push(count));
        }
        tokio::time::advance(LOG_EVERY).await;
        log.warn(|count| logged.push(count));
        assert_eq!(logged, [1, 1000]);
    }

    #[tokio::test(start_paused = true)]
    async fn many_occurrences_at_once_are_counted_at_their_own_interval() {
        let log = RateLimitedLog::every(Duration::from_secs(10));
        let mut logged = Vec::new();
        log.warn_many(5, |count| logged.push(count));
        log.warn_many(7, |count| logged.push(count));
        tokio::time::advance(Duration::from_secs(9)).await;
        log.warn_many(1, |count| logged.push(count));
        tokio::time::advance(Duration::from_secs(1)).await;
        log.warn_many(2, |count| logged.push(count));
        assert_eq!(logged, [5, 10]);
    }
}
