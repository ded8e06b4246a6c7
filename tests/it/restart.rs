//! The broker killed with SIGKILL under load and started again: every kind
//! of watcher (the Rust client's resilient watch, the Python, Node and Go
//! examples, `tokenbroker token --watch`) resumes on the new process, with
//! a plain restart and with systemd socket activation, where the listening
//! socket outlives the process and clients wait in its backlog meanwhile.

use std::path::Path;
use std::time::SystemTime;

use futures_util::StreamExt;
use nix::sys::signal::Signal;
use tokenbroker::emulator::Emulator;
use tokenbroker::proto::v1::token;
use tokio::sync::mpsc;

use crate::common::{self, BINARY, Broker, Printing, in_time};
use crate::examples::Example;

/// Watch streams of the Rust client, on [`CONNECTIONS`] connections.
const WATCHERS: usize = 100;
const CONNECTIONS: usize = 10;

/// Everything that watches a token, started against the broker on `socket`.
struct Watchers {
    /// (watcher index, audience asked for, token) of every token received.
    tokens: mpsc::UnboundedReceiver<(usize, String, token::Token)>,
    /// Tokens received so far by each watcher.
    received: Vec<usize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The examples, each making a call per token.
    examples: Vec<(Example, Printing)>,
    /// `tokenbroker token id --watch`.
    cli: Printing,
    _server: std::net::SocketAddr,
}

impl Watchers {
    async fn start(socket: &Path) -> Watchers {
        let (sender, tokens) = mpsc::unbounded_channel();
        let mut tasks = Vec::new();
        for connection in 0..CONNECTIONS {
            let client = tokenbroker::client::Client::connect(socket).await.unwrap();
            for n in (connection..WATCHERS).step_by(CONNECTIONS) {
                let audience = format!("https://restart-{}", n % 7);
                let mut stream = client.watch_resilient(common::id_request(&audience));
                let sender = sender.clone();
                tasks.push(tokio::spawn(async move {
                    while let Some(token) = stream.next().await {
                        let token = token.expect("only tokens: the broker's outage is ridden out");
                        if sender.send((n, audience.clone(), token)).is_err() {
                            return;
                        }
                    }
                }));
            }
        }
        let (server, _) = common::checking_server().await;
        let url = format!("http://{server}/hello");
        let mut examples = Vec::new();
        for example in Example::ALL {
            let mut command = example.command().await;
            command
                .args(["--audience", &url, "--calls", "2"])
                .env("TOKENBROKER_SOCKET", socket);
            examples.push((example, Printing::spawn(&mut command)));
        }
        let cli = Printing::spawn(
            tokio::process::Command::new(BINARY)
                .args([
                    "token",
                    "id",
                    "--audience",
                    "https://restart-cli",
                    "--watch",
                ])
                .arg("--socket")
                .arg(socket),
        );
        Watchers {
            tokens,
            received: vec![0; WATCHERS],
            tasks,
            examples,
            cli,
            _server: server,
        }
    }

    /// Waits until every watcher has received `count` tokens in all, each
    /// valid and for the audience it asked for.
    async fn each_has(&mut self, count: usize) {
        while self.received.iter().any(|n| *n < count) {
            let (n, audience, token) = in_time("a token for every watcher", self.tokens.recv())
                .await
                .expect("the watchers run");
            let expiry = token.expire_time().expect("an expiry");
            assert!(expiry > SystemTime::now(), "an expired token was yielded");
            assert_eq!(common::claims(token.secret())["aud"], audience.as_str());
            self.received[n] += 1;
        }
        for (example, printing) in &mut self.examples {
            let line = printing.next_line().await;
            assert!(line.contains("HTTP 200"), "{example:?}: {line}");
        }
        let line = self.cli.next_line().await;
        assert_eq!(common::claims(&line)["aud"], "https://restart-cli");
    }

    /// Checks that the examples, done with their two calls, exit cleanly.
    async fn examples_finish(mut self) {
        for (example, printing) in &mut self.examples {
            let status = printing.wait().await;
            assert!(status.success(), "{example:?} exited with {status}");
        }
        for task in self.tasks {
            task.abort();
        }
    }
}

fn serve_args(emulator: &Emulator) -> Vec<String> {
    vec!["--metadata-host".into(), emulator.host()]
}

/// SIGKILL: no drain, no goodbye; the process is gone at once.
async fn kill(broker: &mut Broker) {
    broker.signal(Signal::SIGKILL);
    let status = broker.wait().await;
    assert!(!status.success());
}

#[tokio::test]
async fn every_watcher_resumes_after_sigkill_and_a_plain_restart() {
    let emulator = common::emulator(Default::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("tokenbroker.sock");
    let mut broker = Broker::spawn_at(
        &socket,
        tempfile::tempdir().unwrap(),
        serve_args(&emulator),
        &[],
    );
    broker.wait_until_ready().await;
    let mut watchers = Watchers::start(&socket).await;
    watchers.each_has(1).await;

    kill(&mut broker).await;
    assert!(socket.exists(), "SIGKILL leaves the socket file behind");
    let restarted = Broker::spawn_at(
        &socket,
        tempfile::tempdir().unwrap(),
        serve_args(&emulator),
        &[],
    );
    restarted.wait_until_ready().await;
    watchers.each_has(2).await;
    watchers.examples_finish().await;
}

#[tokio::test]
async fn every_watcher_resumes_after_sigkill_under_socket_activation() {
    let emulator = common::emulator(Default::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("activated.sock");
    let unused = dir.path().join("unused.sock");
    // systemd's part: the listening socket, held across restarts.
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let args: Vec<String> = serve_args(&emulator);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let activate = || {
        crate::systemd::activated(
            &listener,
            None,
            &unused,
            tempfile::tempdir().unwrap(),
            &args,
        )
    };
    let mut broker = activate();
    broker.wait_until_ready().await;
    let mut watchers = Watchers::start(&socket).await;
    watchers.each_has(1).await;

    kill(&mut broker).await;
    // A client arriving while no broker runs waits in the backlog...
    let mut waiting = tokenbroker::client::Client::connect(&socket)
        .await
        .expect("the kernel accepts into the backlog");
    let call =
        tokio::spawn(async move { waiting.id_token(common::id_request("https://waited")).await });
    let restarted = activate();
    restarted.wait_until_ready().await;
    // ...and is served by the next one.
    let token = in_time("the waiting call", call)
        .await
        .unwrap()
        .expect("served");
    assert_eq!(common::claims(&token.token)["aud"], "https://waited");
    watchers.each_has(2).await;
    watchers.examples_finish().await;
}
