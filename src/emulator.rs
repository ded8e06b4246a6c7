//! A stand-in for the GCE metadata server, so the broker runs and is tested
//! off Google Cloud: the token, identity, email and account-listing
//! endpoints, the few instance and project values Google's auth libraries
//! read, the real server's header rules, HS256-signed ID tokens, and failure
//! modes switched on over HTTP (`/emulator/v1/...`) or from Rust.
//! It also fakes Google's OAuth token endpoint and IAM Credentials API
//! ([`google`]), verifying what they receive as the real ones do.

pub mod google;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::{StreamExt, stream};
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::connections::Acceptor;
use crate::sources::jwt;

/// Email of the emulated VM's default service account.
pub const DEFAULT_ACCOUNT: &str = "tokenbroker-emulator@emulator-project.iam.gserviceaccount.com";
/// Default lifetime of emulated tokens (1 hour, as on Google Cloud).
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
/// Scopes an access token gets when the request names none.
pub const DEFAULT_SCOPES: &[&str] = &["https://www.googleapis.com/auth/cloud-platform"];

/// How long a long-poll without `timeout_sec` waits (an hour: the real
/// server waits for a change, which never comes here).
const LONG_POLL_DEFAULT_WAIT: Duration = Duration::from_secs(3600);

/// The emulated project's id (`project/project-id`).
pub const PROJECT_ID: &str = "emulator-project";
/// The emulated project's number (`project/numeric-project-id`).
pub const NUMERIC_PROJECT_ID: &str = "123456789012";
/// The emulated VM's zone (`instance/zone`).
pub const ZONE: &str = "projects/123456789012/zones/us-central1-a";

const ROOT: &str = "/computeMetadata/v1/";
const PREFIX: &str = "/computeMetadata/v1/instance/service-accounts/";
/// How many issued tokens and request arrivals the emulator remembers.
pub const MAX_REMEMBERED_TOKENS: usize = 100_000;

/// What the emulated VM looks like.
#[derive(Clone, Debug)]
pub struct EmulatorConfig {
    /// Service account emails; the first is also `default`.
    pub accounts: Vec<String>,
    /// Lifetime of access tokens.
    pub access_token_lifetime: Duration,
    /// Lifetime of ID tokens.
    pub id_token_lifetime: Duration,
    /// Whether the control API (`/emulator/v1/...`) is served.
    pub control: bool,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        Self {
            accounts: vec![DEFAULT_ACCOUNT.to_string()],
            access_token_lifetime: DEFAULT_TOKEN_LIFETIME,
            id_token_lifetime: DEFAULT_TOKEN_LIFETIME,
            control: true,
        }
    }
}

/// A way for the emulator to misbehave, for tests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// Answer with this HTTP status (and `Retry-After`, if set).
    Status {
        /// The status code, e.g. 503.
        status: u16,
        /// Seconds for a `Retry-After` header.
        #[serde(default)]
        retry_after_secs: Option<u64>,
    },
    /// Wait this long, then answer normally.
    Delay {
        /// The added latency in milliseconds.
        millis: u64,
    },
    /// Never answer (until the emulator stops).
    Hang,
    /// Close the connection without answering.
    Reset,
    /// Announce a body, send part of it, close the connection.
    Truncated,
    /// A 200 with a 1 MiB body.
    Oversized,
    /// A 200 whose body is not a token.
    Garbage,
    /// A token without an expiry (`expires_in` or `exp` missing).
    NoExpiry,
    /// A token that has already expired.
    Expired,
    /// A valid token without the `Metadata-Flavor: Google` response header.
    NoFlavorHeader,
    /// An ID token for another audience.
    WrongAudience,
}

/// Which token endpoint a fault applies to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// Both `token` and `identity`.
    #[default]
    Any,
    /// Only access tokens.
    Token,
    /// Only ID tokens.
    Identity,
}

/// A fault and how often it fires.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultRule {
    /// What goes wrong.
    #[serde(flatten)]
    pub fault: Fault,
    /// Which endpoint misbehaves.
    #[serde(default)]
    pub target: Target,
    /// How many requests it hits; unset means until cleared.
    #[serde(default)]
    pub times: Option<u32>,
}

impl FaultRule {
    /// `fault` on every token request until cleared.
    pub fn always(fault: Fault) -> Self {
        Self {
            fault,
            target: Target::Any,
            times: None,
        }
    }
}

