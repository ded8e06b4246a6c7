//! The GCE metadata server client: builds the token and identity URLs, sends
//! `Metadata-Flavor: Google`, and refuses any response it cannot trust.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use http::{HeaderMap, Request, StatusCode, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::Deserialize;
use tokio::time::Instant;

use crate::https::error_chain;
use crate::jwt;
use crate::request::{AccessTokenKey, IdTokenFormat, IdTokenKey, TokenKey};
use crate::secret::Secret;
use crate::token::Token;
use crate::upstream::{FetchError, TokenSource};

/// The metadata server's host name, used unless `GCE_METADATA_HOST` is set.
pub const DEFAULT_METADATA_HOST: &str = "metadata.google.internal";
/// Default time one upstream request may take, connect to last byte: 5 s.
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest response accepted (64 KiB); a token is a few KiB at most.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// Longest lifetime a token may claim (1 day); anything later is refused.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

const ACCOUNTS_PATH: &str = "/computeMetadata/v1/instance/service-accounts/";
const FLAVOR: &str = "metadata-flavor";

/// Characters left as they are in a query value: RFC 3986 unreserved.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Fetches tokens from a metadata server over plain HTTP.
#[derive(Clone, Debug)]
pub struct MetadataClient {
    host: String,
    http: Client<HttpConnector, Empty<Bytes>>,
    timeout: Duration,
}

impl MetadataClient {
    /// A client for `host` (`host[:port]`, as in `GCE_METADATA_HOST`) whose
    /// requests each take at most `timeout`.
    pub fn new(host: &str, timeout: Duration) -> Result<Self, String> {
        let authority: http::uri::Authority = host.parse().map_err(|_| {
            format!("metadata host {host:?} is not host[:port] (no scheme, no path)")
        })?;
        if authority.as_str().contains('@') {
            return Err(format!("metadata host {host:?} must not hold user info"));
        }
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Self {
            host: authority.to_string(),
            http,
            timeout,
        })
    }

    /// The host (and port) requests go to.
    pub fn host(&self) -> &str {
        &self.host
    }

    async fn fetch_token(&self, key: &TokenKey) -> Result<Token, FetchError> {
        let fetched_at = (Instant::now(), SystemTime::now());
        let url = format!("http://{}{}", self.host, path_and_query(key));
        let body = tokio::time::timeout(self.timeout, self.get(&url))
            .await
            .map_err(|_| FetchError::Timeout(self.timeout))??;
        match key {
            TokenKey::Access(_) => parse_access_token(&body, fetched_at),
            TokenKey::Id(key) => parse_id_token(&body, &key.audience),
        }
    }

    /// Checks that a metadata server answers at all (listing the service
    /// accounts, which costs no token): any status but a 5xx, with the
    /// `Metadata-Flavor: Google` header, counts.
    pub async fn probe(&self) -> Result<(), FetchError> {
        let url = format!("http://{}{ACCOUNTS_PATH}", self.host);
        let response = tokio::time::timeout(self.timeout, self.send(&url))
            .await
            .map_err(|_| FetchError::Timeout(self.timeout))??;
        if response.status().is_server_error() {
            return Err(FetchError::Status {
                status: response.status().as_u16(),
                retry_after: retry_after(response.headers()),
                detail: None,
            });
        }
        check_flavor(response.headers())
    }

    /// Sends `GET {path_and_query}` on a caller's behalf (the
    /// metadata-compatible endpoint's pass-through) and returns the answer
    /// whatever its status, if it comes within `timeout` from a server that
    /// says it is a metadata server.
    pub async fn forward(
        &self,
        path_and_query: &str,
        timeout: Duration,
    ) -> Result<Forwarded, FetchError> {
        let url = format!("http://{}{path_and_query}", self.host);
        let forward = async {
            let response = self.send(&url).await?;
            check_flavor(response.headers())?;
            let status = response.status();
            let mut headers = HeaderMap::new();
            for name in FORWARDED_HEADERS {
                if let Some(value) = response.headers().get(&name) {
                    headers.insert(name, value.clone());
                }
            }
            let body = read_body(response.into_body(), MAX_FORWARDED_BYTES).await?;
            Ok(Forwarded {
                status,
                headers,
                body,
            })
        };
        tokio::time::timeout(timeout, forward)
            .await
            .map_err(|_| FetchError::Timeout(timeout))?
    }

    async fn send(&self, url: &str) -> Result<http::Response<Incoming>, FetchError> {
        let request = Request::get(url)
            .header(FLAVOR, "Google")
            .header(
                header::USER_AGENT,
                concat!("tokenbroker/", env!("CARGO_PKG_VERSION")),
            )
            .body(Empty::new())
            .map_err(|e| FetchError::Malformed(format!("cannot build request: {e}")))?;
        self.http
            .request(request)
            .await
            .map_err(|e| FetchError::Connect(format!("the metadata server: {}", error_chain(&e))))
    }

    async fn get(&self, url: &str) -> Result<Bytes, FetchError> {
        let response = self.send(url).await?;
        let status = response.status();
        if status != StatusCode::OK {
            return Err(FetchError::Status {
                status: status.as_u16(),
                retry_after: retry_after(response.headers()),
                detail: None,
            });
        }
        check_flavor(response.headers())?;
        read_body(response.into_body(), MAX_RESPONSE_BYTES).await
    }
}

