//! The metadata-server-compatible endpoint (`--metadata-addr`): tokens from
//! the shared cache, the metadata server's header rules and error codes,
//! pass-through of everything else, and the policy on a Unix socket.

use http::{Method, StatusCode};
use tokenbroker::emulator::{
    DEFAULT_ACCOUNT, EmulatorConfig, Fault, FaultRule, PROJECT_ID, Target, ZONE,
};
use tokenbroker::proto::v1::{GetIdTokenRequest, IdTokenFormat};

use crate::common::http::{Answer, Endpoint, get, send};
use crate::common::{
    self, Broker, Scrape, access_request, claims, emulator, id_request, policy_rule, write_policy,
};

const TOKEN: &str = "/computeMetadata/v1/instance/service-accounts/default/token";
const IDENTITY: &str = "/computeMetadata/v1/instance/service-accounts/default/identity";
const CLOUD: &str = "https://www.googleapis.com/auth/cloud-platform";

fn flavor(answer: &Answer) -> Option<&str> {
    answer
        .headers
        .get("metadata-flavor")
        .and_then(|v| v.to_str().ok())
}

/// A broker with `extra` flags and the endpoint on a free loopback port,
/// and that endpoint.
async fn on_tcp(
    emulator: &tokenbroker::emulator::Emulator,
    extra: &[&str],
) -> (Broker, Endpoint<'static>) {
    let mut flags = vec!["--metadata-addr", "127.0.0.1:0"];
    flags.extend(extra);
    let broker = Broker::start(emulator, &flags).await;
    let to = Endpoint::Tcp(broker.metadata_addr().await);
    (broker, to)
}

/// The broker with the policy file `policy` and its metadata endpoint on a
/// Unix socket in `dir`, serving.
async fn on_unix(
    emulator: &tokenbroker::emulator::Emulator,
    dir: &std::path::Path,
    policy: &str,
) -> (Broker, std::path::PathBuf) {
    let socket = dir.join("metadata.sock");
    let metadata_addr = format!("unix:{}", socket.display());
    let flags = ["--policy", policy, "--metadata-addr", &metadata_addr];
    let broker = Broker::start(emulator, &flags).await;
    broker.wait_for_log("metadata-server-compatible").await;
    (broker, socket)
}

#[tokio::test]
async fn access_tokens_come_from_the_cache_the_grpc_api_shares() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let (broker, to) = on_tcp(&emulator, &["--metrics-addr", "127.0.0.1:0"]).await;
    let path = format!(
        "{TOKEN}?scopes={}",
        CLOUD.replace(':', "%3A").replace('/', "%2F")
    );

    let first = get(to, &path).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    assert_eq!(flavor(&first), Some("Google"));
    assert_eq!(first.headers["content-type"], "application/json");
    let body = first.json();
    let token = body["access_token"].as_str().unwrap().to_string();
    assert_eq!(body["token_type"], "Bearer");
    let expires_in = body["expires_in"].as_u64().unwrap();
    assert!((3500..=3600).contains(&expires_in), "{expires_in}");
    let info = emulator.token_info(&token).expect("issued by the emulator");
    assert_eq!(info.email, DEFAULT_ACCOUNT);
    assert_eq!(info.scopes, [CLOUD]);

    let again = get(to, &path).await.json();
    assert_eq!(again["access_token"], token);
    let grpc = broker
        .typed_client()
        .await
        .access_token(access_request(&[CLOUD]))
        .await
        .unwrap();
    assert_eq!(grpc.token, token, "one cache for both front ends");
    assert_eq!(emulator.stats().token_requests, 1);

    let scrape = Scrape::of(broker.metrics_addr().await).await;
    let metadata_hits = scrape.value(
        "tokenbroker_requests_total",
        &[("rpc", "MetadataToken"), ("outcome", "hit")],
    );
    assert_eq!(metadata_hits, 1.0, "{}", scrape.0);
}

#[tokio::test]
async fn identity_is_the_raw_jwt_from_the_cache() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let (broker, to) = on_tcp(&emulator, &[]).await;
    let audience = "https://hello-abc123-uc.a.run.app";

    let answer = get(
        to,
        &format!("{IDENTITY}?audience=https%3A%2F%2Fhello-abc123-uc.a.run.app&format=full"),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(flavor(&answer), Some("Google"));
    assert_eq!(claims(&answer.body)["aud"], audience);
    let grpc = broker
        .typed_client()
        .await
        .id_token(GetIdTokenRequest {
            format: IdTokenFormat::Full as i32,
            ..id_request(audience)
        })
        .await
        .unwrap();
    assert_eq!(grpc.token, answer.body);
    // The standard format is another key, hence another token.
    let standard = get(to, &format!("{IDENTITY}?audience={audience}")).await;
    assert_ne!(standard.body, answer.body);
    assert_eq!(emulator.stats().identity_requests, 2);
}

