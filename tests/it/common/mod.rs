//! Test harness: an in-process metadata server emulator, the real
//! `tokenbroker` binary serving on a Unix socket in a temporary directory
//! ([`Broker`]), and the requests, waits, processes and files the tests
//! share.

pub mod activation;
pub mod audit;
pub mod authority_shim;
mod broker;
pub mod h2;
pub mod http;

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use futures_util::StreamExt;
use tokenbroker::client::{ClientError, TokenStream};
use tokenbroker::emulator::{Emulator, EmulatorConfig};
use tokenbroker::proto::v1::{
    GetAccessTokenRequest, GetIdTokenRequest, InvalidateTokenRequest, WatchTokenRequest, token,
};
use tokio::process::Command;

pub use broker::Broker;
pub use http::{Scrape, checking_server, scrape_until};

/// The binary under test.
pub const BINARY: &str = env!("CARGO_BIN_EXE_tokenbroker");
/// Bound on anything a test waits for, so a broken broker fails the test
/// instead of hanging it.
pub const PATIENCE: Duration = Duration::from_secs(30);
/// The uid (and gid) that tests run hostile or unprivileged processes as.
pub const NOBODY: u32 = 65534;

// === Waits ===

/// Awaits `future` for at most [`PATIENCE`]; past that the test fails,
/// naming `what` it waited for.
pub async fn in_time<F: Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(PATIENCE, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {PATIENCE:?}"))
}

/// Polls `condition` every 20 ms until it holds, for at most [`PATIENCE`];
/// past that the test fails with `what` and the last `describe()`.
pub async fn poll_until(
    what: &str,
    mut condition: impl FnMut() -> bool,
    describe: impl Fn() -> String,
) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {PATIENCE:?}; {}",
            describe()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// === The emulator ===

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

// === Requests and tokens ===

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

/// A `WatchTokenRequest` following `request` (an ID or access token).
pub fn watch(
    request: impl Into<tokenbroker::proto::v1::watch_token_request::Request>,
) -> WatchTokenRequest {
    WatchTokenRequest {
        request: Some(request.into()),
    }
}

/// A `WatchTokenRequest` following the ID token for `audience`.
pub fn watch_id(audience: &str) -> WatchTokenRequest {
    watch(id_request(audience))
}

/// An `InvalidateTokenRequest` handing back `token`, obtained as the ID
/// token for `audience` with defaults elsewhere.
pub fn invalidate_id(audience: &str, token: &str) -> InvalidateTokenRequest {
    use tokenbroker::proto::v1::invalidate_token_request;
    InvalidateTokenRequest {
        request: Some(invalidate_token_request::Request::IdToken(id_request(
            audience,
        ))),
        token: token.to_string(),
    }
}

/// Hands `request`'s token back over `client`: whether the broker dropped
/// it (it was still the cached one).
pub async fn invalidated(
    client: &mut tokenbroker::proto::v1::token_broker_client::TokenBrokerClient<
        tonic::transport::Channel,
    >,
    request: InvalidateTokenRequest,
) -> bool {
    client
        .invalidate_token(request)
        .await
        .expect("the invalidation is accepted")
        .into_inner()
        .invalidated
}

/// A request carrying a gRPC deadline.
pub fn with_deadline<T>(message: T, deadline: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(deadline);
    request
}

/// The next token of a typed client's watch, within [`PATIENCE`].
pub async fn next_token(tokens: &mut TokenStream) -> token::Token {
    match in_time("the next token of the watch", tokens.next()).await {
        Some(Ok(token)) => token,
        Some(Err(error)) => panic!("the watch failed: {error}"),
        None => panic!("the watch ended"),
    }
}

/// The status a typed client's watch ends with, within [`PATIENCE`].
pub async fn watch_end(tokens: &mut TokenStream) -> tonic::Status {
    match in_time("the end of the watch", tokens.next()).await {
        Some(Err(ClientError::Status(status))) => status,
        Some(Err(error)) => panic!("the watch failed without a status: {error}"),
        Some(Ok(_)) => panic!("the watch sent a token instead of ending"),
        None => panic!("the watch ended without a status"),
    }
}

