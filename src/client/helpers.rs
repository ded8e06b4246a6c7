//! Credential helpers: docker, git and kubectl take their Google tokens
//! from a running broker, speaking each tool's own protocol on stdin and
//! stdout ([`docker`], [`git`], [`kubectl`]; [`docker_config`] installs the
//! docker helper). They never fetch from Google themselves; a failure is
//! one line on stderr, never on stdout, where the tool parses the answer.

pub mod docker;
pub mod docker_config;
pub mod git;
pub mod kubectl;

use std::io::BufRead;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::client::cli::CliError;
use crate::client::{Client, ClientError};
use crate::proto::v1 as pb;
use crate::socket::DEFAULT_SOCKET;

/// Least validity of a token handed to a tool (5 minutes): a long `docker
/// pull` or `git clone` never starts with an almost-expired token.
pub const MIN_VALID_FOR: Duration = Duration::from_secs(300);

/// Longest a helper waits for the broker (30 s); then it fails, so the tool
/// does not hang on a stuck broker.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Most bytes a helper reads from stdin (64 KiB).
pub const MAX_INPUT: u64 = 64 * 1024;

/// The username Google's registries and git hosts take with an access
/// token as the password.
pub const OAUTH2_USERNAME: &str = "oauth2accesstoken";

/// What every helper asks the broker for.
#[derive(Debug, Args)]
pub struct HelperArgs {
    /// The broker's socket.
    #[arg(long, env = crate::client::SOCKET_ENV, default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,

    /// Service account email, or "default".
    #[arg(long, env = "TOKENBROKER_SERVICE_ACCOUNT", default_value = "default")]
    pub service_account: String,

    /// OAuth2 scopes (repeat or separate with commas); none means the
    /// helper's default.
    #[arg(long = "scope", env = "TOKENBROKER_SCOPES", value_delimiter = ',')]
    pub scopes: Vec<String>,

    /// Only accept a token valid at least this long; never less than 5m.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5m")]
    pub min_valid_for: Duration,
}

impl HelperArgs {
    /// An access token from the broker for these flags (`default_scopes`
    /// when none were given), valid at least [`MIN_VALID_FOR`].
    pub async fn access_token(&self, default_scopes: &[&str]) -> Result<pb::AccessToken, CliError> {
        // An empty variable (`TOKENBROKER_SCOPES=`) names no scope.
        let given: Vec<String> = self
            .scopes
            .iter()
            .filter(|s| !s.is_empty())
            .cloned()
            .collect();
        let scopes = if given.is_empty() {
            default_scopes.iter().map(|s| s.to_string()).collect()
        } else {
            given
        };
        let min_valid_for = self.min_valid_for.max(MIN_VALID_FOR);
        let request = pb::GetAccessTokenRequest {
            service_account: self.service_account.clone(),
            scopes,
            min_valid_for: Some(prost_types::Duration::try_from(min_valid_for).unwrap_or(
                prost_types::Duration {
                    seconds: i64::MAX,
                    nanos: 0,
                },
            )),
            ..Default::default()
        };
        let call = async {
            let mut broker = Client::connect(&self.socket).await?;
            broker.access_token(request).await
        };
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(
                ClientError::Status(tonic::Status::deadline_exceeded(format!(
                    "the broker at {} did not answer within {}",
                    self.socket.display(),
                    humantime::format_duration(CALL_TIMEOUT)
                )))
                .into(),
            ),
        }
    }
}

/// What the tool wrote on stdin, at most [`MAX_INPUT`] bytes, as text.
pub fn read_stdin() -> Result<String, CliError> {
    read_until(std::io::stdin().lock(), |_| false)
}

/// Lines of `input` up to (not including) the first for which `last` is
/// true, or its end; at most [`MAX_INPUT`] bytes. A tool that writes its
/// request and waits for the answer before closing stdin is answered.
pub fn read_until(
    input: impl std::io::BufRead,
    last: impl Fn(&str) -> bool,
) -> Result<String, CliError> {
    let mut text = String::new();
    for line in input.take(MAX_INPUT + 1).lines() {
        let line = line.map_err(|error| CliError::Input(format!("cannot read stdin: {error}")))?;
        if last(&line) {
            break;
        }
        text.push_str(&line);
        text.push('\n');
    }
    if text.len() as u64 > MAX_INPUT {
        return Err(CliError::Input(format!(
            "more than {MAX_INPUT} bytes on stdin"
        )));
    }
    Ok(text)
}

