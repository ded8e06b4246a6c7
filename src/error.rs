//! The broker's errors, and their one mapping to gRPC status codes (and,
//! for the metadata-compatible endpoint, to HTTP statuses).

use std::time::Duration;

use humantime::format_duration;
use tonic::{Code, Status};

/// Everything that can stop a request from getting a token. Messages say
/// what to fix and never contain a token.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    /// A request field failed validation; nothing was sent upstream.
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// The offending field, e.g. `scopes[2]`.
        field: String,
        /// What is wrong with it and what is accepted.
        reason: String,
    },
    /// A configured bound was reached (keys, watchers, scopes per request).
    #[error("{what}: the limit is {limit}")]
    LimitExceeded {
        /// What ran out, e.g. "too many cached keys".
        what: &'static str,
        /// The configured bound.
        limit: usize,
    },
    /// The caller's uid or pod (or the shared bucket of callers without a
    /// uid) holds as many keys it created as `--max-keys-per-uid` allows.
    #[error("{}", quota_message(creator.as_deref(), *limit))]
    KeyQuotaExceeded {
        /// Whom the new key would have been charged to (`uid 1000`, `pod
        /// <uid>`), or `None` for the bucket callers without a uid share.
        creator: Option<String>,
        /// The configured quota.
        limit: usize,
    },
    /// The token source could not give a token for this account.
    #[error("{}", upstream_message(account, source))]
    Upstream {
        /// The service account asked for (an email or `default`).
        account: String,
        /// What went wrong upstream.
        source: FetchError,
    },
    /// The configured token source cannot mint tokens for this account
    /// (a key file only for its own; impersonation only for its target).
    #[error(
        "{source_name} cannot mint tokens for service account \"{account}\": ask for \"default\" or \"{allowed}\""
    )]
    AccountNotAvailable {
        /// The account asked for.
        account: String,
        /// The configured source, in words (e.g. "the key file /etc/key.json").
        source_name: String,
        /// The one account it can mint tokens for.
        allowed: String,
    },
    /// The configured token source cannot give this kind of token at all.
    #[error("{source_name} cannot give {what}: {hint}")]
    Unsupported {
        /// The configured source, in words.
        source_name: String,
        /// What was asked for, e.g. "ID tokens".
        what: &'static str,
        /// What to do instead.
        hint: &'static str,
    },
    /// A fresh token was fetched but does not live as long as asked.
    #[error(
        "the freshest token is valid for {}, less than the {} asked for by min_valid_for; Google tokens live about an hour (and the metadata server reuses one until about 5 minutes before expiry), so ask for less",
        format_duration(*remaining),
        format_duration(*wanted)
    )]
    MinValidForUnmet {
        /// The requested `min_valid_for` (plus the broker's expiry skew).
        wanted: Duration,
        /// How long the freshest token stays valid.
        remaining: Duration,
    },
    /// The cached token does not meet `min_valid_for`, and the key was
    /// fetched too recently to be fetched again for it.
    #[error(
        "the token of this key was fetched less than {} ago and stays valid for {}, less than the {} asked for by min_valid_for; a key is refetched for min_valid_for at most once per {}, so try again in {} or ask for less (Google tokens live about an hour)",
        format_duration(*interval),
        format_duration(Duration::from_secs(remaining.as_secs())),
        format_duration(*wanted),
        format_duration(*interval),
        format_duration(Duration::from_secs(retry_in.as_secs().max(1)))
    )]
    MinValidForThrottled {
        /// The requested `min_valid_for`.
        wanted: Duration,
        /// How long the current token stays valid (less the expiry skew).
        remaining: Duration,
        /// How long until the key may be refetched.
        retry_in: Duration,
        /// The least time between two fetches of a key for `min_valid_for`.
        interval: Duration,
    },
    /// A watched token expired and no replacement could be fetched.
    #[error("the token expired and no replacement could be fetched: {}", last_error.as_ref().map_or_else(|| "no fetch succeeded".to_string(), ToString::to_string))]
    Expired {
        /// Why the last refresh failed, if one did.
        last_error: Option<FetchError>,
    },
    /// The access policy has no rule that lets this peer have this token.
    #[error("denied by policy {policy}: no [[allow]] rule lets {peer} have {request}")]
    PolicyDenied {
        /// The policy file.
        policy: String,
        /// Who asked (uid and gid).
        peer: String,
        /// What was asked for, in words (never a token).
        request: String,
    },
    /// The caller asked for an access boundary its matching policy rule's
    /// boundary does not cover.
    #[error(
        "denied by policy {policy}: {peer} asked for an access boundary no matching [[allow]] rule covers: {reason}"
    )]
    BoundaryNotCovered {
        /// The policy file.
        policy: String,
        /// Who asked (uid and gid).
        peer: String,
        /// What is not covered.
        reason: String,
    },
    /// A watch's policy was reloaded and limits its token to another
    /// boundary now: the caller watches again to get the new one.
    #[error(
        "the access policy {policy} was reloaded and now limits this token to another access boundary; watch it again"
    )]
    GrantChanged {
        /// The policy file.
        policy: String,
    },
    /// Workload identity: the peer's pod may not have this token, or the
    /// peer's pod cannot be told (the reason says which, and what to do).
    #[error("{reason}")]
    PodDenied {
        /// Why, naming the pod and its Kubernetes service account.
        reason: String,
    },
    /// Workload identity: the peer's pod cannot be identified now (the
    /// Kubernetes API server is out of reach and the pod is not known).
    #[error("{reason}")]
    PodUnavailable {
        /// Why, naming the pod.
        reason: String,
    },
    /// The caller's deadline passed while waiting for the metadata server.
    #[error(
        "no token within the call's deadline of {}; the fetch goes on in the background, so a retry may be served from the cache",
        format_duration(*.0)
    )]
    DeadlineExceeded(Duration),
    /// The key's cache entry kept being retired while the call waited.
    #[error(
        "the token's cache entry was retired while this call waited (the broker is stopping or a refresh failed hard); try again"
    )]
    EntryRetired,
    /// The key was invalidated too recently to be invalidated again.
    #[error(
        "this token's key was invalidated less than {} ago; try again in {} (at most one invalidation per key per --invalidate-interval)",
        format_duration(*interval),
        format_duration(Duration::from_secs(retry_in.as_secs().max(1)))
    )]
    InvalidateThrottled {
        /// How long until the key may be invalidated again.
        retry_in: Duration,
        /// The configured least time between invalidations.
        interval: Duration,
    },
    /// The broker is stopping.
    #[error("broker shutting down")]
    ShuttingDown,
}

