//! Application Default Credentials: finds the credentials in the order
//! Google's libraries do (`GOOGLE_APPLICATION_CREDENTIALS`, then gcloud's
//! well-known file, then the metadata server), and fetches access tokens
//! with gcloud's user credentials (`authorized_user`, refresh-token grant).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tokio::time::Instant;

use crate::error::BrokerError;
use crate::error::FetchError;
use crate::request::TokenKey;
use crate::sources::credentials::external::ALLOW_EXECUTABLES_ENV;
use crate::sources::credentials::{
    self, ClientAuth, Credentials, CredentialsError, UserCredentials,
};
use crate::sources::https::proxy::Proxy;
use crate::sources::https::{Auth, HttpsClient};
use crate::sources::keyfile::admit_default_access_tokens;
use crate::sources::response::parse_access_token;
use crate::token::Token;
use crate::upstream::TokenSource;

/// The file `gcloud auth application-default login` writes, under gcloud's
/// configuration directory.
pub const WELL_KNOWN_FILE: &str = "application_default_credentials.json";

/// The parts of the process environment the sources read: for discovery,
/// and the proxy (a struct, so that tests need not change the process's
/// environment).
#[derive(Clone, Debug, Default)]
pub struct Environment {
    /// `GOOGLE_APPLICATION_CREDENTIALS` (unset and empty are the same).
    pub google_application_credentials: Option<PathBuf>,
    /// `CLOUDSDK_CONFIG`: gcloud's configuration directory, if moved.
    pub cloudsdk_config: Option<PathBuf>,
    /// `HOME`.
    pub home: Option<PathBuf>,
    /// `GOOGLE_EXTERNAL_ACCOUNT_ALLOW_EXECUTABLES=1`: an `external_account`
    /// file may name a program to run.
    pub allow_executables: bool,
    /// The proxy for Google's HTTPS endpoints (`HTTPS_PROXY`, `NO_PROXY`).
    pub proxy: Proxy,
}

impl Environment {
    /// Reads the process's environment; fails on a malformed proxy.
    pub fn from_process() -> Result<Self, String> {
        let path = |name| {
            std::env::var_os(name)
                .filter(|value| !value.is_empty())
                .map(PathBuf::from)
        };
        Ok(Self {
            google_application_credentials: path("GOOGLE_APPLICATION_CREDENTIALS"),
            cloudsdk_config: path("CLOUDSDK_CONFIG"),
            home: path("HOME"),
            allow_executables: std::env::var_os(ALLOW_EXECUTABLES_ENV)
                .is_some_and(|value| value == "1"),
            proxy: Proxy::from_vars(|name| std::env::var(name).ok())?,
        })
    }

    /// gcloud's well-known credentials file: under `$CLOUDSDK_CONFIG`, else
    /// `~/.config/gcloud/`.
    pub fn well_known_file(&self) -> Option<PathBuf> {
        let config = match (&self.cloudsdk_config, &self.home) {
            (Some(config), _) => config.clone(),
            (None, Some(home)) => home.join(".config").join("gcloud"),
            (None, None) => return None,
        };
        Some(config.join(WELL_KNOWN_FILE))
    }
}

/// Where discovery found credentials.
#[derive(Debug)]
pub enum Found {
    /// A credentials file, and what pointed at it.
    File {
        /// The file's content.
        credentials: Box<Credentials>,
        /// `--credentials`, `GOOGLE_APPLICATION_CREDENTIALS` or gcloud's
        /// well-known file.
        origin: &'static str,
    },
    /// No file: use the metadata server.
    MetadataServer,
}

/// Finds credentials: `explicit` (`--credentials`) first, then
/// `GOOGLE_APPLICATION_CREDENTIALS` (which must then exist), then gcloud's
/// well-known file (if it exists), else the metadata server. A file that
/// is found but unusable is an error, never skipped.
pub fn discover(explicit: Option<&Path>, env: &Environment) -> Result<Found, CredentialsError> {
    let file = |path: &Path, origin| {
        credentials::read(path, env.allow_executables).map(|credentials| Found::File {
            credentials: Box::new(credentials),
            origin,
        })
    };
    if let Some(path) = explicit {
        return file(path, "--credentials");
    }
    if let Some(path) = &env.google_application_credentials {
        return file(path, "GOOGLE_APPLICATION_CREDENTIALS");
    }
    match env.well_known_file() {
        Some(path) if path.exists() => file(&path, "gcloud's application default credentials"),
        _ => Ok(Found::MetadataServer),
    }
}

const SERVICE: &str = "the OAuth token endpoint";

/// Access tokens from user credentials: the refresh token exchanged at the
/// credentials' `token_uri`. User credentials cannot mint ID tokens for an
/// arbitrary audience; those are refused with a pointer to `--impersonate`.
#[derive(Clone)]
pub struct UserSource {
    user: Arc<UserCredentials>,
    http: HttpsClient,
}

