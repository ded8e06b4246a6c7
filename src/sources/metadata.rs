//! The GCE metadata server client: builds the token and identity URLs, sends
//! `Metadata-Flavor: Google`, and refuses any response it cannot trust.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use http::{HeaderMap, Request, StatusCode, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use tokio::time::Instant;

use crate::error::FetchError;
use crate::request::{AccessTokenKey, IdTokenFormat, IdTokenKey, TokenKey};
use crate::sources::response::{
    MAX_RESPONSE_BYTES, error_chain, parse_access_token, parse_id_token, retry_after,
};
use crate::token::Token;
use crate::upstream::TokenSource;

/// The metadata server's host name, used unless `GCE_METADATA_HOST` is set.
pub const DEFAULT_METADATA_HOST: &str = "metadata.google.internal";
/// Its link-local address, which Google's libraries fall back to when the
/// name does not resolve.
pub const METADATA_IP: &str = "169.254.169.254";
/// What to do when no metadata server answers.
pub const OFF_CLOUD_HINT: &str = "not on Google Cloud? run the broker with --emulator (to try it), --credentials FILE (a key, gcloud's or a federation file), or GCE_METADATA_HOST=HOST:PORT";

/// The metadata host to use for `host`: itself, unless it is
/// [`DEFAULT_METADATA_HOST`] and `resolves` says the name does not resolve;
/// then [`METADATA_IP`], as Google's libraries do, with a warning that says
/// what to do off Google Cloud.
pub fn reachable_host(host: &str, resolves: impl Fn(&str) -> bool) -> String {
    if host != DEFAULT_METADATA_HOST || resolves(host) {
        return host.to_string();
    }
    tracing::warn!(
        name = DEFAULT_METADATA_HOST,
        address = METADATA_IP,
        hint = OFF_CLOUD_HINT,
        "the metadata server's name does not resolve; using its address, as Google's libraries do"
    );
    METADATA_IP.to_string()
}

/// How long start-up waits for the system resolver to answer.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether the system resolver knows `host` within [`RESOLVE_TIMEOUT`]
/// (used once at start-up; a resolver that does not answer in time counts
/// as not knowing it).
pub fn system_resolves(host: &str) -> bool {
    use std::net::ToSocketAddrs;
    let (sender, receiver) = std::sync::mpsc::channel();
    let name = host.to_string();
    std::thread::spawn(move || {
        let known = (name.as_str(), 80)
            .to_socket_addrs()
            .is_ok_and(|mut addresses| addresses.next().is_some());
        let _ = sender.send(known);
    });
    receiver.recv_timeout(RESOLVE_TIMEOUT).unwrap_or(false)
}
/// Default time one upstream request may take, connect to last byte: 5 s.
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5);

const ACCOUNTS_PATH: &str = "/computeMetadata/v1/instance/service-accounts/";
const FLAVOR: &str = "metadata-flavor";

/// Characters left as they are in a query value: RFC 3986 unreserved.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Fetches tokens from a metadata server over plain HTTP.
#[derive(Clone, Debug)]
pub struct MetadataClient {
    host: String,
    http: Client<HttpConnector, Empty<Bytes>>,
    timeout: Duration,
    /// Set once the server has answered; until then, with the default
    /// host, a server that cannot be reached gets [`OFF_CLOUD_HINT`].
    answered: Arc<AtomicBool>,
}

impl MetadataClient {
    /// A client for `host` (`host[:port]`, as in `GCE_METADATA_HOST`) whose
    /// requests each take at most `timeout`.
    pub fn new(host: &str, timeout: Duration) -> Result<Self, String> {
        let authority: http::uri::Authority = host.parse().map_err(|_| {
            format!("metadata host {host:?} is not host[:port] (no scheme, no path)")
        })?;
        if authority.as_str().contains('@') {
            return Err(format!("metadata host {host:?} must not hold user info"));
        }
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        let http = crate::sources::https::pooled_client().build(connector);
        Ok(Self {
            host: authority.to_string(),
            http,
            timeout,
            answered: Arc::new(AtomicBool::new(false)),
        })
    }

