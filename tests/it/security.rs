//! Who may get which token, and that tokens stay secret.

use std::process::Output;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokenbroker::emulator::EmulatorConfig;
use tokenbroker::proto::v1::{GetIdTokenRequest, token};
use tonic::Code;

use crate::common::{
    self, BINARY, Broker, NOBODY, Scrape, access_request, as_uid, assert_no_piece_of, chmod,
    emulator, id_request, next_token, serve_fails, watch_end, watch_id, write_policy,
};

fn policy(me: u32, nobody_may_get_id_tokens: bool) -> String {
    let nobody_audiences = if nobody_may_get_id_tokens {
        "audiences = [\"https://*.nobody.run.app\"]"
    } else {
        ""
    };
    format!(
        r#"
        [[allow]]
        uids = [{me}]
        service_accounts = ["default"]
        audiences = ["https://allowed.run.app", "https://*.allowed.run.app"]
        scopes = ["scope:mine"]

        [[allow]]
        uids = [{NOBODY}]
        service_accounts = ["*"]
        scopes = ["scope:nobody"]
        {nobody_audiences}
        "#
    )
}

/// Runs the client command as `uid` (via setpriv).
async fn client_as(uid: u32, socket: &std::path::Path, args: &[&str]) -> Output {
    common::output(as_uid(uid, BINARY).args(args).arg("--socket").arg(socket)).await
}

