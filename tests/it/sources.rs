//! Token sources beyond the metadata server, end to end: the broker binary
//! with a service-account key, gcloud user credentials, and impersonation,
//! against the emulator's fake OAuth endpoint and IAM Credentials API, which
//! verify the RS256 signature, the claims and the bearer tokens.

use tokenbroker::emulator::google::User;
use tokenbroker::emulator::{Emulator, EmulatorConfig, Fault, FaultRule, Target};
use tokenbroker::proto::v1::{GetAccessTokenRequest, GetIdTokenRequest, IdTokenFormat, token};
use tonic::Code;

use crate::common::{
    self, Broker, KEY_ACCOUNT, TEST_KEYS, access_request, assert_no_piece_of, claims, emulator,
    id_request, invalidate_id, invalidated, key_json, next_token, serve_fails, trusted_key_file,
    write_file,
};

const AUDIENCE: &str = "https://svc-abc123-uc.a.run.app";
const CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";
const TARGET: &str = "target@test-project.iam.gserviceaccount.com";
const DELEGATE: &str = "middle@test-project.iam.gserviceaccount.com";

fn flag(path: &std::path::Path) -> String {
    path.to_str().unwrap().to_string()
}

/// The broker with a key file `emulator` trusts, and `extra` flags.
async fn broker_with_key(emulator: &Emulator, extra: &[&str]) -> (Broker, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let key = flag(&trusted_key_file(emulator, dir.path()));
    let broker = Broker::start(emulator, &[&["--credentials", &key], extra].concat()).await;
    (broker, dir)
}

/// The account of the default access token `broker` serves (minted by
/// `emulator`).
async fn access_token_account(broker: &Broker, emulator: &Emulator) -> String {
    let token = broker
        .typed_client()
        .await
        .access_token(access_request(&[]))
        .await
        .unwrap()
        .token;
    emulator
        .token_info(&token)
        .expect("a token the emulator minted")
        .email
}

/// The status `broker` refuses the ID token for [`AUDIENCE`] with.
async fn id_token_refused(broker: &Broker) -> tonic::Status {
    let mut client = broker.client().await;
    client.get_id_token(id_request(AUDIENCE)).await.unwrap_err()
}

/// Asserts how many tokens the emulator's OAuth endpoint granted.
fn assert_oauth_requests(emulator: &Emulator, count: u64, why: &str) {
    assert_eq!(emulator.stats().oauth_requests, count, "{why}");
}

/// Flags for a metrics listener (and `/readyz`) on a free port.
const METRICS: [&str; 2] = ["--metrics-addr", "127.0.0.1:0"];

/// Waits until `/readyz` says the broker is ready: its health probe
/// reached every service it needs. Probing costs no token.
async fn ready_at_no_token_cost(broker: &Broker, emulator: &Emulator) {
    broker.wait_until_serving().await;
    let readyz = common::http::get_local(broker.metrics_addr().await, "/readyz").await;
    assert_eq!(readyz.status, 200, "/readyz follows health");
    let stats = emulator.stats();
    assert_eq!(
        stats.oauth_requests + stats.iam_requests,
        0,
        "probing costs no token"
    );
}

async fn watch_first_id_token(broker: &Broker) -> String {
    let mut stream = broker
        .typed_client()
        .await
        .watch(id_request(AUDIENCE))
        .await
        .unwrap();
    match next_token(&mut stream).await {
        token::Token::IdToken(token) => token.token,
        other => panic!("expected an ID token, got {other:?}"),
    }
}

#[tokio::test]
async fn a_key_file_serves_all_three_rpcs_through_the_jwt_bearer_grant() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let (broker, _dir) = broker_with_key(&emulator, &[]).await;
    broker.wait_for_log("the key file").await;
    let mut client = broker.typed_client().await;

    let access = client
        .access_token(access_request(&["scope:b", "scope:a"]))
        .await
        .unwrap();
    let info = emulator
        .token_info(&access.token)
        .expect("issued by the OAuth endpoint");
    assert_eq!(info.email, KEY_ACCOUNT);
    assert_eq!(
        info.scopes,
        ["scope:a", "scope:b"],
        "space-separated scope claim"
    );
    assert_eq!(access.token_type, "Bearer");
    // No scopes asked for: cloud-platform.
    let default = client.access_token(access_request(&[])).await.unwrap();
    let info = emulator.token_info(&default.token).unwrap();
    assert_eq!(info.scopes, [CLOUD_PLATFORM]);

    let id = client.id_token(id_request(AUDIENCE)).await.unwrap();
    let claims = claims(&id.token);
    assert_eq!(claims["aud"], AUDIENCE);
    assert_eq!(claims["email"], KEY_ACCOUNT);

    assert_eq!(
        watch_first_id_token(&broker).await,
        id.token,
        "watch shares the cache"
    );
    // The key's own email is as good as "default".
    let own = GetIdTokenRequest {
        service_account: KEY_ACCOUNT.into(),
        ..id_request(AUDIENCE)
    };
    client.id_token(own).await.unwrap();

    let stats = emulator.stats();
    assert_eq!(stats.oauth_requests, 4, "two access tokens, two ID tokens");
    assert_eq!(stats.google_rejected, 0);
    assert_eq!(
        stats.token_requests + stats.identity_requests,
        0,
        "no metadata server"
    );
    let logs = broker.logs();
    assert!(
        !logs.contains("PRIVATE KEY") && !logs.contains("MII"),
        "the key was logged"
    );
    assert!(!logs.contains(&id.token) && !logs.contains(&access.token));
}