#[tokio::test]
async fn the_metadata_servers_header_rules_apply_before_anything_else() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let (_broker, to) = on_tcp(&emulator, &[]).await;
    let path = format!("{IDENTITY}?audience=https://a.example.com");

    let missing = send(to, Method::GET, &path, &[]).await;
    assert_eq!(missing.status, StatusCode::FORBIDDEN);
    assert!(missing.body.contains("Metadata-Flavor"), "{}", missing.body);
    assert_eq!(flavor(&missing), Some("Google"));
    let wrong = send(to, Method::GET, &path, &[("Metadata-Flavor", "google")]).await;
    assert_eq!(wrong.status, StatusCode::FORBIDDEN);
    let proxied = send(
        to,
        Method::GET,
        &path,
        &[
            ("Metadata-Flavor", "Google"),
            ("X-Forwarded-For", "10.0.0.1"),
        ],
    )
    .await;
    assert_eq!(proxied.status, StatusCode::FORBIDDEN);
    assert!(proxied.body.contains("X-Forwarded-For"), "{}", proxied.body);
    let post = send(to, Method::POST, &path, &[("Metadata-Flavor", "Google")]).await;
    assert_eq!(post.status, StatusCode::METHOD_NOT_ALLOWED);
    let project = send(
        to,
        Method::GET,
        "/computeMetadata/v1/project/project-id",
        &[],
    )
    .await;
    assert_eq!(project.status, StatusCode::FORBIDDEN);

    assert_eq!(
        emulator.stats(),
        Default::default(),
        "nothing reached the metadata server"
    );
}

#[tokio::test]
async fn everything_but_tokens_is_passed_through() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let (_broker, to) = on_tcp(&emulator, &[]).await;

    let root = get(to, "/").await;
    assert_eq!(root.status, StatusCode::OK);
    assert_eq!(flavor(&root), Some("Google"));
    let project = get(to, "/computeMetadata/v1/project/project-id").await;
    assert_eq!(
        (project.status, project.body.as_str()),
        (StatusCode::OK, PROJECT_ID)
    );
    assert_eq!(flavor(&project), Some("Google"));
    assert_eq!(
        get(to, "/computeMetadata/v1/instance/zone").await.body,
        ZONE
    );
    let email = get(
        to,
        "/computeMetadata/v1/instance/service-accounts/default/email",
    )
    .await;
    assert_eq!(email.body, DEFAULT_ACCOUNT);
    let listing = get(to, "/computeMetadata/v1/instance/service-accounts/").await;
    assert!(listing.body.contains("default/"), "{}", listing.body);
    let info = get(
        to,
        "/computeMetadata/v1/instance/service-accounts/default/?recursive=true",
    )
    .await;
    assert_eq!(info.headers["content-type"], "application/json");
    assert_eq!(info.json()["email"], DEFAULT_ACCOUNT);
    let unknown = get(to, "/computeMetadata/v1/project/nothing-here").await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);

    // Never passed through: other API versions, and token paths in disguise.
    for path in [
        "/computeMetadata/v1beta1/instance/service-accounts/default/token",
        "/computeMetadata/v1/instance/service-accounts/default/token/",
        "/computeMetadata/v1/instance/service-accounts/default/x/../token",
        "/computeMetadata/v1/instance/x/../service-accounts/default/token",
        "/computeMetadata/v1/instance/service-accounts/default/tok%65n",
    ] {
        assert_eq!(get(to, path).await.status, StatusCode::NOT_FOUND, "{path}");
    }
    let stats = emulator.stats();
    assert_eq!((stats.token_requests, stats.identity_requests), (0, 0));

    emulator.stop().await;
    let down = get(to, "/computeMetadata/v1/project/project-id").await;
    assert_eq!(down.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(flavor(&down), Some("Google"));
}

