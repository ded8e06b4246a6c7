//! What each subcommand does: wires the modules together.

use std::error::Error;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::admin;
use crate::audit::{AuditLog, Destination};
use crate::broker::{Broker, WatchLimits};
use crate::cache::TokenCache;
use crate::config::{EmulatorArgs, ServeArgs};
use crate::connections::{self, ConnectionLimits, Listener, METRICS_MAX_CONNECTIONS};
use crate::emulator::{Emulator, EmulatorConfig};
use crate::grpc::server::{self, ServerConfig};
use crate::hardening;
use crate::metadata_endpoint::{self, LongPolls, MetadataAddr, MetadataEndpoint, MetadataListener};
use crate::policy::PolicyStore;
use crate::sink::{self, Sinks};
use crate::socket::{self, BoundSocket, SocketError};
use crate::sources::Upstream;
use crate::sources::adc::Environment;
use crate::sources::downscope::{DEFAULT_STS_ENDPOINT, Downscoper, Downscoping};
use crate::sources::https::{self, HttpsClient};
use crate::sources::impersonate::DEFAULT_IAM_ENDPOINT;
use crate::sources::workload::WorkloadAccounts;
use crate::systemd::Activation;
use crate::telemetry::Telemetry;
use crate::telemetry::health::Health;
use crate::telemetry::metrics::{
    Metrics, register_cache_gauge, register_runtime_gauge, register_workload_gauge,
};
use crate::upstream::Instrumented;
use crate::upstream::limits::{RateLimited, UpstreamLimits};
use crate::upstream::retry::{RetryPolicy, Retrying};
use crate::workload::{Kubeconfig, Locator, WorkloadConfig, WorkloadIdentity, Workloads};

/// The node `serve --emulator --workload-identity kubernetes` follows when
/// no `--node-name` is given.
pub const EMULATOR_NODE: &str = "emulator-node";

/// What a subcommand fails with; printed by `main`.
pub type AppResult = Result<(), Box<dyn Error + Send + Sync>>;

