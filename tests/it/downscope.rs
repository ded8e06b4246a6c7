//! Downscoped tokens (Credential Access Boundaries), end to end: the
//! broker binary exchanging the cached source token at the emulator's fake
//! STS, for a boundary a request names or one the policy imposes, through
//! every front door, with the emulator's tokeninfo showing what each token
//! can reach.

use std::time::Duration;

use serde_json::{Value, json};
use tokenbroker::emulator::{Emulator, EmulatorConfig};
use tokenbroker::proto::v1::{
    AccessBoundaryRule, AvailabilityCondition, GetAccessTokenRequest, token,
};
use tonic::Code;

use crate::common::http::{Endpoint, Scrape, get};
use crate::common::{
    Broker, access_request, binary, chmod, emulator, emulator_with_lifetime, next_message, output,
    succeeds, watch, write_config, write_policy,
};

const BUCKET: &str = "//storage.googleapis.com/projects/_/buckets/build-cache";
const OTHER_BUCKET: &str = "//storage.googleapis.com/projects/_/buckets/prod-data";
const VIEWER: &str = "inRole:roles/storage.objectViewer";
const ADMIN: &str = "inRole:roles/storage.objectAdmin";
const CLOUD: &str = "https://www.googleapis.com/auth/cloud-platform";

fn rule(resource: &str, permissions: &[&str], expression: Option<&str>) -> AccessBoundaryRule {
    AccessBoundaryRule {
        available_resource: resource.into(),
        available_permissions: permissions.iter().map(|p| p.to_string()).collect(),
        availability_condition: expression.map(|expression| AvailabilityCondition {
            expression: expression.into(),
            ..Default::default()
        }),
    }
}

fn bounded(rules: Vec<AccessBoundaryRule>) -> GetAccessTokenRequest {
    GetAccessTokenRequest {
        scopes: vec![CLOUD.into()],
        access_boundary: rules,
        ..Default::default()
    }
}

/// The `accessBoundary` Google's JSON gives for one rule per resource.
fn boundary_json(rules: &[(&str, &[&str], Option<&str>)]) -> Value {
    let rules: Vec<Value> = rules
        .iter()
        .map(|(resource, permissions, expression)| {
            let mut rule = json!({
                "availableResource": resource,
                "availablePermissions": permissions,
            });
            if let Some(expression) = expression {
                rule["availabilityCondition"] = json!({ "expression": expression });
            }
            rule
        })
        .collect();
    json!({ "accessBoundaryRules": rules })
}