    /// `error`, with what to do off Google Cloud when the default metadata
    /// server has never answered and cannot be reached.
    fn explained(&self, error: FetchError) -> FetchError {
        let default = self.host == DEFAULT_METADATA_HOST || self.host == METADATA_IP;
        if !default || self.answered.load(Ordering::Relaxed) {
            return error;
        }
        match error {
            FetchError::Connect(detail) => {
                FetchError::Connect(format!("{detail} (at {}); {OFF_CLOUD_HINT}", self.host))
            }
            // Reported as a connection failure, with the hint, until the
            // server has answered once.
            FetchError::Timeout(limit) => FetchError::Connect(format!(
                "the metadata server at {}: no answer within {}; {OFF_CLOUD_HINT}",
                self.host,
                humantime::format_duration(limit)
            )),
            other => other,
        }
    }

    /// The host (and port) requests go to.
    pub fn host(&self) -> &str {
        &self.host
    }

    async fn fetch_token(&self, key: &TokenKey) -> Result<Token, FetchError> {
        let fetched_at = (Instant::now(), SystemTime::now());
        let path = path_and_query(key).ok_or_else(FetchError::downscoped_key)?;
        let url = format!("http://{}{path}", self.host);
        let body = tokio::time::timeout(self.timeout, self.get(&url))
            .await
            .map_err(|_| FetchError::Timeout(self.timeout))
            .flatten()
            .map_err(|error| self.explained(error))?;
        match key {
            TokenKey::Access(_) => parse_access_token(&body, fetched_at),
            TokenKey::Id(key) => parse_id_token(&body, &key.audience),
            TokenKey::Downscoped(_) => Err(FetchError::downscoped_key()),
        }
    }

    /// Checks that a metadata server answers at all (listing the service
    /// accounts, which costs no token): any status but a 5xx, with the
    /// `Metadata-Flavor: Google` header, counts.
    pub async fn probe(&self) -> Result<(), FetchError> {
        let url = format!("http://{}{ACCOUNTS_PATH}", self.host);
        let response = tokio::time::timeout(self.timeout, self.send(&url))
            .await
            .map_err(|_| FetchError::Timeout(self.timeout))
            .flatten()
            .map_err(|error| self.explained(error))?;
        if response.status().is_server_error() {
            return Err(FetchError::Status {
                status: response.status().as_u16(),
                retry_after: retry_after(response.headers()),
                detail: None,
            });
        }
        check_flavor(response.headers())
    }

    /// Sends `GET {path_and_query}` on a caller's behalf (the
    /// metadata-compatible endpoint's pass-through) and returns the answer
    /// whatever its status, if it comes within `timeout` from a server that
    /// says it is a metadata server.
    pub async fn forward(
        &self,
        path_and_query: &str,
        timeout: Duration,
    ) -> Result<Forwarded, FetchError> {
        let url = format!("http://{}{path_and_query}", self.host);
        let forward = async {
            let response = self.send(&url).await?;
            check_flavor(response.headers())?;
            let status = response.status();
            let mut headers = HeaderMap::new();
            for name in FORWARDED_HEADERS {
                if let Some(value) = response.headers().get(&name) {
                    headers.insert(name, value.clone());
                }
            }
            let body = read_body(response.into_body(), MAX_FORWARDED_BYTES).await?;
            Ok(Forwarded {
                status,
                headers,
                body,
            })
        };
        tokio::time::timeout(timeout, forward)
            .await
            .map_err(|_| FetchError::Timeout(timeout))?
    }

    async fn send(&self, url: &str) -> Result<http::Response<Incoming>, FetchError> {
        let request = Request::get(url)
            .header(FLAVOR, "Google")
            .header(
                header::USER_AGENT,
                concat!("tokenbroker/", env!("CARGO_PKG_VERSION")),
            )
            .body(Empty::new())
            .map_err(|e| FetchError::Malformed(format!("cannot build request: {e}")))?;
        self.http
            .request(request)
            .await
            .map_err(|e| FetchError::Connect(format!("the metadata server: {}", error_chain(&e))))
            .inspect(|_| self.answered.store(true, Ordering::Relaxed))
    }

