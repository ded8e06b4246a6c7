//! The integration tests, in one binary: the `tokenbroker` binary (and the
//! library's client and emulator) end to end, one module per concern, with
//! the harness in [`common`]. Run one concern with
//! `cargo test --test it <module>::`.

mod common;

mod audit;
mod authority;
mod bounds;
mod broker;
mod cli;
mod client;
mod client_libraries;
mod config_file;
mod deploy;
mod docs;
mod downscope;
mod emulator;
mod examples;
mod fair_share;
mod faults;
mod federation;
mod hardening;
mod helpers;
mod invalidate;
mod lifecycle;
mod limits;
mod metadata_endpoint;
mod observability;
mod polyglot;
mod proxy;
mod restart;
mod security;
mod sinks;
mod soak;
mod sources;
mod systemd;
mod workload;
