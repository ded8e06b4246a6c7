//! The gRPC front door: the `tokenbroker.v1.TokenBroker` service, gRPC
//! health and reflection, served on the broker's Unix socket to clients
//! that may send any `:authority`.

mod authority;
mod request;
pub mod server;
pub mod service;
