//! The token source `serve` fetches from, chosen once at start-up: the
//! metadata server, a service-account key, user credentials (gcloud's or a
//! workforce pool's), Workload Identity Federation, or any of them
//! impersonating another account. All sit behind [`TokenSource`], so the
//! cache, refresh, watch, policy and metrics treat them alike.

pub mod adc;
pub mod credentials;
pub mod downscope;
pub mod external;
pub mod https;
pub mod impersonate;
pub mod jwt;
pub mod keyfile;
pub mod metadata;
pub mod response;
pub mod workload;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;

use crate::error::BrokerError;
use crate::error::FetchError;
use crate::request::TokenKey;
use crate::token::Token;
use crate::upstream::TokenSource;
use adc::{Environment, Found, UserSource};
use credentials::{Credentials, DEFAULT_IMPERSONATED_LIFETIME};
use external::ExternalSource;
use https::HttpsClient;
use impersonate::ImpersonatedSource;
use keyfile::KeyFileSource;
use metadata::MetadataClient;

/// What the command line says about where tokens come from.
#[derive(Clone, Debug)]
pub struct SourceConfig {
    /// `--credentials`: a key or user credentials file, before any
    /// discovery.
    pub credentials: Option<PathBuf>,
    /// Skip discovery and use the metadata server (`--emulator`).
    pub metadata_only: bool,
    /// The metadata server's `host[:port]`.
    pub metadata_host: String,
    /// `--impersonate`: the account to mint tokens for.
    pub impersonate: Option<String>,
    /// `--delegates`: the delegation chain, emails.
    pub delegates: Vec<String>,
    /// `--iam-endpoint`.
    pub iam_endpoint: String,
    /// Longest one upstream request may take.
    pub timeout: Duration,
}

/// The configured source. Cloning is cheap.
#[derive(Clone)]
pub enum Upstream {
    /// The GCE metadata server (or the emulator).
    Metadata(MetadataClient),
    /// A service-account key.
    KeyFile(KeyFileSource),
    /// User credentials (gcloud's or a workforce pool's).
    User(UserSource),
    /// Workload Identity Federation (Google STS).
    External(ExternalSource),
    /// Another account, impersonated with the base source's token.
    Impersonated {
        /// Calls the IAM Credentials API.
        source: Arc<ImpersonatedSource>,
        /// The source whose token authorises the calls.
        base: Arc<Upstream>,
    },
}

impl Upstream {
    /// Chooses and builds the source: `--credentials`, else (unless
    /// `metadata_only`) Application Default Credentials discovery in `env`;
    /// then `--impersonate` on top. Errors say what to fix.
    pub fn build(config: &SourceConfig, env: &Environment) -> Result<Self, String> {
        let found = if config.metadata_only && config.credentials.is_none() {
            Found::MetadataServer
        } else {
            adc::discover(config.credentials.as_deref(), env).map_err(|e| e.to_string())?
        };
        let needs_https = !matches!(found, Found::MetadataServer) || config.impersonate.is_some();
        if let (true, Some(proxy)) = (needs_https, env.proxy.describe()) {
            tracing::info!(%proxy, "Google's HTTPS endpoints are reached through the proxy");
        }
        let http = needs_https
            .then(|| HttpsClient::new(config.timeout, env.proxy.clone()))
            .transpose()?;
        let base = match found {
            Found::MetadataServer => {
                let host =
                    metadata::reachable_host(&config.metadata_host, metadata::system_resolves);
                Self::Metadata(MetadataClient::new(&host, config.timeout)?)
            }
            Found::File {
                credentials,
                origin,
            } => {
                let http = http.as_ref().ok_or("no HTTPS client")?;
                tracing::info!(found_by = origin, "credentials file read");
                Self::from_credentials(*credentials, http)
            }
        };
        let Some(target) = &config.impersonate else {
            return Ok(base);
        };
        let endpoint = https::endpoint("--iam-endpoint", &config.iam_endpoint)?;
        let http = http.ok_or("no HTTPS client")?;
        let delegates = config.delegates.clone();
        base.impersonated(|base| ImpersonatedSource::new(base, target, delegates, &endpoint, http))
    }

