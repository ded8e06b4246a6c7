//! Impersonation: tokens of another service account, minted by the IAM
//! Credentials API (`generateAccessToken`, `generateIdToken`) on the
//! strength of the base source's access token (cloud-platform scope).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use http::Uri;
use serde::Deserialize;
use serde_json::json;
use tokio::time::Instant;

use crate::error::BrokerError;
use crate::error::FetchError;
use crate::request::{AccessTokenKey, ServiceAccount, TokenKey};
use crate::secret::Secret;
use crate::sources::credentials::{DEFAULT_IMPERSONATED_LIFETIME, ImpersonationUrl};
use crate::sources::https::{Auth, HttpsClient};
use crate::sources::keyfile::{DEFAULT_SCOPES, admit_one_account};
use crate::sources::response::{MAX_TOKEN_LIFETIME, check_printable, parse_id_token};
use crate::token::Token;
use crate::upstream::TokenSource;

/// Google's IAM Credentials API, unless `--iam-endpoint` says otherwise.
pub const DEFAULT_IAM_ENDPOINT: &str = "https://iamcredentials.googleapis.com";
/// The base token is fetched again when it has less than this left (5 min).
pub const BASE_TOKEN_MARGIN: Duration = Duration::from_secs(300);

const SERVICE: &str = "the IAM Credentials API";

/// Mints tokens for one account through the IAM Credentials API.
pub struct ImpersonatedSource {
    base: Arc<BaseToken>,
    url: ImpersonationUrl,
    delegates: Vec<String>,
    /// Lifetime asked for access tokens.
    lifetime: Duration,
    http: HttpsClient,
}

/// The access token (cloud-platform scope) that authorises calls to the
/// IAM Credentials API, from a base source, shared by every impersonation
/// built on it.
pub struct BaseToken {
    source: Arc<dyn TokenSource>,
    /// The latest token, reused while it lasts. An async lock, held across
    /// the fetch, so that concurrent fetches of several keys share one
    /// base token fetch.
    cached: tokio::sync::Mutex<Option<Arc<Token>>>,
}

impl BaseToken {
    /// The tokens of `source`'s default account.
    pub fn new(source: Arc<dyn TokenSource>) -> Self {
        Self {
            source,
            cached: tokio::sync::Mutex::new(None),
        }
    }

    /// The base token, fetched again when close to expiry.
    async fn get(&self) -> Result<Arc<Token>, FetchError> {
        let mut cached = self.cached.lock().await;
        if let Some(token) = cached
            .as_ref()
            .filter(|t| t.remaining(Instant::now()) > BASE_TOKEN_MARGIN)
        {
            return Ok(token.clone());
        }
        let key = TokenKey::Access(AccessTokenKey {
            account: ServiceAccount::Default,
            scopes: DEFAULT_SCOPES.iter().map(|s| s.to_string()).collect(),
        });
        let token = Arc::new(self.source.fetch(&key).await?);
        *cached = Some(token.clone());
        Ok(token)
    }

    /// `refused` was turned away: fetch a new one next time (unless
    /// another fetch already replaced it).
    async fn refused(&self, refused: &Arc<Token>) {
        let mut cached = self.cached.lock().await;
        if cached.as_ref().is_some_and(|t| Arc::ptr_eq(t, refused)) {
            *cached = None;
        }
    }
}

impl ImpersonatedSource {
    /// Impersonates `target` (through the chain `delegates`, emails) at the
    /// IAM Credentials API under `endpoint` (`--impersonate`), authorised
    /// by `base`'s access tokens, which live an hour.
    pub fn new(
        base: Arc<dyn TokenSource>,
        target: &str,
        delegates: Vec<String>,
        endpoint: &Uri,
        http: HttpsClient,
    ) -> Result<Self, String> {
        Self::sharing(
            Arc::new(BaseToken::new(base)),
            target,
            delegates,
            endpoint,
            http,
        )
    }

