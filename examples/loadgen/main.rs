//! Load generator: what the broker costs over a bare gRPC call on the same
//! socket, and how small it stays; how it holds up over time (`soak`); and
//! what clients see when it is killed and started again (`restart`).
//!
//! ```sh
//! cargo run --release --example loadgen -- [--keys 100] [--clients 64] [--connections 8] [--duration 4s] [--rounds 3] [--json]
//! cargo run --release --example loadgen -- soak [--minutes 10] [--plot soak.svg] [--json]
//! cargo run --release --example loadgen -- restart [--watchers 1000] [--rounds 5] [--json]
//! ```
//!
//! In one run it starts the broker (this binary re-executed as the broker,
//! the same code as `tokenbroker serve`) against a metadata server emulator
//! living in this process, and a baseline server answering the same RPC
//! from an empty handler with a response of the same size; it drives both
//! with the same clients, alternating rounds, and measures start-up time,
//! a cold-miss storm, and memory with many keys and idle watch streams.
//! As root it also drives the hits from inside a cgroup named as kubelet
//! names a pod's, against a broker with workload identity.
//!
//! Cache hits are driven twice: by tonic's client, which sends `localhost`
//! as `:authority`, and by the same client with its header blocks
//! re-encoded on the way out, which sends the broker the socket path
//! percent-encoded, as gRPC C-core does (the broker then re-encodes them
//! again for h2), and the baseline `localhost`, so that both pay the same
//! client-side cost.

// Not every variant is used here.
#[allow(dead_code)]
#[path = "../../tests/it/common/authority_shim.rs"]
mod authority_shim;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
#[path = "../../tests/it/common/activation.rs"]
mod activation;
mod plot;
mod restart;
mod soak;

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use authority_shim::{Authority, AuthorityShim};
use clap::{Parser, Subcommand};
use futures_util::Stream;
use hyper_util::rt::TokioIo;
use tokenbroker::emulator::kubernetes::FakePod;
use tokenbroker::emulator::{Emulator, EmulatorConfig, Fault, FaultRule};
use tokenbroker::proto::v1::token_broker_client::TokenBrokerClient;
use tokenbroker::proto::v1::token_broker_server::{TokenBroker, TokenBrokerServer};
use tokenbroker::proto::v1::{
    AccessToken, GetAccessTokenRequest, GetIdTokenRequest, IdToken, InvalidateTokenRequest,
    InvalidateTokenResponse, Token, WatchTokenRequest, watch_token_request,
};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

/// Set in a child process to make it a broker or the baseline server.
const ROLE: &str = "LOADGEN_ROLE";

#[derive(Debug, Parser)]
#[command(
    about = "Measures the broker: against a bare gRPC server on the same socket (no subcommand), over time (soak), across restarts (restart)",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    mode: Option<Mode>,
    #[command(flatten)]
    bench: Args,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// Runs the broker for minutes under steady load, key churn, watch
    /// streams, invalidations and an upstream fault every minute; checks
    /// every token, and that memory, descriptors and tasks stay flat.
    Soak(SoakArgs),
    /// Kills the broker with SIGKILL under load and starts it again, plainly
    /// and socket-activated; times the first token and every watcher's.
    Restart(RestartArgs),
}