#[tokio::test]
async fn errors_use_the_metadata_servers_codes() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let (_broker, to) = on_tcp(&emulator, &["--upstream-max-attempts", "1"]).await;
    let accounts = "/computeMetadata/v1/instance/service-accounts";

    for (path, status) in [
        (IDENTITY.to_string(), StatusCode::BAD_REQUEST),
        (format!("{IDENTITY}?audience="), StatusCode::BAD_REQUEST),
        (
            format!("{IDENTITY}?audience=a&format=compact"),
            StatusCode::BAD_REQUEST,
        ),
        (format!("{TOKEN}?scope=x"), StatusCode::BAD_REQUEST),
        (
            format!("{accounts}/not%20an%20account/token"),
            StatusCode::BAD_REQUEST,
        ),
        (
            format!("{accounts}/nobody@emulator-project.iam.gserviceaccount.com/token"),
            StatusCode::NOT_FOUND,
        ),
    ] {
        let answer = get(to, &path).await;
        assert_eq!(answer.status, status, "{path}: {}", answer.body);
        assert_eq!(flavor(&answer), Some("Google"));
    }
    let stats = emulator.stats();
    assert_eq!(
        (stats.token_requests, stats.identity_requests),
        (0, 0),
        "bad input never goes upstream (the emulator counts no request for an unknown account)"
    );

    let fault = |status, retry_after_secs| {
        Some(FaultRule {
            fault: Fault::Status {
                status,
                retry_after_secs,
            },
            target: Target::Identity,
            times: Some(1),
        })
    };
    emulator.set_fault(fault(429, Some(7)));
    let throttled = get(to, &format!("{IDENTITY}?audience=https://429.example.com")).await;
    assert_eq!(
        throttled.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        throttled.body
    );
    assert_eq!(throttled.headers["retry-after"], "7");
    emulator.set_fault(fault(403, None));
    let refused = get(to, &format!("{IDENTITY}?audience=https://403.example.com")).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{}", refused.body);
    emulator.set_fault(fault(500, None));
    let broken = get(to, &format!("{IDENTITY}?audience=https://500.example.com")).await;
    assert_eq!(
        broken.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        broken.body
    );
    for answer in [&throttled, &refused, &broken] {
        assert!(
            !answer.body.contains("eyJ"),
            "no token in errors: {}",
            answer.body
        );
    }
}

/// The `curl --unix-socket` command docs/metadata-endpoint.md shows.
fn documented_curl() -> String {
    let path = common::root().join("docs/metadata-endpoint.md");
    let page = std::fs::read_to_string(path).unwrap();
    let block = page
        .split("```sh\n")
        .find(|block| block.starts_with("curl --unix-socket"))
        .expect("docs/metadata-endpoint.md shows a `curl --unix-socket` command");
    block.split("```").next().unwrap().replace("\\\n", " ")
}

#[tokio::test]
async fn on_a_unix_socket_the_policy_applies_and_on_tcp_it_does_not() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let me = nix::unistd::getuid().as_raw();
    let policy = write_policy(
        dir.path(),
        &policy_rule(me, "default", "https://allowed.example.com"),
    );
    let (broker, socket) = on_unix(&emulator, dir.path(), &policy).await;
    let to = Endpoint::Unix(&socket);

    let allowed = get(
        to,
        &format!("{IDENTITY}?audience=https://allowed.example.com"),
    )
    .await;
    assert_eq!(allowed.status, StatusCode::OK, "{}", allowed.body);
    let denied = get(
        to,
        &format!("{IDENTITY}?audience=https://other.example.com"),
    )
    .await;
    assert_eq!(denied.status, StatusCode::FORBIDDEN, "{}", denied.body);
    assert!(denied.body.contains("policy"), "{}", denied.body);
    assert_eq!(
        emulator.stats().identity_requests,
        1,
        "the denied token was never fetched"
    );
    // The curl line of docs/metadata-endpoint.md, as an operator would run
    // it, with this socket and the audience the policy allows.
    common::install_test_deps(&["tools"]).await;
    let script = documented_curl()
        .replacen("curl ", "curl -sf ", 1)
        .replace("/run/tokenbroker/metadata.sock", socket.to_str().unwrap())
        .replace(
            "https://hello-abc123-uc.a.run.app",
            "https://allowed.example.com",
        );
    assert!(
        script.contains(socket.to_str().unwrap()) && script.contains("allowed.example.com"),
        "{script}"
    );
    let curl = common::succeeds(tokio::process::Command::new("sh").args(["-c", &script])).await;
    assert_eq!(curl, allowed.body);

    let mut broker = broker;
    broker.stop().await;
    assert!(!socket.exists(), "the endpoint's socket is removed at exit");

    // The same policy on a TCP port: the peer is unknown and trusted, and
    // the broker warns about it when it starts.
    let (tcp, to) = on_tcp(&emulator, &["--policy", &policy]).await;
    let trusted = get(
        to,
        &format!("{IDENTITY}?audience=https://other.example.com"),
    )
    .await;
    assert_eq!(trusted.status, StatusCode::OK, "{}", trusted.body);
    assert!(
        tcp.logs().contains("the policy does not apply"),
        "{}",
        tcp.logs()
    );
}

