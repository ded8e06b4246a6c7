//! Credential files, as Google's tools write them: a service-account key
//! (`"type": "service_account"`), gcloud's user credentials
//! (`"authorized_user"`), workforce federation's user credentials
//! (`"external_account_authorized_user"`), Workload Identity Federation
//! (`"external_account"`, see [`external`]) and an impersonated account
//! (`"impersonated_service_account"`). Read once at start-up, checked
//! strictly, secrets held only in memory that is zeroed on drop, never
//! printed. (One copy is outside the broker's reach: serde_json unescapes a
//! string with `\n` escapes, as a PEM key has, in a scratch buffer it frees
//! unzeroed.)

pub mod document;
pub mod external;

use std::fmt;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Uri;
use rustls::pki_types::PrivatePkcs8KeyDer;
use rustls::pki_types::pem::PemObject;
use zeroize::{Zeroize, Zeroizing};

use crate::secret::Secret;
use crate::sources::https;
use document::{Document, Object};
use external::{ExternalAccount, SubjectSource};

/// Google's OAuth token endpoint, for user credentials that name none.
pub const DEFAULT_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
/// Largest credentials file read (64 KiB; a key file is about 2.3 KiB).
pub const MAX_FILE_BYTES: u64 = 64 * 1024;

/// Why a credentials file cannot be used. Messages name the file and the
/// field, never a secret.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// The file cannot be opened or read.
    #[error("cannot read credentials file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Other users may read the file.
    #[error(
        "credentials file {path} can be read by every user (mode {mode:04o}); it holds a secret: run `chmod 600 {path}` (or 640, with a group only the broker's users are in)"
    )]
    WorldReadable {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Every user may change the file, and so where the broker's
    /// credentials go.
    #[error(
        "credentials file {path} can be changed by every user (mode {mode:04o}), who could then send the broker's credentials anywhere: run `chmod o-w {path}`"
    )]
    WorldWritable {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Larger than any credentials file.
    #[error(
        "credentials file {path} is larger than {MAX_FILE_BYTES} bytes: not a credentials file"
    )]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// Not a JSON object.
    #[error("credentials file {path} is not a JSON object ({reason})")]
    NotJson {
        /// The file.
        path: PathBuf,
        /// Where parsing failed (never the content).
        reason: String,
    },
    /// A field is absent, of the wrong type or not acceptable.
    #[error("credentials file {path}: field \"{field}\" is {problem}")]
    Field {
        /// The file.
        path: PathBuf,
        /// The field, as a dotted path (`credential_source.file`).
        field: String,
        /// What is wrong: "missing", "not a string", "empty", ...
        problem: String,
    },
    /// A `type` this broker does not use.
    #[error(
        "credentials file {path}: field \"{field}\" is {found:?}; tokenbroker reads \"service_account\", \"authorized_user\", \"external_account\", \"external_account_authorized_user\" and \"impersonated_service_account\""
    )]
    UnsupportedType {
        /// The file.
        path: PathBuf,
        /// `type`, or a nested one (`source_credentials.type`).
        field: String,
        /// The type it names (at most 64 characters of it).
        found: String,
    },
    /// `private_key` is not a usable RSA key.
    #[error(
        "credentials file {path}: private_key is not an RSA private key in PKCS#8 PEM ({reason})"
    )]
    BadKey {
        /// The file.
        path: PathBuf,
        /// What is wrong (never the key).
        reason: &'static str,
    },
    /// An endpoint URL (`token_uri`, `token_url`, ...) is not acceptable.
    #[error("credentials file {path}: {reason}")]
    BadTokenUri {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// A credentials file's content.
#[derive(Debug)]
pub enum Credentials {
    /// A service-account key.
    ServiceAccount(ServiceAccountKey),
    /// User credentials: gcloud's (`gcloud auth application-default
    /// login`) or workforce federation's.
    AuthorizedUser(UserCredentials),
    /// Workload Identity Federation: an external subject token exchanged
    /// at Google STS.
    ExternalAccount(Box<ExternalAccount>),
    /// Another account, impersonated with the source credentials' token.
    ImpersonatedServiceAccount(ImpersonatedAccount),
}

/// A service-account key: its account, key id, token endpoint and private
/// key. `Debug` never shows the key.
pub struct ServiceAccountKey {
    /// The account's email (`client_email`).
    pub client_email: String,
    /// The key's id (`private_key_id`), the JWT's `kid`.
    pub private_key_id: String,
    /// Where assertions are exchanged for tokens (`token_uri`).
    pub token_uri: Uri,
    /// The file it came from.
    pub path: PathBuf,
    /// PKCS#8 DER of the private key; zeroed on drop.
    pkcs8: Zeroizing<Vec<u8>>,
}

impl ServiceAccountKey {
    /// The private key, ready to sign. Parsed on each use, so that the one
    /// long-lived copy is the zeroed-on-drop DER (ring does not zero its
    /// own key structures).
    pub fn key_pair(&self) -> Result<ring::rsa::KeyPair, &'static str> {
        ring::rsa::KeyPair::from_pkcs8(&self.pkcs8).map_err(|e| match e.to_string().as_str() {
            "TooSmall" => "the RSA key is shorter than 2048 bits",
            "TooLarge" => "the RSA key is longer than 8192 bits",
            _ => "the key is not valid PKCS#8 RSA",
        })
    }
}

