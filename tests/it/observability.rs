//! What operators see: metrics that move, health that follows the metadata
//! server, reflection, and OTLP export.

use std::net::SocketAddr;
use std::time::Duration;

use tokenbroker::emulator::{Emulator, EmulatorConfig, Fault, FaultRule, Target};
use tokenbroker::proto::v1::GetAccessTokenRequest;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::common::http::get_local;
use crate::common::{
    Broker, Scrape, access_request, emulator, emulator_with_lifetime, id_request, in_time,
    next_token, policy_rule, scrape_until, write_policy,
};

const REQUESTS: &str = "tokenbroker_requests_total";
const FAILURES: &str = "tokenbroker_upstream_failures_total";

/// `emulator`'s broker with a metrics listener and `extra` flags: the
/// broker and the listener's address.
async fn observed(emulator: &Emulator, extra: &[&str]) -> (Broker, SocketAddr) {
    let flags = [&["--metrics-addr", "127.0.0.1:0"], extra].concat();
    let broker = Broker::start(emulator, &flags).await;
    let addr = broker.metrics_addr().await;
    (broker, addr)
}

#[tokio::test]
async fn hits_misses_and_coalesced_requests_are_counted() {
    let emulator = emulator(EmulatorConfig::default()).await;
    emulator.set_fault(Some(FaultRule::always(Fault::Delay { millis: 200 })));
    let (broker, addr) = observed(&emulator, &[]).await;
    let client = broker.typed_client().await;
    let calls = (0..10).map(|_| {
        let mut client = client.clone();
        async move {
            client
                .id_token(id_request("https://a.run.app"))
                .await
                .unwrap()
        }
    });
    futures_util::future::join_all(calls).await;
    let labels = |outcome| {
        [
            ("rpc", "GetIdToken"),
            ("token_kind", "id_token"),
            ("outcome", outcome),
        ]
    };
    let before = Scrape::of(addr).await;
    assert_eq!(before.value(REQUESTS, &labels("miss")), 1.0);
    assert_eq!(before.value(REQUESTS, &labels("coalesced")), 9.0);

    for _ in 0..25 {
        client
            .clone()
            .id_token(id_request("https://a.run.app"))
            .await
            .unwrap();
    }
    let after = Scrape::of(addr).await;
    assert_eq!(
        after.value(REQUESTS, &labels("hit")) - before.value(REQUESTS, &labels("hit")),
        25.0
    );
    assert_eq!(
        after.value("tokenbroker_upstream_fetches_total", &[("result", "ok")]),
        1.0
    );
    assert_eq!(
        after.value("tokenbroker_cache_entries", &[("token_kind", "id_token")]),
        1.0
    );
    assert_eq!(
        after.value(
            "tokenbroker_token_remaining_seconds_count",
            &[("rpc", "GetIdToken")]
        ),
        35.0
    );
    after.assert_at_least(
        "tokenbroker_upstream_fetch_duration_seconds_sum",
        &[("token_kind", "id_token")],
        0.2,
    );
    // Nothing in the labels identifies the audience by default.
    assert!(!after.0.contains("a.run.app"));
}

#[tokio::test]
async fn upstream_failures_are_counted_by_reason() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let (broker, addr) = observed(&emulator, &["--upstream-timeout", "300ms"]).await;
    let mut client = broker.client().await;
    let faults = [
        (
            Fault::Status {
                status: 503,
                retry_after_secs: None,
            },
            "http_5xx",
        ),
        (
            Fault::Status {
                status: 429,
                retry_after_secs: None,
            },
            "rate_limited",
        ),
        (
            Fault::Status {
                status: 403,
                retry_after_secs: None,
            },
            "http_4xx",
        ),
        (Fault::Garbage, "malformed"),
        (Fault::Hang, "timeout"),
    ];
    for (i, (fault, reason)) in faults.into_iter().enumerate() {
        emulator.set_fault(Some(FaultRule {
            fault,
            target: Target::Identity,
            times: None,
        }));
        let before = Scrape::of(addr)
            .await
            .value(FAILURES, &[("reason", reason)]);
        let audience = format!("https://fault-{i}.run.app");
        assert!(client.get_id_token(id_request(&audience)).await.is_err());
        let after = Scrape::of(addr)
            .await
            .value(FAILURES, &[("reason", reason), ("token_kind", "id_token")]);
        assert!(after > before, "{reason}: {before} -> {after}");
    }
    emulator.set_fault(None);
    emulator.stop().await;
    assert!(client.get_access_token(access_request(&[])).await.is_err());
    let scrape = Scrape::of(addr).await;
    scrape.assert_at_least(
        FAILURES,
        &[("reason", "connect"), ("token_kind", "access_token")],
        1.0,
    );
    let unavailable = [("code", "UNAVAILABLE"), ("rpc", "GetIdToken")];
    scrape.assert_at_least("tokenbroker_request_errors_total", &unavailable, 4.0);
    scrape.assert_at_least(
        "tokenbroker_request_errors_total",
        &[("code", "PERMISSION_DENIED")],
        1.0,
    );
}

