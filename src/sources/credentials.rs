//! Credential files, as Google's tools write them: a service-account key
//! (`"type": "service_account"`) or gcloud's user credentials
//! (`"type": "authorized_user"`). Read once at start-up, checked strictly,
//! secrets held only in memory that is zeroed on drop, never printed. (One
//! copy is outside the broker's reach: serde_json unescapes a string with
//! `\n` escapes, as a PEM key has, in a scratch buffer it frees unzeroed.)

use std::fmt;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use http::Uri;
use rustls::pki_types::PrivatePkcs8KeyDer;
use rustls::pki_types::pem::PemObject;
use serde::Deserialize;
use serde::de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor};
use zeroize::{Zeroize, Zeroizing};

use crate::secret::Secret;
use crate::sources::https;

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
    /// A required field is absent or not a string.
    #[error("credentials file {path}: field \"{field}\" is {problem}")]
    Field {
        /// The file.
        path: PathBuf,
        /// The field.
        field: &'static str,
        /// "missing", "not a string" or "empty".
        problem: &'static str,
    },
    /// A `type` this broker does not use.
    #[error(
        "credentials file {path} has type {found:?}; tokenbroker uses \"service_account\" keys and gcloud's \"authorized_user\" credentials (for another account, add --impersonate)"
    )]
    UnsupportedType {
        /// The file.
        path: PathBuf,
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
    /// `token_uri` is not an acceptable endpoint.
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
    /// gcloud's user credentials (`gcloud auth application-default login`).
    AuthorizedUser(UserCredentials),
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

/// gcloud's user credentials: an OAuth client and a refresh token.
#[derive(Debug)]
pub struct UserCredentials {
    /// The OAuth client (`client_id`).
    pub client_id: String,
    /// The client's secret (gcloud's is public, but treated as a secret).
    pub client_secret: Secret,
    /// The refresh token.
    pub refresh_token: Secret,
    /// Where the refresh token is exchanged (`token_uri`, or Google's).
    pub token_uri: Uri,
    /// The file it came from.
    pub path: PathBuf,
}

/// Reads and checks a credentials file. Refuses a file every user may read.
pub fn read(path: &Path) -> Result<Credentials, CredentialsError> {
    let bytes = read_private(path)?;
    let fields: Fields =
        serde_json::from_slice(&bytes).map_err(|error| CredentialsError::NotJson {
            path: path.to_path_buf(),
            reason: format!(
                "{:?} error at line {} column {}",
                error.classify(),
                error.line(),
                error.column()
            ),
        })?;
    let kind = fields.text(path, "type", &fields.kind)?;
    match kind.as_str() {
        "service_account" => service_account(path, &fields).map(Credentials::ServiceAccount),
        "authorized_user" => authorized_user(path, &fields).map(Credentials::AuthorizedUser),
        other => Err(CredentialsError::UnsupportedType {
            path: path.to_path_buf(),
            found: other.chars().take(64).collect(),
        }),
    }
}

/// The file's bytes (zeroed on drop), if only its owner and group may read
/// it. Group-readable is allowed: a deployment may give the key to a group
/// holding only the broker's user.
fn read_private(path: &Path) -> Result<Zeroizing<Vec<u8>>, CredentialsError> {
    let read_error = |source| CredentialsError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_error)?;
    let metadata = file.metadata().map_err(read_error)?;
    let mode = metadata.permissions().mode() & 0o7777;
    if mode & 0o007 != 0 {
        return Err(CredentialsError::WorldReadable {
            path: path.to_path_buf(),
            mode,
        });
    }
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
    Ok(bytes)
}

