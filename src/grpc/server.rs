//! Runs the gRPC server on the broker's socket: the token service, gRPC
//! health and reflection, with the connection and HTTP/2 bounds. When the
//! broker drains it stops accepting, lets calls in flight finish, and
//! removes the socket.

use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;
use http_body_util::BodyExt;
use http_body_util::combinators::MapFrame;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tower::util::MapResponseLayer;

use crate::broker::Broker;
use crate::connections::idle::{ActivityLayer, IdleClose};
use crate::connections::{Acceptor, Listener, ListenerLimits, credentials};
use crate::grpc::authority::{self, AnyAuthority};
use crate::grpc::service::TokenBrokerService;
use crate::peer::{Locator, Peer};
use crate::proto::v1::FILE_DESCRIPTOR_SET;
use crate::proto::v1::token_broker_server::TokenBrokerServer;
use crate::socket::BoundSocket;
use crate::telemetry::health::Health;

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

/// How the server runs, besides the broker it serves.
pub struct ServerConfig {
    /// What `grpc.health.v1.Health` reports.
    pub health: Health,
    /// Bounds on the socket's connections.
    pub connections: ListenerLimits,
    /// Most streams open at once on one connection.
    pub max_concurrent_streams: u32,
    /// Longest a connection may stay open with no call in flight.
    pub idle_timeout: Duration,
    /// With workload identity, finds each peer's pod when it connects.
    pub locator: Option<Locator>,
}

/// Serves `broker` on `socket` until `drain` is cancelled, then until the
/// calls in flight have finished.
///
/// Once draining, the listener stops accepting; health already says
/// NOT_SERVING (the [`Health`] drains with the broker) and every watch
/// stream ends with `UNAVAILABLE` ("broker shutting down"). The socket file
/// is removed when this returns. The caller bounds the wait for calls in
/// flight with its shutdown grace.
pub async fn serve(
    socket: BoundSocket,
    broker: Broker,
    config: ServerConfig,
    drain: CancellationToken,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let BoundSocket { listener, owner } = socket;
    let service = TokenBrokerServer::new(TokenBrokerService::new(broker))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    let (reporter, health_service) = tonic_health::server::health_reporter();
    tokio::spawn(publish_health(config.health, reporter));
    // Both reflection versions: grpcurl speaks v1, while grpc_cli, Evans
    // and Python's grpcio-reflection client speak only v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    // Every client's `:authority` is accepted (see `authority`), and the
    // limits it enforces are the ones the server advertises.
    let connections = accept(
        listener,
        config.connections,
        config.idle_timeout,
        config.locator,
    );
    let server = Server::builder()
        .max_frame_size(authority::MAX_FRAME_SIZE as u32)
        .http2_max_header_list_size(authority::MAX_HEADER_LIST_SIZE as u32)
        .max_concurrent_streams(config.max_concurrent_streams)
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
        .serve_with_incoming_shutdown(connections, drain.cancelled_owned());
    tracing::info!(socket = %owner.path().display(), "tokenbroker ready");
    crate::systemd::notify_ready();
    let result = server.await;
    drop(owner);
    Ok(result?)
}

/// The socket's connections, within the connection bounds (a connection
/// over them is closed at once), each closed when idle and open to any
/// `:authority`. Failed accepts back off.
fn accept(
    listener: tokio::net::UnixListener,
    limits: ListenerLimits,
    idle_timeout: Duration,
    locator: Option<Locator>,
) -> impl tokio_stream::Stream<Item = std::io::Result<AnyAuthority<IdleClose<tokio::net::UnixStream>>>>
{
    let acceptor = Acceptor::new(Listener::Grpc.as_str());
    let state = (listener, acceptor, limits, locator);
    futures_util::stream::unfold(
        state,
        move |(listener, mut acceptor, limits, locator)| async move {
            loop {
                let stream = acceptor.accept(&listener).await;
                let peer = credentials::peer_of(&stream, locator.as_ref());
                let holder = peer.as_ref().map(Peer::holder);
                let Some(permit) = limits.admit(holder) else {
                    continue;
                };
                let idle = IdleClose::new(stream, peer, permit, idle_timeout);
                let connection = AnyAuthority::new(idle, peer);
                return Some((Ok(connection), (listener, acceptor, limits, locator)));
            }
        },
    )
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
/// token service (NOT_SERVING once the broker drains).
async fn publish_health(health: Health, reporter: HealthReporter) {
    const SERVICE: &str = <TokenBrokerServer<TokenBrokerService> as NamedService>::NAME;
    let mut serving = health.subscribe();
    loop {
        let status = if *serving.borrow_and_update() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        reporter.set_service_status("", status).await;
        reporter.set_service_status(SERVICE, status).await;
        if serving.changed().await.is_err() {
            return;
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
