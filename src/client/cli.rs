//! `tokenbroker token access|id`: print tokens from a running broker for
//! shell scripts, with an exit code per kind of failure.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::Args;
use futures_util::StreamExt;
use tonic::Code;

use crate::client::{Client, ClientError};
use crate::proto::v1 as pb;
use crate::request::boundary::AccessBoundary;
use crate::socket::DEFAULT_SOCKET;

/// Exit code of a command-line usage error (as clap uses).
pub const EXIT_USAGE: u8 = 2;
/// Exit code when nothing answers on the broker's socket.
pub const EXIT_CONNECT: u8 = 3;
/// Exit codes for an error status are this plus the gRPC code number.
pub const EXIT_STATUS_BASE: u8 = 10;

/// The exit codes, as `--help` shows them.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0   the token was printed (with --watch-once: the broker ended the stream cleanly)
  1   anything else (e.g. the output could not be written)
  2   usage error (bad flags)
  3   cannot connect to the broker's socket (not running, wrong --socket, no permission)
  10+N  the broker answered with gRPC status N:
        13 INVALID_ARGUMENT   a field was refused (e.g. a malformed scope or audience)
        15 NOT_FOUND          the metadata server does not know the service account
        17 PERMISSION_DENIED  the broker's access policy or the metadata server refused
        18 RESOURCE_EXHAUSTED a broker limit was hit
        24 UNAVAILABLE        no valid token could be had (metadata server down, broker stopping)
        14 DEADLINE_EXCEEDED  the call's deadline passed
        (others likewise: 10 + the status number)";

/// Why a `token` command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The flags make no sense together.
    #[error("{0}")]
    Usage(String),
    /// Talking to the broker failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The token could not be written to stdout.
    #[error("cannot write the token to stdout: {0}")]
    Output(io::Error),
    /// A credential helper's input (stdin, the environment) is malformed.
    #[error("{0}")]
    Input(String),
    /// A credential helper has nothing for what was asked (another host).
    #[error("{0}")]
    NotFound(String),
}

impl CliError {
    /// The process exit code for this failure (see [`EXIT_CODES_HELP`]).
    pub fn exit_code(&self) -> ExitCode {
        ExitCode::from(self.exit_code_number())
    }

    /// The exit code as a number.
    pub fn exit_code_number(&self) -> u8 {
        match self {
            Self::Usage(_) | Self::Input(_) => EXIT_USAGE,
            Self::Client(ClientError::Connect { .. }) => EXIT_CONNECT,
            Self::Client(ClientError::Status(status)) => status_exit_code(status.code()),
            Self::Client(ClientError::EmptyMessage) => status_exit_code(Code::Internal),
            Self::Output(_) | Self::NotFound(_) => 1,
        }
    }
}

/// `10 + N` for gRPC status `N` (`OK` never gets here; it counts as `UNKNOWN`).
pub fn status_exit_code(code: Code) -> u8 {
    let number = match code {
        Code::Ok => Code::Unknown as u8,
        other => other as u8,
    };
    EXIT_STATUS_BASE + number
}

/// `tokenbroker token access`.
pub async fn access_token(args: AccessTokenArgs) -> Result<(), CliError> {
    let access_boundary = match &args.boundary {
        Some(path) => boundary_rules(path)?,
        None => Vec::new(),
    };
    let request = pb::GetAccessTokenRequest {
        service_account: args.client.service_account.clone(),
        scopes: args.scopes,
        min_valid_for: min_valid_for(&args.client),
        access_boundary,
    };
    print_requested(&args.client, request.into()).await
}

/// Largest `--boundary` file read (64 KiB; ten rules fit in far less).
const MAX_BOUNDARY_FILE: u64 = 64 * 1024;

