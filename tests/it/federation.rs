//! Workload Identity Federation and the other ADC file types, end to end:
//! the broker binary with an `external_account` file (subject token from a
//! file, a URL or a program, with and without impersonation), an
//! `impersonated_service_account` file and an
//! `external_account_authorized_user` file, against the emulator's fake
//! STS, which verifies each subject token's signature.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokenbroker::emulator::aws::{AwsRole, Ec2Instance, role_arn};
use tokenbroker::emulator::google::User;
use tokenbroker::emulator::sts::{AWS_TOKEN_TYPE, Pool, Subjects, principal};
use tokenbroker::emulator::{Emulator, EmulatorConfig};
use tokenbroker::proto::v1::token;
use tonic::Code;

use crate::common::{
    Broker, TEST_KEYS, access_request, assert_no_piece_of, chmod, claims, emulator, id_request,
    in_time, invalidated, next_token, poll_until, serve_fails, sign_with_test_key, unix_now,
    write_file,
};

/// The workload identity pool provider the tests federate through.
pub(crate) const POOL: &str =
    "//iam.googleapis.com/projects/123/locations/global/workloadIdentityPools/ci/providers/github";
pub(crate) const JWT_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";
pub(crate) const TARGET: &str = "deployer@test-project.iam.gserviceaccount.com";
pub(crate) const AUDIENCE: &str = "https://svc-abc123-uc.a.run.app";

/// The emulator, trusting subject tokens of [`POOL`] signed with test key 1.
pub(crate) async fn federating(config: EmulatorConfig) -> Emulator {
    let emulator = emulator(config).await;
    emulator.add_federation_pool(Pool {
        audience: POOL.into(),
        subject_token_type: JWT_TYPE.into(),
        subjects: Subjects::Jwt {
            public_key_der: TEST_KEYS[0].1.to_vec(),
        },
    });
    emulator.allow_impersonation(TARGET);
    emulator
}

/// A subject token for `subject`, as an identity provider (GitHub,
/// Kubernetes) signs it; `key` 1 is a key the pool does not trust.
pub(crate) fn subject_token(subject: &str, key: usize) -> String {
    let now = unix_now();
    sign_with_test_key(
        &json!({"iss": "https://token.actions.githubusercontent.com", "sub": subject, "aud": POOL, "iat": now, "exp": now + 3600}),
        "idp-1",
        key,
    )
}

/// An `external_account` file whose subject comes from `source` (a JWT, or
/// an AWS request), at the emulator's STS, impersonating [`TARGET`] if
/// `impersonate`.
fn federation_file(emulator: &Emulator, dir: &Path, source: Value, impersonate: bool) -> PathBuf {
    let (audience, subject_token_type) = if source.get("environment_id").is_some() {
        (AWS_POOL, AWS_TOKEN_TYPE)
    } else {
        (POOL, JWT_TYPE)
    };
    let mut json = json!({
        "universe_domain": "googleapis.com",
        "type": "external_account",
        "audience": audience,
        "subject_token_type": subject_token_type,
        "token_url": emulator.sts_token_url(),
        "credential_source": source,
    });
    if impersonate {
        json["service_account_impersonation_url"] = format!(
            "{}/v1/projects/-/serviceAccounts/{TARGET}:generateAccessToken",
            emulator.iam_endpoint()
        )
        .into();
        json["service_account_impersonation"] = json!({"token_lifetime_seconds": 600});
    }
    write_file(dir, "wif.json", &json, 0o600)
}

/// Writes `token` to `path` as a rotation does: a new file renamed over
/// the old one.
fn rotate(path: &Path, token: &str) {
    let next = path.with_extension("next");
    std::fs::write(&next, token).unwrap();
    std::fs::rename(&next, path).unwrap();
}

async fn broker_with(emulator: &Emulator, credentials: &Path) -> Broker {
    Broker::start(emulator, &["--credentials", credentials.to_str().unwrap()]).await
}

/// The access token `broker` serves for `scopes`.
pub(crate) async fn access_token(broker: &Broker, scopes: &[&str]) -> String {
    let mut client = broker.typed_client().await;
    client
        .access_token(access_request(scopes))
        .await
        .unwrap()
        .token
}

/// The status `broker` refuses the access token for `scopes` with.
pub(crate) async fn access_refused(broker: &Broker, scopes: &[&str]) -> tonic::Status {
    let mut client = broker.client().await;
    client
        .get_access_token(access_request(scopes))
        .await
        .unwrap_err()
}

/// Who the emulator issued `token` to.
pub(crate) fn holder(emulator: &Emulator, token: &str) -> String {
    emulator
        .token_info(token)
        .expect("a token the emulator issued")
        .email
}