/// A metadata server's answer to a forwarded request.
#[derive(Debug)]
pub struct Forwarded {
    /// Its status, passed on as it is.
    pub status: StatusCode,
    /// The headers worth passing on ([`FORWARDED_HEADERS`]).
    pub headers: HeaderMap,
    /// Its body.
    pub body: Bytes,
}

/// The response headers a forwarded answer keeps.
pub const FORWARDED_HEADERS: [header::HeaderName; 4] = [
    header::CONTENT_TYPE,
    header::ETAG,
    header::LOCATION,
    header::RETRY_AFTER,
];

/// Largest forwarded response (1 MiB): more than a recursive listing of a
/// VM's metadata, whose values are limited to 256 KiB each.
pub const MAX_FORWARDED_BYTES: usize = 1024 * 1024;

/// Reads a body of at most `limit` bytes.
async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, FetchError> {
    let body = Limited::new(body, limit).collect().await.map_err(|e| {
        if e.is::<http_body_util::LengthLimitError>() {
            FetchError::Malformed(format!("response larger than {limit} bytes"))
        } else {
            FetchError::Connect(format!(
                "the metadata server: connection broke while reading the response: {e}"
            ))
        }
    })?;
    Ok(body.to_bytes())
}

impl TokenSource for MetadataClient {
    fn fetch<'a>(&'a self, key: &'a TokenKey) -> BoxFuture<'a, Result<Token, FetchError>> {
        self.fetch_token(key).boxed()
    }
}

/// The path and query for a key. Query values are percent-encoded; the
/// account goes into the path as it is, validation having limited it to
/// characters that are literal in a path segment.
pub fn path_and_query(key: &TokenKey) -> String {
    let encode = |value: &str| utf8_percent_encode(value, QUERY_VALUE).to_string();
    match key {
        TokenKey::Access(AccessTokenKey { account, scopes }) => {
            let mut path = format!("{ACCOUNTS_PATH}{account}/token");
            if !scopes.is_empty() {
                let scopes: Vec<String> = scopes.iter().map(|s| encode(s)).collect();
                path.push_str("?scopes=");
                path.push_str(&scopes.join(","));
            }
            path
        }
        TokenKey::Id(IdTokenKey {
            account,
            audience,
            format,
            include_licenses,
        }) => {
            let mut path = format!(
                "{ACCOUNTS_PATH}{account}/identity?audience={}",
                encode(audience)
            );
            if *format == IdTokenFormat::Full {
                path.push_str("&format=full");
                if *include_licenses {
                    path.push_str("&licenses=TRUE");
                }
            }
            path
        }
    }
}

#[derive(Deserialize)]
struct AccessTokenBody {
    access_token: String,
    expires_in: i64,
    #[serde(default)]
    token_type: String,
}

