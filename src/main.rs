//! The `tokenbroker` binary: parses the command line and runs a subcommand.

use std::process::ExitCode;

use tokenbroker::app;
use tokenbroker::client::cli::{self, CliError, EXIT_USAGE};
use tokenbroker::client::helpers::{docker, docker_config, git, kubectl};
use tokenbroker::config::file::{self as config_file, ParseError};
use tokenbroker::config::{Cli, Command, HelperCommand, TokenCommand};
use tokenbroker::systemd::{self, Activation};
use tokenbroker::telemetry::{self, Exports};

fn main() -> ExitCode {
    // Run as docker-credential-tokenbroker (a link), it is docker's helper.
    let args = docker::as_helper_args(std::env::args_os().collect());
    let cli = match config_file::parse(args) {
        Ok(cli) => cli,
        Err(ParseError::Usage(error)) => error.exit(),
        Err(ParseError::ConfigFile(error)) => {
            eprintln!("tokenbroker: {error}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    // Before the runtime's threads exist: this clears LISTEN_* variables.
    let activation = match &cli.command {
        Command::Serve(_) => match systemd::take_activated_listener() {
            Ok(activation) => activation,
            Err(error) => {
                eprintln!("tokenbroker: {error}");
                return ExitCode::FAILURE;
            }
        },
        _ => Activation::None,
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("tokenbroker: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(cli, activation))
}

async fn run(cli: Cli, activation: Activation) -> ExitCode {
    let (default_log, exports) = match &cli.command {
        Command::Serve(args) => (
            "info",
            Exports {
                prometheus: args.metrics_addr.is_some(),
                otlp: true,
            },
        ),
        Command::Emulator(_) => ("info", Exports::default()),
        Command::Token(_)
        | Command::PrintAccessToken(_)
        | Command::PrintIdentityToken(_)
        | Command::CredentialHelper(_)
        | Command::ConfigureDocker(_) => ("warn", Exports::default()),
    };
    let telemetry = match telemetry::init(cli.log_format, default_log, exports) {
        Ok(telemetry) => telemetry,
        Err(error) => {
            eprintln!("tokenbroker: {error}");
            return ExitCode::FAILURE;
        }
    };
    // A panicking task must not vanish silently: log it (the runtime keeps
    // the process and the other tasks going).
    std::panic::set_hook(Box::new(|panic| {
        tracing::error!(%panic, "panic");
    }));
    let client_result = |result: Result<(), CliError>| match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tokenbroker: {error}");
            error.exit_code()
        }
    };
    let code = match cli.command {
        Command::Serve(args) => app_result(app::serve(args, activation, &telemetry).await),
        Command::Emulator(args) => app_result(app::emulator(args).await),
        Command::Token(TokenCommand::Access(args)) | Command::PrintAccessToken(args) => {
            client_result(cli::access_token(args).await)
        }
        Command::Token(TokenCommand::Id(args)) | Command::PrintIdentityToken(args) => {
            client_result(cli::id_token(args).await)
        }
        Command::CredentialHelper(HelperCommand::Docker(args)) => {
            client_result(docker::run(args).await)
        }
        Command::CredentialHelper(HelperCommand::Git(args)) => client_result(git::run(args).await),
        Command::CredentialHelper(HelperCommand::Kubectl(args)) => {
            client_result(kubectl::run(args).await)
        }
        Command::ConfigureDocker(args) => client_result(docker_config::run(args)),
    };
    telemetry.shutdown();
    code
}

fn app_result(result: app::AppResult) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tokenbroker: {error}");
            ExitCode::FAILURE
        }
    }
}
