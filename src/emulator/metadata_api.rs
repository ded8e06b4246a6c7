//! The metadata server's API as the emulator serves it: the header rules,
//! the token and identity endpoints, the account listing, the instance and
//! project values libraries read, and long-polls that wait as real ones do.

use std::collections::HashMap;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;

use super::faults::{Fault, Target, respond};
use super::{
    Body, DEFAULT_SCOPES, MAX_REMEMBERED_TOKENS, NUMERIC_PROJECT_ID, PROJECT_ID, Shared, TokenInfo,
    ZONE, json_response, parse_query, text, unix_now,
};
use crate::sources::jwt;

/// How long a long-poll without `timeout_sec` waits (an hour: the real
/// server waits for a change, which never comes here).
const LONG_POLL_DEFAULT_WAIT: Duration = Duration::from_secs(3600);
const ROOT: &str = "/computeMetadata/v1/";
const PREFIX: &str = "/computeMetadata/v1/instance/service-accounts/";

/// Answers a request for the metadata API: refuses what the real server
/// refuses, holds long-polls, then answers from the emulated VM.
pub(super) async fn serve(
    shared: &Shared,
    request: Request<Incoming>,
) -> Result<Response<Body>, std::io::Error> {
    let path = request.uri().path();
    if request.method() != Method::GET {
        return Ok(text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"));
    }
    let headers = request.headers();
    if headers.contains_key("x-forwarded-for") {
        shared.count(|s| s.rejected_requests += 1);
        return Ok(text(
            StatusCode::FORBIDDEN,
            "Request denied: X-Forwarded-For header present",
        ));
    }
    if headers.get("metadata-flavor").map(|v| v.as_bytes()) != Some(b"Google") {
        shared.count(|s| s.rejected_requests += 1);
        return Ok(text(
            StatusCode::FORBIDDEN,
            "Missing required header: Metadata-Flavor: Google",
        ));
    }
    let query = parse_query(request.uri().query().unwrap_or(""));
    let listing = path == PREFIX || path == PREFIX.trim_end_matches('/');
    if !path.ends_with("/token") && !path.ends_with("/identity") && !listing {
        shared.count(|s| s.other_requests += 1);
        if query.get("wait_for_change").map(String::as_str) == Some("true") {
            long_poll(shared, &query).await;
        }
    }
    answer(shared, path, &query).await
}

/// Waits as a long-poll does when nothing changes: `timeout_sec` (the
/// emulated values never change), counted in the stats while it waits.
async fn long_poll(shared: &Shared, query: &HashMap<String, String>) {
    let wait = query
        .get("timeout_sec")
        .and_then(|t| t.parse().ok())
        .map_or(LONG_POLL_DEFAULT_WAIT, Duration::from_secs);
    shared.count(|s| {
        s.long_polls_waiting += 1;
        s.long_polls_most = s.long_polls_most.max(s.long_polls_waiting);
    });
    struct Done<'a>(&'a Shared);
    impl Drop for Done<'_> {
        fn drop(&mut self) {
            self.0.count(|s| s.long_polls_waiting -= 1);
        }
    }
    let _done = Done(shared);
    tokio::time::sleep(wait).await;
}

/// The emulated node's `instance/attributes/cluster-name`.
pub const CLUSTER_NAME: &str = "emulated-cluster";
/// Its `instance/attributes/kube-env`: on a GKE node, kubelet credentials;
/// here a stand-in the metadata endpoint must conceal by default.
pub const KUBE_ENV: &str = "KUBELET_CERT: emulated-kubelet-secret-do-not-reveal\n";

