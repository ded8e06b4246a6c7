//! [`Broker`]: the real `tokenbroker serve`, its logs and its addresses.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokenbroker::emulator::Emulator;
use tokenbroker::proto::v1::token_broker_client::TokenBrokerClient;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use super::{PATIENCE, binary, in_time, scrub_env};

/// How long a test's broker may live: four times [`PATIENCE`], far more
/// than any test takes. A broker still running then is killed, so that a
/// call to a hung broker (by the typed or the generated client) fails the
/// test instead of hanging it.
pub const BROKER_LIFETIME: Duration = Duration::from_secs(4 * PATIENCE.as_secs());

/// A running `tokenbroker serve`; killed when dropped, or when it outlives
/// [`BROKER_LIFETIME`].
pub struct Broker {
    child: Child,
    pub socket: PathBuf,
    pub dir: tempfile::TempDir,
    logs: Arc<Mutex<String>>,
    log_lines: watch::Receiver<usize>,
    watchdog: tokio::task::AbortHandle,
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.watchdog.abort();
    }
}

impl Broker {
    /// `tokenbroker serve` against `emulator`, with extra flags.
    pub async fn start(emulator: &Emulator, extra: &[&str]) -> Broker {
        let mut args = vec!["--metadata-host".to_string(), emulator.host()];
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::spawn(args, &[]).await
    }

    /// `tokenbroker serve --emulator` with extra flags.
    pub async fn emulated(extra: &[&str]) -> Broker {
        let mut args = vec!["--emulator".to_string()];
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::spawn(args, &[]).await
    }

    /// `tokenbroker serve --socket DIR/tokenbroker.sock ARGS`, waiting until
    /// it logs that it is ready.
    pub async fn spawn(args: Vec<String>, env: &[(&str, &str)]) -> Broker {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("tokenbroker.sock");
        let broker = Self::spawn_at(&socket, dir, args, env);
        broker.wait_until_ready().await;
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
        let pid = child.id().expect("the broker has a pid");
        let watchdog = tokio::spawn(async move {
            tokio::time::sleep(BROKER_LIFETIME).await;
            eprintln!("the broker outlived the test's patience ({BROKER_LIFETIME:?}): killed");
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        })
        .abort_handle();
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
            watchdog,
        }
    }

    /// Waits until the broker logs that it is ready (serving on its socket).
    pub async fn wait_until_ready(&self) {
        self.wait_for_log("tokenbroker ready").await;
    }

    /// Waits until the broker logs that its health turned SERVING: its
    /// probe reached every service it needs, and `/readyz` says 200.
    pub async fn wait_until_serving(&self) {
        self.wait_for_log_lines(&["health changed", "\"serving\":true"], 1)
            .await;
    }

    /// Everything the broker logged so far.
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    /// How many log lines contain every one of `needles`.
    pub fn count_log_lines(&self, needles: &[&str]) -> usize {
        self.logs()
            .lines()
            .filter(|line| needles.iter().all(|needle| line.contains(needle)))
            .count()
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
        let mut lines = self.log_lines.clone();
        let found = tokio::time::timeout(
            PATIENCE,
            lines.wait_for(|_| self.count_log_lines(needles) >= count),
        )
        .await;
        assert!(
            matches!(found, Ok(Ok(_))),
            "broker never logged {count} lines with {needles:?}; logs:\n{}",
            self.logs()
        );
    }

    /// The generated client, connected over the socket: for tests of gRPC
    /// statuses, metadata and deadlines. It gives up on a call after
    /// [`PATIENCE`] (without telling the broker, unlike a gRPC deadline).
    pub async fn client(&self) -> TokenBrokerClient<Channel> {
        let endpoint = self.endpoint().timeout(PATIENCE);
        TokenBrokerClient::new(endpoint.connect().await.expect("client connects"))
    }

    /// A channel over the socket, for the other services it serves
    /// (health, reflection); calls on it need their own deadlines.
    pub async fn channel(&self) -> Channel {
        self.endpoint().connect().await.expect("client connects")
    }

    /// The socket as a tonic endpoint, connecting within [`PATIENCE`].
    fn endpoint(&self) -> Endpoint {
        Endpoint::from_shared(format!("unix://{}", self.socket.display()))
            .expect("a socket URI")
            .connect_timeout(PATIENCE)
    }

    /// A watch of the broker service's gRPC health over the socket.
    pub async fn health_watch(&self) -> HealthWatch {
        let mut client = HealthClient::new(self.channel().await);
        let request = HealthCheckRequest {
            service: "tokenbroker.v1.TokenBroker".into(),
        };
        let stream = in_time("the health watch", client.watch(request))
            .await
            .expect("the health watch opens")
            .into_inner();
        HealthWatch { client, stream }
    }

    /// The crate's typed client, connected over the socket: for tests that
    /// just need tokens.
    pub async fn typed_client(&self) -> tokenbroker::client::Client {
        tokenbroker::client::Client::connect(&self.socket)
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
        let status = in_time("the broker exiting", self.child.wait())
            .await
            .expect("wait works");
        // Its pid may be reused now.
        self.watchdog.abort();
        status
    }

    /// Sends SIGTERM and waits for the broker to exit cleanly.
    pub async fn stop(&mut self) {
        self.signal(Signal::SIGTERM);
        let status = self.wait().await;
        assert!(status.success(), "the broker exited with {status}");
    }

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

/// The broker service's gRPC health, as a stream of status changes, with
/// the client for one-off checks of other services on the same connection.
pub struct HealthWatch {
    /// The health client, for `Check` calls.
    pub client: HealthClient<Channel>,
    stream: tonic::Streaming<HealthCheckResponse>,
}

impl HealthWatch {
    /// The next status the watch reports, within [`PATIENCE`].
    pub async fn next(&mut self) -> ServingStatus {
        let message = in_time("the next health status", self.stream.message())
            .await
            .expect("the health stream is healthy")
            .expect("the health stream stays open");
        ServingStatus::try_from(message.status).expect("a known status")
    }

    /// The status `Check` reports for `service` now.
    pub async fn check(&mut self, service: &str) -> ServingStatus {
        let request = HealthCheckRequest {
            service: service.into(),
        };
        let response = in_time("a health check", self.client.check(request))
            .await
            .expect("health check answers")
            .into_inner();
        ServingStatus::try_from(response.status).expect("a known status")
    }
}