#[tokio::test]
async fn the_watchers_gauge_follows_open_streams() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let (broker, addr) = observed(&emulator, &[]).await;
    let client = broker.typed_client().await;
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut stream = client
            .clone()
            .watch(GetAccessTokenRequest::default())
            .await
            .unwrap();
        next_token(&mut stream).await;
        streams.push(stream);
    }
    let watchers =
        |scrape: &Scrape| scrape.value("tokenbroker_watchers", &[("token_kind", "access_token")]);
    assert_eq!(watchers(&Scrape::of(addr).await), 3.0);
    streams.truncate(1);
    scrape_until(addr, |s| watchers(s) == 1.0).await;
    drop(streams);
    scrape_until(addr, |s| watchers(s) == 0.0).await;
}

#[tokio::test]
async fn background_refreshes_are_counted() {
    let emulator = emulator_with_lifetime(Duration::from_secs(4)).await;
    let (broker, addr) = observed(&emulator, &["--expiry-skew", "1s"]).await;
    let mut client = broker.typed_client().await;
    let mut stream = client.watch(id_request("https://a.run.app")).await.unwrap();
    next_token(&mut stream).await;
    next_token(&mut stream).await;
    let scrape = Scrape::of(addr).await;
    scrape.assert_at_least(
        "tokenbroker_refreshes_total",
        &[("result", "ok"), ("token_kind", "id_token")],
        1.0,
    );
    scrape.assert_at_least(
        "tokenbroker_token_remaining_seconds_count",
        &[("rpc", "WatchToken")],
        2.0,
    );
}

#[tokio::test]
async fn audiences_become_labels_only_when_asked() {
    let emulator = emulator(EmulatorConfig::default()).await;
    // The same request to a broker asked to label audiences, and to one
    // not asked.
    for (asked, expected) in [(true, 1.0), (false, 0.0)] {
        let flags: &[&str] = if asked {
            &["--metrics-label-audience"]
        } else {
            &[]
        };
        let (broker, addr) = observed(&emulator, flags).await;
        broker
            .typed_client()
            .await
            .id_token(id_request("https://labelled.run.app"))
            .await
            .unwrap();
        let scrape = Scrape::of(addr).await;
        let labelled = [
            ("audience", "https://labelled.run.app"),
            ("outcome", "miss"),
        ];
        assert_eq!(scrape.value(REQUESTS, &labelled), expected, "{flags:?}");
        assert_eq!(scrape.value(REQUESTS, &[("outcome", "miss")]), 1.0);
        assert_eq!(scrape.0.contains("labelled.run.app"), asked, "{}", scrape.0);
    }
}

