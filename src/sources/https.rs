//! HTTPS to Google's token APIs (OAuth token endpoint, STS, IAM
//! Credentials): rustls with the platform's root certificates, through a
//! proxy when the environment names one ([`proxy`]), plain `http://` only to
//! loopback addresses (tests, emulators), bounded requests and responses,
//! and the APIs' error bodies turned into a one-line explanation.

pub mod proxy;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::error::FetchError;
use crate::secret::Secret;
use crate::sources::response::{MAX_RESPONSE_BYTES, error_chain, retry_after};
use proxy::{Proxy, ProxyConnector};

/// Longest explanation kept from an error body, in bytes.
const MAX_DETAIL_LEN: usize = 300;
/// How long an upstream connection may sit idle in the pool (30 s).
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The builder of every upstream HTTP client (this one, the metadata
/// server's): idle pooled connections close after [`POOL_IDLE_TIMEOUT`].
pub fn pooled_client() -> hyper_util::client::legacy::Builder {
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        // Without a timer the idle timeout never fires, and idle
        // connections stay open for good.
        .pool_timer(TokioTimer::new());
    builder
}

/// Checks an endpoint URL from a credentials file or the command line:
/// `https://` anywhere, `http://` only to a loopback address. `what` names
/// it in the error, e.g. "token_uri"; the error never repeats the URL,
/// which may carry a secret in its query.
pub fn endpoint(what: &str, url: &str) -> Result<Uri, String> {
    let uri: Uri = url.parse().map_err(|_| format!("{what} is not a URL"))?;
    let host = uri
        .host()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| format!("{what} is not a URL with a host"))?;
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(format!("{what} must not hold user info"));
    }
    match uri.scheme_str() {
        Some("https") => Ok(uri),
        Some("http") if is_loopback(host) => Ok(uri),
        Some("http") => Err(format!(
            "{what} is plain http to a host that is not loopback; use https:// (http:// is accepted only for 127.0.0.0/8, ::1 and localhost, for tests and emulators)"
        )),
        _ => Err(format!("{what} must start with https://")),
    }
}

fn is_loopback(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// How a request authenticates.
#[derive(Clone, Copy)]
pub enum Auth<'a> {
    /// Not at all.
    None,
    /// `Authorization: Bearer <token>`.
    Bearer(&'a Secret),
    /// HTTP basic auth, as an OAuth client (RFC 6749 section 2.3.1).
    Basic {
        /// The client id.
        user: &'a str,
        /// The client secret.
        password: &'a Secret,
    },
}

impl Auth<'_> {
    /// The `Authorization` value, marked sensitive (kept out of HTTP/2
    /// header compression tables and `Debug` output); `Err` if the
    /// credential cannot be a header value.
    fn header_value(&self) -> Result<Option<HeaderValue>, ()> {
        use base64::Engine;
        let text = match self {
            Self::None => return Ok(None),
            Self::Bearer(token) => Zeroizing::new(format!("Bearer {}", token.expose())),
            Self::Basic { user, password } => {
                // As Google's libraries send it: `id:secret`, not
                // form-encoded first.
                let pair = Zeroizing::new(format!("{user}:{}", password.expose()));
                let mut text = Zeroizing::new(String::from("Basic "));
                base64::engine::general_purpose::STANDARD.encode_string(pair.as_bytes(), &mut text);
                text
            }
        };
        let mut value = HeaderValue::try_from(text.as_str()).map_err(|_| ())?;
        value.set_sensitive(true);
        Ok(Some(value))
    }
}

/// An `application/x-www-form-urlencoded` body.
fn form(pairs: &[(&str, &str)]) -> Bytes {
    Bytes::from(
        form_urlencoded::Serializer::new(String::new())
            .extend_pairs(pairs)
            .finish(),
    )
}

/// An HTTP/1.1 client speaking TLS (rustls, platform roots) to `https://`
/// endpoints. Cloning is cheap.
#[derive(Clone)]
pub struct HttpsClient {
    http: Client<HttpsConnector<ProxyConnector>, Full<Bytes>>,
    timeout: Duration,
}