    /// The source a credentials file describes.
    fn from_credentials(credentials: Credentials, http: &HttpsClient) -> Self {
        match credentials {
            Credentials::ServiceAccount(key) => {
                Self::KeyFile(KeyFileSource::new(key, http.clone()))
            }
            Credentials::AuthorizedUser(user) => Self::User(UserSource::new(user, http.clone())),
            Credentials::ExternalAccount(account) => {
                let impersonation = account.impersonation.clone();
                let federated = Self::External(ExternalSource::new(*account, http.clone()));
                let Some(impersonation) = impersonation else {
                    return federated;
                };
                federated.impersonating(|base| {
                    ImpersonatedSource::at(
                        base,
                        impersonation.url,
                        Vec::new(),
                        impersonation.lifetime,
                        http.clone(),
                    )
                })
            }
            Credentials::ImpersonatedServiceAccount(account) => {
                Self::from_credentials(*account.source, http).impersonating(|base| {
                    ImpersonatedSource::at(
                        base,
                        account.url,
                        account.delegates,
                        DEFAULT_IMPERSONATED_LIFETIME,
                        http.clone(),
                    )
                })
            }
        }
    }

    /// This source as the base of an impersonation `make` builds.
    fn impersonating(self, make: impl FnOnce(Arc<dyn TokenSource>) -> ImpersonatedSource) -> Self {
        let base = Arc::new(self);
        Self::Impersonated {
            source: Arc::new(make(base.clone())),
            base,
        }
    }

    /// [`Upstream::impersonating`] with a `make` that may fail.
    fn impersonated(
        self,
        make: impl FnOnce(Arc<dyn TokenSource>) -> Result<ImpersonatedSource, String>,
    ) -> Result<Self, String> {
        let base = Arc::new(self);
        Ok(Self::Impersonated {
            source: Arc::new(make(base.clone())?),
            base,
        })
    }

    /// The account `default` stands for, where the source knows it: a
    /// key's `client_email`, the impersonated account. (The metadata
    /// server, user credentials and a federated principal name none here.)
    pub fn default_account(&self) -> Option<&str> {
        match self {
            Self::KeyFile(source) => Some(source.email()),
            Self::Impersonated { source, .. } => Some(source.target()),
            Self::Metadata(_) | Self::User(_) | Self::External(_) => None,
        }
    }

    /// The source in words, for the start-up log and errors (never a key).
    pub fn describe(&self) -> String {
        match self {
            Self::Metadata(client) => format!("the metadata server at {}", client.host()),
            Self::KeyFile(source) => {
                format!("{} (service account {})", source.describe(), source.email())
            }
            Self::User(source) => source.describe(),
            Self::External(source) => source.describe(),
            Self::Impersonated { source, base } => {
                format!("{}, authorised by {}", source.describe(), base.describe())
            }
        }
    }

    /// Checks that the source's servers answer, for health: the metadata
    /// server's account listing, a key's or user's token endpoint (a GET,
    /// which costs no token), and for impersonation the base source and
    /// the IAM Credentials API. Any answer but a 5xx counts.
    pub fn probe(&self) -> BoxFuture<'_, Result<(), FetchError>> {
        Box::pin(async move {
            match self {
                Self::Metadata(client) => client.probe().await,
                Self::KeyFile(source) => source.probe().await,
                Self::User(source) => source.probe().await,
                Self::External(source) => source.probe().await,
                Self::Impersonated { source, base } => {
                    base.probe().await?;
                    source.probe().await
                }
            }
        })
    }
}

impl TokenSource for Upstream {
    fn fetch<'a>(&'a self, key: &'a TokenKey) -> BoxFuture<'a, Result<Token, FetchError>> {
        match self {
            Self::Metadata(client) => client.fetch(key),
            Self::KeyFile(source) => source.fetch(key),
            Self::User(source) => source.fetch(key),
            Self::External(source) => source.fetch(key),
            Self::Impersonated { source, .. } => source.fetch(key),
        }
    }

    fn admits(&self, key: &TokenKey) -> Result<(), BrokerError> {
        match self {
            Self::Metadata(client) => client.admits(key),
            Self::KeyFile(source) => source.admits(key),
            Self::User(source) => source.admits(key),
            Self::External(source) => source.admits(key),
            Self::Impersonated { source, .. } => source.admits(key),
        }
    }
}