#[derive(Debug, clap::Args)]
struct SoakArgs {
    /// How long the load runs.
    #[arg(long, default_value_t = 10)]
    minutes: u64,
    /// The reduced scale CI runs (a minute, 200 watchers), ignoring --minutes.
    #[arg(long)]
    reduced: bool,
    /// Where to write the plot of RSS, p99 and upstream rate (SVG).
    #[arg(long, default_value = "target/soak.svg")]
    plot: PathBuf,
    /// Print the report as one JSON object instead of a summary.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct RestartArgs {
    /// Resilient watch streams riding through each restart.
    #[arg(long, default_value_t = 1000)]
    watchers: usize,
    /// Distinct tokens they watch. The new broker starts with an empty
    /// cache and fetches each within --upstream-max-rps (20 a second), so
    /// re-serving every watcher takes about keys / 20 seconds.
    #[arg(long, default_value_t = 20)]
    keys: usize,
    /// Restarts per way.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Print one JSON object instead of a summary.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Debug, clap::Args)]
struct Args {
    /// Distinct ID-token keys warmed and then requested round-robin.
    #[arg(long, default_value_t = 100)]
    keys: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Connections the clients share.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Length of each measured round.
    #[arg(long, default_value = "4s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Measured rounds per server, alternating broker and baseline so that
    /// both see the same machine.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Concurrent requests for one uncached key in the storm.
    #[arg(long, default_value_t = 1000)]
    storm: usize,
    /// Keys cached for the memory measurement.
    #[arg(long, default_value_t = 10_000)]
    rss_keys: usize,
    /// Idle watch streams for the memory measurement.
    #[arg(long, default_value_t = 10_000)]
    rss_watchers: usize,
    /// Watch streams per connection in the memory measurement.
    #[arg(long, default_value_t = 100)]
    watchers_per_connection: usize,
    /// Broker starts timed for the start-up measurement.
    #[arg(long, default_value_t = 10)]
    starts: usize,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    json: bool,
    /// Measure only cache hits against the baseline (for profiling).
    #[arg(long)]
    hits_only: bool,
}

fn main() {
    match std::env::var(ROLE).as_deref() {
        Ok("broker") => run_broker(),
        Ok("baseline") => run_baseline(),
        _ => {
            let cli = Cli::parse();
            let runtime = tokio::runtime::Runtime::new().expect("runtime");
            match cli.mode {
                None => runtime.block_on(benchmark(cli.bench)),
                Some(Mode::Soak(args)) => runtime.block_on(run_soak(args)),
                Some(Mode::Restart(args)) => runtime.block_on(run_restarts(args)),
            }
        }
    }
}

/// This program, re-executed as the broker (`tokenbroker ARGS`).
fn broker_command() -> Command {
    let mut command = Command::new(std::env::current_exe().expect("own path"));
    command.env(ROLE, "broker");
    command
}

async fn run_soak(args: SoakArgs) {
    let config = if args.reduced {
        soak::SoakConfig::reduced()
    } else {
        soak::SoakConfig::full(Duration::from_secs(args.minutes * 60))
    };
    eprintln!(
        "soak: {:?} of load, {} callers, {} watchers, {:?} tokens, a fault every {:?}",
        config.duration, config.callers, config.watchers, config.token_lifetime, config.interval
    );
    eprintln!(
        "{:>6} {:>8} {:>5} {:>7} {:>6} {:>6} {:>8} {:>8} {:>9} {:>9} {:>9}  {:<18} errors",
        "min",
        "RSS MiB",
        "fds",
        "threads",
        "tasks",
        "keys",
        "watchers",
        "hits",
        "p50 us",
        "p99 us",
        "up/s max",
        "fault"
    );
    let report = soak::run(config, broker_command(), |s| {
        eprintln!(
            "{:>6.1} {:>8.1} {:>5} {:>7} {:>6} {:>6} {:>8} {:>8} {:>9} {:>9} {:>4.1} {:>4}  {:<18} {:?}",
            s.t_secs / 60.0,
            s.rss_bytes as f64 / 1048576.0,
            s.fds,
            s.threads,
            s.tasks,
            s.keys,
            s.watchers,
            s.hits,
            s.hit_p50_us,
            s.hit_p99_us,
            s.upstream_rps_mean,
            s.upstream_rps_max,
            s.fault.unwrap_or("-"),
            s.errors
        );
    })
    .await;
    if let Err(error) = plot::draw(&report, &args.plot) {
        eprintln!("soak: cannot draw {}: {error}", args.plot.display());
    }
    if args.json {
        println!("{}", serde_json::to_string(&report).expect("a report"));
    } else {
        println!(
            "{} tokens checked, {} bad; settled in {:.0} s; plot in {}",
            report.tokens_checked,
            report.bad_tokens,
            report.settle_secs,
            args.plot.display()
        );
        for check in &report.checks {
            let verdict = match (check.ok, check.judged) {
                (true, _) => "ok",
                (false, true) => "FAILED",
                (false, false) => "(short)",
            };
            println!("  {:<34} {:<7} {}", check.name, verdict, check.measured);
        }
        for example in &report.bad_examples {
            println!("  bad token: {example}");
        }
        println!("{}", if report.pass { "PASS" } else { "FAIL" });
    }
    if !report.pass {
        std::process::exit(1);
    }
}

async fn run_restarts(args: RestartArgs) {
    let emulator = emulator().await;
    let mut report = serde_json::Map::new();
    for way in [restart::Way::Plain, restart::Way::SocketActivated] {
        let restarts = restart::measure(
            &broker_command,
            &emulator,
            way,
            args.watchers,
            args.keys,
            args.rounds,
        )
        .await;
        let sorted = |value: fn(&restart::Restart) -> f64| {
            let mut values: Vec<f64> = restarts.iter().map(value).collect();
            values.sort_by(f64::total_cmp);
            values
        };
        let first = sorted(|r| r.first_token_ms);
        let waiting = sorted(|r| r.waiting_client_ms);
        let every = sorted(|r| r.every_watcher_ms);
        let (target_first, target_every) = match way {
            restart::Way::Plain => (100.0, 2000.0),
            restart::Way::SocketActivated => (50.0, 2000.0),
        };
        let name = serde_json::to_value(way).expect("a name");
        let name = name.as_str().expect("a string").to_string();
        if !args.json {
            let verdict = |ok: bool| if ok { "ok" } else { "MISSED" };
            let (first_max, every_max) = (first[first.len() - 1], every[every.len() - 1]);
            println!(
                "{name}: {} restarts, {} watchers of {} tokens",
                restarts.len(),
                args.watchers,
                args.keys
            );
            println!(
                "  first token served   median {:>7.1} ms, max {:>7.1} ms after the new process started (target <= {target_first}: {})",
                first[first.len() / 2],
                first_max,
                verdict(first_max <= target_first)
            );
            println!(
                "  waiting client served median {:>7.1} ms, max {:>7.1} ms",
                waiting[waiting.len() / 2],
                waiting[waiting.len() - 1]
            );
            println!(
                "  every watcher served median {:>7.1} ms, max {:>7.1} ms (target <= {target_every}: {})",
                every[every.len() / 2],
                every_max,
                verdict(every_max <= target_every)
            );
        }
        report.insert(
            name,
            serde_json::json!({"restarts": restarts, "watchers": args.watchers, "keys": args.keys}),
        );
    }
    if args.json {
        println!("{}", serde_json::Value::Object(report));
    }
}

// === the child processes ===

/// `tokenbroker serve ...`, exactly as the binary runs it.
fn run_broker() {
    use clap::Parser as _;
    let cli = tokenbroker::config::Cli::parse_from(
        std::iter::once("tokenbroker".to_string()).chain(std::env::args().skip(1)),
    );
    // Before the runtime's threads exist, as the binary does.
    let activation = tokenbroker::systemd::take_activated_listener().expect("activation");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async move {
        let tokenbroker::config::Command::Serve(args) = cli.command else {
            panic!("the broker role runs `serve`");
        };
        let exports = tokenbroker::telemetry::Exports {
            prometheus: args.metrics_addr.is_some(),
            otlp: false,
        };
        let telemetry =
            tokenbroker::telemetry::init(cli.log_format, "info", exports).expect("telemetry");
        tokenbroker::app::serve(args, activation, &telemetry)
            .await
            .expect("broker runs");
    });
}

