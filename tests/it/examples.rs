//! The example clients in `examples/` (Python grpcio, Node.js grpc-js,
//! grpc-go) against the real broker on the emulator: each watches an ID
//! token and calls a local HTTP server with it, which checks the bearer
//! token. `restart.rs` runs them across a broker restart.

use std::time::Duration;

use tokio::process::Command;

use crate::common::{self, Broker, emulator_with_lifetime, output, root};

/// Runs an example until it has made `calls` calls, and checks what the
/// server saw: that many distinct, valid tokens (the first one and then
/// refreshed ones), and none of them in the example's output.
async fn run_example(mut command: Command, calls: usize) {
    let emulator = emulator_with_lifetime(Duration::from_secs(4)).await;
    let broker = Broker::start(&emulator, &["--expiry-skew", "1s"]).await;
    let (addr, accepted) = common::checking_server().await;
    let url = format!("http://{addr}/hello");
    command
        .args(["--audience", &url, "--calls", &calls.to_string()])
        .env("TOKENBROKER_SOCKET", &broker.socket);
    let output = output(&mut command).await;
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

/// An example program in `examples/`.
#[derive(Clone, Copy, Debug)]
pub enum Example {
    Python,
    Node,
    Go,
}

impl Example {
    pub const ALL: [Example; 3] = [Example::Python, Example::Node, Example::Go];

    /// The command that runs it, its dependencies installed (and the Go
    /// one built, once per test run).
    pub async fn command(self) -> Command {
        match self {
            Example::Python => {
                let mut command = Command::new(common::python().await);
                command.arg(root().join("examples/python/watch_and_call.py"));
                command
            }
            Example::Node => {
                let mut command = Command::new("node");
                command
                    .arg(root().join("examples/node/watch_and_call.js"))
                    .env("NODE_PATH", common::node_example_path().await);
                command
            }
            Example::Go => Command::new(go_example().await),
        }
    }
}

/// Builds the Go example into `target/go` once; its path.
async fn go_example() -> &'static std::path::Path {
    static BUILT: tokio::sync::OnceCell<std::path::PathBuf> = tokio::sync::OnceCell::const_new();
    BUILT
        .get_or_init(|| async {
            let binary = root().join("target/go/watch_and_call");
            common::install_test_deps(&["go"]).await;
            // A first build compiles Debian's gRPC packages too.
            let mut build = Command::new(root().join("examples/go/build.sh"));
            build.arg(&binary);
            common::succeeds_within(&mut build, Duration::from_secs(600)).await;
            binary
        })
        .await
        .as_path()
}

#[tokio::test]
async fn the_python_example_watches_a_token_and_calls_with_it() {
    run_example(Example::Python.command().await, 2).await;
}

#[tokio::test]
async fn the_node_example_watches_a_token_and_calls_with_it() {
    run_example(Example::Node.command().await, 2).await;
}

#[tokio::test]
async fn the_go_example_watches_a_token_and_calls_with_it() {
    run_example(Example::Go.command().await, 2).await;
}
