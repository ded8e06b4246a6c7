//! Runs the gRPC server on the broker's socket: the token service, gRPC
//! health and reflection. On shutdown it ends watch streams, lets in-flight
//! calls finish within a grace period, and removes the socket.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use std::sync::Arc;

use bytes::Bytes;
use http_body::Frame;
use http_body_util::BodyExt;
use http_body_util::combinators::MapFrame;
use tower::util::MapResponseLayer;

use crate::cache::TokenCache;
use crate::connections::idle::{ActivityLayer, IdleClose};
use crate::connections::{Acceptor, Listener, ListenerLimits};
use crate::grpc::authority::{self, AnyAuthority};
use crate::grpc::service::BrokerService;
use crate::policy::PolicyStore;
use crate::proto::v1::FILE_DESCRIPTOR_SET;
use crate::proto::v1::token_broker_server::TokenBrokerServer;
use crate::socket::BoundSocket;
use crate::telemetry::health::Health;
use crate::telemetry::metrics::Metrics;
use crate::upstream::limits::WatchLimits;

/// Default time in-flight calls get to finish after a shutdown signal (5 s).
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Largest request message accepted (16 KiB): the largest valid request
/// (32 scopes of 256 bytes, a 2 KiB audience) fits well within it.
pub const MAX_REQUEST_BYTES: usize = 16 * 1024;
/// Default most streams (calls) open at once on one connection (256);
/// beyond it a client's new stream is refused with `REFUSED_STREAM`.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 256;
/// Streams a client may reset before the server accepted them, per
/// connection (h2's default, 20): the defence against "Rapid Reset".
const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
/// Streams the server may reset for a client's protocol errors before it
/// closes the connection (hyper's default, 1 024; tonic turns the limit off
/// unless told): the defence against "MadeYouReset" (CVE-2025-8671).
const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;
/// How often an HTTP/2 ping checks that a client is alive (60 s), and how
/// long its answer may take (20 s); a client that does not answer is
/// disconnected.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// The parts of a broker the server exposes.
pub struct Broker {
    /// The shared token cache.
    pub cache: TokenCache,
    /// Where calls are counted.
    pub metrics: Metrics,
    /// What `grpc.health.v1.Health` reports.
    pub health: Health,
    /// Who may ask for which token.
    pub policy: Arc<PolicyStore>,
    /// Bounds on open watch streams.
    pub watch_limits: WatchLimits,
    /// Bounds on the socket's connections.
    pub connections: ListenerLimits,
    /// Most streams open at once on one connection.
    pub max_concurrent_streams: u32,
    /// Longest a connection may stay open with no call in flight.
    pub idle_timeout: Duration,
}

/// Serves the broker on `socket` until `shutdown` completes.
///
/// On shutdown the listener stops accepting, health turns NOT_SERVING, every
/// watch stream ends with `UNAVAILABLE` ("broker shutting down"), unary
/// calls in flight get `grace` to finish, and the socket file is removed.
pub async fn serve(
    socket: BoundSocket,
    broker: Broker,
    shutdown: impl Future<Output = ()> + Send,
    grace: Duration,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let BoundSocket { listener, owner } = socket;
    let stopping = CancellationToken::new();
    let service = BrokerService::new(
        broker.cache,
        broker.metrics,
        broker.policy,
        broker.watch_limits,
        stopping.clone(),
    );
    let service = TokenBrokerServer::new(service).max_decoding_message_size(MAX_REQUEST_BYTES);
    let (reporter, health_service) = tonic_health::server::health_reporter();
    tokio::spawn(publish_health(broker.health, reporter, stopping.clone()));
    // Both reflection versions: grpcurl speaks v1, while grpc_cli, Evans
    // and Python's grpcio-reflection client speak only v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let signal = {
        let stopping = stopping.clone();
        async move {
            shutdown.await;
            crate::systemd::notify_stopping();
            tracing::info!("shutting down: no new connections, ending watch streams");
            stopping.cancel();
        }
    };
    // Every client's `:authority` is accepted (see `authority`), and the
    // limits it enforces are the ones the server advertises.
    let connections = accept(listener, broker.connections, broker.idle_timeout);
    let server = Server::builder()
        .max_frame_size(authority::MAX_FRAME_SIZE as u32)
        .http2_max_header_list_size(authority::MAX_HEADER_LIST_SIZE as u32)
        .max_concurrent_streams(broker.max_concurrent_streams)
        .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_ACCEPT_RESET_STREAMS))
        .http2_max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESET_STREAMS))
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .layer(ActivityLayer)
        .layer(MapResponseLayer::new(oversized_is_resource_exhausted))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(service)
        .serve_with_incoming_shutdown(connections, signal);
    tracing::info!(socket = %owner.path().display(), "tokenbroker ready");
    crate::systemd::notify_ready();
    let result = tokio::select! {
        result = server => result,
        () = async { stopping.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(?grace, "calls still in flight after the shutdown grace period; exiting anyway");
            Ok(())
        }
    };
    drop(owner);
    tracing::info!("stopped");
    Ok(result?)
}

