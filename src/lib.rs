//! tokenbroker: one shared, always-fresh cache of Google Cloud access and ID
//! tokens for every process on a machine, served over gRPC on a Unix socket.
//!
//! The binary (`src/main.rs`) only wires these modules together:
//! - [`request`] validates requests into cache keys,
//! - [`cache`] shares, coalesces and refreshes tokens,
//! - [`metadata`] fetches them from the GCE metadata server,
//! - [`service`] and [`server`] expose them over gRPC on a Unix socket,
//! - [`emulator`] stands in for the metadata server off Google Cloud.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cache;
pub mod error;
pub mod jwt;
pub mod metadata;
pub mod proto;
pub mod request;
pub mod schedule;
pub mod secret;
pub mod token;
pub mod upstream;