/// Requests the emulator has seen, by endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Requests to `.../token`.
    pub token_requests: u64,
    /// Requests to `.../identity`.
    pub identity_requests: u64,
    /// Requests refused for their headers (no `Metadata-Flavor`, or
    /// `X-Forwarded-For`).
    pub rejected_requests: u64,
    /// Requests to the fake OAuth token endpoint (`POST /token`).
    #[serde(default)]
    pub oauth_requests: u64,
    /// Requests to the fake IAM Credentials API.
    #[serde(default)]
    pub iam_requests: u64,
    /// OAuth and IAM requests refused (bad signature, claims, bearer token,
    /// grant, account).
    #[serde(default)]
    pub google_rejected: u64,
    /// Other metadata requests (directories, project id, attributes, ...),
    /// long-polls included; not the account listing, which the broker's
    /// health probe reads.
    #[serde(default)]
    pub other_requests: u64,
    /// Long-polls (`wait_for_change=true`) waiting now.
    #[serde(default)]
    pub long_polls_waiting: u64,
    /// The most long-polls that waited at once.
    #[serde(default)]
    pub long_polls_most: u64,
}

/// What the emulator knows about an access token it issued (like Google's
/// tokeninfo endpoint).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    /// The account's email.
    pub email: String,
    /// The scopes granted, in request order.
    pub scopes: Vec<String>,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
}

/// Runtime changes to the emulated tokens' lifetimes.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Lifetimes {
    /// New access-token lifetime in seconds.
    pub access_token_secs: Option<u64>,
    /// New ID-token lifetime in seconds.
    pub id_token_secs: Option<u64>,
}

struct State {
    config: EmulatorConfig,
    fault: Option<FaultRule>,
    issued: HashMap<String, TokenInfo>,
    /// When each token or identity request arrived (the latest ones).
    arrivals: Vec<std::time::Instant>,
    /// What the fake Google APIs know: keys, users, who may be impersonated.
    google: google::Accounts,
}

struct Shared {
    state: Mutex<State>,
    stats: watch::Sender<Stats>,
    signing_key: [u8; 32],
    stop: CancellationToken,
    addr: SocketAddr,
}

/// A running emulator; stops when dropped.
pub struct Emulator {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accepting: Option<tokio::task::JoinHandle<()>>,
}

type Body = BoxBody<Bytes, std::io::Error>;

