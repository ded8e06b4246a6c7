//! Fakes of Google's OAuth token endpoint and IAM Credentials API that check
//! what they receive as the real ones do, and answer with their error
//! shapes: RS256 assertions verified with the registered public key and
//! their claims checked (`jwt-bearer` grant), refresh tokens matched
//! (`refresh_token` grant), and bearer tokens of IAM calls looked up among
//! the tokens the emulator issued.

use std::collections::{HashMap, HashSet};

use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::faults::{Target, respond};
use super::metadata_api::{id_token, issue_access_token};
use super::sts;
use super::{Body, Shared, parse_query, read_json, text, unix_now};
use crate::sources::jwt;

/// Path of the fake OAuth token endpoint.
pub const TOKEN_PATH: &str = "/token";
/// The grant that exchanges a signed JWT.
const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// Longest assertion lifetime Google accepts (1 hour).
const MAX_ASSERTION_SECS: u64 = 3600;
/// Clock skew allowed on `iat`.
const SKEW_SECS: u64 = 300;
/// The scope IAM Credentials calls need.
const CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";
const IAM_PREFIX: &str = "/v1/projects/-/serviceAccounts/";

/// Signs `claims` as an RS256 assertion with `key`, as a client of the
/// OAuth endpoint does (for tests that speak to the fake directly).
pub fn sign_assertion(claims: &Value, key_id: &str, key: &ring::rsa::KeyPair) -> String {
    jwt::sign_rs256(claims, key_id, key).expect("RSA signing with a valid key pair cannot fail")
}

/// A service-account key the OAuth endpoint trusts.
#[derive(Clone, Debug)]
pub struct RegisteredKey {
    /// The key's account.
    pub email: String,
    /// RSA public key, PKCS#1 DER.
    pub public_key_der: Vec<u8>,
}

/// A user whose refresh token the OAuth endpoint accepts (`PUT
/// /emulator/v1/users` takes it as JSON).
#[derive(Clone, Debug, Deserialize)]
pub struct User {
    /// The OAuth client the refresh token was issued to.
    pub client_id: String,
    /// That client's secret.
    pub client_secret: String,
    /// The refresh token.
    pub refresh_token: String,
    /// The user's email (what issued tokens belong to).
    pub email: String,
}

/// `PUT /emulator/v1/impersonable`: an account any valid access token may
/// impersonate.
#[derive(Clone, Debug, Deserialize)]
pub struct Impersonable {
    /// The account's email.
    pub email: String,
}

/// An IAM Credentials call the fake API granted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IamCall {
    /// `generateAccessToken` or `generateIdToken`.
    pub method: String,
    /// The impersonated account.
    pub target: String,
    /// Whose access token authorised the call.
    pub caller: String,
    /// The delegation chain, as sent.
    pub delegates: Vec<String>,
    /// The request body as received.
    pub body: Value,
}

/// What the fake APIs know.
#[derive(Default)]
pub(super) struct Accounts {
    pub(super) keys: HashMap<String, RegisteredKey>,
    pub(super) users: Vec<User>,
    pub(super) impersonable: HashSet<String>,
    pub(super) pools: HashMap<String, sts::Pool>,
    pub(super) calls: Vec<IamCall>,
}

/// Which fake API a request is for.
pub(super) enum Api {
    Token,
    Sts,
    WorkforceToken,
    GenerateAccessToken(String),
    GenerateIdToken(String),
}

impl Api {
    /// The API `method` and `path` address, if any.
    pub(super) fn of(method: &Method, path: &str) -> Option<Self> {
        if method != Method::POST {
            return None;
        }
        match path {
            TOKEN_PATH => return Some(Self::Token),
            sts::TOKEN_PATH => return Some(Self::Sts),
            sts::WORKFORCE_TOKEN_PATH => return Some(Self::WorkforceToken),
            _ => {}
        }
        let (account, verb) = path.strip_prefix(IAM_PREFIX)?.rsplit_once(':')?;
        match verb {
            "generateAccessToken" => Some(Self::GenerateAccessToken(account.to_string())),
            "generateIdToken" => Some(Self::GenerateIdToken(account.to_string())),
            _ => None,
        }
    }
}