/// The rules of the boundary in `path` (Google's JSON), checked as the
/// broker checks them, so a bad file is a usage error.
fn boundary_rules(path: &Path) -> Result<Vec<pb::AccessBoundaryRule>, CliError> {
    let usage =
        |reason: String| CliError::Usage(format!("--boundary {}: {reason}", path.display()));
    let file = std::fs::File::open(path).map_err(|e| usage(e.to_string()))?;
    let mut text = String::new();
    file.take(MAX_BOUNDARY_FILE + 1)
        .read_to_string(&mut text)
        .map_err(|e| usage(e.to_string()))?;
    if text.len() as u64 > MAX_BOUNDARY_FILE {
        return Err(usage(format!("larger than {MAX_BOUNDARY_FILE} bytes")));
    }
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| usage(format!("not JSON: {e}")))?;
    let boundary = AccessBoundary::from_json("accessBoundaryRules", &json)
        .map_err(|e| usage(e.to_string()))?;
    Ok(boundary
        .rules()
        .iter()
        .map(|rule| pb::AccessBoundaryRule {
            available_resource: rule.resource.clone(),
            available_permissions: rule.permissions.iter().cloned().collect(),
            availability_condition: rule.condition.as_ref().map(|c| pb::AvailabilityCondition {
                expression: c.expression.clone(),
                title: c.title.clone(),
                description: c.description.clone(),
            }),
        })
        .collect())
}

/// `tokenbroker token id`.
pub async fn id_token(args: IdTokenArgs) -> Result<(), CliError> {
    let format = args.format();
    if args.include_licenses && format != IdFormat::Full {
        return Err(CliError::Usage(
            "--include-licenses needs --format full (licenses are only in full tokens)".into(),
        ));
    }
    let format = match format {
        IdFormat::Standard => pb::IdTokenFormat::Standard,
        IdFormat::Full => pb::IdTokenFormat::Full,
    };
    let request = pb::GetIdTokenRequest {
        audience: args.audience,
        service_account: args.client.service_account.clone(),
        format: format as i32,
        include_licenses: args.include_licenses,
        min_valid_for: min_valid_for(&args.client),
    };
    print_requested(&args.client, request.into()).await
}

/// Prints the token `request` asks for, or every token of it with
/// `--watch` / `--watch-once`.
async fn print_requested(
    args: &ClientArgs,
    request: pb::watch_token_request::Request,
) -> Result<(), CliError> {
    use pb::watch_token_request::Request;

    let mut broker = Client::connect(&args.socket).await?;
    if let Some(mode) = args.watch_mode() {
        return print_watched(&mut broker, request, mode, args.json).await;
    }
    let token = match request {
        Request::AccessToken(request) => {
            pb::token::Token::AccessToken(broker.access_token(request).await?)
        }
        Request::IdToken(request) => pb::token::Token::IdToken(broker.id_token(request).await?),
    };
    print_token(&token, args.json)
}

/// How long `--watch` / `--watch-once` follow a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WatchMode {
    /// Across broker restarts, until a permanent error (`--watch`).
    Resilient,
    /// Until the stream ends, as one `WatchToken` call (`--watch-once`).
    Once,
}

/// Prints every token of a watch until it ends.
async fn print_watched(
    broker: &mut Client,
    request: pb::watch_token_request::Request,
    mode: WatchMode,
    json: bool,
) -> Result<(), CliError> {
    let mut tokens = match mode {
        WatchMode::Resilient => broker.watch_resilient(request),
        WatchMode::Once => broker.watch(request).await?,
    };
    while let Some(token) = tokens.next().await {
        match print_token(&token?, json) {
            // The reader went away (`| head -1`): nothing left to do.
            Err(CliError::Output(error)) if error.kind() == io::ErrorKind::BrokenPipe => {
                return Ok(());
            }
            other => other?,
        }
    }
    Ok(())
}

/// Prints the bare token, or `{"token", "expire_time"}` with `json`, on
/// its own line.
fn print_token(token: &pb::token::Token, json: bool) -> Result<(), CliError> {
    let line = if json {
        let expire_time = token
            .expire_time()
            .map(|t: SystemTime| humantime::format_rfc3339(t).to_string());
        serde_json::json!({"token": token.secret(), "expire_time": expire_time}).to_string()
    } else {
        token.secret().to_owned()
    };
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "{line}")
        .and_then(|()| stdout.flush())
        .map_err(CliError::Output)
}

fn min_valid_for(args: &ClientArgs) -> Option<prost_types::Duration> {
    args.min_valid_for.map(|d| {
        prost_types::Duration::try_from(d).unwrap_or(prost_types::Duration {
            seconds: i64::MAX,
            nanos: 0,
        })
    })
}