impl Emulator {
    /// Binds `listen` (port 0 picks a free port) and starts serving.
    pub async fn start(listen: SocketAddr, config: EmulatorConfig) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let mut signing_key = [0u8; 32];
        signing_key.iter_mut().for_each(|b| *b = fastrand::u8(..));
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                config,
                fault: None,
                issued: HashMap::new(),
                arrivals: Vec::new(),
                google: google::Accounts::default(),
            }),
            stats: watch::Sender::new(Stats::default()),
            signing_key,
            stop: CancellationToken::new(),
            addr,
        });
        let accepting = tokio::spawn(accept_loop(listener, shared.clone()));
        tracing::info!(%addr, "metadata server emulator listening");
        Ok(Self {
            addr,
            shared,
            accepting: Some(accepting),
        })
    }

    /// Stops serving and waits until the port is free again (so that a
    /// test can take the metadata server down and bring it back).
    pub async fn stop(mut self) {
        self.shared.stop.cancel();
        if let Some(accepting) = self.accepting.take() {
            let _ = accepting.await;
        }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `host:port`, as `GCE_METADATA_HOST` wants it.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Sets (or with `None` clears) the fault.
    pub fn set_fault(&self, rule: Option<FaultRule>) {
        self.shared.lock().fault = rule;
    }

    /// Changes token lifetimes for tokens issued from now on.
    pub fn set_lifetimes(&self, lifetimes: Lifetimes) {
        self.shared.lock().set_lifetimes(lifetimes);
    }

    /// Requests seen so far.
    pub fn stats(&self) -> Stats {
        *self.shared.stats.borrow()
    }

    /// Waits until the request counts satisfy `condition`, for at most
    /// `within`: `Ok` with the counts that satisfied it, or `Err` with the
    /// counts at the deadline.
    pub async fn wait_for(
        &self,
        condition: impl FnMut(&Stats) -> bool,
        within: Duration,
    ) -> Result<Stats, Stats> {
        let mut stats = self.shared.stats.subscribe();
        // The sender lives as long as `self`, so `wait_for` cannot fail.
        match tokio::time::timeout(within, stats.wait_for(condition)).await {
            Ok(Ok(satisfied)) => Ok(*satisfied),
            Ok(Err(_)) | Err(_) => Err(self.stats()),
        }
    }

    /// When each token and identity request arrived, oldest first (at most
    /// the latest [`MAX_REMEMBERED_TOKENS`]).
    pub fn arrivals(&self) -> Vec<std::time::Instant> {
        self.shared.lock().arrivals.clone()
    }

    /// The URL of the fake OAuth token endpoint (a key file's `token_uri`).
    pub fn token_uri(&self) -> String {
        format!("http://{}{}", self.addr, google::TOKEN_PATH)
    }

    /// The URL of the fake IAM Credentials API (`--iam-endpoint`).
    pub fn iam_endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Makes the fake OAuth endpoint accept assertions signed by a key:
    /// its id (`kid`), account and RSA public key (PKCS#1 DER).
    pub fn add_service_account_key(&self, key_id: &str, email: &str, public_key_der: Vec<u8>) {
        self.shared.lock().google.keys.insert(
            key_id.to_string(),
            google::RegisteredKey {
                email: email.to_string(),
                public_key_der,
            },
        );
    }

    /// Makes the fake OAuth endpoint accept a user's refresh token.
    pub fn add_user(&self, user: google::User) {
        self.shared.lock().google.users.push(user);
    }

    /// Lets any valid access token impersonate `email` (and name it as a
    /// delegate) through the fake IAM Credentials API.
    pub fn allow_impersonation(&self, email: &str) {
        self.shared
            .lock()
            .google
            .impersonable
            .insert(email.to_string());
    }

    /// The calls the fake IAM Credentials API granted, oldest first.
    pub fn iam_calls(&self) -> Vec<google::IamCall> {
        self.shared.lock().google.calls.clone()
    }

    /// What the emulator issued an access token for, if it issued it.
    pub fn token_info(&self, access_token: &str) -> Option<TokenInfo> {
        self.shared.lock().issued.get(access_token).cloned()
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.shared.stop.cancel();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; go on.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn count(&self, update: impl FnOnce(&mut Stats)) {
        self.stats.send_modify(update);
    }

    /// Notes the arrival of a token or identity request.
    fn arrived(&self) {
        let mut state = self.lock();
        if state.arrivals.len() >= MAX_REMEMBERED_TOKENS {
            state.arrivals.clear();
        }
        state.arrivals.push(std::time::Instant::now());
    }
}

impl State {
    fn set_lifetimes(&mut self, lifetimes: Lifetimes) {
        if let Some(secs) = lifetimes.access_token_secs {
            self.config.access_token_lifetime = Duration::from_secs(secs);
        }
        if let Some(secs) = lifetimes.id_token_secs {
            self.config.id_token_lifetime = Duration::from_secs(secs);
        }
    }

    /// The email behind `default` or an email; `None` if unknown.
    fn resolve(&self, account: &str) -> Option<String> {
        if account == "default" {
            return self.config.accounts.first().cloned();
        }
        self.config.accounts.iter().find(|a| *a == account).cloned()
    }

    /// Whether `email` is the VM's default account.
    fn is_default(&self, email: &str) -> bool {
        self.config
            .accounts
            .first()
            .is_some_and(|first| first == email)
    }

    /// The fault for a request to `target`, counting it down.
    fn take_fault(&mut self, target: Target) -> Option<Fault> {
        let rule = self.fault.as_mut()?;
        if rule.target != Target::Any && rule.target != target {
            return None;
        }
        let fault = rule.fault.clone();
        match &mut rule.times {
            Some(0) => {
                self.fault = None;
                return None;
            }
            Some(n) => {
                *n -= 1;
                if *n == 0 {
                    self.fault = None;
                }
            }
            None => {}
        }
        Some(fault)
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut acceptor = Acceptor::new("emulator");
    loop {
        let stream = tokio::select! {
            () = shared.stop.cancelled() => return,
            stream = acceptor.accept(&listener) => stream,
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(|request| handle(shared.clone(), request));
            let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                () = shared.stop.cancelled() => {}
                _ = connection => {}
            }
        });
    }
}