#[tokio::test]
async fn a_subject_token_file_is_exchanged_once_for_many_cold_callers_and_reread_after_rotation() {
    let emulator = federating(EmulatorConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let subject = dir.path().join("token");
    std::fs::write(&subject, subject_token("repo:acme/app:ref:main", 0)).unwrap();
    let file = federation_file(&emulator, dir.path(), json!({"file": subject}), false);
    let broker = broker_with(&emulator, &file).await;
    broker.wait_for_log("Workload Identity Federation").await;

    let calls = (0..100).map(|_| {
        let broker = &broker;
        async move {
            let mut client = broker.typed_client().await;
            client
                .access_token(access_request(&["scope:a"]))
                .await
                .unwrap()
                .token
        }
    });
    let tokens = in_time("100 cold calls", futures_util::future::join_all(calls)).await;
    assert!(tokens.iter().all(|t| *t == tokens[0]), "one shared token");
    assert_eq!(
        emulator.stats().sts_requests,
        1,
        "one exchange for 100 callers"
    );
    let info = emulator.token_info(&tokens[0]).unwrap();
    assert_eq!(info.email, principal(POOL, "repo:acme/app:ref:main"));
    assert_eq!(info.scopes, ["scope:a"]);

    // The file is read again at the next exchange.
    rotate(&subject, &subject_token("repo:acme/app:ref:release", 0));
    let mut client = broker.client().await;
    let request = tokenbroker::proto::v1::InvalidateTokenRequest {
        token: tokens[0].clone(),
        request: Some(
            tokenbroker::proto::v1::invalidate_token_request::Request::AccessToken(access_request(
                &["scope:a"],
            )),
        ),
    };
    assert!(invalidated(&mut client, request).await);
    let rotated = access_token(&broker, &["scope:a"]).await;
    assert_eq!(
        holder(&emulator, &rotated),
        principal(POOL, "repo:acme/app:ref:release")
    );

    // A federated token mints no ID tokens, and the refusal says what to add.
    let status = broker
        .client()
        .await
        .get_id_token(id_request(AUDIENCE))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status
            .message()
            .contains("service_account_impersonation_url"),
        "{status}"
    );
    assert_eq!(emulator.stats().sts_requests, 2);
    assert_eq!(emulator.stats().token_requests, 0, "no metadata server");
}

#[tokio::test]
async fn a_json_subject_file_with_impersonation_serves_id_and_access_tokens() {
    let emulator = federating(EmulatorConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let subject = dir.path().join("token.json");
    let token = subject_token("system:serviceaccount:ns:app", 0);
    std::fs::write(&subject, json!({"id_token": token}).to_string()).unwrap();
    let source = json!({"file": subject, "format": {"type": "json", "subject_token_field_name": "id_token"}});
    let broker = broker_with(
        &emulator,
        &federation_file(&emulator, dir.path(), source, true),
    )
    .await;
    broker.wait_for_log("impersonation of").await;
    let mut client = broker.typed_client().await;

    let access = client
        .access_token(access_request(&["scope:x"]))
        .await
        .unwrap();
    assert_eq!(holder(&emulator, &access.token), TARGET);
    let id = client.id_token(id_request(AUDIENCE)).await.unwrap();
    assert_eq!(claims(&id.token)["aud"], AUDIENCE);
    assert_eq!(claims(&id.token)["email"], TARGET);

    let calls = emulator.iam_calls();
    assert_eq!(calls.len(), 2);
    for call in &calls {
        assert_eq!(call.caller, principal(POOL, "system:serviceaccount:ns:app"));
    }
    assert_eq!(calls[0].method, "generateAccessToken");
    assert_eq!(calls[0].body["lifetime"], "600s", "token_lifetime_seconds");
    assert_eq!(calls[1].method, "generateIdToken");
    assert_eq!(
        emulator.stats().sts_requests,
        1,
        "one federated token authorised both"
    );
}

/// A server answering `GET /token` with `{"value": token}` to requests
/// carrying `Metadata: True`, and 403 to others; it counts requests.
async fn subject_token_server(token: String) -> (std::net::SocketAddr, Arc<Mutex<u32>>) {
    use http_body_util::Full;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(Mutex::new(0));
    let counted = count.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let token = token.clone();
            let counted = counted.clone();
            let service = hyper::service::service_fn(
                move |request: hyper::Request<hyper::body::Incoming>| {
                    *counted.lock().unwrap() += 1;
                    let allowed = request
                        .headers()
                        .get("metadata")
                        .is_some_and(|v| v == "True")
                        && request.uri().path() == "/token";
                    let (status, body) = if allowed {
                        (200, json!({"value": token}).to_string())
                    } else {
                        (403, "forbidden".to_string())
                    };
                    let response = hyper::Response::builder()
                        .status(status)
                        .body(Full::new(bytes::Bytes::from(body)))
                        .unwrap();
                    async move { Ok::<_, std::convert::Infallible>(response) }
                },
            );
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            );
        }
    });
    (addr, count)
}

