//! git's credential helper protocol (`tokenbroker credential-helper git
//! get|store|erase`): `key=value` lines on stdin up to a blank line, the
//! answer in the same form. For Google's git hosts (and `--host`), over
//! HTTPS, the answer is an access token as the password; for any other
//! host, nothing, so git asks its next helper.

use std::collections::HashMap;
use std::io::Write;

use clap::Args;

use super::{HelperArgs, HostPattern, OAUTH2_USERNAME, any_matches, read_until, with_defaults};
use crate::client::cli::CliError;

/// Hosts answered for without `--host`: Cloud Source Repositories and
/// Secure Source Manager.
pub const GOOGLE_GIT_HOSTS: [&str; 2] = ["source.developers.google.com", "*.sourcemanager.dev"];

/// Cloud Source Repositories, which takes the account's email as the
/// username.
const CLOUD_SOURCE_REPOSITORIES: &str = "source.developers.google.com";

/// Scopes of git tokens: what gcloud's git helper asks for.
const SCOPES: [&str; 1] = ["https://www.googleapis.com/auth/cloud-platform"];

/// `tokenbroker credential-helper git ACTION`.
#[derive(Debug, Args)]
pub struct GitArgs {
    /// What git asks: get (store, erase and any other operation are
    /// accepted and ignored, as git asks of helpers).
    pub action: String,

    /// More hosts to answer for, besides source.developers.google.com and
    /// *.sourcemanager.dev (repeat or separate with commas; a leading *.
    /// matches one label or more; a port is part of the host).
    #[arg(long = "host", env = "TOKENBROKER_GIT_HOSTS", value_delimiter = ',')]
    pub hosts: Vec<HostPattern>,

    #[command(flatten)]
    #[allow(missing_docs)]
    pub helper: HelperArgs,
}

/// One request as git writes it.
#[derive(Debug, PartialEq, Eq)]
pub struct CredentialRequest {
    /// `https` or `http`.
    pub protocol: String,
    /// The host, with a port if the URL has one.
    pub host: String,
}

/// Answers one git request.
pub async fn run(args: GitArgs) -> Result<(), CliError> {
    // The request ends at a blank line; git may wait for the answer before
    // it closes stdin.
    let input = read_until(std::io::stdin().lock(), str::is_empty)?;
    if args.action != "get" {
        // store, erase, and operations of later gits: nothing to do.
        return Ok(());
    }
    let request = parse(&input)?;
    let hosts = with_defaults(&GOOGLE_GIT_HOSTS, &args.hosts);
    if !any_matches(&hosts, &request.host) || !safe_protocol(&request) {
        // Not ours: say nothing, and git asks its next helper.
        return Ok(());
    }
    let token = args.helper.access_token(&SCOPES).await?;
    let expiry = token
        .expire_time
        .map_or(0, |t| u64::try_from(t.seconds).unwrap_or(0));
    let username = username(&request.host, &args.helper.service_account);
    let answer = format!(
        "username={username}\npassword={}\npassword_expiry_utc={expiry}\n\n",
        token.token
    );
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(answer.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(CliError::Output)
}

/// Reads git's `key=value` lines up to a blank line; `protocol` and `host`
/// are required, and no value may hold a NUL.
pub fn parse(input: &str) -> Result<CredentialRequest, CliError> {
    let mut fields: HashMap<&str, &str> = HashMap::new();
    for line in input.lines() {
        if line.is_empty() {
            break;
        }
        let (key, value) = line.split_once('=').ok_or_else(|| {
            CliError::Input(format!(
                "git credential input: {line:?} is not key=value (git writes protocol=..., host=..., one per line)"
            ))
        })?;
        if value.contains('\0') {
            return Err(CliError::Input(format!(
                "git credential input: {key} holds a NUL"
            )));
        }
        fields.insert(key, value);
    }
    let field = |name: &str| {
        fields
            .get(name)
            .filter(|value| !value.is_empty())
            .map(|value| value.to_string())
            .ok_or_else(|| {
                CliError::Input(format!(
                    "git credential input has no {name}= line; is this helper configured as git's credential.helper?"
                ))
            })
    };
    Ok(CredentialRequest {
        protocol: field("protocol")?,
        host: field("host")?,
    })
}

/// A token goes only over HTTPS, or plain HTTP to this machine.
fn safe_protocol(request: &CredentialRequest) -> bool {
    match request.protocol.as_str() {
        "https" => true,
        "http" => {
            let host = request
                .host
                .rsplit_once(':')
                .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
                .map_or(request.host.as_str(), |(host, _)| host);
            host == "localhost"
                || host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        _ => false,
    }
}

/// `oauth2accesstoken`, or for Cloud Source Repositories the account's
/// email when one was named.
fn username<'a>(host: &str, service_account: &'a str) -> &'a str {
    if host.eq_ignore_ascii_case(CLOUD_SOURCE_REPOSITORIES) && service_account.contains('@') {
        service_account
    } else {
        OAUTH2_USERNAME
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn git_input_is_read_up_to_the_blank_line() {
        let request =
            parse("protocol=https\nhost=source.developers.google.com\npath=p/r\n\nignored\n")
                .unwrap();
        assert_eq!(
            request,
            CredentialRequest {
                protocol: "https".into(),
                host: "source.developers.google.com".into()
            }
        );
        for bad in ["host=x\n", "protocol=https\n", "protocol=https\nhost\n", ""] {
            assert!(matches!(parse(bad), Err(CliError::Input(_))), "{bad:?}");
        }
    }

    #[test]
    fn tokens_go_over_https_or_to_this_machine() {
        let request = |protocol: &str, host: &str| CredentialRequest {
            protocol: protocol.into(),
            host: host.into(),
        };
        assert!(safe_protocol(&request("https", "x.sourcemanager.dev")));
        assert!(safe_protocol(&request("http", "127.0.0.1:8080")));
        assert!(safe_protocol(&request("http", "[::1]:8080")));
        assert!(!safe_protocol(&request(
            "http",
            "source.developers.google.com"
        )));
        assert!(!safe_protocol(&request(
            "ssh",
            "source.developers.google.com"
        )));
    }

    #[test]
    fn cloud_source_repositories_gets_the_named_account() {
        let email = "ci@p.iam.gserviceaccount.com";
        assert_eq!(username("source.developers.google.com", email), email);
        assert_eq!(
            username("source.developers.google.com", "default"),
            OAUTH2_USERNAME
        );
        assert_eq!(username("a.sourcemanager.dev", email), OAUTH2_USERNAME);
    }
}
