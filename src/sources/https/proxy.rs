//! Upstream HTTPS through a corporate proxy: `HTTPS_PROXY` (or
//! `https_proxy`) and `NO_PROXY` (or `no_proxy`) as curl reads them, with
//! hyper-util's [`Matcher`], and an HTTP CONNECT tunnel with hyper-util's
//! [`Tunnel`], basic auth taken from the proxy URL's user info. The proxy
//! resolves the target's name; the broker resolves only the proxy's. Plain
//! `http://` destinations (loopback only) and the metadata server, which is
//! link-local, never go through it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower::Service;

/// The variables read, in the order they are looked up (as curl does:
/// lower case first).
pub const PROXY_VARIABLES: [&str; 2] = ["https_proxy", "HTTPS_PROXY"];
/// The bypass list's variables, in the same order.
pub const NO_PROXY_VARIABLES: [&str; 2] = ["no_proxy", "NO_PROXY"];

/// Which proxy, if any, upstream HTTPS goes through. Cloning is cheap.
#[derive(Clone, Default)]
pub struct Proxy {
    matcher: Option<Arc<Matcher>>,
    /// The proxy's URL without user info, and the bypass list, for logs.
    described: Option<String>,
}

impl Proxy {
    /// No proxy.
    pub fn none() -> Self {
        Self::default()
    }

    /// The proxy the variables `var` returns name. A malformed value is an
    /// error naming the variable, never its value (it may hold a password).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let first = |names: [&'static str; 2]| {
            names.into_iter().find_map(|name| {
                var(name)
                    .filter(|v| !v.trim().is_empty())
                    .map(|v| (name, v))
            })
        };
        let Some((name, value)) = first(PROXY_VARIABLES) else {
            return Ok(Self::none());
        };
        let no_proxy = first(NO_PROXY_VARIABLES)
            .map(|(_, v)| v)
            .unwrap_or_default();
        let (url, normalised) = check(name, value.trim())?;
        let matcher = Matcher::builder()
            .https(normalised)
            .no(no_proxy.clone())
            .build();
        // What was checked is what the matcher uses: a value it could not
        // read would silently mean no proxy.
        let probe: Uri = "https://oauth2.googleapis.com/"
            .parse()
            .expect("a valid URL");
        if no_proxy.trim().is_empty() && matcher.intercept(&probe).is_none() {
            return Err(format!("{name} is not a usable proxy URL"));
        }
        let bypass = if no_proxy.is_empty() {
            String::new()
        } else {
            format!(", except for NO_PROXY {no_proxy}")
        };
        Ok(Self {
            matcher: Some(Arc::new(matcher)),
            described: Some(format!("{url}{bypass}")),
        })
    }

    /// The proxy in words (no credentials), if there is one.
    pub fn describe(&self) -> Option<&str> {
        self.described.as_deref()
    }
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.describe().unwrap_or("no proxy"))
    }
}

