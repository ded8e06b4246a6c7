//! The soak: the broker under months of life squeezed into minutes. Tokens
//! live [`SoakConfig::token_lifetime`] (so a run sees many refresh
//! generations), and at the same time callers hit cached keys, new keys
//! come and idle out, thousands of watch streams follow tokens (some closed
//! and reopened every interval), clients hand tokens back with
//! `InvalidateToken`, and the metadata server misbehaves once an interval.
//!
//! Every token any client receives is checked: not expired, not within the
//! expiry skew, for the audience or scopes and account asked for. Each
//! interval yields a [`Sample`] of the broker's process and gauges; the end
//! yields a [`SoakReport`] with the leak checks and a verdict.
//!
//! `loadgen soak` runs it at full scale; `tests/it/soak.rs` runs it in CI
//! at a reduced one. Both start the real broker as a child process.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde::Serialize;
use tokenbroker::emulator::{DEFAULT_ACCOUNT, Emulator, EmulatorConfig, Fault, FaultRule};
use tokenbroker::proto::v1::token_broker_client::TokenBrokerClient;
use tokenbroker::proto::v1::{
    GetAccessTokenRequest, GetIdTokenRequest, InvalidateTokenRequest, WatchTokenRequest,
    invalidate_token_request, token, watch_token_request,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

/// How big and how long a soak is.
#[derive(Clone, Debug, Serialize)]
pub struct SoakConfig {
    /// How long the load runs.
    pub duration: Duration,
    /// How often a sample is taken, 5 % of the watchers reopen, and a fault
    /// starts.
    pub interval: Duration,
    /// How long each fault lasts (the hang delays each answer this long).
    pub fault_window: Duration,
    /// Lifetime of the emulator's tokens.
    pub token_lifetime: Duration,
    /// The broker's `--expiry-skew`: no token closer to expiry is handed out.
    pub expiry_skew: Duration,
    /// The broker's `--idle-timeout`: churned keys go after this.
    pub idle_timeout: Duration,
    /// The broker's `--upstream-max-rps`.
    pub upstream_max_rps: u32,
    /// The broker's `--upstream-timeout` (shorter than the hang).
    pub upstream_timeout: Duration,
    /// The broker's `--invalidate-interval`.
    pub invalidate_interval: Duration,
    /// Callers on cached keys.
    pub callers: usize,
    /// Calls per second of each caller.
    pub caller_rps: u32,
    /// Connections the callers share.
    pub caller_connections: usize,
    /// Keys the callers and the watchers use, all through the run.
    pub cached_keys: usize,
    /// Keys whose tokens are handed back with `InvalidateToken`, in turn
    /// (watched, but not called: a caller of a key whose token was just
    /// dropped waits for the next fetch, which is no cache hit).
    pub invalidated_keys: usize,
    /// A new key every this long (asked for twice, then left to idle out).
    pub churn_every: Duration,
    /// Open watch streams.
    pub watchers: usize,
    /// Watch streams per connection.
    pub watchers_per_connection: usize,
    /// Percentage of the watch streams closed and reopened each interval.
    pub reopen_percent: usize,
    /// An `InvalidateToken` call this often, round-robin over the
    /// invalidated keys.
    pub invalidate_every: Duration,
    /// The longest wait, after the load stops, for keys to idle out and
    /// descriptors and tasks to come back to their baseline.
    pub settle_within: Duration,
    /// Samples before this are left out of the RSS slope.
    pub warm_up: Duration,
}

impl SoakConfig {
    /// The full soak of `duration`: 64 callers, 5 000 watchers, 2-minute
    /// tokens, a fault every minute.
    pub fn full(duration: Duration) -> Self {
        Self {
            duration,
            interval: Duration::from_secs(60),
            fault_window: Duration::from_secs(20),
            token_lifetime: Duration::from_secs(120),
            expiry_skew: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            upstream_max_rps: 20,
            upstream_timeout: Duration::from_secs(5),
            invalidate_interval: Duration::from_secs(30),
            callers: 64,
            caller_rps: 20,
            caller_connections: 8,
            cached_keys: 100,
            invalidated_keys: 40,
            churn_every: Duration::from_millis(200),
            watchers: 5000,
            watchers_per_connection: 100,
            reopen_percent: 5,
            invalidate_every: Duration::from_secs(1),
            // The idle timeout, then the upstream pool's 30 s idle timeout.
            settle_within: Duration::from_secs(60 + 30 + 30),
            warm_up: Duration::from_secs(180).min(duration / 5),
        }
    }

    /// The soak CI runs: a minute, a fault every 10 s, 20-second tokens.
    pub fn reduced() -> Self {
        Self {
            duration: Duration::from_secs(60),
            interval: Duration::from_secs(10),
            fault_window: Duration::from_secs(4),
            token_lifetime: Duration::from_secs(20),
            expiry_skew: Duration::from_secs(3),
            idle_timeout: Duration::from_secs(5),
            upstream_timeout: Duration::from_secs(2),
            invalidate_interval: Duration::from_secs(1),
            callers: 8,
            caller_connections: 2,
            cached_keys: 10,
            invalidated_keys: 4,
            watchers: 200,
            watchers_per_connection: 50,
            invalidate_every: Duration::from_millis(500),
            settle_within: Duration::from_secs(5 + 30 + 30),
            warm_up: Duration::from_secs(10),
            ..Self::full(Duration::from_secs(60))
        }
    }

    /// The faults, in the order the intervals get them.
    fn faults(&self) -> [(&'static str, FaultRule); 5] {
        let window = |fault| FaultRule::always(fault);
        [
            (
                "503 burst",
                FaultRule {
                    times: Some(30),
                    ..window(Fault::Status {
                        status: 503,
                        retry_after_secs: None,
                    })
                },
            ),
            (
                "hang",
                window(Fault::Delay {
                    millis: self.fault_window.as_millis() as u64,
                }),
            ),
            (
                "429 Retry-After",
                window(Fault::Status {
                    status: 429,
                    retry_after_secs: Some(2),
                }),
            ),
            ("garbage", window(Fault::Garbage)),
            ("connection reset", window(Fault::Reset)),
        ]
    }
}

/// The broker and its clients, one interval.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Sample {
    /// Seconds since the load started.
    pub t_secs: f64,
    /// The broker's resident memory.
    pub rss_bytes: u64,
    /// The broker's open file descriptors.
    pub fds: u64,
    /// The broker's threads.
    pub threads: u64,
    /// `tokenbroker_runtime_tasks`.
    pub tasks: u64,
    /// `tokenbroker_cache_entries`, both kinds.
    pub keys: u64,
    /// `tokenbroker_watchers`, both kinds.
    pub watchers: u64,
    /// `tokenbroker_open_connections`.
    pub connections: u64,
    /// Calls on cached keys this interval.
    pub hits: u64,
    /// Their median latency.
    pub hit_p50_us: u32,
    /// Their 99th percentile latency.
    pub hit_p99_us: u32,
    /// Tokens the watchers received this interval.
    pub watch_tokens: u64,
    /// Failed calls this interval, by gRPC code.
    pub errors: BTreeMap<String, u64>,
    /// Requests the metadata server saw per second, on average.
    pub upstream_rps_mean: f64,
    /// The most it saw in any one second.
    pub upstream_rps_max: u64,
    /// Bad tokens so far (must stay 0).
    pub bad_tokens: u64,
    /// The fault of this interval.
    pub fault: Option<&'static str>,
}

/// When a fault started, for the plot.
#[derive(Clone, Debug, Serialize)]
pub struct FaultMark {
    /// Seconds since the load started.
    pub t_secs: f64,
    /// Which fault.
    pub name: &'static str,
}

/// The broker's descriptors, tasks and gauges at one moment.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Footprint {
    /// Open file descriptors.
    pub fds: u64,
    /// Tasks alive on its runtime.
    pub tasks: u64,
    /// Keys held.
    pub keys: u64,
    /// Open watch streams.
    pub watchers: u64,
}

