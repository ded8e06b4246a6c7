//! What the emulator fakes of AWS for federation's `aws1` source: EC2
//! instance metadata (an availability zone and an instance role's
//! credentials, with IMDSv2 sessions) under `/latest/`, and the check Google
//! STS makes of an AWS subject token: a `GetCallerIdentity` request whose
//! SigV4 signature, made with credentials the emulator was given, verifies.

use std::time::{Duration, SystemTime};

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::{Value, json};

use super::metadata_api::random_alphanumeric;
use super::{Body, Shared, json_response, text};
use crate::secret::Secret;
use crate::sources::external::aws::{AwsCredentials, TARGET_RESOURCE_HEADER, signed_headers};

/// The emulated AWS account's id, in role ARNs.
pub const AWS_ACCOUNT_ID: &str = "123456789012";
/// How many IMDSv2 sessions are remembered (the oldest go first).
const MAX_SESSIONS: usize = 1000;
/// How far an AWS request's `x-amz-date` may be from now (15 min, as AWS).
const MAX_CLOCK_SKEW: Duration = Duration::from_secs(900);

/// An AWS IAM role and the credentials that stand for it (`PUT
/// /emulator/v1/aws-roles` takes it as JSON).
#[derive(Clone, Debug, Deserialize)]
pub struct AwsRole {
    /// The role's name.
    pub role: String,
    /// Its access key's id.
    pub access_key_id: String,
    /// Its secret access key.
    pub secret_access_key: String,
    /// The session token, for temporary credentials.
    #[serde(default)]
    pub session_token: Option<String>,
}

/// The EC2 instance the emulator's `/latest/` paths describe (`PUT
/// /emulator/v1/ec2-instance`).
#[derive(Clone, Debug, Deserialize)]
pub struct Ec2Instance {
    /// Its availability zone, e.g. `us-east-1b`.
    pub zone: String,
    /// The name of its role (one added with its credentials).
    pub role: String,
    /// Whether metadata is served only within IMDSv2 sessions.
    #[serde(default)]
    pub imdsv2_required: bool,
}

/// What the emulator knows of AWS.
#[derive(Default)]
pub(super) struct AwsState {
    pub(super) roles: Vec<AwsRole>,
    pub(super) instance: Option<Ec2Instance>,
    sessions: Vec<String>,
}

/// The principal an AWS role federates as.
pub fn role_arn(role: &str) -> String {
    format!("arn:aws:sts::{AWS_ACCOUNT_ID}:assumed-role/{role}")
}

/// Answers EC2 instance metadata under `/latest/`.
pub(super) fn serve_instance_metadata(
    shared: &Shared,
    request: &Request<Incoming>,
) -> Response<Body> {
    let mut state = shared.lock();
    let Some(instance) = state.aws.instance.clone() else {
        return text(StatusCode::NOT_FOUND, "no EC2 instance is emulated\n");
    };
    let path = request.uri().path();
    if request.method() == Method::PUT && path == "/latest/api/token" {
        if !request
            .headers()
            .contains_key("x-aws-ec2-metadata-token-ttl-seconds")
        {
            return text(StatusCode::BAD_REQUEST, "missing TTL header\n");
        }
        let token = random_alphanumeric(32);
        if state.aws.sessions.len() >= MAX_SESSIONS {
            state.aws.sessions.remove(0);
        }
        state.aws.sessions.push(token.clone());
        return text(StatusCode::OK, &token);
    }
    let session = request
        .headers()
        .get("x-aws-ec2-metadata-token")
        .and_then(|v| v.to_str().ok());
    match session {
        Some(token) if !state.aws.sessions.iter().any(|t| t == token) => {
            return text(StatusCode::UNAUTHORIZED, "");
        }
        None if instance.imdsv2_required => return text(StatusCode::UNAUTHORIZED, ""),
        _ => {}
    }
    const CREDENTIALS: &str = "/latest/meta-data/iam/security-credentials";
    let role = state
        .aws
        .roles
        .iter()
        .find(|r| r.role == instance.role)
        .cloned();
    match (request.method(), path.trim_end_matches('/')) {
        (&Method::GET, "/latest/meta-data/placement/availability-zone") => {
            text(StatusCode::OK, &instance.zone)
        }
        (&Method::GET, CREDENTIALS) => text(StatusCode::OK, &instance.role),
        (&Method::GET, other) if other == format!("{CREDENTIALS}/{}", instance.role) => {
            match role {
                Some(role) => json_response(&json!({
                    "Code": "Success",
                    "Type": "AWS-HMAC",
                    "AccessKeyId": role.access_key_id,
                    "SecretAccessKey": role.secret_access_key,
                    "Token": role.session_token,
                })),
                None => text(StatusCode::NOT_FOUND, ""),
            }
        }
        _ => text(StatusCode::NOT_FOUND, ""),
    }
}