/// Flags every client subcommand shares.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// The broker's socket.
    #[arg(long, env = crate::client::SOCKET_ENV, default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,

    /// Service account email, or "default".
    #[arg(long, default_value = "default")]
    pub service_account: String,

    /// Only accept a token valid at least this long.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub min_valid_for: Option<Duration>,

    /// Keep running and print every refreshed token on its own line; if
    /// the broker restarts, subscribe again (jittered backoff) and go on.
    /// Ends only on a refusal such as INVALID_ARGUMENT, or when killed.
    #[arg(long, conflicts_with = "watch_once")]
    pub watch: bool,

    /// Like --watch, but end when the stream ends (e.g. the broker stops).
    #[arg(long)]
    pub watch_once: bool,

    /// Print JSON ({"token", "expire_time"}) instead of the bare token.
    #[arg(long)]
    pub json: bool,
}

impl ClientArgs {
    /// Whether, and how, to follow the token.
    pub fn watch_mode(&self) -> Option<WatchMode> {
        match (self.watch, self.watch_once) {
            (true, _) => Some(WatchMode::Resilient),
            (false, true) => Some(WatchMode::Once),
            (false, false) => None,
        }
    }
}

/// `tokenbroker token access`.
#[derive(Debug, Args)]
pub struct AccessTokenArgs {
    /// OAuth2 scopes (repeat or separate with commas); none means the
    /// account's default scopes.
    #[arg(long = "scope", value_delimiter = ',')]
    pub scopes: Vec<String>,

    /// A downscoped token: limited to the Credential Access Boundary in
    /// this file, Google's JSON ({"accessBoundary": {"accessBoundaryRules":
    /// [{"availableResource", "availablePermissions", "availabilityCondition"}]}}).
    #[arg(long, value_name = "FILE.json")]
    pub boundary: Option<PathBuf>,

    #[command(flatten)]
    #[allow(missing_docs)]
    pub client: ClientArgs,
}

/// `tokenbroker token id`.
#[derive(Debug, Args)]
pub struct IdTokenArgs {
    /// The audience: usually the URL of the service to call.
    #[arg(long)]
    pub audience: String,

    /// Claims in the token: `standard` (identity only) or `full` (adds the
    /// instance and project).
    #[arg(long, value_enum, default_value_t = IdFormat::Standard)]
    pub format: IdFormat,

    /// Same as `--format full` (the old spelling).
    #[arg(long, hide = true)]
    pub full: bool,

    /// Include license codes (needs `--format full`).
    #[arg(long)]
    pub include_licenses: bool,

    #[command(flatten)]
    #[allow(missing_docs)]
    pub client: ClientArgs,
}

/// The claims of an ID token (`--format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum IdFormat {
    /// Identity claims only.
    Standard,
    /// Adds `google.compute_engine` instance and project claims.
    Full,
}

impl IdTokenArgs {
    /// The format asked for, by `--format` or the old `--full`.
    pub fn format(&self) -> IdFormat {
        if self.full {
            IdFormat::Full
        } else {
            self.format
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_has_its_own_exit_code() {
        let codes: Vec<u8> = (1..=16)
            .map(|n| status_exit_code(Code::from_i32(n)))
            .collect();
        let mut distinct = codes.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), codes.len());
        assert!(!codes.contains(&EXIT_CONNECT) && !codes.contains(&EXIT_USAGE));
        assert_eq!(status_exit_code(Code::InvalidArgument), 13);
        assert_eq!(status_exit_code(Code::PermissionDenied), 17);
        assert_eq!(status_exit_code(Code::Unavailable), 24);
    }

    #[test]
    fn the_help_lists_the_codes_the_functions_return() {
        for (code, name) in [
            (Code::InvalidArgument, "INVALID_ARGUMENT"),
            (Code::NotFound, "NOT_FOUND"),
            (Code::PermissionDenied, "PERMISSION_DENIED"),
            (Code::ResourceExhausted, "RESOURCE_EXHAUSTED"),
            (Code::Unavailable, "UNAVAILABLE"),
            (Code::DeadlineExceeded, "DEADLINE_EXCEEDED"),
        ] {
            let line = format!("{} {name}", status_exit_code(code));
            assert!(EXIT_CODES_HELP.contains(&line), "{line}");
        }
    }
}