impl UserSource {
    /// A source refreshing `user`'s token through `http`.
    pub fn new(user: UserCredentials, http: HttpsClient) -> Self {
        Self {
            user: Arc::new(user),
            http,
        }
    }

    /// The source in words (never a secret).
    pub fn describe(&self) -> String {
        let kind = match self.user.client_auth {
            ClientAuth::Form => "user credentials",
            ClientAuth::Basic => "workforce user credentials",
        };
        format!("the {kind} {}", self.user.path.display())
    }

    /// Checks that the token endpoint answers (a GET; any status but a 5xx
    /// counts).
    pub async fn probe(&self) -> Result<(), FetchError> {
        self.http.probe(SERVICE, &self.user.token_uri).await
    }

    async fn fetch_token(&self, key: &TokenKey) -> Result<Token, FetchError> {
        let fetched_at = (Instant::now(), SystemTime::now());
        let scopes = match key {
            TokenKey::Access(access) => access.scopes.join(" "),
            TokenKey::Id(_) => {
                return Err(FetchError::Malformed(
                    "user credentials cannot mint ID tokens".into(),
                ));
            }
            TokenKey::Downscoped(_) => return Err(FetchError::downscoped_key()),
        };
        let user = &self.user;
        let mut pairs = vec![
            ("grant_type", "refresh_token"),
            ("refresh_token", user.refresh_token.expose()),
        ];
        let auth = match user.client_auth {
            ClientAuth::Form => {
                pairs.push(("client_id", user.client_id.as_str()));
                pairs.push(("client_secret", user.client_secret.expose()));
                Auth::None
            }
            ClientAuth::Basic => Auth::Basic {
                user: &user.client_id,
                password: &user.client_secret,
            },
        };
        // A workforce user's refresh grant takes no scope: its tokens carry
        // what the user's login granted, as in Google's libraries.
        if !scopes.is_empty() && user.client_auth == ClientAuth::Form {
            pairs.push(("scope", &scopes));
        }
        let body = self
            .http
            .post_form(SERVICE, &user.token_uri, &pairs, auth)
            .await?;
        parse_access_token(&body, fetched_at)
    }
}

impl TokenSource for UserSource {
    fn fetch<'a>(&'a self, key: &'a TokenKey) -> BoxFuture<'a, Result<Token, FetchError>> {
        self.fetch_token(key).boxed()
    }

    fn admits(&self, key: &TokenKey) -> Result<(), BrokerError> {
        admit_default_access_tokens(
            key,
            || self.describe(),
            "user credentials cannot mint ID tokens for an audience; run the broker with --impersonate SERVICE_ACCOUNT_EMAIL (your user needs roles/iam.serviceAccountOpenIdTokenCreator on it), or give it a service-account key",
        )
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn write_user(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let json = serde_json::json!({
            "type": "authorized_user",
            "client_id": "c",
            "client_secret": "s",
            "refresh_token": "r",
        });
        std::fs::write(path, json.to_string()).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    #[test]
    fn the_well_known_file_follows_cloudsdk_config() {
        let env = Environment {
            home: Some("/home/me".into()),
            ..Environment::default()
        };
        assert_eq!(
            env.well_known_file().unwrap(),
            Path::new("/home/me/.config/gcloud/application_default_credentials.json")
        );
        let moved = Environment {
            cloudsdk_config: Some("/etc/gcloud".into()),
            ..env
        };
        assert_eq!(
            moved.well_known_file().unwrap(),
            Path::new("/etc/gcloud/application_default_credentials.json")
        );
        assert!(Environment::default().well_known_file().is_none());
    }

    #[test]
    fn discovery_order_is_explicit_then_variable_then_gcloud_then_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        let gcloud = home.join(".config/gcloud").join(WELL_KNOWN_FILE);
        let variable = dir.path().join("variable.json");
        let explicit = dir.path().join("explicit.json");
        let mut env = Environment {
            home: Some(home),
            ..Environment::default()
        };
        let origin = |found: Found| match found {
            Found::File { origin, .. } => origin,
            Found::MetadataServer => "metadata server",
        };
        assert_eq!(origin(discover(None, &env).unwrap()), "metadata server");
        write_user(&gcloud);
        assert_eq!(
            origin(discover(None, &env).unwrap()),
            "gcloud's application default credentials"
        );
        env.google_application_credentials = Some(variable.clone());
        let missing = discover(None, &env).unwrap_err();
        assert!(missing.to_string().contains("variable.json"), "{missing}");
        write_user(&variable);
        assert_eq!(
            origin(discover(None, &env).unwrap()),
            "GOOGLE_APPLICATION_CREDENTIALS"
        );
        write_user(&explicit);
        assert_eq!(
            origin(discover(Some(&explicit), &env).unwrap()),
            "--credentials"
        );
    }
}