/// The socket's connections, within the connection bounds (a connection
/// over them is closed at once), each closed when idle and open to any
/// `:authority`. Failed accepts back off.
fn accept(
    listener: tokio::net::UnixListener,
    limits: ListenerLimits,
    idle_timeout: Duration,
) -> impl tokio_stream::Stream<Item = std::io::Result<AnyAuthority<IdleClose<tokio::net::UnixStream>>>>
{
    let acceptor = Acceptor::new(Listener::Grpc.as_str());
    futures_util::stream::unfold((listener, acceptor), move |(listener, mut acceptor)| {
        let limits = limits.clone();
        async move {
            loop {
                let stream = acceptor.accept(&listener).await;
                let peer = stream.peer_cred().ok();
                let Some(permit) = limits.admit(peer.map(|p| p.uid())) else {
                    continue;
                };
                let connection =
                    AnyAuthority::new(IdleClose::new(stream, permit, idle_timeout), peer);
                return Some((Ok(connection), (listener, acceptor)));
            }
        }
    })
}

/// Reports an oversized request as `RESOURCE_EXHAUSTED`, as gRPC specifies
/// for exceeded limits: tonic rejects it with `OUT_OF_RANGE` before any
/// handler runs, in the headers or the trailers, so the status is rewritten
/// here, at the edge.
fn oversized_is_resource_exhausted<B>(
    response: http::Response<B>,
) -> http::Response<MapFrame<B, RewriteFrame>>
where
    B: http_body::Body<Data = Bytes>,
{
    let (mut parts, body) = response.into_parts();
    rewrite_oversized_status(&mut parts.headers);
    http::Response::from_parts(parts, body.map_frame(rewrite_trailers as RewriteFrame))
}

type RewriteFrame = fn(Frame<Bytes>) -> Frame<Bytes>;

fn rewrite_trailers(frame: Frame<Bytes>) -> Frame<Bytes> {
    match frame.into_trailers() {
        Ok(mut trailers) => {
            rewrite_oversized_status(&mut trailers);
            Frame::trailers(trailers)
        }
        Err(frame) => frame,
    }
}

/// Rewrites tonic's status for an oversized message (its `grpc-message` is
/// percent-encoded, spaces included).
fn rewrite_oversized_status(headers: &mut http::HeaderMap) {
    let oversized = headers.get("grpc-status").is_some_and(|s| s == "11")
        && headers
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .is_some_and(|m| m.contains("message%20length%20too%20large"));
    if oversized {
        headers.insert("grpc-status", http::HeaderValue::from_static("8"));
    }
}

/// Mirrors [`Health`] into gRPC health, for the whole server ("") and the
/// token service, until shutdown turns both NOT_SERVING.
async fn publish_health(health: Health, reporter: HealthReporter, stopping: CancellationToken) {
    const SERVICE: &str = <TokenBrokerServer<BrokerService> as NamedService>::NAME;
    let mut serving = health.subscribe();
    loop {
        let status = if *serving.borrow_and_update() && !stopping.is_cancelled() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        reporter.set_service_status("", status).await;
        reporter.set_service_status(SERVICE, status).await;
        tokio::select! {
            changed = serving.changed() => if changed.is_err() { return },
            () = stopping.cancelled(), if !stopping.is_cancelled() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_tonics_oversize_status_is_rewritten() {
        let status = |code: &str, message: &str| {
            let mut headers = http::HeaderMap::new();
            headers.insert("grpc-status", code.parse().unwrap());
            headers.insert("grpc-message", message.parse().unwrap());
            rewrite_oversized_status(&mut headers);
            headers["grpc-status"].to_str().unwrap().to_string()
        };
        let oversized =
            "Error,%20decoded%20message%20length%20too%20large:%20found%2020484%20bytes";
        assert_eq!(status("11", oversized), "8");
        assert_eq!(status("11", "something%20else"), "11");
        assert_eq!(status("14", oversized), "14");
    }
}
