//! `loadgen restart`: the broker killed with SIGKILL under load and started
//! again, plainly (the new process binds the socket anew) and with systemd
//! socket activation (this process holds the listening socket, as systemd
//! does, and hands it to each broker as fd 3). Measures, from the moment
//! the new process is spawned, when the first token is served and when
//! every watcher (the Rust client's resilient watch) has a token again.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::Serialize;
use tokenbroker::client::Client;
use tokenbroker::emulator::Emulator;
use tokenbroker::proto::v1::GetIdTokenRequest;
use tokio::sync::Mutex;

/// How the broker gets its socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Way {
    /// The broker binds `--socket` itself (after removing the stale file).
    Plain,
    /// The listening socket outlives the broker (systemd `.socket` unit).
    SocketActivated,
}

/// What one restart took, from spawning the new process.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Restart {
    /// Until the first token was served, to a watcher or a caller.
    pub first_token_ms: f64,
    /// Until a client that connected while no broker ran (plain: one that
    /// kept trying) was served.
    pub waiting_client_ms: f64,
    /// Until every watcher had received a token from the new process.
    pub every_watcher_ms: f64,
}

/// Runs `rounds` restarts `way`, with `watchers` watching `keys` distinct
/// tokens and callers calling throughout. `broker` is the command that
/// runs `tokenbroker`.
pub async fn measure(
    broker: &dyn Fn() -> Command,
    emulator: &Emulator,
    way: Way,
    watchers: usize,
    keys: usize,
    rounds: usize,
) -> Vec<Restart> {
    let keys = keys.max(1);
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("broker.sock");
    let listener = (way == Way::SocketActivated)
        .then(|| std::os::unix::net::UnixListener::bind(&socket).expect("bind the socket"));
    let spawn = || {
        let mut command = broker();
        command
            .args(["serve", "--metadata-host", &emulator.host()])
            .args([
                "--max-watchers",
                "1000000",
                "--max-watchers-per-uid",
                "1000000",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        match &listener {
            None => {
                command.arg("--socket").arg(&socket);
                (Instant::now(), command.spawn().expect("the broker starts"))
            }
            Some(listener) => {
                let unused = dir.path().join("unused.sock");
                command.arg("--socket").arg(unused);
                (Instant::now(), activated(command, listener))
            }
        }
    };
    let (_, mut child) = spawn();
    wait_for_socket(&socket).await;

    // Watchers, 100 to a connection, each noting when it got a token.
    let received: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; watchers]));
    let mut tasks = tokio::task::JoinSet::new();
    let mut client = None;
    for n in 0..watchers {
        if n % 100 == 0 {
            client = Some(Client::connect(&socket).await.expect("connect"));
        }
        let mut tokens = client
            .as_ref()
            .expect("a client")
            .watch_resilient(request(n % keys));
        let received = received.clone();
        tasks.spawn(async move {
            while let Some(token) = tokens.next().await {
                token.expect("the resilient watch rides through");
                received.lock().await[n] = Some(Instant::now());
            }
        });
    }
    // Callers, for load while the broker dies.
    for n in 0..8 {
        let socket = socket.clone();
        tasks.spawn(async move {
            let Ok(mut client) = Client::connect(&socket).await else {
                return;
            };
            for i in (n..).step_by(8) {
                let _ = client.id_token(request(i % keys)).await;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
    }
    all_since(&received, None).await;

    let mut restarts = Vec::new();
    for _ in 0..rounds {
        child.kill().expect("SIGKILL");
        child.wait().expect("the broker is gone");
        let killed = Instant::now();
        // With activation, a client that calls now waits in the backlog.
        let early = match way {
            Way::SocketActivated => Some(tokio::spawn(first_token(socket.clone()))),
            Way::Plain => None,
        };
        let (spawned, new_child) = spawn();
        child = new_child;
        let served = match early {
            Some(call) => call.await.expect("the waiting call"),
            None => first_token(socket.clone()).await,
        };
        let everyone = all_since(&received, Some(killed)).await;
        let first_watcher = received
            .lock()
            .await
            .iter()
            .flatten()
            .copied()
            .filter(|at| *at > killed)
            .min()
            .unwrap_or(everyone);
        restarts.push(Restart {
            first_token_ms: millis(first_watcher.min(served).saturating_duration_since(spawned)),
            waiting_client_ms: millis(served.saturating_duration_since(spawned)),
            every_watcher_ms: millis(everyone.saturating_duration_since(spawned)),
        });
    }
    tasks.abort_all();
    let _ = child.kill();
    let _ = child.wait();
    restarts
}

fn request(n: usize) -> GetIdTokenRequest {
    GetIdTokenRequest {
        audience: format!("https://restart-{n:02}.run.app"),
        ..Default::default()
    }
}

fn millis(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 10_000.0).round() / 10.0
}

/// `command` socket-activated with `listener`, as systemd starts it.
fn activated(command: Command, listener: &std::os::unix::net::UnixListener) -> Child {
    let mut shell =
        crate::activation::activated(command.get_program(), command.get_args(), listener, None);
    shell
        .envs(command.get_envs().filter_map(|(k, v)| Some((k, v?))))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    shell.spawn().expect("the broker starts")
}

async fn wait_for_socket(socket: &Path) {
    let started = Instant::now();
    while Client::connect(socket).await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the broker never served"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Calls `GetIdToken` on a fresh connection until it succeeds; when.
async fn first_token(socket: PathBuf) -> Instant {
    let started = Instant::now();
    loop {
        if let Ok(mut client) = Client::connect(&socket).await
            && client.id_token(request(0)).await.is_ok()
        {
            return Instant::now();
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no token after the restart"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Waits until every watcher has a token received after `since`; when the
/// last one arrived.
async fn all_since(received: &Mutex<Vec<Option<Instant>>>, since: Option<Instant>) -> Instant {
    let started = Instant::now();
    loop {
        {
            let received = received.lock().await;
            let fresh = |at: &Option<Instant>| at.is_some_and(|at| since.is_none_or(|s| at > s));
            if received.iter().all(fresh) {
                return received.iter().flatten().copied().max().expect("watchers");
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "a watcher never got a token after the restart"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