#[tokio::test]
async fn non_loopback_addresses_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let stderr = common::serve_fails(
        &dir.path().join("s.sock"),
        &["--emulator", "--metadata-addr", "0.0.0.0:8181"],
    )
    .await;
    assert!(stderr.contains("not a loopback address"), "{stderr}");
}

#[tokio::test]
async fn on_tcp_only_requests_naming_this_machine_are_served() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let (_broker, to) = on_tcp(&emulator, &[]).await;
    // A web page whose DNS name was rebound to 127.0.0.1 sends its own name.
    let rebound = send(
        to,
        Method::GET,
        TOKEN,
        &[
            ("Metadata-Flavor", "Google"),
            ("Host", "attacker.example.com:8181"),
        ],
    )
    .await;
    assert_eq!(rebound.status, StatusCode::FORBIDDEN, "{}", rebound.body);
    assert!(rebound.body.contains("Host"), "{}", rebound.body);
    let by_ip = send(
        to,
        Method::GET,
        TOKEN,
        &[("Metadata-Flavor", "Google"), ("Host", "127.0.0.1:8181")],
    )
    .await;
    assert_eq!(by_ip.status, StatusCode::OK, "{}", by_ip.body);
    assert_eq!(emulator.stats().token_requests, 1);
}

#[tokio::test]
async fn with_another_token_source_only_tokens_are_served() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let key = common::trusted_key_file(&emulator, dir.path());
    let (_broker, to) = on_tcp(&emulator, &["--credentials", key.to_str().unwrap()]).await;
    let token = get(to, TOKEN).await;
    assert_eq!(token.status, StatusCode::OK, "{}", token.body);
    let minted = token.json()["access_token"].as_str().unwrap().to_string();
    let info = emulator
        .token_info(&minted)
        .expect("minted by the emulator's OAuth endpoint");
    assert_eq!(info.email, common::KEY_ACCOUNT);
    // The metadata host is not the token source: nothing is passed to it
    // (off Google Cloud its name could resolve anywhere).
    let project = get(to, "/computeMetadata/v1/project/project-id").await;
    assert_eq!(project.status, StatusCode::NOT_FOUND, "{}", project.body);
    assert!(project.body.contains("metadata server"), "{}", project.body);
    let stats = emulator.stats();
    assert_eq!((stats.token_requests, stats.identity_requests), (0, 0));
}

