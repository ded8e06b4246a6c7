//! Who may get which token, and that tokens stay secret.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use crate::common;
use crate::common::{BINARY, Broker, Scrape, access_request, binary_fails, emulator, id_request};
use nix::sys::signal::Signal;
use tokenbroker::emulator::EmulatorConfig;
use tokenbroker::proto::v1::{GetIdTokenRequest, WatchTokenRequest, token, watch_token_request};
use tokio::process::Command;
use tonic::Code;

const NOBODY: u32 = 65534;

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

/// Runs the client command as `uid` (via setpriv) or as this process.
async fn client_as(
    uid: Option<u32>,
    socket: &std::path::Path,
    args: &[&str],
) -> std::process::Output {
    let mut command = match uid {
        Some(uid) => {
            let mut command = Command::new("setpriv");
            command
                .arg(format!("--reuid={uid}"))
                .arg(format!("--regid={uid}"))
                .arg("--clear-groups")
                .arg(BINARY);
            command
        }
        None => common::binary(),
    };
    command
        .args(args)
        .arg("--socket")
        .arg(socket)
        .output()
        .await
        .unwrap()
}

#[tokio::test]
async fn the_policy_decides_per_peer_and_is_reloaded_on_sighup() {
    let me = nix::unistd::geteuid().as_raw();
    let emulator = emulator(EmulatorConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let policy_path = dir.path().join("policy.toml");
    std::fs::write(&policy_path, policy(me, false)).unwrap();
    let policy_flag = policy_path.to_str().unwrap().to_string();
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
    std::fs::set_permissions(broker.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
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
    let watch = WatchTokenRequest {
        request: Some(watch_token_request::Request::IdToken(id_request(
            "https://other.run.app",
        ))),
    };
    assert_eq!(
        client.watch_token(watch).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    broker.wait_for_log("request denied by policy").await;
    assert!(
        broker.logs().contains(&format!("\"uid\":{me}")),
        "denial log lacks the uid"
    );
    let scrape = Scrape::of(metrics).await;
    assert_eq!(scrape.value("tokenbroker_policy_denials_total", &[]), 3.0);
    // Denied requests never reached the metadata server.
    assert_eq!(emulator.stats().identity_requests, 2);

    if !nix::unistd::geteuid().is_root() {
        eprintln!("not root: the part run as another uid is left out");
        return;
    }
    // Another process, uid 65534: its own rule.
    let nobody_access = client_as(
        Some(NOBODY),
        &broker.socket,
        &["token", "access", "--scope", "scope:nobody"],
    )
    .await;
    assert!(
        nobody_access.status.success(),
        "{}",
        String::from_utf8_lossy(&nobody_access.stderr)
    );
    let nobody_id = ["token", "id", "--audience", "https://x.nobody.run.app"];
    let refused = client_as(Some(NOBODY), &broker.socket, &nobody_id).await;
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
    std::fs::write(&policy_path, policy(me, true)).unwrap();
    broker.signal(Signal::SIGHUP);
    broker.wait_for_log("policy reloaded").await;
    let allowed = client_as(Some(NOBODY), &broker.socket, &nobody_id).await;
    assert!(
        allowed.status.success(),
        "{}",
        String::from_utf8_lossy(&allowed.stderr)
    );

    // A broken file on reload is reported and the rules in force stay.
    std::fs::write(&policy_path, "[[allow]\nbroken").unwrap();
    broker.signal(Signal::SIGHUP);
    broker.wait_for_log("policy not reloaded").await;
    let still = client_as(Some(NOBODY), &broker.socket, &nobody_id).await;
    assert!(
        still.status.success(),
        "{}",
        String::from_utf8_lossy(&still.stderr)
    );
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
    let path = dir.path().join("policy.toml");
    std::fs::write(
        &path,
        "[[allow]]\nservice_accounts = [\"*\"]\naudience = [\"typo\"]\n",
    )
    .unwrap();
    let socket = dir.path().join("s.sock");
    let args = [
        "serve",
        "--emulator",
        "--socket",
        socket.to_str().unwrap(),
        "--policy",
        path.to_str().unwrap(),
    ];
    let stderr = binary_fails(args).await;
    assert!(
        stderr.contains("audience") && stderr.contains("policy.toml"),
        "{stderr}"
    );
    assert!(!dir.path().join("s.sock").exists());
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
    let mut client = broker.client().await;
    let mut tokens = Vec::new();
    tokens.push(
        client
            .get_access_token(access_request(&["scope:a"]))
            .await
            .unwrap()
            .into_inner()
            .token,
    );
    tokens.push(
        client
            .get_id_token(GetIdTokenRequest {
                format: 2,
                ..id_request("https://a.run.app")
            })
            .await
            .unwrap()
            .into_inner()
            .token,
    );
    let watch = WatchTokenRequest {
        request: Some(watch_token_request::Request::IdToken(id_request(
            "https://w.run.app",
        ))),
    };
    let mut stream = client.watch_token(watch).await.unwrap().into_inner();
    for _ in 0..2 {
        match stream.message().await.unwrap().unwrap().token {
            Some(token::Token::IdToken(t)) => tokens.push(t.token),
            other => panic!("{other:?}"),
        }
    }
    drop(stream);
    broker.signal(Signal::SIGTERM);
    assert!(broker.wait().await.success());
    broker.wait_for_log("stopped").await;
    let logs = broker.logs();
    assert!(logs.lines().count() > 100, "trace logging is not on");
    for token in &tokens {
        // Any 16-byte window of a token would be a leak, not just all of it.
        let bytes = token.as_bytes();
        for start in (0..bytes.len().saturating_sub(16)).step_by(8) {
            let piece = std::str::from_utf8(&bytes[start..start + 16]).unwrap();
            assert!(
                !logs.contains(piece),
                "a piece of a token is in the logs: {piece}"
            );
        }
    }
}

#[tokio::test]
async fn an_oversized_request_is_resource_exhausted() {
    let broker = Broker::spawn(vec!["--emulator".into()], &[]).await;
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
    let policy_path = dir.path().join("policy.toml");
    std::fs::write(&policy_path, policy(me, false)).unwrap();
    let policy_flag = policy_path.to_str().unwrap().to_string();
    let broker = Broker::start(
        &emulator,
        &["--policy", &policy_flag, "--expiry-skew", "1s"],
    )
    .await;
    let mut client = broker.client().await;
    let watch = WatchTokenRequest {
        request: Some(watch_token_request::Request::IdToken(id_request(
            "https://allowed.run.app",
        ))),
    };
    let mut stream = client.watch_token(watch).await.unwrap().into_inner();
    assert!(stream.message().await.unwrap().is_some());

    // The rule for this uid is gone: the next refreshed token is not sent.
    std::fs::write(
        &policy_path,
        "[[allow]]\nuids = [4242]\nservice_accounts = [\"*\"]\naudiences = [\"*\"]\n",
    )
    .unwrap();
    broker.signal(Signal::SIGHUP);
    broker.wait_for_log("policy reloaded").await;
    let status = tokio::time::timeout(common::PATIENCE, stream.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains(&policy_flag),
        "{}",
        status.message()
    );
}
