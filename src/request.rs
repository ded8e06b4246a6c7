//! Validated requests and the cache keys they name. Every field is checked
//! here, before anything reaches the cache or the metadata server.

pub mod boundary;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::error::BrokerError;
use crate::secret::Secret;
use crate::token::TokenKind;
use boundary::AccessBoundary;

/// Most scopes one access-token request may name.
pub const MAX_SCOPES: usize = 32;
/// Longest accepted scope, in bytes.
pub const MAX_SCOPE_LEN: usize = 256;
/// Longest accepted audience, in bytes (2 KiB).
pub const MAX_AUDIENCE_LEN: usize = 2048;
/// Longest accepted service-account email, in bytes.
pub const MAX_ACCOUNT_LEN: usize = 254;
/// Largest accepted `min_valid_for`: metadata server tokens live about an hour.
pub const MAX_MIN_VALID_FOR: Duration = Duration::from_secs(3600);

/// The service account a token is for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ServiceAccount {
    /// The VM's default account (`default`, also what an empty field means).
    Default,
    /// An account named by its email.
    Email(String),
    /// With workload identity, the Google service account a pod maps to
    /// (an email), minted by impersonation with the broker's own
    /// credentials. Only the broker sets it, never a request field.
    Workload(Arc<str>),
}

impl ServiceAccount {
    /// Validates a request's `service_account` field (empty = `default`).
    pub fn parse(field: &'static str, value: String) -> Result<Self, BrokerError> {
        if value.is_empty() || value == "default" {
            return Ok(Self::Default);
        }
        check_email(&value).map_err(|reason| BrokerError::invalid(field, reason))?;
        Ok(Self::Email(value))
    }

    /// The path segment the metadata server expects.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Default => "default",
            Self::Email(email) => email,
            Self::Workload(email) => email,
        }
    }
}

impl fmt::Display for ServiceAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether `value` is a service account email (neither `default` nor
/// empty, which name the default account in a request).
pub fn is_service_account_email(value: &str) -> bool {
    check_email(value).is_ok()
}

fn check_email(value: &str) -> Result<(), String> {
    const HINT: &str =
        "use \"default\" or a service account email such as name@project.iam.gserviceaccount.com";
    if value.len() > MAX_ACCOUNT_LEN {
        return Err(format!("longer than {MAX_ACCOUNT_LEN} bytes; {HINT}"));
    }
    let Some((local, domain)) = value.split_once('@') else {
        return Err(format!("not an email; {HINT}"));
    };
    let local_ok = !local.is_empty()
        && local
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b));
    let domain_ok = domain.contains('.')
        && domain.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if !local_ok || !domain_ok || value.contains("..") {
        return Err(format!(
            "may hold only letters, digits and . _ + - around one @, with no empty or '..' parts; {HINT}"
        ));
    }
    Ok(())
}

/// The ID token's `format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IdTokenFormat {
    /// Identity claims only (`format=standard`, the default).
    Standard,
    /// Adds instance and project claims (`format=full`).
    Full,
}

/// What identifies one access token: account and the *set* of scopes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AccessTokenKey {
    /// The service account.
    pub account: ServiceAccount,
    /// Sorted and without duplicates; empty means the account's defaults.
    pub scopes: Vec<String>,
}

/// What identifies one ID token.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct IdTokenKey {
    /// The service account.
    pub account: ServiceAccount,
    /// The `aud` claim asked for.
    pub audience: String,
    /// Standard or full claims.
    pub format: IdTokenFormat,
    /// Whether license codes are included (only with `Full`).
    pub include_licenses: bool,
}

/// What identifies one downscoped access token: the access token it is
/// exchanged from, and the boundary it is limited to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DownscopedKey {
    /// The key of the source token (account and scopes).
    pub source: AccessTokenKey,
    /// What the token may reach, canonical.
    pub boundary: Arc<AccessBoundary>,
}

/// A cache key: one key, one token. A token is never served for another key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum TokenKey {
    /// An access token.
    Access(AccessTokenKey),
    /// An ID token.
    Id(IdTokenKey),
    /// An access token downscoped to a Credential Access Boundary: never
    /// fetched from a source directly, but exchanged at Google STS from the
    /// cached token of its source key.
    Downscoped(DownscopedKey),
}