fn quota_message(creator: Option<&str>, limit: usize) -> String {
    let holder = match creator {
        Some(creator) => {
            let one = creator.split(' ').next().unwrap_or("uid");
            format!("{creator} holds {limit} cached keys it created, the most one {one} may hold")
        }
        None => format!(
            "callers without a uid (the metadata endpoint on loopback TCP) hold {limit} cached keys they created, the most they may hold together"
        ),
    };
    format!(
        "{holder} (--max-keys-per-uid {limit}); keys are dropped when unused for --idle-timeout, sooner if they never got a token"
    )
}

fn upstream_message(account: &str, source: &FetchError) -> String {
    match source {
        // The OAuth and IAM APIs explain themselves; the hints below are the
        // metadata server's, which answers with a bare status.
        FetchError::Status {
            status,
            detail: Some(detail),
            ..
        } => {
            format!("the token source refused a token for \"{account}\" (HTTP {status}): {detail}")
        }
        FetchError::Status { status: 404, .. } => format!(
            "the metadata server does not know service account \"{account}\" (HTTP 404): use \"default\" or an email listed under computeMetadata/v1/instance/service-accounts/"
        ),
        FetchError::Status { status: 403, .. } => format!(
            "the metadata server refused a token for \"{account}\" (HTTP 403): check the VM's access scopes and that nothing between the broker and the metadata server adds X-Forwarded-For"
        ),
        FetchError::Status { status: 400, .. } => format!(
            "the metadata server rejected the request for \"{account}\" as invalid (HTTP 400)"
        ),
        other => format!("no token for \"{account}\": {other}"),
    }
}