/// What a soak found.
#[derive(Clone, Debug, Serialize)]
pub struct SoakReport {
    /// How it was run.
    pub config: SoakConfig,
    /// One per interval.
    pub samples: Vec<Sample>,
    /// The faults, as they started.
    pub faults: Vec<FaultMark>,
    /// The broker before the load.
    pub baseline: Footprint,
    /// The broker after the load stopped and keys idled out.
    pub settled: Footprint,
    /// How long settling took.
    pub settle_secs: f64,
    /// Resident memory growth after warm-up, MiB per hour (least squares).
    pub rss_slope_mib_per_hour: f64,
    /// Hit p99 while a fault was on.
    pub hit_p99_faulted_us: u32,
    /// Hit p99 while no fault was on.
    pub hit_p99_calm_us: u32,
    /// The most upstream requests in any one second of the run.
    pub upstream_rps_max: u64,
    /// Every token checked, and the bad ones.
    pub tokens_checked: u64,
    /// Tokens expired, within the skew, or for the wrong key (must be 0).
    pub bad_tokens: u64,
    /// What was wrong with the first few bad tokens (never the token).
    pub bad_examples: Vec<String>,
    /// Failed calls over the run, by gRPC code.
    pub errors: BTreeMap<String, u64>,
    /// Each target, and whether it was met.
    pub checks: Vec<Check>,
    /// Whether every check passed.
    pub pass: bool,
    /// The broker's log, for a failure's post-mortem.
    pub broker_log: PathBuf,
}