/// Answers one request to a fake API.
pub(super) async fn serve(
    shared: &Shared,
    api: Api,
    request: Request<Incoming>,
) -> Result<Response<Body>, std::io::Error> {
    match api {
        Api::Token => {
            shared.count(|s| s.oauth_requests += 1);
            form_endpoint(shared, request, |shared, form, _| {
                match form.get("grant_type").map(String::as_str).unwrap_or("") {
                    JWT_BEARER => jwt_bearer(shared, form),
                    "refresh_token" => refresh(shared, form),
                    other => Err(unsupported_grant(other)),
                }
            })
            .await
        }
        Api::Sts => {
            shared.count(|s| s.sts_requests += 1);
            form_endpoint(shared, request, sts::exchange).await
        }
        Api::WorkforceToken => {
            shared.count(|s| s.sts_requests += 1);
            form_endpoint(shared, request, sts::workforce_refresh).await
        }
        Api::GenerateAccessToken(target) | Api::GenerateIdToken(target) if target.is_empty() => {
            shared.count(|s| s.iam_requests += 1);
            Ok(api_error(
                shared,
                400,
                "INVALID_ARGUMENT",
                "missing service account",
            ))
        }
        Api::GenerateAccessToken(target) => {
            shared.count(|s| s.iam_requests += 1);
            iam(shared, request, target, false).await
        }
        Api::GenerateIdToken(target) => {
            shared.count(|s| s.iam_requests += 1);
            iam(shared, request, target, true).await
        }
    }
}

/// `PUT /emulator/v1/keys`: trusts a service-account key file (its JSON as
/// the body), deriving the public key from its private key. For demos with
/// the standalone emulator; the key's `token_uri` must be the emulator's.
pub(super) async fn trust_key(shared: &Shared, request: Request<Incoming>) -> Response<Body> {
    let key: Value = match read_json(request).await {
        Ok(key) => key,
        Err(message) => return text(StatusCode::BAD_REQUEST, &message),
    };
    let field = |name: &str| key[name].as_str().filter(|v| !v.is_empty());
    let (Some(email), Some(key_id), Some(pem)) = (
        field("client_email"),
        field("private_key_id"),
        field("private_key"),
    ) else {
        return text(
            StatusCode::BAD_REQUEST,
            "a service-account key file: client_email, private_key_id and private_key required\n",
        );
    };
    let public_key = public_key_of(pem);
    let Some(public_key_der) = public_key else {
        return text(
            StatusCode::BAD_REQUEST,
            "private_key is not a PKCS#8 PEM RSA key\n",
        );
    };
    shared.lock().google.keys.insert(
        key_id.to_string(),
        RegisteredKey {
            email: email.to_string(),
            public_key_der,
        },
    );
    text(StatusCode::OK, "ok\n")
}

/// The RSA public key (PKCS#1 DER) of a PKCS#8 PEM private key.
pub(super) fn public_key_of(pem: &str) -> Option<Vec<u8>> {
    use rustls::pki_types::PrivatePkcs8KeyDer;
    use rustls::pki_types::pem::PemObject;
    PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes())
        .ok()
        .and_then(|der| ring::rsa::KeyPair::from_pkcs8(der.secret_pkcs8_der()).ok())
        .map(|pair| {
            ring::signature::KeyPair::public_key(&pair)
                .as_ref()
                .to_vec()
        })
}

// === OAuth token endpoint ===