async fn handle(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<Body>, std::io::Error> {
    let path = request.uri().path().to_string();
    if let Some(control) = path.strip_prefix("/emulator/v1/") {
        if !shared.lock().config.control {
            return Ok(text(
                StatusCode::NOT_FOUND,
                "the emulator's control API is off (serve --emulator-control turns it on)",
            ));
        }
        return Ok(control_api(&shared, request.method().clone(), control, request).await);
    }
    if let Some(api) = google::Api::of(request.method(), &path) {
        return google::serve(&shared, api, request).await;
    }
    if request.method() != Method::GET {
        return Ok(text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"));
    }
    let headers = request.headers();
    if headers.contains_key("x-forwarded-for") {
        shared.count(|s| s.rejected_requests += 1);
        return Ok(text(
            StatusCode::FORBIDDEN,
            "Request denied: X-Forwarded-For header present",
        ));
    }
    if headers.get("metadata-flavor").map(|v| v.as_bytes()) != Some(b"Google") {
        shared.count(|s| s.rejected_requests += 1);
        return Ok(text(
            StatusCode::FORBIDDEN,
            "Missing required header: Metadata-Flavor: Google",
        ));
    }
    let query = parse_query(request.uri().query().unwrap_or(""));
    let listing = path == PREFIX || path == PREFIX.trim_end_matches('/');
    if !path.ends_with("/token") && !path.ends_with("/identity") && !listing {
        shared.count(|s| s.other_requests += 1);
        if query.get("wait_for_change").map(String::as_str) == Some("true") {
            long_poll(&shared, &query).await;
        }
    }
    metadata_api(&shared, &path, &query).await
}

/// Waits as a long-poll does when nothing changes: `timeout_sec` (the
/// emulated values never change), counted in the stats while it waits.
async fn long_poll(shared: &Shared, query: &HashMap<String, String>) {
    let wait = query
        .get("timeout_sec")
        .and_then(|t| t.parse().ok())
        .map_or(LONG_POLL_DEFAULT_WAIT, Duration::from_secs);
    shared.count(|s| {
        s.long_polls_waiting += 1;
        s.long_polls_most = s.long_polls_most.max(s.long_polls_waiting);
    });
    struct Done<'a>(&'a Shared);
    impl Drop for Done<'_> {
        fn drop(&mut self) {
            self.0.count(|s| s.long_polls_waiting -= 1);
        }
    }
    let _done = Done(shared);
    tokio::time::sleep(wait).await;
}

async fn metadata_api(
    shared: &Shared,
    path: &str,
    query: &HashMap<String, String>,
) -> Result<Response<Body>, std::io::Error> {
    if path == "/" {
        return Ok(text(StatusCode::OK, "computeMetadata/\n"));
    }
    let recursive = query.get("recursive").map(String::as_str) == Some("true");
    let Some(rest) = path.strip_prefix(PREFIX) else {
        let value = match path.strip_prefix(ROOT) {
            Some("") => "instance/\nproject/\nuniverse/\n",
            Some("instance" | "instance/") => "attributes/\nid\nservice-accounts/\nzone\n",
            Some("instance/zone") => ZONE,
            Some("project" | "project/") => "numeric-project-id\nproject-id\n",
            Some("project/project-id") => PROJECT_ID,
            Some("project/numeric-project-id") => NUMERIC_PROJECT_ID,
            Some("universe/universe-domain") => "googleapis.com",
            _ => return Ok(text(StatusCode::NOT_FOUND, "not found")),
        };
        return Ok(text(StatusCode::OK, value));
    };
    if rest.is_empty() {
        let state = shared.lock();
        let accounts =
            std::iter::once("default".to_string()).chain(state.config.accounts.iter().cloned());
        if recursive {
            let listing: serde_json::Map<String, serde_json::Value> = accounts
                .filter_map(|account| {
                    let email = state.resolve(&account)?;
                    let info = account_info(&email, state.is_default(&email));
                    Some((account, info))
                })
                .collect();
            return Ok(json_response(&listing));
        }
        let listing: String = accounts.map(|account| format!("{account}/\n")).collect();
        return Ok(text(StatusCode::OK, &listing));
    }
    let (account, leaf) = rest.split_once('/').unwrap_or((rest, ""));
    let (email, is_default) = {
        let state = shared.lock();
        let Some(email) = state.resolve(account) else {
            return Ok(text(StatusCode::NOT_FOUND, "service account not found"));
        };
        let is_default = state.is_default(&email);
        (email, is_default)
    };
    let aliases = if is_default { "default\n" } else { "" };
    match leaf {
        "" if recursive => Ok(json_response(&account_info(&email, is_default))),
        "" => Ok(text(
            StatusCode::OK,
            "aliases\nemail\nidentity\nscopes\ntoken\n",
        )),
        "aliases" => Ok(text(StatusCode::OK, aliases)),
        "email" => Ok(text(StatusCode::OK, &email)),
        "scopes" => Ok(text(
            StatusCode::OK,
            &format!("{}\n", DEFAULT_SCOPES.join("\n")),
        )),
        "token" => {
            shared.count(|s| s.token_requests += 1);
            shared.arrived();
            let scopes = query.get("scopes").map_or_else(
                || DEFAULT_SCOPES.iter().map(|s| s.to_string()).collect(),
                |s| s.split(',').map(str::to_string).collect(),
            );
            let fault = shared.lock().take_fault(Target::Token);
            respond(shared, fault, |fault| {
                access_token(shared, &email, scopes, fault)
            })
            .await
        }
        "identity" => {
            shared.count(|s| s.identity_requests += 1);
            shared.arrived();
            let Some(audience) = query.get("audience").filter(|a| !a.is_empty()) else {
                return Ok(text(
                    StatusCode::BAD_REQUEST,
                    "non-empty audience parameter required",
                ));
            };
            let full = query.get("format").map(String::as_str) == Some("full");
            let licenses = full && query.get("licenses").map(String::as_str) == Some("TRUE");
            let fault = shared.lock().take_fault(Target::Identity);
            respond(shared, fault, |fault| {
                id_token(shared, &email, audience, full, licenses, fault)
            })
            .await
        }
        _ => Ok(text(StatusCode::NOT_FOUND, "not found")),
    }
}

