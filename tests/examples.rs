//! The example clients in `examples/` (Python grpcio, Node.js grpc-js)
//! against the real broker on the emulator: each watches an ID token and
//! calls a local HTTP server with it, which checks the bearer token.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{Broker, PATIENCE, emulator_with_lifetime};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A server at `http://{addr}/hello` that answers 200 to a bearer ID token
/// for that URL that has not expired, and 401 to anything else; it keeps
/// every token it accepted.
async fn checking_server() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
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
            let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                let status = match bearer(&request) {
                    Some(token)
                        if valid_for(&token, &audience) && request.uri().path() == "/hello" =>
                    {
                        seen.lock().unwrap().push(token);
                        StatusCode::OK
                    }
                    _ => StatusCode::UNAUTHORIZED,
                };
                let response = Response::builder()
                    .status(status)
                    .body(Full::new(bytes::Bytes::from_static(b"hello")))
                    .unwrap();
                async move { Ok::<_, Infallible>(response) }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            );
        }
    });
    (addr, accepted)
}

fn bearer<B>(request: &Request<B>) -> Option<String> {
    let header = request.headers().get("authorization")?.to_str().ok()?;
    Some(header.strip_prefix("Bearer ")?.to_string())
}

fn valid_for(token: &str, audience: &str) -> bool {
    if token.split('.').count() != 3 {
        return false;
    }
    let claims = common::claims(token);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    claims["aud"] == audience && claims["exp"].as_u64().is_some_and(|exp| exp > now)
}

/// Runs an example until it has made `calls` calls, and checks what the
/// server saw: that many distinct, valid tokens (the first one and then
/// refreshed ones), and none of them in the example's output.
async fn run_example(mut command: Command, calls: usize) {
    let emulator = emulator_with_lifetime(Duration::from_secs(4)).await;
    let broker = Broker::start(&emulator, &["--expiry-skew", "1s"]).await;
    let (addr, accepted) = checking_server().await;
    let url = format!("http://{addr}/hello");
    command
        .args(["--audience", &url, "--calls", &calls.to_string()])
        .env("TOKENBROKER_SOCKET", &broker.socket)
        .kill_on_drop(true);
    let output = tokio::time::timeout(PATIENCE, command.output())
        .await
        .expect("the example finishes")
        .expect("the example runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert_eq!(
        stdout.lines().filter(|l| l.contains("HTTP 200")).count(),
        calls,
        "{stdout}"
    );
    let tokens = accepted.lock().unwrap().clone();
    assert_eq!(tokens.len(), calls);
    let mut distinct = tokens.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), calls, "each call used a refreshed token");
    for token in &tokens {
        assert!(!stdout.contains(token.as_str()) && !stderr.contains(token.as_str()));
    }
}

#[tokio::test]
async fn the_python_example_watches_a_token_and_calls_with_it() {
    let mut command = Command::new(common::python_with_grpc());
    command.arg(root().join("examples/python/watch_and_call.py"));
    run_example(command, 2).await;
}

#[tokio::test]
async fn the_node_example_watches_a_token_and_calls_with_it() {
    let mut command = Command::new("node");
    command
        .arg(root().join("examples/node/watch_and_call.js"))
        .env("NODE_PATH", node_modules());
    run_example(command, 2).await;
}

/// `target/node/node_modules` with the packages of
/// `examples/node/package.json`, installed on first use.
fn node_modules() -> std::path::PathBuf {
    let prefix = root().join("target/node");
    let modules = prefix.join("node_modules");
    let package: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("examples/node/package.json")).unwrap(),
    )
    .unwrap();
    let dependencies = package["dependencies"].as_object().unwrap();
    let installed = dependencies.iter().all(|(name, version)| {
        std::fs::read_to_string(modules.join(name).join("package.json"))
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .is_some_and(|p| p["version"] == *version)
    });
    if !installed {
        let status = std::process::Command::new("npm")
            .args([
                "install",
                "--silent",
                "--no-audit",
                "--no-fund",
                "--no-save",
                "--prefix",
            ])
            .arg(&prefix)
            .args(
                dependencies
                    .iter()
                    .map(|(name, version)| format!("{name}@{}", version.as_str().unwrap())),
            )
            .status()
            .expect("npm is needed for the Node example test");
        assert!(status.success(), "npm install failed");
    }
    modules
}
