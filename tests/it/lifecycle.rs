//! The broker process: socket handling, signals, the built-in emulator and
//! the command-line client.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::time::Duration;

use crate::common;
use crate::common::{Broker, PATIENCE, binary_fails, emulator, id_request};
use nix::sys::signal::Signal;
use tokenbroker::emulator::EmulatorConfig;
use tokenbroker::proto::v1::{WatchTokenRequest, watch_token_request};
use tonic::Code;

#[tokio::test]
async fn sigterm_ends_streams_and_exits_cleanly() {
    for signal in [Signal::SIGTERM, Signal::SIGINT] {
        let mut broker = Broker::spawn(vec!["--emulator".into()], &[]).await;
        let mut client = broker.client().await;
        let request = WatchTokenRequest {
            request: Some(watch_token_request::Request::IdToken(id_request(
                "https://a.run.app",
            ))),
        };
        let mut watch = client.watch_token(request).await.unwrap().into_inner();
        assert!(watch.message().await.unwrap().is_some());

        broker.signal(signal);
        let status = tokio::time::timeout(PATIENCE, watch.message())
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
        assert!(
            status.message().contains("shutting down"),
            "{}",
            status.message()
        );
        assert!(broker.wait().await.success(), "{signal:?}");
        assert!(
            !broker.socket.exists(),
            "socket left behind after {signal:?}"
        );
    }
}

#[tokio::test]
async fn socket_gets_the_requested_mode_and_group() {
    // Root may give the socket any group; others only one of their own.
    let gid = if nix::unistd::geteuid().is_root() {
        12345
    } else {
        nix::unistd::getegid().as_raw()
    };
    let broker = Broker::spawn(
        vec![
            "--emulator".into(),
            "--socket-mode".into(),
            "0600".into(),
            "--socket-group".into(),
            gid.to_string(),
        ],
        &[],
    )
    .await;
    let meta = std::fs::metadata(&broker.socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(std::os::unix::fs::MetadataExt::gid(&meta), gid);
}

#[tokio::test]
async fn a_second_broker_on_the_same_socket_is_refused() {
    let first = Broker::spawn(vec!["--emulator".into()], &[]).await;
    let socket = first.socket.to_str().unwrap();
    let stderr = binary_fails(["serve", "--emulator", "--socket", socket]).await;
    assert!(stderr.contains("already serving"), "{stderr}");
    // The first broker is untouched.
    let mut client = first.client().await;
    assert!(client.get_id_token(id_request("aud")).await.is_ok());
}

#[tokio::test]
async fn a_stale_socket_is_replaced_and_other_files_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("tokenbroker.sock");
    // A socket nobody listens on, as a killed broker leaves behind.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let broker = Broker::spawn_at(&socket, dir, vec!["--emulator".into()], &[]);
    broker.wait_for_log("tokenbroker ready").await;
    assert!(broker.logs().contains("replacing stale socket"));
    let mut client = broker.client().await;
    assert!(client.get_id_token(id_request("aud")).await.is_ok());

    let dir = tempfile::tempdir().unwrap();
    let not_a_socket = dir.path().join("tokenbroker.sock");
    std::fs::write(&not_a_socket, "keep me").unwrap();
    let socket = not_a_socket.to_str().unwrap();
    let stderr = binary_fails(["serve", "--emulator", "--socket", socket]).await;
    assert!(stderr.contains("not a socket"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&not_a_socket).unwrap(), "keep me");
}

#[tokio::test]
async fn socket_path_comes_from_the_environment_for_broker_and_client() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nested/dir/env.sock");
    let socket_str = socket.to_str().unwrap();
    let mut command = common::binary();
    command
        .args(["serve", "--emulator"])
        .env("TOKENBROKER_SOCKET", socket_str)
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut broker = command.spawn().unwrap();
    let stderr = broker.stderr.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stderr));
    let ready = tokio::time::timeout(PATIENCE, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("tokenbroker ready") {
                return;
            }
        }
        panic!("broker exited before it was ready");
    });
    ready.await.unwrap();

    let output = common::binary()
        .args(["token", "id", "--audience", "https://a.run.app", "--json"])
        .env("TOKENBROKER_SOCKET", socket_str)
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let printed: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        common::claims(printed["token"].as_str().unwrap())["aud"],
        "https://a.run.app"
    );
    assert!(printed["expire_time"].as_str().unwrap().ends_with('Z'));
}

#[tokio::test]
async fn the_client_command_explains_a_missing_broker() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nothing.sock");
    let stderr = binary_fails(["token", "access", "--socket", socket.to_str().unwrap()]).await;
    // (the exit code, 3, is checked in cli.rs)
    assert!(
        stderr.contains("is `tokenbroker serve` running"),
        "{stderr}"
    );
}

#[tokio::test]
async fn the_client_command_prints_and_watches_tokens() {
    let emulator = emulator(EmulatorConfig {
        access_token_lifetime: Duration::from_secs(4),
        ..EmulatorConfig::default()
    })
    .await;
    let broker = Broker::start(&emulator, &["--expiry-skew", "1s"]).await;
    let output = common::binary()
        .args(["token", "access", "--scope", "scope:a,scope:b", "--socket"])
        .arg(&broker.socket)
        .output()
        .await
        .unwrap();
    assert!(output.status.success());
    let token = String::from_utf8(output.stdout).unwrap();
    assert_eq!(
        emulator.token_info(token.trim()).unwrap().scopes,
        vec!["scope:a", "scope:b"]
    );

    let mut watcher = common::binary()
        .args(["token", "access", "--watch", "--socket"])
        .arg(&broker.socket)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = watcher.stdout.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let first = tokio::time::timeout(PATIENCE, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let second = tokio::time::timeout(PATIENCE, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_ne!(first, second);
    assert!(emulator.token_info(&second).is_some());
}

#[tokio::test]
async fn help_explains_every_flag_with_its_default() {
    let output = common::binary()
        .args(["serve", "--help"])
        .output()
        .await
        .unwrap();
    let help = String::from_utf8(output.stdout).unwrap();
    for flag in [
        "--socket",
        "--socket-mode",
        "--metadata-host",
        "--emulator",
        "--upstream-timeout",
        "--refresh-margin",
        "--expiry-skew",
        "--idle-timeout",
        "--max-keys",
        "--shutdown-grace",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
    assert!(help.contains("[default: /run/tokenbroker/tokenbroker.sock]"));
    assert!(help.contains("[env: GCE_METADATA_HOST="));
}

#[tokio::test]
async fn logs_are_json_or_text_as_asked() {
    for (format, json) in [("json", true), ("text", false)] {
        let mut broker = Broker::spawn(
            vec!["--emulator".into(), "--log-format".into(), format.into()],
            &[],
        )
        .await;
        broker.signal(Signal::SIGTERM);
        assert!(broker.wait().await.success());
        broker.wait_for_log("stopped").await;
        for line in broker.logs().lines() {
            let parsed = serde_json::from_str::<serde_json::Value>(line);
            assert_eq!(parsed.is_ok(), json, "{format}: {line}");
        }
    }
}
