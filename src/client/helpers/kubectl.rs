//! The kubectl (client-go) exec credential plugin: an `ExecCredential`
//! with a bearer token and its expiry on stdout, for the API version
//! `KUBERNETES_EXEC_INFO` names (v1 unless it says v1beta1).

use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Args;
use serde_json::{Value, json};

use super::HelperArgs;
use crate::client::cli::CliError;

/// The environment variable client-go passes the request in.
pub const EXEC_INFO_ENV: &str = "KUBERNETES_EXEC_INFO";

/// The API version answered when client-go does not say.
pub const API_VERSION: &str = "client.authentication.k8s.io/v1";

/// The older version client-go may still ask for.
const API_VERSION_BETA: &str = "client.authentication.k8s.io/v1beta1";

/// Scopes of GKE tokens: what gke-gcloud-auth-plugin asks for.
pub const SCOPES: [&str; 2] = [
    "https://www.googleapis.com/auth/cloud-platform",
    "https://www.googleapis.com/auth/userinfo.email",
];

/// `tokenbroker credential-helper kubectl`.
#[derive(Debug, Args)]
pub struct KubectlArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub helper: HelperArgs,
}

/// Prints the `ExecCredential` client-go asked for.
pub async fn run(args: KubectlArgs) -> Result<(), CliError> {
    let exec_info = match std::env::var_os(EXEC_INFO_ENV) {
        None => None,
        Some(value) => Some(
            value
                .into_string()
                .map_err(|_| CliError::Input(format!("{EXEC_INFO_ENV}: not UTF-8")))?,
        ),
    };
    let api_version = api_version(exec_info.as_deref())?;
    let token = args.helper.access_token(&SCOPES).await?;
    let expiry = token
        .expire_time
        .and_then(|t| u64::try_from(t.seconds).ok())
        .and_then(|seconds| UNIX_EPOCH.checked_add(Duration::from_secs(seconds)));
    let credential = exec_credential(api_version, &token.token, expiry);
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{credential}")
        .and_then(|()| stdout.flush())
        .map_err(CliError::Output)
}

/// The API version of the `KUBERNETES_EXEC_INFO` request, if any, checked.
pub fn api_version(exec_info: Option<&str>) -> Result<&'static str, CliError> {
    let Some(exec_info) = exec_info.filter(|info| !info.is_empty()) else {
        return Ok(API_VERSION);
    };
    let bad = |what: String| CliError::Input(format!("{EXEC_INFO_ENV}: {what}"));
    let info: Value =
        serde_json::from_str(exec_info).map_err(|error| bad(format!("not JSON: {error}")))?;
    if info["kind"] != "ExecCredential" {
        return Err(bad("kind is not ExecCredential".into()));
    }
    match info["apiVersion"].as_str() {
        Some(API_VERSION) => Ok(API_VERSION),
        Some(API_VERSION_BETA) => Ok(API_VERSION_BETA),
        other => Err(bad(format!(
            "apiVersion {other:?} is not {API_VERSION} or {API_VERSION_BETA}"
        ))),
    }
}

/// Latest expiry RFC 3339 can write (the end of year 9999).
const LATEST_EXPIRY: Duration = Duration::from_secs(253_402_300_799);

/// The `ExecCredential` holding `token`, which expires at `expiry`
/// (without one, or past what RFC 3339 can write, client-go is not told,
/// and asks again when the API server refuses the token).
pub fn exec_credential(api_version: &str, token: &str, expiry: Option<SystemTime>) -> Value {
    let mut status = json!({ "token": token });
    if let Some(expiry) = expiry.filter(|e| *e <= UNIX_EPOCH + LATEST_EXPIRY) {
        status["expirationTimestamp"] =
            json!(humantime::format_rfc3339_seconds(expiry).to_string());
    }
    json!({
        "apiVersion": api_version,
        "kind": "ExecCredential",
        "spec": {},
        "status": status,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_follows_exec_info() {
        assert_eq!(api_version(None).unwrap(), API_VERSION);
        let beta = r#"{"apiVersion":"client.authentication.k8s.io/v1beta1","kind":"ExecCredential","spec":{"interactive":false}}"#;
        assert_eq!(api_version(Some(beta)).unwrap(), API_VERSION_BETA);
        for bad in [
            "not json",
            r#"{"apiVersion":"client.authentication.k8s.io/v2","kind":"ExecCredential"}"#,
            r#"{"apiVersion":"client.authentication.k8s.io/v1","kind":"Pod"}"#,
        ] {
            assert!(
                matches!(api_version(Some(bad)), Err(CliError::Input(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_credential_has_the_token_and_an_rfc3339_expiry() {
        let expiry = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let credential = exec_credential(API_VERSION, "ya29.t", Some(expiry));
        assert_eq!(credential["status"]["token"], "ya29.t");
        assert_eq!(
            credential["status"]["expirationTimestamp"],
            "2027-01-15T08:00:00Z"
        );
        let far = UNIX_EPOCH + Duration::from_secs(u64::MAX / 4);
        for expiry in [None, Some(far)] {
            let credential = exec_credential(API_VERSION, "ya29.t", expiry);
            assert!(credential["status"].get("expirationTimestamp").is_none());
        }
    }
}
