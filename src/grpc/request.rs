//! The protobuf messages of `tokenbroker.v1`, validated into the broker's
//! requests: each field is mapped here, and checked by `request`.

use std::time::Duration;

use crate::error::BrokerError;
use crate::proto::v1 as pb;
use crate::request::boundary::{AccessBoundary, RuleInput};
use crate::request::{IdTokenFormat, Invalidation, TokenRequest};

impl TryFrom<pb::GetAccessTokenRequest> for TokenRequest {
    type Error = BrokerError;

    fn try_from(request: pb::GetAccessTokenRequest) -> Result<Self, BrokerError> {
        let min_valid_for = min_valid_for(request.min_valid_for)?;
        let boundary = access_boundary(request.access_boundary)?;
        Ok(
            TokenRequest::access(request.service_account, request.scopes, min_valid_for)?
                .with_boundary(boundary),
        )
    }
}

/// The request's `access_boundary`, validated; none when it is empty.
fn access_boundary(
    rules: Vec<pb::AccessBoundaryRule>,
) -> Result<Option<AccessBoundary>, BrokerError> {
    if rules.is_empty() {
        return Ok(None);
    }
    let rules = rules
        .into_iter()
        .map(|rule| RuleInput {
            resource: rule.available_resource,
            permissions: rule.available_permissions,
            condition: rule
                .availability_condition
                .map(|c| (c.expression, c.title, c.description)),
        })
        .collect();
    AccessBoundary::new("access_boundary", rules).map(Some)
}

impl TryFrom<pb::GetIdTokenRequest> for TokenRequest {
    type Error = BrokerError;

    fn try_from(request: pb::GetIdTokenRequest) -> Result<Self, BrokerError> {
        let format = match pb::IdTokenFormat::try_from(request.format) {
            Ok(pb::IdTokenFormat::Unspecified | pb::IdTokenFormat::Standard) => {
                IdTokenFormat::Standard
            }
            Ok(pb::IdTokenFormat::Full) => IdTokenFormat::Full,
            Err(_) => {
                return Err(BrokerError::invalid(
                    "format",
                    format!(
                        "unknown value {}; use ID_TOKEN_FORMAT_STANDARD or ID_TOKEN_FORMAT_FULL",
                        request.format
                    ),
                ));
            }
        };
        let min_valid_for = min_valid_for(request.min_valid_for)?;
        TokenRequest::id(
            request.audience,
            request.service_account,
            format,
            request.include_licenses,
            min_valid_for,
        )
    }
}

impl TryFrom<pb::WatchTokenRequest> for TokenRequest {
    type Error = BrokerError;

    fn try_from(request: pb::WatchTokenRequest) -> Result<Self, BrokerError> {
        match request.request {
            Some(pb::watch_token_request::Request::AccessToken(access)) => access.try_into(),
            Some(pb::watch_token_request::Request::IdToken(id)) => id.try_into(),
            None => Err(BrokerError::invalid(
                "request",
                "set either access_token or id_token",
            )),
        }
    }
}

impl TryFrom<pb::InvalidateTokenRequest> for Invalidation {
    type Error = BrokerError;

    fn try_from(request: pb::InvalidateTokenRequest) -> Result<Self, BrokerError> {
        let key = match request.request {
            Some(pb::invalidate_token_request::Request::AccessToken(access)) => {
                TokenRequest::try_from(access)?.key
            }
            Some(pb::invalidate_token_request::Request::IdToken(id)) => {
                TokenRequest::try_from(id)?.key
            }
            None => {
                return Err(BrokerError::invalid(
                    "request",
                    "set either access_token or id_token: the request the token was obtained with",
                ));
            }
        };
        Invalidation::new(key, request.token)
    }
}