/// `tokenbroker serve`, on the socket systemd passed (`activation`) or
/// else on `--socket`.
///
/// SIGTERM or SIGINT starts the drain, the one shutdown signal every part
/// follows: gRPC health and `/readyz` turn NOT_SERVING, the gRPC socket and
/// the metadata endpoint accept no more connections, watch streams end, and
/// the calls in flight get `--shutdown-grace` to finish. Then the sinks
/// clean up and the process exits.
pub async fn serve(args: ServeArgs, activation: Activation, telemetry: &Telemetry) -> AppResult {
    // Installed first: a SIGTERM during start-up still means a clean exit.
    let shutdown = shutdown_signal()?;
    // Before any credentials are read or tokens fetched.
    if args.allow_core_dumps {
        tracing::debug!("--allow-core-dumps: core dump limit and dumpable flag left as inherited");
    } else {
        hardening::forbid_core_dumps()?;
    }
    if let Some(path) = &args.config {
        tracing::info!(config = %path.display(), "configuration file read");
    }
    let descriptors = connections::raise_descriptor_limit()?;
    let sinks = sink::check_all(args.sinks.clone())?;
    let emulator = start_emulator(&args).await?;
    let host = emulator
        .as_ref()
        .map_or_else(|| args.metadata_host.clone(), Emulator::host);
    let environment = Environment::from_process()?;
    let upstream = Upstream::build(&args.source_config(host), &environment)?;
    tracing::info!(source = %upstream.describe(), emulator = args.emulator, "fetching tokens");
    // One client (root certificates read once) for STS and the pods'
    // impersonation.
    let http = HttpsClient::new(args.upstream_timeout, environment.proxy.clone())?;
    let downscoper = downscoper(&args, emulator.as_ref(), http.clone())?;

    let meter = telemetry.meter();
    let metrics = Metrics::new(&meter, args.metrics_label_audience);
    let health = Health::new();
    let workload_accounts = workload_accounts(&args, emulator.as_ref(), &upstream, http)?;
    let cache = token_cache(&args, workload_accounts, downscoper, &metrics, &health);
    register_cache_gauge(&meter, {
        let cache = cache.clone();
        move |kind| cache.len_of(kind)
    });
    register_runtime_gauge(&meter, tokio::runtime::Handle::current());
    let policy = Arc::new(PolicyStore::open(args.policy.clone())?);
    if let Some(path) = &args.policy {
        tracing::info!(policy = %path.display(), "access policy in force; SIGHUP re-reads it");
    }
    // `drain` is the shutdown signal; `stop` ends the background tasks when
    // this function returns.
    let drain = CancellationToken::new();
    let stop = CancellationToken::new();
    let _stop_background = stop.clone().drop_guard();
    let watch_limits = WatchLimits::new(args.max_watchers, args.max_watchers_per_uid);
    let audit = open_audit_log(&args, &upstream, &metrics)?;
    let workloads = start_workloads(&args, emulator.as_ref(), &health, stop.clone()).await?;
    if let Some(workloads) = &workloads {
        register_workload_gauge(&meter, {
            let workloads = workloads.clone();
            move || workloads.len()
        });
    }
    let locator = workloads.is_some().then(|| Locator::new(&args.proc_root));
    let broker = Broker::new(
        cache.clone(),
        policy.clone(),
        metrics,
        watch_limits,
        drain.clone(),
        audit.clone(),
        workloads.clone(),
    );

    tokio::spawn(reload_on_sighup(policy, audit, workloads, stop.clone()));
    let probe = {
        let upstream = upstream.clone();
        move || {
            let upstream = upstream.clone();
            async move { upstream.probe().await }
        }
    };
    tokio::spawn(
        health
            .clone()
            .monitor(move || cache.has_usable_token(), probe, stop.clone()),
    );

    // Upstream connections (token fetches, the pass-through and its
    // long-polls) come out of the descriptors kept back from clients.
    let upstream_descriptors =
        2 * args.upstream_max_concurrency + metadata_endpoint::MAX_LONG_POLLS;
    let connection_limits = ConnectionLimits::new(
        ConnectionLimits::budget_for(descriptors, upstream_descriptors),
        &meter,
    );
    tracing::info!(
        soft = descriptors.hard,
        hard = descriptors.hard,
        started_with = descriptors.initial_soft,
        client_connections = connection_limits.budget(),
        "file descriptor limit"
    );
    if let Some(addr) = args.metrics_addr {
        let registry = telemetry
            .registry()
            .cloned()
            .ok_or("metrics registry missing")?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|error| format!("cannot listen for metrics on {addr}: {error}"))?;
        tracing::info!(metrics_addr = %listener.local_addr()?, "serving /metrics, /healthz, /readyz");
        let limits = connection_limits.listener(Listener::Metrics, METRICS_MAX_CONNECTIONS, None);
        // It answers through the drain (`/readyz` says 503), until the end.
        tokio::spawn(admin::serve(
            listener,
            limits,
            registry,
            health.clone(),
            stop.clone(),
        ));
    }

    let socket = bind_socket(activation, &args)?;
    if let Some(gid) = socket.owner.client_group() {
        sink::warn_if_clients_can_read(&sinks, nix::unistd::Gid::from_raw(gid));
    }
    let sinks = Sinks::start(sinks, &broker);
    let metadata_endpoint = match &args.metadata_addr {
        Some(addr) => {
            // Only a metadata server is asked for what is not a token: with
            // other sources the name may resolve anywhere (off Google Cloud)
            // or describe another account (the VM's, not the key's).
            let pass_through = match &upstream {
                Upstream::Metadata(client) => Some(client.clone()),
                _ => None,
            };
            let endpoint = MetadataEndpoint {
                broker: broker.clone(),
                pass_through,
                // The same bounds as token fetches, counted apart: a flood of
                // pass-through requests must never delay a token.
                upstream_limits: UpstreamLimits::new(
                    args.upstream_max_rps,
                    args.upstream_max_concurrency,
                ),
                long_polls: LongPolls::default(),
                timeout: args.upstream_timeout,
                reveal: args.metadata_passthrough,
                locator: locator.clone(),
            };
            let listener = bind_metadata_endpoint(addr, &args).await?;
            let per_uid =
                matches!(addr, MetadataAddr::Unix(_)).then_some(args.max_connections_per_uid);
            let limits = connection_limits.listener(
                Listener::Metadata,
                args.metadata_max_connections,
                per_uid,
            );
            Some(tokio::spawn(metadata_endpoint::serve(
                listener,
                limits,
                endpoint,
                drain.clone(),
            )))
        }
        None => None,
    };
    let config = ServerConfig {
        health: health.clone(),
        connections: connection_limits.listener(
            Listener::Grpc,
            args.max_connections,
            Some(args.max_connections_per_uid),
        ),
        max_concurrent_streams: args.max_concurrent_streams,
        idle_timeout: args.connection_idle_timeout,
        locator,
    };
    let grpc = tokio::spawn(server::serve(socket, broker, config, drain.clone()));

    shutdown.await;
    crate::systemd::notify_stopping();
    tracing::info!("draining: no new connections, ending watch streams, finishing calls in flight");
    health.drain();
    drain.cancel();
    let drained = async {
        let served = grpc.await;
        if let Some(endpoint) = metadata_endpoint {
            let _ = endpoint.await;
        }
        served
    };
    let served = match tokio::time::timeout(args.shutdown_grace, drained).await {
        Ok(Ok(served)) => served,
        Ok(Err(error)) => Err(error.into()),
        Err(_) => {
            tracing::warn!(grace = ?args.shutdown_grace, "calls still in flight after the shutdown grace period; exiting anyway");
            Ok(())
        }
    };
    sinks.stop(args.shutdown_grace).await;
    tracing::info!("stopped");
    served
}