    /// [`ImpersonatedSource::new`] authorised by a `base` token shared
    /// with other impersonations.
    pub fn sharing(
        base: Arc<BaseToken>,
        target: &str,
        delegates: Vec<String>,
        endpoint: &Uri,
        http: HttpsClient,
    ) -> Result<Self, String> {
        let url = |method: &str| {
            let base = endpoint.to_string();
            format!(
                "{}/v1/projects/-/serviceAccounts/{target}:{method}",
                base.trim_end_matches('/'),
            )
            .parse()
            .map_err(|_| format!("--impersonate {target:?} is not a service account email"))
        };
        let url = ImpersonationUrl {
            target: target.to_string(),
            access: url("generateAccessToken")?,
            id: url("generateIdToken")?,
        };
        Ok(Self {
            base,
            url,
            delegates,
            lifetime: DEFAULT_IMPERSONATED_LIFETIME,
            http,
        })
    }

    /// Impersonates at the URLs a credentials file names, asking for access
    /// tokens that live `lifetime`.
    pub fn at(
        base: Arc<dyn TokenSource>,
        url: ImpersonationUrl,
        delegates: Vec<String>,
        lifetime: Duration,
        http: HttpsClient,
    ) -> Self {
        Self {
            base: Arc::new(BaseToken::new(base)),
            url,
            delegates,
            lifetime,
            http,
        }
    }

    /// The impersonated account.
    pub fn target(&self) -> &str {
        &self.url.target
    }

    /// The source in words.
    pub fn describe(&self) -> String {
        format!("impersonation of {}", self.url.target)
    }

    /// Checks that the IAM Credentials API answers (a GET of its root; any
    /// status but a 5xx counts).
    pub async fn probe(&self) -> Result<(), FetchError> {
        let root = self
            .url
            .access
            .authority()
            .map_or_else(String::new, |authority| {
                format!(
                    "{}://{authority}/",
                    self.url.access.scheme_str().unwrap_or("https")
                )
            });
        let root = root
            .parse()
            .map_err(|_| FetchError::Malformed("cannot build the IAM Credentials URL".into()))?;
        self.http.probe(SERVICE, &root).await
    }

    fn delegate_names(&self) -> Vec<String> {
        self.delegates
            .iter()
            .map(|email| format!("projects/-/serviceAccounts/{email}"))
            .collect()
    }