/// A `google.protobuf.Duration` as a non-negative duration (its bound is
/// checked with the rest of the request).
fn min_valid_for(value: Option<prost_types::Duration>) -> Result<Duration, BrokerError> {
    let Some(value) = value else {
        return Ok(Duration::ZERO);
    };
    u64::try_from(value.seconds)
        .ok()
        .zip(
            u32::try_from(value.nanos)
                .ok()
                .filter(|n| *n < 1_000_000_000),
        )
        .map(|(seconds, nanos)| Duration::new(seconds, nanos))
        .ok_or_else(|| {
            BrokerError::invalid(
                "min_valid_for",
                "must be a non-negative duration (seconds >= 0, 0 <= nanos < 1e9)",
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::{
        MAX_ACCOUNT_LEN, MAX_AUDIENCE_LEN, MAX_SCOPE_LEN, MAX_SCOPES, MAX_TOKEN_LEN,
        ServiceAccount, TokenKey,
    };
    use crate::token::TokenKind;

    fn access(account: &str, scopes: &[&str]) -> pb::GetAccessTokenRequest {
        pb::GetAccessTokenRequest {
            service_account: account.into(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            min_valid_for: None,
            ..Default::default()
        }
    }

    fn id(audience: &str) -> pb::GetIdTokenRequest {
        pb::GetIdTokenRequest {
            audience: audience.into(),
            ..Default::default()
        }
    }

    fn field_of(error: BrokerError) -> String {
        match error {
            BrokerError::InvalidArgument { field, .. } => field,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn scopes_are_a_set() {
        let a = TokenRequest::try_from(access("", &["b:x", "a:y", "b:x"])).unwrap();
        let b = TokenRequest::try_from(access("default", &["a:y", "b:x"])).unwrap();
        assert_eq!(a.key, b.key);
        let TokenKey::Access(key) = a.key else {
            panic!()
        };
        assert_eq!(key.scopes, vec!["a:y", "b:x"]);
        assert_eq!(key.account, ServiceAccount::Default);
    }

    #[test]
    fn accepts_real_accounts_and_scopes() {
        let request = access(
            "build-bot@my-project.iam.gserviceaccount.com",
            &["https://www.googleapis.com/auth/cloud-platform", "openid"],
        );
        assert!(TokenRequest::try_from(request).is_ok());
    }

    #[test]
    fn rejects_accounts_that_could_escape_the_path() {
        for account in [
            "../token",
            "a/b@c.com",
            "a..b@c.com",
            "x@y..com",
            "noatsign",
            "a@b",
            "a@b.com\n",
            "a b@c.com",
            "@c.com",
            "a@c.com@d.com",
        ] {
            let error = TokenRequest::try_from(access(account, &[])).unwrap_err();
            assert_eq!(field_of(error), "service_account", "{account:?}");
        }
        let long = format!("{}@x.com", "a".repeat(MAX_ACCOUNT_LEN));
        assert!(TokenRequest::try_from(access(&long, &[])).is_err());
    }

    #[test]
    fn rejects_scopes_that_would_change_the_query() {
        for scope in ["a,b", "a&b=c", "a b", "", "a\tb", "x?y", "a#b", "é"] {
            let error = TokenRequest::try_from(access("", &["ok", scope])).unwrap_err();
            assert_eq!(field_of(error), "scopes[1]", "{scope:?}");
        }
        let long = "s".repeat(MAX_SCOPE_LEN + 1);
        assert!(TokenRequest::try_from(access("", &[&long])).is_err());
    }

    #[test]
    fn too_many_scopes_is_a_limit() {
        let scopes: Vec<String> = (0..=MAX_SCOPES).map(|i| format!("s{i}")).collect();
        let scopes: Vec<&str> = scopes.iter().map(String::as_str).collect();
        let error = TokenRequest::try_from(access("", &scopes)).unwrap_err();
        assert!(matches!(error, BrokerError::LimitExceeded { .. }));
    }

    #[test]
    fn audience_is_required_bounded_and_kept_verbatim() {
        assert_eq!(
            field_of(TokenRequest::try_from(id("")).unwrap_err()),
            "audience"
        );
        let long = "a".repeat(MAX_AUDIENCE_LEN + 1);
        assert_eq!(
            field_of(TokenRequest::try_from(id(&long)).unwrap_err()),
            "audience"
        );
        assert!(TokenRequest::try_from(id("a\u{0}b")).is_err());
        let odd = "https://x.run.app/p?q=1&r=2#frag with space";
        let TokenKey::Id(key) = TokenRequest::try_from(id(odd)).unwrap().key else {
            panic!()
        };
        assert_eq!(key.audience, odd);
        assert_eq!(key.format, IdTokenFormat::Standard);
    }

    #[test]
    fn licenses_need_the_full_format() {
        let mut request = id("aud");
        request.include_licenses = true;
        assert_eq!(
            field_of(TokenRequest::try_from(request.clone()).unwrap_err()),
            "include_licenses"
        );
        request.format = pb::IdTokenFormat::Full as i32;
        assert!(TokenRequest::try_from(request).is_ok());
    }

    #[test]
    fn unknown_format_is_rejected() {
        let mut request = id("aud");
        request.format = 7;
        assert_eq!(
            field_of(TokenRequest::try_from(request).unwrap_err()),
            "format"
        );
    }

    #[test]
    fn min_valid_for_must_be_a_sane_duration() {
        let with = |seconds, nanos| {
            let mut request = id("aud");
            request.min_valid_for = Some(prost_types::Duration { seconds, nanos });
            TokenRequest::try_from(request)
        };
        assert_eq!(with(60, 5).unwrap().min_valid_for, Duration::new(60, 5));
        for (seconds, nanos) in [(-1, 0), (0, -1), (0, 1_000_000_000), (3601, 0)] {
            assert_eq!(field_of(with(seconds, nanos).unwrap_err()), "min_valid_for");
        }
    }

    #[test]
    fn a_watch_must_name_a_token() {
        let error = TokenRequest::try_from(pb::WatchTokenRequest { request: None }).unwrap_err();
        assert_eq!(field_of(error), "request");
    }

    #[test]
    fn keys_differ_by_every_field() {
        let base = id("aud");
        let variants = [
            pb::GetIdTokenRequest {
                audience: "aud2".into(),
                ..base.clone()
            },
            pb::GetIdTokenRequest {
                service_account: "a@b.com".into(),
                ..base.clone()
            },
            pb::GetIdTokenRequest {
                format: pb::IdTokenFormat::Full as i32,
                ..base.clone()
            },
            pb::GetIdTokenRequest {
                format: pb::IdTokenFormat::Full as i32,
                include_licenses: true,
                ..base.clone()
            },
        ];
        let base_key = TokenRequest::try_from(base).unwrap().key;
        let mut keys = vec![base_key];
        for variant in variants {
            let key = TokenRequest::try_from(variant).unwrap().key;
            assert!(!keys.contains(&key), "{key:?}");
            keys.push(key);
        }
    }

    #[test]
    fn invalidations_need_a_request_and_a_token() {
        let valid = pb::InvalidateTokenRequest {
            request: Some(pb::invalidate_token_request::Request::IdToken(id("aud"))),
            token: "eyJ.x.y".into(),
        };
        let parsed = Invalidation::try_from(valid.clone()).unwrap();
        assert_eq!(parsed.token.expose(), "eyJ.x.y");
        assert_eq!(parsed.key.kind(), TokenKind::Id);
        assert!(!format!("{parsed:?}").contains("eyJ"));
        let no_request = pb::InvalidateTokenRequest {
            request: None,
            ..valid.clone()
        };
        assert_eq!(
            field_of(Invalidation::try_from(no_request).unwrap_err()),
            "request"
        );
        let no_token = pb::InvalidateTokenRequest {
            token: String::new(),
            ..valid.clone()
        };
        assert_eq!(
            field_of(Invalidation::try_from(no_token).unwrap_err()),
            "token"
        );
        let huge = pb::InvalidateTokenRequest {
            token: "x".repeat(MAX_TOKEN_LEN + 1),
            ..valid.clone()
        };
        assert_eq!(field_of(Invalidation::try_from(huge).unwrap_err()), "token");
        let bad_key = pb::InvalidateTokenRequest {
            request: Some(pb::invalidate_token_request::Request::IdToken(id(""))),
            ..valid
        };
        assert_eq!(
            field_of(Invalidation::try_from(bad_key).unwrap_err()),
            "audience"
        );
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;
    use crate::request::{
        MAX_ACCOUNT_LEN, MAX_AUDIENCE_LEN, MAX_MIN_VALID_FOR, MAX_SCOPE_LEN, MAX_SCOPES,
        ServiceAccount, TokenKey,
    };

    fn any_access() -> impl Strategy<Value = pb::GetAccessTokenRequest> {
        (
            ".{0,300}",
            proptest::collection::vec(".{0,300}", 0..40),
            proptest::option::of((any::<i64>(), any::<i32>())),
        )
            .prop_map(|(service_account, scopes, min)| pb::GetAccessTokenRequest {
                service_account,
                scopes,
                min_valid_for: min.map(|(seconds, nanos)| prost_types::Duration { seconds, nanos }),
                ..Default::default()
            })
    }

    fn any_id() -> impl Strategy<Value = pb::GetIdTokenRequest> {
        (".{0,2100}", ".{0,300}", any::<i32>(), any::<bool>()).prop_map(
            |(audience, service_account, format, include_licenses)| pb::GetIdTokenRequest {
                audience,
                service_account,
                format,
                include_licenses,
                min_valid_for: None,
            },
        )
    }

    /// What reaches the metadata server must not be able to change the
    /// path or the query.
    fn account_is_path_safe(account: &ServiceAccount) -> bool {
        let text = account.as_str();
        text.len() <= MAX_ACCOUNT_LEN
            && !text.contains("..")
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._+-@".contains(&b))
    }

    proptest! {
        #[test]
        fn access_requests_never_panic_and_accepted_ones_are_safe(request in any_access()) {
            if let Ok(valid) = TokenRequest::try_from(request) {
                let TokenKey::Access(key) = valid.key else { panic!("wrong kind") };
                prop_assert!(account_is_path_safe(&key.account));
                prop_assert!(key.scopes.len() <= MAX_SCOPES);
                prop_assert!(key.scopes.windows(2).all(|w| w[0] < w[1]), "sorted set");
                for scope in &key.scopes {
                    prop_assert!(!scope.is_empty() && scope.len() <= MAX_SCOPE_LEN);
                    prop_assert!(!scope.contains([',', '&', ' ', '?', '#', '=']));
                }
                prop_assert!(valid.min_valid_for <= MAX_MIN_VALID_FOR);
            }
        }

        #[test]
        fn id_requests_never_panic_and_accepted_ones_are_sane(request in any_id()) {
            let licenses = request.include_licenses;
            if let Ok(valid) = TokenRequest::try_from(request) {
                let TokenKey::Id(key) = valid.key else { panic!("wrong kind") };
                prop_assert!(account_is_path_safe(&key.account));
                prop_assert!(!key.audience.is_empty() && key.audience.len() <= MAX_AUDIENCE_LEN);
                prop_assert!(!key.audience.chars().any(char::is_control));
                prop_assert_eq!(key.include_licenses, licenses);
                prop_assert!(!licenses || key.format == IdTokenFormat::Full);
            }
        }

        #[test]
        fn email_shaped_accounts_are_accepted(
            local in "[a-z0-9][a-z0-9._+-]{0,20}",
            project in "[a-z][a-z0-9-]{0,20}",
        ) {
            prop_assume!(!local.contains(".."));
            let email = format!("{local}@{project}.iam.gserviceaccount.com");
            let parsed = ServiceAccount::parse("service_account", email.clone());
            prop_assert_eq!(parsed, Ok(ServiceAccount::Email(email)));
        }
    }
}