/// Reads `{"access_token", "expires_in", "token_type"}`.
pub(crate) fn parse_access_token(
    body: &[u8],
    fetched_at: (Instant, SystemTime),
) -> Result<Token, FetchError> {
    let parsed: AccessTokenBody = serde_json::from_slice(body).map_err(|_| {
        FetchError::Malformed("not the expected JSON (access_token, expires_in, token_type)".into())
    })?;
    check_printable("access_token", &parsed.access_token)?;
    let lifetime = u64::try_from(parsed.expires_in)
        .ok()
        .map(Duration::from_secs)
        .filter(|lifetime| !lifetime.is_zero() && *lifetime <= MAX_TOKEN_LIFETIME)
        .ok_or_else(|| {
            FetchError::Malformed(format!(
                "expires_in {} is not a sane lifetime",
                parsed.expires_in
            ))
        })?;
    let token_type = if parsed.token_type.is_empty() {
        "Bearer".to_string()
    } else {
        parsed.token_type
    };
    Ok(Token::expiring_in(
        Secret::new(parsed.access_token),
        token_type,
        lifetime,
        fetched_at,
    ))
}

/// Reads a raw JWT body and checks its audience and expiry.
pub(crate) fn parse_id_token(body: &[u8], audience: &str) -> Result<Token, FetchError> {
    let jwt = std::str::from_utf8(body)
        .map_err(|_| FetchError::Malformed("identity response is not UTF-8".into()))?
        .trim();
    let claims = jwt::decode_claims(jwt).map_err(|e| FetchError::Malformed(e.to_string()))?;
    if !claims.aud.iter().any(|aud| aud == audience) {
        return Err(FetchError::Malformed(
            "the ID token's aud claim is not the audience asked for".into(),
        ));
    }
    let now = SystemTime::now();
    let expire_time = u64::try_from(claims.exp)
        .ok()
        .map(|exp| UNIX_EPOCH + Duration::from_secs(exp))
        .filter(|exp| *exp > now && *exp <= now + MAX_TOKEN_LIFETIME)
        .ok_or_else(|| {
            FetchError::Malformed(
                "the ID token's exp claim is in the past or more than a day away".into(),
            )
        })?;
    Ok(Token::expiring_at(
        Secret::new(jwt.to_string()),
        String::new(),
        expire_time,
    ))
}

/// Refuses an access token that is empty or not printable ASCII (it goes
/// into `Authorization` headers as it is); `field` names it in the error.
pub(crate) fn check_printable(field: &str, token: &str) -> Result<(), FetchError> {
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(FetchError::Malformed(format!(
            "{field} is empty or not printable ASCII"
        )));
    }
    Ok(())
}

fn check_flavor(headers: &HeaderMap) -> Result<(), FetchError> {
    if headers.get(FLAVOR).map(|v| v.as_bytes()) == Some(b"Google") {
        return Ok(());
    }
    Err(FetchError::Malformed(
        "no `Metadata-Flavor: Google` response header; is GCE_METADATA_HOST a metadata server?"
            .into(),
    ))
}