/// One target of the soak.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    /// What is checked.
    pub name: &'static str,
    /// Whether it held.
    pub ok: bool,
    /// Whether the run was long enough to judge it (the RSS slope needs
    /// minutes after warm-up); one that is not does not fail the run.
    pub judged: bool,
    /// The measured value, in words.
    pub measured: String,
}

/// The RSS slope is judged only over at least this long after warm-up.
const MIN_SLOPE_SPAN: Duration = Duration::from_secs(10 * 60);

/// Runs a soak against a broker started by `broker`, a command that runs
/// `tokenbroker` (flags are appended: `serve --socket ...`). `each` sees
/// every sample as it is taken.
pub async fn run(
    config: SoakConfig,
    broker: std::process::Command,
    mut each: impl FnMut(&Sample),
) -> SoakReport {
    // The emulator gets a runtime of its own: on the clients' busy one, it
    // would note requests late and bunched, and see rates that never were.
    let emulator_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("the emulator's runtime");
    let emulator = emulator_runtime
        .spawn(Emulator::start(
            SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            EmulatorConfig {
                access_token_lifetime: config.token_lifetime,
                id_token_lifetime: config.token_lifetime,
                ..EmulatorConfig::default()
            },
        ))
        .await
        .expect("the emulator's task")
        .expect("emulator starts");
    let emulator = Arc::new(emulator);
    let dir = tempfile::tempdir().expect("temp dir");
    let process = BrokerProcess::start(broker, &config, &emulator, dir.path()).await;
    let baseline = process.footprint().await;

    let state = Arc::new(Shared::default());
    let stop = CancellationToken::new();
    let load = Load::start(&config, &process.socket, &state, &emulator, &stop).await;

    let started = Instant::now();
    let mut samples = Vec::new();
    let mut faults = Vec::new();
    let mut arrivals_seen = started;
    for (n, (name, rule)) in config.faults().into_iter().cycle().enumerate() {
        let interval_start = started + config.interval * n as u32;
        if interval_start >= started + config.duration {
            break;
        }
        // The fault starts a quarter into the interval and ends within it.
        tokio::time::sleep_until((interval_start + config.interval / 4).into()).await;
        emulator.set_fault(Some(rule));
        state.faulted.store(true, Ordering::Relaxed);
        faults.push(FaultMark {
            t_secs: started.elapsed().as_secs_f64(),
            name,
        });
        tokio::time::sleep(config.fault_window).await;
        emulator.set_fault(None);
        state.faulted.store(false, Ordering::Relaxed);
        tokio::time::sleep_until((interval_start + config.interval).into()).await;

        load.reopen_some(config.reopen_percent);
        let upstream = upstream_rates(&emulator, arrivals_seen, config.interval);
        arrivals_seen = Instant::now();
        let sample = process.sample(started, &state, upstream, Some(name)).await;
        each(&sample);
        samples.push(sample);
    }

    stop.cancel();
    load.stop().await;
    emulator.set_fault(None);
    let settling = Instant::now();
    let settled = loop {
        let now = process.footprint().await;
        let back = now.keys == 0
            && now.watchers == 0
            && now.fds <= baseline.fds
            && now.tasks <= baseline.tasks;
        if back || settling.elapsed() >= config.settle_within {
            break now;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let settle_secs = settling.elapsed().as_secs_f64();
    let log = process.log.clone();
    drop(process);
    drop(emulator);
    emulator_runtime.shutdown_background();
    // Keep the log for the report's reader.
    let _ = dir.keep();

    let tally = state.tally.lock().expect("tally").clone();
    let upstream_rps_max = samples
        .iter()
        .map(|s| s.upstream_rps_max)
        .max()
        .unwrap_or(0);
    let rss_slope_mib_per_hour = slope(
        samples
            .iter()
            .filter(|s| s.t_secs >= config.warm_up.as_secs_f64())
            .map(|s| (s.t_secs / 3600.0, s.rss_bytes as f64 / 1048576.0)),
    );
    let (mut faulted, mut calm) = (tally.faulted_latencies, tally.calm_latencies);
    let hit_p99_faulted_us = percentile(&mut faulted, 0.99);
    let hit_p99_calm_us = percentile(&mut calm, 0.99);
    let checks = vec![
        Check {
            name: "no bad token",
            ok: tally.bad_tokens == 0,
            judged: true,
            measured: format!(
                "{} bad of {} checked",
                tally.bad_tokens, tally.tokens_checked
            ),
        },
        Check {
            name: "upstream rate within the limit",
            ok: upstream_rps_max <= u64::from(config.upstream_max_rps),
            judged: true,
            measured: format!(
                "at most {upstream_rps_max} requests in a second (limit {})",
                config.upstream_max_rps
            ),
        },
        Check {
            name: "descriptors back to baseline",
            ok: settled.fds <= baseline.fds,
            judged: true,
            measured: format!("{} -> {}", baseline.fds, settled.fds),
        },
        Check {
            name: "tasks back to baseline",
            ok: settled.tasks <= baseline.tasks,
            judged: true,
            measured: format!("{} -> {}", baseline.tasks, settled.tasks),
        },
        Check {
            name: "keys and watchers gone",
            ok: settled.keys == 0 && settled.watchers == 0,
            judged: true,
            measured: format!("{} keys, {} watchers", settled.keys, settled.watchers),
        },
        Check {
            name: "RSS slope under 1 MiB/hour",
            ok: rss_slope_mib_per_hour < 1.0,
            judged: config.duration.saturating_sub(config.warm_up) >= MIN_SLOPE_SPAN,
            measured: format!("{rss_slope_mib_per_hour:.2} MiB/hour"),
        },
        Check {
            name: "hit p99 under faults within 2x",
            ok: f64::from(hit_p99_faulted_us) <= 2.0 * f64::from(hit_p99_calm_us.max(1)),
            judged: true,
            measured: format!("{hit_p99_faulted_us} us vs {hit_p99_calm_us} us"),
        },
    ];
    SoakReport {
        pass: checks.iter().all(|check| check.ok || !check.judged),
        checks,
        config,
        samples,
        faults,
        baseline,
        settled,
        settle_secs,
        rss_slope_mib_per_hour,
        hit_p99_faulted_us,
        hit_p99_calm_us,
        upstream_rps_max,
        tokens_checked: tally.tokens_checked,
        bad_tokens: tally.bad_tokens,
        bad_examples: tally.bad_examples,
        errors: tally.errors_total,
        broker_log: log,
    }
}

// === the broker process ===

/// The broker child, with what it takes to observe it.
struct BrokerProcess {
    child: std::process::Child,
    socket: PathBuf,
    metrics: SocketAddr,
    log: PathBuf,
}

impl BrokerProcess {
    async fn start(
        mut command: std::process::Command,
        config: &SoakConfig,
        emulator: &Emulator,
        dir: &Path,
    ) -> Self {
        let socket = dir.join("broker.sock");
        let log = dir.join("broker.log");
        let metrics = free_port();
        let secs = |d: Duration| format!("{}ms", d.as_millis());
        command
            // Measure the metadata server path, whatever credentials the
            // user running the benchmark has lying around.
            .env_remove("GOOGLE_APPLICATION_CREDENTIALS")
            .env_remove("TOKENBROKER_CREDENTIALS")
            .env_remove("TOKENBROKER_IMPERSONATE")
            .env("CLOUDSDK_CONFIG", dir)
            .env("RUST_LOG", "info")
            .args(["serve", "--socket"])
            .arg(&socket)
            .args(["--metadata-host", &emulator.host()])
            .args(["--metrics-addr", &metrics.to_string()])
            .args(["--expiry-skew", &secs(config.expiry_skew)])
            .args(["--idle-timeout", &secs(config.idle_timeout)])
            .args(["--upstream-timeout", &secs(config.upstream_timeout)])
            .args(["--invalidate-interval", &secs(config.invalidate_interval)])
            .args(["--upstream-max-rps", &config.upstream_max_rps.to_string()])
            .args([
                "--max-watchers",
                "1000000",
                "--max-watchers-per-uid",
                "1000000",
            ])
            .args(["--max-keys", "1000000", "--max-keys-per-uid", "1000000"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("broker log"));
        let child = command.spawn().expect("the broker starts");
        let process = Self {
            child,
            socket,
            metrics,
            log,
        };
        let started = Instant::now();
        while scrape(process.metrics).await.is_none()
            || std::os::unix::net::UnixStream::connect(&process.socket).is_err()
        {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the broker never became ready; see {}",
                process.log.display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        process
    }

    fn proc_status(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|line| line.strip_prefix(field))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    fn fds(&self) -> u64 {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .map(|entries| entries.count() as u64)
            .unwrap_or(0)
    }

    async fn footprint(&self) -> Footprint {
        let gauges = scrape(self.metrics).await.unwrap_or_default();
        Footprint {
            fds: self.fds(),
            tasks: gauge(&gauges, "tokenbroker_runtime_tasks"),
            keys: gauge(&gauges, "tokenbroker_cache_entries"),
            watchers: gauge(&gauges, "tokenbroker_watchers"),
        }
    }

    async fn sample(
        &self,
        started: Instant,
        state: &Shared,
        (upstream_rps_mean, upstream_rps_max): (f64, u64),
        fault: Option<&'static str>,
    ) -> Sample {
        let gauges = scrape(self.metrics).await.unwrap_or_default();
        let mut tally = state.tally.lock().expect("tally");
        let mut hits = std::mem::take(&mut tally.interval_latencies);
        let errors = std::mem::take(&mut tally.interval_errors);
        let watch_tokens = std::mem::take(&mut tally.interval_watch_tokens);
        let bad_tokens = tally.bad_tokens;
        drop(tally);
        Sample {
            t_secs: started.elapsed().as_secs_f64(),
            rss_bytes: self.proc_status("VmRSS:") * 1024,
            fds: self.fds(),
            threads: self.proc_status("Threads:"),
            tasks: gauge(&gauges, "tokenbroker_runtime_tasks"),
            keys: gauge(&gauges, "tokenbroker_cache_entries"),
            watchers: gauge(&gauges, "tokenbroker_watchers"),
            connections: gauge(&gauges, "tokenbroker_open_connections"),
            hits: hits.len() as u64,
            hit_p50_us: percentile(&mut hits, 0.5),
            hit_p99_us: percentile(&mut hits, 0.99),
            watch_tokens,
            errors,
            upstream_rps_mean,
            upstream_rps_max,
            bad_tokens,
            fault,
        }
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A local port nothing listens on (bound and released).
fn free_port() -> SocketAddr {
    std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
}

/// The broker's `/metrics` page, if it answers.
async fn scrape(addr: SocketAddr) -> Option<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .ok()?;
    let mut page = String::new();
    stream.read_to_string(&mut page).await.ok()?;
    page.starts_with("HTTP/1.").then_some(page)
}

/// The sum of a metric's values over its labels.
fn gauge(page: &str, name: &str) -> u64 {
    page.lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// The mean and the most requests in any one second the metadata server
/// saw since `since` (windows reaching back a second before it).
fn upstream_rates(emulator: &Emulator, since: Instant, interval: Duration) -> (f64, u64) {
    let arrivals = emulator.arrivals();
    let window = Duration::from_secs(1);
    let recent: Vec<Instant> = arrivals
        .into_iter()
        .filter(|at| *at + window > since)
        .collect();
    let mut most = 0;
    let mut first = 0;
    for (last, at) in recent.iter().enumerate() {
        while recent[first] + window <= *at {
            first += 1;
        }
        most = most.max(last + 1 - first);
    }
    let counted = recent.iter().filter(|at| **at > since).count();
    (counted as f64 / interval.as_secs_f64(), most as u64)
}

// === the load ===

/// What every client task adds to.
#[derive(Default)]
struct Shared {
    tally: Mutex<Tally>,
    /// Whether a fault is on now (hit latencies are kept apart).
    faulted: AtomicBool,
}

#[derive(Clone, Default)]
struct Tally {
    interval_latencies: Vec<u32>,
    interval_errors: BTreeMap<String, u64>,
    interval_watch_tokens: u64,
    faulted_latencies: Vec<u32>,
    calm_latencies: Vec<u32>,
    errors_total: BTreeMap<String, u64>,
    tokens_checked: u64,
    bad_tokens: u64,
    bad_examples: Vec<String>,
}

impl Shared {
    fn hit(&self, latency: Duration) {
        let micros = latency.as_micros().min(u128::from(u32::MAX)) as u32;
        let faulted = self.faulted.load(Ordering::Relaxed);
        let mut tally = self.tally.lock().expect("tally");
        tally.interval_latencies.push(micros);
        if faulted {
            tally.faulted_latencies.push(micros);
        } else {
            tally.calm_latencies.push(micros);
        }
    }

    fn error(&self, status: &tonic::Status) {
        let code = format!("{:?}", status.code());
        let mut tally = self.tally.lock().expect("tally");
        *tally.interval_errors.entry(code.clone()).or_default() += 1;
        *tally.errors_total.entry(code).or_default() += 1;
    }

    /// Counts a checked token, and a bad one with what was wrong.
    fn checked(&self, problem: Option<String>, watched: bool) {
        let mut tally = self.tally.lock().expect("tally");
        tally.tokens_checked += 1;
        if watched {
            tally.interval_watch_tokens += 1;
        }
        if let Some(problem) = problem {
            tally.bad_tokens += 1;
            if tally.bad_examples.len() < 10 {
                tally.bad_examples.push(problem);
            }
        }
    }
}

/// What a token was asked for, to check it against.
#[derive(Clone)]
enum Asked {
    Id(GetIdTokenRequest),
    Access(GetAccessTokenRequest),
}

impl Asked {
    fn id(audience: String) -> Self {
        Self::Id(GetIdTokenRequest {
            audience,
            ..Default::default()
        })
    }

    fn watch(&self) -> WatchTokenRequest {
        let request = match self.clone() {
            Self::Id(request) => watch_token_request::Request::IdToken(request),
            Self::Access(request) => watch_token_request::Request::AccessToken(request),
        };
        WatchTokenRequest {
            request: Some(request),
        }
    }

    /// The request that hands `token` back.
    fn invalidate(&self, token: &str) -> InvalidateTokenRequest {
        let request = match self.clone() {
            Self::Id(request) => invalidate_token_request::Request::IdToken(request),
            Self::Access(request) => invalidate_token_request::Request::AccessToken(request),
        };
        InvalidateTokenRequest {
            request: Some(request),
            token: token.to_string(),
        }
    }

    /// Calls the broker for the token; checks it.
    async fn call(
        &self,
        client: &mut TokenBrokerClient<Channel>,
        check: &Checker,
    ) -> Result<token::Token, tonic::Status> {
        let token = match self {
            Self::Id(request) => {
                token::Token::IdToken(client.get_id_token(request.clone()).await?.into_inner())
            }
            Self::Access(request) => token::Token::AccessToken(
                client.get_access_token(request.clone()).await?.into_inner(),
            ),
        };
        check.token(self, &token, false);
        Ok(token)
    }
}

/// Checks every token a client receives.
#[derive(Clone)]
struct Checker {
    shared: Arc<Shared>,
    /// Who issued the access tokens, and knows their account and scopes.
    emulator: Arc<Emulator>,
    skew: Duration,
}

impl Checker {
    /// A token handed out may have been sent this long before it is checked.
    const TRANSIT: Duration = Duration::from_secs(2);

    fn token(&self, asked: &Asked, token: &token::Token, watched: bool) {
        self.shared
            .checked(self.problem(asked, token).err(), watched);
    }

    fn problem(&self, asked: &Asked, token: &token::Token) -> Result<(), String> {
        let expiry = token.expire_time().ok_or("no expire_time")?;
        let expiry_secs = expiry.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let now = SystemTime::now();
        if expiry <= now {
            return Err(format!("expired {:?} ago", now.duration_since(expiry)));
        }
        if expiry + Self::TRANSIT < now + self.skew {
            return Err(format!(
                "within the expiry skew: {:?} left",
                expiry.duration_since(now).unwrap_or_default()
            ));
        }
        match (asked, token) {
            (Asked::Id(request), token::Token::IdToken(id)) => {
                let claims = claims(&id.token).ok_or("an ID token that is not a JWT")?;
                if claims["aud"] != request.audience.as_str() {
                    return Err(format!("aud {} for {}", claims["aud"], request.audience));
                }
                if claims["email"] != DEFAULT_ACCOUNT {
                    return Err(format!("account {}", claims["email"]));
                }
                // The broker reads expire_time from the token itself.
                if claims["exp"].as_u64() != Some(expiry_secs) {
                    return Err("the ID token's exp and expire_time differ".into());
                }
            }
            (Asked::Access(request), token::Token::AccessToken(access)) => {
                let info = self
                    .emulator
                    .token_info(&access.token)
                    .ok_or("an access token the emulator never issued")?;
                if info.email != DEFAULT_ACCOUNT || info.scopes != request.scopes {
                    return Err(format!(
                        "{} {:?} for {:?}",
                        info.email, info.scopes, request.scopes
                    ));
                }
                // The broker counts an access token's lifetime from just
                // before its request, the emulator from when it issued the
                // token: expire_time may be early by the request's transit
                // (a second boundary crossed on the way), never late.
                if expiry_secs > info.exp {
                    return Err("expire_time later than the access token's expiry".into());
                }
                if expiry_secs + Self::TRANSIT.as_secs() < info.exp {
                    return Err(
                        "expire_time earlier than the access token's expiry by more than transit"
                            .into(),
                    );
                }
            }
            _ => return Err("the other kind of token".into()),
        }
        Ok(())
    }
}

/// A JWT's claims, unverified.
fn claims(jwt: &str) -> Option<serde_json::Value> {
    let payload = jwt.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn audience(i: usize) -> String {
    format!("https://soak-{i:04}-abcdefghij-uc.a.run.app")
}

/// The running client tasks.
struct Load {
    tasks: tokio::task::JoinSet<()>,
    reopen: Arc<Vec<Notify>>,
}

/// What every kind of client of the load is started with.
struct Plan<'a> {
    config: &'a SoakConfig,
    socket: &'a Path,
    keys: &'a Keys,
    check: &'a Checker,
    stop: &'a CancellationToken,
}

/// The keys of the load, by use.
struct Keys {
    /// Called by the callers and watched, all through the run.
    cached: Arc<Vec<Asked>>,
    /// Watched and handed back in turn.
    invalidated: Arc<Vec<Asked>>,
}

impl Load {
    async fn start(
        config: &SoakConfig,
        socket: &Path,
        shared: &Arc<Shared>,
        emulator: &Arc<Emulator>,
        stop: &CancellationToken,
    ) -> Self {
        let check = Checker {
            shared: shared.clone(),
            emulator: emulator.clone(),
            skew: config.expiry_skew,
        };
        let ids = |range: std::ops::Range<usize>| {
            Arc::new(range.map(|i| Asked::id(audience(i))).collect::<Vec<_>>())
        };
        let (cached_end, invalidated_end) = (
            config.cached_keys,
            config.cached_keys + config.invalidated_keys,
        );
        let keys = Keys {
            cached: ids(0..cached_end),
            invalidated: ids(cached_end..invalidated_end),
        };
        // Warm every key, so that the callers measure hits.
        let mut warm = connect(socket).await;
        for asked in keys.cached.iter().chain(keys.invalidated.iter()) {
            asked.call(&mut warm, &check).await.expect("warm-up call");
        }
        let mut load = Self {
            tasks: tokio::task::JoinSet::new(),
            reopen: Arc::new((0..config.watchers).map(|_| Notify::new()).collect()),
        };
        let plan = Plan {
            config,
            socket,
            keys: &keys,
            check: &check,
            stop,
        };
        load.callers(&plan).await;
        load.churn(&plan).await;
        load.invalidator(&plan).await;
        load.watchers(&plan).await;
        load
    }

    /// Callers, each calling cached keys at its rate.
    async fn callers(&mut self, plan: &Plan<'_>) {
        let config = plan.config;
        let clients = connections(plan.socket, config.caller_connections).await;
        let period = Duration::from_secs(1) / config.caller_rps.max(1);
        for n in 0..config.callers {
            let client = clients[n % clients.len()].clone();
            let (cached, check) = (plan.keys.cached.clone(), plan.check.clone());
            self.tasks.spawn(every(period, plan.stop.clone(), move |i| {
                let (mut client, check) = (client.clone(), check.clone());
                let asked = cached[(n + 7 * i) % cached.len()].clone();
                async move {
                    let sent = Instant::now();
                    match asked.call(&mut client, &check).await {
                        Ok(_) => check.shared.hit(sent.elapsed()),
                        Err(status) => check.shared.error(&status),
                    }
                }
            }));
        }
    }

    /// A new key (ID or access token) now and then, asked for twice and
    /// then left to idle out.
    async fn churn(&mut self, plan: &Plan<'_>) {
        let client = connect(plan.socket).await;
        let (check, stop_asking) = (plan.check.clone(), plan.stop.clone());
        self.tasks.spawn(every(
            plan.config.churn_every,
            plan.stop.clone(),
            move |n| {
                let asked = if n % 2 == 0 {
                    Asked::id(format!("https://churn-{n}.example"))
                } else {
                    Asked::Access(GetAccessTokenRequest {
                        scopes: vec![format!("https://www.googleapis.com/auth/churn.{n}")],
                        ..Default::default()
                    })
                };
                let (mut client, check, stop) =
                    (client.clone(), check.clone(), stop_asking.clone());
                // Not awaited: the next key comes on time.
                tokio::spawn(async move {
                    for _ in 0..2 {
                        if let Err(status) = asked.call(&mut client, &check).await {
                            check.shared.error(&status);
                        }
                        tokio::select! {
                            () = stop.cancelled() => return,
                            () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                });
                std::future::ready(())
            },
        ));
    }

    /// Hands a key's token back with `InvalidateToken`, round-robin.
    async fn invalidator(&mut self, plan: &Plan<'_>) {
        let keys = plan.keys.invalidated.clone();
        if keys.is_empty() {
            return;
        }
        let (client, check) = (connect(plan.socket).await, plan.check.clone());
        self.tasks.spawn(every(
            plan.config.invalidate_every,
            plan.stop.clone(),
            move |i| {
                let (mut client, check) = (client.clone(), check.clone());
                let asked = keys[i % keys.len()].clone();
                async move {
                    let result = match asked.call(&mut client, &check).await {
                        Ok(token) => client
                            .invalidate_token(asked.invalidate(token.secret()))
                            .await
                            .map(drop),
                        Err(status) => Err(status),
                    };
                    if let Err(status) = result {
                        check.shared.error(&status);
                    }
                }
            },
        ));
    }

    /// Watch streams, on the cached and the invalidated keys.
    async fn watchers(&mut self, plan: &Plan<'_>) {
        let (config, keys) = (plan.config, plan.keys);
        let per_connection = config.watchers_per_connection.max(1);
        let clients = connections(plan.socket, config.watchers.div_ceil(per_connection)).await;
        let watched: Vec<&Asked> = keys.cached.iter().chain(keys.invalidated.iter()).collect();
        for n in 0..config.watchers {
            let client = clients[n / per_connection].clone();
            let asked = watched[n % watched.len()].clone();
            let (check, stop, reopen) =
                (plan.check.clone(), plan.stop.clone(), self.reopen.clone());
            self.tasks
                .spawn(watcher(n, client, asked, check, stop, reopen));
        }
    }

    /// Closes and reopens `percent` % of the watch streams, picked at random.
    fn reopen_some(&self, percent: usize) {
        let count = self.reopen.len() * percent / 100;
        for _ in 0..count {
            self.reopen[fastrand::usize(..self.reopen.len())].notify_one();
        }
    }

    async fn stop(mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Runs `step(0)`, `step(1)`, ... one per `period` (a step that runs
/// late delays the next, with no burst to catch up), until `stop`.
async fn every<F: Future<Output = ()>>(
    period: Duration,
    stop: CancellationToken,
    mut step: impl FnMut(usize) -> F,
) {
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for n in 0.. {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        step(n).await;
    }
}

/// One watch stream, reopened when told to or when it ends.
async fn watcher(
    n: usize,
    mut client: TokenBrokerClient<Channel>,
    asked: Asked,
    check: Checker,
    stop: CancellationToken,
    reopen: Arc<Vec<Notify>>,
) {
    loop {
        let mut stream = match client.watch_token(asked.watch()).await {
            Ok(response) => response.into_inner(),
            Err(status) => {
                check.shared.error(&status);
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        };
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = reopen[n].notified() => break,
                message = stream.message() => match message {
                    Ok(Some(message)) => match message.token {
                        Some(token) => check.token(&asked, &token, true),
                        None => check.shared.checked(Some("a watch message without a token".into()), true),
                    },
                    Ok(None) => break,
                    Err(status) => {
                        check.shared.error(&status);
                        break;
                    }
                },
            }
        }
    }
}

async fn connect(socket: &Path) -> TokenBrokerClient<Channel> {
    let endpoint = Endpoint::from_shared(format!("unix://{}", socket.display())).expect("endpoint");
    TokenBrokerClient::new(endpoint.connect().await.expect("connect to the broker"))
}

async fn connections(socket: &Path, count: usize) -> Vec<TokenBrokerClient<Channel>> {
    let mut clients = Vec::with_capacity(count);
    for _ in 0..count.max(1) {
        clients.push(connect(socket).await);
    }
    clients
}

// === arithmetic ===

/// The `p` quantile of `values` (0 if empty).
pub fn percentile(values: &mut [u32], p: f64) -> u32 {
    if values.is_empty() {
        return 0;
    }
    values.sort_unstable();
    values[((values.len() - 1) as f64 * p).round() as usize]
}

/// The least-squares slope of `points` (0 with fewer than two).
pub fn slope(points: impl Iterator<Item = (f64, f64)>) -> f64 {
    let points: Vec<(f64, f64)> = points.collect();
    let n = points.len() as f64;
    if points.len() < 2 {
        return 0.0;
    }
    let (mean_x, mean_y) = points
        .iter()
        .fold((0.0, 0.0), |(x, y), (px, py)| (x + px / n, y + py / n));
    let (mut covariance, mut variance) = (0.0, 0.0);
    for (x, y) in &points {
        covariance += (x - mean_x) * (y - mean_y);
        variance += (x - mean_x) * (x - mean_x);
    }
    if variance == 0.0 {
        0.0
    } else {
        covariance / variance
    }
}