/// The next message of a raw `WatchToken` stream, within [`PATIENCE`].
pub async fn next_message(
    stream: &mut tonic::Streaming<tokenbroker::proto::v1::Token>,
) -> Result<tokenbroker::proto::v1::Token, tonic::Status> {
    in_time("the next message of the watch", stream.message())
        .await
        .map(|message| message.expect("the stream goes on"))
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

/// Asserts that no 16-byte window of `secret` is in `logs`: any piece of a
/// secret would be a leak, not just all of it. The windows start every 8
/// bytes, and the last one ends with the secret's last byte; a secret
/// shorter than 16 bytes is looked for whole.
pub fn assert_no_piece_of(secret: &str, logs: &str) {
    const WINDOW: usize = 16;
    let bytes = secret.as_bytes();
    let last = bytes.len().saturating_sub(WINDOW);
    let starts = (0..last).step_by(WINDOW / 2).chain(std::iter::once(last));
    for start in starts {
        let piece = String::from_utf8_lossy(&bytes[start..bytes.len().min(start + WINDOW)]);
        assert!(
            !logs.contains(piece.as_ref()),
            "a piece of a secret is in the logs: {piece}"
        );
    }
}

// === Processes ===

/// Prefixes of the environment variables that change what the binary does
/// (its flags' fallbacks, OpenTelemetry, credentials discovery, the
/// metadata host, AWS credentials, proxies).
const BROKER_ENV_PREFIXES: [&str; 10] = [
    "TOKENBROKER_",
    "AWS_",
    "OTEL_",
    "GOOGLE_",
    "CLOUDSDK_",
    "GCE_",
    "HTTPS_PROXY",
    "https_proxy",
    "NO_PROXY",
    "no_proxy",
];

/// Removes from `command` the variables of this process's environment that
/// would change what the binary does, unless the test set them on
/// `command` itself: tests see only what they give.
pub fn scrub_env(command: &mut Command) {
    scrub_std_env(command.as_std_mut());
}

/// [`scrub_env`] for a `std` command.
pub fn scrub_std_env(command: &mut std::process::Command) {
    let set: Vec<std::ffi::OsString> = command
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

/// `program` run as uid and gid `uid` with no supplementary groups (by
/// `setpriv`, which needs root), its environment scrubbed as
/// [`binary`]'s is.
pub fn as_uid(uid: u32, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new("setpriv");
    command
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .arg("--clear-groups")
        .arg(program);
    scrub_env(&mut command);
    command
}

/// Whether this process is root, which the parts of a test that run as
/// another uid or give files away need; says so when it is not.
pub fn is_root(needed_for: &str) -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        eprintln!("not root: {needed_for} is left out");
    }
    root
}

/// Runs `command` to its end, within [`PATIENCE`]: what it printed.
pub async fn output(command: &mut Command) -> Output {
    output_within(command, PATIENCE).await
}

/// Runs `command` to its end, within `limit` (for builds, which take
/// longer than anything a test waits for): what it printed.
pub async fn output_within(command: &mut Command, limit: Duration) -> Output {
    let program = format!("{:?}", command.as_std().get_program());
    tokio::time::timeout(limit, command.kill_on_drop(true).output())
        .await
        .unwrap_or_else(|_| panic!("{program} did not exit within {limit:?}"))
        .unwrap_or_else(|error| panic!("{program} runs: {error}"))
}

/// Runs `command`, which must succeed, within [`PATIENCE`]: its stdout.
pub async fn succeeds(command: &mut Command) -> String {
    succeeds_within(command, PATIENCE).await
}

/// Runs `command`, which must succeed, within `limit`: its stdout.
pub async fn succeeds_within(command: &mut Command, limit: Duration) -> String {
    let output = output_within(command, limit).await;
    assert!(
        output.status.success(),
        "{:?} failed ({}):\n{}",
        command.as_std().get_program(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8 output")
}

/// A running process whose output a test reads line by line; killed when
/// dropped.
pub struct Printing {
    pub child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl Printing {
    /// Starts `command` with its stdout piped.
    pub fn spawn(command: &mut Command) -> Printing {
        let mut child = command
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the program starts");
        let stdout = child.stdout.take().unwrap();
        let lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
        Printing { child, lines }
    }

    /// The next line printed, within [`PATIENCE`].
    pub async fn next_line(&mut self) -> String {
        in_time("the next line of output", self.lines.next_line())
            .await
            .expect("stdout reads")
            .expect("another line before the end")
    }

    /// Waits for the process to exit, within [`PATIENCE`].
    pub async fn wait(&mut self) -> std::process::ExitStatus {
        in_time("the program exiting", self.child.wait())
            .await
            .expect("wait works")
    }
}

/// Runs the binary with `args`, which must fail; returns what it printed
/// on stderr.
pub async fn binary_fails<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    fails(binary().args(args)).await
}

/// Runs `command`, which must fail; returns what it printed on stderr.
pub async fn fails(command: &mut Command) -> String {
    let output = output(command).await;
    assert!(!output.status.success(), "succeeded unexpectedly");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// `serve --socket SOCKET ARGS...`, which must refuse to start: what it
/// printed on stderr. The socket was never bound.
pub async fn serve_fails(socket: &Path, args: &[&str]) -> String {
    let socket_arg = ["serve", "--socket", socket.to_str().unwrap()];
    let stderr = binary_fails(socket_arg.iter().chain(args)).await;
    assert!(!socket.exists(), "the broker never served");
    stderr
}

/// The CPU time (user and system) the process `pid` used so far.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses: utime and
    // stime are fields 14 and 15, in clock ticks.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .unwrap()
        .unwrap() as u64;
    Duration::from_millis(ticks * 1000 / per_second)
}

/// The name the test harness gives the test `name` in `module` (that
/// module's `module_path!()`), for a test that runs this binary again to
/// run one test of it: the path without the crate's name.
pub fn test_path(module: &str, name: &str) -> String {
    let (_crate, path) = module.split_once("::").expect("a module of the crate");
    format!("{path}::{name}")
}

/// Bound on installing the test dependencies: a first install downloads
/// packages (pip, npm, apt), a later one is a no-op; a stalled mirror
/// fails the test instead of hanging CI.
const INSTALL_PATIENCE: Duration = Duration::from_secs(15 * 60);

/// Installs the pinned Python and Node packages the cross-language tests
/// run (`tests/setup-deps.sh`, into `target/`), once per test run.
pub async fn install_test_deps(which: &'static [&'static str]) {
    static INSTALLED: std::sync::Mutex<Vec<&'static [&'static str]>> =
        std::sync::Mutex::new(Vec::new());
    if INSTALLED.lock().unwrap().contains(&which) {
        return;
    }
    let mut install = Command::new(root().join("tests/setup-deps.sh"));
    install.args(which).kill_on_drop(true);
    let status = tokio::time::timeout(INSTALL_PATIENCE, install.status())
        .await
        .unwrap_or_else(|_| panic!("tests/setup-deps.sh {which:?} took over {INSTALL_PATIENCE:?}"))
        .expect("tests/setup-deps.sh runs");
    assert!(status.success(), "tests/setup-deps.sh {which:?} failed");
    INSTALLED.lock().unwrap().push(which);
}