/// Applies a transport-level fault, or builds the body with `token` (which
/// handles the token-level faults) and sends it.
async fn respond(
    shared: &Shared,
    fault: Option<Fault>,
    token: impl FnOnce(Option<&Fault>) -> String,
) -> Result<Response<Body>, std::io::Error> {
    match fault {
        Some(Fault::Status {
            status,
            retry_after_secs,
        }) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut response = text(status, "emulated failure");
            if let Some(secs) = retry_after_secs {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, secs.into());
            }
            Ok(response)
        }
        Some(Fault::Delay { millis }) => {
            tokio::time::sleep(Duration::from_millis(millis)).await;
            Ok(text(StatusCode::OK, &token(None)))
        }
        Some(Fault::Hang) => {
            shared.stop.cancelled().await;
            Err(std::io::Error::other("emulator stopped"))
        }
        Some(Fault::Reset) => Err(std::io::Error::other("emulated connection reset")),
        Some(Fault::Truncated) => {
            let body = token(None);
            let partial = Bytes::from(body[..body.len() / 2].to_string());
            // A pause after the first chunk makes hyper send the head and
            // that chunk before the error aborts the connection.
            let cut = async {
                tokio::time::sleep(Duration::from_millis(20)).await;
                Err(std::io::Error::other("emulated truncation"))
            };
            let chunks = stream::iter([Ok(Frame::data(partial))]).chain(stream::once(cut));
            let mut response = Response::new(BodyExt::boxed(StreamBody::new(chunks)));
            let headers = response.headers_mut();
            headers.insert(header::CONTENT_LENGTH, body.len().into());
            headers.insert("metadata-flavor", "Google".parse().expect("valid header"));
            Ok(response)
        }
        Some(Fault::Oversized) => Ok(text(StatusCode::OK, &"x".repeat(1 << 20))),
        Some(Fault::Garbage) => Ok(text(StatusCode::OK, "<html>this is not a token</html>")),
        Some(Fault::NoFlavorHeader) => {
            let mut response = text(StatusCode::OK, &token(None));
            response.headers_mut().remove("metadata-flavor");
            Ok(response)
        }
        other => Ok(text(StatusCode::OK, &token(other.as_ref()))),
    }
}

