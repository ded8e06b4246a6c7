//! The operators' HTTP listener (`--metrics-addr`): `/metrics` in the
//! Prometheus text format, `/healthz` (the process is alive) and `/readyz`
//! (the broker can hand out tokens, as in gRPC health). Its connections are
//! bounded, and one that sends no request within
//! [`connections::HEADER_READ_TIMEOUT`] (also between keep-alive requests)
//! is closed.

use std::convert::Infallible;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use prometheus::{Encoder, TextEncoder};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::connections::{self, Acceptor, Listener, ListenerLimits};
use crate::telemetry::health::Health;

/// Serves the admin endpoints on `listener`, within `limits`, until `stop`.
pub async fn serve(
    listener: TcpListener,
    limits: ListenerLimits,
    registry: prometheus::Registry,
    health: Health,
    stop: CancellationToken,
) {
    let mut acceptor = Acceptor::new(Listener::Metrics.as_str());
    let connections = TaskTracker::new();
    loop {
        let stream = tokio::select! {
            () = stop.cancelled() => return,
            stream = acceptor.accept(&listener) => stream,
        };
        let Some(permit) = limits.admit(None) else {
            continue;
        };
        let (registry, health) = (registry.clone(), health.clone());
        let service = service_fn(move |request| {
            std::future::ready(Ok::<_, Infallible>(respond(&request, &registry, &health)))
        });
        connections::spawn_http1(stream, service, permit, &stop, &connections);
    }
}

fn respond(
    request: &Request<Incoming>,
    registry: &prometheus::Registry,
    health: &Health,
) -> Response<Full<Bytes>> {
    if request.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    match request.uri().path() {
        "/metrics" => {
            let mut body = Vec::new();
            match TextEncoder::new().encode(&registry.gather(), &mut body) {
                Ok(()) => {
                    let mut response = Response::new(Full::new(Bytes::from(body)));
                    response.headers_mut().insert(
                        header::CONTENT_TYPE,
                        prometheus::TEXT_FORMAT.parse().expect("valid header"),
                    );
                    response
                }
                Err(error) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("cannot encode metrics: {error}\n"),
                ),
            }
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if health.is_serving() => text(StatusCode::OK, "serving\n"),
        "/readyz" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not serving: the token source cannot be reached and no cached token is valid, or (with workload identity) the node's pods have not been read from the Kubernetes API server yet\n",
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "endpoints: /metrics /healthz /readyz\n",
        ),
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
}
