//! A stand-in for the GCE metadata server, so the broker runs and is tested
//! off Google Cloud: the token, identity, email and account-listing
//! endpoints, the few instance and project values Google's auth libraries
//! read, the real server's header rules, HS256-signed ID tokens, and failure
//! modes switched on over HTTP (`/emulator/v1/...`) or from Rust.
//! It also fakes Google's OAuth token endpoint and IAM Credentials API
//! ([`google`]), verifying what they receive as the real ones do, and a
//! Kubernetes API server's pods and service accounts ([`kubernetes`]).

pub mod aws;
mod control;
mod faults;
pub mod google;
pub mod kubernetes;
mod metadata_api;
pub mod sts;

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::connections::Acceptor;

/// Email of the emulated VM's default service account.
pub const DEFAULT_ACCOUNT: &str = "tokenbroker-emulator@emulator-project.iam.gserviceaccount.com";
/// Default lifetime of emulated tokens (1 hour, as on Google Cloud).
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
/// Scopes an access token gets when the request names none.
pub const DEFAULT_SCOPES: &[&str] = &["https://www.googleapis.com/auth/cloud-platform"];

/// The emulated project's id (`project/project-id`).
pub const PROJECT_ID: &str = "emulator-project";
/// The emulated project's number (`project/numeric-project-id`).
pub const NUMERIC_PROJECT_ID: &str = "123456789012";
/// The emulated VM's zone (`instance/zone`).
pub const ZONE: &str = "projects/123456789012/zones/us-central1-a";

/// How many issued tokens and request arrivals the emulator remembers.
pub const MAX_REMEMBERED_TOKENS: usize = 100_000;

pub use faults::{Fault, FaultRule, Target};
pub use metadata_api::{CLUSTER_NAME, KUBE_ENV};

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
    /// Requests to the fake Google STS (`POST /v1/token`, `POST
    /// /v1/oauthtoken`).
    #[serde(default)]
    pub sts_requests: u64,
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
    /// Lists of the fake Kubernetes API (`GET /api/v1/pods`, ...) answered;
    /// like the gets and watches below, not counting those refused (outage,
    /// bearer token, bad parameters).
    #[serde(default)]
    pub kubernetes_lists: u64,
    /// Gets of one Kubernetes object answered, `404 NotFound` included.
    #[serde(default)]
    pub kubernetes_gets: u64,
    /// Kubernetes watches started, those that begin with `410 Expired`
    /// included.
    #[serde(default)]
    pub kubernetes_watches: u64,
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
    /// For a downscoped token, the `accessBoundary` it is limited to, as
    /// the fake STS received it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_boundary: Option<serde_json::Value>,
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
    received: Vec<String>,
    /// What the fake Google APIs know: keys, users, who may be impersonated.
    google: google::Accounts,
    aws: aws::AwsState,
}