#[tokio::test]
async fn a_url_source_sends_its_headers_and_its_refusal_reaches_the_caller() {
    let emulator = federating(EmulatorConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let (addr, requests) = subject_token_server(subject_token("azure-vm", 0)).await;
    let source = |headers: Value| {
        json!({
            "url": format!("http://{addr}/token"),
            "headers": headers,
            "format": {"type": "json", "subject_token_field_name": "value"},
        })
    };
    let file = federation_file(
        &emulator,
        dir.path(),
        source(json!({"Metadata": "True"})),
        true,
    );
    let broker = broker_with(&emulator, &file).await;
    let id = broker
        .typed_client()
        .await
        .id_token(id_request(AUDIENCE))
        .await
        .unwrap();
    assert_eq!(claims(&id.token)["email"], TARGET);
    assert_eq!(emulator.iam_calls()[0].caller, principal(POOL, "azure-vm"));
    assert_eq!(*requests.lock().unwrap(), 1);

    // Without the header the URL answers 403: the call fails, naming it.
    let dir = tempfile::tempdir().unwrap();
    let file = federation_file(&emulator, dir.path(), source(json!({})), false);
    let broker = broker_with(&emulator, &file).await;
    let status = access_refused(&broker, &[]).await;
    assert_eq!(status.code(), Code::PermissionDenied, "{status}");
    assert!(status.message().contains("subject-token URL"), "{status}");
}

/// A program printing Google's executable response for `token`, and
/// writing it to its output file; each run appends the audience it was
/// given to `runs`. With `hang`, it first starts a child that never ends.
fn subject_program(dir: &Path, token: &str, seconds_valid: u64, hang: bool) -> PathBuf {
    let answer = json!({
        "version": 1,
        "success": true,
        "token_type": JWT_TYPE,
        "id_token": token,
        "expiration_time": unix_now() + seconds_valid,
    });
    std::fs::write(dir.join("answer.json"), answer.to_string()).unwrap();
    let script = dir.join("fetch-token");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n{hang}echo \"$GOOGLE_EXTERNAL_ACCOUNT_AUDIENCE $GOOGLE_EXTERNAL_ACCOUNT_INTERACTIVE\" >> {dir}/runs\ncat {dir}/answer.json > \"$GOOGLE_EXTERNAL_ACCOUNT_OUTPUT_FILE\"\ncat {dir}/answer.json\n",
            dir = dir.display(),
            hang = if hang {
                // Bounded, so that a failed test leaves nothing behind.
                format!("timeout 120 tail -f {}/answer.json\n", dir.display())
            } else {
                String::new()
            },
        ),
    )
    .unwrap();
    chmod(&script, 0o755);
    script
}

fn executable_file(emulator: &Emulator, dir: &Path, script: &Path, timeout_millis: u64) -> PathBuf {
    let source = json!({"executable": {
        "command": format!("{} --flag", script.display()),
        "timeout_millis": timeout_millis,
        "output_file": dir.join("cache.json"),
    }});
    federation_file(emulator, dir, source, false)
}

const ALLOW: (&str, &str) = ("GOOGLE_EXTERNAL_ACCOUNT_ALLOW_EXECUTABLES", "1");