impl BrokerError {
    /// Shorthand for [`BrokerError::InvalidArgument`].
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Whether this is a refusal that keeps the cache's fair shares (a key
    /// over the per-uid quota, a `min_valid_for` refetch too soon): a peer
    /// can repeat it as fast as it likes, so it is logged only at debug
    /// level (the cache counts them, and warns of a quota once a minute).
    pub fn is_fair_share_refusal(&self) -> bool {
        matches!(
            self,
            Self::KeyQuotaExceeded { .. } | Self::MinValidForThrottled { .. }
        )
    }

    /// The gRPC status code this error is reported with.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument { .. } => Code::InvalidArgument,
            Self::LimitExceeded { .. }
            | Self::KeyQuotaExceeded { .. }
            | Self::InvalidateThrottled { .. } => Code::ResourceExhausted,
            Self::Upstream { source, .. } => match source {
                FetchError::Status { status: 400, .. } => Code::InvalidArgument,
                FetchError::Status {
                    status: 401 | 403, ..
                } => Code::PermissionDenied,
                FetchError::Status { status: 404, .. } => Code::NotFound,
                _ => Code::Unavailable,
            },
            Self::PolicyDenied { .. }
            | Self::BoundaryNotCovered { .. }
            | Self::PodDenied { .. }
            | Self::AccountNotAvailable { .. } => Code::PermissionDenied,
            Self::Unsupported { .. } => Code::InvalidArgument,
            Self::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Self::MinValidForUnmet { .. }
            | Self::MinValidForThrottled { .. }
            | Self::Expired { .. }
            | Self::GrantChanged { .. }
            | Self::PodUnavailable { .. }
            | Self::EntryRetired
            | Self::ShuttingDown => Code::Unavailable,
        }
    }
}

impl BrokerError {
    /// The HTTP status the metadata-compatible endpoint answers this error
    /// with, using only the metadata server's own codes (400, 403, 404, 429,
    /// 503), and the `Retry-After` to send with a 429 or 503, if known.
    pub fn http_status(&self) -> (http::StatusCode, Option<Duration>) {
        use http::StatusCode as Http;
        match self {
            Self::InvalidArgument { .. } | Self::Unsupported { .. } => (Http::BAD_REQUEST, None),
            Self::LimitExceeded { .. }
            | Self::KeyQuotaExceeded { .. }
            | Self::InvalidateThrottled { .. } => (Http::TOO_MANY_REQUESTS, None),
            Self::PolicyDenied { .. }
            | Self::BoundaryNotCovered { .. }
            | Self::PodDenied { .. } => (Http::FORBIDDEN, None),
            // What the metadata server answers for an account it lacks.
            Self::AccountNotAvailable { .. } => (Http::NOT_FOUND, None),
            Self::Upstream { source, .. } => match source {
                FetchError::Status {
                    status: status @ (400 | 403 | 404 | 429),
                    retry_after,
                    ..
                } => (
                    Http::from_u16(*status).unwrap_or(Http::SERVICE_UNAVAILABLE),
                    *retry_after,
                ),
                FetchError::Status { status: 401, .. } => (Http::FORBIDDEN, None),
                FetchError::Status { retry_after, .. } => (Http::SERVICE_UNAVAILABLE, *retry_after),
                _ => (Http::SERVICE_UNAVAILABLE, None),
            },
            Self::MinValidForThrottled { retry_in, .. } => {
                (Http::SERVICE_UNAVAILABLE, Some(*retry_in))
            }
            Self::MinValidForUnmet { .. }
            | Self::Expired { .. }
            | Self::GrantChanged { .. }
            | Self::PodUnavailable { .. }
            | Self::DeadlineExceeded(_)
            | Self::EntryRetired
            | Self::ShuttingDown => (Http::SERVICE_UNAVAILABLE, None),
        }
    }
}

impl From<BrokerError> for Status {
    fn from(error: BrokerError) -> Self {
        Status::new(error.code(), error.to_string())
    }
}

