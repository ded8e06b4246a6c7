//! Test harness: an in-process metadata server emulator and the real
//! `tokenbroker` binary serving on a Unix socket in a temporary directory.

pub mod authority_shim;
pub mod http;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokenbroker::emulator::{Emulator, EmulatorConfig};
use tokenbroker::proto::v1::token_broker_client::TokenBrokerClient;
use tokenbroker::proto::v1::{GetAccessTokenRequest, GetIdTokenRequest};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tonic::transport::Channel;

/// The binary under test.
pub const BINARY: &str = env!("CARGO_BIN_EXE_tokenbroker");
/// Bound on anything a test waits for, so a broken broker fails the test
/// instead of hanging it.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// The name the test harness gives the test `name` in `module` (that
/// module's `module_path!()`), for a test that runs this binary again to
/// run one test of it: the path without the crate's name.
pub fn test_path(module: &str, name: &str) -> String {
    let (_crate, path) = module.split_once("::").expect("a module of the crate");
    format!("{path}::{name}")
}

/// Starts an emulator on a free loopback port.
pub async fn emulator(config: EmulatorConfig) -> Emulator {
    Emulator::start(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), config)
        .await
        .expect("emulator starts")
}

/// An emulator whose tokens live `lifetime`.
pub async fn emulator_with_lifetime(lifetime: Duration) -> Emulator {
    emulator(EmulatorConfig {
        access_token_lifetime: lifetime,
        id_token_lifetime: lifetime,
        ..EmulatorConfig::default()
    })
    .await
}

/// A running `tokenbroker serve`; killed when dropped.
pub struct Broker {
    child: Child,
    pub socket: PathBuf,
    pub dir: tempfile::TempDir,
    logs: Arc<Mutex<String>>,
    log_lines: watch::Receiver<usize>,
}

impl Broker {
    /// `tokenbroker serve` against `emulator`, with extra flags.
    pub async fn start(emulator: &Emulator, extra: &[&str]) -> Broker {
        let mut args = vec!["--metadata-host".to_string(), emulator.host()];
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::spawn(args, &[]).await
    }

    /// `tokenbroker serve --socket DIR/tokenbroker.sock ARGS`, waiting until
    /// it logs that it is ready.
    pub async fn spawn(args: Vec<String>, env: &[(&str, &str)]) -> Broker {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("tokenbroker.sock");
        let broker = Self::spawn_at(&socket, dir, args, env);
        broker.wait_for_log("tokenbroker ready").await;
        broker
    }

    /// Starts the binary without waiting for readiness.
    pub fn spawn_at(
        socket: &Path,
        dir: tempfile::TempDir,
        args: Vec<String>,
        env: &[(&str, &str)],
    ) -> Broker {
        let mut command = binary();
        command
            .arg("serve")
            .arg("--socket")
            .arg(socket)
            .args(&args)
            .envs(env.iter().copied());
        Self::spawn_command(command, socket, dir)
    }

    /// Runs `command` (which starts `tokenbroker serve` on `socket`, maybe
    /// through a wrapper) with the harness's environment and log capture,
    /// without waiting for readiness.
    pub fn spawn_command(mut command: Command, socket: &Path, dir: tempfile::TempDir) -> Broker {
        let set =
            |command: &Command, name: &str| command.as_std().get_envs().any(|(key, _)| key == name);
        // Credentials discovery sees only what a test gives it: no
        // variables, and a home without gcloud credentials.
        scrub_env(&mut command);
        if !set(&command, "HOME") {
            command.env("HOME", dir.path());
        }
        if !set(&command, "RUST_LOG") {
            command.env(
                "RUST_LOG",
                std::env::var("TEST_BROKER_LOG").unwrap_or_else(|_| "info".into()),
            );
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().expect("tokenbroker binary starts");
        let stderr = child.stderr.take().expect("stderr is piped");
        let logs = Arc::new(Mutex::new(String::new()));
        let (lines_tx, log_lines) = watch::channel(0);
        let sink = logs.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("[broker] {line}");
                let mut logs = sink.lock().unwrap();
                logs.push_str(&line);
                logs.push('\n');
                drop(logs);
                lines_tx.send_modify(|n| *n += 1);
            }
        });
        Broker {
            child,
            socket: socket.to_path_buf(),
            dir,
            logs,
            log_lines,
        }
    }

    /// Everything the broker logged so far.
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    /// Waits until the logs contain `needle`.
    pub async fn wait_for_log(&self, needle: &str) {
        let mut lines = self.log_lines.clone();
        let found =
            tokio::time::timeout(PATIENCE, lines.wait_for(|_| self.logs().contains(needle))).await;
        assert!(
            matches!(found, Ok(Ok(_))),
            "broker never logged {needle:?}; logs:\n{}",
            self.logs()
        );
    }

    /// Waits until at least `count` log lines contain every one of `needles`.
    pub async fn wait_for_log_lines(&self, needles: &[&str], count: usize) {
        let matching = |logs: &str| {
            logs.lines()
                .filter(|line| needles.iter().all(|needle| line.contains(needle)))
                .count()
        };
        let mut lines = self.log_lines.clone();
        let found = tokio::time::timeout(
            PATIENCE,
            lines.wait_for(|_| matching(&self.logs()) >= count),
        )
        .await;
        assert!(
            matches!(found, Ok(Ok(_))),
            "broker never logged {count} lines with {needles:?}; logs:\n{}",
            self.logs()
        );
    }

    /// A client connected over the socket.
    pub async fn client(&self) -> TokenBrokerClient<Channel> {
        tokenbroker::client::connect(&self.socket)
            .await
            .expect("client connects")
    }

    /// The broker's process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("broker is running")
    }

    /// Sends `signal` to the broker.
    pub fn signal(&self, signal: Signal) {
        let pid = self.child.id().expect("broker is running");
        kill(Pid::from_raw(pid as i32), signal).expect("signal delivered");
    }

    /// Waits for the broker to exit.
    pub async fn wait(&mut self) -> ExitStatus {
        tokio::time::timeout(PATIENCE, self.child.wait())
            .await
            .expect("broker exits in time")
            .expect("wait works")
    }
}

