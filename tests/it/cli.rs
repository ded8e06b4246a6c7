//! `tokenbroker token access|id` against the real broker: output, the old
//! command names, and one exit code per kind of failure.

use std::path::Path;
use std::process::Output;

use tokenbroker::emulator::{EmulatorConfig, Fault, FaultRule};
use tokio::process::Command;

use crate::common::{self, BINARY, Broker, Printing, binary, emulator, output};

async fn run(broker: &Broker, args: &[&str]) -> Output {
    output(binary().args(args).arg("--socket").arg(&broker.socket)).await
}

/// Runs `tokenbroker ARGS --socket ...`, which must succeed: what it printed.
async fn run_ok(broker: &Broker, args: &[&str]) -> String {
    common::succeeds(binary().args(args).arg("--socket").arg(&broker.socket)).await
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test]
async fn token_id_prints_a_bearer_token_for_the_audience() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let broker = Broker::start(&emulator, &[]).await;
    let printed = run_ok(
        &broker,
        &["token", "id", "--audience", "https://svc-xyz.a.run.app"],
    )
    .await;
    assert!(printed.ends_with('\n') && printed.lines().count() == 1);
    let claims = common::claims(printed.trim_end());
    assert_eq!(claims["aud"], "https://svc-xyz.a.run.app");
    assert!(claims.get("google").is_none());

    let printed: serde_json::Value = serde_json::from_str(
        &run_ok(
            &broker,
            &[
                "token",
                "id",
                "--audience",
                "https://svc-xyz.a.run.app",
                "--format",
                "full",
                "--include-licenses",
                "--json",
            ],
        )
        .await,
    )
    .unwrap();
    let claims = common::claims(printed["token"].as_str().unwrap());
    assert!(claims["google"]["compute_engine"].is_object(), "{claims}");
    assert!(
        claims["google"]["compute_engine"]["license_id"].is_array(),
        "{claims}"
    );
    let expire_time = humantime::parse_rfc3339(printed["expire_time"].as_str().unwrap()).unwrap();
    let exp = expire_time
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert_eq!(
        Some(exp),
        claims["exp"].as_u64(),
        "expire_time is the JWT's exp"
    );
}

#[tokio::test]
async fn token_access_prints_a_token_with_the_scopes() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let broker = Broker::start(&emulator, &[]).await;
    let token = run_ok(
        &broker,
        &["token", "access", "--scope", "s:one", "--scope", "s:two"],
    )
    .await;
    let info = emulator
        .token_info(token.trim())
        .expect("an emulator token");
    assert_eq!(info.scopes, vec!["s:one", "s:two"]);
}

#[tokio::test]
async fn the_old_command_names_still_work() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let broker = Broker::start(&emulator, &[]).await;
    let token = run_ok(&broker, &["print-access-token", "--scope", "s:old"]).await;
    assert_eq!(
        emulator.token_info(token.trim()).unwrap().scopes,
        vec!["s:old"]
    );
    let printed_token = run_ok(
        &broker,
        &[
            "print-identity-token",
            "--audience",
            "https://old",
            "--full",
        ],
    )
    .await;
    let claims = common::claims(printed_token.trim());
    assert_eq!(claims["aud"], "https://old");
    assert!(claims["google"]["compute_engine"].is_object());
    // Hidden from the help, which shows the new names.
    let help = common::succeeds(binary().arg("--help")).await;
    assert!(
        help.contains("\n  token ") && !help.contains("print-access-token"),
        "{help}"
    );
}