#[tokio::test]
async fn by_default_only_what_the_libraries_read_is_passed_through() {
    use tokenbroker::emulator::{CLUSTER_NAME, KUBE_ENV};
    let emulator = emulator(EmulatorConfig::default()).await;
    let (_broker, to) = on_tcp(&emulator, &[]).await;
    for path in [
        "/computeMetadata/v1/project/project-id",
        "/computeMetadata/v1/project/numeric-project-id",
        "/computeMetadata/v1/instance/zone",
        "/computeMetadata/v1/universe/universe-domain",
        "/computeMetadata/v1/instance",
        "/computeMetadata/v1/instance/",
        "/computeMetadata/v1/project/",
        "/computeMetadata/v1/instance/service-accounts/",
        "/computeMetadata/v1/instance/service-accounts/?recursive=true",
        "/computeMetadata/v1/instance/service-accounts/default/email",
    ] {
        assert_eq!(get(to, path).await.status, StatusCode::OK, "{path}");
    }
    let passed = emulator.stats().other_requests;
    // Attributes, recursive listings, and every trick to reach them.
    for path in [
        "/computeMetadata/v1/instance/attributes/kube-env",
        "/computeMetadata/v1/instance/attributes/",
        "/computeMetadata/v1/instance/attributes/cluster-name",
        "/computeMetadata/v1/",
        "/computeMetadata/v1/?recursive=true",
        "/computeMetadata/v1/instance/?recursive=true",
        "/computeMetadata/v1/instance?recursive=true&alt=json",
        "/computeMetadata/v1/instance/?RECURSIVE=TRUE",
        "/computeMetadata/v1/instance/?%72ecursive=true",
        "/computeMetadata/v1/instance/?alt=json;recursive=true",
        "/computeMetadata/v1/instance/??recursive=true",
        "/computeMetadata/v1/instance/?+recursive=true",
        "/computeMetadata/v1/instance/?recur%C5%BFive=true",
        "/computeMetadata/v1//instance/attributes/kube-env",
        "/computeMetadata/v1//instance/service-accounts/default/token",
        "/computeMetadata/v1/instance/attributes/kube-env/",
        "/computeMetadata/v1/instance/attributes/kube-env?alt=json",
        "/computeMetadata/v1/instance/Attributes/kube-env",
        "/computeMetadata/v1/Instance/attributes/kube-env",
        "/computeMetadata/v1/instance/zone/../attributes/kube-env",
        "/computeMetadata/v1/instance/%2e%2e/instance/attributes/kube-env",
        "/computeMetadata/v1/instance/attributes/%6bube-env",
        "/computeMetadata/v1/instance//attributes/kube-env",
        "/computeMetadata/v1/instance/attributes;/kube-env",
        "/computeMetadata/v1/project/project-id/../../instance/attributes/kube-env",
        "/computeMetadata/v1/project/project-id/",
    ] {
        let answer = get(to, path).await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND, "{path}");
        assert!(!answer.body.contains("kubelet"), "{path} revealed kube-env");
    }
    assert_eq!(
        emulator.stats().other_requests,
        passed,
        "nothing concealed reached the metadata server"
    );
    let concealed = get(to, "/computeMetadata/v1/instance/attributes/kube-env").await;
    assert!(
        concealed.body.contains("concealed") && concealed.body.contains("--metadata-passthrough"),
        "{}",
        concealed.body
    );
    assert_eq!(flavor(&concealed), Some("Google"));

    // `all` passes everything; `none` only tokens.
    let (_all, to_all) = on_tcp(&emulator, &["--metadata-passthrough", "all"]).await;
    let kube_env = get(to_all, "/computeMetadata/v1/instance/attributes/kube-env").await;
    assert_eq!(
        (kube_env.status, kube_env.body.as_str()),
        (StatusCode::OK, KUBE_ENV)
    );
    let cluster = get(
        to_all,
        "/computeMetadata/v1/instance/attributes/cluster-name",
    )
    .await;
    assert_eq!(cluster.body, CLUSTER_NAME);
    let (_none, to_none) = on_tcp(&emulator, &["--metadata-passthrough", "none"]).await;
    let project = get(to_none, "/computeMetadata/v1/project/project-id").await;
    assert_eq!(project.status, StatusCode::NOT_FOUND);
    let token = get(
        to_none,
        "/computeMetadata/v1/instance/service-accounts/default/token",
    )
    .await;
    assert_eq!(token.status, StatusCode::OK, "tokens are still served");
}

#[tokio::test]
async fn a_policy_rule_reveals_the_metadata_paths_it_lists_to_its_peers_only() {
    use tokenbroker::emulator::CLUSTER_NAME;
    let emulator = emulator(EmulatorConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let me = nix::unistd::getuid().as_raw();
    let rule = format!(
        "{}metadata_paths = [\"instance/attributes/cluster-name\"]\n",
        policy_rule(me, "default", "https://allowed.example.com")
    );
    let other = format!(
        "[[allow]]\nuids = [{}]\nservice_accounts = []\nmetadata_paths = [\"instance/attributes/*\"]\n",
        me + 1
    );
    let policy = write_policy(dir.path(), &format!("{rule}{other}"));
    let (_broker, socket) = on_unix(&emulator, dir.path(), &policy).await;
    let to = Endpoint::Unix(&socket);
    let cluster = get(to, "/computeMetadata/v1/instance/attributes/cluster-name").await;
    assert_eq!(
        (cluster.status, cluster.body.as_str()),
        (StatusCode::OK, CLUSTER_NAME)
    );
    // Not what the rule does not list, nor the listed path recursively, nor
    // what another uid's rule lists.
    for path in [
        "/computeMetadata/v1/instance/attributes/kube-env",
        "/computeMetadata/v1/instance/attributes/cluster-name?recursive=true",
        "/computeMetadata/v1/instance/attributes/",
    ] {
        let answer = get(to, path).await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND, "{path}");
        assert!(!answer.body.contains("kubelet"), "{path}");
    }

    // On loopback TCP the policy does not apply, so it reveals nothing.
    let (_tcp, to_tcp) = on_tcp(&emulator, &["--policy", &policy]).await;
    let cluster = get(
        to_tcp,
        "/computeMetadata/v1/instance/attributes/cluster-name",
    )
    .await;
    assert_eq!(cluster.status, StatusCode::NOT_FOUND);
}
