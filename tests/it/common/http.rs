//! HTTP/1.1 requests to the broker's HTTP listeners (the metadata
//! endpoint, on TCP or a Unix socket, and the metrics listener).

use std::net::SocketAddr;
use std::path::Path;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

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
    try_send(to, method.clone(), path, headers)
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
        .send_request(request.body(Empty::<Bytes>::new()).unwrap())
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
}

async fn handshake<S>(
    stream: S,
) -> Result<hyper::client::conn::http1::SendRequest<Empty<Bytes>>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    Ok(sender)
}

/// `GET path` as Google's libraries send it (with `Metadata-Flavor: Google`).
pub async fn get(to: Endpoint<'_>, path: &str) -> Answer {
    send(to, Method::GET, path, &[("Metadata-Flavor", "Google")]).await
}