/// The Python of the test virtualenv (`target/python`).
pub async fn python() -> PathBuf {
    install_test_deps(&["python"]).await;
    root().join("target/python/bin/python")
}

/// `NODE_PATH` for the test packages (`target/node/node_modules`).
pub async fn node_path() -> PathBuf {
    install_test_deps(&["node"]).await;
    root().join("target/node/node_modules")
}

/// `NODE_PATH` for the Node example's packages
/// (`target/node-example/node_modules`).
pub async fn node_example_path() -> PathBuf {
    install_test_deps(&["node"]).await;
    root().join("target/node-example/node_modules")
}

// === Files ===

/// The repository's root.
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Sets the permission bits of `path`.
pub fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The permission bits of `path`.
pub fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// The names in the directory `dir`.
pub fn names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// Writes `text` to `dir/tokenbroker.toml`; returns the path, as a flag.
pub fn write_config(dir: &Path, text: &str) -> String {
    let path = dir.join("tokenbroker.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

/// A config file's `[[sink]]` table writing the ID token for `audience` to
/// `path`, with `extra` lines (`mode = "0600"`, ...).
pub fn id_sink(path: &Path, audience: &str, extra: &[&str]) -> String {
    let mut table =
        format!("\n[[sink]]\npath = {path:?}\nid_token = {{ audience = \"{audience}\" }}\n");
    for line in extra {
        table.push_str(line);
        table.push('\n');
    }
    table
}

/// Writes `text` to `dir/policy.toml`; returns the path, as a flag.
pub fn write_policy(dir: &Path, text: &str) -> String {
    let path = dir.join("policy.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

/// A policy of one rule: `uid` may have the ID tokens of `audiences` for
/// `service_accounts`.
pub fn policy_rule(uid: u32, service_accounts: &str, audiences: &str) -> String {
    format!(
        "[[allow]]\nuids = [{uid}]\nservice_accounts = [\"{service_accounts}\"]\naudiences = [\"{audiences}\"]\n"
    )
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
    let path = dir.join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, serde_json::to_string_pretty(json).unwrap()).unwrap();
    chmod(&path, mode);
    path
}

/// `claims` as an RS256 JWT signed with test key `key` (0 or 1), key id
/// `kid`.
pub fn sign_with_test_key(claims: &serde_json::Value, kid: &str, key: usize) -> String {
    use rustls::pki_types::PrivatePkcs8KeyDer;
    use rustls::pki_types::pem::PemObject;
    let der = PrivatePkcs8KeyDer::from_pem_slice(TEST_KEYS[key].0.as_bytes()).unwrap();
    let pair = ring::rsa::KeyPair::from_pkcs8(der.secret_pkcs8_der()).unwrap();
    tokenbroker::emulator::google::sign_assertion(claims, kid, &pair)
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A key file for test key 1 that `emulator` trusts (registered as `kid-1`).
pub fn trusted_key_file(emulator: &Emulator, dir: &Path) -> PathBuf {
    emulator.add_service_account_key("kid-1", KEY_ACCOUNT, TEST_KEYS[0].1.to_vec());
    write_file(dir, "key.json", &key_json(emulator, "kid-1"), 0o600)
}
