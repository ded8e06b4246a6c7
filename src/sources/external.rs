//! Workload Identity Federation (`"type": "external_account"`): a subject
//! token from outside Google Cloud ([`subject`]) exchanged at Google STS
//! for a federated access token, with the RFC 8693 token-exchange grant.
//! Impersonation on top (the file's `service_account_impersonation_url`)
//! is [`crate::sources::impersonate`], with this source as its base.

pub mod aws;
pub mod executable;
pub mod subject;

use std::sync::Arc;
use std::time::SystemTime;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use serde_json::json;
use tokio::time::Instant;

use crate::error::{BrokerError, FetchError};
use crate::request::TokenKey;
use crate::sources::credentials::external::ExternalAccount;
use crate::sources::https::{Auth, HttpsClient};
use crate::sources::keyfile::{DEFAULT_SCOPES, admit_default_access_tokens};
use crate::sources::response::parse_access_token;
use crate::token::Token;
use crate::upstream::TokenSource;

/// The RFC 8693 grant.
pub const TOKEN_EXCHANGE_GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// What STS is asked for.
pub const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";

const SERVICE: &str = "Google STS";

/// Federated access tokens for an `external_account` file.
#[derive(Clone)]
pub struct ExternalSource {
    account: Arc<ExternalAccount>,
    http: HttpsClient,
}

impl ExternalSource {
    /// A source exchanging `account`'s subject tokens through `http`.
    pub fn new(account: ExternalAccount, http: HttpsClient) -> Self {
        Self {
            account: Arc::new(account),
            http,
        }
    }

    /// The source in words (never a token).
    pub fn describe(&self) -> String {
        format!(
            "Workload Identity Federation {} ({}, subject token from {})",
            self.account.path.display(),
            self.account.audience,
            subject::describe(&self.account)
        )
    }

    /// Checks that STS answers (a GET; any status but a 5xx counts).
    pub async fn probe(&self) -> Result<(), FetchError> {
        self.http.probe(SERVICE, &self.account.token_url).await
    }

    async fn fetch_token(&self, key: &TokenKey) -> Result<Token, FetchError> {
        let TokenKey::Access(access) = key else {
            return Err(FetchError::Malformed(
                "Google STS mints no ID tokens".into(),
            ));
        };
        let subject_token = subject::read(&self.account, &self.http).await?;
        let fetched_at = (Instant::now(), SystemTime::now());
        let scopes = if access.scopes.is_empty() {
            DEFAULT_SCOPES.join(" ")
        } else {
            access.scopes.join(" ")
        };
        let account = &self.account;
        // A workforce pool bills its user project, unless a client
        // authenticates (as in Google's libraries).
        let options = account
            .workforce_pool_user_project
            .as_ref()
            .filter(|_| account.client.is_none())
            .map(|project| json!({"userProject": project}).to_string());
        let auth = match &account.client {
            Some((id, secret)) => Auth::Basic {
                user: id,
                password: secret,
            },
            None => Auth::None,
        };
        let mut pairs = vec![
            ("grant_type", TOKEN_EXCHANGE_GRANT),
            ("audience", account.audience.as_str()),
            ("requested_token_type", ACCESS_TOKEN_TYPE),
            ("scope", scopes.as_str()),
            ("subject_token", subject_token.expose()),
            ("subject_token_type", account.subject_token_type.as_str()),
        ];
        if let Some(options) = &options {
            pairs.push(("options", options));
        }
        let response = self
            .http
            .post_form(SERVICE, &account.token_url, &pairs, auth)
            .await?;
        parse_access_token(&response, fetched_at)
    }
}

impl TokenSource for ExternalSource {
    fn fetch<'a>(&'a self, key: &'a TokenKey) -> BoxFuture<'a, Result<Token, FetchError>> {
        self.fetch_token(key).boxed()
    }

    fn admits(&self, key: &TokenKey) -> Result<(), BrokerError> {
        admit_default_access_tokens(
            key,
            || self.describe(),
            "a federated token cannot mint ID tokens; add \"service_account_impersonation_url\" to the credentials file (gcloud's --service-account flag writes it), and give the federated principal roles/iam.serviceAccountOpenIdTokenCreator on that account",
        )
    }
}
