//! With the standard OTEL_EXPORTER_OTLP_* variables set, the broker exports
//! its metrics and spans to an OTLP collector (a fake one here).

use std::net::{Ipv4Addr, SocketAddr};

use crate::common::{Broker, PATIENCE, id_request};
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
        .client()
        .await
        .get_id_token(id_request("https://a.run.app"))
        .await
        .unwrap()
        .into_inner()
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
