//! Clients in other languages talk to the broker binary over its socket as
//! they come: Python grpcio stubs generated from the proto, with no channel
//! options (gRPC C-core then sends the percent-encoded socket path as
//! `:authority`), and grpc-js sending the raw path, as grpc-java and grpcurl
//! do.

use tokio::process::Command;

use crate::common::{self, Broker, output, root, succeeds};

#[tokio::test]
async fn a_stock_python_grpcio_client_calls_every_rpc_health_and_reflection() {
    let python = common::python().await;
    let broker = Broker::emulated(&[]).await;
    let out_dir = tempfile::tempdir().unwrap();
    let printed = succeeds(
        Command::new(python)
            .arg(root().join("tests/python/broker_client.py"))
            .arg(&broker.socket)
            .arg(root().join("proto"))
            .arg(out_dir.path()),
    )
    .await;
    let seen: serde_json::Value = serde_json::from_str(&printed).unwrap();
    assert_eq!(seen["id_token_aud"], "https://hello-abc123-uc.a.run.app");
    assert_eq!(seen["watch_first_matches"], true);
    assert_eq!(seen["empty_audience"], "INVALID_ARGUMENT");
    assert_eq!(seen["invalidated"], true);
    assert_eq!(seen["health"], "SERVING");
    assert_eq!(
        seen["reflected_services"],
        serde_json::json!([
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
            "tokenbroker.v1.TokenBroker"
        ])
    );
    assert!(
        seen["access_token"]
            .as_str()
            .unwrap()
            .starts_with("ya29.emulator.")
    );
}

#[tokio::test]
async fn grpc_js_sending_the_raw_socket_path_as_authority_gets_tokens() {
    let node_path = common::node_example_path().await;
    let broker = Broker::emulated(&[]).await;
    let path = broker.socket.to_str().unwrap().to_string();
    for authority in [path.clone(), format!("unix:{path}"), "localhost".into()] {
        let output = output(
            Command::new("node")
                .arg(root().join("tests/node/grpc_js_authority_client.js"))
                .arg(&broker.socket)
                .arg(root().join("proto/tokenbroker/v1/tokenbroker.proto"))
                .arg(&authority)
                .arg("https://hello-abc123-uc.a.run.app")
                .env("NODE_PATH", &node_path),
        )
        .await;
        assert!(
            output.status.success(),
            "authority {authority:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
