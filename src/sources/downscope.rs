//! Downscoping: an access token exchanged at Google STS for one limited to
//! a Credential Access Boundary (the token-exchange grant with the access
//! token as subject and the boundary in `options`). [`Downscoping`] adds
//! the exchange to any source; the cache calls it with the cached token of
//! a downscoped key's source key.

use std::time::SystemTime;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use http::Uri;
use tokio::time::Instant;

use crate::error::{BrokerError, FetchError};
use crate::request::TokenKey;
use crate::request::boundary::AccessBoundary;
use crate::sources::external::{ACCESS_TOKEN_TYPE, TOKEN_EXCHANGE_GRANT};
use crate::sources::https::{self, Auth, HttpsClient};
use crate::sources::response::parse_access_token_or;
use crate::token::Token;
use crate::upstream::TokenSource;

/// Google STS, unless `--sts-endpoint` says otherwise.
pub const DEFAULT_STS_ENDPOINT: &str = "https://sts.googleapis.com";

const SERVICE: &str = "Google STS";

/// Exchanges access tokens for downscoped ones at one STS endpoint.
#[derive(Clone)]
pub struct Downscoper {
    token_url: Uri,
    http: HttpsClient,
}

impl Downscoper {
    /// Exchanges at `{endpoint}/v1/token` (`--sts-endpoint`: https://, or
    /// http:// to a loopback address).
    pub fn new(endpoint: &str, http: HttpsClient) -> Result<Self, String> {
        let base = https::endpoint("--sts-endpoint", endpoint)?;
        let token_url = format!("{}/v1/token", base.to_string().trim_end_matches('/'))
            .parse()
            .map_err(|_| "--sts-endpoint cannot take the path /v1/token".to_string())?;
        Ok(Self { token_url, http })
    }

    /// Exchanges `subject` for a token limited to `boundary`; without
    /// `expires_in` it lives as long as `subject` (the cache cuts any
    /// downscoped token to its subject's expiry).
    pub async fn exchange(
        &self,
        boundary: &AccessBoundary,
        subject: &Token,
    ) -> Result<Token, FetchError> {
        let options = boundary.to_json().to_string();
        let pairs = [
            ("grant_type", TOKEN_EXCHANGE_GRANT),
            ("subject_token_type", ACCESS_TOKEN_TYPE),
            ("requested_token_type", ACCESS_TOKEN_TYPE),
            ("subject_token", subject.secret().expose()),
            ("options", options.as_str()),
        ];
        let fetched_at = (Instant::now(), SystemTime::now());
        let response = self
            .http
            .post_form(SERVICE, &self.token_url, &pairs, Auth::None)
            .await?;
        let subject_left = subject.remaining(fetched_at.0);
        parse_access_token_or(&response, fetched_at, Some(subject_left))
    }
}

/// A source that also downscopes: fetches through `inner`, exchanges
/// through a [`Downscoper`].
pub struct Downscoping<S> {
    inner: S,
    sts: Downscoper,
}

impl<S: TokenSource> Downscoping<S> {
    /// `inner`, with downscoped tokens from `sts`.
    pub fn new(inner: S, sts: Downscoper) -> Self {
        Self { inner, sts }
    }
}

impl<S: TokenSource> TokenSource for Downscoping<S> {
    fn fetch<'a>(&'a self, key: &'a TokenKey) -> BoxFuture<'a, Result<Token, FetchError>> {
        self.inner.fetch(key)
    }

    fn fetch_first<'a>(&'a self, key: &'a TokenKey) -> BoxFuture<'a, Result<Token, FetchError>> {
        self.inner.fetch_first(key)
    }

    fn downscope<'a>(
        &'a self,
        boundary: &'a AccessBoundary,
        subject: &'a Token,
        established: bool,
    ) -> BoxFuture<'a, Result<Token, FetchError>> {
        let _ = established;
        self.sts.exchange(boundary, subject).boxed()
    }

    fn admits(&self, key: &TokenKey) -> Result<(), BrokerError> {
        self.inner.admits(key)
    }
}
