//! Credential helpers as the tools run them: the real `git` clones from a
//! server that takes only a broker token; docker's protocol through the
//! `docker-credential-tokenbroker` name on `PATH` (and the docker CLI's
//! own lookup when it is installed); kubectl's exec plugin against an
//! HTTPS API server that checks the bearer token (or, without kubectl,
//! run as client-go runs it); `configure-docker` on real files; and every
//! helper with the broker down.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http_body_util::Full;
use serde_json::{Value, json};
use tokenbroker::emulator::{Emulator, EmulatorConfig};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::common::http::{TEST_CA, tls_front};
use crate::common::{BINARY, Broker, emulator, output, succeeds};

const CLOUD: &str = "https://www.googleapis.com/auth/cloud-platform";
const EMAIL: &str = "https://www.googleapis.com/auth/userinfo.email";

/// How a test server answers: the request's path and `Authorization`
/// header to a status and a body.
type Answer = Arc<dyn Fn(&str, Option<&str>) -> (u16, Vec<u8>) + Send + Sync>;

/// A plain HTTP server on a free loopback port answering with `answer`;
/// a 401 asks for basic auth (as git and registries do).
async fn serve(answer: Answer) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let answer = answer.clone();
            let service = hyper::service::service_fn(
                move |request: hyper::Request<hyper::body::Incoming>| {
                    let authorization = request
                        .headers()
                        .get("authorization")
                        .and_then(|v| v.to_str().ok());
                    let (status, body) = answer(request.uri().path(), authorization);
                    let mut response = hyper::Response::builder().status(status);
                    if status == 401 {
                        response = response.header("www-authenticate", "Basic realm=\"test\"");
                    }
                    let response = response.body(Full::new(Bytes::from(body))).unwrap();
                    async move { Ok::<_, std::convert::Infallible>(response) }
                },
            );
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            );
        }
    });
    addr
}

/// Whether `token` is an unexpired access token the emulator issued with
/// `scope`.
fn issued_with(emulator: &Emulator, token: &str, scope: &str) -> bool {
    emulator.token_info(token).is_some_and(|info| {
        info.scopes.iter().any(|s| s == scope) && info.exp > crate::common::unix_now()
    })
}

/// `git ARGS` with a home of its own (no system or user configuration but
/// what the test writes), never prompting.
fn git(home: &Path) -> Command {
    let mut command = Command::new("git");
    crate::common::scrub_env(&mut command);
    command
        .env("HOME", home)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env_remove("GIT_ASKPASS")
        .env_remove("SSH_ASKPASS");
    command
}

/// A bare repository `src.git` under `dir` holding one commit with
/// `README` = `text`, prepared for git's dumb HTTP protocol.
async fn repository(home: &Path, dir: &Path, text: &str) -> PathBuf {
    let bare = dir.join("src.git");
    let work = dir.join("work");
    succeeds(
        git(home)
            .args(["init", "-q", "--bare", "-b", "main"])
            .arg(&bare),
    )
    .await;
    succeeds(git(home).args(["init", "-q", "-b", "main"]).arg(&work)).await;
    std::fs::write(work.join("README"), text).unwrap();
    let in_work = |args: &[&str]| {
        let mut command = git(home);
        command
            .arg("-C")
            .arg(&work)
            .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
            .args(args);
        command
    };
    succeeds(&mut in_work(&["add", "README"])).await;
    succeeds(&mut in_work(&["commit", "-q", "-m", "first"])).await;
    succeeds(&mut in_work(&[
        "push",
        "-q",
        bare.to_str().unwrap(),
        "main",
    ]))
    .await;
    succeeds(git(home).arg("-C").arg(&bare).arg("update-server-info")).await;
    bare
}