/// With `--emulator`, the metadata server emulator, in this process.
async fn start_emulator(args: &ServeArgs) -> Result<Option<Emulator>, std::io::Error> {
    if !args.emulator {
        return Ok(None);
    }
    let config = EmulatorConfig {
        access_token_lifetime: args.emulator_token_lifetime,
        id_token_lifetime: args.emulator_token_lifetime,
        control: args.emulator_control,
        ..EmulatorConfig::default()
    };
    if !args.emulator_control {
        tracing::info!("the emulator's control API is off (--emulator-control turns it on)");
    }
    Emulator::start(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), config)
        .await
        .map(Some)
}

/// Where downscoped tokens are exchanged: `--sts-endpoint`, or with
/// `--emulator` and the default endpoint, the emulator's fake STS.
fn downscoper(
    args: &ServeArgs,
    emulator: Option<&Emulator>,
    http: HttpsClient,
) -> Result<Downscoper, String> {
    let endpoint = emulated_or(
        &args.sts_endpoint,
        DEFAULT_STS_ENDPOINT,
        emulator,
        Emulator::sts_endpoint,
    );
    Downscoper::new(&endpoint, http)
}

/// A Google endpoint's flag value; with `--emulator` and the flag at its
/// `default`, the emulator's fake of it instead.
fn emulated_or(
    flag: &str,
    default: &str,
    emulator: Option<&Emulator>,
    fake: impl Fn(&Emulator) -> String,
) -> String {
    match emulator {
        Some(emulator) if flag == default => fake(emulator),
        _ => flag.to_string(),
    }
}