    async fn fetch_token(&self, key: &TokenKey) -> Result<Token, FetchError> {
        let bearer = self.base.get().await?;
        let (url, body) = match key {
            TokenKey::Access(access) => {
                let scopes: Vec<&str> = if access.scopes.is_empty() {
                    DEFAULT_SCOPES.to_vec()
                } else {
                    access.scopes.iter().map(String::as_str).collect()
                };
                let lifetime = format!("{}s", self.lifetime.as_secs());
                let mut body = json!({"scope": scopes, "lifetime": lifetime});
                if !self.delegates.is_empty() {
                    body["delegates"] = json!(self.delegate_names());
                }
                (&self.url.access, body)
            }
            TokenKey::Id(id) => {
                let mut body = json!({"audience": id.audience, "includeEmail": true});
                if !self.delegates.is_empty() {
                    body["delegates"] = json!(self.delegate_names());
                }
                (&self.url.id, body)
            }
            TokenKey::Downscoped(_) => return Err(FetchError::downscoped_key()),
        };
        let fetched_at = SystemTime::now();
        let response = self
            .http
            .post(
                SERVICE,
                url,
                "application/json",
                Bytes::from(body.to_string()),
                Auth::Bearer(bearer.secret()),
            )
            .await;
        if let Err(FetchError::Status { status: 401, .. }) = &response {
            self.base.refused(&bearer).await;
        }
        let response = response?;
        match key {
            TokenKey::Access(_) => parse_generated_access_token(&response, fetched_at),
            TokenKey::Downscoped(_) => Err(FetchError::downscoped_key()),
            TokenKey::Id(id) => {
                let parsed: GeneratedIdToken = serde_json::from_slice(&response).map_err(|_| {
                    FetchError::Malformed("not the expected JSON ({\"token\": …})".into())
                })?;
                parse_id_token(parsed.token.as_bytes(), &id.audience)
            }
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GeneratedAccessToken {
    access_token: String,
    expire_time: String,
}

#[derive(Deserialize)]
struct GeneratedIdToken {
    token: String,
}

/// Reads `{"accessToken", "expireTime"}` (RFC 3339).
fn parse_generated_access_token(body: &[u8], now: SystemTime) -> Result<Token, FetchError> {
    let parsed: GeneratedAccessToken = serde_json::from_slice(body).map_err(|_| {
        FetchError::Malformed("not the expected JSON (accessToken, expireTime)".into())
    })?;
    check_printable("accessToken", &parsed.access_token)?;
    let expire_time = humantime::parse_rfc3339_weak(&parsed.expire_time)
        .ok()
        .filter(|t| *t > now && *t <= now + MAX_TOKEN_LIFETIME)
        .ok_or_else(|| {
            FetchError::Malformed("expireTime is not an RFC 3339 time within the next day".into())
        })?;
    Ok(Token::expiring_at(
        Secret::new(parsed.access_token),
        "Bearer".into(),
        expire_time,
    ))
}

impl TokenSource for ImpersonatedSource {
    fn fetch<'a>(&'a self, key: &'a TokenKey) -> BoxFuture<'a, Result<Token, FetchError>> {
        self.fetch_token(key).boxed()
    }

    fn admits(&self, key: &TokenKey) -> Result<(), BrokerError> {
        admit_one_account(key, &self.url.target, || self.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::https::proxy::Proxy;

    #[test]
    fn generated_access_tokens_are_checked() {
        let now = SystemTime::now();
        let in_an_hour = humantime::format_rfc3339_seconds(now + Duration::from_secs(3600));
        let good = format!(r#"{{"accessToken":"ya29.x","expireTime":"{in_an_hour}"}}"#);
        let token = parse_generated_access_token(good.as_bytes(), now).unwrap();
        assert_eq!(token.secret().expose(), "ya29.x");
        assert_eq!(token.token_type(), "Bearer");
        let past = humantime::format_rfc3339_seconds(now - Duration::from_secs(10));
        for bad in [
            format!(r#"{{"accessToken":"ya29.x","expireTime":"{past}"}}"#),
            r#"{"accessToken":"ya29.x","expireTime":"tomorrow"}"#.to_string(),
            format!(r#"{{"accessToken":"","expireTime":"{in_an_hour}"}}"#),
            r#"{"token":"x"}"#.to_string(),
        ] {
            let error = parse_generated_access_token(bad.as_bytes(), now).unwrap_err();
            assert!(!error.to_string().contains("ya29"), "{error}");
        }
    }

    /// A base source counting its fetches, each a bit slow.
    struct CountingBase(std::sync::atomic::AtomicUsize);

    impl TokenSource for CountingBase {
        fn fetch<'a>(&'a self, _key: &'a TokenKey) -> BoxFuture<'a, Result<Token, FetchError>> {
            async move {
                let n = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
                Ok(Token::expiring_in(
                    Secret::new(format!("base-{n}")),
                    "Bearer".into(),
                    Duration::from_secs(3600),
                    (Instant::now(), SystemTime::now()),
                ))
            }
            .boxed()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_fetches_share_one_base_token() {
        let base = Arc::new(CountingBase(Default::default()));
        let source = Arc::new(
            ImpersonatedSource::new(
                base.clone(),
                "t@p.iam.gserviceaccount.com",
                vec![],
                &"http://127.0.0.1:1".parse().unwrap(),
                HttpsClient::new(Duration::from_secs(1), Proxy::none()).unwrap(),
            )
            .unwrap(),
        );
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let source = source.clone();
                tokio::spawn(async move { source.base.get().await.unwrap() })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.unwrap().secret().expose(), "base-0");
        }
        assert_eq!(base.0.load(std::sync::atomic::Ordering::SeqCst), 1);
        // Close to expiry, it is fetched again.
        tokio::time::advance(Duration::from_secs(3600) - BASE_TOKEN_MARGIN).await;
        assert_eq!(source.base.get().await.unwrap().secret().expose(), "base-1");
    }
}