/// Checks a proxy URL as curl accepts it (`http://[user:password@]host[:port]`,
/// the scheme optional, the port 80 by default as in Go's and Python's
/// clients); returns it without user info (for logs), and with its scheme
/// (for the matcher).
fn check(name: &str, value: &str) -> Result<(String, String), String> {
    let with_scheme = if value.contains("://") {
        value.to_string()
    } else {
        format!("http://{value}")
    };
    let bad = |problem: &str| format!("{name} is not a usable proxy URL: {problem}");
    let uri: Uri = with_scheme
        .parse()
        .map_err(|_| bad("it does not parse as http://[USER:PASSWORD@]HOST[:PORT]"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(_) => {
            return Err(bad(
                "only http:// proxies are supported (the tunnel to Google is TLS either way)",
            ));
        }
        None => return Err(bad("it has no scheme")),
    }
    let authority = uri.authority().ok_or_else(|| bad("it has no host"))?;
    let host_port = authority
        .as_str()
        .rsplit_once('@')
        .map_or(authority.as_str(), |(_, host)| host);
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("it has no host"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(bad("it has a path; give only the scheme, host and port"));
    }
    if let Some((_, port)) = host_port.rsplit_once(':')
        && !host_port.ends_with(']')
        && port.parse::<u16>().map_or(true, |port| port == 0)
    {
        return Err(bad("its port is not a number from 1 to 65535"));
    }
    Ok((format!("http://{host_port}"), with_scheme))
}

/// Connects directly, or through a CONNECT tunnel when the proxy applies
/// to the destination.
#[derive(Clone)]
pub struct ProxyConnector {
    direct: HttpConnector,
    proxy: Proxy,
}

impl ProxyConnector {
    /// Connects with `direct`, through `proxy` where it applies.
    pub fn new(direct: HttpConnector, proxy: Proxy) -> Self {
        Self { direct, proxy }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Service<Uri> for ProxyConnector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.direct.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, destination: Uri) -> Self::Future {
        let intercept = self
            .proxy
            .matcher
            .as_ref()
            .and_then(|matcher| matcher.intercept(&destination));
        let direct = self.direct.clone();
        match intercept {
            Some(intercept) => {
                let mut tunnel = Tunnel::new(intercept.uri().clone(), direct);
                if let Some(auth) = intercept.basic_auth() {
                    tunnel = tunnel.with_auth(auth.clone());
                }
                Box::pin(async move {
                    std::future::poll_fn(|cx| tunnel.poll_ready(cx)).await?;
                    Ok(tunnel.call(destination).await?)
                })
            }
            None => {
                let mut direct = direct;
                Box::pin(async move { Ok(direct.call(destination).await?) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn proxy(vars: &[(&str, &str)]) -> Result<Proxy, String> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Proxy::from_vars(|name| vars.get(name).cloned())
    }

    fn goes_through(proxy: &Proxy, url: &str) -> bool {
        let matcher = proxy.matcher.as_ref().expect("a proxy");
        matcher.intercept(&url.parse().unwrap()).is_some()
    }

    #[test]
    fn the_variables_are_read_as_curl_reads_them() {
        assert!(proxy(&[]).unwrap().describe().is_none());
        let p = proxy(&[
            ("https_proxy", "http://user:pa%3Ass@proxy.corp:3128"),
            ("no_proxy", "internal.corp, 10.0.0.0/8"),
        ])
        .unwrap();
        let described = p.describe().unwrap();
        assert!(
            described.starts_with("http://proxy.corp:3128"),
            "{described}"
        );
        assert!(!described.contains("pa%3Ass"), "{described}");
        assert!(goes_through(&p, "https://sts.googleapis.com/v1/token"));
        assert!(!goes_through(&p, "https://api.internal.corp/x"));
        assert!(!goes_through(&p, "https://10.1.2.3/x"));
        assert!(
            !goes_through(&p, "http://127.0.0.1:8080/x"),
            "plain http is never proxied"
        );
        let auth = p
            .matcher
            .as_ref()
            .unwrap()
            .intercept(&"https://oauth2.googleapis.com/token".parse().unwrap())
            .unwrap();
        assert!(auth.basic_auth().is_some());
        // Lower case wins, as in curl, and a bare host:port is http.
        let p = proxy(&[
            ("HTTPS_PROXY", "http://upper:1"),
            ("https_proxy", "lower:8080/"),
        ])
        .unwrap();
        assert_eq!(p.describe(), Some("http://lower:8080"));
        assert!(goes_through(&p, "https://sts.googleapis.com/v1/token"));
    }

    #[test]
    fn malformed_proxies_are_refused_without_their_value() {
        for (value, needle) in [
            ("socks5://user:s3cret@p:1080", "only http://"),
            ("https://user:s3cret@p:443", "only http://"),
            ("http://user:s3cret@p:3128/path", "path"),
            ("http://user:s3cret@:3128", "no host"),
            ("http://us er:s3cret@p", "does not parse"),
            ("http://user:s3cret@p:99999", "port"),
            ("http://user:s3cret@p:0", "port"),
        ] {
            let error = proxy(&[("HTTPS_PROXY", value)]).unwrap_err();
            assert!(
                error.contains("HTTPS_PROXY") && error.contains(needle),
                "{value}: {error}"
            );
            assert!(!error.contains("s3cret"), "{error}");
        }
    }
}