    async fn get(&self, url: &str) -> Result<Bytes, FetchError> {
        let response = self.send(url).await?;
        let status = response.status();
        if status != StatusCode::OK {
            return Err(FetchError::Status {
                status: status.as_u16(),
                retry_after: retry_after(response.headers()),
                detail: None,
            });
        }
        check_flavor(response.headers())?;
        read_body(response.into_body(), MAX_RESPONSE_BYTES).await
    }
}

/// A metadata server's answer to a forwarded request.
#[derive(Debug)]
pub struct Forwarded {
    /// Its status, passed on as it is.
    pub status: StatusCode,
    /// The headers worth passing on ([`FORWARDED_HEADERS`]).
    pub headers: HeaderMap,
    /// Its body.
    pub body: Bytes,
}

/// The response headers a forwarded answer keeps.
pub const FORWARDED_HEADERS: [header::HeaderName; 4] = [
    header::CONTENT_TYPE,
    header::ETAG,
    header::LOCATION,
    header::RETRY_AFTER,
];

/// Largest forwarded response (1 MiB): more than a recursive listing of a
/// VM's metadata, whose values are limited to 256 KiB each.
pub const MAX_FORWARDED_BYTES: usize = 1024 * 1024;

/// Reads a body of at most `limit` bytes.
async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, FetchError> {
    let body = Limited::new(body, limit).collect().await.map_err(|e| {
        if e.is::<http_body_util::LengthLimitError>() {
            FetchError::Malformed(format!("response larger than {limit} bytes"))
        } else {
            FetchError::Connect(format!(
                "the metadata server: connection broke while reading the response: {e}"
            ))
        }
    })?;
    Ok(body.to_bytes())
}

impl TokenSource for MetadataClient {
    fn fetch<'a>(&'a self, key: &'a TokenKey) -> BoxFuture<'a, Result<Token, FetchError>> {
        self.fetch_token(key).boxed()
    }
}

/// The path and query for a key (none for a downscoped key, which the
/// metadata server cannot give). Query values are percent-encoded; the
/// account goes into the path as it is, validation having limited it to
/// characters that are literal in a path segment.
pub fn path_and_query(key: &TokenKey) -> Option<String> {
    let encode = |value: &str| utf8_percent_encode(value, QUERY_VALUE).to_string();
    match key {
        TokenKey::Access(AccessTokenKey { account, scopes }) => {
            let mut path = format!("{ACCOUNTS_PATH}{account}/token");
            if !scopes.is_empty() {
                let scopes: Vec<String> = scopes.iter().map(|s| encode(s)).collect();
                path.push_str("?scopes=");
                path.push_str(&scopes.join(","));
            }
            Some(path)
        }
        TokenKey::Id(IdTokenKey {
            account,
            audience,
            format,
            include_licenses,
        }) => {
            let mut path = format!(
                "{ACCOUNTS_PATH}{account}/identity?audience={}",
                encode(audience)
            );
            if *format == IdTokenFormat::Full {
                path.push_str("&format=full");
                if *include_licenses {
                    path.push_str("&licenses=TRUE");
                }
            }
            Some(path)
        }
        TokenKey::Downscoped(_) => None,
    }
}

fn check_flavor(headers: &HeaderMap) -> Result<(), FetchError> {
    if headers.get(FLAVOR).map(|v| v.as_bytes()) == Some(b"Google") {
        return Ok(());
    }
    Err(FetchError::Malformed(
        "no `Metadata-Flavor: Google` response header; is GCE_METADATA_HOST a metadata server?"
            .into(),
    ))
}

#[cfg(test)]
mod tests {

    use super::*;