/// A `GetIdTokenRequest` for `audience` with defaults elsewhere.
pub fn id_request(audience: &str) -> GetIdTokenRequest {
    GetIdTokenRequest {
        audience: audience.into(),
        ..Default::default()
    }
}

/// A `GetAccessTokenRequest` for the default account and `scopes`.
pub fn access_request(scopes: &[&str]) -> GetAccessTokenRequest {
    GetAccessTokenRequest {
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// An `InvalidateTokenRequest` handing back `token`, obtained as the ID
/// token for `audience` with defaults elsewhere.
pub fn invalidate_id(
    audience: &str,
    token: &str,
) -> tokenbroker::proto::v1::InvalidateTokenRequest {
    use tokenbroker::proto::v1::{InvalidateTokenRequest, invalidate_token_request};
    InvalidateTokenRequest {
        request: Some(invalidate_token_request::Request::IdToken(id_request(
            audience,
        ))),
        token: token.to_string(),
    }
}

/// A request carrying a gRPC deadline.
pub fn with_deadline<T>(message: T, deadline: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(deadline);
    request
}

/// The claims of a JWT, decoded without verification.
pub fn claims(jwt: &str) -> serde_json::Value {
    use base64::Engine;
    let payload = jwt.split('.').nth(1).expect("JWT has a payload");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("payload is base64url");
    serde_json::from_slice(&bytes).expect("payload is JSON")
}

impl Broker {
    /// The address of `--metrics-addr`, read from the broker's logs.
    pub async fn metrics_addr(&self) -> std::net::SocketAddr {
        self.logged_addr("metrics_addr").await
    }

    /// The TCP address of `--metadata-addr`, read from the broker's logs.
    pub async fn metadata_addr(&self) -> std::net::SocketAddr {
        self.logged_addr("metadata_addr").await
    }

    /// The address of `serve --emulator`'s emulator, read from the logs.
    pub async fn emulator_addr(&self) -> std::net::SocketAddr {
        self.logged_addr("\"addr\":").await
    }

    /// The address logged in the field `field`.
    async fn logged_addr(&self, field: &str) -> std::net::SocketAddr {
        self.wait_for_log(field).await;
        let logs = self.logs();
        let start = logs.find(field).unwrap() + field.len();
        let addr: String = logs[start..]
            .trim_start_matches(|c: char| !c.is_ascii_digit())
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
            .collect();
        addr.parse()
            .unwrap_or_else(|_| panic!("no {field} address in the logs"))
    }
}

/// Installs the pinned Python and Node packages the cross-language tests
/// run (`tests/setup-deps.sh`, into `target/`); a no-op once installed.
pub fn install_test_deps(which: &[&str]) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let status = std::process::Command::new(root.join("tests/setup-deps.sh"))
        .args(which)
        .status()
        .expect("tests/setup-deps.sh runs");
    assert!(status.success(), "tests/setup-deps.sh {which:?} failed");
}

/// The Python of the test virtualenv (`target/python`).
pub fn python() -> PathBuf {
    install_test_deps(&["python"]);
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/python/bin/python")
}

/// `NODE_PATH` for the test packages (`target/node/node_modules`).
pub fn node_path() -> PathBuf {
    install_test_deps(&["node"]);
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/node/node_modules")
}

/// `NODE_PATH` for the Node example's packages
/// (`target/node-example/node_modules`).
pub fn node_example_path() -> PathBuf {
    install_test_deps(&["node"]);
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/node-example/node_modules")
}

/// `GET http://{addr}{path}`: status and body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let answer = http::send(
        http::Endpoint::Tcp(addr),
        ::http::Method::GET,
        path,
        &[("host", "localhost")],
    )
    .await;
    (answer.status.as_u16(), answer.body)
}

/// The Prometheus text of a broker's `/metrics`.
pub struct Scrape(pub String);