impl TokenKey {
    /// Access or ID token (a downscoped token is an access token).
    pub fn kind(&self) -> TokenKind {
        match self {
            Self::Access(_) | Self::Downscoped(_) => TokenKind::Access,
            Self::Id(_) => TokenKind::Id,
        }
    }

    /// The service account the key is for.
    pub fn account(&self) -> &ServiceAccount {
        match self {
            Self::Access(key) => &key.account,
            Self::Id(key) => &key.account,
            Self::Downscoped(key) => &key.source.account,
        }
    }

    /// The account, to be rewritten (workload identity).
    pub fn account_mut(&mut self) -> &mut ServiceAccount {
        match self {
            Self::Access(key) => &mut key.account,
            Self::Id(key) => &mut key.account,
            Self::Downscoped(key) => &mut key.source.account,
        }
    }

    /// The key a source fetches for this one: itself, or for a downscoped
    /// key the access token it is exchanged from.
    pub fn source_key(&self) -> std::borrow::Cow<'_, TokenKey> {
        match self {
            Self::Downscoped(key) => std::borrow::Cow::Owned(Self::Access(key.source.clone())),
            key => std::borrow::Cow::Borrowed(key),
        }
    }

    /// The boundary the token is limited to, if it is downscoped.
    pub fn boundary(&self) -> Option<&AccessBoundary> {
        match self {
            Self::Downscoped(key) => Some(&key.boundary),
            Self::Access(_) | Self::Id(_) => None,
        }
    }

    /// This key limited to `boundary`: an access token becomes downscoped;
    /// a downscoped one takes the new boundary. ID tokens are returned
    /// unchanged (they grant no access to resources).
    pub fn downscoped_to(self, boundary: Arc<AccessBoundary>) -> Self {
        match self {
            Self::Access(source) | Self::Downscoped(DownscopedKey { source, .. }) => {
                Self::Downscoped(DownscopedKey { source, boundary })
            }
            Self::Id(key) => Self::Id(key),
        }
    }
}

/// A validated request: which token, and how long it must stay valid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRequest {
    /// The token asked for.
    pub key: TokenKey,
    /// The token returned must stay valid at least this long.
    pub min_valid_for: Duration,
}

impl TokenRequest {
    /// An access-token request, from the values a front door received:
    /// the account (empty or `default` for the default one), the scopes
    /// (a set; none means the account's default scopes) and how long the
    /// token must stay valid.
    pub fn access(
        service_account: String,
        scopes: Vec<String>,
        min_valid_for: Duration,
    ) -> Result<Self, BrokerError> {
        let account = ServiceAccount::parse("service_account", service_account)?;
        let scopes = scope_set(scopes)?;
        Ok(Self {
            key: TokenKey::Access(AccessTokenKey { account, scopes }),
            min_valid_for: check_min_valid_for(min_valid_for)?,
        })
    }

    /// This request limited to `boundary` (an access-token request only;
    /// `None` leaves it as it is).
    pub fn with_boundary(mut self, boundary: Option<AccessBoundary>) -> Self {
        if let Some(boundary) = boundary {
            self.key = self.key.downscoped_to(Arc::new(boundary));
        }
        self
    }

    /// An ID-token request, from the values a front door received: the
    /// audience, the account, the claims asked for and how long the token
    /// must stay valid. Licenses come only with the full format.
    pub fn id(
        audience: String,
        service_account: String,
        format: IdTokenFormat,
        include_licenses: bool,
        min_valid_for: Duration,
    ) -> Result<Self, BrokerError> {
        check_audience(&audience)?;
        let account = ServiceAccount::parse("service_account", service_account)?;
        if include_licenses && format != IdTokenFormat::Full {
            return Err(BrokerError::invalid(
                "include_licenses",
                "licenses are only included in full tokens; ask for the full format",
            ));
        }
        Ok(Self {
            key: TokenKey::Id(IdTokenKey {
                account,
                audience,
                format,
                include_licenses,
            }),
            min_valid_for: check_min_valid_for(min_valid_for)?,
        })
    }
}

/// Longest token accepted in `InvalidateToken` (16 KiB; ID tokens are a
/// few KiB).
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// A validated `InvalidateToken` call: the key, and the token handed back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalidation {
    /// The key the token was obtained for.
    pub key: TokenKey,
    /// The token the client's call was rejected with (`Debug` redacts it).
    pub token: Secret,
}

