//! A typed Rust client for a running broker.
//!
//! ```no_run
//! # async fn example() -> Result<(), tokenbroker::client::ClientError> {
//! use futures_util::StreamExt;
//! use tokenbroker::client::Client;
//! use tokenbroker::proto::v1::GetIdTokenRequest;
//!
//! let mut broker = Client::connect(tokenbroker::client::socket_path()).await?;
//! let request = GetIdTokenRequest {
//!     audience: "https://my-service-abc123-uc.a.run.app".into(),
//!     ..Default::default()
//! };
//! let token = broker.id_token(request.clone()).await?;
//! // Send `Authorization: Bearer {token.token}` to the service.
//!
//! // Or follow the token: the current one at once, then every refresh,
//! // subscribing again by itself if the broker restarts.
//! let mut tokens = broker.watch_resilient(request);
//! while let Some(token) = tokens.next().await {
//!     let token = token?;
//!     // use token.secret()
//! #   let _ = token;
//! }
//! # Ok(()) }
//! ```
//!
//! [`connect`] returns the bare generated client, for every RPC as is.

pub mod cli;
pub mod helpers;
mod resilient;

pub use resilient::{Backoff, is_transient};

use std::path::{Path, PathBuf};

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use tonic::transport::{Channel, Endpoint};

use crate::proto::v1 as pb;
use crate::proto::v1::token_broker_client::TokenBrokerClient;
use crate::socket::DEFAULT_SOCKET;

/// The environment variable clients (and `serve`) read the socket path from.
pub const SOCKET_ENV: &str = "TOKENBROKER_SOCKET";

/// Where clients find the broker: `$TOKENBROKER_SOCKET` if set and not
/// empty, else `/run/tokenbroker/tokenbroker.sock`.
pub fn socket_path() -> PathBuf {
    socket_path_from(std::env::var_os(SOCKET_ENV))
}

fn socket_path_from(env: Option<std::ffi::OsString>) -> PathBuf {
    env.filter(|path| !path.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_SOCKET), PathBuf::from)
}

/// Connects to the broker listening on `socket`: the generated client.
pub async fn connect(
    socket: impl AsRef<Path>,
) -> Result<TokenBrokerClient<Channel>, tonic::transport::Error> {
    let endpoint = Endpoint::from_shared(format!("unix://{}", socket.as_ref().display()))?;
    Ok(TokenBrokerClient::new(endpoint.connect().await?))
}

/// Why a call to the broker failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answered on the socket.
    #[error(
        "cannot connect to the broker at {}: {source}; is `tokenbroker serve` running there? (set --socket or TOKENBROKER_SOCKET)",
        socket.display()
    )]
    Connect {
        /// The socket tried.
        socket: PathBuf,
        /// Why the connection failed.
        source: tonic::transport::Error,
    },
    /// The broker answered with an error status.
    #[error("{:?}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    /// A watch stream sent a message without a token (a broken broker).
    #[error("the broker sent a watch message without a token")]
    EmptyMessage,
}

impl ClientError {
    /// The gRPC status the broker answered with, if it answered.
    pub fn status(&self) -> Option<&tonic::Status> {
        match self {
            Self::Status(status) => Some(status),
            Self::Connect { .. } | Self::EmptyMessage => None,
        }
    }
}

/// The tokens of a [`Client::watch`], each as soon as the broker has it.
pub type TokenStream = BoxStream<'static, Result<pb::token::Token, ClientError>>;

/// A connection to a broker, with one typed method per RPC.
#[derive(Clone, Debug)]
pub struct Client {
    inner: TokenBrokerClient<Channel>,
}

impl Client {
    /// Connects to the broker listening on `socket`.
    pub async fn connect(socket: impl AsRef<Path>) -> Result<Self, ClientError> {
        let socket = socket.as_ref();
        let inner = connect(socket)
            .await
            .map_err(|source| ClientError::Connect {
                socket: socket.to_path_buf(),
                source,
            })?;
        Ok(Self { inner })
    }

    /// An access token (`GetAccessToken`).
    pub async fn access_token(
        &mut self,
        request: pb::GetAccessTokenRequest,
    ) -> Result<pb::AccessToken, ClientError> {
        Ok(self.inner.get_access_token(request).await?.into_inner())
    }

    /// An ID token (`GetIdToken`).
    pub async fn id_token(
        &mut self,
        request: pb::GetIdTokenRequest,
    ) -> Result<pb::IdToken, ClientError> {
        Ok(self.inner.get_id_token(request).await?.into_inner())
    }

    /// Follows a token (`WatchToken`): the stream yields the current token
    /// at once, then every refreshed one; it ends with an error when the
    /// broker stops or the token expires unreplaced.
    pub async fn watch(
        &mut self,
        request: impl Into<pb::watch_token_request::Request>,
    ) -> Result<TokenStream, ClientError> {
        let request = pb::WatchTokenRequest {
            request: Some(request.into()),
        };
        let stream = self.inner.watch_token(request).await?.into_inner();
        Ok(stream
            .map(|message| message?.token.ok_or(ClientError::EmptyMessage))
            .boxed())
    }

    /// Follows a token like [`Client::watch`], but rides through broker
    /// restarts: when the stream ends or the connection drops it subscribes
    /// again after a jittered [`Backoff`] (50 ms doubling to 5 s), for as
    /// long as it takes. It never yields an expired token. It yields an
    /// error, and ends, only when the broker refuses the request itself
    /// (see [`is_transient`]), e.g. `INVALID_ARGUMENT` or
    /// `PERMISSION_DENIED`.
    pub fn watch_resilient(
        &self,
        request: impl Into<pb::watch_token_request::Request>,
    ) -> TokenStream {
        self.watch_resilient_with(request, Backoff::default())
    }

    /// [`Client::watch_resilient`] with its own backoff.
    pub fn watch_resilient_with(
        &self,
        request: impl Into<pb::watch_token_request::Request>,
        backoff: Backoff,
    ) -> TokenStream {
        let request = pb::WatchTokenRequest {
            request: Some(request.into()),
        };
        resilient::watch(self.inner.clone(), request, backoff)
    }

    /// The generated client underneath.
    pub fn into_inner(self) -> TokenBrokerClient<Channel> {
        self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_is_the_environments_else_the_default() {
        assert_eq!(socket_path_from(None), PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(
            socket_path_from(Some("".into())),
            PathBuf::from(DEFAULT_SOCKET)
        );
        assert_eq!(
            socket_path_from(Some("/tmp/b.sock".into())),
            PathBuf::from("/tmp/b.sock")
        );
    }
}
