//! The docker credential helper protocol (`docker-credential-tokenbroker
//! get|store|erase|list|version`): the server URL or the credentials on
//! stdin, JSON on stdout. Google's registries get an access token as the
//! password of `oauth2accesstoken`; any other host gets the protocol's
//! "credentials not found" answer, so docker goes on to its other helpers.

use std::ffi::OsString;
use std::io::Write;
use std::path::Path;

use clap::{Args, ValueEnum};
use serde_json::{Map, Value, json};

use super::{HelperArgs, HostPattern, OAUTH2_USERNAME, any_matches, read_stdin, with_defaults};
use crate::client::cli::CliError;

/// The name docker runs a helper by: `docker-credential-` + the name in
/// `credHelpers`. A link with this name to the binary is the helper.
pub const HELPER_NAME: &str = "docker-credential-tokenbroker";

/// The registries answered for without `--registry`: Container Registry
/// and Artifact Registry.
pub const GOOGLE_REGISTRIES: [&str; 3] = ["gcr.io", "*.gcr.io", "*-docker.pkg.dev"];

/// Registries `list` names: what `configure-docker` configures by
/// default, and Artifact Registry's US host.
const LISTED: [&str; 6] = [
    "gcr.io",
    "us.gcr.io",
    "eu.gcr.io",
    "asia.gcr.io",
    "marketplace.gcr.io",
    "us-docker.pkg.dev",
];

/// What docker prints for a host a helper has nothing for; the docker CLI
/// recognises exactly this text.
pub const NOT_FOUND: &str = "credentials not found in native keychain";

/// Scopes of registry tokens: what `docker-credential-gcr` asks for.
const SCOPES: [&str; 1] = ["https://www.googleapis.com/auth/cloud-platform"];

/// `tokenbroker credential-helper docker ACTION`.
#[derive(Debug, Args)]
pub struct DockerArgs {
    /// What docker asks: get, store, erase, list or version.
    #[arg(value_enum)]
    pub action: Action,

    /// More registry hosts to answer for, besides gcr.io, *.gcr.io and
    /// *-docker.pkg.dev (repeat or separate with commas; a leading *. or
    /// *- matches one label or more).
    #[arg(
        long = "registry",
        env = "TOKENBROKER_DOCKER_REGISTRIES",
        value_delimiter = ','
    )]
    pub registries: Vec<HostPattern>,

    #[command(flatten)]
    #[allow(missing_docs)]
    pub helper: HelperArgs,
}

/// The docker credential helper actions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Action {
    /// The credentials of the server URL on stdin.
    Get,
    /// Keep credentials (accepted, ignored: tokens come from the broker).
    Store,
    /// Forget credentials (accepted, ignored).
    Erase,
    /// The registries answered for, with their username.
    List,
    /// The helper's version.
    Version,
}

/// When the binary runs as [`HELPER_NAME`] (a link), the arguments of
/// `tokenbroker credential-helper docker ...` that stand for `args`.
pub fn as_helper_args(args: Vec<OsString>) -> Vec<OsString> {
    let invoked_as_helper = args
        .first()
        .and_then(|argv0| Path::new(argv0).file_name())
        .is_some_and(|name| name == HELPER_NAME);
    if !invoked_as_helper {
        return args;
    }
    let mut rewritten: Vec<OsString> = ["tokenbroker", "credential-helper", "docker"]
        .into_iter()
        .map(OsString::from)
        .collect();
    rewritten.extend(args.into_iter().skip(1));
    rewritten
}