    #[test]
    fn the_default_name_falls_back_to_the_address_when_it_does_not_resolve() {
        let resolving = |_: &str| true;
        let failing = |_: &str| false;
        assert_eq!(
            reachable_host(DEFAULT_METADATA_HOST, resolving),
            DEFAULT_METADATA_HOST
        );
        assert_eq!(reachable_host(DEFAULT_METADATA_HOST, failing), METADATA_IP);
        // A host the operator chose is used as it is.
        assert_eq!(reachable_host("127.0.0.1:8080", failing), "127.0.0.1:8080");
        assert_eq!(reachable_host("metadata.corp", failing), "metadata.corp");
    }

    #[test]
    fn an_unreachable_default_server_says_what_to_do_until_it_answers() {
        let client = MetadataClient::new(METADATA_IP, DEFAULT_UPSTREAM_TIMEOUT).unwrap();
        let message = client
            .explained(FetchError::Timeout(Duration::from_secs(5)))
            .to_string();
        assert!(
            message.contains("169.254.169.254") && message.contains("--emulator"),
            "{message}"
        );
        let refused = FetchError::Status {
            status: 403,
            retry_after: None,
            detail: None,
        };
        assert_eq!(client.explained(refused.clone()), refused, "it answered");
        client.answered.store(true, Ordering::Relaxed);
        let timeout = FetchError::Timeout(Duration::from_secs(5));
        assert_eq!(client.explained(timeout.clone()), timeout);
        let chosen = MetadataClient::new("127.0.0.1:9", DEFAULT_UPSTREAM_TIMEOUT).unwrap();
        assert_eq!(chosen.explained(timeout.clone()), timeout);
    }
    use crate::request::ServiceAccount;

    fn id_key(audience: &str, format: IdTokenFormat, include_licenses: bool) -> TokenKey {
        TokenKey::Id(IdTokenKey {
            account: ServiceAccount::Default,
            audience: audience.into(),
            format,
            include_licenses,
        })
    }

    #[test]
    fn access_token_url_lists_scopes() {
        let key = TokenKey::Access(AccessTokenKey {
            account: ServiceAccount::Email("a@b.iam.gserviceaccount.com".into()),
            scopes: vec![
                "https://www.googleapis.com/auth/cloud-platform".into(),
                "openid".into(),
            ],
        });
        assert_eq!(
            path_and_query(&key).unwrap(),
            "/computeMetadata/v1/instance/service-accounts/a@b.iam.gserviceaccount.com/token?scopes=https%3A%2F%2Fwww.googleapis.com%2Fauth%2Fcloud-platform,openid"
        );
        let defaults = TokenKey::Access(AccessTokenKey {
            account: ServiceAccount::Default,
            scopes: vec![],
        });
        assert_eq!(
            path_and_query(&defaults).unwrap(),
            "/computeMetadata/v1/instance/service-accounts/default/token"
        );
    }

    #[test]
    fn identity_url_encodes_the_audience() {
        let key = id_key("https://x.app/?a=1&b=2#f g", IdTokenFormat::Standard, false);
        assert_eq!(
            path_and_query(&key).unwrap(),
            "/computeMetadata/v1/instance/service-accounts/default/identity?audience=https%3A%2F%2Fx.app%2F%3Fa%3D1%26b%3D2%23f%20g"
        );
        let full = id_key("aud", IdTokenFormat::Full, true);
        assert!(
            path_and_query(&full)
                .unwrap()
                .ends_with("audience=aud&format=full&licenses=TRUE")
        );
    }

    #[test]
    fn host_must_be_an_authority() {
        assert!(MetadataClient::new("169.254.169.254", DEFAULT_UPSTREAM_TIMEOUT).is_ok());
        assert!(MetadataClient::new("localhost:8080", DEFAULT_UPSTREAM_TIMEOUT).is_ok());
        for bad in ["http://x", "x/y", "user@x", ""] {
            assert!(
                MetadataClient::new(bad, DEFAULT_UPSTREAM_TIMEOUT).is_err(),
                "{bad}"
            );
        }
    }
}