/// An OAuth error: status, `error`, `error_description`.
pub(super) type OAuthError = (u16, &'static str, String);
/// What a grant answers: the JSON and the fault target it counts as.
pub(super) type OAuthResult = Result<(Value, Target), OAuthError>;

pub(super) fn unsupported_grant(grant: &str) -> OAuthError {
    (
        400,
        "unsupported_grant_type",
        format!("Invalid grant_type: {grant}"),
    )
}

/// The form fields that carry a credential.
const CREDENTIAL_FIELDS: [&str; 4] = [
    "assertion",
    "refresh_token",
    "client_secret",
    "subject_token",
];

/// Answers a form-encoded token request with `grant`'s answer (through
/// the faults), or an OAuth error.
async fn form_endpoint(
    shared: &Shared,
    request: Request<Incoming>,
    grant: impl FnOnce(&Shared, &HashMap<String, String>, &http::HeaderMap) -> OAuthResult,
) -> Result<Response<Body>, std::io::Error> {
    let headers = request.headers().clone();
    let form_ok = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    let body = read_body(request).await;
    let (Some(body), true) = (body, form_ok) else {
        return Ok(oauth_error(
            shared,
            400,
            "invalid_request",
            "Expected an application/x-www-form-urlencoded body.",
        ));
    };
    let form = parse_query(&body);
    for field in CREDENTIAL_FIELDS {
        if let Some(value) = form.get(field) {
            shared.remember_credential(value);
        }
    }
    if let Some(authorization) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        shared.remember_credential(authorization);
    }
    match grant(shared, &form, &headers) {
        Ok((body, target)) => {
            let fault = shared.lock().take_fault(target);
            let mut response = respond(shared, fault, |_| body.to_string()).await?;
            super::as_json(&mut response);
            Ok(response)
        }
        Err((status, error, description)) => Ok(oauth_error(shared, status, error, &description)),
    }
}

/// The `jwt-bearer` grant: verify the assertion, then issue what its
/// claims ask for.
fn jwt_bearer(shared: &Shared, form: &HashMap<String, String>) -> OAuthResult {
    const BAD_SIGNATURE: &str = "Invalid JWT Signature.";
    let invalid = |description: &str| (400, "invalid_grant", description.to_string());
    let assertion = form.get("assertion").ok_or_else(|| {
        (
            400,
            "invalid_request",
            "Missing required parameter: assertion".into(),
        )
    })?;
    let key_id = jwt::rs256_key_id(assertion).map_err(|_| invalid(BAD_SIGNATURE))?;
    let key = shared
        .lock()
        .google
        .keys
        .get(&key_id)
        .cloned()
        .ok_or_else(|| invalid(BAD_SIGNATURE))?;
    let claims =
        &jwt::verify_rs256(assertion, &key.public_key_der).map_err(|_| invalid(BAD_SIGNATURE))?;
    if claims["iss"] != key.email.as_str() {
        return Err(invalid(
            "Invalid JWT: iss is not the key's service account.",
        ));
    }
    if !claims["sub"].is_null() && claims["sub"] != key.email.as_str() {
        return Err(invalid(
            "Invalid JWT: sub is not the key's service account.",
        ));
    }
    let token_uri = format!("http://{}{TOKEN_PATH}", shared.addr);
    if claims["aud"] != token_uri.as_str() {
        return Err(invalid(&format!(
            "Invalid JWT: Failed audience check. The expected value was: {token_uri}"
        )));
    }
    let now = unix_now();
    let (Some(iat), Some(exp)) = (claims["iat"].as_u64(), claims["exp"].as_u64()) else {
        return Err(invalid("Invalid JWT: iat and exp are required."));
    };
    if iat > now + SKEW_SECS || exp <= now || exp <= iat || exp - iat > MAX_ASSERTION_SECS {
        return Err(invalid(
            "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. Check your iat and exp values in the JWT claim.",
        ));
    }
    let audience = claims["target_audience"].as_str().filter(|a| !a.is_empty());
    let scope = claims["scope"].as_str().filter(|s| !s.trim().is_empty());
    match (audience, scope) {
        (Some(audience), None) => Ok((
            json!({"id_token": id_token(shared, &key.email, audience, false, false, None)}),
            Target::Identity,
        )),
        (None, Some(scope)) => {
            let scopes = scope.split_whitespace().map(str::to_string).collect();
            let (token, lifetime) = issue_access_token(shared, &key.email, scopes);
            Ok((
                json!({"access_token": token, "expires_in": lifetime, "token_type": "Bearer"}),
                Target::Token,
            ))
        }
        _ => Err((
            400,
            "invalid_scope",
            "Invalid oauth scope or ID token audience provided.".into(),
        )),
    }
}