/// With `--workload-identity kubernetes`, the node's pods, followed from
/// the API server (`--kubeconfig`, else in-cluster; with `--emulator`, the
/// emulator's fake API); serving waits until they have been read once.
async fn start_workloads(
    args: &ServeArgs,
    emulator: Option<&Emulator>,
    health: &Health,
    stop: CancellationToken,
) -> Result<Option<Workloads>, String> {
    if args.workload_identity == WorkloadIdentity::Off {
        return Ok(None);
    }
    let kubeconfig = match (&args.kubeconfig, emulator) {
        (Some(path), _) => Kubeconfig::File(path.clone()),
        (None, Some(emulator)) => Kubeconfig::Text(emulator.kubeconfig()),
        (None, None) => Kubeconfig::Infer,
    };
    let node_name = match (&args.node_name, emulator) {
        (Some(node), _) => node.clone(),
        (None, Some(_)) => EMULATOR_NODE.to_string(),
        (None, None) => {
            return Err("--workload-identity kubernetes needs --node-name (env TOKENBROKER_NODE_NAME; in a DaemonSet, from the downward API's spec.nodeName)".into());
        }
    };
    let config = WorkloadConfig {
        kubeconfig,
        node_name,
        unmapped: args.unmapped_pods,
    };
    let workloads = Workloads::connect(config, health.require_pods()).await?;
    workloads.follow(stop);
    tracing::info!(
        node = workloads.node(),
        unmapped_pods = ?args.unmapped_pods,
        proc_root = %args.proc_root.display(),
        "workload identity: peers in this node's pods get their pods' Google service accounts"
    );
    Ok(Some(workloads))
}

/// The broker's source with the pods' Google service accounts beside it,
/// impersonated at `--iam-endpoint` (with `--emulator` and the default,
/// the emulator's fake IAM Credentials API).
fn workload_accounts(
    args: &ServeArgs,
    emulator: Option<&Emulator>,
    upstream: &Upstream,
    http: HttpsClient,
) -> Result<WorkloadAccounts<Upstream>, String> {
    let endpoint = emulated_or(
        &args.iam_endpoint,
        DEFAULT_IAM_ENDPOINT,
        emulator,
        Emulator::iam_endpoint,
    );
    let endpoint = https::endpoint("--iam-endpoint", &endpoint)?;
    Ok(WorkloadAccounts::new(upstream.clone(), endpoint, http))
}

/// The shared cache over `source` (the broker's source and the pods'
/// accounts, and `downscoper` for downscoped keys): each attempt waits
/// for the global limits and is recorded; retries wrap it all.
fn token_cache(
    args: &ServeArgs,
    source: WorkloadAccounts<Upstream>,
    downscoper: Downscoper,
    metrics: &Metrics,
    health: &Health,
) -> TokenCache {
    let source = Downscoping::new(source, downscoper);
    let attempt = Instrumented::new(source, metrics.clone(), health.clone());
    let limits = UpstreamLimits::new(args.upstream_max_rps, args.upstream_max_concurrency);
    let limited = RateLimited::new(attempt, limits);
    let retry = RetryPolicy {
        max_attempts: args.upstream_max_attempts.max(1),
        budget: args.upstream_retry_budget,
    };
    let source = Retrying::new(limited, retry);
    TokenCache::new(Arc::new(source), args.cache_config(), metrics.clone())
}

/// The gRPC socket: the one systemd passed, or `--socket`.
fn bind_socket(activation: Activation, args: &ServeArgs) -> Result<BoundSocket, SocketError> {
    match activation {
        Activation::Listener(listener) => {
            let socket = socket::inherited(listener)?;
            tracing::info!(socket = %socket.owner.path().display(), "socket activated: serving the socket systemd passed (--socket and its mode are the socket unit's)");
            Ok(socket)
        }
        Activation::NotForUs => {
            tracing::warn!(
                "LISTEN_FDS is set, but LISTEN_PID is not this process: ignored; binding --socket"
            );
            socket::bind(&args.socket, args.socket_mode, args.socket_group)
        }
        Activation::None => socket::bind(&args.socket, args.socket_mode, args.socket_group),
    }
}

