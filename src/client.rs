//! Connecting to a running broker from Rust.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use tokenbroker::proto::v1::GetIdTokenRequest;
//!
//! let mut broker = tokenbroker::client::connect(tokenbroker::socket::default_socket_path()).await?;
//! let token = broker
//!     .get_id_token(GetIdTokenRequest {
//!         audience: "https://my-service-abc123-uc.a.run.app".into(),
//!         ..Default::default()
//!     })
//!     .await?
//!     .into_inner();
//! // Send `Authorization: Bearer {token.token}` to the service.
//! # Ok(()) }
//! ```

use std::path::Path;

use tonic::transport::{Channel, Endpoint};

use crate::proto::v1::token_broker_client::TokenBrokerClient;

/// Connects to the broker listening on `socket`.
pub async fn connect(
    socket: impl AsRef<Path>,
) -> Result<TokenBrokerClient<Channel>, tonic::transport::Error> {
    let endpoint = Endpoint::from_shared(format!("unix://{}", socket.as_ref().display()))?;
    Ok(TokenBrokerClient::new(endpoint.connect().await?))
}