/// The file under `root` a plain request path names, if it is one.
fn file_under(root: &Path, path: &str) -> Option<Vec<u8>> {
    let relative = path.strip_prefix("/src.git/")?;
    let plain = relative
        .split('/')
        .all(|part| !part.is_empty() && part != ".." && part != ".");
    plain.then(|| std::fs::read(root.join(relative)).ok())?
}

#[tokio::test]
async fn git_clones_with_only_the_helper_configured_as_documented() {
    let emulator = Arc::new(emulator(EmulatorConfig::default()).await);
    let broker = Broker::start(&emulator, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let bare = repository(&home, dir.path(), "cloned through the broker\n").await;

    let accepted = Arc::new(Mutex::new(Vec::<String>::new()));
    let answer: Answer = {
        let emulator = emulator.clone();
        let accepted = accepted.clone();
        Arc::new(move |path, authorization| {
            let password = authorization
                .and_then(|a| a.strip_prefix("Basic "))
                .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                .and_then(|pair| String::from_utf8(pair).ok())
                .and_then(|pair| pair.strip_prefix("oauth2accesstoken:").map(str::to_string));
            match password {
                Some(token) if issued_with(&emulator, &token, CLOUD) => {
                    accepted.lock().unwrap().push(token);
                    match file_under(&bare, path) {
                        Some(body) => (200, body),
                        None => (404, b"not found".to_vec()),
                    }
                }
                _ => (401, b"who are you?".to_vec()),
            }
        })
    };
    let addr = serve(answer).await;
    let url = format!("http://{addr}");
    // As docs/credential-helpers.md says, with the test server's host
    // added (git's own hosts are Google's).
    let helper = format!("!{BINARY} credential-helper git --host {addr}");
    succeeds(
        git(&home)
            .args(["config", "--global"])
            .arg(format!("credential.{url}.helper"))
            .arg(&helper),
    )
    .await;

    let clone = dir.path().join("clone");
    succeeds(
        git(&home)
            .env("TOKENBROKER_SOCKET", &broker.socket)
            .args(["clone", "-q"])
            .arg(format!("{url}/src.git"))
            .arg(&clone),
    )
    .await;
    assert_eq!(
        std::fs::read_to_string(clone.join("README")).unwrap(),
        "cloned through the broker\n"
    );
    assert!(!accepted.lock().unwrap().is_empty());

    // Without the helper, the same server refuses the clone.
    let refused = output(
        git(&home)
            .args(["-c", &format!("credential.{url}.helper=")])
            .args(["clone", "-q"])
            .arg(format!("{url}/src.git"))
            .arg(dir.path().join("refused")),
    )
    .await;
    assert!(!refused.status.success());
}

#[tokio::test]
async fn git_hosts_that_are_not_listed_get_no_answer() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let broker = Broker::start(&emulator, &[]).await;
    let ask = |input: &'static str| {
        let mut command = crate::common::binary();
        command
            .args(["credential-helper", "git", "get", "--socket"])
            .arg(&broker.socket);
        (command, input)
    };
    for (input, answered) in [
        (
            "protocol=https\nhost=source.developers.google.com\npath=p/r\n\n",
            true,
        ),
        (
            "protocol=https\nhost=i-123-git.us-central1.sourcemanager.dev\n\n",
            true,
        ),
        ("protocol=https\nhost=github.com\n\n", false),
        (
            "protocol=http\nhost=source.developers.google.com\n\n",
            false,
        ),
    ] {
        let (mut command, input) = ask(input);
        let out = with_stdin(&mut command, input).await;
        assert!(out.status.success(), "{input:?}");
        let stdout = String::from_utf8(out.stdout).unwrap();
        assert_eq!(
            stdout.contains("password="),
            answered,
            "{input:?}: {stdout}"
        );
        if answered {
            assert!(
                stdout.starts_with("username=oauth2accesstoken\npassword=ya29."),
                "{stdout}"
            );
            let expiry: u64 = stdout
                .lines()
                .find_map(|l| l.strip_prefix("password_expiry_utc="))
                .unwrap()
                .parse()
                .unwrap();
            assert!(
                expiry > crate::common::unix_now() + 300,
                "valid at least 5 minutes"
            );
        }
    }
    let (mut command, _) = ask("");
    let out = with_stdin(&mut command, "host=x\n\n").await;
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("protocol="));
}

