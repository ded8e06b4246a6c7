//! A fake of Google STS: the RFC 8693 token-exchange grant at `POST
//! /v1/token`, exchanging a subject token of a registered workload identity
//! pool (an RS256 JWT signed by the pool's key, of the pool's
//! `subject_token_type`) for a federated access token; and the workforce
//! refresh-token grant at `POST /v1/oauthtoken`, with the client in HTTP
//! basic auth. Errors in OAuth's shape.

use std::collections::HashMap;

use base64::Engine;
use http::{HeaderMap, header};
use serde::Deserialize;
use serde_json::json;

use super::faults::Target;
use super::google::{self, OAuthResult, unsupported_grant};
use super::metadata_api::{issue_access_token, issue_bounded_token};
use super::unix_now;
use super::{Shared, aws};
use crate::sources::jwt;

/// Path of the fake STS token exchange.
pub const TOKEN_PATH: &str = "/v1/token";
/// Path of the fake workforce refresh-token endpoint.
pub const WORKFORCE_TOKEN_PATH: &str = "/v1/oauthtoken";

const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
const CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";

/// A workload identity pool provider the fake STS trusts.
#[derive(Clone, Debug)]
pub struct Pool {
    /// The provider's name, as files give it in `audience`
    /// (`//iam.googleapis.com/projects/N/locations/global/workloadIdentityPools/P/providers/R`).
    pub audience: String,
    /// The subject token type it accepts (`urn:ietf:params:oauth:token-type:jwt`).
    pub subject_token_type: String,
    /// How its subject tokens are verified.
    pub subjects: Subjects,
}

/// What a pool's subject tokens are.
#[derive(Clone, Debug)]
pub enum Subjects {
    /// RS256 JWTs signed with this RSA public key (PKCS#1 DER).
    Jwt {
        /// The identity provider's key.
        public_key_der: Vec<u8>,
    },
    /// Signed AWS `GetCallerIdentity` requests, of roles added with
    /// [`super::Emulator::add_aws_role`].
    Aws,
}

/// The subject token type of AWS requests.
pub const AWS_TOKEN_TYPE: &str = "urn:ietf:params:aws:token-type:aws4_request";

/// `PUT /emulator/v1/pools`: a pool, with the identity provider's signing
/// key as a PKCS#8 PEM private key (the emulator derives the public key),
/// or, for AWS subjects, none.
#[derive(Deserialize)]
pub(super) struct PoolRequest {
    audience: String,
    subject_token_type: String,
    #[serde(default)]
    signing_key: Option<String>,
}

impl PoolRequest {
    /// The pool, or why the request is unusable.
    pub(super) fn pool(self) -> Result<Pool, String> {
        let subjects = match (&self.signing_key, self.subject_token_type.as_str()) {
            (None, AWS_TOKEN_TYPE) => Subjects::Aws,
            (None, _) => return Err("signing_key is required for JWT subjects".into()),
            (Some(pem), _) => Subjects::Jwt {
                public_key_der: google::public_key_of(pem)
                    .ok_or("signing_key is not a PKCS#8 PEM RSA private key")?,
            },
        };
        Ok(Pool {
            audience: self.audience,
            subject_token_type: self.subject_token_type,
            subjects,
        })
    }
}

/// The principal a federated token stands for, as Google names it.
pub fn principal(audience: &str, subject: &str) -> String {
    let pool = audience
        .trim_start_matches("//iam.googleapis.com/")
        .split("/providers/")
        .next()
        .unwrap_or_default();
    format!("principal://iam.googleapis.com/{pool}/subject/{subject}")
}

/// The token-exchange grant.
pub(super) fn exchange(
    shared: &Shared,
    form: &HashMap<String, String>,
    _headers: &HeaderMap,
) -> OAuthResult {
    let field = |name: &str| form.get(name).map(String::as_str).unwrap_or("");
    if field("grant_type") != TOKEN_EXCHANGE {
        return Err(unsupported_grant(field("grant_type")));
    }
    if field("requested_token_type") != ACCESS_TOKEN_TYPE {
        return Err((
            400,
            "invalid_request",
            "Invalid value for \"requested_token_type\".".into(),
        ));
    }
    if field("subject_token_type") == ACCESS_TOKEN_TYPE {
        return downscope(shared, field("subject_token"), field("options"));
    }
    let pool = shared.lock().google.pools.get(field("audience")).cloned();
    let Some(pool) = pool else {
        return Err((
            400,
            "invalid_target",
            "The target service indicated by the \"audience\" parameters is invalid. This might either be because the pool or provider is disabled or deleted or because it doesn't exist.".into(),
        ));
    };
    if field("subject_token_type") != pool.subject_token_type {
        return Err((
            400,
            "invalid_request",
            format!(
                "Invalid value for \"subject_token_type\": the provider accepts {}.",
                pool.subject_token_type
            ),
        ));
    }
    let invalid = || {
        (
            400,
            "invalid_grant",
            "The subject token is invalid: its signature does not verify, or it has expired, or it names no subject.".to_string(),
        )
    };
    let subject = match &pool.subjects {
        Subjects::Jwt { public_key_der } => jwt_subject(field("subject_token"), public_key_der),
        Subjects::Aws => aws::verify_subject(shared, &pool.audience, field("subject_token")),
    }
    .ok_or_else(invalid)?;
    let scopes = match field("scope") {
        "" => vec![CLOUD_PLATFORM.to_string()],
        scope => scope.split_whitespace().map(str::to_string).collect(),
    };
    let (token, lifetime) =
        issue_access_token(shared, &principal(&pool.audience, &subject), scopes);
    exchanged(&token, lifetime)
}