fn service_account(path: &Path, fields: &Fields) -> Result<ServiceAccountKey, CredentialsError> {
    let client_email = fields.text(path, "client_email", &fields.client_email)?;
    let private_key_id = fields.text(path, "private_key_id", &fields.private_key_id)?;
    let pem = fields.text(path, "private_key", &fields.private_key)?;
    let token_uri = fields.text(path, "token_uri", &fields.token_uri)?;
    let token_uri = token_uri_of(path, token_uri)?;
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

fn authorized_user(path: &Path, fields: &Fields) -> Result<UserCredentials, CredentialsError> {
    let client_id = fields.text(path, "client_id", &fields.client_id)?;
    let client_secret = fields.text(path, "client_secret", &fields.client_secret)?;
    let refresh_token = fields.text(path, "refresh_token", &fields.refresh_token)?;
    let token_uri = match &fields.token_uri {
        None => DEFAULT_TOKEN_URI.to_string(),
        Some(_) => fields
            .text(path, "token_uri", &fields.token_uri)?
            .to_string(),
    };
    Ok(UserCredentials {
        client_id: client_id.to_string(),
        client_secret: Secret::new(client_secret.to_string()),
        refresh_token: Secret::new(refresh_token.to_string()),
        token_uri: token_uri_of(path, &token_uri)?,
        path: path.to_path_buf(),
    })
}

fn token_uri_of(path: &Path, token_uri: &str) -> Result<Uri, CredentialsError> {
    https::endpoint("token_uri", token_uri).map_err(|reason| CredentialsError::BadTokenUri {
        path: path.to_path_buf(),
        reason,
    })
}

/// The fields the broker reads; each may be absent, a string, or something
/// else. Others are ignored.
#[derive(Deserialize)]
struct Fields {
    #[serde(rename = "type")]
    kind: Option<Field>,
    client_email: Option<Field>,
    private_key_id: Option<Field>,
    private_key: Option<Field>,
    token_uri: Option<Field>,
    client_id: Option<Field>,
    client_secret: Option<Field>,
    refresh_token: Option<Field>,
}

impl Fields {
    /// The non-empty string value of `field`, or an error naming it.
    fn text<'a>(
        &self,
        path: &Path,
        name: &'static str,
        field: &'a Option<Field>,
    ) -> Result<&'a Zeroizing<String>, CredentialsError> {
        let problem = match field {
            None => "missing",
            Some(Field::Other) => "not a string",
            Some(Field::Text(text)) if text.trim().is_empty() => "empty",
            Some(Field::Text(text)) => return Ok(text),
        };
        Err(CredentialsError::Field {
            path: path.to_path_buf(),
            field: name,
            problem,
        })
    }
}

/// One field's value: a string (zeroed on drop) or anything else. Reading
/// it never fails, so that serde's messages (which may quote values) are
/// never shown; the broker names the field instead.
enum Field {
    Text(Zeroizing<String>),
    Other,
}

impl<'de> Deserialize<'de> for Field {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(FieldVisitor)
    }
}

struct FieldVisitor;

impl<'de> Visitor<'de> for FieldVisitor {
    type Value = Field;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<Field, E> {
        Ok(Field::Text(Zeroizing::new(value.to_string())))
    }

    fn visit_string<E: de::Error>(self, value: String) -> Result<Field, E> {
        Ok(Field::Text(Zeroizing::new(value)))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Field, E> {
        Ok(Field::Other)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Field, E> {
        Ok(Field::Other)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Field, E> {
        Ok(Field::Other)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Field, E> {
        Ok(Field::Other)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Field, E> {
        Ok(Field::Other)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Field, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Field::Other)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Field, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Field::Other)
    }
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
        let Credentials::ServiceAccount(key) = read(&path).unwrap() else {
            panic!("not a service account key");
        };
        assert_eq!(key.client_email, "sa@p.iam.gserviceaccount.com");
        assert_eq!(key.private_key_id, "kid-1");
        assert!(key.key_pair().is_ok());
        let printed = format!("{key:?}");
        assert!(!printed.contains("PRIVATE KEY") && printed.contains("[redacted]"));
        // Group-readable is allowed.
        let path = write(&dir, &key_json().to_string(), 0o640);
        assert!(read(&path).is_ok());
    }

    #[test]
    fn bad_files_get_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let expect = |content: String, mode: u32, needle: &str| {
            let path = write(&dir, &content, mode);
            let message = read(&path).unwrap_err().to_string();
            assert!(message.contains(needle), "{message:?} lacks {needle:?}");
            assert!(message.contains("key.json"), "{message}");
            assert!(!message.contains("MII"), "the key leaked: {message}");
        };
        expect(key_json().to_string(), 0o644, "every user");
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
        json["type"] = "external_account".into();
        expect(json.to_string(), 0o600, "\"external_account\"");
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
        assert!(matches!(read(&missing), Err(CredentialsError::Read { .. })));
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
        let Credentials::AuthorizedUser(user) = read(&path).unwrap() else {
            panic!("not user credentials");
        };
        assert_eq!(user.token_uri, DEFAULT_TOKEN_URI);
        assert_eq!(user.refresh_token.expose(), "1//refresh-secret");
        assert!(!format!("{user:?}").contains("refresh-secret"));
    }
}
