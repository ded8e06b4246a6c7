//! The metadata-server-compatible endpoint (`serve --metadata-addr`).
//!
//! Google's auth libraries (Python, Go, Java, Node, gcloud, Rust) all honour
//! `GCE_METADATA_HOST`: pointed here, they get their access and ID tokens
//! from the broker's cache (same keys, single flight and refresh as the gRPC
//! API) without a code change. Everything else under `/computeMetadata/v1/`
//! (project id, zone, attributes, the account listing they read first) is
//! passed through to the real metadata server. The real server's rules
//! apply: `Metadata-Flavor: Google` is required and echoed, a request with
//! `X-Forwarded-For` is refused, errors use its status codes.
//!
//! On a Unix socket the policy applies to the peer's uid/gid; on a loopback
//! TCP port the peer cannot be identified and every local process is
//! trusted ([`Caller::Loopback`]).

use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use percent_encoding::percent_decode_str;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::connections::{self, Acceptor, ConnectionPermit, Listener, ListenerLimits};
use crate::error::BrokerError;
use crate::grpc::service::BrokerService;
use crate::policy::{Caller, Peer};
use crate::proto::v1 as pb;
use crate::quota::{Exceeded, Quota};
use crate::request::TokenRequest;
use crate::socket::BoundSocket;
use crate::sources::metadata::MetadataClient;
use crate::telemetry::metrics::Rpc;
use crate::token::{Token, TokenKind};
use crate::upstream::limits::UpstreamLimits;

const ROOT: &str = "/computeMetadata/v1/";
const ACCOUNTS: &str = "/computeMetadata/v1/instance/service-accounts/";
const FLAVOR: &str = "metadata-flavor";
/// Longest a long-poll (`wait_for_change=true`) waits (5 minutes): its
/// `timeout_sec` is lowered to this, so the metadata server answers by then,
/// and the client asks again.
const MAX_LONG_POLL: Duration = Duration::from_secs(300);
/// Most long-polls passed through at once (64); each holds an upstream
/// connection for up to [`MAX_LONG_POLL`].
pub const MAX_LONG_POLLS: usize = 64;
/// Most long-polls of one peer uid at once (8), on a `unix:` endpoint.
pub const MAX_LONG_POLLS_PER_UID: usize = 8;

/// Where the endpoint listens: `127.0.0.1:PORT` (or another loopback
/// address), or `unix:/path/to/socket`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetadataAddr {
    /// A loopback TCP address; every local process is trusted.
    Tcp(SocketAddr),
    /// A Unix socket; the policy applies to each peer.
    Unix(PathBuf),
}

impl FromStr for MetadataAddr {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, String> {
        if let Some(path) = value.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(
                    "unix: needs a socket path, e.g. unix:/run/tokenbroker/metadata.sock".into(),
                );
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        let addr: SocketAddr = value.parse().map_err(|_| {
            format!("{value:?} is neither IP:PORT (e.g. 127.0.0.1:8181) nor unix:/path")
        })?;
        if !addr.ip().is_loopback() {
            return Err(format!(
                "{addr} is not a loopback address: the endpoint hands tokens to whoever connects \
                 and cannot tell who that is, so it listens only on 127.0.0.0/8 or ::1 (or a \
                 unix: socket)"
            ));
        }
        Ok(Self::Tcp(addr))
    }
}

impl fmt::Display for MetadataAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(addr) => write!(f, "{addr}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// A bound endpoint listener.
pub enum MetadataListener {
    /// Loopback TCP.
    Tcp(TcpListener),
    /// A Unix socket (removed when the endpoint stops).
    Unix(BoundSocket),
}

/// What the endpoint answers from.
#[derive(Clone)]
pub struct MetadataEndpoint {
    /// Serves tokens from the shared cache, with policy and metrics.
    pub service: BrokerService,
    /// Where everything but tokens is passed through to: the metadata
    /// server, when it is the token source; else nothing is.
    pub pass_through: Option<MetadataClient>,
    /// The rate and concurrency bounds token fetches obey too.
    pub upstream_limits: UpstreamLimits,
    /// Long-polls in flight.
    pub long_polls: LongPolls,
    /// Longest a passed-through request may take.
    pub timeout: Duration,
}

/// Long-polls in flight, in all and per peer uid.
#[derive(Clone, Debug)]
pub struct LongPolls(Quota);

impl Default for LongPolls {
    fn default() -> Self {
        Self(Quota::new(MAX_LONG_POLLS, MAX_LONG_POLLS_PER_UID))
    }
}

/// Serves the endpoint on `listener`, within `limits`, until `stop`.
pub async fn serve(
    listener: MetadataListener,
    limits: ListenerLimits,
    endpoint: MetadataEndpoint,
    stop: CancellationToken,
) {
    let endpoint = Arc::new(endpoint);
    let mut acceptor = Acceptor::new(Listener::Metadata.as_str());
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            accepted = accept(&listener, &mut acceptor) => accepted,
        };
        match accepted {
            Connection::Tcp(stream) => {
                if let Some(permit) = limits.admit(None) {
                    spawn_connection(stream, permit, Caller::Loopback, &endpoint, &stop)
                }
            }
            Connection::Unix(stream) => {
                let peer = stream.peer_cred().ok().map(|credentials| Peer {
                    uid: credentials.uid(),
                    gid: credentials.gid(),
                    pid: credentials.pid(),
                });
                if let Some(permit) = limits.admit(peer.map(|p| p.uid)) {
                    spawn_connection(stream, permit, Caller::Local(peer), &endpoint, &stop);
                }
            }
        }
    }
}

