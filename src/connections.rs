//! Bounds on the connections local processes hold open, so that no one of
//! them can take the broker's file descriptors from the others: a cap per
//! listener, a cap per peer uid, and a budget for all of them below the
//! process's descriptor limit; and accept loops that back off when accept
//! fails instead of spinning.
//!
//! A connection over a bound is accepted and closed at once, so the
//! listener never stops accepting, and counted in
//! `tokenbroker_connections_refused_total{listener}`.

/// Implements `AsyncWrite` for a connection wrapper `$wrapper<IO>` by
/// passing every write to its `io` field: the wrappers of accepted
/// connections (idle closing, `:authority` rewriting) only look at what
/// the client sends.
macro_rules! write_through {
    ($wrapper:ident) => {
        impl<IO: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for $wrapper<IO> {
            fn poll_write(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
            }

            fn poll_write_vectored(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.io.is_write_vectored()
            }

            fn poll_flush(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.io).poll_flush(cx)
            }

            fn poll_shutdown(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
            }
        }
    };
}
pub(crate) use write_through;

pub mod credentials;
pub mod idle;

use std::future::poll_fn;
use std::io;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Meter, UpDownCounter};

use crate::telemetry::RateLimitedLog;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::peer::Holder;
use crate::quota::{Exceeded, Quota, QuotaPermit};

/// Default most connections to the gRPC socket at once (4 096).
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Default most connections one peer uid holds to a listener (256).
pub const DEFAULT_MAX_CONNECTIONS_PER_UID: usize = 256;
/// Default most connections to the metadata-compatible endpoint (512).
pub const DEFAULT_METADATA_MAX_CONNECTIONS: usize = 512;
/// Most connections to the metrics listener (64): scrapers and probes.
pub const METRICS_MAX_CONNECTIONS: usize = 64;
/// Descriptors kept back from client connections for everything else the
/// broker opens: the log, sinks, listeners, and its own upstream
/// connections (which have their own bounds, added to this at start).
pub const DESCRIPTOR_RESERVE: usize = 64;
/// First pause after a failed accept; it doubles up to
/// [`MAX_ACCEPT_BACKOFF`] while accept keeps failing.
const FIRST_ACCEPT_BACKOFF: Duration = Duration::from_millis(1);
/// Longest pause after failed accepts (1 s).
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// A listener, as the `listener` label names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Listener {
    /// The broker's gRPC socket.
    Grpc,
    /// The metadata-compatible endpoint (`--metadata-addr`).
    Metadata,
    /// The operators' listener (`--metrics-addr`).
    Metrics,
}

impl Listener {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Grpc => "grpc",
            Self::Metadata => "metadata",
            Self::Metrics => "metrics",
        }
    }

    /// The `listener` label of its metrics.
    fn label(self) -> [KeyValue; 1] {
        [KeyValue::new("listener", self.as_str())]
    }
}

/// The descriptor limit, after [`raise_descriptor_limit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DescriptorLimit {
    /// The hard limit, which the soft limit the broker runs with now equals.
    pub hard: u64,
    /// The soft limit the broker was started with.
    pub initial_soft: u64,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, so that the bounds
/// below have the most room systemd or the shell allows.
pub fn raise_descriptor_limit() -> io::Result<DescriptorLimit> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(io::Error::from)?;
    }
    Ok(DescriptorLimit {
        hard,
        initial_soft: soft,
    })
}

/// Connections of every listener share one budget, the descriptor limit
/// less what the broker keeps for itself; each listener has its own cap and
/// per-uid cap within it. Cloning shares the counts.
#[derive(Clone)]
pub struct ConnectionLimits {
    budget: Quota,
    budget_size: usize,
    instruments: Arc<Instruments>,
}

struct Instruments {
    refused: Counter<u64>,
    open: UpDownCounter<i64>,
}

/// A listener's bounds within [`ConnectionLimits`].
#[derive(Clone)]
pub struct ListenerLimits {
    listener: Listener,
    budget: Quota,
    own: Quota,
    instruments: Arc<Instruments>,
    refusals: Arc<RateLimitedLog>,
}

/// Why a connection was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The budget shared by all listeners is spent.
    Budget(usize),
    /// The listener's own cap.
    Listener(usize),
    /// The cap of the peer's uid (or pod) on this listener.
    Holder(Holder, usize),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Budget(n) => write!(
                f,
                "all {n} client connections the descriptor limit allows are open"
            ),
            Self::Listener(n) => write!(f, "the listener's {n} connections are open"),
            Self::Holder(Holder::Uid(uid), n) => write!(f, "uid {uid} holds its {n} connections"),
            Self::Holder(Holder::Pod(pod), n) => write!(f, "pod {pod} holds its {n} connections"),
            Self::Holder(Holder::Unknown, n) => {
                write!(
                    f,
                    "peers whose pod cannot be told hold their {n} connections"
                )
            }
        }
    }
}