/// The `refresh_token` grant of user credentials.
pub(super) fn refresh(shared: &Shared, form: &HashMap<String, String>) -> OAuthResult {
    let field = |name: &str| form.get(name).map(String::as_str).unwrap_or("");
    let user = {
        let state = shared.lock();
        let client = state
            .google
            .users
            .iter()
            .filter(|u| u.client_id == field("client_id"))
            .find(|u| u.client_secret == field("client_secret"))
            .cloned();
        let Some(client) = client else {
            return Err((401, "invalid_client", "Unauthorized".into()));
        };
        state
            .google
            .users
            .iter()
            .find(|u| u.client_id == client.client_id && u.refresh_token == field("refresh_token"))
            .cloned()
            .ok_or((400, "invalid_grant", "Bad Request".to_string()))?
    };
    let scopes = match form.get("scope") {
        Some(scope) => scope.split_whitespace().map(str::to_string).collect(),
        None => vec![CLOUD_PLATFORM.to_string()],
    };
    let (token, lifetime) = issue_access_token(shared, &user.email, scopes);
    Ok((
        json!({"access_token": token, "expires_in": lifetime, "token_type": "Bearer"}),
        Target::Token,
    ))
}

fn oauth_error(shared: &Shared, status: u16, error: &str, description: &str) -> Response<Body> {
    shared.count(|s| s.google_rejected += 1);
    json_with_status(
        status,
        &json!({"error": error, "error_description": description}),
    )
}

// === IAM Credentials API ===

async fn iam(
    shared: &Shared,
    request: Request<Incoming>,
    target: String,
    id_token_wanted: bool,
) -> Result<Response<Body>, std::io::Error> {
    let bearer = super::bearer(request.headers()).map(str::to_string);
    let body: Result<Value, String> = read_json(request).await;
    if let Some(bearer) = &bearer {
        shared.remember_credential(bearer);
    }
    let caller = bearer.and_then(|token| shared.lock().issued.get(&token).cloned());
    let Some(caller) = caller.filter(|info| info.exp > unix_now()) else {
        return Ok(api_error(
            shared,
            401,
            "UNAUTHENTICATED",
            "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential.",
        ));
    };
    if !caller.scopes.iter().any(|s| s == CLOUD_PLATFORM) {
        return Ok(api_error(
            shared,
            403,
            "PERMISSION_DENIED",
            "Request had insufficient authentication scopes.",
        ));
    }
    let Ok(body) = body else {
        return Ok(api_error(
            shared,
            400,
            "INVALID_ARGUMENT",
            "Invalid JSON payload received.",
        ));
    };
    let method = if id_token_wanted {
        "generateIdToken"
    } else {
        "generateAccessToken"
    };
    let delegates = match delegates(&body) {
        Ok(delegates) => delegates,
        Err(message) => return Ok(api_error(shared, 400, "INVALID_ARGUMENT", &message)),
    };
    let allowed = {
        let state = shared.lock();
        let known = |email: &str| state.google.impersonable.contains(email);
        known(&target)
            && delegates.iter().all(|d| {
                d.strip_prefix("projects/-/serviceAccounts/")
                    .is_some_and(known)
            })
    };
    if !allowed {
        return Ok(api_error(
            shared,
            403,
            "PERMISSION_DENIED",
            &format!(
                "Permission 'iam.serviceAccounts.{}' denied on resource (or it may not exist).",
                if id_token_wanted {
                    "getOpenIdToken"
                } else {
                    "getAccessToken"
                }
            ),
        ));
    }
    let answer = if id_token_wanted {
        generate_id_token(shared, &target, &body)
    } else {
        generate_access_token(shared, &target, &body)
    };
    let (answer, kind) = match answer {
        Ok(answer) => answer,
        Err(message) => return Ok(api_error(shared, 400, "INVALID_ARGUMENT", &message)),
    };
    shared.lock().google.calls.push(IamCall {
        method: method.to_string(),
        target,
        caller: caller.email,
        delegates,
        body,
    });
    let fault = shared.lock().take_fault(kind);
    let mut response = respond(shared, fault, |_| answer.to_string()).await?;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        "application/json".parse().expect("valid header"),
    );
    Ok(response)
}