struct Shared {
    state: Mutex<State>,
    /// What the fake Kubernetes API serves (apart from `state`: its watches
    /// read it often and need no token state).
    kubernetes: Mutex<kubernetes::Cluster>,
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
                received: Vec::new(),
                google: google::Accounts::default(),
                aws: aws::AwsState::default(),
            }),
            kubernetes: Mutex::new(kubernetes::Cluster::default()),
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

    /// The URL of the fake Google STS (an `external_account` file's
    /// `token_url`).
    pub fn sts_token_url(&self) -> String {
        format!("http://{}{}", self.addr, sts::TOKEN_PATH)
    }

    /// The base URL of the fake Google STS (`--sts-endpoint`).
    pub fn sts_endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The URL of the fake workforce token endpoint (an
    /// `external_account_authorized_user` file's `token_url`).
    pub fn workforce_token_url(&self) -> String {
        format!("http://{}{}", self.addr, sts::WORKFORCE_TOKEN_PATH)
    }

    /// Makes the fake STS exchange subject tokens for `pool`.
    pub fn add_federation_pool(&self, pool: sts::Pool) {
        self.shared
            .lock()
            .google
            .pools
            .insert(pool.audience.clone(), pool);
    }

    /// Lets the fake STS verify AWS requests signed with `role`'s
    /// credentials.
    pub fn add_aws_role(&self, role: aws::AwsRole) {
        self.shared.lock().aws.roles.push(role);
    }

    /// Serves EC2 instance metadata for `instance` under `/latest/`.
    pub fn set_ec2_instance(&self, instance: aws::Ec2Instance) {
        self.shared.lock().aws.instance = Some(instance);
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

    /// Every credential clients sent to the fake Google APIs (assertions,
    /// refresh tokens, client secrets, subject tokens, `Authorization`
    /// values), oldest first.
    pub fn received_credentials(&self) -> Vec<String> {
        self.shared.lock().received.clone()
    }

    /// What the emulator issued an access token for, if it issued it.
    pub fn token_info(&self, access_token: &str) -> Option<TokenInfo> {
        self.shared.lock().issued.get(access_token).cloned()
    }

    /// A kubeconfig for the fake Kubernetes API: server
    /// `http://{addr}`, the bearer token [`kubernetes::TOKEN`], cluster,
    /// user and current context all named `emulator`.
    pub fn kubeconfig(&self) -> String {
        kubernetes::kubeconfig(self.addr)
    }

    /// Adds a pod to the fake Kubernetes API (an `ADDED` event), or replaces
    /// the pod of its namespace and name (`MODIFIED`; with another `uid`, a
    /// new pod under an old name: `DELETED`, then `ADDED`).
    pub fn add_pod(&self, pod: kubernetes::FakePod) {
        self.shared.cluster().put_pod(pod);
    }

    /// Deletes a pod (a `DELETED` event); false if there was none.
    pub fn delete_pod(&self, namespace: &str, name: &str) -> bool {
        self.shared
            .cluster()
            .delete(kubernetes::Kind::Pod, namespace, name)
    }

    /// Adds or replaces a service account of the fake Kubernetes API, with
    /// its annotations (e.g. `iam.gke.io/gcp-service-account`).
    pub fn put_service_account(
        &self,
        namespace: &str,
        name: &str,
        annotations: BTreeMap<String, String>,
    ) {
        self.shared
            .cluster()
            .put_service_account(kubernetes::FakeServiceAccount {
                namespace: namespace.to_string(),
                name: name.to_string(),
                annotations,
            });
    }

    /// Deletes a service account; false if there was none.
    pub fn delete_service_account(&self, namespace: &str, name: &str) -> bool {
        self.shared
            .cluster()
            .delete(kubernetes::Kind::ServiceAccount, namespace, name)
    }

    /// Takes the fake Kubernetes API down (every `/api/v1/` request gets
    /// 503 and open watches end) or brings it back.
    pub fn set_kubernetes_outage(&self, down: bool) {
        self.shared.cluster().set_down(down);
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

    /// The fake Kubernetes API's objects, history and outage switch.
    fn cluster(&self) -> MutexGuard<'_, kubernetes::Cluster> {
        self.kubernetes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn count(&self, update: impl FnOnce(&mut Stats)) {
        self.stats.send_modify(update);
    }

    /// Remembers a credential a client sent (an assertion, a refresh token,
    /// a client secret, a subject token, a bearer token), for tests that
    /// check none of them reaches a log.
    fn remember_credential(&self, credential: &str) {
        let mut state = self.lock();
        if state.received.len() >= MAX_REMEMBERED_TOKENS {
            state.received.clear();
        }
        state.received.push(credential.to_string());
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
}

/// Serves connections until the emulator stops.
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

/// Routes a request: the control API, the fake Google APIs, the fake
/// Kubernetes API, else the metadata API.
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
        return Ok(control::serve(&shared, request.method().clone(), control, request).await);
    }
    if let Some(api) = google::Api::of(request.method(), &path) {
        return google::serve(&shared, api, request).await;
    }
    if path.starts_with(kubernetes::PREFIX) {
        return Ok(kubernetes::serve(&shared, &request));
    }
    if path.starts_with("/latest/") {
        return Ok(aws::serve_instance_metadata(&shared, &request));
    }
    metadata_api::serve(&shared, request).await
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

fn json_response(value: &impl Serialize) -> Response<Body> {
    json_answer(StatusCode::OK, value)
}

/// `value` as JSON, with `status`: how every fake API answers JSON.
fn json_answer(status: StatusCode, value: &impl Serialize) -> Response<Body> {
    let body = serde_json::to_string(value).unwrap_or_default();
    let mut response = text(status, &body);
    as_json(&mut response);
    response
}

/// Marks `response` as JSON.
fn as_json(response: &mut Response<Body>) {
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
}

/// The token of a request's `Authorization: Bearer` header.
fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
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

/// The pairs of a query string or form body, decoded (the last of a
/// repeated name wins).
fn parse_query(query: &str) -> HashMap<String, String> {
    form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_decoded() {
        let query = parse_query("audience=https%3A%2F%2Fa%3Fb%3D1%26c%23d%20e&format=full&x");
        assert_eq!(query["audience"], "https://a?b=1&c#d e");
        assert_eq!(query["format"], "full");
        assert_eq!(query["x"], "");
    }
}