impl Invalidation {
    /// An invalidation of `key`'s token `token`, the one a service
    /// rejected.
    pub fn new(key: TokenKey, token: String) -> Result<Self, BrokerError> {
        if token.is_empty() {
            return Err(BrokerError::invalid(
                "token",
                "required: the token the service rejected",
            ));
        }
        if token.len() > MAX_TOKEN_LEN {
            return Err(BrokerError::invalid(
                "token",
                format!("longer than {MAX_TOKEN_LEN} bytes"),
            ));
        }
        Ok(Self {
            key,
            token: Secret::new(token),
        })
    }
}

/// Validates scopes and turns them into a set: sorted, duplicates removed.
fn scope_set(mut scopes: Vec<String>) -> Result<Vec<String>, BrokerError> {
    if scopes.len() > MAX_SCOPES {
        return Err(BrokerError::LimitExceeded {
            what: "too many scopes in one request",
            limit: MAX_SCOPES,
        });
    }
    for (index, scope) in scopes.iter().enumerate() {
        check_scope(scope)
            .map_err(|reason| BrokerError::invalid(format!("scopes[{index}]"), reason))?;
    }
    scopes.sort_unstable();
    scopes.dedup();
    Ok(scopes)
}

fn check_scope(scope: &str) -> Result<(), String> {
    if scope.is_empty() {
        return Err("empty; leave scopes out to get the account's default scopes".into());
    }
    if scope.len() > MAX_SCOPE_LEN {
        return Err(format!("longer than {MAX_SCOPE_LEN} bytes"));
    }
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b":/._-~+".contains(&b);
    if !scope.bytes().all(allowed) {
        return Err(
            "a scope is a URL such as https://www.googleapis.com/auth/cloud-platform (letters, digits and : / . _ - ~ + only; no spaces, commas or &)"
                .into(),
        );
    }
    Ok(())
}

fn check_audience(audience: &str) -> Result<(), BrokerError> {
    if audience.is_empty() {
        return Err(BrokerError::invalid(
            "audience",
            "required: the URL of the service the token is for, e.g. https://my-service-abc123-uc.a.run.app",
        ));
    }
    if audience.len() > MAX_AUDIENCE_LEN {
        return Err(BrokerError::invalid(
            "audience",
            format!("longer than {MAX_AUDIENCE_LEN} bytes"),
        ));
    }
    if audience.chars().any(char::is_control) {
        return Err(BrokerError::invalid(
            "audience",
            "contains control characters",
        ));
    }
    Ok(())
}

fn check_min_valid_for(duration: Duration) -> Result<Duration, BrokerError> {
    if duration > MAX_MIN_VALID_FOR {
        return Err(BrokerError::invalid(
            "min_valid_for",
            format!(
                "{} is longer than any metadata server token lives; ask for at most {}",
                humantime::format_duration(duration),
                humantime::format_duration(MAX_MIN_VALID_FOR)
            ),
        ));
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_requests_name_a_set_of_scopes() {
        let a = TokenRequest::access(
            String::new(),
            vec!["b:x".into(), "a:y".into(), "b:x".into()],
            Duration::ZERO,
        )
        .unwrap();
        let b = TokenRequest::access(
            "default".into(),
            vec!["a:y".into(), "b:x".into()],
            Duration::ZERO,
        )
        .unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn id_requests_get_licenses_only_in_full_tokens() {
        let id = |format, licenses| {
            TokenRequest::id(
                "https://a.run.app".into(),
                String::new(),
                format,
                licenses,
                Duration::ZERO,
            )
        };
        assert!(id(IdTokenFormat::Full, true).is_ok());
        let error = id(IdTokenFormat::Standard, true).unwrap_err();
        assert!(
            matches!(error, BrokerError::InvalidArgument { ref field, .. } if field == "include_licenses")
        );
    }

    #[test]
    fn min_valid_for_is_at_most_an_hour() {
        let ask = |d| TokenRequest::access(String::new(), vec![], d);
        assert!(ask(MAX_MIN_VALID_FOR).is_ok());
        assert!(ask(MAX_MIN_VALID_FOR + Duration::from_nanos(1)).is_err());
    }
}