#[tokio::test]
async fn a_key_file_refuses_other_accounts_and_full_format() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let (broker, _dir) = broker_with_key(&emulator, &[]).await;
    let mut client = broker.client().await;
    let other = GetAccessTokenRequest {
        service_account: "other@test-project.iam.gserviceaccount.com".into(),
        ..access_request(&[])
    };
    let status = client.get_access_token(other).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(status.message().contains(KEY_ACCOUNT), "{status}");
    let full = GetIdTokenRequest {
        format: IdTokenFormat::Full as i32,
        ..id_request(AUDIENCE)
    };
    let status = client.get_id_token(full).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("ID_TOKEN_FORMAT_STANDARD"),
        "{status}"
    );
    assert_oauth_requests(&emulator, 0, "refused before any fetch");
}

#[tokio::test]
async fn the_token_endpoint_checks_the_signature() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    // The file signs with key 1, but the endpoint knows kid-1 by key 2's
    // public half, as after the key was rotated out.
    emulator.add_service_account_key("kid-1", KEY_ACCOUNT, TEST_KEYS[1].1.to_vec());
    let key = write_file(dir.path(), "key.json", &key_json(&emulator, "kid-1"), 0o600);
    let broker = Broker::start(&emulator, &["--credentials", &flag(&key)]).await;
    let status = id_token_refused(&broker).await;
    assert_eq!(
        status.code(),
        Code::InvalidArgument,
        "HTTP 400, as from the metadata server"
    );
    assert!(
        status
            .message()
            .contains("invalid_grant: Invalid JWT Signature."),
        "{status}"
    );
    assert_eq!(emulator.stats().google_rejected, 1, "not retried");
}

#[tokio::test]
async fn upstream_errors_of_the_token_endpoint_map_like_the_metadata_servers() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let (broker, _dir) = broker_with_key(&emulator, &[]).await;
    let mut client = broker.client().await;
    emulator.set_fault(Some(FaultRule {
        fault: Fault::Status {
            status: 403,
            retry_after_secs: None,
        },
        target: Target::Token,
        times: Some(1),
    }));
    let status = client
        .get_access_token(access_request(&[]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(status.message().contains("HTTP 403"), "{status}");
    emulator.set_fault(Some(FaultRule::always(Fault::Status {
        status: 503,
        retry_after_secs: None,
    })));
    let status = client.get_id_token(id_request(AUDIENCE)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    emulator.set_fault(None);
    assert!(client.get_id_token(id_request(AUDIENCE)).await.is_ok());
}

#[tokio::test]
async fn invalidation_works_with_a_key_file() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let (broker, _dir) = broker_with_key(&emulator, &[]).await;
    let mut tokens = broker.typed_client().await;
    let first = tokens.id_token(id_request(AUDIENCE)).await.unwrap().token;
    let mut client = broker.client().await;
    assert!(invalidated(&mut client, invalidate_id(AUDIENCE, &first)).await);
    let second = tokens.id_token(id_request(AUDIENCE)).await.unwrap().token;
    assert_ne!(first, second);
    assert_oauth_requests(&emulator, 2, "the first token and its replacement");
}

#[tokio::test]
async fn a_broker_with_a_key_file_gets_ready_at_no_token_cost() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let (broker, _dir) = broker_with_key(&emulator, &METRICS).await;
    ready_at_no_token_cost(&broker, &emulator).await;
}