/// The baseline: the same service on the same kind of socket, answering
/// `GetIdToken` with a fixed token of the given size and nothing else.
fn run_baseline() {
    let mut args = std::env::args().skip(1);
    let socket = PathBuf::from(args.next().expect("socket path"));
    let token_len: usize = args
        .next()
        .expect("token length")
        .parse()
        .expect("a number");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async move {
        let response = IdToken {
            token: "t".repeat(token_len),
            expire_time: Some(std::time::SystemTime::now().into()),
        };
        let listener = tokio::net::UnixListener::bind(&socket).expect("bind baseline socket");
        tonic::transport::Server::builder()
            .add_service(TokenBrokerServer::new(Baseline { response }))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
            .await
            .expect("baseline serves");
    });
}

struct Baseline {
    response: IdToken,
}

#[tonic::async_trait]
impl TokenBroker for Baseline {
    async fn get_access_token(
        &self,
        _: Request<GetAccessTokenRequest>,
    ) -> Result<Response<AccessToken>, Status> {
        Err(Status::unimplemented("baseline"))
    }

    async fn get_id_token(
        &self,
        _: Request<GetIdTokenRequest>,
    ) -> Result<Response<IdToken>, Status> {
        Ok(Response::new(self.response.clone()))
    }

    async fn invalidate_token(
        &self,
        _: Request<InvalidateTokenRequest>,
    ) -> Result<Response<InvalidateTokenResponse>, Status> {
        Err(Status::unimplemented("baseline"))
    }

    type WatchTokenStream = Pin<Box<dyn Stream<Item = Result<Token, Status>> + Send>>;

    async fn watch_token(
        &self,
        _: Request<WatchTokenRequest>,
    ) -> Result<Response<Self::WatchTokenStream>, Status> {
        Err(Status::unimplemented("baseline"))
    }
}

/// A child process serving on a socket; killed when dropped.
struct Server {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Starts a broker against `metadata`; returns it once its socket accepts.
    async fn broker(
        metadata: SocketAddr,
        threads: Option<usize>,
        extra: &[&str],
    ) -> (Server, Duration) {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("broker.sock");
        let mut command = Command::new(std::env::current_exe().expect("own path"));
        command
            .env(ROLE, "broker")
            // Measure the metadata server path, whatever credentials the
            // user running the benchmark has lying around.
            .env_remove("GOOGLE_APPLICATION_CREDENTIALS")
            .env_remove("TOKENBROKER_CREDENTIALS")
            .env_remove("TOKENBROKER_IMPERSONATE")
            .env("CLOUDSDK_CONFIG", dir.path())
            .args(["serve", "--socket"])
            .arg(&socket)
            .args([
                "--metadata-host",
                &metadata.to_string(),
                "--upstream-max-rps",
                "1000000",
                "--upstream-max-concurrency",
                "256",
                "--max-keys",
                "1000000",
                "--max-keys-per-uid",
                "1000000",
                "--max-watchers",
                "1000000",
                "--max-watchers-per-uid",
                "1000000",
            ])
            .args(extra);
        if let Some(threads) = threads {
            command.env("TOKIO_WORKER_THREADS", threads.to_string());
        }
        Self::start(command, socket, dir).await
    }

