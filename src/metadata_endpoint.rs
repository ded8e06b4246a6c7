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

mod pass_through;
mod pod_accounts;
mod query;
pub mod reveal;
mod route;

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
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::Broker;
use crate::connections::{self, Acceptor, Listener, ListenerLimits};
use crate::error::BrokerError;
use crate::peer::Locator;
use crate::policy::Caller;
use crate::request::TokenRequest;
use crate::socket::BoundSocket;
use crate::sources::metadata::MetadataClient;
use crate::telemetry::metrics::Rpc;
use crate::token::{Token, TokenKind};
use crate::upstream::limits::UpstreamLimits;
use reveal::Reveal;
use route::Route;

const FLAVOR: &str = "metadata-flavor";
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

pub use pass_through::{LongPolls, MAX_LONG_POLLS};

/// What the endpoint answers from.
#[derive(Clone)]
pub struct MetadataEndpoint {
    /// Serves tokens from the shared cache, with policy and metrics.
    pub broker: Broker,
    /// Where everything but tokens is passed through to: the metadata
    /// server, when it is the token source; else nothing is.
    pub pass_through: Option<MetadataClient>,
    /// The rate and concurrency bounds token fetches obey too.
    pub upstream_limits: UpstreamLimits,
    /// Long-polls in flight.
    pub long_polls: LongPolls,
    /// Longest a passed-through request may take.
    pub timeout: Duration,
    /// Which paths besides tokens are passed through.
    pub reveal: Reveal,
    /// With workload identity, finds each `unix:` peer's pod when it
    /// connects (loopback TCP peers cannot be told apart).
    pub locator: Option<Locator>,
}

/// Serves the endpoint on `listener`, within `limits`, until `drain` is
/// cancelled: then it accepts no more connections, lets each finish the
/// request in flight, and returns once all are closed (the caller bounds
/// that wait with its shutdown grace). A `unix:` socket is removed then.
pub async fn serve(
    listener: MetadataListener,
    limits: ListenerLimits,
    endpoint: MetadataEndpoint,
    drain: CancellationToken,
) {
    let endpoint = Arc::new(endpoint);
    let connections = TaskTracker::new();
    let mut acceptor = Acceptor::new(Listener::Metadata.as_str());
    loop {
        let accepted = tokio::select! {
            () = drain.cancelled() => break,
            accepted = accept(&listener, &mut acceptor) => accepted,
        };
        let (stream, caller) = match accepted {
            Connection::Tcp(stream) => (Either::Left(stream), Caller::Loopback),
            Connection::Unix(stream) => {
                let locator = endpoint.locator.as_ref();
                let peer = connections::credentials::peer_of(&stream, locator);
                (Either::Right(stream), Caller::Local(peer))
            }
        };
        let Some(permit) = limits.admit(caller.holder()) else {
            continue;
        };
        let endpoint = endpoint.clone();
        let service = service_fn(move |request| {
            let endpoint = endpoint.clone();
            async move { Ok::<_, Infallible>(endpoint.handle(caller, request).await) }
        });
        connections::spawn_http1(stream, service, permit, &drain, &connections);
    }
    drop(listener);
    tracing::info!("metadata endpoint closed to new connections; finishing the requests in flight");
    connections.close();
    connections.wait().await;
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
                let request = query::access_token_request(account, query);
                let token = self
                    .token(Rpc::MetadataToken, TokenKind::Access, request, caller)
                    .await;
                token.map_or_else(|error| error_response(&error), |t| access_token_json(&t))
            }
            Route::Identity { account } => {
                let request = query::id_token_request(account, query);
                let token = self
                    .token(Rpc::MetadataIdentity, TokenKind::Id, request, caller)
                    .await;
                token.map_or_else(|error| error_response(&error), |t| raw_jwt(&t))
            }
            Route::PassThrough(path) => {
                let below_root = path.strip_prefix(route::ROOT).unwrap_or_default();
                // A pod served as its own account sees that account only.
                match self.broker.pod_account(&caller).await {
                    Err(error) => return error_response(&error),
                    Ok(Some(google)) => {
                        if let Some(answer) = pod_accounts::answer_for(below_root, query, &google) {
                            return pod_answer(answer);
                        }
                    }
                    Ok(None) => {}
                }
                if self.reveal.allows(below_root, query)
                    || self.broker.reveals(
                        &caller,
                        below_root,
                        !reveal::only_plain_parameters(query),
                    )
                {
                    self.pass_through(path, query, caller).await
                } else {
                    text(StatusCode::NOT_FOUND, reveal::CONCEALED)
                }
            }
            Route::NotFound => text(
                StatusCode::NOT_FOUND,
                "not found: the broker serves / and /computeMetadata/v1/ (tokens from its cache, the rest passed through)\n",
            ),
        }
    }

    async fn token(
        &self,
        rpc: Rpc,
        kind: TokenKind,
        request: Result<TokenRequest, BrokerError>,
        caller: Caller,
    ) -> Result<Arc<Token>, BrokerError> {
        self.broker.token(rpc, kind, request, caller, None).await
    }
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

/// A pod's own account listing, email, aliases or scopes.
fn pod_answer(answer: pod_accounts::Answer) -> Response<Full<Bytes>> {
    let (body, content_type) = match answer {
        pod_accounts::Answer::Json(body) => (body, "application/json"),
        pod_accounts::Answer::Text(body) => (body, "application/text"),
        pod_accounts::Answer::NotFound => return text(StatusCode::NOT_FOUND, "Not Found\n"),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
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
}