/// Binds the metadata-compatible endpoint and says where it listens (and,
/// on TCP, that the policy does not apply there).
async fn bind_metadata_endpoint(
    addr: &MetadataAddr,
    args: &ServeArgs,
) -> Result<MetadataListener, Box<dyn Error + Send + Sync>> {
    match addr {
        MetadataAddr::Tcp(addr) => {
            let listener = TcpListener::bind(addr).await.map_err(|error| {
                format!("cannot listen for the metadata endpoint on {addr}: {error}")
            })?;
            let local = listener.local_addr()?;
            if args.policy.is_some() {
                tracing::warn!(
                    metadata_addr = %local,
                    "the policy does not apply to the metadata endpoint on TCP: every local process that can connect gets tokens there (use unix:PATH to apply it)"
                );
            }
            tracing::info!(metadata_addr = %local, "serving the metadata-server-compatible endpoint; point GCE_METADATA_HOST here");
            Ok(MetadataListener::Tcp(listener))
        }
        MetadataAddr::Unix(path) => {
            let socket = socket::bind(path, args.socket_mode, args.socket_group)?;
            tracing::info!(metadata_addr = %addr, "serving the metadata-server-compatible endpoint");
            Ok(MetadataListener::Unix(socket))
        }
    }
}

/// `tokenbroker emulator`.
pub async fn emulator(args: EmulatorArgs) -> AppResult {
    let shutdown = shutdown_signal()?;
    let emulator = Emulator::start(args.listen, args.emulator_config()).await?;
    eprintln!(
        "metadata server emulator on {}; use GCE_METADATA_HOST={} (control API under /emulator/v1/)",
        emulator.addr(),
        emulator.host()
    );
    shutdown.await;
    Ok(())
}

/// `--audit-log`, opened, if set.
fn open_audit_log(
    args: &ServeArgs,
    upstream: &Upstream,
    metrics: &Metrics,
) -> Result<Option<AuditLog>, String> {
    let Some(path) = &args.audit_log else {
        return Ok(None);
    };
    let destination = if path.as_os_str() == "-" {
        Destination::Stdout
    } else {
        Destination::File {
            path: path.clone(),
            group: args.audit_log_group,
        }
    };
    let metrics = metrics.clone();
    let default_account = upstream.default_account();
    let audit = AuditLog::open(destination, default_account, move |lines| {
        metrics.audit_dropped(lines)
    })
    .map_err(|e| e.to_string())?;
    tracing::info!(audit_log = %path.display(), "audit log on; SIGHUP reopens it");
    Ok(Some(audit))
}

/// On every SIGHUP, re-reads the policy (a bad file keeps the old rules)
/// and reopens the audit log (after logrotate moved it).
async fn reload_on_sighup(
    policy: Arc<PolicyStore>,
    audit: Option<AuditLog>,
    workloads: Option<Workloads>,
    stop: CancellationToken,
) {
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(hangups) => hangups,
        Err(error) => {
            tracing::error!(%error, "cannot listen for SIGHUP; the policy cannot be reloaded");
            return;
        }
    };
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            received = hangups.recv() => if received.is_none() { return },
        }
        if let Some(audit) = &audit {
            audit.reopen();
        }
        match policy.reload() {
            Ok(Some(rules)) => {
                tracing::info!(rules, "policy reloaded");
                // Its [[workload]] table may map pods elsewhere now.
                if let Some(workloads) = &workloads {
                    workloads.policy_reloaded();
                }
            }
            Ok(None) => tracing::info!("SIGHUP: no --policy to reload"),
            Err(error) => {
                tracing::error!(%error, "policy not reloaded; the previous rules stay in force")
            }
        }
    }
}

/// Completes on the first SIGTERM or SIGINT.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()> + Send> {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM received"),
            _ = interrupt.recv() => tracing::info!("SIGINT received"),
        }
    })
}