/// STS's answer to an exchange: the access token and its lifetime.
fn exchanged(token: &str, lifetime: u64) -> OAuthResult {
    Ok((
        json!({
            "access_token": token,
            "issued_token_type": ACCESS_TOKEN_TYPE,
            "token_type": "Bearer",
            "expires_in": lifetime,
        }),
        Target::Token,
    ))
}

/// Most rules in one access boundary, as Google allows.
const MAX_BOUNDARY_RULES: usize = 10;

/// Downscoping: an access token the emulator issued, exchanged for one
/// limited to the Credential Access Boundary in `options`, validated as
/// Google documents it. The new token never outlives the subject token.
fn downscope(shared: &Shared, subject_token: &str, options: &str) -> OAuthResult {
    let subject = shared.lock().issued.get(subject_token).cloned();
    let Some(subject) = subject.filter(|info| info.exp > unix_now()) else {
        return Err((
            400,
            "invalid_grant",
            "The subject token is invalid or has expired.".into(),
        ));
    };
    let boundary = access_boundary(options).map_err(|reason| {
        (
            400,
            "invalid_request",
            format!("Invalid value for \"options\": {reason}"),
        )
    })?;
    let (token, lifetime) = issue_bounded_token(
        shared,
        &subject.email,
        subject.scopes,
        Some(boundary),
        subject.exp,
    );
    exchanged(&token, lifetime)
}

/// The `accessBoundary` of `options` (JSON, perhaps URL-encoded once more,
/// as some of Google's libraries send it), or what is wrong with it.
fn access_boundary(options: &str) -> Result<serde_json::Value, String> {
    let decoded;
    let options = if options.starts_with('%') {
        decoded = form_urlencoded::parse(format!("o={options}").as_bytes())
            .next()
            .map(|(_, value)| value.into_owned())
            .unwrap_or_default();
        decoded.as_str()
    } else {
        options
    };
    let options: serde_json::Value =
        serde_json::from_str(options).map_err(|_| "not a JSON object".to_string())?;
    let boundary = options
        .get("accessBoundary")
        .ok_or("no accessBoundary")?
        .clone();
    let rules = boundary["accessBoundaryRules"]
        .as_array()
        .ok_or("accessBoundary.accessBoundaryRules must be a list")?;
    if rules.is_empty() || rules.len() > MAX_BOUNDARY_RULES {
        return Err(format!(
            "an access boundary holds 1 to {MAX_BOUNDARY_RULES} rules, not {}",
            rules.len()
        ));
    }
    for rule in rules {
        let resource = rule["availableResource"].as_str().unwrap_or_default();
        // Credential Access Boundaries reach Cloud Storage only.
        if !resource.starts_with("//storage.googleapis.com/projects/_/buckets/") {
            return Err(format!(
                "availableResource {resource:?} is not a Cloud Storage bucket; Credential Access Boundaries support Cloud Storage only"
            ));
        }
        let permissions = rule["availablePermissions"].as_array();
        let roles_only = permissions.is_some_and(|permissions| {
            !permissions.is_empty()
                && permissions.iter().all(|p| {
                    p.as_str()
                        .and_then(|p| p.strip_prefix("inRole:"))
                        .is_some_and(|role| !role.is_empty())
                })
        });
        if !roles_only {
            return Err("availablePermissions must list roles as inRole:ROLE".into());
        }
        if let Some(condition) = rule.get("availabilityCondition") {
            let expression = condition["expression"].as_str().unwrap_or_default();
            if expression.trim().is_empty() {
                return Err("availabilityCondition needs an expression".into());
            }
        }
    }
    Ok(boundary)
}

/// The `sub` of an unexpired RS256 JWT that verifies with `public_key_der`.
fn jwt_subject(token: &str, public_key_der: &[u8]) -> Option<String> {
    let claims = jwt::verify_rs256(token, public_key_der).ok()?;
    let subject = claims["sub"].as_str().filter(|s| !s.is_empty())?;
    (claims["exp"].as_u64()? > unix_now()).then(|| subject.to_string())
}

/// The workforce refresh-token grant: the client in basic auth, then the
/// same checks as the OAuth endpoint's refresh grant.
pub(super) fn workforce_refresh(
    shared: &Shared,
    form: &HashMap<String, String>,
    headers: &HeaderMap,
) -> OAuthResult {
    if form.get("grant_type").map(String::as_str) != Some("refresh_token") {
        return Err(unsupported_grant(
            form.get("grant_type").map_or("", String::as_str),
        ));
    }
    let client = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|v| base64::engine::general_purpose::STANDARD.decode(v).ok())
        .and_then(|v| String::from_utf8(v).ok())
        .and_then(|pair| {
            let (id, secret) = pair.split_once(':')?;
            Some((id.to_string(), secret.to_string()))
        });
    let Some((client_id, client_secret)) = client else {
        return Err((
            401,
            "invalid_client",
            "The client must authenticate with HTTP basic auth.".into(),
        ));
    };
    let mut form = form.clone();
    form.insert("client_id".into(), client_id);
    form.insert("client_secret".into(), client_secret);
    google::refresh(shared, &form)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn principals_are_named_as_google_names_them() {
        assert_eq!(
            principal(
                "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/gh",
                "repo:o/r"
            ),
            "principal://iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/subject/repo:o/r"
        );
    }
}
