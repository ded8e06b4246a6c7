//! Tokens from a service-account key: sign a JWT assertion with the key
//! (RS256) and exchange it at the key's own `token_uri` with the
//! `jwt-bearer` grant, as Google's "self-signed JWT" flow describes. A
//! `scope` claim gets an access token; a `target_audience` claim an ID
//! token.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use serde::Deserialize;
use serde_json::json;
use tokio::time::Instant;

use crate::error::BrokerError;
use crate::error::FetchError;
use crate::request::{IdTokenFormat, ServiceAccount, TokenKey};
use crate::sources::credentials::ServiceAccountKey;
use crate::sources::https::{Auth, HttpsClient};
use crate::sources::response::{parse_access_token, parse_id_token};
use crate::token::Token;
use crate::upstream::TokenSource;

/// The OAuth grant that exchanges a signed JWT for a token.
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// Scopes of an access token whose request names none.
pub const DEFAULT_SCOPES: &[&str] = &["https://www.googleapis.com/auth/cloud-platform"];
/// Lifetime asked for in assertions (1 hour, the most Google accepts).
pub const ASSERTION_LIFETIME: Duration = Duration::from_secs(3600);

const SERVICE: &str = "the OAuth token endpoint";

/// Fetches tokens with a service-account key.
#[derive(Clone)]
pub struct KeyFileSource {
    key: Arc<ServiceAccountKey>,
    http: HttpsClient,
}

impl KeyFileSource {
    /// A source signing with `key` and talking to its `token_uri` through
    /// `http`.
    pub fn new(key: ServiceAccountKey, http: HttpsClient) -> Self {
        Self {
            key: Arc::new(key),
            http,
        }
    }

    /// The key's account.
    pub fn email(&self) -> &str {
        &self.key.client_email
    }

    /// The source in words, for errors and logs (never the key).
    pub fn describe(&self) -> String {
        format!("the key file {}", self.key.path.display())
    }

    /// Checks that the key's token endpoint answers (a GET, which costs no
    /// token; any status but a 5xx counts).
    pub async fn probe(&self) -> Result<(), FetchError> {
        self.http.probe(SERVICE, &self.key.token_uri).await
    }

    /// The claims of an assertion for `key`, issued at `now`.
    fn claims(&self, key: &TokenKey, now: u64) -> Result<serde_json::Value, FetchError> {
        let mut claims = json!({
            "iss": self.key.client_email,
            "sub": self.key.client_email,
            "aud": self.key.token_uri.to_string(),
            "iat": now,
            "exp": now + ASSERTION_LIFETIME.as_secs(),
        });
        match key {
            TokenKey::Access(access) => {
                let scopes = if access.scopes.is_empty() {
                    DEFAULT_SCOPES.join(" ")
                } else {
                    access.scopes.join(" ")
                };
                claims["scope"] = json!(scopes);
            }
            TokenKey::Id(id) => claims["target_audience"] = json!(id.audience),
            TokenKey::Downscoped(_) => return Err(FetchError::downscoped_key()),
        }
        Ok(claims)
    }

    async fn fetch_token(&self, key: &TokenKey) -> Result<Token, FetchError> {
        let fetched_at = (Instant::now(), SystemTime::now());
        let now = fetched_at
            .1
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let signer = self
            .key
            .key_pair()
            .map_err(|reason| FetchError::Malformed(format!("cannot sign: {reason}")))?;
        let assertion = crate::sources::jwt::sign_rs256(
            &self.claims(key, now)?,
            &self.key.private_key_id,
            &signer,
        )
        .map_err(|e| FetchError::Malformed(e.to_string()))?;
        let pairs = [("grant_type", JWT_BEARER_GRANT), ("assertion", &assertion)];
        let response = self
            .http
            .post_form(SERVICE, &self.key.token_uri, &pairs, Auth::None)
            .await?;
        match key {
            TokenKey::Access(_) => parse_access_token(&response, fetched_at),
            TokenKey::Downscoped(_) => Err(FetchError::downscoped_key()),
            TokenKey::Id(id) => {
                let parsed: IdTokenBody = serde_json::from_slice(&response).map_err(|_| {
                    FetchError::Malformed("not the expected JSON ({\"id_token\": …})".into())
                })?;
                parse_id_token(parsed.id_token.as_bytes(), &id.audience)
            }
        }
    }
}

#[derive(Deserialize)]
struct IdTokenBody {
    id_token: String,
}

impl TokenSource for KeyFileSource {
    fn fetch<'a>(&'a self, key: &'a TokenKey) -> BoxFuture<'a, Result<Token, FetchError>> {
        self.fetch_token(key).boxed()
    }

    fn admits(&self, key: &TokenKey) -> Result<(), BrokerError> {
        admit_one_account(key, &self.key.client_email, || self.describe())
    }
}

/// Admits keys for `default` or `email` in standard format; names the
/// source (built by `describe`) when refusing.
pub fn admit_one_account(
    key: &TokenKey,
    email: &str,
    describe: impl Fn() -> String,
) -> Result<(), BrokerError> {
    match key.account() {
        ServiceAccount::Default => {}
        asked if asked.as_str() == email => {}
        asked => {
            return Err(BrokerError::AccountNotAvailable {
                account: asked.to_string(),
                source_name: describe(),
                allowed: email.to_string(),
            });
        }
    }
    if let TokenKey::Id(id) = key
        && id.format == IdTokenFormat::Full
    {
        return Err(BrokerError::Unsupported {
            source_name: describe(),
            what: "ID tokens in the full format",
            hint: "only the metadata server of a Compute Engine VM adds instance claims; ask for ID_TOKEN_FORMAT_STANDARD",
        });
    }
    Ok(())
}

/// Admits access tokens for `default` only and refuses ID tokens with
/// `id_token_hint`, for sources that stand for no service account (user
/// credentials, a federated principal); names the source (built by
/// `describe`) when refusing.
pub fn admit_default_access_tokens(
    key: &TokenKey,
    describe: impl Fn() -> String,
    id_token_hint: &'static str,
) -> Result<(), BrokerError> {
    if let TokenKey::Id(_) = key {
        return Err(BrokerError::Unsupported {
            source_name: describe(),
            what: "ID tokens",
            hint: id_token_hint,
        });
    }
    match key.account() {
        ServiceAccount::Default => Ok(()),
        asked => Err(BrokerError::AccountNotAvailable {
            account: asked.to_string(),
            source_name: describe(),
            allowed: "default".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::{AccessTokenKey, IdTokenKey};

    #[test]
    fn only_the_keys_own_account_is_admitted() {
        let email = "me@p.iam.gserviceaccount.com";
        let access = |account| {
            TokenKey::Access(AccessTokenKey {
                account,
                scopes: vec![],
            })
        };
        let describe = || "the key file k.json".to_string();
        assert!(admit_one_account(&access(ServiceAccount::Default), email, describe).is_ok());
        assert!(
            admit_one_account(
                &access(ServiceAccount::Email(email.into())),
                email,
                describe
            )
            .is_ok()
        );
        let error = admit_one_account(
            &access(ServiceAccount::Email(
                "other@p.iam.gserviceaccount.com".into(),
            )),
            email,
            describe,
        )
        .unwrap_err();
        assert!(matches!(error, BrokerError::AccountNotAvailable { .. }));
        let full = TokenKey::Id(IdTokenKey {
            account: ServiceAccount::Default,
            audience: "aud".into(),
            format: IdTokenFormat::Full,
            include_licenses: false,
        });
        assert!(matches!(
            admit_one_account(&full, email, describe),
            Err(BrokerError::Unsupported { .. })
        ));
    }
}
