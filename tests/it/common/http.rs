//! HTTP/1.1 requests: to the broker's HTTP listeners (the metadata
//! endpoint, on TCP or a Unix socket, and the metrics listener) and to the
//! emulator; the metrics scrapes and readiness waits built on them; and a
//! service that checks the ID tokens it is called with.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

use super::{PATIENCE, claims};

/// An answer from a listener.
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Answer {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).expect("JSON body")
    }
}

/// Where requests go: a TCP port or a Unix socket.
#[derive(Clone, Copy)]
pub enum Endpoint<'a> {
    Tcp(SocketAddr),
    Unix(&'a Path),
}

/// `method path` with `headers` (`Host: metadata.google.internal` unless
/// given), over one fresh HTTP/1.1 connection.
pub async fn send(
    to: Endpoint<'_>,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
) -> Answer {
    send_body(to, method, path, headers, Bytes::new()).await
}

/// Like [`send`], with a request body.
pub async fn send_body(
    to: Endpoint<'_>,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Answer {
    try_send_body(to, method.clone(), path, headers, body.into())
        .await
        .unwrap_or_else(|error| panic!("{method} {path}: {error}"))
}

/// Like [`send`], with what went wrong instead of a panic (the connection
/// refused or closed without an answer).
pub async fn try_send(
    to: Endpoint<'_>,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Answer, String> {
    try_send_body(to, method, path, headers, Bytes::new()).await
}

async fn try_send_body(
    to: Endpoint<'_>,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<Answer, String> {
    let exchange = async {
        let mut sender = match to {
            Endpoint::Tcp(addr) => {
                let stream = tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(|e| e.to_string())?;
                handshake(stream).await?
            }
            Endpoint::Unix(path) => {
                let stream = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(|e| e.to_string())?;
                handshake(stream).await?
            }
        };
        let mut request = Request::builder().method(method).uri(path);
        if !headers
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case("host"))
        {
            request = request.header("host", "metadata.google.internal");
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = sender
            .send_request(request.body(Full::new(body)).unwrap())
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok(Answer {
            status,
            headers,
            body: String::from_utf8(body.to_vec()).expect("UTF-8 body"),
        })
    };
    tokio::time::timeout(PATIENCE, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {PATIENCE:?}")))
}

async fn handshake<S>(
    stream: S,
) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    Ok(sender)
}

/// `method url` with `headers` and `body`, where `url` is
/// `http://IP:PORT/PATH` (`Host: IP:PORT` unless given).
pub async fn send_to(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Answer {
    let uri: http::Uri = url.parse().expect("a URL");
    let authority = uri.authority().expect("a URL with an address").as_str();
    let addr: SocketAddr = authority.parse().expect("an IP:PORT address");
    let path = uri.path_and_query().map_or("/", |path| path.as_str());
    let mut all = vec![("host", authority)];
    all.retain(|_| !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")));
    all.extend_from_slice(headers);
    send_body(Endpoint::Tcp(addr), method, path, &all, body).await
}

/// `GET path` as Google's libraries send it (with `Metadata-Flavor: Google`).
pub async fn get(to: Endpoint<'_>, path: &str) -> Answer {
    send(to, Method::GET, path, &[("Metadata-Flavor", "Google")]).await
}

/// `GET path` as a scraper or a probe sends it to the metrics listener at
/// `addr` (`Host: localhost`, no other header).
pub async fn get_local(addr: SocketAddr, path: &str) -> Answer {
    send(Endpoint::Tcp(addr), Method::GET, path, &[LOCALHOST]).await
}

const LOCALHOST: (&str, &str) = ("host", "localhost");

/// The Prometheus text of a broker's `/metrics`.
pub struct Scrape(pub String);

impl Scrape {
    /// Scrapes `addr`.
    pub async fn of(addr: SocketAddr) -> Scrape {
        let answer = get_local(addr, "/metrics").await;
        assert_eq!(answer.status, 200);
        Scrape(answer.body)
    }

    /// The value of the series `name` whose labels include all of
    /// `labels`, summed over the other labels; 0 if there is none.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| {
                let (series, value) = line.rsplit_once(' ')?;
                let (series_name, series_labels) = series.split_once('{').unwrap_or((series, ""));
                (series_name == name
                    && labels
                        .iter()
                        .all(|(k, v)| series_labels.contains(&format!("{k}=\"{v}\""))))
                .then(|| value.parse::<f64>().ok())?
            })
            .sum()
    }
}