impl fmt::Debug for ServiceAccountKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceAccountKey")
            .field("client_email", &self.client_email)
            .field("private_key_id", &self.private_key_id)
            .field("token_uri", &self.token_uri)
            .field("path", &self.path)
            .field("private_key", &"[redacted]")
            .finish()
    }
}

/// How an OAuth client proves itself to the token endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// `client_id` and `client_secret` in the form (gcloud's
    /// `authorized_user`).
    Form,
    /// HTTP basic auth (`external_account_authorized_user`).
    Basic,
}

/// User credentials: an OAuth client and a refresh token.
#[derive(Debug)]
pub struct UserCredentials {
    /// The OAuth client (`client_id`).
    pub client_id: String,
    /// The client's secret (gcloud's is public, but treated as a secret).
    pub client_secret: Secret,
    /// The refresh token.
    pub refresh_token: Secret,
    /// Where the refresh token is exchanged (`token_uri`, or Google's;
    /// `token_url` for workforce users).
    pub token_uri: Uri,
    /// How the client authenticates.
    pub client_auth: ClientAuth,
    /// The file it came from.
    pub path: PathBuf,
}

/// `"type": "impersonated_service_account"`.
#[derive(Debug)]
pub struct ImpersonatedAccount {
    /// The account and the IAM Credentials URLs.
    pub url: ImpersonationUrl,
    /// The delegation chain, emails.
    pub delegates: Vec<String>,
    /// Whose token authorises the impersonation.
    pub source: Box<Credentials>,
}

/// A `service_account_impersonation_url`
/// (`https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/EMAIL:generateAccessToken`)
/// and the `generateIdToken` URL beside it, as Google's libraries derive it.
#[derive(Clone, Debug)]
pub struct ImpersonationUrl {
    /// The impersonated account.
    pub target: String,
    /// `...:generateAccessToken`.
    pub access: Uri,
    /// `...:generateIdToken`.
    pub id: Uri,
}

/// The method suffix an impersonation URL ends with.
const GENERATE_ACCESS_TOKEN: &str = ":generateAccessToken";

impl ImpersonationUrl {
    /// Reads and checks the URL in `field` of `fields`.
    pub fn parse(fields: &Object<'_>, field: &str) -> Result<Self, CredentialsError> {
        let text = fields.text(field)?;
        let access = endpoint_field(fields, field, text)?;
        let target = access
            .path()
            .strip_suffix(GENERATE_ACCESS_TOKEN)
            .and_then(|path| path.rsplit_once("/serviceAccounts/"))
            .map(|(_, email)| email)
            .filter(|email| email.contains('@') && !email.contains('/'))
            .ok_or_else(|| {
                fields.error(
                    field,
                    "not an IAM Credentials URL (.../serviceAccounts/EMAIL:generateAccessToken)",
                )
            })?;
        // The same URL, its path's method replaced (as Google's libraries
        // derive it).
        let id_path = access
            .path()
            .strip_suffix(GENERATE_ACCESS_TOKEN)
            .map(|path| format!("{path}:generateIdToken"))
            .unwrap_or_default();
        let mut parts = access.clone().into_parts();
        parts.path_and_query = Some(
            id_path
                .parse()
                .map_err(|_| fields.error(field, "not a URL"))?,
        );
        let id = Uri::from_parts(parts).map_err(|_| fields.error(field, "not a URL"))?;
        Ok(Self {
            target: target.to_string(),
            access,
            id,
        })
    }
}