/// Runs `command` with `input` on stdin.
async fn with_stdin(command: &mut Command, input: &str) -> std::process::Output {
    command
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = command.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).await.unwrap();
    drop(stdin);
    crate::common::in_time("the helper", child.wait_with_output())
        .await
        .unwrap()
}

/// A directory holding `docker-credential-tokenbroker`, a link to the
/// binary, as the docs install it.
fn helper_on_path(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(BINARY, bin.join("docker-credential-tokenbroker")).unwrap();
    bin
}

fn path_with(bin: &Path) -> std::ffi::OsString {
    let mut paths = vec![bin.to_path_buf()];
    paths.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    std::env::join_paths(paths).unwrap()
}

/// `docker-credential-tokenbroker ACTION`, found on `PATH` as docker finds it.
fn docker_helper(bin: &Path, socket: &Path, action: &str) -> Command {
    let mut command = Command::new("docker-credential-tokenbroker");
    crate::common::scrub_env(&mut command);
    command
        .env("PATH", path_with(bin))
        .env("TOKENBROKER_SOCKET", socket)
        .arg(action);
    command
}

#[tokio::test]
async fn docker_speaks_the_credential_helper_protocol_under_its_own_name() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let broker = Broker::start(&emulator, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let bin = helper_on_path(dir.path());

    let out = with_stdin(
        &mut docker_helper(&bin, &broker.socket, "get"),
        "us-docker.pkg.dev\n",
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["ServerURL"], "us-docker.pkg.dev");
    assert_eq!(answer["Username"], "oauth2accesstoken");
    assert!(issued_with(
        &emulator,
        answer["Secret"].as_str().unwrap(),
        CLOUD
    ));

    let out = with_stdin(
        &mut docker_helper(&bin, &broker.socket, "get"),
        "https://index.docker.io/v1/",
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        "credentials not found in native keychain"
    );

    let stored = json!({"ServerURL": "gcr.io", "Username": "u", "Secret": "s"}).to_string();
    let out = with_stdin(&mut docker_helper(&bin, &broker.socket, "store"), &stored).await;
    assert!(out.status.success() && out.stdout.is_empty());
    let out = with_stdin(&mut docker_helper(&bin, &broker.socket, "erase"), "gcr.io").await;
    assert!(out.status.success() && out.stdout.is_empty());
    let out = with_stdin(&mut docker_helper(&bin, &broker.socket, "list"), "").await;
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed["https://gcr.io"], "oauth2accesstoken");

    let out = with_stdin(
        &mut docker_helper(&bin, &broker.socket, "store"),
        "not json",
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
}