enum Connection {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(listener: &MetadataListener, acceptor: &mut Acceptor) -> Connection {
    match listener {
        MetadataListener::Tcp(listener) => Connection::Tcp(acceptor.accept(listener).await),
        MetadataListener::Unix(socket) => Connection::Unix(acceptor.accept(&socket.listener).await),
    }
}

fn spawn_connection<S>(
    stream: S,
    permit: ConnectionPermit,
    caller: Caller,
    endpoint: &Arc<MetadataEndpoint>,
    stop: &CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let endpoint = endpoint.clone();
    let service = service_fn(move |request| {
        let endpoint = endpoint.clone();
        async move { Ok::<_, Infallible>(endpoint.handle(caller, request).await) }
    });
    connections::spawn_http1(stream, service, permit, stop.clone());
}

/// The endpoint a request path names.
#[derive(Debug, PartialEq, Eq)]
enum Route<'a> {
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
    fn of(path: &'a str) -> Result<Self, BrokerError> {
        if path == "/" {
            return Ok(Self::Root);
        }
        let Some(rest) = path.strip_prefix(ROOT) else {
            return Ok(Self::NotFound);
        };
        // Only plain segments: the metadata server may normalise `..` or
        // percent-escapes, and a token path must never be passed through
        // unseen by the cache and the policy.
        let plain = rest.split('/').all(|segment| {
            segment != "."
                && segment != ".."
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

impl MetadataEndpoint {
    async fn handle(&self, caller: Caller, request: Request<Incoming>) -> Response<Full<Bytes>> {
        if request.method() != Method::GET {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET is supported\n");
        }
        let headers = request.headers();
        if headers.contains_key("x-forwarded-for") {
            return text(
                StatusCode::FORBIDDEN,
                "Request denied: X-Forwarded-For header present\n",
            );
        }
        if headers.get(FLAVOR).map(HeaderValue::as_bytes) != Some(b"Google") {
            return text(
                StatusCode::FORBIDDEN,
                "Missing required header: Metadata-Flavor: Google\n",
            );
        }
        if caller == Caller::Loopback && !local_host(&request) {
            return text(
                StatusCode::FORBIDDEN,
                "Request denied: the Host header must name this machine (a loopback address, localhost or metadata.google.internal)\n",
            );
        }
        let uri = request.uri();
        let query = uri.query().unwrap_or("");
        let route = match Route::of(uri.path()) {
            Ok(route) => route,
            Err(error) => return error_response(&error),
        };
        match route {
            Route::Root => text(StatusCode::OK, "computeMetadata/\n"),
            Route::Token { account } => {
                let request = access_token_request(account, query);
                let token = self
                    .token(Rpc::MetadataToken, TokenKind::Access, request, caller)
                    .await;
                token.map_or_else(|error| error_response(&error), |t| access_token_json(&t))
            }
            Route::Identity { account } => {
                let request = id_token_request(account, query);
                let token = self
                    .token(Rpc::MetadataIdentity, TokenKind::Id, request, caller)
                    .await;
                token.map_or_else(|error| error_response(&error), |t| raw_jwt(&t))
            }
            Route::PassThrough(path) => self.pass_through(path, query, caller).await,
            Route::NotFound => text(
                StatusCode::NOT_FOUND,
                "not found: the broker serves / and /computeMetadata/v1/ (tokens from its cache, the rest passed through)\n",
            ),
        }
    }

    async fn token<M>(
        &self,
        rpc: Rpc,
        kind: TokenKind,
        request: Result<M, BrokerError>,
        caller: Caller,
    ) -> Result<Arc<Token>, BrokerError>
    where
        M: TryInto<TokenRequest, Error = BrokerError>,
    {
        let request = request.and_then(TryInto::try_into);
        self.service.token(rpc, kind, request, caller, None).await
    }

    /// Passes a request on to the metadata server, within the upstream
    /// bounds; a long-poll also within the long-poll bounds, and for at
    /// most [`MAX_LONG_POLL`].
    async fn pass_through(&self, path: &str, query: &str, caller: Caller) -> Response<Full<Bytes>> {
        let Some(upstream) = &self.pass_through else {
            return text(
                StatusCode::NOT_FOUND,
                "not served: the broker's tokens do not come from a metadata server, so it answers only …/token and …/identity\n",
            );
        };
        let wait = long_poll(query);
        let (query, _place, _permit) = if wait.is_zero() {
            let permit = match self.upstream_limits.acquire().await {
                Ok(permit) => permit,
                Err(error) => return unavailable(path, &error),
            };
            (query.to_string(), None, Some(permit))
        } else {
            let uid = match caller {
                Caller::Local(peer) => peer.map(|p| p.uid),
                Caller::Loopback => None,
            };
            let place = match self.long_polls.0.acquire(uid) {
                Ok(place) => place,
                Err(exceeded) => return error_response(&long_polls_exceeded(exceeded)),
            };
            self.upstream_limits.turn().await;
            (with_timeout(query, wait), Some(place), None)
        };
        let path_and_query = if query.is_empty() {
            path.to_string()
        } else {
            format!("{path}?{query}")
        };
        match upstream.forward(&path_and_query, self.timeout + wait).await {
            Ok(forwarded) => {
                let mut response = Response::new(Full::new(forwarded.body));
                *response.status_mut() = forwarded.status;
                *response.headers_mut() = forwarded.headers;
                with_flavor(response)
            }
            Err(error) => unavailable(path, &error),
        }
    }
}

/// 503 for a pass-through that could not be made.
fn unavailable(path: &str, error: &crate::error::FetchError) -> Response<Full<Bytes>> {
    tracing::info!(path, %error, "metadata pass-through failed");
    text(
        StatusCode::SERVICE_UNAVAILABLE,
        &format!("cannot pass the request on: {error}\n"),
    )
}

fn long_polls_exceeded(exceeded: Exceeded) -> BrokerError {
    match exceeded {
        Exceeded::Total(limit) => BrokerError::LimitExceeded {
            what: "too many long-polls (wait_for_change=true) in flight",
            limit,
        },
        Exceeded::Owner(limit) => BrokerError::LimitExceeded {
            what: "too many long-polls (wait_for_change=true) in flight for this uid",
            limit,
        },
    }
}

/// The query of a long-poll that waits `wait`: its `timeout_sec` set to
/// that (the metadata server then answers within it), its other parameters
/// as they came.
fn with_timeout(query: &str, wait: Duration) -> String {
    let kept = query
        .split('&')
        .filter(|pair| !pair.is_empty() && !pair.starts_with("timeout_sec="));
    let timeout = format!("timeout_sec={}", wait.as_secs());
    kept.chain(std::iter::once(timeout.as_str()))
        .collect::<Vec<_>>()
        .join("&")
}

/// Whether the request's host (`Host`, or the absolute URI's) names this
/// machine. On a loopback TCP port a web page could otherwise reach the
/// endpoint through a DNS name rebound to 127.0.0.1 (its requests then
/// carry that name), and read tokens.
fn local_host<B>(request: &Request<B>) -> bool {
    let host = request.uri().host().map(str::to_string).or_else(|| {
        let value = request.headers().get(header::HOST)?.to_str().ok()?;
        let authority: http::uri::Authority = value.parse().ok()?;
        Some(authority.host().to_string())
    });
    let Some(host) = host else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return ip.is_loopback();
    }
    ["localhost", "metadata.google.internal", "metadata"]
        .iter()
        .any(|name| host.eq_ignore_ascii_case(name))
}

/// The query's parameters, percent-decoded (`+` is a space, as in forms).
fn parameters(query: &str) -> Result<Vec<(String, String)>, BrokerError> {
    let decode = |text: &str| {
        percent_decode_str(&text.replace('+', " "))
            .decode_utf8()
            .map(|t| t.into_owned())
            .map_err(|_| BrokerError::invalid("query", "a parameter is not UTF-8 once decoded"))
    };
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((decode(name)?, decode(value)?))
        })
        .collect()
}

/// `…/token[?scopes=a,b]`: the scopes may also come in several `scopes`
/// parameters. Any other parameter is refused rather than ignored, so a
/// token is never served for a request that meant something else.
fn access_token_request(
    account: String,
    query: &str,
) -> Result<pb::GetAccessTokenRequest, BrokerError> {
    let mut scopes = Vec::new();
    for (name, value) in parameters(query)? {
        match name.as_str() {
            "scopes" => scopes.extend(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from),
            ),
            _ => return Err(unknown_parameter(&name, "scopes")),
        }
    }
    Ok(pb::GetAccessTokenRequest {
        service_account: account,
        scopes,
        min_valid_for: None,
    })
}