async fn answer(
    shared: &Shared,
    path: &str,
    query: &HashMap<String, String>,
) -> Result<Response<Body>, std::io::Error> {
    if path == "/" {
        return Ok(text(StatusCode::OK, "computeMetadata/\n"));
    }
    let recursive = query.get("recursive").map(String::as_str) == Some("true");
    let Some(rest) = path.strip_prefix(PREFIX) else {
        let value = match path.strip_prefix(ROOT) {
            Some("") => "instance/\nproject/\nuniverse/\n",
            Some("instance" | "instance/") => "attributes/\nid\nservice-accounts/\nzone\n",
            Some("instance/zone") => ZONE,
            Some("instance/attributes" | "instance/attributes/") => "cluster-name\nkube-env\n",
            Some("instance/attributes/cluster-name") => CLUSTER_NAME,
            Some("instance/attributes/kube-env") => KUBE_ENV,
            Some("project" | "project/") => "numeric-project-id\nproject-id\n",
            Some("project/project-id") => PROJECT_ID,
            Some("project/numeric-project-id") => NUMERIC_PROJECT_ID,
            Some("universe/universe-domain") => "googleapis.com",
            _ => return Ok(text(StatusCode::NOT_FOUND, "not found")),
        };
        return Ok(text(StatusCode::OK, value));
    };
    if rest.is_empty() {
        let state = shared.lock();
        let accounts =
            std::iter::once("default".to_string()).chain(state.config.accounts.iter().cloned());
        if recursive {
            let listing: serde_json::Map<String, serde_json::Value> = accounts
                .filter_map(|account| {
                    let email = state.resolve(&account)?;
                    let info = account_info(&email, state.is_default(&email));
                    Some((account, info))
                })
                .collect();
            return Ok(json_response(&listing));
        }
        let listing: String = accounts.map(|account| format!("{account}/\n")).collect();
        return Ok(text(StatusCode::OK, &listing));
    }
    let (account, leaf) = rest.split_once('/').unwrap_or((rest, ""));
    let (email, is_default) = {
        let state = shared.lock();
        let Some(email) = state.resolve(account) else {
            return Ok(text(StatusCode::NOT_FOUND, "service account not found"));
        };
        let is_default = state.is_default(&email);
        (email, is_default)
    };
    let aliases = if is_default { "default\n" } else { "" };
    match leaf {
        "" if recursive => Ok(json_response(&account_info(&email, is_default))),
        "" => Ok(text(
            StatusCode::OK,
            "aliases\nemail\nidentity\nscopes\ntoken\n",
        )),
        "aliases" => Ok(text(StatusCode::OK, aliases)),
        "email" => Ok(text(StatusCode::OK, &email)),
        "scopes" => Ok(text(
            StatusCode::OK,
            &format!("{}\n", DEFAULT_SCOPES.join("\n")),
        )),
        "token" => {
            shared.count(|s| s.token_requests += 1);
            shared.arrived();
            let scopes = query.get("scopes").map_or_else(
                || DEFAULT_SCOPES.iter().map(|s| s.to_string()).collect(),
                |s| s.split(',').map(str::to_string).collect(),
            );
            let fault = shared.lock().take_fault(Target::Token);
            respond(shared, fault, |fault| {
                access_token(shared, &email, scopes, fault)
            })
            .await
        }
        "identity" => {
            shared.count(|s| s.identity_requests += 1);
            shared.arrived();
            let Some(audience) = query.get("audience").filter(|a| !a.is_empty()) else {
                return Ok(text(
                    StatusCode::BAD_REQUEST,
                    "non-empty audience parameter required",
                ));
            };
            let full = query.get("format").map(String::as_str) == Some("full");
            let licenses = full && query.get("licenses").map(String::as_str) == Some("TRUE");
            let fault = shared.lock().take_fault(Target::Identity);
            respond(shared, fault, |fault| {
                id_token(shared, &email, audience, full, licenses, fault)
            })
            .await
        }
        _ => Ok(text(StatusCode::NOT_FOUND, "not found")),
    }
}

/// Issues and remembers an access token; returns it and its lifetime in
/// seconds.
pub(super) fn issue_access_token(
    shared: &Shared,
    email: &str,
    scopes: Vec<String>,
) -> (String, u64) {
    issue_bounded_token(shared, email, scopes, None, u64::MAX)
}