#[tokio::test]
async fn the_health_probe_goes_to_the_key_files_token_endpoint() {
    // The metadata server is up, the key's token endpoint (a closed port)
    // is not: the probe fails, naming the service it tried.
    let emulator = emulator(EmulatorConfig::default()).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let dir = tempfile::tempdir().unwrap();
    let mut json = key_json(&emulator, "kid-1");
    json["token_uri"] = format!("http://127.0.0.1:{port}/token").into();
    let key = write_file(dir.path(), "key.json", &json, 0o600);
    let broker = Broker::spawn(
        vec![
            "--metadata-host".into(),
            emulator.host(),
            "--credentials".into(),
            flag(&key),
        ],
        &[("RUST_LOG", "info,tokenbroker::telemetry::health=debug")],
    )
    .await;
    broker.wait_for_log("probe failed").await;
    let logs = broker.logs();
    let failure = logs
        .lines()
        .find(|line| line.contains("probe failed"))
        .unwrap();
    assert!(failure.contains("OAuth token endpoint"), "{failure}");
    assert_eq!(
        emulator.stats(),
        Default::default(),
        "the metadata server was not asked"
    );
}

#[tokio::test]
async fn bad_key_files_stop_the_broker_with_a_clear_message() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s.sock");
    let start = async |json: serde_json::Value, mode: u32| {
        let key = write_file(dir.path(), "key.json", &json, mode);
        serve_fails(&socket, &["--credentials", key.to_str().unwrap()]).await
    };
    let good = key_json(&emulator, "kid-1");
    let stderr = start(good.clone(), 0o644).await;
    assert!(
        stderr.contains("every user") && stderr.contains("chmod 600"),
        "{stderr}"
    );

    let mut missing = good.clone();
    missing.as_object_mut().unwrap().remove("client_email");
    let stderr = start(missing, 0o600).await;
    assert!(stderr.contains("\"client_email\" is missing"), "{stderr}");

    let mut wrong_type = good.clone();
    wrong_type["private_key"] = serde_json::json!(42);
    let stderr = start(wrong_type, 0o600).await;
    assert!(
        stderr.contains("\"private_key\" is not a string"),
        "{stderr}"
    );

    let mut other_type = good.clone();
    other_type["type"] = "gdch_service_account".into();
    let stderr = start(other_type, 0o600).await;
    assert!(stderr.contains("\"gdch_service_account\""), "{stderr}");

    let mut remote_http = good.clone();
    remote_http["token_uri"] = "http://oauth2.googleapis.com/token".into();
    let stderr = start(remote_http, 0o600).await;
    assert!(stderr.contains("loopback"), "{stderr}");

    let key = dir.path().join("key.json");
    std::fs::write(&key, "this is not JSON").unwrap();
    let stderr = serve_fails(&socket, &["--credentials", key.to_str().unwrap()]).await;
    assert!(stderr.contains("not a JSON object"), "{stderr}");
    assert!(
        !stderr.contains("PRIVATE KEY") && !stderr.contains("MII"),
        "{stderr}"
    );
    assert!(!socket.exists(), "nothing was served");
}

#[tokio::test]
async fn discovery_prefers_the_variable_then_gclouds_file_then_the_metadata_server() {
    let emulator = emulator(EmulatorConfig::default()).await;
    emulator.add_user(User {
        client_id: "client-1.apps.googleusercontent.com".into(),
        client_secret: "client-secret".into(),
        refresh_token: "1//refresh".into(),
        email: "dev@example.com".into(),
    });
    let home = tempfile::tempdir().unwrap();
    let user = serde_json::json!({
        "type": "authorized_user",
        "client_id": "client-1.apps.googleusercontent.com",
        "client_secret": "client-secret",
        "refresh_token": "1//refresh",
        "token_uri": emulator.token_uri(),
    });
    let home_flag = flag(home.path());
    let metadata = ["--metadata-host".to_string(), emulator.host()];
    let email_of = async |broker: &Broker| access_token_account(broker, &emulator).await;

    // Nothing configured: the metadata server.
    let broker = Broker::spawn(metadata.to_vec(), &[("HOME", &home_flag)]).await;
    broker.wait_for_log("the metadata server at").await;
    assert_eq!(
        email_of(&broker).await,
        tokenbroker::emulator::DEFAULT_ACCOUNT
    );
    drop(broker);

    // gcloud's well-known file under $HOME.
    write_file(
        home.path(),
        ".config/gcloud/application_default_credentials.json",
        &user,
        0o600,
    );
    let broker = Broker::spawn(metadata.to_vec(), &[("HOME", &home_flag)]).await;
    broker
        .wait_for_log("gcloud's application default credentials")
        .await;
    assert_eq!(email_of(&broker).await, "dev@example.com");
    // User credentials cannot mint ID tokens: the error says what to do.
    let status = id_token_refused(&broker).await;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("--impersonate"), "{status}");
    assert!(
        !broker.logs().contains("1//refresh"),
        "the refresh token was logged"
    );
    drop(broker);

    // $CLOUDSDK_CONFIG moves gcloud's directory: the file under HOME is
    // no longer looked at.
    let moved = tempfile::tempdir().unwrap();
    let broker = Broker::spawn(
        metadata.to_vec(),
        &[
            ("HOME", &home_flag),
            ("CLOUDSDK_CONFIG", &flag(moved.path())),
        ],
    )
    .await;
    assert_eq!(
        email_of(&broker).await,
        tokenbroker::emulator::DEFAULT_ACCOUNT
    );
    drop(broker);

    // GOOGLE_APPLICATION_CREDENTIALS wins over gcloud's file.
    let key = trusted_key_file(&emulator, home.path());
    let broker = Broker::spawn(
        metadata.to_vec(),
        &[
            ("HOME", &home_flag),
            ("GOOGLE_APPLICATION_CREDENTIALS", &flag(&key)),
        ],
    )
    .await;
    broker.wait_for_log("GOOGLE_APPLICATION_CREDENTIALS").await;
    assert_eq!(email_of(&broker).await, KEY_ACCOUNT);
    drop(broker);

    // A variable naming a missing file is an error, not a fallback.
    let mut missing = common::binary();
    missing
        .args(["serve", "--socket"])
        .arg(home.path().join("s.sock"))
        .env("HOME", home.path())
        .env(
            "GOOGLE_APPLICATION_CREDENTIALS",
            home.path().join("gone.json"),
        );
    let output = common::output(&mut missing).await;
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("gone.json"));
}