/// `…/identity?audience=A[&format=standard|full][&licenses=TRUE|FALSE]`.
/// As on the metadata server, `licenses` counts only with `format=full`.
fn id_token_request(account: String, query: &str) -> Result<pb::GetIdTokenRequest, BrokerError> {
    let mut audience = None;
    let mut format = pb::IdTokenFormat::Standard;
    let mut licenses = false;
    for (name, value) in parameters(query)? {
        match name.as_str() {
            "audience" if audience.is_some() => {
                return Err(BrokerError::invalid("audience", "given more than once"));
            }
            "audience" => audience = Some(value),
            "format" => {
                format = match value.as_str() {
                    "standard" => pb::IdTokenFormat::Standard,
                    "full" => pb::IdTokenFormat::Full,
                    _ => return Err(BrokerError::invalid("format", "use standard or full")),
                }
            }
            "licenses" => {
                licenses = match value.to_ascii_uppercase().as_str() {
                    "TRUE" => true,
                    "FALSE" => false,
                    _ => return Err(BrokerError::invalid("licenses", "use TRUE or FALSE")),
                }
            }
            _ => return Err(unknown_parameter(&name, "audience, format, licenses")),
        }
    }
    let audience = audience
        .filter(|a| !a.is_empty())
        .ok_or_else(|| BrokerError::invalid("audience", "non-empty audience parameter required"))?;
    Ok(pb::GetIdTokenRequest {
        audience,
        service_account: account,
        format: format as i32,
        include_licenses: licenses && format == pb::IdTokenFormat::Full,
        min_valid_for: None,
    })
}