impl ConnectionLimits {
    /// Limits whose listeners share `budget` connections; counted on `meter`.
    pub fn new(budget: usize, meter: &Meter) -> Self {
        Self {
            budget: Quota::total(budget),
            budget_size: budget,
            instruments: Arc::new(Instruments {
                refused: meter
                    .u64_counter("tokenbroker.connections_refused")
                    .with_description(
                        "Connections closed at once because a connection bound was reached, by listener.",
                    )
                    .build(),
                open: meter
                    .i64_up_down_counter("tokenbroker.open_connections")
                    .with_description("Open client connections by listener.")
                    .build(),
            }),
        }
    }

    /// The budget for client connections given the descriptor limit and the
    /// descriptors the broker's own upstream connections may take.
    pub fn budget_for(limit: DescriptorLimit, upstream: usize) -> usize {
        (limit.hard as usize)
            .saturating_sub(DESCRIPTOR_RESERVE + upstream)
            .max(1)
    }

    /// The connections all listeners may hold together.
    pub fn budget(&self) -> usize {
        self.budget_size
    }

    /// Bounds for `listener`: at most `max` connections, and `max_per_uid`
    /// for any one peer uid when the listener knows uids.
    pub fn listener(
        &self,
        listener: Listener,
        max: usize,
        max_per_uid: Option<usize>,
    ) -> ListenerLimits {
        ListenerLimits {
            listener,
            budget: self.budget.clone(),
            own: Quota::new(max, max_per_uid.unwrap_or(usize::MAX)),
            instruments: self.instruments.clone(),
            refusals: Arc::new(RateLimitedLog::default()),
        }
    }
}

impl ListenerLimits {
    /// Admits a new connection from `holder` (its uid and pod, if known),
    /// or counts and logs its refusal. The permit frees the place when
    /// dropped.
    pub fn admit(&self, holder: Option<Holder>) -> Option<ConnectionPermit> {
        match self.try_admit(holder) {
            Ok(permit) => Some(permit),
            Err(refused) => {
                self.instruments.refused.add(1, &self.listener.label());
                self.refusals.warn(|count| {
                    tracing::warn!(
                        listener = self.listener.as_str(),
                        reason = %refused,
                        refused = count,
                        "connections refused: closed at once"
                    )
                });
                None
            }
        }
    }

    /// A permit, counted in the open-connections gauge until dropped.
    fn try_admit(&self, holder: Option<Holder>) -> Result<ConnectionPermit, Refused> {
        let own = self
            .own
            .acquire(holder)
            .map_err(|exceeded| match exceeded {
                Exceeded::Total(max) => Refused::Listener(max),
                Exceeded::Holder(holder, max) => Refused::Holder(holder, max),
            })?;
        let budget = self
            .budget
            .acquire(None)
            .map_err(|(Exceeded::Total(size) | Exceeded::Holder(_, size))| Refused::Budget(size))?;
        self.instruments.open.add(1, &self.listener.label());
        Ok(ConnectionPermit {
            _places: (own, budget),
            open: self.instruments.clone(),
            listener: self.listener,
        })
    }
}

/// One admitted connection; dropping it frees its places.
pub struct ConnectionPermit {
    _places: (QuotaPermit, QuotaPermit),
    open: Arc<Instruments>,
    listener: Listener,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.open.open.add(-1, &self.listener.label());
    }
}

/// Longest an HTTP/1 client may take to send a request's headers (10 s),
/// counted from the connection's start or the end of its previous request:
/// a connection that sends nothing is closed by then.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves one HTTP/1 connection with `service` in a task of `tasks`, until
/// the connection ends; once `drain` is cancelled it finishes the request in
/// flight and closes. The connection's place (`permit`) is held as long.
pub fn spawn_http1<S, Svc>(
    stream: S,
    service: Svc,
    permit: ConnectionPermit,
    drain: &CancellationToken,
    tasks: &TaskTracker,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    Svc: hyper::service::HttpService<hyper::body::Incoming> + Send + 'static,
    Svc::Future: Send + 'static,
    Svc::ResBody: Send + 'static,
    <Svc::ResBody as http_body::Body>::Data: Send,
    <Svc::ResBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let drain = drain.clone();
    tasks.spawn(async move {
        let _permit = permit;
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
        tokio::pin!(connection);
        tokio::select! {
            _ = connection.as_mut() => return,
            () = drain.cancelled() => connection.as_mut().graceful_shutdown(),
        }
        let _ = connection.await;
    });
}

/// A listener whose connections can be accepted.
pub trait Accept {
    /// An accepted connection.
    type Stream;
    /// Polls for the next connection.
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<Self::Stream>>;
}

impl Accept for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<Self::Stream>> {
        tokio::net::UnixListener::poll_accept(self, cx).map_ok(|(stream, _)| stream)
    }
}

