//! The `tokenbroker` binary: parses the command line and runs a subcommand.

use std::process::ExitCode;

use clap::Parser;
use tokenbroker::app;
use tokenbroker::config::{Cli, Command};
use tokenbroker::telemetry;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_log = match cli.command {
        Command::Serve(_) | Command::Emulator(_) => "info",
        Command::PrintAccessToken(_) | Command::PrintIdentityToken(_) => "warn",
    };
    telemetry::init_logging(default_log);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("tokenbroker: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => app::serve(args).await,
            Command::Emulator(args) => app::emulator(args).await,
            Command::PrintAccessToken(args) => app::print_access_token(args).await,
            Command::PrintIdentityToken(args) => app::print_identity_token(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tokenbroker: {error}");
            ExitCode::FAILURE
        }
    }
}