impl Scrape {
    /// Asserts that [`Scrape::value`] is at least `least`.
    pub fn assert_at_least(&self, name: &str, labels: &[(&str, &str)], least: f64) {
        let value = self.value(name, labels);
        assert!(
            value >= least,
            "{name}{labels:?} is {value}, less than {least}:\n{}",
            self.0
        );
    }
}

/// Scrapes until `condition` holds (metrics of stream ends are recorded
/// when the broker notices the client left, which no client can await).
pub async fn scrape_until(addr: SocketAddr, condition: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        // The listener may refuse a connection while it is at its bound.
        let answer = try_send(Endpoint::Tcp(addr), Method::GET, "/metrics", &[LOCALHOST]).await;
        let last = match answer {
            Ok(answer) if answer.status == 200 => {
                let scrape = Scrape(answer.body);
                if condition(&scrape) {
                    return scrape;
                }
                scrape.0
            }
            Ok(answer) => format!("status {}: {}", answer.status, answer.body),
            Err(error) => error,
        };
        assert!(
            tokio::time::Instant::now() < deadline,
            "metrics never matched:\n{last}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A server at `http://{addr}/hello` that answers 200 to a bearer ID token
/// for that URL that has not expired, and 401 to anything else; it keeps
/// every token it accepted.
pub async fn checking_server() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let audience = format!("http://{addr}/hello");
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let seen = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let audience = audience.clone();
            let seen = seen.clone();
            let service = hyper::service::service_fn(
                move |request: hyper::Request<hyper::body::Incoming>| {
                    let status = match bearer(&request) {
                        Some(token)
                            if valid_for(&token, &audience) && request.uri().path() == "/hello" =>
                        {
                            seen.lock().unwrap().push(token);
                            StatusCode::OK
                        }
                        _ => StatusCode::UNAUTHORIZED,
                    };
                    let response = hyper::Response::builder()
                        .status(status)
                        .body(Full::new(Bytes::from_static(b"hello")))
                        .unwrap();
                    async move { Ok::<_, std::convert::Infallible>(response) }
                },
            );
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    (addr, accepted)
}

fn bearer<B>(request: &hyper::Request<B>) -> Option<String> {
    let header = request.headers().get("authorization")?.to_str().ok()?;
    Some(header.strip_prefix("Bearer ")?.to_string())
}

fn valid_for(token: &str, audience: &str) -> bool {
    if token.split('.').count() != 3 {
        return false;
    }
    let claims = claims(token);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    claims["aud"] == audience && claims["exp"].as_u64().is_some_and(|exp| exp > now)
}

/// The test-only CA, which signed the TLS front's certificate.
pub const TEST_CA: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/test-only-ca.pem"
);

/// A TLS front for `upstream` on a free loopback port, with the test-only
/// server certificate for 127.0.0.1 and `sts.tokenbroker.test` (signed by
/// [`TEST_CA`]).
pub async fn tls_front(upstream: std::net::SocketAddr) -> std::net::SocketAddr {
    use std::sync::Arc;

    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(include_bytes!("../../fixtures/test-only-tls-server.pem"))
            .collect::<Result<_, _>>()
            .unwrap();
    let key =
        PrivateKeyDer::from_pem_slice(include_bytes!("../../fixtures/test-only-tls-server.key"))
            .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                let mut plain = tokio::net::TcpStream::connect(upstream).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    addr
}