/// Lifetime of impersonated access tokens when the file names none (1 hour).
pub const DEFAULT_IMPERSONATED_LIFETIME: Duration = Duration::from_secs(3600);

/// Reads and checks a credentials file. Refuses a file every user may
/// change, one every user may read if it holds a secret (a federation file
/// without a client secret or URL headers holds none, and Kubernetes mounts
/// ConfigMaps `0644`), and an `executable` subject-token source unless
/// `allow_executables` (`GOOGLE_EXTERNAL_ACCOUNT_ALLOW_EXECUTABLES=1`).
pub fn read(path: &Path, allow_executables: bool) -> Result<Credentials, CredentialsError> {
    let (bytes, mode) = read_bounded(path)?;
    if mode & 0o002 != 0 {
        return Err(CredentialsError::WorldWritable {
            path: path.to_path_buf(),
            mode,
        });
    }
    let document = Document::parse(path, &bytes)?;
    let credentials = parse(&document.root(path), allow_executables)?;
    if mode & 0o007 != 0 && credentials.holds_secret() {
        return Err(CredentialsError::WorldReadable {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(credentials)
}

impl Credentials {
    /// Whether the file holds a secret: a key, a refresh token, a client
    /// secret, or headers for a subject-token URL (which may carry one).
    pub fn holds_secret(&self) -> bool {
        match self {
            Self::ServiceAccount(_) | Self::AuthorizedUser(_) => true,
            Self::ExternalAccount(account) => {
                account
                    .client
                    .as_ref()
                    .is_some_and(|(_, secret)| !secret.expose().is_empty())
                    || matches!(&account.subject, SubjectSource::Url { headers, .. } if !headers.is_empty())
            }
            Self::ImpersonatedServiceAccount(account) => account.source.holds_secret(),
        }
    }
}

/// The credentials `fields` describe (a whole file, or an impersonated
/// account's `source_credentials`).
fn parse(fields: &Object<'_>, allow_executables: bool) -> Result<Credentials, CredentialsError> {
    match fields.text("type")? {
        "service_account" => service_account(fields).map(Credentials::ServiceAccount),
        "authorized_user" => {
            authorized_user(fields, ClientAuth::Form).map(Credentials::AuthorizedUser)
        }
        "external_account_authorized_user" => {
            authorized_user(fields, ClientAuth::Basic).map(Credentials::AuthorizedUser)
        }
        "external_account" => external::parse(fields, allow_executables)
            .map(|account| Credentials::ExternalAccount(Box::new(account))),
        "impersonated_service_account" => {
            impersonated(fields, allow_executables).map(Credentials::ImpersonatedServiceAccount)
        }
        other => Err(CredentialsError::UnsupportedType {
            path: fields.path().to_path_buf(),
            field: fields.name("type"),
            found: other.chars().take(64).collect(),
        }),
    }
}

/// The file's bytes (zeroed on drop) and its permission bits.
fn read_bounded(path: &Path) -> Result<(Zeroizing<Vec<u8>>, u32), CredentialsError> {
    let read_error = |source| CredentialsError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_error)?;
    let metadata = file.metadata().map_err(read_error)?;
    let mode = metadata.permissions().mode() & 0o7777;
    if metadata.len() > MAX_FILE_BYTES {
        return Err(CredentialsError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    // Room for everything `take` lets through, so the buffer never moves
    // (a move would leave an unzeroed copy behind).
    let mut bytes = Zeroizing::new(Vec::with_capacity(MAX_FILE_BYTES as usize + 1));
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(CredentialsError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    Ok((bytes, mode))
}

fn service_account(fields: &Object<'_>) -> Result<ServiceAccountKey, CredentialsError> {
    let path = fields.path();
    let client_email = fields.text("client_email")?;
    let private_key_id = fields.text("private_key_id")?;
    let pem = fields.text("private_key")?;
    let token_uri = endpoint_field(fields, "token_uri", fields.text("token_uri")?)?;
    let bad_key = |reason| CredentialsError::BadKey {
        path: path.to_path_buf(),
        reason,
    };
    let mut der = PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|_| bad_key("no \"-----BEGIN PRIVATE KEY-----\" PEM block"))?;
    let pkcs8 = Zeroizing::new(der.secret_pkcs8_der().to_vec());
    der.zeroize();
    let key = ServiceAccountKey {
        client_email: client_email.to_string(),
        private_key_id: private_key_id.to_string(),
        token_uri,
        path: path.to_path_buf(),
        pkcs8,
    };
    key.key_pair().map_err(bad_key)?;
    Ok(key)
}

/// gcloud's `authorized_user` (client in the form, Google's token endpoint
/// by default) or workforce federation's `external_account_authorized_user`
/// (client by HTTP basic auth, `token_url` required).
fn authorized_user(
    fields: &Object<'_>,
    client_auth: ClientAuth,
) -> Result<UserCredentials, CredentialsError> {
    let client_id = fields.text("client_id")?;
    let client_secret = fields.text("client_secret")?;
    let refresh_token = fields.text("refresh_token")?;
    let (field, token_uri) = match client_auth {
        ClientAuth::Form => (
            "token_uri",
            fields
                .optional_text("token_uri")?
                .unwrap_or(DEFAULT_TOKEN_URI),
        ),
        ClientAuth::Basic => ("token_url", fields.text("token_url")?),
    };
    Ok(UserCredentials {
        client_id: client_id.to_string(),
        client_secret: Secret::new(client_secret.to_string()),
        refresh_token: Secret::new(refresh_token.to_string()),
        token_uri: endpoint_field(fields, field, token_uri)?,
        client_auth,
        path: fields.path().to_path_buf(),
    })
}

/// `impersonated_service_account`: `service_account_impersonation_url`,
/// `delegates` and `source_credentials`, any other supported type.
fn impersonated(
    fields: &Object<'_>,
    allow_executables: bool,
) -> Result<ImpersonatedAccount, CredentialsError> {
    let url = ImpersonationUrl::parse(fields, "service_account_impersonation_url")?;
    let delegates = fields
        .texts("delegates")?
        .into_iter()
        .map(|delegate| {
            // gcloud writes full resource names; the broker's --delegates
            // takes emails.
            delegate
                .rsplit('/')
                .next()
                .filter(|email| email.contains('@'))
                .map(str::to_string)
                .ok_or_else(|| {
                    fields.error(
                        "delegates",
                        "not a list of service accounts (emails or projects/-/serviceAccounts/EMAIL)",
                    )
                })
        })
        .collect::<Result<_, _>>()?;
    let source_fields = fields.object("source_credentials")?;
    if source_fields.optional_text("type")? == Some("impersonated_service_account") {
        // As Google's libraries: one impersonation per file.
        return Err(source_fields.error(
            "type",
            "impersonated_service_account again; the source credentials must be of another type",
        ));
    }
    let source = parse(&source_fields, allow_executables)?;
    Ok(ImpersonatedAccount {
        url,
        delegates,
        source: Box::new(source),
    })
}

/// The endpoint URL `value` of `field`: `https://`, or `http://` to
/// loopback.
pub(crate) fn endpoint_field(
    fields: &Object<'_>,
    field: &str,
    value: &str,
) -> Result<Uri, CredentialsError> {
    https::endpoint(&fields.name(field), value).map_err(|reason| CredentialsError::BadTokenUri {
        path: fields.path().to_path_buf(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    const KEY: &str = include_str!("../../tests/fixtures/test-only-key-1.pem");

    fn key_json() -> serde_json::Value {
        serde_json::json!({
            "type": "service_account",
            "project_id": "p",
            "private_key_id": "kid-1",
            "private_key": KEY,
            "client_email": "sa@p.iam.gserviceaccount.com",
            "token_uri": "https://oauth2.googleapis.com/token",
        })
    }

    fn write(dir: &tempfile::TempDir, content: &str, mode: u32) -> PathBuf {
        let path = dir.path().join("key.json");
        std::fs::write(&path, content).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn a_service_account_key_is_read_and_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, &key_json().to_string(), 0o600);
        let Credentials::ServiceAccount(key) = read(&path, false).unwrap() else {
            panic!("not a service account key");
        };
        assert_eq!(key.client_email, "sa@p.iam.gserviceaccount.com");
        assert_eq!(key.private_key_id, "kid-1");
        assert!(key.key_pair().is_ok());
        let printed = format!("{key:?}");
        assert!(!printed.contains("PRIVATE KEY") && printed.contains("[redacted]"));
        // Group-readable is allowed.
        let path = write(&dir, &key_json().to_string(), 0o640);
        assert!(read(&path, false).is_ok());
    }

    #[test]
    fn bad_files_get_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let expect = |content: String, mode: u32, needle: &str| {
            let path = write(&dir, &content, mode);
            let message = read(&path, false).unwrap_err().to_string();
            assert!(message.contains(needle), "{message:?} lacks {needle:?}");
            assert!(message.contains("key.json"), "{message}");
            assert!(!message.contains("MII"), "the key leaked: {message}");
        };
        expect(key_json().to_string(), 0o644, "every user");
        expect(key_json().to_string(), 0o602, "changed by every user");
        expect(key_json().to_string(), 0o604, "chmod 600");
        expect("not json".into(), 0o600, "not a JSON object");
        expect("[1, 2]".into(), 0o600, "not a JSON object");
        for field in [
            "client_email",
            "private_key",
            "private_key_id",
            "token_uri",
            "type",
        ] {
            let mut json = key_json();
            json.as_object_mut().unwrap().remove(field);
            expect(json.to_string(), 0o600, &format!("\"{field}\" is missing"));
            json[field] = serde_json::json!({"nested": KEY});
            expect(
                json.to_string(),
                0o600,
                &format!("\"{field}\" is not a string"),
            );
        }
        let mut json = key_json();
        json["type"] = "gdch_service_account".into();
        expect(json.to_string(), 0o600, "\"gdch_service_account\"");
        let mut json = key_json();
        json["private_key"] =
            "-----BEGIN PRIVATE KEY-----\nMIIgarbage\n-----END PRIVATE KEY-----\n".into();
        expect(
            json.to_string(),
            0o600,
            "private_key is not an RSA private key",
        );
        let mut json = key_json();
        json["token_uri"] = "http://oauth2.googleapis.com/token".into();
        expect(json.to_string(), 0o600, "loopback");
        let missing = dir.path().join("nope.json");
        assert!(matches!(
            read(&missing, false),
            Err(CredentialsError::Read { .. })
        ));
    }

    #[test]
    fn a_federation_file_without_a_secret_may_be_read_by_all() {
        let dir = tempfile::tempdir().unwrap();
        let mut json = serde_json::json!({
            "type": "external_account",
            "audience": "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/k8s",
            "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
            "credential_source": {"file": "/var/run/secrets/tokens/gcp"},
        });
        // As a Kubernetes ConfigMap mounts it.
        let path = write(&dir, &json.to_string(), 0o644);
        assert!(!read(&path, false).unwrap().holds_secret());
        let path = write(&dir, &json.to_string(), 0o646);
        assert!(matches!(
            read(&path, false),
            Err(CredentialsError::WorldWritable { .. })
        ));
        json["client_id"] = "c".into();
        json["client_secret"] = "s3cr3t".into();
        let path = write(&dir, &json.to_string(), 0o644);
        assert!(matches!(
            read(&path, false),
            Err(CredentialsError::WorldReadable { .. })
        ));
    }

    #[test]
    fn user_credentials_default_to_googles_token_endpoint() {
        let dir = tempfile::tempdir().unwrap();
        let json = serde_json::json!({
            "type": "authorized_user",
            "client_id": "123.apps.googleusercontent.com",
            "client_secret": "d-FL95Q19q7MQmFpd7hHD0Ty",
            "refresh_token": "1//refresh-secret",
        });
        let path = write(&dir, &json.to_string(), 0o600);
        let Credentials::AuthorizedUser(user) = read(&path, false).unwrap() else {
            panic!("not user credentials");
        };
        assert_eq!(user.token_uri, DEFAULT_TOKEN_URI);
        assert_eq!(user.refresh_token.expose(), "1//refresh-secret");
        assert!(!format!("{user:?}").contains("refresh-secret"));
    }
}
