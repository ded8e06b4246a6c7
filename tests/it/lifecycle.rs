//! The broker process: socket handling, signals, the built-in emulator and
//! the command-line client.

use std::os::unix::fs::FileTypeExt;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokenbroker::emulator::EmulatorConfig;
use tonic::Code;

use crate::common::{
    self, Broker, Printing, binary, binary_fails, emulator, id_request, next_token, succeeds,
    watch_end,
};

#[tokio::test]
async fn sigterm_ends_streams_and_exits_cleanly() {
    for signal in [Signal::SIGTERM, Signal::SIGINT] {
        let mut broker = Broker::emulated(&[]).await;
        let mut client = broker.typed_client().await;
        let mut watch = client.watch(id_request("https://a.run.app")).await.unwrap();
        next_token(&mut watch).await;

        broker.signal(signal);
        let status = watch_end(&mut watch).await;
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
    // Only root may give the socket a group that is not its own; a group
    // of its own would show nothing, so others check the mode alone.
    let root = common::is_root("giving the socket another group");
    let mut flags = vec!["--socket-mode", "0600"];
    if root {
        flags.extend(["--socket-group", "12345"]);
    }
    let broker = Broker::emulated(&flags).await;
    let meta = std::fs::metadata(&broker.socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(common::mode_of(&broker.socket), 0o600);
    if root {
        assert_ne!(nix::unistd::getegid().as_raw(), 12345);
        assert_eq!(std::os::unix::fs::MetadataExt::gid(&meta), 12345);
    }
}

#[tokio::test]
async fn a_second_broker_on_the_same_socket_is_refused() {
    let first = Broker::emulated(&[]).await;
    let socket = first.socket.to_str().unwrap();
    let stderr = binary_fails(["serve", "--emulator", "--socket", socket]).await;
    assert!(stderr.contains("already serving"), "{stderr}");
    // The first broker is untouched.
    let mut client = first.typed_client().await;
    assert!(client.id_token(id_request("aud")).await.is_ok());
}

#[tokio::test]
async fn a_stale_socket_is_replaced_and_other_files_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("tokenbroker.sock");
    // A socket nobody listens on, as a killed broker leaves behind.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let broker = Broker::spawn_at(&socket, dir, vec!["--emulator".into()], &[]);
    broker.wait_until_ready().await;
    assert!(broker.logs().contains("replacing stale socket"));
    let mut client = broker.typed_client().await;
    assert!(client.id_token(id_request("aud")).await.is_ok());

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
    let socket_str = socket.to_str().unwrap().to_string();
    let mut command = binary();
    command
        .args(["serve", "--emulator"])
        .env("TOKENBROKER_SOCKET", &socket_str);
    let broker = Broker::spawn_command(command, &socket, dir);
    broker.wait_until_ready().await;
    assert!(socket.exists(), "bound where TOKENBROKER_SOCKET says");

    let printed = succeeds(
        binary()
            .args(["token", "id", "--audience", "https://a.run.app", "--json"])
            .env("TOKENBROKER_SOCKET", &socket_str),
    )
    .await;
    let printed: serde_json::Value = serde_json::from_str(&printed).unwrap();
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
    let token = succeeds(
        binary()
            .args(["token", "access", "--scope", "scope:a,scope:b", "--socket"])
            .arg(&broker.socket),
    )
    .await;
    assert_eq!(
        emulator.token_info(token.trim()).unwrap().scopes,
        vec!["scope:a", "scope:b"]
    );

    let mut watcher = Printing::spawn(
        binary()
            .args(["token", "access", "--watch", "--socket"])
            .arg(&broker.socket),
    );
    let first = watcher.next_line().await;
    let second = watcher.next_line().await;
    assert_ne!(first, second);
    assert!(emulator.token_info(&second).is_some());
}

/// Flags of `serve` whose absence is their default (a feature off, a
/// file not read): their help says so in words, without `[default: ]`.
const OPTIONAL_FLAGS: [&str; 12] = [
    "--config",
    "--audit-log",
    "--audit-log-group",
    "--socket-group",
    "--policy",
    "--credentials",
    "--impersonate",
    "--delegates",
    "--metrics-addr",
    "--metadata-addr",
    "--node-name",
    "--kubeconfig",
];

#[tokio::test]
async fn help_explains_every_flag_with_its_default() {
    let help = succeeds(binary().args(["serve", "--help"])).await;
    // Each option's entry: its `--flag <VALUE>` line, then the indented
    // explanation, `[env: ]` and `[default: ]` lines.
    let mut entries: Vec<(String, Vec<&str>)> = Vec::new();
    for line in help.lines() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if (2..=6).contains(&indent) && trimmed.starts_with('-') {
            let flag = trimmed
                .split([' ', ','])
                .find(|word| word.starts_with("--"))
                .expect("a long flag")
                .to_string();
            entries.push((flag, Vec::new()));
        } else if let Some((_, text)) = entries.last_mut()
            && !trimmed.is_empty()
        {
            text.push(trimmed);
        }
    }
    assert!(entries.len() > 30, "{help}");
    for (flag, text) in &entries {
        if flag == "--help" || flag == "--version" {
            continue;
        }
        let explanation = text.iter().find(|line| !line.starts_with('['));
        assert!(
            explanation.is_some_and(|line| line.len() > 20),
            "{flag} is not explained:\n{help}"
        );
        assert!(
            text.iter().any(|line| line.starts_with("[env: ")),
            "{flag} names no environment variable"
        );
        let takes_value = help
            .lines()
            .any(|line| line.trim_start().starts_with(&format!("{flag} <")));
        if takes_value && !OPTIONAL_FLAGS.contains(&flag.as_str()) {
            assert!(
                text.iter().any(|line| line.starts_with("[default: ")),
                "{flag} shows no default"
            );
        }
    }
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
        let mut broker = Broker::emulated(&["--log-format", format]).await;
        broker.stop().await;
        broker.wait_for_log("stopped").await;
        for line in broker.logs().lines() {
            let parsed = serde_json::from_str::<serde_json::Value>(line);
            assert_eq!(parsed.is_ok(), json, "{format}: {line}");
        }
    }
}