/// Longest `Retry-After` taken from the server (1 hour); more is read as
/// that, so a hostile value cannot overflow a clock.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// The `Retry-After` of a response, in seconds (dates are ignored), at
/// most [`MAX_RETRY_AFTER`].
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(header::RETRY_AFTER)?.to_str().ok()?;
    let seconds = value.trim().parse::<u64>().ok()?;
    Some(Duration::from_secs(seconds).min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::request::ServiceAccount;

    fn id_key(audience: &str, format: IdTokenFormat, include_licenses: bool) -> TokenKey {
        TokenKey::Id(IdTokenKey {
            account: ServiceAccount::Default,
            audience: audience.into(),
            format,
            include_licenses,
        })
    }

    #[test]
    fn access_token_url_lists_scopes() {
        let key = TokenKey::Access(AccessTokenKey {
            account: ServiceAccount::Email("a@b.iam.gserviceaccount.com".into()),
            scopes: vec![
                "https://www.googleapis.com/auth/cloud-platform".into(),
                "openid".into(),
            ],
        });
        assert_eq!(
            path_and_query(&key),
            "/computeMetadata/v1/instance/service-accounts/a@b.iam.gserviceaccount.com/token?scopes=https%3A%2F%2Fwww.googleapis.com%2Fauth%2Fcloud-platform,openid"
        );
        let defaults = TokenKey::Access(AccessTokenKey {
            account: ServiceAccount::Default,
            scopes: vec![],
        });
        assert_eq!(
            path_and_query(&defaults),
            "/computeMetadata/v1/instance/service-accounts/default/token"
        );
    }

    #[test]
    fn identity_url_encodes_the_audience() {
        let key = id_key("https://x.app/?a=1&b=2#f g", IdTokenFormat::Standard, false);
        assert_eq!(
            path_and_query(&key),
            "/computeMetadata/v1/instance/service-accounts/default/identity?audience=https%3A%2F%2Fx.app%2F%3Fa%3D1%26b%3D2%23f%20g"
        );
        let full = id_key("aud", IdTokenFormat::Full, true);
        assert!(path_and_query(&full).ends_with("audience=aud&format=full&licenses=TRUE"));
    }

    #[test]
    fn host_must_be_an_authority() {
        assert!(MetadataClient::new("169.254.169.254", DEFAULT_UPSTREAM_TIMEOUT).is_ok());
        assert!(MetadataClient::new("localhost:8080", DEFAULT_UPSTREAM_TIMEOUT).is_ok());
        for bad in ["http://x", "x/y", "user@x", ""] {
            assert!(
                MetadataClient::new(bad, DEFAULT_UPSTREAM_TIMEOUT).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn access_token_body_is_checked() {
        let now = (Instant::now(), SystemTime::now());
        let good = br#"{"access_token":"ya29.abc","expires_in":3599,"token_type":"Bearer"}"#;
        let token = parse_access_token(good, now).unwrap();
        assert_eq!(token.secret().expose(), "ya29.abc");
        assert_eq!(token.remaining(now.0), Duration::from_secs(3599));
        for bad in [
            &br#"{"access_token":"ya29.abc","expires_in":0}"#[..],
            br#"{"access_token":"ya29.abc","expires_in":-5}"#,
            br#"{"access_token":"ya29.abc","expires_in":999999}"#,
            br#"{"access_token":"","expires_in":10}"#,
            br#"{"access_token":"a b","expires_in":10}"#,
            br#"{"expires_in":10}"#,
            br#"{"access_token":"ya29.abc"}"#,
            b"<html>",
        ] {
            let error = parse_access_token(bad, now).unwrap_err();
            assert!(matches!(error, FetchError::Malformed(_)));
            assert!(!error.to_string().contains("ya29"), "{error}");
        }
    }

    fn jwt(claims: serde_json::Value) -> Vec<u8> {
        jwt::sign_hs256(&claims, b"key").into_bytes()
    }

    #[test]
    fn id_token_audience_and_expiry_are_checked() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let good = jwt(json!({"aud": "aud", "exp": now + 3600}));
        assert!(parse_id_token(&good, "aud").is_ok());
        let mut with_newline = good.clone();
        with_newline.push(b'\n');
        assert!(parse_id_token(&with_newline, "aud").is_ok());
        assert!(parse_id_token(&good, "other").is_err());
        assert!(parse_id_token(&jwt(json!({"aud": "aud", "exp": now - 1})), "aud").is_err());
        assert!(parse_id_token(&jwt(json!({"aud": "aud", "exp": now + 90_000})), "aud").is_err());
        assert!(parse_id_token(&jwt(json!({"aud": "aud"})), "aud").is_err());
        assert!(parse_id_token(b"not a jwt", "aud").is_err());
    }

    #[test]
    fn retry_after_in_seconds_is_read() {
        let mut headers = HeaderMap::new();
        assert_eq!(retry_after(&headers), None);
        headers.insert(header::RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
        headers.insert(header::RETRY_AFTER, u64::MAX.to_string().parse().unwrap());
        assert_eq!(retry_after(&headers), Some(MAX_RETRY_AFTER));
        headers.insert(
            header::RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&headers), None);
    }
}
