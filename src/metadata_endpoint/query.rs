//! The query of a token, identity or long-poll request, read as the
//! metadata server reads it: strictly, so that a token is never served for
//! a request that meant something else.

use std::time::Duration;

use crate::error::BrokerError;
use crate::request::{IdTokenFormat, TokenRequest};

/// The query's parameters, decoded as a form (`+` is a space). Bytes that
/// are not UTF-8 once decoded are refused, not replaced.
pub(super) fn parameters(query: &str) -> Result<Vec<(String, String)>, BrokerError> {
    form_urlencoded::parse(query.as_bytes())
        .map(|(name, value)| {
            if name.contains(char::REPLACEMENT_CHARACTER)
                || value.contains(char::REPLACEMENT_CHARACTER)
            {
                return Err(BrokerError::invalid(
                    "query",
                    "a parameter is not UTF-8 once decoded",
                ));
            }
            Ok((name.into_owned(), value.into_owned()))
        })
        .collect()
}

/// `…/token[?scopes=a,b]`: the scopes may also come in several `scopes`
/// parameters. Any other parameter is refused rather than ignored, so a
/// token is never served for a request that meant something else.
pub fn access_token_request(account: String, query: &str) -> Result<TokenRequest, BrokerError> {
    let mut scopes = Vec::new();
    for (name, value) in parameters(query)? {
        match name.as_str() {
            "scopes" => scopes.extend(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from),
            ),
            _ => return Err(unknown_parameter(&name, "scopes")),
        }
    }
    TokenRequest::access(account, scopes, Duration::ZERO)
}

/// `…/identity?audience=A[&format=standard|full][&licenses=TRUE|FALSE]`.
/// As on the metadata server, `licenses` counts only with `format=full`.
pub fn id_token_request(account: String, query: &str) -> Result<TokenRequest, BrokerError> {
    let mut audience = None;
    let mut format = IdTokenFormat::Standard;
    let mut licenses = false;
    for (name, value) in parameters(query)? {
        match name.as_str() {
            "audience" if audience.is_some() => {
                return Err(BrokerError::invalid("audience", "given more than once"));
            }
            "audience" => audience = Some(value),
            "format" => {
                format = match value.as_str() {
                    "standard" => IdTokenFormat::Standard,
                    "full" => IdTokenFormat::Full,
                    _ => return Err(BrokerError::invalid("format", "use standard or full")),
                }
            }
            "licenses" => {
                licenses = match value.to_ascii_uppercase().as_str() {
                    "TRUE" => true,
                    "FALSE" => false,
                    _ => return Err(BrokerError::invalid("licenses", "use TRUE or FALSE")),
                }
            }
            _ => return Err(unknown_parameter(&name, "audience, format, licenses")),
        }
    }
    let audience = audience
        .filter(|a| !a.is_empty())
        .ok_or_else(|| BrokerError::invalid("audience", "non-empty audience parameter required"))?;
    let licenses = licenses && format == IdTokenFormat::Full;
    TokenRequest::id(audience, account, format, licenses, Duration::ZERO)
}

fn unknown_parameter(name: &str, accepted: &str) -> BrokerError {
    BrokerError::invalid(
        "query",
        format!("unknown parameter {name:?}; this endpoint accepts {accepted}"),
    )
}

#[cfg(test)]
mod tests {
    use http::StatusCode;

    use super::*;
    use crate::request::TokenKey;

    #[test]
    fn token_queries_become_requests() {
        let request = access_token_request(
            "default".into(),
            "scopes=https%3A%2F%2Fwww.googleapis.com%2Fauth%2Fcloud-platform,b&scopes=c",
        )
        .unwrap();
        let TokenKey::Access(key) = request.key else {
            panic!("an access token");
        };
        assert_eq!(
            key.scopes,
            ["b", "c", "https://www.googleapis.com/auth/cloud-platform"]
        );
        let TokenKey::Access(key) = access_token_request("default".into(), "").unwrap().key else {
            panic!("an access token");
        };
        assert!(key.scopes.is_empty());
        let unknown = access_token_request("default".into(), "scope=x").unwrap_err();
        assert!(unknown.to_string().contains("\"scope\""), "{unknown}");
        assert!(access_token_request("default".into(), "scopes=%FF").is_err());
    }

    #[test]
    fn identity_queries_become_requests() {
        let request = id_token_request(
            "default".into(),
            "audience=https%3A%2F%2Fsvc.a.run.app&format=full&licenses=TRUE",
        )
        .unwrap();
        let TokenKey::Id(key) = request.key else {
            panic!("an ID token");
        };
        assert_eq!(key.audience, "https://svc.a.run.app");
        assert_eq!(key.format, IdTokenFormat::Full);
        assert!(key.include_licenses);
        // Like the metadata server: licenses only count with format=full.
        let standard = id_token_request("default".into(), "audience=a&licenses=TRUE").unwrap();
        let TokenKey::Id(key) = standard.key else {
            panic!("an ID token");
        };
        assert!(!key.include_licenses);
        for bad in [
            "",
            "audience=",
            "audience=a&audience=b",
            "audience=a&format=x",
            "audience=a&licenses=yes",
            "audience=a&aud=b",
        ] {
            let error = id_token_request("default".into(), bad).unwrap_err();
            assert_eq!(error.http_status().0, StatusCode::BAD_REQUEST, "{bad}");
        }
    }
}