/// A host a helper answers for: exact (`gcr.io`, `127.0.0.1:8443`), or
/// `*.SUFFIX` for any host ending in `.SUFFIX` (one label or more), or
/// `*-SUFFIX` for one label ending in `-SUFFIX` and then the rest
/// (`*-docker.pkg.dev`). Case does not matter; a port is part of the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPattern(String);

impl HostPattern {
    /// Checks a pattern as given on the command line.
    /// An empty pattern (an empty environment variable) names no host.
    pub fn parse(pattern: &str) -> Result<Self, String> {
        let pattern = pattern.trim().to_ascii_lowercase();
        if pattern.is_empty() {
            return Ok(Self(pattern));
        }
        let body = pattern
            .strip_prefix("*.")
            .or_else(|| pattern.strip_prefix("*-"))
            .unwrap_or(&pattern);
        let plain = !body.is_empty()
            && body
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
        if !plain {
            return Err(format!(
                "{pattern:?} is not a host name, or a host suffix after a leading *. or *- (e.g. *.sourcemanager.dev)"
            ));
        }
        Ok(Self(pattern))
    }

    /// Whether `host` is one this pattern names.
    pub fn matches(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        if self.0.is_empty() {
            return false;
        }
        if let Some(suffix) = self.0.strip_prefix("*.") {
            host.strip_suffix(suffix)
                .and_then(|rest| rest.strip_suffix('.'))
                .is_some_and(|label| !label.is_empty())
        } else if let Some(suffix) = self.0.strip_prefix("*-") {
            host.strip_suffix(suffix)
                .and_then(|rest| rest.strip_suffix('-'))
                .is_some_and(|label| !label.is_empty() && !label.contains('.'))
        } else {
            host == self.0
        }
    }

    /// Whether this pattern names one host (no wildcard).
    pub fn is_exact(&self) -> bool {
        !self.0.is_empty() && !self.0.starts_with('*')
    }

    /// The pattern as written (lower case).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for HostPattern {
    type Err = String;

    fn from_str(pattern: &str) -> Result<Self, String> {
        Self::parse(pattern)
    }
}

/// Whether some pattern names `host`.
pub fn any_matches(patterns: &[HostPattern], host: &str) -> bool {
    patterns.iter().any(|pattern| pattern.matches(host))
}

/// The patterns of `defaults`, then `extra`.
pub fn with_defaults(defaults: &[&str], extra: &[HostPattern]) -> Vec<HostPattern> {
    defaults
        .iter()
        .filter_map(|pattern| HostPattern::parse(pattern).ok())
        .chain(extra.iter().cloned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(text: &str) -> HostPattern {
        HostPattern::parse(text).unwrap()
    }

    #[test]
    fn patterns_match_exact_hosts_and_leading_labels() {
        assert!(pattern("gcr.io").matches("GCR.io"));
        assert!(!pattern("gcr.io").matches("evilgcr.io"));
        assert!(pattern("*.gcr.io").matches("us.gcr.io"));
        assert!(pattern("*.gcr.io").matches("a.b.gcr.io"));
        assert!(!pattern("*.gcr.io").matches("gcr.io"));
        assert!(!pattern("*.gcr.io").matches("evil-gcr.io"));
        assert!(pattern("*-docker.pkg.dev").matches("europe-west1-docker.pkg.dev"));
        assert!(!pattern("*-docker.pkg.dev").matches("evil.com/x-docker.pkg.dev"));
        assert!(!pattern("*-docker.pkg.dev").matches("a.b-docker.pkg.dev"));
        assert!(!pattern("*-docker.pkg.dev").matches("-docker.pkg.dev"));
        assert!(pattern("127.0.0.1:8443").matches("127.0.0.1:8443"));
        assert!(!pattern("gcr.io").matches("gcr.io:444"));
    }

    #[test]
    fn odd_patterns_are_refused() {
        for bad in ["*", "a/b", "*.", "ev il.com", "x.*.com"] {
            assert!(HostPattern::parse(bad).is_err(), "{bad:?}");
        }
        let empty = pattern("");
        assert!(!empty.matches("") && !empty.matches("gcr.io") && !empty.is_exact());
    }
}
