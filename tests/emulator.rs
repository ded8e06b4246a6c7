//! The metadata server emulator keeps the real server's rules.

mod common;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokenbroker::emulator::{Emulator, EmulatorConfig};

const ACCOUNTS: &str = "/computeMetadata/v1/instance/service-accounts/";

async fn get(emulator: &Emulator, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let mut request = http::Request::get(format!("http://{}{path}", emulator.host()));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = client
        .request(request.body(Empty::new()).unwrap())
        .await
        .unwrap();
    let status = response.status().as_u16();
    assert_eq!(response.headers()["metadata-flavor"], "Google");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

const FLAVOR: (&str, &str) = ("Metadata-Flavor", "Google");

#[tokio::test]
async fn requires_the_flavor_header_and_refuses_proxied_requests() {
    let emulator = common::emulator(EmulatorConfig::default()).await;
    let token = format!("{ACCOUNTS}default/token");
    assert_eq!(get(&emulator, &token, &[]).await.0, 403);
    assert_eq!(
        get(&emulator, &token, &[("Metadata-Flavor", "Other")])
            .await
            .0,
        403
    );
    let proxied = [FLAVOR, ("X-Forwarded-For", "10.0.0.1")];
    assert_eq!(get(&emulator, &token, &proxied).await.0, 403);
    assert_eq!(emulator.stats().rejected_requests, 3);
    assert_eq!(emulator.stats().token_requests, 0);
    let (status, body) = get(&emulator, &token, &[FLAVOR]).await;
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["token_type"], "Bearer");
    assert_eq!(json["expires_in"], 3600);
}

#[tokio::test]
async fn lists_accounts_and_knows_their_emails() {
    let emulator = common::emulator(EmulatorConfig {
        accounts: vec![
            "a@p.iam.gserviceaccount.com".into(),
            "b@p.iam.gserviceaccount.com".into(),
        ],
        ..EmulatorConfig::default()
    })
    .await;
    let (status, listing) = get(&emulator, ACCOUNTS, &[FLAVOR]).await;
    assert_eq!(status, 200);
    assert_eq!(
        listing,
        "default/\na@p.iam.gserviceaccount.com/\nb@p.iam.gserviceaccount.com/\n"
    );
    let email = |account: &'static str| {
        let emulator = &emulator;
        async move { get(emulator, &format!("{ACCOUNTS}{account}/email"), &[FLAVOR]).await }
    };
    assert_eq!(
        email("default").await,
        (200, "a@p.iam.gserviceaccount.com".into())
    );
    assert_eq!(
        email("b@p.iam.gserviceaccount.com").await.1,
        "b@p.iam.gserviceaccount.com"
    );
    assert_eq!(email("nobody@p.iam.gserviceaccount.com").await.0, 404);
}

#[tokio::test]
async fn identity_needs_an_audience_and_signs_its_claims() {
    let emulator = common::emulator(EmulatorConfig::default()).await;
    let identity = format!("{ACCOUNTS}default/identity");
    let (status, body) = get(&emulator, &identity, &[FLAVOR]).await;
    assert_eq!(
        (status, body.as_str()),
        (400, "non-empty audience parameter required")
    );
    let (status, jwt) = get(
        &emulator,
        &format!("{identity}?audience=https%3A%2F%2Fa.run.app&format=full&licenses=TRUE"),
        &[FLAVOR],
    )
    .await;
    assert_eq!(status, 200);
    let claims = common::claims(&jwt);
    assert_eq!(claims["aud"], "https://a.run.app");
    assert_eq!(claims["iss"], "https://accounts.google.com");
    assert_eq!(claims["email"], tokenbroker::emulator::DEFAULT_ACCOUNT);
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
        3600
    );
    assert!(claims["google"]["compute_engine"]["license_id"].is_array());
    assert_eq!(jwt.split('.').count(), 3);
}