/// With the docker CLI installed, docker itself runs the helper: `docker
/// login` takes the registry's credentials from it (no daemon is needed
/// for that lookup), and `docker logout` erases through it.
#[tokio::test]
async fn the_docker_cli_takes_registry_credentials_from_the_helper() {
    if Command::new("docker")
        .arg("--version")
        .output()
        .await
        .is_err()
    {
        eprintln!("skipped: no docker CLI on PATH");
        return;
    }
    let emulator = emulator(EmulatorConfig::default()).await;
    let broker = Broker::start(&emulator, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let bin = helper_on_path(dir.path());
    let config = dir.path().join("docker");
    succeeds(
        crate::common::binary()
            .args([
                "configure-docker",
                "--registries",
                "europe-docker.pkg.dev",
                "--config-dir",
            ])
            .arg(&config),
    )
    .await;
    let docker = |args: &[&str]| {
        let mut command = Command::new("docker");
        crate::common::scrub_env(&mut command);
        command
            .env("PATH", path_with(&bin))
            .env("DOCKER_CONFIG", &config)
            .env(
                "DOCKER_HOST",
                format!("unix://{}", dir.path().join("no-daemon.sock").display()),
            )
            .env("TOKENBROKER_SOCKET", &broker.socket)
            .args(args)
            .stdin(std::process::Stdio::null());
        command
    };
    let before = emulator.stats().token_requests;
    let login = output(&mut docker(&["login", "europe-docker.pkg.dev"])).await;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&login.stdout),
        String::from_utf8_lossy(&login.stderr)
    );
    assert!(
        said.contains("Authenticating with existing credentials... [Username: oauth2accesstoken]"),
        "{said}"
    );
    assert_eq!(
        emulator.stats().token_requests,
        before + 1,
        "the helper asked the broker"
    );
    let logout = output(&mut docker(&["logout", "europe-docker.pkg.dev"])).await;
    assert!(
        logout.status.success(),
        "{}",
        String::from_utf8_lossy(&logout.stderr)
    );
}

#[tokio::test]
async fn configure_docker_edits_the_file_safely() {
    let dir = tempfile::tempdir().unwrap();
    let config_dir = dir.path().join("docker");
    let configure = |registries: &str| {
        let mut command = crate::common::binary();
        command
            .args(["configure-docker", "--registries", registries])
            .env("DOCKER_CONFIG", &config_dir);
        command
    };
    succeeds(&mut configure("us-docker.pkg.dev")).await;
    let path = config_dir.join("config.json");
    let config: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(
        config,
        json!({"credHelpers": {"us-docker.pkg.dev": "tokenbroker"}})
    );

    std::fs::write(
        &path,
        r#"{"auths": {"ghcr.io": {}}, "credsStore": "desktop"}"#,
    )
    .unwrap();
    succeeds(&mut configure("us-docker.pkg.dev,europe-docker.pkg.dev")).await;
    let config: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(config["credsStore"], "desktop");
    assert_eq!(config["auths"], json!({"ghcr.io": {}}));
    assert_eq!(
        config["credHelpers"]["europe-docker.pkg.dev"],
        "tokenbroker"
    );
    assert!(config_dir.join("config.json.bak").exists());

    let broken = "{ \"auths\": ";
    std::fs::write(&path, broken).unwrap();
    let out = output(&mut configure("us-docker.pkg.dev")).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains(path.to_str().unwrap()));
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        broken,
        "never overwritten"
    );
}

/// A kubeconfig (JSON, which kubeconfig files may be) for an API server at
/// `server` whose user runs `tokenbroker credential-helper kubectl`, as
/// docs/credential-helpers.md shows.
fn kubeconfig(server: &str, socket: &Path) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": server, "certificate-authority": TEST_CA}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "broker"}}],
        "current-context": "c",
        "users": [{"name": "broker", "user": {"exec": {
            "apiVersion": "client.authentication.k8s.io/v1",
            "command": BINARY,
            "args": ["credential-helper", "kubectl"],
            "env": [{"name": "TOKENBROKER_SOCKET", "value": socket.to_str().unwrap()}],
            "interactiveMode": "Never",
            "provideClusterInfo": false,
        }}}],
    })
}

/// Checks an `ExecCredential` against the v1 schema: the fields client-go
/// reads, with their types, and nothing it would refuse.
fn assert_exec_credential_v1(credential: &Value) {
    assert_eq!(credential["apiVersion"], "client.authentication.k8s.io/v1");
    assert_eq!(credential["kind"], "ExecCredential");
    let status = credential["status"]
        .as_object()
        .expect("status is an object");
    for key in status.keys() {
        assert!(
            [
                "token",
                "expirationTimestamp",
                "clientCertificateData",
                "clientKeyData"
            ]
            .contains(&key.as_str()),
            "unknown status field {key}"
        );
    }
    assert!(!status["token"].as_str().unwrap().is_empty());
    let expiry = humantime::parse_rfc3339(status["expirationTimestamp"].as_str().unwrap()).unwrap();
    assert!(expiry > std::time::SystemTime::now() + Duration::from_secs(300));
}