/// Why a fetch failed. Messages never contain a token or a response body.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// No connection could be made, or it broke before a response arrived.
    /// The message names the service first, e.g. "the metadata server: …".
    #[error("cannot reach {0}")]
    Connect(String),
    /// No complete response within the upstream timeout.
    #[error("the token source did not answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// A status other than 200.
    #[error("the token source answered HTTP {status}{}", detail.as_ref().map(|d| format!(": {d}")).unwrap_or_default())]
    Status {
        /// The HTTP status code.
        status: u16,
        /// The server's `Retry-After`, if it sent one.
        retry_after: Option<Duration>,
        /// The service and its explanation, when it gave one (the OAuth and
        /// IAM APIs do; the metadata server does not). Never a token.
        detail: Option<String>,
    },
    /// A 200 whose body or headers cannot be trusted as a token, or a
    /// request that could not be made at all (e.g. a JWT that cannot be
    /// signed).
    #[error("the token source sent an unusable response: {0}")]
    Malformed(String),
    /// A downscoped token's source token could not be had for a reason of
    /// the broker's own (a quota, the broker stopping).
    #[error("no source token to downscope: {0}")]
    SourceToken(String),
}

impl FetchError {
    /// What a token source answers for a downscoped key: those are
    /// exchanged from their source key's token, never fetched directly.
    pub fn downscoped_key() -> Self {
        Self::Malformed(
            "a downscoped token is exchanged from its source token, never fetched from a source"
                .into(),
        )
    }