/// Asserts that the client command succeeded.
fn assert_success(output: &Output) {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn the_policy_decides_per_peer_and_is_reloaded_on_sighup() {
    let me = nix::unistd::geteuid().as_raw();
    let emulator = emulator(EmulatorConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let policy_flag = write_policy(dir.path(), &policy(me, false));
    let broker = Broker::start(
        &emulator,
        &[
            "--policy",
            &policy_flag,
            "--socket-mode",
            "0666",
            "--metrics-addr",
            "127.0.0.1:0",
        ],
    )
    .await;
    let metrics = broker.metrics_addr().await;
    // Let other users reach the socket inside the test's private directory.
    chmod(broker.dir.path(), 0o755);
    let mut client = broker.client().await;

    // This process (uid `me`): its audiences and scope, nothing else.
    assert!(
        client
            .get_id_token(id_request("https://allowed.run.app"))
            .await
            .is_ok()
    );
    assert!(
        client
            .get_id_token(id_request("https://svc.allowed.run.app"))
            .await
            .is_ok()
    );
    assert!(
        client
            .get_access_token(access_request(&["scope:mine"]))
            .await
            .is_ok()
    );
    let denied = client
        .get_id_token(id_request("https://other.run.app"))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(
        denied.message().contains(&policy_flag),
        "{}",
        denied.message()
    );
    assert!(
        denied.message().contains(&format!("uid {me}")),
        "{}",
        denied.message()
    );
    let denied = client
        .get_access_token(access_request(&["scope:mine", "scope:nobody"]))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert_eq!(
        client
            .watch_token(watch_id("https://other.run.app"))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    broker.wait_for_log("request denied").await;
    assert!(
        broker.logs().contains(&format!("\"uid\":{me}")),
        "denial log lacks the uid"
    );
    let scrape = Scrape::of(metrics).await;
    assert_eq!(scrape.value("tokenbroker_policy_denials_total", &[]), 3.0);
    // Denied requests never reached the metadata server.
    assert_eq!(emulator.stats().identity_requests, 2);

    if !common::is_root("the part run as another uid") {
        return;
    }
    // Another process, uid 65534: its own rule.
    let nobody_access = client_as(
        NOBODY,
        &broker.socket,
        &["token", "access", "--scope", "scope:nobody"],
    )
    .await;
    assert_success(&nobody_access);
    let nobody_id = ["token", "id", "--audience", "https://x.nobody.run.app"];
    let refused = client_as(NOBODY, &broker.socket, &nobody_id).await;
    assert_eq!(
        refused.status.code(),
        Some(17),
        "PERMISSION_DENIED is exit 17"
    );
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("PermissionDenied") && stderr.contains(&format!("uid {NOBODY}")),
        "{stderr}"
    );

    // SIGHUP: the new file applies at once.
    std::fs::write(&policy_flag, policy(me, true)).unwrap();
    broker.signal(Signal::SIGHUP);
    broker.wait_for_log("policy reloaded").await;
    assert_success(&client_as(NOBODY, &broker.socket, &nobody_id).await);

    // A broken file on reload is reported and the rules in force stay.
    std::fs::write(&policy_flag, "[[allow]\nbroken").unwrap();
    broker.signal(Signal::SIGHUP);
    broker.wait_for_log("policy not reloaded").await;
    assert_success(&client_as(NOBODY, &broker.socket, &nobody_id).await);
    assert!(
        client
            .get_id_token(id_request("https://allowed.run.app"))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn a_bad_policy_file_stops_the_broker_from_starting() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_policy(
        dir.path(),
        "[[allow]]\nservice_accounts = [\"*\"]\naudience = [\"typo\"]\n",
    );
    let socket = dir.path().join("s.sock");
    let stderr = serve_fails(&socket, &["--emulator", "--policy", &path]).await;
    assert!(
        stderr.contains("audience") && stderr.contains("policy.toml"),
        "{stderr}"
    );
}

#[tokio::test]
async fn no_token_reaches_the_logs_even_at_trace_level() {
    let emulator = common::emulator_with_lifetime(Duration::from_secs(4)).await;
    let mut broker = Broker::spawn(
        vec![
            "--metadata-host".into(),
            emulator.host(),
            "--expiry-skew".into(),
            "1s".into(),
        ],
        &[("RUST_LOG", "trace")],
    )
    .await;
    let mut client = broker.typed_client().await;
    let mut tokens = Vec::new();
    tokens.push(
        client
            .access_token(access_request(&["scope:a"]))
            .await
            .unwrap()
            .token,
    );
    tokens.push(
        client
            .id_token(GetIdTokenRequest {
                format: 2,
                ..id_request("https://a.run.app")
            })
            .await
            .unwrap()
            .token,
    );
    let mut stream = client.watch(id_request("https://w.run.app")).await.unwrap();
    for _ in 0..2 {
        match next_token(&mut stream).await {
            token::Token::IdToken(t) => tokens.push(t.token),
            other => panic!("{other:?}"),
        }
    }
    drop(stream);
    broker.stop().await;
    broker.wait_for_log("stopped").await;
    let logs = broker.logs();
    assert!(logs.lines().count() > 100, "trace logging is not on");
    for token in &tokens {
        assert_no_piece_of(token, &logs);
    }
}

#[tokio::test]
async fn an_oversized_request_is_resource_exhausted() {
    let broker = Broker::emulated(&[]).await;
    let mut client = broker.client().await;
    let huge = client
        .get_id_token(id_request(&"a".repeat(20 * 1024)))
        .await
        .unwrap_err();
    assert_eq!(huge.code(), Code::ResourceExhausted, "{huge:?}");
    let long = client
        .get_id_token(id_request(&"a".repeat(3 * 1024)))
        .await
        .unwrap_err();
    assert_eq!(long.code(), Code::InvalidArgument, "{long:?}");
}

#[tokio::test]
async fn a_reloaded_policy_cuts_off_open_watch_streams() {
    let me = nix::unistd::geteuid().as_raw();
    let emulator = common::emulator_with_lifetime(Duration::from_secs(4)).await;
    let dir = tempfile::tempdir().unwrap();
    let policy_flag = write_policy(dir.path(), &policy(me, false));
    common::chmod(dir.path(), 0o700);
    let audit = dir.path().join("audit.log");
    let broker = Broker::start(
        &emulator,
        &[
            "--policy",
            &policy_flag,
            "--expiry-skew",
            "1s",
            "--audit-log",
            audit.to_str().unwrap(),
        ],
    )
    .await;
    let mut client = broker.typed_client().await;
    let mut stream = client
        .watch(id_request("https://allowed.run.app"))
        .await
        .unwrap();
    next_token(&mut stream).await;

    // The rule for this uid is gone: the next refreshed token is not sent.
    write_policy(dir.path(), &common::policy_rule(4242, "*", "*"));
    broker.signal(Signal::SIGHUP);
    broker.wait_for_log("policy reloaded").await;
    let status = watch_end(&mut stream).await;
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains(&policy_flag),
        "{}",
        status.message()
    );
    // The audit trail shows the stream's token, then the denial.
    common::audit::wait_for_line(&audit, |e| e["event"] == "deny").await;
    let events = common::audit::lines(&audit);
    assert_eq!(events[0]["event"], "watch_token");
    let deny = events.iter().find(|e| e["event"] == "deny").unwrap();
    assert_eq!(deny["rpc"], "WatchToken");
    assert_eq!(deny["audience"], "https://allowed.run.app");
}