    async fn baseline(token_len: usize) -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("baseline.sock");
        let mut command = Command::new(std::env::current_exe().expect("own path"));
        command
            .env(ROLE, "baseline")
            .arg(&socket)
            .arg(token_len.to_string());
        Self::start(command, socket, dir).await.0
    }

    /// Spawns and waits for the socket to accept; the time that took.
    async fn start(
        mut command: Command,
        socket: PathBuf,
        dir: tempfile::TempDir,
    ) -> (Server, Duration) {
        let started = Instant::now();
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn server");
        // Polling is the measurement here: the socket is ready when it
        // accepts a connection.
        loop {
            if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "server never became ready"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        let ready = started.elapsed();
        (
            Server {
                child,
                socket,
                _dir: dir,
            },
            ready,
        )
    }

    /// Resident memory of the server process, in bytes.
    fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("proc status");
        let line = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .expect("VmRSS");
        let kib: u64 = line
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .expect("VmRSS value");
        kib * 1024
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// === driving load ===

/// What a load client sends as `:authority`.
#[derive(Clone, Copy, Debug, PartialEq)]
enum ClientAuthority {
    /// `localhost`, as tonic and grpc-go send.
    Localhost,
    /// `localhost` again, through the client-side rewriter that
    /// [`ClientAuthority::SocketPath`] uses.
    RewrittenLocalhost,
    /// The socket path, percent-encoded, as gRPC C-core sends.
    SocketPath,
}

async fn channels(socket: &Path, count: usize) -> Vec<TokenBrokerClient<Channel>> {
    channels_with(socket, count, ClientAuthority::Localhost).await
}

async fn channels_with(
    socket: &Path,
    count: usize,
    authority: ClientAuthority,
) -> Vec<TokenBrokerClient<Channel>> {
    let mut clients = Vec::new();
    for _ in 0..count {
        let endpoint =
            Endpoint::from_shared(format!("unix://{}", socket.display())).expect("endpoint");
        // What the shim puts in each header block, if anything.
        let sent = match authority {
            ClientAuthority::Localhost => None,
            ClientAuthority::RewrittenLocalhost => Some("localhost".to_string()),
            ClientAuthority::SocketPath => {
                Some(socket.to_str().expect("a UTF-8 path").replace('/', "%2F"))
            }
        };
        let channel = match sent {
            None => endpoint.connect().await,
            Some(sent) => {
                let socket = socket.to_path_buf();
                let connector = tower::service_fn(move |_| {
                    let (socket, sent) = (socket.clone(), sent.clone());
                    async move {
                        let stream = tokio::net::UnixStream::connect(socket).await?;
                        let authority = Authority::Bytes(sent.into_bytes());
                        Ok::<_, std::io::Error>(TokioIo::new(AuthorityShim::new(stream, authority)))
                    }
                });
                endpoint.connect_with_connector(connector).await
            }
        };
        clients.push(TokenBrokerClient::new(channel.expect("connect")));
    }
    clients
}

fn audience(i: usize) -> String {
    format!("https://service-{i:05}-abcdefghij-uc.a.run.app")
}

/// Requests per second and latencies of `clients` callers looping over
/// `keys` ID-token keys for `duration`.
#[derive(Default)]
struct Load {
    calls: usize,
    elapsed: Duration,
    latencies_us: Vec<u32>,
}

impl Load {
    fn rps(&self) -> f64 {
        self.calls as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile(&mut self, p: f64) -> f64 {
        self.latencies_us.sort_unstable();
        let index = ((self.latencies_us.len() as f64 - 1.0) * p).round() as usize;
        f64::from(self.latencies_us[index])
    }

    fn mean(&self) -> f64 {
        self.latencies_us.iter().map(|l| f64::from(*l)).sum::<f64>()
            / self.latencies_us.len() as f64
    }

    fn merge(&mut self, other: Load) {
        self.calls += other.calls;
        self.elapsed += other.elapsed;
        self.latencies_us.extend(other.latencies_us);
    }
}

/// Fills a new broker's cache with the keys, then drives it for a second,
/// before it is measured.
async fn warm_up(socket: &Path, args: &Args) {
    warm(socket, 0..args.keys, 100).await;
    let _ = drive(socket, args, Duration::from_secs(1)).await;
}

/// `args.rounds` rounds, each driving every one of `sockets` in turn for
/// `duration` (so that a noisy moment spreads over all): what each
/// sustained.
async fn alternate<const N: usize>(
    sockets: [&Path; N],
    args: &Args,
    duration: Duration,
) -> [Load; N] {
    let mut loads = std::array::from_fn(|_| Load::default());
    for _ in 0..args.rounds.max(1) {
        for (socket, load) in sockets.iter().zip(&mut loads) {
            load.merge(drive(socket, args, duration).await);
        }
    }
    loads
}

async fn drive(socket: &Path, args: &Args, duration: Duration) -> Load {
    drive_with(socket, args, duration, ClientAuthority::Localhost).await
}

async fn drive_with(
    socket: &Path,
    args: &Args,
    duration: Duration,
    authority: ClientAuthority,
) -> Load {
    let clients = channels_with(socket, args.connections, authority).await;
    let requests: Vec<GetIdTokenRequest> = (0..args.keys)
        .map(|i| GetIdTokenRequest {
            audience: audience(i),
            ..Default::default()
        })
        .collect();
    let started = Instant::now();
    let until = started + duration;
    let tasks: Vec<_> = (0..args.clients)
        .map(|c| {
            let mut client = clients[c % clients.len()].clone();
            let requests = requests.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(100_000);
                let mut i = c;
                while Instant::now() < until {
                    let request = requests[i % requests.len()].clone();
                    let sent = Instant::now();
                    client.get_id_token(request).await.expect("a cache hit");
                    latencies.push(sent.elapsed().as_micros() as u32);
                    i += 1;
                }
                latencies
            })
        })
        .collect();
    let mut load = Load::default();
    for task in tasks {
        let latencies = task.await.expect("client task");
        load.calls += latencies.len();
        load.latencies_us.extend(latencies);
    }
    load.elapsed = started.elapsed();
    load
}

/// Fetches every key once, `parallel` at a time.
async fn warm(socket: &Path, keys: impl Iterator<Item = usize>, parallel: usize) -> usize {
    let clients = channels(socket, 8).await;
    let keys: Vec<usize> = keys.collect();
    let mut token_len = 0;
    for chunk in keys.chunks(parallel) {
        let calls = chunk.iter().enumerate().map(|(n, i)| {
            let mut client = clients[n % clients.len()].clone();
            let request = GetIdTokenRequest {
                audience: audience(*i),
                ..Default::default()
            };
            async move {
                client
                    .get_id_token(request)
                    .await
                    .expect("warm-up fetch")
                    .into_inner()
                    .token
                    .len()
            }
        });
        token_len = *futures_util::future::join_all(calls)
            .await
            .iter()
            .max()
            .unwrap_or(&0);
    }
    token_len
}

