//! The `tokenbroker` binary: parses the command line and runs a subcommand.

use std::process::ExitCode;

use clap::Parser;
use tokenbroker::app;
use tokenbroker::config::{Cli, Command};
use tokenbroker::telemetry::{self, Exports};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("tokenbroker: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let (default_log, exports) = match &cli.command {
            Command::Serve(args) => (
                "info",
                Exports {
                    prometheus: args.metrics_addr.is_some(),
                    otlp: true,
                },
            ),
            Command::Emulator(_) => ("info", Exports::default()),
            Command::PrintAccessToken(_) | Command::PrintIdentityToken(_) => {
                ("warn", Exports::default())
            }
        };
        let telemetry = telemetry::init(cli.log_format, default_log, exports)?;
        // A panicking task must not vanish silently: log it (the runtime
        // keeps the process and the other tasks going).
        std::panic::set_hook(Box::new(|panic| {
            tracing::error!(%panic, "panic");
        }));
        let result = match cli.command {
            Command::Serve(args) => app::serve(args, &telemetry).await,
            Command::Emulator(args) => app::emulator(args).await,
            Command::PrintAccessToken(args) => app::print_access_token(args).await,
            Command::PrintIdentityToken(args) => app::print_identity_token(args).await,
        };
        telemetry.shutdown();
        result
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tokenbroker: {error}");
            ExitCode::FAILURE
        }
    }
}