/// Answers one docker request.
pub async fn run(args: DockerArgs) -> Result<(), CliError> {
    let registries = with_defaults(&GOOGLE_REGISTRIES, &args.registries);
    match args.action {
        Action::Get => {
            let server_url = read_stdin()?.trim().to_string();
            if server_url.is_empty() {
                return Err(CliError::Input(
                    "expected a registry's server URL on stdin (e.g. us-docker.pkg.dev)".into(),
                ));
            }
            // A URL that names no plain host is nobody this helper knows.
            let host = registry_host(&server_url).unwrap_or_default();
            if !any_matches(&registries, host) {
                print(NOT_FOUND)?;
                return Err(CliError::NotFound(format!(
                    "{server_url:?} is not a Google registry this helper answers for (add it with --registry or TOKENBROKER_DOCKER_REGISTRIES)"
                )));
            }
            let token = args.helper.access_token(&SCOPES).await?;
            let answer = json!({
                "ServerURL": server_url,
                "Username": OAUTH2_USERNAME,
                "Secret": token.token,
            });
            print(&answer.to_string())
        }
        Action::Store => {
            let input = read_stdin()?;
            let credentials: Value = serde_json::from_str(&input).map_err(|error| {
                CliError::Input(format!(
                    "store expects {{\"ServerURL\", \"Username\", \"Secret\"}} as JSON on stdin: {error}"
                ))
            })?;
            if !credentials.is_object() {
                return Err(CliError::Input(
                    "store expects a JSON object on stdin".into(),
                ));
            }
            Ok(())
        }
        // Nothing is kept, so there is nothing to forget, for any URL.
        Action::Erase => read_stdin().map(drop),
        Action::List => {
            let listed: Map<String, Value> = LISTED
                .iter()
                .copied()
                .chain(
                    args.registries
                        .iter()
                        .filter(|r| r.is_exact())
                        .map(HostPattern::as_str),
                )
                .map(|host| (format!("https://{host}"), json!(OAUTH2_USERNAME)))
                .collect();
            print(&Value::Object(listed).to_string())
        }
        Action::Version => print(&format!("tokenbroker {}", env!("CARGO_PKG_VERSION"))),
    }
}

/// The host of a server URL as docker passes it (`us-docker.pkg.dev`,
/// `https://gcr.io/v2/`, `gcr.io/project`).
pub fn registry_host(server_url: &str) -> Result<&str, CliError> {
    let rest = server_url
        .strip_prefix("https://")
        .or_else(|| server_url.strip_prefix("http://"))
        .unwrap_or(server_url);
    let host = rest.split('/').next().unwrap_or_default();
    let plain = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
    if !plain {
        return Err(CliError::Input(
            "expected a registry's server URL on stdin (e.g. us-docker.pkg.dev)".into(),
        ));
    }
    Ok(host)
}

fn print(text: &str) -> Result<(), CliError> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{text}")
        .and_then(|()| stdout.flush())
        .map_err(CliError::Output)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_link_name_turns_into_the_subcommand() {
        let args = |list: &[&str]| list.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            as_helper_args(args(&[
                "/usr/local/bin/docker-credential-tokenbroker",
                "get"
            ])),
            args(&["tokenbroker", "credential-helper", "docker", "get"])
        );
        assert_eq!(
            as_helper_args(args(&["tokenbroker", "token", "access"])),
            args(&["tokenbroker", "token", "access"])
        );
    }

    #[test]
    fn server_urls_are_read_as_docker_sends_them() {
        assert_eq!(
            registry_host("us-docker.pkg.dev").unwrap(),
            "us-docker.pkg.dev"
        );
        assert_eq!(registry_host("https://gcr.io/v2/").unwrap(), "gcr.io");
        assert_eq!(
            registry_host("eu.gcr.io/project/image").unwrap(),
            "eu.gcr.io"
        );
        assert!(registry_host("").is_err());
        assert!(registry_host("{\"ServerURL\": 1}").is_err());
        assert!(registry_host("a b").is_err());
    }

    #[test]
    fn google_registries_are_answered_and_others_not() {
        let registries = with_defaults(&GOOGLE_REGISTRIES, &[]);
        for host in ["gcr.io", "us.gcr.io", "europe-west1-docker.pkg.dev"] {
            assert!(any_matches(&registries, host), "{host}");
        }
        for host in ["docker.io", "ghcr.io", "gcr.io.evil.com", "pkg.dev"] {
            assert!(!any_matches(&registries, host), "{host}");
        }
    }
}