#[tokio::test]
async fn one_drain_stops_health_readiness_and_the_metadata_endpoint_together() {
    use common::http::{Endpoint, get};
    use tokenbroker::emulator::{Fault, FaultRule, Target};
    use tonic_health::pb::health_check_response::ServingStatus;

    let emulator = emulator(EmulatorConfig::default()).await;
    let mut broker = Broker::start(
        &emulator,
        &[
            "--metrics-addr",
            "127.0.0.1:0",
            "--metadata-addr",
            "127.0.0.1:0",
            "--shutdown-grace",
            "20s",
        ],
    )
    .await;
    let (metrics, metadata) = (broker.metrics_addr().await, broker.metadata_addr().await);
    // Ready (listening) comes before the first health probe has answered.
    broker.wait_until_serving().await;
    let mut health = broker.health_watch().await;
    assert_eq!(health.next().await, ServingStatus::Serving);

    // A metadata request in flight when the drain starts: its token takes
    // two seconds to come.
    emulator.set_fault(Some(FaultRule {
        target: Target::Identity,
        ..FaultRule::always(Fault::Delay { millis: 2000 })
    }));
    let in_flight = tokio::spawn(async move {
        get(
            Endpoint::Tcp(metadata),
            "/computeMetadata/v1/instance/service-accounts/default/identity?audience=https://slow.run.app",
        )
        .await
    });
    emulator
        .wait_for(|s| s.identity_requests == 1, common::PATIENCE)
        .await
        .expect("the request reaches the metadata server");

    broker.signal(Signal::SIGTERM);
    assert_eq!(health.next().await, ServingStatus::NotServing);
    let readyz = common::http::get_local(metrics, "/readyz").await;
    assert_eq!(readyz.status, 503, "/readyz during the drain");
    // Health turns before the listeners close: wait for the endpoint's.
    broker
        .wait_for_log("metadata endpoint closed to new connections")
        .await;
    assert!(
        tokio::net::TcpStream::connect(metadata).await.is_err(),
        "the metadata endpoint takes no new connection once draining"
    );
    let answer = in_flight.await.unwrap();
    assert_eq!(
        answer.status, 200,
        "the request in flight is finished: {}",
        answer.body
    );
    drop(health);
    assert!(broker.wait().await.success());
}