/// A broker on `emulator` that downscopes at its fake STS.
async fn broker(emulator: &Emulator, extra: &[&str]) -> Broker {
    let sts = emulator.sts_endpoint();
    let mut args = vec!["--sts-endpoint", &sts, "--metrics-addr", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    Broker::start(emulator, &args).await
}

/// A private directory, and a policy in it whose first rule lets this
/// process have the default account's access tokens, with `rest` (more
/// keys of that rule, then more rules).
fn policy_for_me(rest: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    chmod(dir.path(), 0o700);
    let me = nix::unistd::getuid().as_raw();
    let policy = write_policy(
        dir.path(),
        &format!(
            "[[allow]]\nuids = [{me}]\nservice_accounts = [\"default\"]\nscopes = [\"*\"]\n{rest}"
        ),
    );
    (dir, policy)
}

/// What `token` can reach, as the emulator's tokeninfo says.
fn boundary_of(emulator: &Emulator, token: &str) -> Option<Value> {
    emulator
        .token_info(token)
        .expect("a token the emulator issued")
        .access_boundary
}

#[tokio::test]
async fn a_requested_boundary_gives_a_token_limited_to_exactly_it() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let broker = broker(&emulator, &[]).await;
    let mut client = broker.client().await;
    let condition = "resource.name.startsWith('projects/_/buckets/build-cache/objects/linux/')";
    let token = client
        .get_access_token(bounded(vec![
            rule(OTHER_BUCKET, &[VIEWER], None),
            rule(BUCKET, &[VIEWER, ADMIN, VIEWER], Some(condition)),
        ]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        boundary_of(&emulator, &token.token),
        Some(boundary_json(&[
            (BUCKET, &[ADMIN, VIEWER], Some(condition)),
            (OTHER_BUCKET, &[VIEWER], None),
        ])),
        "canonical: rules sorted, permissions a set"
    );
    let info = emulator.token_info(&token.token).unwrap();
    assert_eq!(
        info.scopes,
        [CLOUD],
        "the source token's account and scopes"
    );
    let plain = client
        .get_access_token(access_request(&[CLOUD]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(boundary_of(&emulator, &plain.token), None);
    assert!(
        token.expire_time.unwrap().seconds <= plain.expire_time.unwrap().seconds,
        "never outlives the source token"
    );
}

#[tokio::test]
async fn identical_requests_share_one_exchange_and_one_source_token() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let broker = broker(&emulator, &[]).await;
    let channel = broker.channel().await;
    let asks: Vec<_> = (0..100)
        .map(|i| {
            let mut client = tokenbroker::proto::v1::token_broker_client::TokenBrokerClient::new(
                channel.clone(),
            );
            let resource = if i % 2 == 0 { BUCKET } else { OTHER_BUCKET };
            tokio::spawn(async move {
                client
                    .get_access_token(bounded(vec![rule(resource, &[VIEWER], None)]))
                    .await
                    .map(|r| r.into_inner().token)
            })
        })
        .collect();
    let mut tokens = std::collections::HashSet::new();
    for ask in asks {
        tokens.insert(ask.await.unwrap().unwrap());
    }
    assert_eq!(tokens.len(), 2, "one token per boundary");
    let stats = emulator.stats();
    assert_eq!(stats.sts_requests, 2, "one exchange per boundary");
    assert_eq!(stats.token_requests, 1, "one source token for both");
    let scrape = Scrape::of(broker.metrics_addr().await).await;
    assert_eq!(
        scrape.value("tokenbroker_downscope_exchanges_total", &[("result", "ok")]),
        2.0
    );
    assert_eq!(
        scrape.value(
            "tokenbroker_upstream_fetches_total",
            &[("token_kind", "access_token")]
        ),
        3.0,
        "the exchanges count as upstream fetches"
    );
}

#[tokio::test]
async fn a_refreshed_source_token_is_exchanged_again_and_watchers_get_it() {
    let emulator = emulator_with_lifetime(Duration::from_secs(20)).await;
    let broker = broker(&emulator, &["--expiry-skew", "2s"]).await;
    let mut client = broker.client().await;
    let request = bounded(vec![rule(BUCKET, &[VIEWER], None)]);
    let mut tokens = client
        .watch_token(watch(request))
        .await
        .unwrap()
        .into_inner();
    let token::Token::AccessToken(first) = next_message(&mut tokens).await.unwrap().token.unwrap()
    else {
        panic!("an access token");
    };
    let token::Token::AccessToken(second) = next_message(&mut tokens).await.unwrap().token.unwrap()
    else {
        panic!("an access token");
    };
    assert_ne!(first.token, second.token);
    for token in [&first.token, &second.token] {
        assert_eq!(
            boundary_of(&emulator, token),
            Some(boundary_json(&[(BUCKET, &[VIEWER], None)]))
        );
    }
    let stats = emulator.stats();
    assert!(
        stats.token_requests >= 2 && stats.sts_requests == stats.token_requests,
        "one exchange per source token: {stats:?}"
    );
    assert!(second.expire_time.unwrap().seconds > first.expire_time.unwrap().seconds);
}

/// A build job's uid may get only tokens that read one bucket: whatever it
/// asks for, through gRPC, WatchToken or the metadata endpoint on a Unix
/// socket.
#[tokio::test]
async fn a_policy_boundary_downscopes_every_front_door() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let (dir, policy) = policy_for_me(&format!(
        r#"
audiences = ["https://*.a.run.app"]
access_boundary = [
  {{ available_resource = "{BUCKET}", available_permissions = ["{VIEWER}"] }},
]
"#
    ));
    let socket = dir.path().join("metadata.sock");
    let metadata_addr = format!("unix:{}", socket.display());
    let audit = dir.path().join("audit.log");
    let broker = broker(
        &emulator,
        &[
            "--policy",
            &policy,
            "--metadata-addr",
            &metadata_addr,
            "--audit-log",
            audit.to_str().unwrap(),
        ],
    )
    .await;
    broker.wait_for_log("metadata-server-compatible").await;
    let only_the_bucket = Some(boundary_json(&[(BUCKET, &[VIEWER], None)]));
    let mut client = broker.client().await;

    let plain = client
        .get_access_token(access_request(&[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(boundary_of(&emulator, &plain.token), only_the_bucket);

    let mut tokens = client
        .watch_token(watch(access_request(&[CLOUD])))
        .await
        .unwrap()
        .into_inner();
    let token::Token::AccessToken(watched) =
        next_message(&mut tokens).await.unwrap().token.unwrap()
    else {
        panic!("an access token");
    };
    assert_eq!(boundary_of(&emulator, &watched.token), only_the_bucket);

    let answer = get(
        Endpoint::Unix(&socket),
        "/computeMetadata/v1/instance/service-accounts/default/token",
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let body: Value = serde_json::from_str(&answer.body).unwrap();
    let token = body["access_token"].as_str().unwrap();
    assert_eq!(boundary_of(&emulator, token), only_the_bucket);

    let id = client
        .get_id_token(crate::common::id_request("https://svc.a.run.app"))
        .await;
    assert!(
        id.is_ok(),
        "ID tokens reach no bucket; they are not limited"
    );

    // The audit trail names the boundary of every access token handed out.
    let lines = crate::common::audit::wait_for_lines(&audit, 4).await;
    let rules = &only_the_bucket.as_ref().unwrap()["accessBoundaryRules"];
    for line in lines {
        match line["token_kind"].as_str() {
            Some("access_token") => assert_eq!(&line["access_boundary"], rules, "{line}"),
            _ => assert!(line.get("access_boundary").is_none(), "{line}"),
        }
    }
}

#[tokio::test]
async fn a_covered_request_is_narrowed_and_an_uncovered_one_never_reaches_sts() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let (_dir, policy) = policy_for_me(&format!(
        r#"
access_boundary = [
  {{ available_resource = "{BUCKET}", available_permissions = ["{VIEWER}", "{ADMIN}"], expression = "resource.name.startsWith('projects/_/buckets/build-cache/objects/ci/')", title = "ci" }},
]
"#
    ));
    let broker = broker(&emulator, &["--policy", &policy]).await;
    let mut client = broker.client().await;
    let narrower = client
        .get_access_token(bounded(vec![rule(
            BUCKET,
            &[VIEWER],
            Some("resource.name.endsWith('.tar')"),
        )]))
        .await
        .unwrap()
        .into_inner();
    let boundary = boundary_of(&emulator, &narrower.token).unwrap();
    let granted = &boundary["accessBoundaryRules"][0];
    assert_eq!(granted["availablePermissions"], json!([VIEWER]));
    assert_eq!(
        granted["availabilityCondition"]["expression"],
        "(resource.name.startsWith('projects/_/buckets/build-cache/objects/ci/')) && (resource.name.endsWith('.tar'))"
    );
    let exchanges = emulator.stats().sts_requests;

    for (request, named) in [
        (
            bounded(vec![rule(OTHER_BUCKET, &[VIEWER], None)]),
            OTHER_BUCKET,
        ),
        (
            bounded(vec![rule(BUCKET, &["inRole:roles/storage.admin"], None)]),
            "inRole:roles/storage.admin",
        ),
    ] {
        let denied = client.get_access_token(request).await.unwrap_err();
        assert_eq!(denied.code(), Code::PermissionDenied);
        assert!(
            denied.message().contains(named) && denied.message().contains(&policy),
            "{}",
            denied.message()
        );
    }
    assert_eq!(
        emulator.stats().sts_requests,
        exchanges,
        "nothing sent upstream"
    );
}

#[tokio::test]
async fn bad_boundaries_are_refused_before_anything_is_sent() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let broker = broker(&emulator, &[]).await;
    let mut client = broker.client().await;
    let long = "x".repeat(2049);
    let eleven = (0..11)
        .map(|i| rule(&format!("{BUCKET}-{i}"), &[VIEWER], None))
        .collect();
    let cases: Vec<(Vec<AccessBoundaryRule>, &str)> = vec![
        (eleven, "at most 10"),
        (
            vec![rule("", &[VIEWER], None)],
            "access_boundary[0].available_resource",
        ),
        (vec![rule(BUCKET, &[], None)], "available_permissions"),
        (
            vec![rule(BUCKET, &["roles/storage.objectViewer"], None)],
            "inRole:",
        ),
        (
            vec![rule(BUCKET, &[VIEWER], Some(&long))],
            "longer than 2048",
        ),
        (
            vec![rule(BUCKET, &[VIEWER], Some("true\u{0}|| x"))],
            "control characters",
        ),
        (
            vec![rule(&format!("{BUCKET}\n"), &[VIEWER], None)],
            "control characters",
        ),
        (
            vec![rule(BUCKET, &[VIEWER], Some(""))],
            "needs an expression",
        ),
    ];
    for (rules, reason) in cases {
        let refused = client.get_access_token(bounded(rules)).await.unwrap_err();
        assert_eq!(
            refused.code(),
            Code::InvalidArgument,
            "{}",
            refused.message()
        );
        assert!(refused.message().contains(reason), "{}", refused.message());
    }
    let stats = emulator.stats();
    assert_eq!((stats.sts_requests, stats.token_requests), (0, 0));
}

#[tokio::test]
async fn an_sts_refusal_is_explained() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let broker = broker(&emulator, &[]).await;
    let mut client = broker.client().await;
    let refused = client
        .get_access_token(bounded(vec![rule(
            "//bigquery.googleapis.com/projects/p/datasets/d",
            &[VIEWER],
            None,
        )]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("invalid_request")
            && refused.message().contains("Cloud Storage only"),
        "{}",
        refused.message()
    );
    let scrape = Scrape::of(broker.metrics_addr().await).await;
    assert_eq!(
        scrape.value(
            "tokenbroker_downscope_exchanges_total",
            &[("result", "error")]
        ),
        1.0
    );
}

#[tokio::test]
async fn the_cli_reads_a_boundary_file_as_google_documents_it() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let broker = broker(&emulator, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("boundary.json");
    let boundary = json!({"accessBoundary": boundary_json(&[(BUCKET, &[VIEWER], Some("resource.name.startsWith('projects/_/buckets/build-cache/objects/a')"))])});
    std::fs::write(&file, boundary.to_string()).unwrap();
    let access_with_file = || {
        let mut command = binary();
        command
            .args(["token", "access", "--boundary"])
            .arg(&file)
            .arg("--socket")
            .arg(&broker.socket);
        command
    };
    let token = succeeds(&mut access_with_file()).await;
    assert_eq!(
        boundary_of(&emulator, token.trim()),
        Some(boundary["accessBoundary"].clone())
    );

    std::fs::write(&file, r#"{"accessBoundary": {"accessBoundaryRules": []}}"#).unwrap();
    let refused = output(&mut access_with_file()).await;
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("at least one rule"));
}

#[tokio::test]
async fn a_sink_keeps_a_downscoped_token() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    chmod(dir.path(), 0o700);
    let path = dir.path().join("sinks").join("token");
    std::fs::create_dir(dir.path().join("sinks")).unwrap();
    chmod(&dir.path().join("sinks"), 0o700);
    let config = write_config(
        dir.path(),
        &format!(
            r#"metadata_host = "{host}"
sts_endpoint = "{sts}"

[[sink]]
path = "{path}"
access_token = {{ scopes = ["{CLOUD}"], access_boundary = [{{ available_resource = "{BUCKET}", available_permissions = ["{VIEWER}"] }}] }}
"#,
            host = emulator.host(),
            sts = emulator.sts_endpoint(),
            path = path.display(),
        ),
    );
    let broker = Broker::spawn(vec!["--config".into(), config], &[]).await;
    broker
        .wait_for_log_lines(&["written", path.to_str().unwrap()], 1)
        .await;
    let token = std::fs::read_to_string(&path).unwrap();
    assert_eq!(
        boundary_of(&emulator, token.trim()),
        Some(boundary_json(&[(BUCKET, &[VIEWER], None)]))
    );
}

#[tokio::test]
async fn a_reloaded_boundary_ends_open_watches_and_invalidation_follows_the_key() {
    let emulator = emulator_with_lifetime(Duration::from_secs(6)).await;
    let policy_for = |resource: &str| {
        format!(
            r#"access_boundary = [{{ available_resource = "{resource}", available_permissions = ["{VIEWER}"] }}]
"#
        )
    };
    let (_dir, policy) = policy_for_me(&policy_for(BUCKET));
    let broker = broker(&emulator, &["--policy", &policy, "--expiry-skew", "1s"]).await;
    let mut client = broker.client().await;

    // A client hands back the downscoped token a service rejected: the
    // key it names is limited as before, so that token is dropped.
    let first = client
        .get_access_token(access_request(&[]))
        .await
        .unwrap()
        .into_inner();
    let invalidated = client
        .invalidate_token(tokenbroker::proto::v1::InvalidateTokenRequest {
            request: Some(
                tokenbroker::proto::v1::invalidate_token_request::Request::AccessToken(
                    access_request(&[]),
                ),
            ),
            token: first.token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(invalidated.invalidated);
    let again = client
        .get_access_token(access_request(&[]))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(again.token, first.token);
    assert_eq!(
        boundary_of(&emulator, &again.token),
        Some(boundary_json(&[(BUCKET, &[VIEWER], None)]))
    );

    let mut tokens = client
        .watch_token(watch(access_request(&[])))
        .await
        .unwrap()
        .into_inner();
    next_message(&mut tokens).await.unwrap();
    let (_reloaded_dir, reloaded) = policy_for_me(&policy_for(OTHER_BUCKET));
    std::fs::copy(&reloaded, &policy).unwrap();
    broker.signal(nix::sys::signal::Signal::SIGHUP);
    broker.wait_for_log("policy reloaded").await;
    let ended = loop {
        match next_message(&mut tokens).await {
            Ok(token) => {
                let token::Token::AccessToken(token) = token.token.unwrap() else {
                    panic!("an access token");
                };
                assert_eq!(
                    boundary_of(&emulator, &token.token),
                    Some(boundary_json(&[(BUCKET, &[VIEWER], None)])),
                    "sent before the reload took effect"
                );
            }
            Err(status) => break status,
        }
    };
    assert_eq!(
        ended.code(),
        Code::Unavailable,
        "clients watch again, under the new boundary: {ended:?}"
    );
    assert!(
        ended.message().contains("another access boundary") && ended.message().contains(&policy),
        "{}",
        ended.message()
    );
    let mut again = client
        .watch_token(watch(access_request(&[])))
        .await
        .unwrap()
        .into_inner();
    let token::Token::AccessToken(token) = next_message(&mut again).await.unwrap().token.unwrap()
    else {
        panic!("an access token");
    };
    assert_eq!(
        boundary_of(&emulator, &token.token),
        Some(boundary_json(&[(OTHER_BUCKET, &[VIEWER], None)])),
        "watched again, under the new boundary"
    );
}

#[tokio::test]
async fn a_plain_http_sts_endpoint_off_loopback_stops_the_broker() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("tokenbroker.sock");
    let stderr = crate::common::serve_fails(
        &socket,
        &["--emulator", "--sts-endpoint", "http://sts.example.com"],
    )
    .await;
    assert!(
        stderr.contains("--sts-endpoint") && stderr.contains("loopback"),
        "{stderr}"
    );
}

/// The first rule that covers the account decides: a later, broader rule
/// for the same uid does not hand out what the first one's boundary does
/// not cover, and a condition cannot close the policy's parenthesis.
#[tokio::test]
async fn neither_a_later_rule_nor_a_crafted_condition_widens_the_boundary() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let (_dir, policy) = policy_for_me(&format!(
        r#"
access_boundary = [{{ available_resource = "{BUCKET}", available_permissions = ["{VIEWER}"], expression = "resource.name.startsWith('projects/_/buckets/build-cache/objects/ci/')" }}]

[[allow]]
service_accounts = ["*"]
scopes = ["*"]
"#
    ));
    let broker = broker(&emulator, &["--policy", &policy]).await;
    let mut client = broker.client().await;
    let wider = client
        .get_access_token(bounded(vec![rule(OTHER_BUCKET, &[ADMIN], None)]))
        .await
        .unwrap_err();
    assert_eq!(wider.code(), Code::PermissionDenied, "{wider:?}");
    let crafted = client
        .get_access_token(bounded(vec![rule(
            BUCKET,
            &[VIEWER],
            Some("true) || (true"),
        )]))
        .await
        .unwrap_err();
    assert_eq!(crafted.code(), Code::InvalidArgument, "{crafted:?}");
    assert!(
        crafted.message().contains("unbalanced"),
        "{}",
        crafted.message()
    );
    assert_eq!(emulator.stats().sts_requests, 0);
}
