//! Which endpoint a request path names: the libraries' liveness probe,
//! a token or an identity (answered from the cache), something passed
//! through to the metadata server, or nothing served. A token path in any
//! disguise never reaches the pass-through.

use percent_encoding::percent_decode_str;

use crate::error::BrokerError;

/// The prefix of every path the endpoint serves but `/`.
pub const ROOT: &str = "/computeMetadata/v1/";
const ACCOUNTS: &str = "/computeMetadata/v1/instance/service-accounts/";

/// The endpoint a request path names.
#[derive(Debug, PartialEq, Eq)]
pub enum Route<'a> {
    /// `GET /`: the libraries' liveness probe.
    Root,
    /// `…/service-accounts/{account}/token`.
    Token { account: String },
    /// `…/service-accounts/{account}/identity`.
    Identity { account: String },
    /// Anything else under `/computeMetadata/v1/` that may be passed through.
    PassThrough(&'a str),
    /// Not served (outside `/computeMetadata/v1/`, a token path in disguise).
    NotFound,
}

impl<'a> Route<'a> {
    pub fn of(path: &'a str) -> Result<Self, BrokerError> {
        if path == "/" {
            return Ok(Self::Root);
        }
        let Some(rest) = path.strip_prefix(ROOT) else {
            return Ok(Self::NotFound);
        };
        // Only plain segments: the metadata server may normalise `..` or
        // percent-escapes, and a token path must never be passed through
        // unseen by the cache and the policy.
        // An empty segment only at the end (a directory): `v1//instance`
        // would be read as `v1/instance` by a server that collapses slashes.
        let segments: Vec<&str> = rest.split('/').collect();
        let plain = segments.iter().enumerate().all(|(i, segment)| {
            (!segment.is_empty() || i == segments.len() - 1)
                && *segment != "."
                && *segment != ".."
                && segment
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.@+".contains(&b))
        });
        let Some(account_path) = path.strip_prefix(ACCOUNTS) else {
            // Never pass the accounts' subtree on in another spelling.
            let other_case = path
                .to_ascii_lowercase()
                .starts_with(&ACCOUNTS.to_ascii_lowercase());
            return Ok(if plain && !other_case && !rest.contains("//") {
                Self::PassThrough(path)
            } else {
                Self::NotFound
            });
        };
        let (account, leaf) = account_path.split_once('/').unwrap_or((account_path, ""));
        let decoded = || {
            percent_decode_str(account)
                .decode_utf8()
                .map(|a| a.into_owned())
                .map_err(|_| BrokerError::invalid("service account", "not UTF-8"))
        };
        Ok(match leaf {
            "token" => Self::Token {
                account: decoded()?,
            },
            "identity" => Self::Identity {
                account: decoded()?,
            },
            // The listing and the account's own directory, email, aliases
            // and scopes: what the libraries read before asking for tokens.
            "" | "email" | "aliases" | "scopes" if plain => Self::PassThrough(path),
            _ => Self::NotFound,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_paths_are_routed_to_the_cache() {
        assert_eq!(
            Route::of("/computeMetadata/v1/instance/service-accounts/default/token"),
            Ok(Route::Token {
                account: "default".into()
            })
        );
        assert_eq!(
            Route::of(
                "/computeMetadata/v1/instance/service-accounts/a%40p.iam.gserviceaccount.com/identity"
            ),
            Ok(Route::Identity {
                account: "a@p.iam.gserviceaccount.com".into()
            })
        );
        assert_eq!(Route::of("/"), Ok(Route::Root));
    }

    #[test]
    fn token_paths_in_disguise_are_never_passed_through() {
        for path in [
            "/computeMetadata/v1/instance/service-accounts/default/token/",
            "/computeMetadata/v1/instance/service-accounts/default/tok%65n",
            "/computeMetadata/v1/instance/service-accounts/default/./token",
            "/computeMetadata/v1/instance/service-accounts/default/x/../token",
            "/computeMetadata/v1/instance/x/../service-accounts/default/token",
            "/computeMetadata/v1/instance//service-accounts/default/token",
            "/computeMetadata/v1/instance/service-accounts/default/identity/x",
            "/computeMetadata/v1beta1/instance/service-accounts/default/token",
            "/computeMetadata/v1/instance/service-accounts/default/../default/token",
            "/computeMetadata/v1/instance/Service-Accounts/default/token",
            "/computeMetadata/v1/instance/SERVICE-ACCOUNTS/default/identity",
            "/computeMetadata/v1//instance/service-accounts/default/token",
        ] {
            assert_eq!(Route::of(path), Ok(Route::NotFound), "{path}");
        }
    }

    #[test]
    fn everything_else_under_v1_is_passed_through() {
        for path in [
            "/computeMetadata/v1/",
            "/computeMetadata/v1/project/project-id",
            "/computeMetadata/v1/instance/zone",
            "/computeMetadata/v1/instance/service-accounts/",
            "/computeMetadata/v1/instance/service-accounts/default/",
            "/computeMetadata/v1/instance/service-accounts/default/email",
            "/computeMetadata/v1/instance/attributes/cluster-name",
        ] {
            assert_eq!(Route::of(path), Ok(Route::PassThrough(path)), "{path}");
        }
    }
}