impl Scrape {
    /// Scrapes `addr`.
    pub async fn of(addr: std::net::SocketAddr) -> Scrape {
        let (status, body) = http_get(addr, "/metrics").await;
        assert_eq!(status, 200);
        Scrape(body)
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

/// Polls `/readyz` on `addr` until it answers 200 (readiness follows a
/// background probe, which no client can await).
pub async fn wait_until_ready(addr: std::net::SocketAddr) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while http_get(addr, "/readyz").await.0 != 200 {
        assert!(tokio::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Scrapes until `condition` holds (metrics of stream ends are recorded
/// when the broker notices the client left, which no client can await).
pub async fn scrape_until(
    addr: std::net::SocketAddr,
    condition: impl Fn(&Scrape) -> bool,
) -> Scrape {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        // The listener may refuse a connection while it is at its bound.
        let answer = http::try_send(
            http::Endpoint::Tcp(addr),
            ::http::Method::GET,
            "/metrics",
            &[("host", "localhost")],
        )
        .await;
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

/// Prefixes of the environment variables that change what the binary does
/// (its flags' fallbacks, OpenTelemetry, credentials discovery, the
/// metadata host).
const BROKER_ENV_PREFIXES: [&str; 5] = ["TOKENBROKER_", "OTEL_", "GOOGLE_", "CLOUDSDK_", "GCE_"];

/// Removes from `command` the variables of this process's environment that
/// would change what the binary does, unless the test set them on
/// `command` itself: tests see only what they give.
pub fn scrub_env(command: &mut Command) {
    let set: Vec<std::ffi::OsString> = command
        .as_std()
        .get_envs()
        .map(|(key, _)| key.to_os_string())
        .collect();
    for (name, _) in std::env::vars_os() {
        let inherited = name.to_str().is_some_and(|name| {
            BROKER_ENV_PREFIXES
                .iter()
                .any(|prefix| name.starts_with(prefix))
        });
        if inherited && !set.contains(&name) {
            command.env_remove(&name);
        }
    }
}

/// The binary under test, with an environment scrubbed of the developer's
/// broker, OpenTelemetry and Google settings ([`scrub_env`]).
pub fn binary() -> Command {
    let mut command = Command::new(BINARY);
    scrub_env(&mut command);
    command
}

/// Runs the binary with `args`, which must fail; returns what it printed
/// on stderr.
pub async fn binary_fails<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let output = tokio::time::timeout(PATIENCE, binary().args(args).output())
        .await
        .expect("the binary exits in time")
        .expect("the binary runs");
    assert!(!output.status.success(), "succeeded unexpectedly");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A server at `http://{addr}/hello` that answers 200 to a bearer ID token
/// for that URL that has not expired, and 401 to anything else; it keeps
/// every token it accepted.
pub async fn checking_server() -> (std::net::SocketAddr, Arc<Mutex<Vec<String>>>) {
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
                            hyper::StatusCode::OK
                        }
                        _ => hyper::StatusCode::UNAUTHORIZED,
                    };
                    let response = hyper::Response::builder()
                        .status(status)
                        .body(http_body_util::Full::new(bytes::Bytes::from_static(
                            b"hello",
                        )))
                        .unwrap();
                    async move { Ok::<_, std::convert::Infallible>(response) }
                },
            );
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            );
        }
    });
    (addr, accepted)
}

pub fn bearer<B>(request: &hyper::Request<B>) -> Option<String> {
    let header = request.headers().get("authorization")?.to_str().ok()?;
    Some(header.strip_prefix("Bearer ")?.to_string())
}

pub fn valid_for(token: &str, audience: &str) -> bool {
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

/// The test-only service-account key pairs under tests/fixtures/.
pub const TEST_KEYS: [(&str, &[u8]); 2] = [
    (
        include_str!("../../fixtures/test-only-key-1.pem"),
        include_bytes!("../../fixtures/test-only-key-1.public.der"),
    ),
    (
        include_str!("../../fixtures/test-only-key-2.pem"),
        include_bytes!("../../fixtures/test-only-key-2.public.der"),
    ),
];

/// The account of the test key files.
pub const KEY_ACCOUNT: &str = "keyed@test-project.iam.gserviceaccount.com";

/// A service-account key file's JSON: test key 1 with id `kid`, whose
/// `token_uri` is the emulator's.
pub fn key_json(emulator: &Emulator, kid: &str) -> serde_json::Value {
    serde_json::json!({
        "type": "service_account",
        "project_id": "test-project",
        "private_key_id": kid,
        "private_key": TEST_KEYS[0].0,
        "client_email": KEY_ACCOUNT,
        "client_id": "1234567890",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": emulator.token_uri(),
    })
}

/// Writes `json` to `dir/name` with permissions `mode`; returns the path.
pub fn write_file(dir: &Path, name: &str, json: &serde_json::Value, mode: u32) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, serde_json::to_string_pretty(json).unwrap()).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

/// A key file for test key 1 that `emulator` trusts (registered as `kid-1`).
pub fn trusted_key_file(emulator: &Emulator, dir: &Path) -> PathBuf {
    emulator.add_service_account_key("kid-1", KEY_ACCOUNT, TEST_KEYS[0].1.to_vec());
    write_file(dir, "key.json", &key_json(emulator, "kid-1"), 0o600)
}