/// Issues and remembers an access token; returns it and its lifetime in
/// seconds.
fn issue_access_token(shared: &Shared, email: &str, scopes: Vec<String>) -> (String, u64) {
    let token = format!("ya29.emulator.{}", random_alphanumeric(48));
    let mut state = shared.lock();
    let lifetime = state.config.access_token_lifetime.as_secs();
    if state.issued.len() >= MAX_REMEMBERED_TOKENS {
        state.issued.clear();
    }
    state.issued.insert(
        token.clone(),
        TokenInfo {
            email: email.to_string(),
            scopes,
            exp: unix_now() + lifetime,
        },
    );
    (token, lifetime)
}

fn access_token(
    shared: &Shared,
    email: &str,
    scopes: Vec<String>,
    fault: Option<&Fault>,
) -> String {
    let (token, lifetime) = issue_access_token(shared, email, scopes);
    match fault {
        Some(Fault::NoExpiry) => json!({"access_token": token, "token_type": "Bearer"}),
        Some(Fault::Expired) => {
            json!({"access_token": token, "expires_in": 0, "token_type": "Bearer"})
        }
        _ => json!({"access_token": token, "expires_in": lifetime, "token_type": "Bearer"}),
    }
    .to_string()
}

fn id_token(
    shared: &Shared,
    email: &str,
    audience: &str,
    full: bool,
    licenses: bool,
    fault: Option<&Fault>,
) -> String {
    let now = unix_now();
    let lifetime = shared.lock().config.id_token_lifetime.as_secs();
    let subject = stable_number(email);
    let mut claims = json!({
        "iss": "https://accounts.google.com",
        "aud": audience,
        "azp": subject,
        "sub": subject,
        "email": email,
        "email_verified": true,
        "iat": now,
        "exp": now + lifetime,
    });
    if full {
        let mut engine = json!({
            "project_id": "emulator-project",
            "project_number": 123_456_789_012u64,
            "zone": "us-central1-a",
            "instance_id": "1234567890123456789",
            "instance_name": "tokenbroker-emulator",
            "instance_creation_timestamp": 1_700_000_000,
        });
        if licenses {
            engine["license_id"] = json!(["1000010"]);
        }
        claims["google"] = json!({ "compute_engine": engine });
    }
    match fault {
        Some(Fault::NoExpiry) => {
            claims.as_object_mut().map(|c| c.remove("exp"));
        }
        Some(Fault::Expired) => claims["exp"] = json!(now.saturating_sub(60)),
        Some(Fault::WrongAudience) => claims["aud"] = json!("https://wrong-audience.example"),
        _ => {}
    }
    // A random nonce makes every token distinct, even within one second.
    claims["jti"] = json!(random_alphanumeric(16));
    jwt::sign_hs256(&claims, &shared.signing_key)
}

async fn control_api(
    shared: &Shared,
    method: Method,
    path: &str,
    request: Request<Incoming>,
) -> Response<Body> {
    match (method, path) {
        (Method::GET, "stats") => json_response(&*shared.stats.borrow()),
        (Method::PUT, "fault") => match read_json::<FaultRule>(request).await {
            Ok(rule) => {
                tracing::info!(?rule, "emulator fault set");
                shared.lock().fault = Some(rule);
                text(StatusCode::OK, "ok\n")
            }
            Err(message) => text(StatusCode::BAD_REQUEST, &message),
        },
        (Method::DELETE, "fault") => {
            shared.lock().fault = None;
            text(StatusCode::OK, "ok\n")
        }
        (Method::PUT, "lifetimes") => match read_json::<Lifetimes>(request).await {
            Ok(lifetimes) => {
                shared.lock().set_lifetimes(lifetimes);
                text(StatusCode::OK, "ok\n")
            }
            Err(message) => text(StatusCode::BAD_REQUEST, &message),
        },
        (Method::GET, "tokeninfo") => {
            let query = parse_query(request.uri().query().unwrap_or(""));
            let info = query
                .get("access_token")
                .and_then(|token| shared.lock().issued.get(token).cloned());
            match info {
                Some(info) => json_response(&info),
                None => text(StatusCode::NOT_FOUND, "unknown token\n"),
            }
        }
        (Method::PUT, "keys") => google::trust_key(shared, request).await,
        (Method::PUT, "users") => match read_json::<google::User>(request).await {
            Ok(user) => {
                shared.lock().google.users.push(user);
                text(StatusCode::OK, "ok\n")
            }
            Err(message) => text(StatusCode::BAD_REQUEST, &message),
        },
        (Method::PUT, "impersonable") => match read_json::<google::Impersonable>(request).await {
            Ok(account) => {
                shared.lock().google.impersonable.insert(account.email);
                text(StatusCode::OK, "ok\n")
            }
            Err(message) => text(StatusCode::BAD_REQUEST, &message),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "control API: GET stats, PUT fault, DELETE fault, PUT lifetimes, GET tokeninfo?access_token=, PUT keys, PUT users, PUT impersonable\n",
        ),
    }
}