// === the run ===

/// The metadata server emulator, on this process's runtime.
async fn emulator() -> Emulator {
    Emulator::start(
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        EmulatorConfig::default(),
    )
    .await
    .expect("emulator")
}

/// A cgroup named as kubelet names a pod's (cgroup v2, cgroupfs driver),
/// which the emulator's fake Kubernetes API knows as a pod whose service
/// account maps to [`POD_ACCOUNT`]; once joined, this process is in it
/// until dropped.
struct InPod {
    created: Vec<PathBuf>,
    leaf: PathBuf,
    home: PathBuf,
    dir: tempfile::TempDir,
}

/// The Google service account the benchmark's pod is served as.
const POD_ACCOUNT: &str = "loadgen@emulator-project.iam.gserviceaccount.com";
/// The node the benchmark's pod runs on.
const POD_NODE: &str = "loadgen-node";

impl InPod {
    /// Makes a new pod's cgroup, or says why it cannot.
    fn create(emulator: &Emulator) -> Option<InPod> {
        let skip = |why: &str| {
            eprintln!("loadgen: the pod peer's hit path is not measured: {why}");
            None
        };
        if !nix::unistd::geteuid().is_root() {
            return skip("creating a pod cgroup needs root");
        }
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let Some(root) = mounts.lines().find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(fields[1]))
        }) else {
            return skip("no cgroup v2 hierarchy is mounted");
        };
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let Some(home) = own.lines().find_map(|line| line.strip_prefix("0::")) else {
            return skip("this process is in no cgroup v2 cgroup");
        };
        let home = root.join(home.trim_start_matches('/'));
        let uid = format!("00000000-0000-4000-8000-{:012x}", std::process::id());
        // Made before the cgroups, so that those made are removed (on
        // drop) whatever fails.
        let mut pod = InPod {
            created: Vec::new(),
            leaf: root,
            home,
            dir: tempfile::tempdir().expect("temp dir"),
        };
        for segment in ["kubepods", "besteffort", &format!("pod{uid}"), "loadgen"] {
            pod.leaf.push(segment);
            if !pod.leaf.exists() {
                if let Err(error) = std::fs::create_dir(&pod.leaf) {
                    return skip(&format!("cannot create {}: {error}", pod.leaf.display()));
                }
                pod.created.push(pod.leaf.clone());
            }
        }
        emulator.allow_impersonation(POD_ACCOUNT);
        let annotation = (
            "iam.gke.io/gcp-service-account".to_string(),
            POD_ACCOUNT.to_string(),
        );
        emulator.put_service_account("bench", "loadgen", [annotation].into());
        emulator.add_pod(FakePod {
            namespace: "bench".into(),
            name: "loadgen".into(),
            uid: Some(uid),
            node: POD_NODE.into(),
            service_account: "loadgen".into(),
        });
        Some(pod)
    }

    /// Moves this process into the pod's cgroup.
    fn join(&self) {
        let procs = self.leaf.join("cgroup.procs");
        std::fs::write(&procs, std::process::id().to_string())
            .unwrap_or_else(|error| panic!("cannot join {}: {error}", procs.display()));
    }

    /// The flags of a broker serving this pod.
    fn broker_flags(&self, emulator: &Emulator) -> Vec<String> {
        let kubeconfig = self.dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, emulator.kubeconfig()).expect("kubeconfig written");
        vec![
            "--workload-identity".into(),
            "kubernetes".into(),
            "--kubeconfig".into(),
            kubeconfig.display().to_string(),
            "--node-name".into(),
            POD_NODE.into(),
            "--iam-endpoint".into(),
            emulator.iam_endpoint(),
        ]
    }
}

