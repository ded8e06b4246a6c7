//! What each subcommand does: wires the modules together.

use std::error::Error;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::SystemTime;

use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::adc::Environment;
use crate::cache::TokenCache;
use crate::config::{AccessTokenArgs, ClientArgs, EmulatorArgs, IdTokenArgs, ServeArgs};
use crate::emulator::{Emulator, EmulatorConfig};
use crate::health::Health;
use crate::limits::{RateLimited, WatchLimits};
use crate::metrics::{Metrics, register_cache_gauge};
use crate::policy::PolicyStore;
use crate::proto::v1 as pb;
use crate::retry::{RetryPolicy, Retrying};
use crate::server::Broker;
use crate::sources::Upstream;
use crate::telemetry::Telemetry;
use crate::upstream::Instrumented;
use crate::{admin, client, server, socket};

/// What a subcommand fails with; printed by `main`.
pub type AppResult = Result<(), Box<dyn Error + Send + Sync>>;

/// `tokenbroker serve`.
pub async fn serve(args: ServeArgs, telemetry: &Telemetry) -> AppResult {
    // Installed first: a SIGTERM during start-up still means a clean exit.
    let shutdown = shutdown_signal()?;
    let emulator = if args.emulator {
        let config = EmulatorConfig {
            access_token_lifetime: args.emulator_token_lifetime,
            id_token_lifetime: args.emulator_token_lifetime,
            ..EmulatorConfig::default()
        };
        Some(Emulator::start(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), config).await?)
    } else {
        None
    };
    let host = emulator
        .as_ref()
        .map_or_else(|| args.metadata_host.clone(), Emulator::host);
    let upstream = Upstream::build(&args.source_config(host), &Environment::from_process())?;
    tracing::info!(
        source = %upstream.describe(),
        emulator = args.emulator,
        "fetching tokens"
    );

    let meter = telemetry.meter();
    let metrics = Metrics::new(&meter, args.metrics_label_audience);
    let health = Health::new();
    // Each attempt waits for the global limits, then is recorded; retries
    // wrap it all.
    let attempt = Instrumented::new(upstream.clone(), metrics.clone(), health.clone());
    let limited = RateLimited::new(
        attempt,
        args.upstream_max_rps,
        args.upstream_max_concurrency,
    );
    let retry = RetryPolicy {
        max_attempts: args.upstream_max_attempts.max(1),
        budget: args.upstream_retry_budget,
    };
    let source = Retrying::new(limited, retry);
    let cache = TokenCache::new(Arc::new(source), args.cache_config(), metrics.clone());
    register_cache_gauge(&meter, {
        let cache = cache.clone();
        move |kind| cache.len_of(kind)
    });

    let policy = Arc::new(PolicyStore::open(args.policy.clone())?);
    if let Some(path) = &args.policy {
        tracing::info!(policy = %path.display(), "access policy in force; SIGHUP re-reads it");
    }
    let stop = CancellationToken::new();
    tokio::spawn(reload_policy_on_sighup(policy.clone(), stop.clone()));
    let _stop_background = stop.clone().drop_guard();
    let probe = move || {
        let upstream = upstream.clone();
        async move { upstream.probe().await }
    };
    tokio::spawn(health.clone().monitor(cache.clone(), probe, stop.clone()));
    if let Some(addr) = args.metrics_addr {
        let registry = telemetry
            .registry()
            .cloned()
            .ok_or("metrics registry missing")?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|error| format!("cannot listen for metrics on {addr}: {error}"))?;
        tracing::info!(metrics_addr = %listener.local_addr()?, "serving /metrics, /healthz, /readyz");
        tokio::spawn(admin::serve(
            listener,
            registry,
            health.clone(),
            stop.clone(),
        ));
    }

    let socket = socket::bind(&args.socket, args.socket_mode, args.socket_group)?;
    let watch_limits = WatchLimits::new(args.max_watchers, args.max_watchers_per_uid);
    let broker = Broker {
        cache,
        metrics,
        health,
        policy,
        watch_limits,
    };
    server::serve(socket, broker, shutdown, args.shutdown_grace).await
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

