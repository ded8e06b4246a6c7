//! The token source `serve` fetches from, chosen once at start-up: the
//! metadata server, a service-account key, gcloud's user credentials, or any
//! of them impersonating another account. All sit behind [`TokenSource`],
//! so the cache, refresh, watch, policy and metrics treat them alike.

pub mod adc;
pub mod credentials;
pub mod https;
pub mod impersonate;
pub mod jwt;
pub mod keyfile;
pub mod metadata;
pub mod response;

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
use credentials::Credentials;
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
    /// gcloud's user credentials.
    User(UserSource),
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
        let http = needs_https
            .then(|| HttpsClient::new(config.timeout))
            .transpose()?;
        let base = match found {
            Found::MetadataServer => {
                Self::Metadata(MetadataClient::new(&config.metadata_host, config.timeout)?)
            }
            Found::File {
                credentials,
                origin,
            } => {
                let http = http.clone().ok_or("no HTTPS client")?;
                let source = match *credentials {
                    Credentials::ServiceAccount(key) => {
                        Self::KeyFile(KeyFileSource::new(key, http))
                    }
                    Credentials::AuthorizedUser(user) => Self::User(UserSource::new(user, http)),
                };
                tracing::info!(found_by = origin, "credentials file read");
                source
            }
        };
        let Some(target) = &config.impersonate else {
            return Ok(base);
        };
        let endpoint = https::endpoint("--iam-endpoint", &config.iam_endpoint)?;
        let base = Arc::new(base);
        let source = ImpersonatedSource::new(
            base.clone(),
            target.clone(),
            config.delegates.clone(),
            endpoint,
            http.ok_or("no HTTPS client")?,
        );
        Ok(Self::Impersonated {
            source: Arc::new(source),
            base,
        })
    }

    /// The source in words, for the start-up log and errors (never a key).
    pub fn describe(&self) -> String {
        match self {
            Self::Metadata(client) => format!("the metadata server at {}", client.host()),
            Self::KeyFile(source) => {
                format!("{} (service account {})", source.describe(), source.email())
            }
            Self::User(source) => source.describe(),
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
            Self::Impersonated { source, .. } => source.fetch(key),
        }
    }

    fn admits(&self, key: &TokenKey) -> Result<(), BrokerError> {
        match self {
            Self::Metadata(client) => client.admits(key),
            Self::KeyFile(source) => source.admits(key),
            Self::User(source) => source.admits(key),
            Self::Impersonated { source, .. } => source.admits(key),
        }
    }
}