impl Accept for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<Self::Stream>> {
        tokio::net::TcpListener::poll_accept(self, cx).map_ok(|(stream, _)| stream)
    }
}

/// Accepts connections; after a failed accept (typically out of file
/// descriptors) it pauses, 1 ms doubling to 1 s while failures go on, and
/// logs a warning at most once a second.
pub struct Acceptor {
    listener: &'static str,
    backoff: Duration,
    failures: RateLimitedLog,
}

impl Acceptor {
    /// An acceptor for the listener called `listener` (in its log lines).
    pub fn new(listener: &'static str) -> Self {
        Self {
            listener,
            backoff: FIRST_ACCEPT_BACKOFF,
            failures: RateLimitedLog::default(),
        }
    }

    /// The next connection on `socket`.
    pub async fn accept<L: Accept>(&mut self, socket: &L) -> L::Stream {
        loop {
            match poll_fn(|cx| socket.poll_accept(cx)).await {
                Ok(stream) => {
                    self.backoff = FIRST_ACCEPT_BACKOFF;
                    return stream;
                }
                Err(error) => {
                    self.failures.warn(|count| {
                        tracing::warn!(
                            listener = self.listener,
                            %error,
                            failures = count,
                            retry_in = ?self.backoff,
                            "accept failed"
                        )
                    });
                    tokio::time::sleep(self.backoff).await;
                    self.backoff = (self.backoff * 2).min(MAX_ACCEPT_BACKOFF);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use tokio::time::Instant;

    use super::*;
    use opentelemetry::metrics::MeterProvider;

    fn limits(budget: usize) -> ConnectionLimits {
        let meter = opentelemetry::metrics::NoopMeterProvider::new().meter("test");
        ConnectionLimits::new(budget, &meter)
    }

    #[test]
    fn a_uid_at_its_cap_leaves_room_for_others() {
        let limits = limits(100);
        let grpc = limits.listener(Listener::Grpc, 10, Some(3));
        let held: Vec<_> = (0..3)
            .map(|_| grpc.admit(Some(Holder::Uid(1000))).unwrap())
            .collect();
        assert_eq!(
            grpc.try_admit(Some(Holder::Uid(1000))).err(),
            Some(Refused::Holder(Holder::Uid(1000), 3))
        );
        let other = grpc
            .admit(Some(Holder::Uid(0)))
            .expect("another uid gets in");
        drop(held);
        assert!(
            grpc.admit(Some(Holder::Uid(1000))).is_some(),
            "places are freed on drop"
        );
        drop(other);
    }

    #[test]
    fn listener_caps_and_the_shared_budget_hold() {
        let limits = limits(5);
        let grpc = limits.listener(Listener::Grpc, 3, None);
        let metrics = limits.listener(Listener::Metrics, 10, None);
        let grpc_held: Vec<_> = (0..3).map(|_| grpc.admit(None).unwrap()).collect();
        assert_eq!(grpc.try_admit(None).err(), Some(Refused::Listener(3)));
        let metrics_held: Vec<_> = (0..2).map(|_| metrics.admit(None).unwrap()).collect();
        assert_eq!(metrics.try_admit(None).err(), Some(Refused::Budget(5)));
        drop((grpc_held, metrics_held));
        assert!(metrics.admit(None).is_some());
    }

    #[test]
    fn the_budget_keeps_the_reserve() {
        let limit = DescriptorLimit {
            hard: 1024,
            initial_soft: 1024,
        };
        assert_eq!(
            ConnectionLimits::budget_for(limit, 40),
            1024 - DESCRIPTOR_RESERVE - 40
        );
        let tiny = DescriptorLimit { hard: 10, ..limit };
        assert_eq!(ConnectionLimits::budget_for(tiny, 40), 1);
    }

    /// A listener whose accepts fail `failures` times, then succeed.
    struct Failing {
        failures: std::sync::atomic::AtomicUsize,
    }

    impl Accept for Failing {
        type Stream = ();
        fn poll_accept(&self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            let left = self.failures.load(Ordering::Relaxed);
            if left == 0 {
                return Poll::Ready(Ok(()));
            }
            self.failures.store(left - 1, Ordering::Relaxed);
            Poll::Ready(Err(io::Error::from_raw_os_error(24))) // EMFILE
        }
    }

    #[tokio::test(start_paused = true)]
    async fn failed_accepts_back_off_up_to_a_second() {
        let listener = Failing {
            failures: 14.into(),
        };
        let mut acceptor = Acceptor::new("test");
        let started = Instant::now();
        acceptor.accept(&listener).await;
        // 1 + 2 + ... + 512 ms, then 1 s four times.
        let expected = Duration::from_millis(1023) + 4 * MAX_ACCEPT_BACKOFF;
        assert_eq!(started.elapsed(), expected);
        assert_eq!(acceptor.backoff, FIRST_ACCEPT_BACKOFF, "reset on success");
    }
}