/// [`issue_access_token`] for a token limited to `access_boundary` (if
/// any) that expires no later than `not_after` (seconds since the epoch).
pub(super) fn issue_bounded_token(
    shared: &Shared,
    email: &str,
    scopes: Vec<String>,
    access_boundary: Option<serde_json::Value>,
    not_after: u64,
) -> (String, u64) {
    let token = format!("ya29.emulator.{}", random_alphanumeric(48));
    let mut state = shared.lock();
    let now = unix_now();
    let lifetime = state
        .config
        .access_token_lifetime
        .as_secs()
        .min(not_after.saturating_sub(now));
    if state.issued.len() >= MAX_REMEMBERED_TOKENS {
        state.issued.clear();
    }
    state.issued.insert(
        token.clone(),
        TokenInfo {
            email: email.to_string(),
            scopes,
            exp: now + lifetime,
            access_boundary,
        },
    );
    (token, lifetime)
}

fn access_token(
    shared: &Shared,
    email: &str,
    scopes: Vec<String>,
    fault: Option<&Fault>,
) -> String {
    let (token, lifetime) = issue_access_token(shared, email, scopes);
    match fault {
        Some(Fault::NoExpiry) => json!({"access_token": token, "token_type": "Bearer"}),
        Some(Fault::Expired) => {
            json!({"access_token": token, "expires_in": 0, "token_type": "Bearer"})
        }
        _ => json!({"access_token": token, "expires_in": lifetime, "token_type": "Bearer"}),
    }
    .to_string()
}

pub(super) fn id_token(
    shared: &Shared,
    email: &str,
    audience: &str,
    full: bool,
    licenses: bool,
    fault: Option<&Fault>,
) -> String {
    let now = unix_now();
    let lifetime = shared.lock().config.id_token_lifetime.as_secs();
    let subject = stable_number(email);
    let mut claims = json!({
        "iss": "https://accounts.google.com",
        "aud": audience,
        "azp": subject,
        "sub": subject,
        "email": email,
        "email_verified": true,
        "iat": now,
        "exp": now + lifetime,
    });
    if full {
        let mut engine = json!({
            "project_id": "emulator-project",
            "project_number": 123_456_789_012u64,
            "zone": "us-central1-a",
            "instance_id": "1234567890123456789",
            "instance_name": "tokenbroker-emulator",
            "instance_creation_timestamp": 1_700_000_000,
        });
        if licenses {
            engine["license_id"] = json!(["1000010"]);
        }
        claims["google"] = json!({ "compute_engine": engine });
    }
    match fault {
        Some(Fault::NoExpiry) => {
            claims.as_object_mut().map(|c| c.remove("exp"));
        }
        Some(Fault::Expired) => claims["exp"] = json!(now.saturating_sub(60)),
        Some(Fault::WrongAudience) => claims["aud"] = json!("https://wrong-audience.example"),
        _ => {}
    }
    // A random nonce makes every token distinct, even within one second.
    claims["jti"] = json!(random_alphanumeric(16));
    jwt::sign_hs256(&claims, &shared.signing_key)
}

/// What `service-accounts/{account}/?recursive=true` lists.
fn account_info(email: &str, is_default: bool) -> serde_json::Value {
    let aliases: &[&str] = if is_default { &["default"] } else { &[] };
    json!({"aliases": aliases, "email": email, "scopes": DEFAULT_SCOPES})
}

pub(super) fn random_alphanumeric(len: usize) -> String {
    std::iter::repeat_with(fastrand::alphanumeric)
        .take(len)
        .collect()
}

/// A numeric id derived from the email, like Google's `sub` claim.
fn stable_number(email: &str) -> String {
    let hash = email.bytes().fold(1_469_598_103_934_665_603u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(1_099_511_628_211)
    });
    format!("1{:019}", hash % 10u64.pow(19))
}

#[cfg(test)]
mod tests {
    use super::super::DEFAULT_ACCOUNT;
    use super::*;

    #[test]
    fn subject_is_a_stable_20_digit_number() {
        let a = stable_number(DEFAULT_ACCOUNT);
        assert_eq!(a, stable_number(DEFAULT_ACCOUNT));
        assert_eq!(a.len(), 20);
        assert!(a.bytes().all(|b| b.is_ascii_digit()));
        assert_ne!(a, stable_number("other@p.iam.gserviceaccount.com"));
    }
}
