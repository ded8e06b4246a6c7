//! Runs the gRPC server on the broker's socket until shutdown, then ends
//! watch streams, lets in-flight calls finish within a grace period, and
//! removes the socket.

use std::future::Future;
use std::time::Duration;

use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;

use crate::cache::TokenCache;
use crate::proto::v1::token_broker_server::TokenBrokerServer;
use crate::service::BrokerService;
use crate::socket::BoundSocket;

/// Default time in-flight calls get to finish after a shutdown signal (5 s).
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serves the broker on `socket` until `shutdown` completes.
///
/// On shutdown the listener stops accepting, every watch stream ends with
/// `UNAVAILABLE` ("broker shutting down"), unary calls in flight get `grace`
/// to finish, and the socket file is removed.
pub async fn serve(
    socket: BoundSocket,
    cache: TokenCache,
    shutdown: impl Future<Output = ()> + Send,
    grace: Duration,
) -> Result<(), tonic::transport::Error> {
    let BoundSocket { listener, owner } = socket;
    let stopping = CancellationToken::new();
    let service = BrokerService::new(cache, stopping.clone());
    let signal = {
        let stopping = stopping.clone();
        async move {
            shutdown.await;
            tracing::info!("shutting down: no new connections, ending watch streams");
            stopping.cancel();
        }
    };
    let server = Server::builder()
        .add_service(TokenBrokerServer::new(service))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), signal);
    tracing::info!(socket = %owner.path().display(), "tokenbroker ready");
    let result = tokio::select! {
        result = server => result,
        () = async { stopping.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(?grace, "calls still in flight after the shutdown grace period; exiting anyway");
            Ok(())
        }
    };
    drop(owner);
    tracing::info!("stopped");
    result
}