/// `tokenbroker print-access-token`.
pub async fn print_access_token(args: AccessTokenArgs) -> AppResult {
    let request = pb::GetAccessTokenRequest {
        service_account: args.client.service_account.clone(),
        scopes: args.scopes,
        min_valid_for: min_valid_for(&args.client),
    };
    let watch = pb::watch_token_request::Request::AccessToken(request.clone());
    print_tokens(&args.client, watch, |mut broker| async move {
        let token = broker.get_access_token(request).await?.into_inner();
        Ok(pb::token::Token::AccessToken(token))
    })
    .await
}

/// `tokenbroker print-identity-token`.
pub async fn print_identity_token(args: IdTokenArgs) -> AppResult {
    let format = if args.full {
        pb::IdTokenFormat::Full
    } else {
        pb::IdTokenFormat::Standard
    };
    let request = pb::GetIdTokenRequest {
        audience: args.audience,
        service_account: args.client.service_account.clone(),
        format: format as i32,
        include_licenses: args.include_licenses,
        min_valid_for: min_valid_for(&args.client),
    };
    let watch = pb::watch_token_request::Request::IdToken(request.clone());
    print_tokens(&args.client, watch, |mut broker| async move {
        let token = broker.get_id_token(request).await?.into_inner();
        Ok(pb::token::Token::IdToken(token))
    })
    .await
}

type BrokerClient = pb::token_broker_client::TokenBrokerClient<tonic::transport::Channel>;

/// Prints one token (via `get`), or with `--watch` every token of the key.
async fn print_tokens<F, Fut>(
    args: &ClientArgs,
    watch: pb::watch_token_request::Request,
    get: F,
) -> AppResult
where
    F: FnOnce(BrokerClient) -> Fut,
    Fut: std::future::Future<Output = Result<pb::token::Token, Status>>,
{
    let mut broker = client::connect(&args.socket).await.map_err(|error| {
        format!(
            "cannot connect to the broker at {}: {error}; is `tokenbroker serve` running there? (set --socket or TOKENBROKER_SOCKET)",
            args.socket.display()
        )
    })?;
    if !args.watch {
        let token = get(broker).await.map_err(status_error)?;
        print_token(&token, args.json);
        return Ok(());
    }
    let request = pb::WatchTokenRequest {
        request: Some(watch),
    };
    let mut stream = broker
        .watch_token(request)
        .await
        .map_err(status_error)?
        .into_inner();
    while let Some(token) = stream.message().await.map_err(status_error)? {
        if let Some(token) = token.token {
            print_token(&token, args.json);
        }
    }
    Ok(())
}

fn print_token(token: &pb::token::Token, json: bool) {
    let (secret, expire_time) = match token {
        pb::token::Token::AccessToken(t) => (&t.token, t.expire_time),
        pb::token::Token::IdToken(t) => (&t.token, t.expire_time),
    };
    if json {
        let expire_time = expire_time
            .and_then(|t| SystemTime::try_from(t).ok())
            .map(|t| humantime::format_rfc3339(t).to_string());
        println!(
            "{}",
            serde_json::json!({"token": secret, "expire_time": expire_time})
        );
    } else {
        println!("{secret}");
    }
}

fn status_error(status: Status) -> Box<dyn Error + Send + Sync> {
    format!("{:?}: {}", status.code(), status.message()).into()
}

fn min_valid_for(args: &ClientArgs) -> Option<prost_types::Duration> {
    args.min_valid_for.map(|d| {
        prost_types::Duration::try_from(d).unwrap_or(prost_types::Duration {
            seconds: i64::MAX,
            nanos: 0,
        })
    })
}

/// Re-reads the policy on every SIGHUP; a bad file keeps the old rules.
async fn reload_policy_on_sighup(policy: Arc<PolicyStore>, stop: CancellationToken) {
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
        match policy.reload() {
            Ok(Some(rules)) => tracing::info!(rules, "policy reloaded"),
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
