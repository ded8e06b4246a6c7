//! What every token source checks in an answer before it becomes a
//! token: its size, `Retry-After`, the access-token JSON and the ID-token
//! JWT (audience, expiry), and that an access token is printable; and how
//! a transport error is told.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use http::{HeaderMap, header};
use serde::Deserialize;

use crate::error::FetchError;
use crate::secret::Secret;
use crate::sources::jwt;
use crate::token::Token;

/// Largest response accepted (64 KiB); a token is a few KiB at most.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// Longest lifetime a token may claim (1 day); anything later is refused.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

#[derive(Deserialize)]
struct AccessTokenBody {
    access_token: String,
    expires_in: Option<i64>,
    #[serde(default)]
    token_type: String,
}

/// Reads `{"access_token", "expires_in", "token_type"}`.
pub(crate) fn parse_access_token(
    body: &[u8],
    fetched_at: (Instant, SystemTime),
) -> Result<Token, FetchError> {
    parse_access_token_or(body, fetched_at, None)
}

/// Reads `{"access_token", "expires_in", "token_type"}` where `expires_in`
/// may be left out: the token then lives `otherwise` (when given).
pub(crate) fn parse_access_token_or(
    body: &[u8],
    fetched_at: (Instant, SystemTime),
    otherwise: Option<Duration>,
) -> Result<Token, FetchError> {
    let parsed: AccessTokenBody = serde_json::from_slice(body).map_err(|_| {
        FetchError::Malformed("not the expected JSON (access_token, expires_in, token_type)".into())
    })?;
    check_printable("access_token", &parsed.access_token)?;
    let lifetime = match parsed.expires_in {
        Some(seconds) => u64::try_from(seconds).ok().map(Duration::from_secs),
        None => otherwise,
    };
    let lifetime = lifetime
        .filter(|lifetime| !lifetime.is_zero() && *lifetime <= MAX_TOKEN_LIFETIME)
        .ok_or_else(|| {
            FetchError::Malformed(match parsed.expires_in {
                Some(seconds) => format!("expires_in {seconds} is not a sane lifetime"),
                None => {
                    "not the expected JSON (access_token, expires_in, token_type): no expires_in"
                        .to_string()
                }
            })
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

/// An error and its causes on one line (hyper's own message is terse).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

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

    #[test]
    fn a_downscoped_answer_without_expires_in_lives_as_long_as_its_source() {
        let now = (Instant::now(), SystemTime::now());
        let body = br#"{"access_token":"ya29.down","token_type":"Bearer"}"#;
        let left = Duration::from_secs(1234);
        let token = parse_access_token_or(body, now, Some(left)).unwrap();
        assert_eq!(token.remaining(now.0), left);
        let with = br#"{"access_token":"ya29.down","expires_in":60}"#;
        let token = parse_access_token_or(with, now, Some(left)).unwrap();
        assert_eq!(
            token.remaining(now.0),
            Duration::from_secs(60),
            "STS's own wins"
        );
        let expired = parse_access_token_or(body, now, Some(Duration::ZERO));
        assert!(
            expired.is_err(),
            "a source token already gone gives nothing"
        );
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