fn unknown_parameter(name: &str, accepted: &str) -> BrokerError {
    BrokerError::invalid(
        "query",
        format!("unknown parameter {name:?}; this endpoint accepts {accepted}"),
    )
}

/// How much longer than usual a long-polling pass-through may take.
fn long_poll(query: &str) -> Duration {
    let Ok(parameters) = parameters(query) else {
        return Duration::ZERO;
    };
    let waits = parameters
        .iter()
        .any(|(name, value)| name == "wait_for_change" && value == "true");
    if !waits {
        return Duration::ZERO;
    }
    parameters
        .iter()
        .find(|(name, _)| name == "timeout_sec")
        .and_then(|(_, value)| value.parse().ok())
        .map_or(MAX_LONG_POLL, Duration::from_secs)
        .min(MAX_LONG_POLL)
}

/// The metadata server's token JSON, `expires_in` counted from now.
fn access_token_json(token: &Token) -> Response<Full<Bytes>> {
    #[derive(Serialize)]
    struct Body<'a> {
        access_token: &'a str,
        expires_in: u64,
        token_type: &'a str,
    }
    let remaining = token.remaining(tokio::time::Instant::now());
    let body = serde_json::to_vec(&Body {
        access_token: token.secret().expose(),
        expires_in: remaining.as_secs(),
        token_type: token.token_type(),
    })
    .unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    with_flavor(response)
}

/// The raw JWT, as the identity endpoint sends it.
fn raw_jwt(token: &Token) -> Response<Full<Bytes>> {
    let body = Bytes::copy_from_slice(token.secret().expose().as_bytes());
    let mut response = Response::new(Full::new(body));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    with_flavor(response)
}

fn error_response(error: &BrokerError) -> Response<Full<Bytes>> {
    let (status, retry_after) = error.http_status();
    let mut response = text(status, &format!("{error}\n"));
    if let Some(retry_after) = retry_after {
        response.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(retry_after.as_secs()),
        );
    }
    response
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    with_flavor(response)
}