#[tokio::test]
async fn each_failure_has_its_own_exit_code() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let broker = Broker::start(&emulator, &[]).await;

    // 2: usage.
    let output = run(
        &broker,
        &[
            "token",
            "id",
            "--audience",
            "https://a",
            "--include-licenses",
        ],
    )
    .await;
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(stderr(&output).contains("--format full"));
    let output = run(&broker, &["token", "id"]).await;
    assert_eq!(output.status.code(), Some(2), "--audience is required");

    // 13: INVALID_ARGUMENT, refused by the broker's validation.
    let output = run(&broker, &["token", "access", "--scope", "has space"]).await;
    assert_eq!(output.status.code(), Some(13), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("InvalidArgument"),
        "{}",
        stderr(&output)
    );

    // 15: NOT_FOUND, an account the metadata server does not know.
    let output = run(
        &broker,
        &[
            "token",
            "access",
            "--service-account",
            "nobody@p.iam.gserviceaccount.com",
        ],
    )
    .await;
    assert_eq!(output.status.code(), Some(15), "{}", stderr(&output));

    // 24: UNAVAILABLE, the metadata server is failing.
    emulator.set_fault(Some(FaultRule::always(Fault::Status {
        status: 503,
        retry_after_secs: None,
    })));
    let output = run(&broker, &["token", "id", "--audience", "https://down"]).await;
    assert_eq!(output.status.code(), Some(24), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("Unavailable"),
        "{}",
        stderr(&output)
    );
    emulator.set_fault(None);

    // 3: nothing listens on the socket.
    let dir = tempfile::tempdir().unwrap();
    let output = common::output(
        binary()
            .args(["token", "access", "--socket"])
            .arg(dir.path().join("none.sock")),
    )
    .await;
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    assert!(stderr(&output).contains("is `tokenbroker serve` running"));
    // (17, PERMISSION_DENIED, is checked in security.rs.)
}

#[tokio::test]
async fn the_help_documents_the_exit_codes() {
    for args in [["token", "id", "--help"], ["token", "access", "--help"]] {
        let help = common::succeeds(binary().args(args)).await;
        for line in [
            "3   cannot connect",
            "13 INVALID_ARGUMENT",
            "24 UNAVAILABLE",
        ] {
            assert!(help.contains(line), "{args:?}: {line:?} missing:\n{help}");
        }
        for flag in [
            "--socket",
            "--json",
            "--watch",
            "--watch-once",
            "--service-account",
        ] {
            assert!(help.contains(flag), "{args:?}: {flag} missing");
        }
    }
}

#[tokio::test]
async fn a_single_watch_that_the_broker_ends_exits_with_unavailable() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let mut broker = Broker::start(&emulator, &[]).await;
    let mut watcher = Printing::spawn(
        binary()
            .args(["token", "id", "--audience", "https://w", "--watch-once"])
            .arg("--socket")
            .arg(&broker.socket)
            .stderr(std::process::Stdio::piped()),
    );
    let first = watcher.next_line().await;
    assert_eq!(common::claims(&first)["aud"], "https://w");
    broker.stop().await;
    let status = watcher.wait().await;
    assert_eq!(status.code(), Some(24), "the stream ended with UNAVAILABLE");
}

#[tokio::test]
async fn a_shell_script_calls_a_service_with_the_token() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let broker = Broker::start(&emulator, &[]).await;
    let (addr, accepted) = common::checking_server().await;
    let url = format!("http://{addr}/hello");
    common::install_test_deps(&["tools"]).await;
    // The README's line, with the local server for the service.
    let readme = std::fs::read_to_string(common::root().join("README.md")).unwrap();
    let script = readme
        .lines()
        .find(|line| line.starts_with("curl -H \"Authorization: Bearer $(tokenbroker token id"))
        .expect("the README shows curl with `tokenbroker token id`")
        .replacen("curl ", "curl -sf ", 1)
        .replace("https://svc-xyz.a.run.app/", &url)
        .replace("https://svc-xyz.a.run.app", &url);
    assert_eq!(script.matches(url.as_str()).count(), 2, "{script}");
    let bin_dir = Path::new(BINARY).parent().unwrap();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap());
    let output = output(
        Command::new("sh")
            .args(["-c", &script])
            .env("PATH", path)
            .env("TOKENBROKER_SOCKET", &broker.socket),
    )
    .await;
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(String::from_utf8_lossy(&output.stdout), "hello");
    assert_eq!(accepted.lock().unwrap().len(), 1);
}