/// The role a serialised, signed `GetCallerIdentity` request for
/// `audience` stands for, if its signature verifies.
pub(super) fn verify_subject(shared: &Shared, audience: &str, token: &str) -> Option<String> {
    let json = percent_encoding::percent_decode_str(token)
        .decode_utf8()
        .ok()?;
    let request: Value = serde_json::from_str(&json).ok()?;
    let url = request["url"].as_str()?;
    if request["method"] != "POST" || !url.contains("Action=GetCallerIdentity") {
        return None;
    }
    let (region, rest) = url
        .strip_prefix("https://sts.")?
        .split_once(".amazonaws.com")?;
    if !(rest.starts_with('?') || rest.starts_with('/')) {
        return None;
    }
    let header = |name: &str| {
        request["headers"].as_array()?.iter().find_map(|h| {
            h["key"]
                .as_str()
                .filter(|key| key.eq_ignore_ascii_case(name))
                .and(h["value"].as_str())
        })
    };
    if header(TARGET_RESOURCE_HEADER)? != audience {
        return None;
    }
    let authorization = header("authorization")?;
    let access_key_id = authorization
        .split_once("Credential=")?
        .1
        .split('/')
        .next()?;
    let role = shared
        .lock()
        .aws
        .roles
        .iter()
        .find(|r| r.access_key_id == access_key_id)
        .cloned()?;
    if header("x-amz-security-token") != role.session_token.as_deref() {
        return None;
    }
    let time = amz_date(header("x-amz-date")?)?;
    let now = SystemTime::now();
    let skew = now
        .duration_since(time)
        .or_else(|e| Ok::<_, ()>(e.duration()))
        .ok()?;
    if skew > MAX_CLOCK_SKEW {
        return None;
    }
    let credentials = AwsCredentials {
        access_key_id: role.access_key_id.clone(),
        secret_access_key: Secret::new(role.secret_access_key.clone()),
        session_token: role.session_token.clone().map(Secret::new),
    };
    let expected = signed_headers(url, region, audience, &credentials, time).ok()?;
    let (_, signed) = expected.iter().find(|(name, _)| name == "Authorization")?;
    bool::from(subtle::ConstantTimeEq::ct_eq(
        signed.as_bytes(),
        authorization.as_bytes(),
    ))
    .then(|| role_arn(&role.role))
}

/// An `x-amz-date` (`20260528T123456Z`) as a time.
fn amz_date(text: &str) -> Option<SystemTime> {
    let b = text.as_bytes();
    let digits = |range: std::ops::Range<usize>| b[range].iter().all(u8::is_ascii_digit);
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' || !digits(0..8) || !digits(9..15) {
        return None;
    }
    let rfc3339 = format!(
        "{}-{}-{}T{}:{}:{}Z",
        &text[0..4],
        &text[4..6],
        &text[6..8],
        &text[9..11],
        &text[11..13],
        &text[13..15]
    );
    humantime::parse_rfc3339(&rfc3339).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amz_dates_are_read() {
        let time = amz_date("20260528T123456Z").unwrap();
        assert_eq!(
            humantime::format_rfc3339(time).to_string(),
            "2026-05-28T12:34:56Z"
        );
        assert!(amz_date("2026-05-28").is_none());
        assert!(
            amz_date("20261é2T123456Z").is_none(),
            "no panic on a multibyte date"
        );
    }
}