fn delegates(body: &Value) -> Result<Vec<String>, String> {
    match &body["delegates"] {
        Value::Null => Ok(Vec::new()),
        Value::Array(items) => items
            .iter()
            .map(|d| {
                d.as_str()
                    .filter(|d| d.starts_with("projects/-/serviceAccounts/"))
                    .map(str::to_string)
                    .ok_or_else(|| "delegates must be projects/-/serviceAccounts/EMAIL".to_string())
            })
            .collect(),
        _ => Err("delegates must be a list".into()),
    }
}

fn generate_access_token(
    shared: &Shared,
    target: &str,
    body: &Value,
) -> Result<(Value, Target), String> {
    let scopes: Vec<String> = body["scope"]
        .as_array()
        .map(|s| {
            s.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    if scopes.is_empty() {
        return Err("Scope required.".into());
    }
    if let Some(lifetime) = body["lifetime"].as_str() {
        let seconds = lifetime
            .strip_suffix('s')
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or("lifetime must be a duration such as \"3600s\"")?;
        if seconds == 0 || seconds > 3600 {
            return Err(format!(
                "The lifetime requested is not valid: {lifetime}; at most 3600s is allowed."
            ));
        }
    }
    let (token, lifetime) = issue_access_token(shared, target, scopes);
    let expire = std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix_now() + lifetime);
    Ok((
        json!({"accessToken": token, "expireTime": humantime::format_rfc3339_seconds(expire).to_string()}),
        Target::Token,
    ))
}

fn generate_id_token(
    shared: &Shared,
    target: &str,
    body: &Value,
) -> Result<(Value, Target), String> {
    let audience = body["audience"]
        .as_str()
        .filter(|a| !a.is_empty())
        .ok_or("audience is required")?;
    let token = id_token(shared, target, audience, false, false, None);
    Ok((json!({"token": token}), Target::Identity))
}

fn api_error(shared: &Shared, code: u16, status: &str, message: &str) -> Response<Body> {
    shared.count(|s| s.google_rejected += 1);
    json_with_status(
        code,
        &json!({"error": {"code": code, "message": message, "status": status}}),
    )
}

fn json_with_status(status: u16, body: &Value) -> Response<Body> {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
    super::json_answer(status, body)
}

async fn read_body(request: Request<Incoming>) -> Option<String> {
    use http_body_util::BodyExt;
    let body = http_body_util::Limited::new(request.into_body(), 64 * 1024)
        .collect()
        .await
        .ok()?
        .to_bytes();
    String::from_utf8(body.to_vec()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_routed_by_method_and_path() {
        assert!(matches!(Api::of(&Method::POST, "/token"), Some(Api::Token)));
        assert!(Api::of(&Method::GET, "/token").is_none());
        assert!(matches!(
            Api::of(
                &Method::POST,
                "/v1/projects/-/serviceAccounts/a@p.iam.gserviceaccount.com:generateIdToken"
            ),
            Some(Api::GenerateIdToken(target)) if target == "a@p.iam.gserviceaccount.com"
        ));
        assert!(matches!(
            Api::of(
                &Method::POST,
                "/v1/projects/-/serviceAccounts/a@b.c:generateAccessToken"
            ),
            Some(Api::GenerateAccessToken(_))
        ));
        assert!(
            Api::of(
                &Method::POST,
                "/v1/projects/-/serviceAccounts/a@b.c:signJwt"
            )
            .is_none()
        );
    }

    #[test]
    fn delegates_must_name_service_accounts() {
        assert_eq!(delegates(&json!({})), Ok(vec![]));
        assert_eq!(
            delegates(&json!({"delegates": ["projects/-/serviceAccounts/a@b.c"]})),
            Ok(vec!["projects/-/serviceAccounts/a@b.c".to_string()])
        );
        assert!(delegates(&json!({"delegates": ["a@b.c"]})).is_err());
        assert!(delegates(&json!({"delegates": "x"})).is_err());
    }
}