async fn impersonating(emulator: &Emulator, extra: &[&str]) -> Broker {
    emulator.allow_impersonation(TARGET);
    emulator.allow_impersonation(DELEGATE);
    let endpoint = emulator.iam_endpoint();
    let mut args = vec!["--impersonate", TARGET, "--iam-endpoint", &endpoint];
    args.extend_from_slice(extra);
    Broker::start(emulator, &args).await
}

#[tokio::test]
async fn impersonation_mints_tokens_for_the_target_with_the_base_token() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let broker = impersonating(&emulator, &["--delegates", DELEGATE]).await;
    broker.wait_for_log("impersonation of").await;
    let mut tokens = broker.typed_client().await;

    let access = tokens
        .access_token(access_request(&["scope:x"]))
        .await
        .unwrap();
    let info = emulator.token_info(&access.token).unwrap();
    assert_eq!(info.email, TARGET);
    assert_eq!(info.scopes, ["scope:x"]);

    let id = tokens.id_token(id_request(AUDIENCE)).await.unwrap();
    let claims = claims(&id.token);
    assert_eq!(claims["aud"], AUDIENCE);
    assert_eq!(claims["email"], TARGET);
    assert_eq!(watch_first_id_token(&broker).await, id.token);

    let calls = emulator.iam_calls();
    assert_eq!(calls.len(), 2);
    for call in &calls {
        assert_eq!(call.target, TARGET);
        assert_eq!(
            call.caller,
            tokenbroker::emulator::DEFAULT_ACCOUNT,
            "the base token"
        );
        assert_eq!(
            call.delegates,
            [format!("projects/-/serviceAccounts/{DELEGATE}")]
        );
    }
    assert_eq!(calls[0].method, "generateAccessToken");
    assert_eq!(calls[0].body["lifetime"], "3600s");
    assert_eq!(calls[1].method, "generateIdToken");
    assert_eq!(calls[1].body["includeEmail"], true);
    // The base token was fetched once (cloud-platform) and reused.
    assert_eq!(emulator.stats().token_requests, 1);

    let other = GetIdTokenRequest {
        service_account: KEY_ACCOUNT.into(),
        ..id_request(AUDIENCE)
    };
    let status = broker.client().await.get_id_token(other).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(status.message().contains(TARGET), "{status}");
}

#[tokio::test]
async fn impersonation_can_build_on_a_key_file() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let key = trusted_key_file(&emulator, dir.path());
    let key = flag(&key);
    let broker = impersonating(
        &emulator,
        &[&["--credentials", &key], &METRICS[..]].concat(),
    )
    .await;
    // Health probes the key's token endpoint and the IAM API.
    ready_at_no_token_cost(&broker, &emulator).await;
    assert_eq!(access_token_account(&broker, &emulator).await, TARGET);
    assert_eq!(emulator.iam_calls()[0].caller, KEY_ACCOUNT);
    assert_oauth_requests(&emulator, 1, "the key's token authorised the call");
}