    /// Whether trying again may succeed: connect errors, timeouts, 408, 429
    /// and 5xx.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Connect(_) | Self::Timeout(_) => true,
            Self::Status { status, .. } => matches!(status, 408 | 429 | 500..=599),
            Self::Malformed(_) | Self::SourceToken(_) => false,
        }
    }

    /// Whether the token source could not be reached at all: no
    /// connection, no answer in time, or a 5xx from something in between.
    pub fn is_unreachable(&self) -> bool {
        match self {
            Self::Connect(_) | Self::Timeout(_) => true,
            Self::Status { status, .. } => *status >= 500,
            Self::Malformed(_) | Self::SourceToken(_) => false,
        }
    }

    /// A bounded label for metrics: `http_4xx`, `http_5xx`, `rate_limited`,
    /// `timeout`, `connect` or `malformed`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Connect(_) => "connect",
            Self::Timeout(_) => "timeout",
            Self::Status { status: 429, .. } => "rate_limited",
            Self::Status { status, .. } if *status >= 500 => "http_5xx",
            Self::Status { .. } => "http_4xx",
            Self::Malformed(_) => "malformed",
            Self::SourceToken(_) => "source_token",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(status: u16) -> BrokerError {
        BrokerError::Upstream {
            account: "build@p.iam.gserviceaccount.com".into(),
            source: FetchError::Status {
                status,
                retry_after: None,
                detail: None,
            },
        }
    }

    #[test]
    fn upstream_statuses_map_to_the_documented_codes() {
        assert_eq!(upstream(404).code(), Code::NotFound);
        assert_eq!(upstream(403).code(), Code::PermissionDenied);
        assert_eq!(upstream(400).code(), Code::InvalidArgument);
        for status in [429, 500, 503] {
            assert_eq!(upstream(status).code(), Code::Unavailable);
        }
        let timeout = BrokerError::Upstream {
            account: "default".into(),
            source: FetchError::Timeout(Duration::from_secs(5)),
        };
        assert_eq!(timeout.code(), Code::Unavailable);
    }

    #[test]
    fn not_found_names_the_account_and_the_fix() {
        let status = Status::from(upstream(404));
        assert_eq!(status.code(), Code::NotFound);
        assert!(status.message().contains("build@p.iam.gserviceaccount.com"));
        assert!(status.message().contains("\"default\""));
    }

    #[test]
    fn errors_map_to_the_metadata_servers_http_codes() {
        use http::StatusCode as Http;
        for status in [400, 403, 404, 429] {
            assert_eq!(upstream(status).http_status().0.as_u16(), status);
        }
        let throttled = BrokerError::Upstream {
            account: "default".into(),
            source: FetchError::Status {
                status: 429,
                retry_after: Some(Duration::from_secs(7)),
                detail: None,
            },
        };
        assert_eq!(
            throttled.http_status(),
            (Http::TOO_MANY_REQUESTS, Some(Duration::from_secs(7)))
        );
        for status in [500, 502, 503] {
            assert_eq!(upstream(status).http_status().0, Http::SERVICE_UNAVAILABLE);
        }
        let unreachable = BrokerError::Upstream {
            account: "default".into(),
            source: FetchError::Connect("refused".into()),
        };
        assert_eq!(unreachable.http_status().0, Http::SERVICE_UNAVAILABLE);
        assert_eq!(
            BrokerError::invalid("audience", "empty").http_status().0,
            Http::BAD_REQUEST
        );
        let limit = BrokerError::LimitExceeded {
            what: "too many cached keys",
            limit: 1,
        };
        assert_eq!(limit.http_status().0, Http::TOO_MANY_REQUESTS);
        let denied = BrokerError::PolicyDenied {
            policy: "p.toml".into(),
            peer: "uid 7 (gid 7)".into(),
            request: "an ID token".into(),
        };
        assert_eq!(denied.http_status().0, Http::FORBIDDEN);
        assert_eq!(
            BrokerError::ShuttingDown.http_status().0,
            Http::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn local_errors_map_to_their_codes() {
        assert_eq!(
            BrokerError::invalid("audience", "empty").code(),
            Code::InvalidArgument
        );
        let limit = BrokerError::LimitExceeded {
            what: "too many cached keys",
            limit: 1,
        };
        assert_eq!(limit.code(), Code::ResourceExhausted);
        assert_eq!(
            BrokerError::DeadlineExceeded(Duration::from_secs(1)).code(),
            Code::DeadlineExceeded
        );
        assert_eq!(BrokerError::ShuttingDown.code(), Code::Unavailable);
    }

    #[test]
    fn explained_refusals_keep_their_code_and_show_the_explanation() {
        let refused = |status| BrokerError::Upstream {
            account: "default".into(),
            source: FetchError::Status {
                status,
                retry_after: None,
                detail: Some("OAuth token endpoint: invalid_grant: Invalid JWT Signature.".into()),
            },
        };
        assert_eq!(refused(400).code(), Code::InvalidArgument);
        assert_eq!(refused(401).code(), Code::PermissionDenied);
        assert_eq!(refused(403).code(), Code::PermissionDenied);
        assert_eq!(refused(404).code(), Code::NotFound);
        assert_eq!(refused(503).code(), Code::Unavailable);
        let message = refused(400).to_string();
        assert!(
            message.contains("invalid_grant: Invalid JWT Signature."),
            "{message}"
        );
        assert!(!message.contains("metadata server"), "{message}");
    }

    #[test]
    fn source_refusals_say_what_to_ask_for() {
        let other = BrokerError::AccountNotAvailable {
            account: "other@p.iam.gserviceaccount.com".into(),
            source_name: "the key file /k.json".into(),
            allowed: "me@p.iam.gserviceaccount.com".into(),
        };
        assert_eq!(other.code(), Code::PermissionDenied);
        assert!(
            other
                .to_string()
                .contains("\"me@p.iam.gserviceaccount.com\"")
        );
        let unsupported = BrokerError::Unsupported {
            source_name: "user credentials".into(),
            what: "ID tokens",
            hint: "use --impersonate",
        };
        assert_eq!(unsupported.code(), Code::InvalidArgument);
    }

    fn fetch_status(status: u16) -> FetchError {
        FetchError::Status {
            status,
            retry_after: None,
            detail: None,
        }
    }

    #[test]
    fn transient_errors_are_those_worth_retrying() {
        assert!(FetchError::Connect("refused".into()).is_transient());
        assert!(FetchError::Timeout(Duration::from_secs(1)).is_transient());
        for code in [408, 429, 500, 503] {
            assert!(fetch_status(code).is_transient(), "{code}");
        }
        for code in [400, 403, 404] {
            assert!(!fetch_status(code).is_transient(), "{code}");
        }
        assert!(!FetchError::Malformed("x".into()).is_transient());
    }

    #[test]
    fn reasons_are_the_documented_labels() {
        assert_eq!(fetch_status(429).reason(), "rate_limited");
        assert_eq!(fetch_status(503).reason(), "http_5xx");
        assert_eq!(fetch_status(404).reason(), "http_4xx");
        assert_eq!(FetchError::Timeout(Duration::ZERO).reason(), "timeout");
        assert_eq!(FetchError::Connect(String::new()).reason(), "connect");
        assert_eq!(FetchError::Malformed(String::new()).reason(), "malformed");
    }
}