async fn read_json<T: serde::de::DeserializeOwned>(
    request: Request<Incoming>,
) -> Result<T, String> {
    let body = http_body_util::Limited::new(request.into_body(), 64 * 1024)
        .collect()
        .await
        .map_err(|e| format!("cannot read body: {e}\n"))?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| format!("bad JSON: {e}\n"))
}

/// What `service-accounts/{account}/?recursive=true` lists.
fn account_info(email: &str, is_default: bool) -> serde_json::Value {
    let aliases: &[&str] = if is_default { &["default"] } else { &[] };
    json!({"aliases": aliases, "email": email, "scopes": DEFAULT_SCOPES})
}

fn json_response(value: &impl Serialize) -> Response<Body> {
    let mut response = text(
        StatusCode::OK,
        &serde_json::to_string(value).unwrap_or_default(),
    );
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        "application/json".parse().expect("valid header"),
    );
    response
}

fn text(status: StatusCode, body: &str) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert("metadata-flavor", "Google".parse().expect("valid header"));
    // What the real server sends with every plain value (libraries read it).
    headers.insert(
        header::CONTENT_TYPE,
        "application/text".parse().expect("valid header"),
    );
    response
}

fn parse_query(query: &str) -> HashMap<String, String> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(name), decode(value))
        })
        .collect()
}

fn decode(value: &str) -> String {
    percent_encoding::percent_decode_str(&value.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn random_alphanumeric(len: usize) -> String {
    std::iter::repeat_with(fastrand::alphanumeric)
        .take(len)
        .collect()
}

/// A numeric id derived from the email, like Google's `sub` claim.
fn stable_number(email: &str) -> String {
    let hash = email.bytes().fold(1_469_598_103_934_665_603u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(1_099_511_628_211)
    });
    format!("1{:019}", hash % 10u64.pow(19))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_is_a_stable_20_digit_number() {
        let a = stable_number(DEFAULT_ACCOUNT);
        assert_eq!(a, stable_number(DEFAULT_ACCOUNT));
        assert_eq!(a.len(), 20);
        assert!(a.bytes().all(|b| b.is_ascii_digit()));
        assert_ne!(a, stable_number("other@p.iam.gserviceaccount.com"));
    }

    #[test]
    fn faults_count_down_and_clear() {
        let mut state = State {
            config: EmulatorConfig::default(),
            fault: Some(FaultRule {
                fault: Fault::Garbage,
                target: Target::Identity,
                times: Some(2),
            }),
            issued: HashMap::new(),
            arrivals: Vec::new(),
            google: google::Accounts::default(),
        };
        assert_eq!(state.take_fault(Target::Token), None);
        assert_eq!(state.take_fault(Target::Identity), Some(Fault::Garbage));
        assert_eq!(state.take_fault(Target::Identity), Some(Fault::Garbage));
        assert_eq!(state.take_fault(Target::Identity), None);
        assert!(state.fault.is_none());
    }

    #[test]
    fn fault_rules_read_from_json() {
        let rule: FaultRule = serde_json::from_str(
            r#"{"kind":"status","status":429,"retry_after_secs":2,"times":3}"#,
        )
        .unwrap();
        assert_eq!(
            rule,
            FaultRule {
                fault: Fault::Status {
                    status: 429,
                    retry_after_secs: Some(2)
                },
                target: Target::Any,
                times: Some(3),
            }
        );
        let hang: FaultRule =
            serde_json::from_str(r#"{"kind":"hang","target":"identity"}"#).unwrap();
        assert_eq!(hang.fault, Fault::Hang);
        assert_eq!(hang.target, Target::Identity);
    }

    #[test]
    fn query_values_are_decoded() {
        let query = parse_query("audience=https%3A%2F%2Fa%3Fb%3D1%26c%23d%20e&format=full&x");
        assert_eq!(query["audience"], "https://a?b=1&c#d e");
        assert_eq!(query["format"], "full");
        assert_eq!(query["x"], "");
    }
}