#[tokio::test]
async fn kubectl_calls_an_api_server_with_the_plugins_token() {
    let emulator = Arc::new(emulator(EmulatorConfig::default()).await);
    let broker = Broker::start(&emulator, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let checked = {
        let emulator = emulator.clone();
        Arc::new(move |_: &str, authorization: Option<&str>| {
            match authorization.and_then(|a| a.strip_prefix("Bearer ")) {
                Some(token) if issued_with(&emulator, token, EMAIL) => {
                    (200, br#"{"major":"1","minor":"32"}"#.to_vec())
                }
                _ => (401, b"{}".to_vec()),
            }
        })
    };
    let api = tls_front(serve(checked).await).await;
    let config = kubeconfig(&format!("https://{api}"), &broker.socket);
    let config_path = dir.path().join("kubeconfig");
    std::fs::write(&config_path, config.to_string()).unwrap();

    // The command as client-go runs it: the stanza's command, args and
    // env, with the request in KUBERNETES_EXEC_INFO.
    let exec = &config["users"][0]["user"]["exec"];
    let mut plugin = Command::new(exec["command"].as_str().unwrap());
    crate::common::scrub_env(&mut plugin);
    for arg in exec["args"].as_array().unwrap() {
        plugin.arg(arg.as_str().unwrap());
    }
    for env in exec["env"].as_array().unwrap() {
        plugin.env(
            env["name"].as_str().unwrap(),
            env["value"].as_str().unwrap(),
        );
    }
    plugin.env(
        "KUBERNETES_EXEC_INFO",
        json!({"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential", "spec": {"interactive": false}}).to_string(),
    );
    let credential: Value = serde_json::from_str(&succeeds(&mut plugin).await).unwrap();
    assert_exec_credential_v1(&credential);
    assert!(issued_with(
        &emulator,
        credential["status"]["token"].as_str().unwrap(),
        EMAIL
    ));

    if Command::new("kubectl")
        .arg("version")
        .arg("--client")
        .output()
        .await
        .is_err()
    {
        eprintln!("kubectl not on PATH: checked the plugin as client-go runs it only");
        return;
    }
    let mut kubectl = Command::new("kubectl");
    crate::common::scrub_env(&mut kubectl);
    kubectl
        .env("HOME", dir.path())
        .arg("--kubeconfig")
        .arg(&config_path)
        .args(["get", "--raw", "/version"]);
    let answer = succeeds(&mut kubectl).await;
    assert!(answer.contains("\"major\""), "{answer}");
}

#[tokio::test]
async fn every_helper_fails_fast_on_stderr_with_the_broker_down() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nobody-home.sock");
    let bin = helper_on_path(dir.path());
    let runs: Vec<(Command, &str)> = vec![
        (docker_helper(&bin, &socket, "get"), "gcr.io"),
        (
            {
                let mut git = crate::common::binary();
                git.args(["credential-helper", "git", "get", "--socket"])
                    .arg(&socket);
                git
            },
            "protocol=https\nhost=source.developers.google.com\n\n",
        ),
        (
            {
                let mut kubectl = crate::common::binary();
                kubectl
                    .args(["credential-helper", "kubectl", "--socket"])
                    .arg(&socket);
                kubectl
            },
            "",
        ),
    ];
    for (mut command, input) in runs {
        let started = std::time::Instant::now();
        let out = with_stdin(&mut command, input).await;
        // 1 s in practice; the bound leaves room for a loaded CI machine.
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(out.status.code(), Some(3), "exit code 3: cannot connect");
        assert!(
            out.stdout.is_empty(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains("cannot connect to the broker"), "{stderr}");
    }
}

#[tokio::test]
async fn helpers_pass_scopes_through_and_never_accept_less_than_five_minutes() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let broker = Broker::start(&emulator, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let bin = helper_on_path(dir.path());
    let mut get = docker_helper(&bin, &broker.socket, "get");
    get.env("TOKENBROKER_SCOPES", "s:one,s:two");
    let out = with_stdin(&mut get, "gcr.io").await;
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    let info = emulator
        .token_info(answer["Secret"].as_str().unwrap())
        .unwrap();
    assert_eq!(info.scopes, ["s:one", "s:two"]);
    let mut empty = docker_helper(&bin, &broker.socket, "get");
    empty.env("TOKENBROKER_SCOPES", "");
    let out = with_stdin(&mut empty, "gcr.io").await;
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    let info = emulator
        .token_info(answer["Secret"].as_str().unwrap())
        .unwrap();
    assert_eq!(info.scopes, [CLOUD], "an empty variable means the default");

    // Tokens that live 4 minutes never meet the helpers' 5, whatever
    // --min-valid-for says; `token access` takes them.
    let short = emulator_with_lifetime_of(240).await;
    let broker = Broker::start(&short, &[]).await;
    let mut git = crate::common::binary();
    git.args([
        "credential-helper",
        "git",
        "get",
        "--min-valid-for",
        "1s",
        "--socket",
    ])
    .arg(&broker.socket);
    let out = with_stdin(
        &mut git,
        "protocol=https\nhost=source.developers.google.com\n\n",
    )
    .await;
    assert_eq!(
        out.status.code(),
        Some(24),
        "UNAVAILABLE: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty());
    succeeds(
        crate::common::binary()
            .args(["token", "access", "--socket"])
            .arg(&broker.socket),
    )
    .await;
}

async fn emulator_with_lifetime_of(seconds: u64) -> Emulator {
    crate::common::emulator_with_lifetime(Duration::from_secs(seconds)).await
}

#[tokio::test]
async fn refusals_and_odd_input_are_one_line_on_stderr() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    crate::common::chmod(dir.path(), 0o700);
    let policy =
        crate::common::write_policy(dir.path(), &crate::common::policy_rule(4242, "*", "*"));
    let broker = Broker::start(&emulator, &["--policy", &policy]).await;
    let bin = helper_on_path(dir.path());

    let out = with_stdin(&mut docker_helper(&bin, &broker.socket, "get"), "gcr.io").await;
    assert_eq!(out.status.code(), Some(17), "PERMISSION_DENIED");
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains(&policy), "{stderr}");

    // Lookalike hosts are not Google's: docker's "not found", no token.
    for lookalike in [
        "gcr.io.evil.com",
        "https://evil.com/gcr.io",
        "user@gcr.io",
        "gcr.io:444",
        "GCR.IO.",
    ] {
        let out = with_stdin(&mut docker_helper(&bin, &broker.socket, "get"), lookalike).await;
        assert_eq!(out.status.code(), Some(1), "{lookalike}");
        assert_eq!(
            String::from_utf8(out.stdout).unwrap().trim(),
            "credentials not found in native keychain",
            "{lookalike}"
        );
    }

    // git's other operations, known or not, are accepted in silence.
    for action in ["store", "erase", "capability"] {
        let mut git = crate::common::binary();
        git.args(["credential-helper", "git", action, "--socket"])
            .arg(&broker.socket);
        let out = with_stdin(&mut git, "protocol=https\nhost=x\npassword=p\n\n").await;
        assert!(
            out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
            "{action}"
        );
    }

    let mut kubectl = crate::common::binary();
    kubectl
        .args(["credential-helper", "kubectl", "--socket"])
        .arg(&broker.socket)
        .env("KUBERNETES_EXEC_INFO", "{not json");
    let out = with_stdin(&mut kubectl, "").await;
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("KUBERNETES_EXEC_INFO"));
}