impl HttpsClient {
    /// A client whose requests each take at most `timeout`, through
    /// `proxy` where it applies. Trusts the platform's root certificates
    /// (as found by `rustls-native-certs`, which honours `SSL_CERT_FILE` and
    /// `SSL_CERT_DIR`).
    pub fn new(timeout: Duration, proxy: Proxy) -> Result<Self, String> {
        let mut roots = rustls::RootCertStore::empty();
        let found = rustls_native_certs::load_native_certs();
        for error in &found.errors {
            tracing::warn!(%error, "cannot read some platform root certificates");
        }
        let (added, _ignored) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            tracing::warn!("no platform root certificates found: HTTPS requests will fail");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("cannot set up TLS: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        connector.enforce_http(false);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(ProxyConnector::new(connector, proxy));
        let http = pooled_client().build(https);
        Ok(Self { http, timeout })
    }

    /// POSTs `body` to `uri` and returns the body of a 200. `service`
    /// names the API in errors ("the OAuth token endpoint"). Any other
    /// status is [`FetchError::Status`] with the API's explanation.
    pub async fn post(
        &self,
        service: &'static str,
        uri: &Uri,
        content_type: &'static str,
        body: Bytes,
        auth: Auth<'_>,
    ) -> Result<Bytes, FetchError> {
        let cannot_build = || FetchError::Malformed(format!("cannot build a request to {service}"));
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(uri.clone())
            .header(header::CONTENT_TYPE, content_type);
        if let Some(value) = auth.header_value().map_err(|()| cannot_build())? {
            request = request.header(header::AUTHORIZATION, value);
        }
        let request = request.body(Full::new(body)).map_err(|_| cannot_build())?;
        self.exchange(service, request).await
    }

    /// POSTs `pairs` as an `application/x-www-form-urlencoded` body (an
    /// OAuth or STS grant), as [`HttpsClient::post`] does.
    pub async fn post_form(
        &self,
        service: &'static str,
        uri: &Uri,
        pairs: &[(&str, &str)],
        auth: Auth<'_>,
    ) -> Result<Bytes, FetchError> {
        let content_type = "application/x-www-form-urlencoded";
        self.post(service, uri, content_type, form(pairs), auth)
            .await
    }

    /// Sends a bodiless `method` request (a GET, or IMDSv2's PUT) to `uri`
    /// with `headers` and returns the body of a 200, as
    /// [`HttpsClient::post`] does.
    pub async fn fetch(
        &self,
        service: &'static str,
        method: Method,
        uri: &Uri,
        headers: &HeaderMap,
    ) -> Result<Bytes, FetchError> {
        let mut request = Request::builder()
            .method(method)
            .uri(uri.clone())
            .body(Full::new(Bytes::new()))
            .map_err(|_| FetchError::Malformed(format!("cannot build a request to {service}")))?;
        request.headers_mut().extend(headers.clone());
        self.exchange(service, request).await
    }

    /// Sends `request` (with the common `Accept` and `User-Agent`) and
    /// reads a bounded answer, all within the timeout.
    async fn exchange(
        &self,
        service: &'static str,
        mut request: Request<Full<Bytes>>,
    ) -> Result<Bytes, FetchError> {
        let headers = request.headers_mut();
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        headers.insert(header::USER_AGENT, HeaderValue::from_static(user_agent()));
        let exchange = async {
            let response = self
                .http
                .request(request)
                .await
                .map_err(|e| FetchError::Connect(format!("{service}: {}", error_chain(&e))))?;
            let status = response.status();
            let retry_after = retry_after(response.headers());
            let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        FetchError::Malformed(format!(
                            "{service}: response larger than {MAX_RESPONSE_BYTES} bytes"
                        ))
                    } else {
                        FetchError::Connect(format!(
                            "{service}: connection broke while reading the response: {e}"
                        ))
                    }
                })?
                .to_bytes();
            if status != StatusCode::OK {
                return Err(FetchError::Status {
                    status: status.as_u16(),
                    retry_after,
                    detail: Some(format!("{service}: {}", explain(&body))),
                });
            }
            Ok(body)
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| FetchError::Timeout(self.timeout))?
    }

    /// Checks that `uri` answers at all: any status but a 5xx counts (a
    /// token endpoint answers a GET with 404 or 405, which costs nothing).
    pub async fn probe(&self, service: &'static str, uri: &Uri) -> Result<(), FetchError> {
        let request = Request::get(uri.clone())
            .header(header::USER_AGENT, user_agent())
            .body(Full::new(Bytes::new()))
            .map_err(|_| FetchError::Malformed(format!("cannot build a request to {service}")))?;
        let response = tokio::time::timeout(self.timeout, self.http.request(request))
            .await
            .map_err(|_| FetchError::Timeout(self.timeout))?
            .map_err(|e| FetchError::Connect(format!("{service}: {}", error_chain(&e))))?;
        if response.status().is_server_error() {
            return Err(FetchError::Status {
                status: response.status().as_u16(),
                retry_after: None,
                detail: None,
            });
        }
        Ok(())
    }
}