#[tokio::test]
async fn iam_refusals_reach_the_client_with_their_explanation() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let endpoint = emulator.iam_endpoint();
    let broker = Broker::start(
        &emulator,
        &["--impersonate", TARGET, "--iam-endpoint", &endpoint],
    )
    .await;
    // Nobody allowed the base account to impersonate the target.
    let status = id_token_refused(&broker).await;
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status
            .message()
            .contains("iam.serviceAccounts.getOpenIdToken"),
        "{status}"
    );
}

#[tokio::test]
async fn plain_http_endpoints_must_be_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let stderr = serve_fails(
        &dir.path().join("s.sock"),
        &[
            "--emulator",
            "--impersonate",
            TARGET,
            "--iam-endpoint",
            "http://iamcredentials.googleapis.com",
        ],
    )
    .await;
    assert!(
        stderr.contains("--iam-endpoint") && stderr.contains("loopback"),
        "{stderr}"
    );
}

#[tokio::test]
async fn the_emulator_flag_skips_credentials_discovery() {
    let home = tempfile::tempdir().unwrap();
    let broker = Broker::spawn(
        vec!["--emulator".into()],
        &[(
            "GOOGLE_APPLICATION_CREDENTIALS",
            &flag(&home.path().join("absent.json")),
        )],
    )
    .await;
    broker
        .wait_for_log("the metadata server at 127.0.0.1")
        .await;
    assert!(
        broker
            .client()
            .await
            .get_id_token(id_request(AUDIENCE))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn https_uses_rustls_with_the_platforms_roots() {
    let emulator = emulator(EmulatorConfig::default()).await;
    emulator.allow_impersonation(TARGET);
    let front = common::http::tls_front(emulator.addr()).await;
    let endpoint = format!("https://127.0.0.1:{}", front.port());
    let args = vec![
        "--metadata-host".to_string(),
        emulator.host(),
        "--impersonate".into(),
        TARGET.into(),
        "--iam-endpoint".into(),
        endpoint,
        "--upstream-max-attempts".into(),
        "1".into(),
    ];
    let ca = common::http::TEST_CA;

    // The test CA is not among the platform's roots: the certificate is
    // refused.
    let untrusting = Broker::spawn(args.clone(), &[]).await;
    let status = untrusting
        .client()
        .await
        .get_access_token(access_request(&[]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("certificate"), "{status}");
    assert!(emulator.iam_calls().is_empty());
    drop(untrusting);

    // Trusted through SSL_CERT_FILE, as the platform's roots are found.
    let trusting = Broker::spawn(args, &[("SSL_CERT_FILE", ca)]).await;
    assert_eq!(access_token_account(&trusting, &emulator).await, TARGET);
    assert_eq!(emulator.iam_calls().len(), 1);
}

#[tokio::test]
async fn no_key_or_token_reaches_the_logs_even_at_trace_level() {
    let emulator = emulator(EmulatorConfig::default()).await;
    emulator.allow_impersonation(TARGET);
    let dir = tempfile::tempdir().unwrap();
    let key = trusted_key_file(&emulator, dir.path());
    let mut args = vec!["--metadata-host".to_string(), emulator.host()];
    args.extend(
        [
            "--credentials",
            &flag(&key),
            "--impersonate",
            TARGET,
            "--iam-endpoint",
            &emulator.iam_endpoint(),
        ]
        .map(String::from),
    );
    let mut broker = Broker::spawn(args, &[("RUST_LOG", "trace")]).await;
    let mut tokens = broker.typed_client().await;
    let access = tokens
        .access_token(access_request(&[]))
        .await
        .unwrap()
        .token;
    let id = tokens.id_token(id_request(AUDIENCE)).await.unwrap().token;
    let mut client = broker.client().await;
    assert!(invalidated(&mut client, invalidate_id(AUDIENCE, &id)).await);
    let replacement = tokens.id_token(id_request(AUDIENCE)).await.unwrap().token;
    broker.stop().await;
    broker.wait_for_log("stopped").await;
    let logs = broker.logs();
    assert!(logs.lines().count() > 100, "trace logging is not on");
    for secret in [&access, &id, &replacement] {
        assert_no_piece_of(secret, &logs);
    }
    for line in TEST_KEYS[0].0.lines().filter(|l| !l.starts_with("-----")) {
        assert_no_piece_of(line, &logs);
    }
    // Every intermediate credential: the signed JWT assertions and the
    // bearer tokens sent to IAM Credentials.
    let sent = emulator.received_credentials();
    assert!(sent.len() >= 3, "{} credentials sent", sent.len());
    for credential in &sent {
        assert_no_piece_of(credential, &logs);
    }
}