#[tokio::test]
async fn an_executable_source_runs_only_when_allowed_and_reuses_its_output_file() {
    let emulator = federating(EmulatorConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let script = subject_program(dir.path(), &subject_token("onprem", 0), 3600, false);
    let file = executable_file(&emulator, dir.path(), &script, 5000);

    let stderr = serve_fails(
        &dir.path().join("s.sock"),
        &["--credentials", file.to_str().unwrap()],
    )
    .await;
    assert!(
        stderr.contains("GOOGLE_EXTERNAL_ACCOUNT_ALLOW_EXECUTABLES=1")
            && stderr.contains("credential_source.executable"),
        "{stderr}"
    );

    let args = [
        "--metadata-host",
        &emulator.host(),
        "--credentials",
        file.to_str().unwrap(),
    ];
    let broker = Broker::spawn(args.map(String::from).to_vec(), &[ALLOW]).await;
    let mut client = broker.typed_client().await;
    let first = client
        .access_token(access_request(&["scope:a"]))
        .await
        .unwrap()
        .token;
    assert_eq!(holder(&emulator, &first), principal(POOL, "onprem"));
    // Another key, another exchange: the output file answers, the program
    // does not run again.
    let second = client
        .access_token(access_request(&["scope:b"]))
        .await
        .unwrap()
        .token;
    assert_eq!(holder(&emulator, &second), principal(POOL, "onprem"));
    assert_eq!(emulator.stats().sts_requests, 2);
    let runs = std::fs::read_to_string(dir.path().join("runs")).unwrap();
    assert_eq!(
        runs,
        format!("{POOL} 0\n"),
        "one run, with Google's variables"
    );
}

#[tokio::test]
async fn a_program_that_hangs_or_fails_fails_the_call_and_leaves_nothing_running() {
    let emulator = federating(EmulatorConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let script = subject_program(dir.path(), &subject_token("slow", 0), 3600, true);
    let file = executable_file(&emulator, dir.path(), &script, 5000);
    let args = [
        "--metadata-host",
        &emulator.host(),
        "--credentials",
        file.to_str().unwrap(),
    ];
    let broker = Broker::spawn(args.map(String::from).to_vec(), &[ALLOW]).await;
    let status = access_refused(&broker, &[]).await;
    assert_eq!(status.code(), Code::Unavailable, "{status}");
    assert!(
        status.message().contains("did not answer within"),
        "{status}"
    );
    // The program and the child it started are killed.
    let answer = dir.path().join("answer.json");
    let running = || {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|entry| {
                std::fs::read_to_string(entry.path().join("cmdline")).is_ok_and(|cmdline| {
                    cmdline.contains(script.to_str().unwrap()) || cmdline.contains("answer.json")
                })
            })
            .count()
    };
    poll_until(
        "the program is gone",
        || running() == 0,
        || format!("{} left", running()),
    )
    .await;

    // A program that answers success: false.
    std::fs::write(
        dir.path().join("fetch-token"),
        "#!/bin/sh\necho '{\"version\": 1, \"success\": false, \"code\": \"401\", \"message\": \"not logged in\"}'\n",
    )
    .unwrap();
    let status = access_refused(&broker, &["scope:c"]).await;
    assert!(
        status.message().contains("it failed: 401: not logged in"),
        "{status}"
    );

    // A program that prints without end is read no further than an answer
    // may be, and killed.
    std::fs::write(
        dir.path().join("fetch-token"),
        format!("#!/bin/sh\ntimeout 120 yes {}\n", answer.display()),
    )
    .unwrap();
    let status = access_refused(&broker, &["scope:d"]).await;
    assert!(status.message().contains("printed more than"), "{status}");
    poll_until(
        "the program is gone",
        || running() == 0,
        || format!("{} left", running()),
    )
    .await;
    assert_eq!(emulator.stats().sts_requests, 0);
}

#[tokio::test]
async fn federated_tokens_are_refreshed_before_expiry_from_the_rotated_subject() {
    let emulator = federating(EmulatorConfig {
        access_token_lifetime: Duration::from_secs(4),
        ..EmulatorConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let subject = dir.path().join("token");
    std::fs::write(&subject, subject_token("gen-1", 0)).unwrap();
    let file = federation_file(&emulator, dir.path(), json!({"file": subject}), false);
    let broker = Broker::start(
        &emulator,
        &[
            "--credentials",
            file.to_str().unwrap(),
            "--expiry-skew",
            "1s",
        ],
    )
    .await;
    let mut stream = broker
        .typed_client()
        .await
        .watch(access_request(&[]))
        .await
        .unwrap();
    let token::Token::AccessToken(first) = next_token(&mut stream).await else {
        panic!("an access token");
    };
    assert_eq!(holder(&emulator, &first.token), principal(POOL, "gen-1"));
    rotate(&subject, &subject_token("gen-2", 0));
    // Refreshes keep coming; one after the rotation reads the new subject
    // (on a slow machine a refresh may have read the old one first).
    let mut refreshes = 0;
    loop {
        let token::Token::AccessToken(next) = next_token(&mut stream).await else {
            panic!("an access token");
        };
        refreshes += 1;
        let holder = holder(&emulator, &next.token);
        if holder == principal(POOL, "gen-2") {
            break;
        }
        assert_eq!(holder, principal(POOL, "gen-1"));
        assert!(refreshes < 5, "the rotated subject was never read");
    }
    assert!(emulator.stats().sts_requests >= 2);
}

#[tokio::test]
async fn subject_faults_fail_the_call_with_the_usual_codes() {
    let emulator = federating(EmulatorConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let subject = dir.path().join("token");
    let file = federation_file(&emulator, dir.path(), json!({"file": subject}), false);
    let broker = broker_with(&emulator, &file).await;
    let mut client = broker.client().await;

    // No file yet (a rotation in progress): transient.
    let status = client
        .get_access_token(access_request(&[]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains(subject.to_str().unwrap()),
        "{status}"
    );

    // A subject the pool does not trust: STS's refusal, explained.
    let untrusted = subject_token("intruder", 1);
    std::fs::write(&subject, &untrusted).unwrap();
    let status = client
        .get_access_token(access_request(&["scope:1"]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("invalid_grant"), "{status}");

    assert_no_piece_of(&untrusted, &broker.logs());
}

#[tokio::test]
async fn a_valid_token_is_served_while_its_refresh_cannot_read_the_subject() {
    let emulator = federating(EmulatorConfig {
        access_token_lifetime: Duration::from_secs(8),
        ..EmulatorConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let subject = dir.path().join("token");
    std::fs::write(&subject, subject_token("ok", 0)).unwrap();
    let file = federation_file(&emulator, dir.path(), json!({"file": subject}), false);
    let broker = Broker::start(
        &emulator,
        &[
            "--credentials",
            file.to_str().unwrap(),
            "--expiry-skew",
            "1s",
        ],
    )
    .await;
    let good = access_token(&broker, &[]).await;
    // The refresh (due a few seconds before expiry) finds no subject.
    std::fs::remove_file(&subject).unwrap();
    broker.wait_for_log("token fetch failed").await;
    assert!(broker.logs().contains("subject-token file"));
    assert_eq!(
        access_token(&broker, &[]).await,
        good,
        "the valid token stays"
    );
    assert_eq!(emulator.stats().sts_requests, 1);
}

#[tokio::test]
async fn impersonated_service_account_files_build_on_user_credentials() {
    let emulator = federating(EmulatorConfig::default()).await;
    let middle = "middle@test-project.iam.gserviceaccount.com";
    emulator.allow_impersonation(middle);
    emulator.add_user(User {
        client_id: "client-1.apps.googleusercontent.com".into(),
        client_secret: "client-secret".into(),
        refresh_token: "1//user-refresh".into(),
        email: "dev@example.com".into(),
    });
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(
        dir.path(),
        "adc.json",
        &json!({
            "type": "impersonated_service_account",
            "service_account_impersonation_url": format!("{}/v1/projects/-/serviceAccounts/{TARGET}:generateAccessToken", emulator.iam_endpoint()),
            "delegates": [format!("projects/-/serviceAccounts/{middle}")],
            "source_credentials": {
                "type": "authorized_user",
                "client_id": "client-1.apps.googleusercontent.com",
                "client_secret": "client-secret",
                "refresh_token": "1//user-refresh",
                "token_uri": emulator.token_uri(),
            },
        }),
        0o600,
    );
    let broker = broker_with(&emulator, &file).await;
    let mut client = broker.typed_client().await;
    let access = client.access_token(access_request(&[])).await.unwrap();
    assert_eq!(holder(&emulator, &access.token), TARGET);
    let id = client.id_token(id_request(AUDIENCE)).await.unwrap();
    assert_eq!(claims(&id.token)["email"], TARGET);
    let calls = emulator.iam_calls();
    assert_eq!(calls.len(), 2);
    for call in calls {
        assert_eq!(call.caller, "dev@example.com");
        assert_eq!(
            call.delegates,
            [format!("projects/-/serviceAccounts/{middle}")]
        );
    }
}

#[tokio::test]
async fn workforce_user_credentials_refresh_with_basic_auth_and_refuse_id_tokens() {
    let emulator = federating(EmulatorConfig::default()).await;
    emulator.add_user(User {
        client_id: "workforce-client".into(),
        client_secret: "workforce-secret/+=".into(),
        refresh_token: "wf-refresh-token-0123456789".into(),
        email: "principal://iam.googleapis.com/locations/global/workforcePools/staff/subject/ana"
            .into(),
    });
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(
        dir.path(),
        "adc.json",
        &json!({
            "type": "external_account_authorized_user",
            "audience": "//iam.googleapis.com/locations/global/workforcePools/staff/providers/okta",
            "client_id": "workforce-client",
            "client_secret": "workforce-secret/+=",
            "refresh_token": "wf-refresh-token-0123456789",
            "token_url": emulator.workforce_token_url(),
            "token_info_url": "https://sts.googleapis.com/v1/introspect",
        }),
        0o600,
    );
    let args = [
        "--metadata-host",
        &emulator.host(),
        "--credentials",
        file.to_str().unwrap(),
    ];
    let mut broker = Broker::spawn(args.map(String::from).to_vec(), &[("RUST_LOG", "trace")]).await;
    broker.wait_for_log("workforce user credentials").await;
    let access = access_token(&broker, &[]).await;
    assert!(holder(&emulator, &access).ends_with("/subject/ana"));
    let status = broker
        .client()
        .await
        .get_id_token(id_request(AUDIENCE))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(emulator.stats().sts_requests, 1);
    broker.stop().await;
    broker.wait_for_log("stopped").await;
    let logs = broker.logs();
    for secret in [
        &access,
        "wf-refresh-token-0123456789",
        "workforce-secret/+=",
    ] {
        assert_no_piece_of(secret, &logs);
    }
}

#[tokio::test]
async fn bad_federation_files_stop_the_broker_naming_the_field() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s.sock");
    for (source, needle) in [
        (json!({"file": "/t", "url": "https://x/"}), "file and url"),
        (
            json!({"enviroment_id": "aws1"}),
            "needs one of file, url, executable or environment_id",
        ),
        (
            json!({"url": "http://192.0.2.1/token?key=s3cr3t"}),
            "credential_source.url\" is neither https://",
        ),
        (
            json!({"file": "/t", "format": {"type": "json"}}),
            "\"credential_source.format.subject_token_field_name\" is missing",
        ),
    ] {
        let file = federation_file(&emulator, dir.path(), source, false);
        let stderr = serve_fails(&socket, &["--credentials", file.to_str().unwrap()]).await;
        assert!(stderr.contains(needle), "{stderr:?} lacks {needle:?}");
        assert!(stderr.contains("wif.json"), "{stderr}");
        assert!(!stderr.contains("s3cr3t"), "{stderr}");
    }
}

#[tokio::test]
async fn off_google_cloud_the_broker_falls_back_to_the_address_and_says_what_to_do() {
    use std::net::ToSocketAddrs;
    // On Google Cloud the name resolves and there is nothing to say.
    if ("metadata.google.internal", 80).to_socket_addrs().is_ok() {
        eprintln!("skipped: metadata.google.internal resolves here (on Google Cloud?)");
        return;
    }
    // (What answers at 169.254.169.254 depends on the machine, so the
    // failing call's message is checked in the unit tests.)
    let broker = Broker::spawn(Vec::new(), &[]).await;
    broker
        .wait_for_log("does not resolve; using its address")
        .await;
    broker
        .wait_for_log("the metadata server at 169.254.169.254")
        .await;
    let logs = broker.logs();
    for needle in ["--emulator", "--credentials FILE", "GCE_METADATA_HOST"] {
        assert!(logs.contains(needle), "{needle} missing");
    }
}

// === AWS ===

const AWS_SECRET: &str = "test-only/aws+secret+access+key+0123456789";
const AWS_SESSION: &str = "test-only-aws-session-token-0123456789abcdef";

fn aws_role(secret: &str) -> AwsRole {
    AwsRole {
        role: "ci-runner".into(),
        access_key_id: "AKIATESTONLY0001".into(),
        secret_access_key: secret.into(),
        session_token: Some(AWS_SESSION.into()),
    }
}

/// The AWS pool provider the tests federate through.
const AWS_POOL: &str =
    "//iam.googleapis.com/projects/123/locations/global/workloadIdentityPools/aws/providers/ec2";

/// [`federating`], also trusting AWS requests of the `ci-runner` role for
/// [`AWS_POOL`], and serving an EC2 instance with that role (IMDSv2 only).
async fn aws_federating() -> Emulator {
    let emulator = federating(EmulatorConfig::default()).await;
    emulator.add_federation_pool(Pool {
        audience: AWS_POOL.into(),
        subject_token_type: AWS_TOKEN_TYPE.into(),
        subjects: Subjects::Aws,
    });
    emulator.add_aws_role(aws_role(AWS_SECRET));
    emulator.set_ec2_instance(Ec2Instance {
        zone: "eu-west-3c".into(),
        role: "ci-runner".into(),
        imdsv2_required: true,
    });
    emulator
}

/// An AWS source as gcloud writes it, with the instance metadata URLs at
/// the emulator.
fn aws_source(emulator: &Emulator) -> Value {
    let imds = format!("http://{}/latest", emulator.addr());
    json!({
        "environment_id": "aws1",
        "region_url": format!("{imds}/meta-data/placement/availability-zone"),
        "url": format!("{imds}/meta-data/iam/security-credentials"),
        "regional_cred_verification_url": "https://sts.{region}.amazonaws.com?Action=GetCallerIdentity&Version=2011-06-15",
        "imdsv2_session_token_url": format!("{imds}/api/token"),
    })
}

fn aws_env(secret: &str) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_REGION", "us-west-2".into()),
        ("AWS_ACCESS_KEY_ID", "AKIATESTONLY0001".into()),
        ("AWS_SECRET_ACCESS_KEY", secret.into()),
        ("AWS_SESSION_TOKEN", AWS_SESSION.into()),
    ]
}

async fn aws_broker(emulator: &Emulator, file: &Path, env: &[(&str, String)]) -> Broker {
    let args = [
        "--metadata-host",
        &emulator.host(),
        "--credentials",
        file.to_str().unwrap(),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Broker::spawn(args.map(String::from).to_vec(), &env).await
}

#[tokio::test]
async fn aws_credentials_from_the_environment_sign_the_subject_and_nothing_leaks() {
    let emulator = aws_federating().await;
    let dir = tempfile::tempdir().unwrap();
    let file = federation_file(&emulator, dir.path(), aws_source(&emulator), false);
    let mut env = aws_env(AWS_SECRET);
    // A more specific target than the broker's own filter names, too.
    env.push(("RUST_LOG", "trace,aws_sigv4::http_request=trace".into()));
    let mut broker = aws_broker(&emulator, &file, &env).await;
    let access = access_token(&broker, &["scope:a"]).await;
    assert_eq!(
        holder(&emulator, &access),
        principal(AWS_POOL, &role_arn("ci-runner"))
    );
    assert_eq!(emulator.stats().sts_requests, 1);
    broker.stop().await;
    broker.wait_for_log("stopped").await;
    let logs = broker.logs();
    assert!(logs.lines().count() > 100, "trace logging is not on");
    // The subject token is a serialised request whose URL and audience
    // are no secret; its signature is.
    let subject = emulator
        .received_credentials()
        .into_iter()
        .find(|credential| credential.starts_with("%7B"))
        .expect("the AWS subject token reached STS");
    let request: Value = serde_json::from_str(
        &percent_encoding::percent_decode_str(&subject)
            .decode_utf8()
            .unwrap(),
    )
    .unwrap();
    let authorization = request["headers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["key"] == "Authorization")
        .unwrap()["value"]
        .as_str()
        .unwrap();
    let signature = authorization
        .split("Signature=")
        .nth(1)
        .unwrap()
        .to_string();
    for secret in [AWS_SECRET, AWS_SESSION, &signature, &access] {
        assert_no_piece_of(secret, &logs);
    }
}

#[tokio::test]
async fn aws_instance_metadata_with_imdsv2_serves_impersonated_id_tokens() {
    let emulator = aws_federating().await;
    let dir = tempfile::tempdir().unwrap();
    let file = federation_file(&emulator, dir.path(), aws_source(&emulator), true);
    let broker = aws_broker(&emulator, &file, &[]).await;
    let id = broker
        .typed_client()
        .await
        .id_token(id_request(AUDIENCE))
        .await
        .unwrap();
    assert_eq!(claims(&id.token)["email"], TARGET);
    assert_eq!(
        emulator.iam_calls()[0].caller,
        principal(AWS_POOL, &role_arn("ci-runner"))
    );

    // Without the IMDSv2 session URL the instance (IMDSv2 only) refuses.
    let mut source = aws_source(&emulator);
    source
        .as_object_mut()
        .unwrap()
        .remove("imdsv2_session_token_url");
    let dir = tempfile::tempdir().unwrap();
    let file = federation_file(&emulator, dir.path(), source, false);
    let broker = aws_broker(&emulator, &file, &[]).await;
    let status = access_refused(&broker, &[]).await;
    assert!(
        status.message().contains("EC2 instance metadata"),
        "{status}"
    );
}

#[tokio::test]
async fn a_request_signed_with_the_wrong_aws_secret_is_refused_by_sts() {
    let emulator = aws_federating().await;
    let dir = tempfile::tempdir().unwrap();
    let file = federation_file(&emulator, dir.path(), aws_source(&emulator), false);
    let broker = aws_broker(&emulator, &file, &aws_env("not-the-secret")).await;
    let status = access_refused(&broker, &[]).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status}");
    assert!(status.message().contains("invalid_grant"), "{status}");
}

// === Every source, with and without impersonation ===

/// One subject-token source, as the table test runs it.
struct SourceCase {
    /// What the test calls it.
    name: &'static str,
    /// Its `credential_source`.
    source: Value,
    /// The principal it federates as.
    principal: String,
    /// The environment the broker needs for it.
    env: Vec<(&'static str, String)>,
}

/// Each subject-token source.
fn every_source(
    emulator: &Emulator,
    dir: &Path,
    url_server: std::net::SocketAddr,
) -> Vec<SourceCase> {
    let file = dir.join("token");
    std::fs::write(&file, subject_token("file-text", 0)).unwrap();
    let json_file = dir.join("token.json");
    std::fs::write(
        &json_file,
        json!({"t": subject_token("file-json", 0)}).to_string(),
    )
    .unwrap();
    let program = subject_program(dir, &subject_token("program", 0), 3600, false);
    let aws = principal(AWS_POOL, &role_arn("ci-runner"));
    let allow = vec![(ALLOW.0, ALLOW.1.to_string())];
    let case = |name, source, principal, env| SourceCase {
        name,
        source,
        principal,
        env,
    };
    vec![
        case(
            "file, text",
            json!({"file": file}),
            principal(POOL, "file-text"),
            vec![],
        ),
        case(
            "file, json",
            json!({"file": json_file, "format": {"type": "json", "subject_token_field_name": "t"}}),
            principal(POOL, "file-json"),
            vec![],
        ),
        case(
            "url",
            json!({"url": format!("http://{url_server}/token"), "headers": {"Metadata": "True"}, "format": {"type": "json", "subject_token_field_name": "value"}}),
            principal(POOL, "url"),
            vec![],
        ),
        case(
            "executable",
            json!({"executable": {"command": program.to_str().unwrap()}}),
            principal(POOL, "program"),
            allow,
        ),
        case(
            "aws, environment",
            aws_source(emulator),
            aws.clone(),
            aws_env(AWS_SECRET),
        ),
        case("aws, IMDSv2", aws_source(emulator), aws, vec![]),
    ]
}

#[tokio::test]
async fn every_subject_source_serves_with_and_without_impersonation() {
    let emulator = aws_federating().await;
    let (url_server, _) = subject_token_server(subject_token("url", 0)).await;
    for impersonate in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        for case in every_source(&emulator, dir.path(), url_server) {
            let SourceCase {
                name,
                source,
                principal,
                env,
            } = case;
            let calls_before = emulator.iam_calls().len();
            let file = federation_file(&emulator, dir.path(), source, impersonate);
            let broker = aws_broker(&emulator, &file, &env).await;
            let mut client = broker.typed_client().await;
            let access = client.access_token(access_request(&[])).await;
            let access =
                access.unwrap_or_else(|e| panic!("{name}, impersonating {impersonate}: {e}"));
            if impersonate {
                assert_eq!(holder(&emulator, &access.token), TARGET, "{name}");
                let id = client.id_token(id_request(AUDIENCE)).await.unwrap();
                assert_eq!(claims(&id.token)["email"], TARGET, "{name}");
                let calls = emulator.iam_calls();
                assert_eq!(calls.len(), calls_before + 2, "{name}");
                assert!(
                    calls[calls_before..].iter().all(|c| c.caller == principal),
                    "{name}"
                );
            } else {
                assert_eq!(holder(&emulator, &access.token), principal, "{name}");
                let status = broker
                    .client()
                    .await
                    .get_id_token(id_request(AUDIENCE))
                    .await
                    .unwrap_err();
                assert_eq!(status.code(), Code::InvalidArgument, "{name}");
            }
        }
    }
}

#[tokio::test]
async fn a_client_named_in_the_file_authenticates_the_exchange() {
    let emulator = federating(EmulatorConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let subject = dir.path().join("token");
    std::fs::write(&subject, subject_token("with-client", 0)).unwrap();
    let file = federation_file(&emulator, dir.path(), json!({"file": subject}), false);
    let mut json: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    json["client_id"] = "sts-client".into();
    json["client_secret"] = "sts-client-secret".into();
    let file = write_file(dir.path(), "wif.json", &json, 0o600);
    let broker = broker_with(&emulator, &file).await;
    access_token(&broker, &[]).await;
    use base64::Engine;
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("sts-client:sts-client-secret")
    );
    assert!(emulator.received_credentials().contains(&basic));
    assert_no_piece_of("sts-client-secret", &broker.logs());
}

#[tokio::test]
async fn the_impersonate_flag_builds_on_a_federation_file() {
    let emulator = federating(EmulatorConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let subject = dir.path().join("token");
    std::fs::write(&subject, subject_token("flagged", 0)).unwrap();
    let file = federation_file(&emulator, dir.path(), json!({"file": subject}), false);
    let endpoint = emulator.iam_endpoint();
    let broker = Broker::start(
        &emulator,
        &[
            "--credentials",
            file.to_str().unwrap(),
            "--impersonate",
            TARGET,
            "--iam-endpoint",
            &endpoint,
        ],
    )
    .await;
    let id = broker
        .typed_client()
        .await
        .id_token(id_request(AUDIENCE))
        .await
        .unwrap();
    assert_eq!(claims(&id.token)["email"], TARGET);
    assert_eq!(emulator.iam_calls()[0].caller, principal(POOL, "flagged"));
}