impl Drop for InPod {
    fn drop(&mut self) {
        let _ = std::fs::write(
            self.home.join("cgroup.procs"),
            std::process::id().to_string(),
        );
        for dir in self.created.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Waits (10 s at most) until the broker on `socket` serves, as its gRPC
/// health says: a workload identity broker first reads the node's pods.
async fn wait_until_serving(socket: &Path) {
    use tonic_health::ServingStatus;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;

    let endpoint = Endpoint::from_shared(format!("unix://{}", socket.display())).expect("endpoint");
    let mut health = HealthClient::new(endpoint.connect().await.expect("connect"));
    let request = HealthCheckRequest {
        service: "tokenbroker.v1.TokenBroker".into(),
    };
    let mut statuses = health
        .watch(request)
        .await
        .expect("a health watch")
        .into_inner();
    let serving = async {
        while let Some(status) = statuses.message().await.expect("health statuses") {
            if status.status == ServingStatus::Serving as i32 {
                return;
            }
        }
        panic!("the health watch ended");
    };
    tokio::time::timeout(Duration::from_secs(10), serving)
        .await
        .expect("the broker in the pod never served");
}

/// A FIFO for the broker's audit log, read at a fixed, slow rate by a
/// thread of its own.
struct SlowPipe {
    _dir: tempfile::TempDir,
    path: String,
    read: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl SlowPipe {
    fn start(bytes_per_second: usize) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("audit.fifo");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .expect("a FIFO");
        let read = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = read.clone();
        let reading = path.clone();
        std::thread::spawn(move || {
            use std::io::Read;
            // Blocks until the broker opens its end.
            let Ok(mut fifo) = std::fs::File::open(&reading) else {
                return;
            };
            let chunk = bytes_per_second / 16;
            let mut buffer = vec![0; chunk];
            while let Ok(n) = fifo.read(&mut buffer) {
                if n == 0 {
                    return;
                }
                counted.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(1000 / 16));
            }
        });
        Self {
            path: path.display().to_string(),
            _dir: dir,
            read,
        }
    }

    fn path(&self) -> &str {
        &self.path
    }

    fn bytes_read(&self) -> u64 {
        self.read.load(std::sync::atomic::Ordering::Relaxed)
    }
}

async fn benchmark(args: Args) {
    let emulator = emulator().await;
    let metadata = emulator.addr();
    let mut report: HashMap<&str, serde_json::Value> = HashMap::new();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    report.insert("cores", cores.into());
    eprintln!(
        "loadgen: {cores} cores, {} clients on {} connections, {} keys",
        args.clients, args.connections, args.keys
    );

    // Start-up: from spawn to a socket that accepts.
    let mut starts = Vec::new();
    for _ in 0..args.starts {
        let (_broker, ready) = Server::broker(metadata, None, &[]).await;
        starts.push(ready);
    }
    starts.sort();
    let start_ms = starts[starts.len() / 2].as_secs_f64() * 1000.0;
    report.insert("start_to_ready_ms", start_ms.into());

    // Cache hits against the baseline, alternating rounds.
    let (broker, _) = Server::broker(metadata, None, &[]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle_rss = broker.rss();
    report.insert("idle_rss_mib", (idle_rss as f64 / 1048576.0).into());
    let token_len = warm(&broker.socket, 0..args.keys, 100).await;
    let baseline = Server::baseline(token_len).await;
    let (path, rewritten) = (
        ClientAuthority::SocketPath,
        ClientAuthority::RewrittenLocalhost,
    );
    let _ = drive(&broker.socket, &args, Duration::from_secs(1)).await;
    let _ = drive_with(&broker.socket, &args, Duration::from_secs(1), path).await;
    let _ = drive(&baseline.socket, &args, Duration::from_secs(1)).await;
    let _ = drive_with(&baseline.socket, &args, Duration::from_secs(1), rewritten).await;
    let (mut on_broker, mut on_baseline) = (Load::default(), Load::default());
    let (mut on_broker_path, mut on_baseline_rewritten) = (Load::default(), Load::default());
    for _ in 0..args.rounds.max(1) {
        on_broker.merge(drive(&broker.socket, &args, args.duration).await);
        on_baseline.merge(drive(&baseline.socket, &args, args.duration).await);
        on_broker_path.merge(drive_with(&broker.socket, &args, args.duration, path).await);
        on_baseline_rewritten
            .merge(drive_with(&baseline.socket, &args, args.duration, rewritten).await);
    }
    let (path_rps, rewritten_rps) = (on_broker_path.rps(), on_baseline_rewritten.rps());
    report.insert("broker_path_authority_rps", path_rps.round().into());
    report.insert(
        "baseline_rewriting_client_rps",
        rewritten_rps.round().into(),
    );
    report.insert(
        "rps_ratio_path_authority",
        round3(path_rps / rewritten_rps).into(),
    );
    let path_p50 = on_broker_path.percentile(0.5);
    let rewritten_p50 = on_baseline_rewritten.percentile(0.5);
    report.insert("broker_path_authority_p50_us", path_p50.into());
    report.insert("baseline_rewriting_client_p50_us", rewritten_p50.into());
    let (broker_rps, baseline_rps) = (on_broker.rps(), on_baseline.rps());
    let (broker_p50, broker_p99) = (on_broker.percentile(0.5), on_broker.percentile(0.99));
    let (baseline_p50, baseline_p99) = (on_baseline.percentile(0.5), on_baseline.percentile(0.99));
    report.insert("broker_rps", broker_rps.round().into());
    report.insert("baseline_rps", baseline_rps.round().into());
    report.insert("rps_ratio", round3(broker_rps / baseline_rps).into());
    report.insert("broker_p50_us", broker_p50.into());
    report.insert("broker_p99_us", broker_p99.into());
    report.insert("baseline_p50_us", baseline_p50.into());
    report.insert("baseline_p99_us", baseline_p99.into());
    report.insert("p50_ratio", round3(broker_p50 / baseline_p50).into());
    report.insert(
        "p50_ratio_path_authority",
        round3(path_p50 / rewritten_p50).into(),
    );
    report.insert("broker_mean_us", on_broker.mean().round().into());
    report.insert("baseline_mean_us", on_baseline.mean().round().into());

    // The audit log on, written to a pipe read at 64 KiB/s: far slower than
    // the hits come, so lines are dropped, and no hit may wait for them.
    let pipe = SlowPipe::start(64 * 1024);
    let audit_flags = ["--audit-log", pipe.path()];
    let (audited, _) = Server::broker(metadata, None, &audit_flags).await;
    warm_up(&audited.socket, &args).await;
    let sockets = [&*audited.socket, &baseline.socket];
    let [on_audited, on_baseline_again] = alternate(sockets, &args, args.duration).await;
    report.insert("broker_audited_rps", on_audited.rps().round().into());
    report.insert(
        "rps_ratio_audit",
        round3(on_audited.rps() / on_baseline_again.rps()).into(),
    );
    report.insert("audit_bytes_read", pipe.bytes_read().into());
    drop(audited);

    // A peer in a pod (workload identity): this process moves into a cgroup
    // named as kubelet names a pod's, and drives a broker that follows the
    // emulator's fake Kubernetes API, against the host peer's broker and
    // the baseline in alternating rounds. Root only.
    if let Some(pod) = InPod::create(&emulator) {
        let flags = pod.broker_flags(&emulator);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let (in_pod, _) = Server::broker(metadata, None, &flags).await;
        pod.join();
        wait_until_serving(&in_pod.socket).await;
        warm_up(&in_pod.socket, &args).await;
        let sockets = [&*in_pod.socket, &broker.socket, &baseline.socket];
        let [on_pod, on_host, on_baseline_pod] = alternate(sockets, &args, args.duration).await;
        report.insert("broker_pod_rps", on_pod.rps().round().into());
        report.insert(
            "rps_ratio_pod",
            round3(on_pod.rps() / on_baseline_pod.rps()).into(),
        );
        report.insert(
            "pod_to_host_rps_ratio",
            round3(on_pod.rps() / on_host.rps()).into(),
        );
        drop(in_pod);
        drop(pod);
    }

    // One caller at a time: the latency of a single call, not of a queue.
    let single = Args {
        clients: 1,
        connections: 1,
        ..args.clone()
    };
    let sockets = [&*broker.socket, &baseline.socket];
    let [mut alone_broker, mut alone_baseline] =
        alternate(sockets, &single, args.duration / 2).await;
    let (alone_broker_p50, alone_baseline_p50) =
        (alone_broker.percentile(0.5), alone_baseline.percentile(0.5));
    report.insert("single_client_broker_p50_us", alone_broker_p50.into());
    report.insert("single_client_baseline_p50_us", alone_baseline_p50.into());
    report.insert(
        "single_client_p50_ratio",
        round3(alone_broker_p50 / alone_baseline_p50).into(),
    );
    drop(baseline);
    if args.hits_only {
        print_report(report, args.json, print_hits);
        return;
    }

    report.insert("token_bytes", token_len.into());

    // A cold-miss storm on one key.
    emulator.set_fault(Some(FaultRule::always(Fault::Delay { millis: 50 })));
    let before = emulator.stats().identity_requests;
    let storm_clients = channels(&broker.socket, 16).await;
    let calls = (0..args.storm).map(|n| {
        let mut client = storm_clients[n % storm_clients.len()].clone();
        let request = GetIdTokenRequest {
            audience: "https://storm.run.app".into(),
            ..Default::default()
        };
        async move { client.get_id_token(request).await.is_ok() }
    });
    let served = futures_util::future::join_all(calls)
        .await
        .iter()
        .filter(|ok| **ok)
        .count();
    emulator.set_fault(None);
    report.insert("storm_requests", args.storm.into());
    report.insert("storm_served", served.into());
    report.insert(
        "storm_upstream_calls",
        (emulator.stats().identity_requests - before).into(),
    );

    // Memory: many cached keys, then many idle watch streams.
    let before_keys = broker.rss();
    warm(&broker.socket, args.keys..args.keys + args.rss_keys, 64).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let per_key = (broker.rss().saturating_sub(before_keys)) as f64 / args.rss_keys as f64;
    report.insert("rss_per_key_bytes", per_key.round().into());
    report.insert(
        "rss_per_key_beyond_token_bytes",
        (per_key - token_len as f64).round().into(),
    );

    let before_watchers = broker.rss();
    let per_connection = args.watchers_per_connection.max(1);
    let watch_clients = channels(&broker.socket, args.rss_watchers.div_ceil(per_connection)).await;
    let mut streams = Vec::with_capacity(args.rss_watchers);
    for n in 0..args.rss_watchers {
        let mut client = watch_clients[n / per_connection].clone();
        let request = WatchTokenRequest {
            request: Some(watch_token_request::Request::IdToken(GetIdTokenRequest {
                audience: audience(n % args.keys),
                ..Default::default()
            })),
        };
        let mut stream = client
            .watch_token(request)
            .await
            .expect("watch")
            .into_inner();
        stream
            .message()
            .await
            .expect("first token")
            .expect("a token");
        streams.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let per_watcher =
        (broker.rss().saturating_sub(before_watchers)) as f64 / args.rss_watchers as f64;
    report.insert("rss_per_watcher_bytes", per_watcher.round().into());
    // Each stream keeps the last token it was sent in its encode buffer.
    report.insert(
        "rss_per_watcher_beyond_token_bytes",
        (per_watcher - token_len as f64).round().into(),
    );
    report.insert(
        "rss_with_keys_and_watchers_mib",
        (broker.rss() as f64 / 1048576.0).into(),
    );
    drop(streams);
    drop(broker);

    // Scaling: the same hit load on brokers with 1 and 2 worker threads.
    for threads in [1, 2] {
        let (broker, _) = Server::broker(metadata, Some(threads), &[]).await;
        warm(&broker.socket, 0..args.keys, 100).await;
        let load = drive(&broker.socket, &args, args.duration).await;
        report.insert(
            if threads == 1 {
                "rps_1_worker"
            } else {
                "rps_2_workers"
            },
            load.rps().round().into(),
        );
    }

    print_report(report, args.json, print_tables);
}

/// One JSON object, or the tables `tables` prints.
fn print_report(
    report: HashMap<&str, serde_json::Value>,
    json: bool,
    tables: fn(&HashMap<&str, serde_json::Value>),
) {
    if json {
        let ordered: serde_json::Map<String, serde_json::Value> = report
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        println!("{}", serde_json::Value::Object(ordered));
    } else {
        tables(&report);
    }
}

fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

fn print_hits(report: &HashMap<&str, serde_json::Value>) {
    let get = |key: &str| report[key].as_f64().unwrap_or(0.0);
    let verdict = |ok: bool| if ok { "ok" } else { "MISSED" };
    println!("cache hits vs a bare gRPC call ({} cores)", get("cores"));
    println!("  {:<10} {:>10} {:>9} {:>9}", "", "rps", "p50 us", "p99 us");
    println!(
        "  {:<10} {:>10} {:>9} {:>9}",
        "broker",
        get("broker_rps"),
        get("broker_p50_us"),
        get("broker_p99_us")
    );
    println!(
        "  {:<10} {:>10} {:>9} {:>9}",
        "baseline",
        get("baseline_rps"),
        get("baseline_p50_us"),
        get("baseline_p99_us")
    );
    println!("  with the client's header blocks rewritten on the way out:");
    println!(
        "  {:<10} {:>10} {:>9}    (the socket path as :authority, as gRPC C-core sends)",
        "broker",
        get("broker_path_authority_rps"),
        get("broker_path_authority_p50_us"),
    );
    println!(
        "  {:<10} {:>10} {:>9}    (localhost)",
        "baseline",
        get("baseline_rewriting_client_rps"),
        get("baseline_rewriting_client_p50_us"),
    );
    println!(
        "  throughput ratio {:.3} (target >= 0.90: {})",
        get("rps_ratio"),
        verdict(get("rps_ratio") >= 0.9)
    );
    println!(
        "  throughput ratio {:.3} with --audit-log on a pipe read at 64 KiB/s (target >= 0.85: {})",
        get("rps_ratio_audit"),
        verdict(get("rps_ratio_audit") >= 0.85)
    );
    if let Some(ratio) = report.get("rps_ratio_pod").and_then(|v| v.as_f64()) {
        println!(
            "  throughput ratio {:.3} from a peer in a pod, workload identity on (target >= 0.90: {}); {:.3} of the host peer's",
            ratio,
            verdict(ratio >= 0.9),
            get("pod_to_host_rps_ratio"),
        );
    }
    println!(
        "  throughput ratio {:.3} with the socket path as :authority (target >= 0.90: {})",
        get("rps_ratio_path_authority"),
        verdict(get("rps_ratio_path_authority") >= 0.9)
    );
    println!(
        "  p50 ratio        {:.3} (target <= 1.10: {}); {:.3} with the socket path",
        get("p50_ratio"),
        verdict(get("p50_ratio") <= 1.1),
        get("p50_ratio_path_authority"),
    );
    println!(
        "  mean latency     broker {} us, baseline {} us",
        get("broker_mean_us"),
        get("baseline_mean_us")
    );
    println!(
        "  one client alone: p50 broker {} us, baseline {} us, ratio {:.3}",
        get("single_client_broker_p50_us"),
        get("single_client_baseline_p50_us"),
        get("single_client_p50_ratio")
    );
}

fn print_tables(report: &HashMap<&str, serde_json::Value>) {
    let get = |key: &str| report[key].as_f64().unwrap_or(0.0);
    let verdict = |ok: bool| if ok { "ok" } else { "MISSED" };
    print_hits(report);
    println!();
    println!(
        "cold-miss storm: {} requests for one key -> {} upstream call(s), {} served (target 1: {})",
        get("storm_requests"),
        get("storm_upstream_calls"),
        get("storm_served"),
        verdict(get("storm_upstream_calls") == 1.0)
    );
    println!(
        "start to ready: {:.1} ms median (target <= 50: {})",
        get("start_to_ready_ms"),
        verdict(get("start_to_ready_ms") <= 50.0)
    );
    println!(
        "idle RSS: {:.1} MiB (target <= 15: {})",
        get("idle_rss_mib"),
        verdict(get("idle_rss_mib") <= 15.0)
    );
    println!(
        "RSS per cached key: {} B, {} B beyond the {} B token (target <= 2048: {})",
        get("rss_per_key_bytes"),
        get("rss_per_key_beyond_token_bytes"),
        get("token_bytes"),
        verdict(get("rss_per_key_beyond_token_bytes") <= 2048.0)
    );
    println!(
        "RSS per idle watcher: {} B, {} B beyond the {} B token it was last sent (target <= 2048: {})",
        get("rss_per_watcher_bytes"),
        get("rss_per_watcher_beyond_token_bytes"),
        get("token_bytes"),
        verdict(get("rss_per_watcher_beyond_token_bytes") <= 2048.0)
    );
    println!(
        "scaling: {} rps with 1 worker thread, {} rps with 2",
        get("rps_1_worker"),
        get("rps_2_workers")
    );
}