fn user_agent() -> &'static str {
    concat!("tokenbroker/", env!("CARGO_PKG_VERSION"))
}

/// The error bodies of Google's APIs: OAuth's `{"error": "invalid_grant",
/// "error_description": "…"}` and the JSON APIs' `{"error": {"code",
/// "message", "status"}}`.
#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorField,
    #[serde(default)]
    error_description: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ErrorField {
    OAuth(String),
    Api {
        #[serde(default)]
        status: Option<String>,
        #[serde(default)]
        message: Option<String>,
    },
}

/// One printable line explaining an error body (never the body itself
/// when it is not one of Google's error shapes).
fn explain(body: &[u8]) -> String {
    let text = match serde_json::from_slice::<ErrorBody>(body) {
        Ok(ErrorBody {
            error: ErrorField::OAuth(error),
            error_description,
        }) => match error_description {
            Some(description) => format!("{error}: {description}"),
            None => error,
        },
        Ok(ErrorBody {
            error: ErrorField::Api { status, message },
            ..
        }) => [status, message]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(": "),
        Err(_) => "no explanation in the response".to_string(),
    };
    let mut line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if line.len() > MAX_DETAIL_LEN {
        let mut end = MAX_DETAIL_LEN;
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        line.truncate(end);
        line.push('…');
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_are_percent_encoded() {
        assert_eq!(
            form(&[
                ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                ("a", "x y&z")
            ]),
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&a=x+y%26z"
        );
    }

    #[test]
    fn plain_http_only_to_loopback() {
        for good in [
            "https://oauth2.googleapis.com/token",
            "https://private.googleapis.com:8443/token",
            "http://127.0.0.1:8080/token",
            "http://127.1.2.3/token",
            "http://[::1]:9000/token",
            "http://localhost:80/token",
        ] {
            assert!(endpoint("token_uri", good).is_ok(), "{good}");
        }
        let error = endpoint("token_uri", "http://oauth2.googleapis.com/token").unwrap_err();
        assert!(
            error.contains("token_uri") && error.contains("https://"),
            "{error}"
        );
        assert!(endpoint("x", "http://10.0.0.1/token").is_err());
        assert!(endpoint("x", "http://127.0.0.1.evil.example/token").is_err());
        assert!(endpoint("x", "ftp://127.0.0.1/token").is_err());
        assert!(endpoint("x", "https://user@host/token").is_err());
        assert!(endpoint("x", "/token").is_err());
        assert!(endpoint("x", "not a url").is_err());
    }

    #[test]
    fn error_bodies_become_one_line() {
        assert_eq!(
            explain(br#"{"error":"invalid_grant","error_description":"Invalid JWT Signature."}"#),
            "invalid_grant: Invalid JWT Signature."
        );
        assert_eq!(
            explain(
                br#"{"error":{"code":403,"message":"Permission denied.\nreally","status":"PERMISSION_DENIED"}}"#
            ),
            "PERMISSION_DENIED: Permission denied. really"
        );
        assert_eq!(
            explain(b"<html>ya29.secret</html>"),
            "no explanation in the response"
        );
        let long = format!(
            r#"{{"error":"x","error_description":"{}"}}"#,
            "é".repeat(400)
        );
        assert!(explain(long.as_bytes()).len() <= MAX_DETAIL_LEN + '…'.len_utf8());
    }
}
