//! tokenbroker: one shared, always-fresh cache of Google Cloud access and ID
//! tokens for every process on a machine, served over gRPC on a Unix socket.
//!
//! The binary (`src/main.rs`) only parses the command line; [`app`] wires:
//! - [`request`]: validates requests into exact cache keys,
//! - [`cache`]: shares, coalesces and refreshes tokens, within per-uid
//!   key quotas ([`key_quota`]),
//! - [`metadata`], [`keyfile`]: fetch them from the GCE metadata server or
//!   with a service-account key ([`credentials`] reads key files, [`https`]
//!   talks TLS to Google), with gcloud's user credentials ([`adc`], which
//!   also finds credentials) or by impersonation ([`impersonate`]);
//!   [`sources`] chooses one,
//! - [`service`], [`server`], [`socket`]: gRPC on a Unix socket, which
//!   accepts any `:authority` (`authority`),
//! - [`emulator`]: stands in for the metadata server off Google Cloud,
//! - [`config`], [`config_file`]: the command line and `serve --config`,
//! - [`sink`]: tokens kept written to files,
//! - [`systemd`]: socket activation and readiness notification,
//! - [`hardening`]: no core dumps, unless `--allow-core-dumps`,
//! - [`client`], [`cli`]: a typed Rust client and `tokenbroker token`,
//! - [`metrics`], [`health`], [`admin`], [`telemetry`]: what operators see.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod app;
pub mod broker;
pub mod cache;
pub mod client;
pub mod config;
pub mod connections;
pub mod emulator;
pub mod error;
pub mod grpc;
pub mod hardening;
pub mod metadata_endpoint;
pub mod permissions;
pub mod policy;
pub mod proto;
pub mod quota;
pub mod request;
pub mod schedule;
pub mod secret;
pub mod sink;
pub mod socket;
pub mod sources;
pub mod systemd;
pub mod telemetry;
pub mod token;
pub mod upstream;