fn with_flavor(mut response: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    response
        .headers_mut()
        .insert(FLAVOR, HeaderValue::from_static("Google"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_loopback_tcp_or_unix_sockets() {
        assert_eq!(
            "127.0.0.1:8181".parse(),
            Ok(MetadataAddr::Tcp("127.0.0.1:8181".parse().unwrap()))
        );
        assert!("[::1]:8181".parse::<MetadataAddr>().is_ok());
        assert_eq!(
            "unix:/run/tb/metadata.sock".parse(),
            Ok(MetadataAddr::Unix("/run/tb/metadata.sock".into()))
        );
        let public = "0.0.0.0:80".parse::<MetadataAddr>().unwrap_err();
        assert!(public.contains("loopback"), "{public}");
        assert!("169.254.169.254:80".parse::<MetadataAddr>().is_err());
        assert!("unix:".parse::<MetadataAddr>().is_err());
        assert!("localhost:80".parse::<MetadataAddr>().is_err());
    }

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
        ] {
            assert_eq!(Route::of(path), Ok(Route::NotFound), "{path}");
        }
    }

    #[test]
    fn only_hosts_naming_this_machine_are_served_on_tcp() {
        let with_host = |host: &str| {
            Request::get("/computeMetadata/v1/project/project-id")
                .header(header::HOST, host)
                .body(())
                .unwrap()
        };
        for host in [
            "127.0.0.1:8181",
            "127.0.0.2",
            "[::1]:8181",
            "localhost:8181",
            "metadata.google.internal",
            "METADATA",
        ] {
            assert!(local_host(&with_host(host)), "{host}");
        }
        for host in [
            "attacker.example.com:8181",
            "10.0.0.1",
            "169.254.169.254",
            "",
        ] {
            assert!(!local_host(&with_host(host)), "{host}");
        }
        let absolute = Request::get("http://rebound.example.com/")
            .body(())
            .unwrap();
        assert!(!local_host(&absolute));
        assert!(!local_host(&Request::get("/").body(()).unwrap()));
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

    #[test]
    fn token_queries_become_requests() {
        let request = access_token_request(
            "default".into(),
            "scopes=https%3A%2F%2Fwww.googleapis.com%2Fauth%2Fcloud-platform,b&scopes=c",
        )
        .unwrap();
        assert_eq!(
            request.scopes,
            ["https://www.googleapis.com/auth/cloud-platform", "b", "c"]
        );
        assert!(
            access_token_request("default".into(), "")
                .unwrap()
                .scopes
                .is_empty()
        );
        let unknown = access_token_request("default".into(), "scope=x").unwrap_err();
        assert!(unknown.to_string().contains("\"scope\""), "{unknown}");
        assert!(access_token_request("default".into(), "scopes=%FF").is_err());
    }

    #[test]
    fn identity_queries_become_requests() {
        let request = id_token_request(
            "default".into(),
            "audience=https%3A%2F%2Fsvc.a.run.app&format=full&licenses=TRUE",
        )
        .unwrap();
        assert_eq!(request.audience, "https://svc.a.run.app");
        assert_eq!(request.format, pb::IdTokenFormat::Full as i32);
        assert!(request.include_licenses);
        // Like the metadata server: licenses only count with format=full.
        let standard = id_token_request("default".into(), "audience=a&licenses=TRUE").unwrap();
        assert!(!standard.include_licenses);
        for bad in [
            "",
            "audience=",
            "audience=a&audience=b",
            "audience=a&format=x",
            "audience=a&licenses=yes",
            "audience=a&aud=b",
        ] {
            let error = id_token_request("default".into(), bad).unwrap_err();
            assert_eq!(error.http_status().0, StatusCode::BAD_REQUEST, "{bad}");
        }
    }

    #[test]
    fn a_long_poll_asks_upstream_for_the_capped_timeout() {
        assert_eq!(
            with_timeout("wait_for_change=true", MAX_LONG_POLL),
            "wait_for_change=true&timeout_sec=300"
        );
        assert_eq!(
            with_timeout(
                "timeout_sec=999999&wait_for_change=true&last_etag=x",
                MAX_LONG_POLL
            ),
            "wait_for_change=true&last_etag=x&timeout_sec=300"
        );
        assert_eq!(
            with_timeout(
                "wait_for_change=true&timeout_sec=30",
                Duration::from_secs(30)
            ),
            "wait_for_change=true&timeout_sec=30"
        );
    }

    #[test]
    fn only_explicit_long_polls_wait_longer() {
        assert_eq!(long_poll(""), Duration::ZERO);
        assert_eq!(long_poll("recursive=true"), Duration::ZERO);
        assert_eq!(long_poll("wait_for_change=true"), MAX_LONG_POLL);
        assert_eq!(
            long_poll("wait_for_change=true&timeout_sec=30"),
            Duration::from_secs(30)
        );
        assert_eq!(
            long_poll("wait_for_change=true&timeout_sec=999999"),
            MAX_LONG_POLL
        );
    }
}
