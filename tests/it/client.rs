//! The typed Rust client (`tokenbroker::client::Client`) against the real
//! broker: unary calls, the `watch` stream, and its errors.

use std::time::Duration;

use tokenbroker::client::{Client, ClientError};
use tokenbroker::proto::v1::{GetAccessTokenRequest, GetIdTokenRequest};

use crate::common::{self, Broker, emulator_with_lifetime, next_token};

#[tokio::test]
async fn the_typed_client_gets_and_watches_tokens() {
    let emulator = emulator_with_lifetime(Duration::from_secs(4)).await;
    let broker = Broker::start(&emulator, &["--expiry-skew", "1s"]).await;
    let mut client = Client::connect(&broker.socket).await.unwrap();

    let access = client
        .access_token(GetAccessTokenRequest {
            scopes: vec!["s:typed".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        emulator.token_info(&access.token).unwrap().scopes,
        vec!["s:typed"]
    );

    let request = GetIdTokenRequest {
        audience: "https://typed.a.run.app".into(),
        ..Default::default()
    };
    let id = client.id_token(request.clone()).await.unwrap();
    let mut tokens = client.watch(request).await.unwrap();
    let first = next_token(&mut tokens).await;
    assert_eq!(first.secret(), id.token, "the current token comes first");
    let second = next_token(&mut tokens).await;
    assert_ne!(second.secret(), first.secret(), "then each refreshed one");
    assert_eq!(
        common::claims(second.secret())["aud"],
        "https://typed.a.run.app"
    );
    assert!(second.expire_time().unwrap() > first.expire_time().unwrap());
}

#[tokio::test]
async fn the_typed_client_reports_statuses_and_missing_brokers() {
    let emulator = emulator_with_lifetime(Duration::from_secs(3600)).await;
    let broker = Broker::start(&emulator, &[]).await;
    let mut client = Client::connect(&broker.socket).await.unwrap();
    let error = client
        .id_token(GetIdTokenRequest::default())
        .await
        .unwrap_err();
    assert_eq!(
        error.status().map(tonic::Status::code),
        Some(tonic::Code::InvalidArgument)
    );
    let mut watch = client
        .watch(GetIdTokenRequest::default())
        .await
        .map(|_| ())
        .unwrap_err();
    assert!(
        matches!(&mut watch, ClientError::Status(s) if s.code() == tonic::Code::InvalidArgument)
    );

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("none.sock");
    let error = Client::connect(&missing).await.unwrap_err();
    assert!(matches!(error, ClientError::Connect { .. }));
    assert!(error.to_string().contains("none.sock"), "{error}");
}