#[tokio::test]
async fn audiences_of_denied_requests_never_become_labels() {
    let me = nix::unistd::geteuid().as_raw();
    let emulator = emulator(EmulatorConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let policy = write_policy(dir.path(), &policy_rule(me, "*", "https://allowed.run.app"));
    let (broker, addr) = observed(
        &emulator,
        &["--metrics-label-audience", "--policy", &policy],
    )
    .await;
    let mut client = broker.client().await;
    client
        .get_id_token(id_request("https://allowed.run.app"))
        .await
        .unwrap();
    for i in 0..3 {
        let audience = format!("https://denied-{i}.run.app");
        let denied = client
            .get_id_token(id_request(&audience))
            .await
            .unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    }
    let scrape = Scrape::of(addr).await;
    assert_eq!(
        scrape.value(
            "tokenbroker_request_errors_total",
            &[("code", "PERMISSION_DENIED")]
        ),
        3.0
    );
    assert!(!scrape.0.contains("denied-"), "{}", scrape.0);
    assert_eq!(
        scrape.value(REQUESTS, &[("audience", "https://allowed.run.app")]),
        1.0
    );
}

#[tokio::test]
async fn health_follows_the_metadata_server() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let metadata_addr = emulator.addr();
    let (broker, addr) = observed(&emulator, &[]).await;
    let mut health = broker.health_watch().await;
    // A watch opened before the broker published anything sees
    // SERVICE_UNKNOWN, then NOT_SERVING, then SERVING: wait for the last
    // (each status within the harness's patience).
    while health.next().await != ServingStatus::Serving {}
    assert_eq!(health.check("").await, ServingStatus::Serving);
    assert_eq!(get_local(addr, "/readyz").await.status, 200);

    // Down, and nothing cached: the next fetch fails and health turns.
    emulator.stop().await;
    let mut client = broker.client().await;
    assert!(
        client
            .get_id_token(id_request("https://a.run.app"))
            .await
            .is_err()
    );
    assert_eq!(health.next().await, ServingStatus::NotServing);
    assert_eq!(health.check("").await, ServingStatus::NotServing);
    assert_eq!(get_local(addr, "/readyz").await.status, 503);
    assert_eq!(get_local(addr, "/healthz").await.status, 200);

    // Back: the broker's probes notice without any client request.
    let _emulator =
        tokenbroker::emulator::Emulator::start(metadata_addr, EmulatorConfig::default())
            .await
            .unwrap();
    assert_eq!(health.next().await, ServingStatus::Serving);
    assert_eq!(get_local(addr, "/readyz").await.status, 200);
}

#[tokio::test]
async fn reflection_describes_the_services() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let broker = Broker::emulated(&[]).await;
    let mut reflection = ServerReflectionClient::new(broker.channel().await);
    let ask = |message| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(message),
    };
    let requests = futures_util::stream::iter([
        ask(MessageRequest::ListServices(String::new())),
        ask(MessageRequest::FileContainingSymbol(
            "tokenbroker.v1.TokenBroker".into(),
        )),
    ]);
    let mut responses = in_time(
        "the reflection stream",
        reflection.server_reflection_info(requests),
    )
    .await
    .unwrap()
    .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        in_time("the reflection answer", responses.message())
            .await
            .unwrap()
            .unwrap()
            .message_response
    else {
        panic!("expected a service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for service in ["tokenbroker.v1.TokenBroker", "grpc.health.v1.Health"] {
        assert!(
            names.iter().any(|n| n == service),
            "{service} not in {names:?}"
        );
    }
    let Some(MessageResponse::FileDescriptorResponse(files)) =
        in_time("the reflection answer", responses.message())
            .await
            .unwrap()
            .unwrap()
            .message_response
    else {
        panic!("expected a file descriptor");
    };
    let descriptor = String::from_utf8_lossy(&files.file_descriptor_proto[0]).into_owned();
    assert!(descriptor.contains("tokenbroker/v1/tokenbroker.proto"));
    assert!(descriptor.contains("GetIdTokenRequest"));
}

/// OTLP export: with the standard OTEL_EXPORTER_OTLP_* variables set, the
/// broker exports its metrics and spans to an OTLP collector (a fake one
/// here).
mod otlp {
    use std::net::{Ipv4Addr, SocketAddr};

