//! tokenbroker: one shared, always-fresh cache of Google Cloud access and ID
//! tokens for every process on a machine, served over gRPC on a Unix socket.
//!
//! The binary (`src/main.rs`) parses the command line and calls [`app`].
//! Requests come in through the front doors (`grpc`, `metadata_endpoint`,
//! `sink`), meet one broker core (`broker`: policy, `cache`, metrics), and
//! reach Google through `upstream` and `sources`. docs/architecture.md maps
//! every module and follows one request through them.
//!
//! The library exports what the binary, the tests and Rust users need: the
//! [`client`], the generated [`proto`], the metadata server [`emulator`],
//! and the [`config`] types with the [`app`] that runs them.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub(crate) mod admin;
pub mod app;
pub(crate) mod audit;
pub(crate) mod broker;
pub(crate) mod cache;
pub mod client;
pub mod config;
pub(crate) mod connections;
pub mod emulator;
pub(crate) mod error;
pub(crate) mod grpc;
pub(crate) mod hardening;
pub(crate) mod metadata_endpoint;
pub(crate) mod peer;
pub(crate) mod permissions;
pub(crate) mod policy;
pub mod proto;
pub(crate) mod quota;
pub(crate) mod request;
pub(crate) mod schedule;
pub(crate) mod secret;
pub(crate) mod sink;
pub(crate) mod socket;
pub(crate) mod sources;
pub mod systemd;
pub mod telemetry;
pub(crate) mod token;
pub(crate) mod upstream;
pub(crate) mod workload;