    use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
        MetricsService, MetricsServiceServer,
    };
    use opentelemetry_proto::tonic::collector::metrics::v1::{
        ExportMetricsServiceRequest, ExportMetricsServiceResponse,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
        TraceService, TraceServiceServer,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };
    use tokio::sync::watch;
    use tonic::{Request, Response, Status};

    use crate::common::{Broker, PATIENCE, id_request};

    /// Names of every metric and span received so far.
    #[derive(Clone, Debug, Default)]
    struct Received {
        metrics: Vec<String>,
        spans: Vec<(String, Vec<String>)>,
    }

    #[derive(Clone)]
    struct Collector(watch::Sender<Received>);

    #[tonic::async_trait]
    impl MetricsService for Collector {
        async fn export(
            &self,
            request: Request<ExportMetricsServiceRequest>,
        ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
            let names: Vec<String> = request
                .into_inner()
                .resource_metrics
                .iter()
                .flat_map(|r| &r.scope_metrics)
                .flat_map(|s| &s.metrics)
                .map(|m| m.name.clone())
                .collect();
            self.0
                .send_modify(|received| received.metrics.extend(names));
            Ok(Response::new(ExportMetricsServiceResponse::default()))
        }
    }

    #[tonic::async_trait]
    impl TraceService for Collector {
        async fn export(
            &self,
            request: Request<ExportTraceServiceRequest>,
        ) -> Result<Response<ExportTraceServiceResponse>, Status> {
            let spans: Vec<(String, Vec<String>)> = request
                .into_inner()
                .resource_spans
                .iter()
                .flat_map(|r| &r.scope_spans)
                .flat_map(|s| &s.spans)
                .map(|span| {
                    let values = span
                        .attributes
                        .iter()
                        .map(|a| format!("{}={:?}", a.key, a.value))
                        .collect();
                    (span.name.clone(), values)
                })
                .collect();
            self.0.send_modify(|received| received.spans.extend(spans));
            Ok(Response::new(ExportTraceServiceResponse::default()))
        }
    }

    #[tokio::test]
    async fn metrics_and_spans_reach_an_otlp_collector() {
        let listener = tokio::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await
            .unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let collector = Collector(watch::Sender::new(Received::default()));
        let mut received = collector.0.subscribe();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(MetricsServiceServer::new(collector.clone()))
                .add_service(TraceServiceServer::new(collector))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );

        let broker = Broker::spawn(
            vec!["--emulator".into()],
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
                ("OTEL_METRIC_EXPORT_INTERVAL", "200"),
                ("OTEL_BSP_SCHEDULE_DELAY", "200"),
            ],
        )
        .await;
        let token = broker
            .typed_client()
            .await
            .id_token(id_request("https://a.run.app"))
            .await
            .unwrap()
            .token;

        let arrived = tokio::time::timeout(
            PATIENCE,
            received.wait_for(|r| {
                r.metrics.iter().any(|m| m == "tokenbroker.requests")
                    && r.spans.iter().any(|(name, _)| name == "rpc")
                    && r.spans.iter().any(|(name, _)| name == "upstream_fetch")
            }),
        )
        .await
        .map(|found| found.map(|r| r.clone()));
        let received = received.borrow().clone();
        assert!(matches!(arrived, Ok(Ok(_))), "collector got {received:?}");
        let (_, rpc) = received
            .spans
            .iter()
            .find(|(name, _)| name == "rpc")
            .unwrap();
        let attributes = rpc.join(" ");
        assert!(
            attributes.contains("GetIdToken") && attributes.contains("miss"),
            "{attributes}"
        );
        let everything = format!("{received:?}");
        assert!(
            !everything.contains(&token),
            "a token reached the collector"
        );
    }
}

#[tokio::test]
async fn the_task_gauge_grows_with_connections_and_comes_back() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let (broker, addr) = observed(&emulator, &[]).await;
    let tasks = |scrape: &Scrape| scrape.value("tokenbroker_runtime_tasks", &[]);
    // The key's refresh task lives as long as the key: start with it.
    let mut first = broker.client().await;
    first.get_id_token(id_request("https://t")).await.unwrap();
    let baseline = tasks(&scrape_until(addr, |scrape| tasks(scrape) > 0.0).await);
    let mut clients = Vec::new();
    for _ in 0..10 {
        let mut client = broker.client().await;
        client.get_id_token(id_request("https://t")).await.unwrap();
        clients.push(client);
    }
    scrape_until(addr, |scrape| tasks(scrape) >= baseline + 10.0).await;
    drop(clients);
    scrape_until(addr, |scrape| tasks(scrape) <= baseline).await;
}
