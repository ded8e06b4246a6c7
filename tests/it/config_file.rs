//! `serve --config FILE` with the real binary: precedence of flags,
//! environment and file, start-up errors, and file sinks.

use std::time::Duration;

use crate::common::{
    self, BINARY, Broker, NOBODY, as_uid, binary, emulator_with_lifetime, id_sink, mode_of, names,
    output, serve_fails, write_config,
};

#[tokio::test]
async fn flags_beat_the_environment_which_beats_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "emulator = true\nsocket_mode = \"0600\"\nsocket = \"/nonexistent/never-used.sock\"\n",
    );
    let args = |extra: &[&str]| {
        let mut args = vec!["--config".to_string(), config.clone()];
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    // The file beats the default (0660); `--socket` on the command line
    // (given by the harness) beats the file's.
    let broker = Broker::spawn(args(&[]), &[]).await;
    assert_eq!(mode_of(&broker.socket), 0o600);
    drop(broker);
    // The environment beats the file.
    let broker = Broker::spawn(args(&[]), &[("TOKENBROKER_SOCKET_MODE", "0640")]).await;
    assert_eq!(mode_of(&broker.socket), 0o640);
    drop(broker);
    // The command line beats both.
    let broker = Broker::spawn(
        args(&["--socket-mode", "0666"]),
        &[("TOKENBROKER_SOCKET_MODE", "0640")],
    )
    .await;
    assert_eq!(mode_of(&broker.socket), 0o666);
    // `emulator = true` from the file took effect: tokens come.
    let mut client = broker.typed_client().await;
    client
        .id_token(common::id_request("https://from-file"))
        .await
        .expect("served from the in-process emulator");
}

#[tokio::test]
async fn a_bad_config_file_stops_the_broker_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "emulator = true\nrefresh_margn = \"1m\"\n");
    let socket = dir.path().join("never.sock");
    let output = output(
        binary()
            .args(["serve", "--config", &config, "--socket"])
            .arg(&socket),
    )
    .await;
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("unknown key `refresh_margn`"), "{stderr}");
    assert!(stderr.contains("tokenbroker.toml"), "{stderr}");

    let sink_dir = dir.path().join("missing-dir");
    let config = write_config(
        dir.path(),
        &format!(
            "emulator = true\n{}",
            id_sink(&sink_dir.join("token"), "https://a", &[])
        ),
    );
    let stderr = serve_fails(&dir.path().join("s.sock"), &["--config", &config]).await;
    assert!(
        stderr.contains("missing-dir/token") && stderr.contains("directory must exist"),
        "{stderr}"
    );
}

#[tokio::test]
async fn sinks_are_rewritten_on_refresh_and_removed_or_kept_on_shutdown() {
    let emulator = emulator_with_lifetime(Duration::from_secs(4)).await;
    let dir = tempfile::tempdir().unwrap();
    let id_path = dir.path().join("id.jwt");
    let access_path = dir.path().join("access.token");
    let config = write_config(
        dir.path(),
        &format!(
            r#"
metadata_host = "{host}"
expiry_skew = "1s"
{id_sink}
[[sink]]
path = {access_path:?}
access_token = {{ scopes = ["s:sink"] }}
mode = "0600"
on_shutdown = "keep"
"#,
            host = emulator.host(),
            id_sink = id_sink(&id_path, "https://sink.a.run.app", &[]),
        ),
    );
    let mut broker = Broker::spawn(vec!["--config".into(), config], &[]).await;
    let id_sink = id_path.to_str().unwrap();
    broker
        .wait_for_log_lines(&["sink written", id_sink], 1)
        .await;
    let first = std::fs::read_to_string(&id_path).unwrap();
    assert_eq!(common::claims(&first)["aud"], "https://sink.a.run.app");
    assert_eq!(
        mode_of(&id_path),
        0o600,
        "the default mode, without a group"
    );

    // The sink is a watcher of the key: it is refreshed with nobody asking.
    broker
        .wait_for_log_lines(&["sink written", id_sink], 2)
        .await;
    let second = std::fs::read_to_string(&id_path).unwrap();
    assert_ne!(first, second, "rewritten with the refreshed token");
    broker
        .wait_for_log_lines(&["sink written", access_path.to_str().unwrap()], 1)
        .await;
    let access = std::fs::read_to_string(&access_path).unwrap();
    assert_eq!(emulator.token_info(&access).unwrap().scopes, vec!["s:sink"]);
    assert_eq!(mode_of(&access_path), 0o600);

    broker.stop().await;
    assert!(!id_path.exists(), "on_shutdown = remove (the default)");
    assert!(access_path.exists(), "on_shutdown = keep");
    let leftovers: Vec<_> = names(dir.path())
        .into_iter()
        .filter(|name| name.starts_with(".tokenbroker-sink-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert!(!broker.logs().contains(&second), "a token reached the logs");
}

#[tokio::test]
async fn a_sink_owner_the_broker_cannot_set_stops_it_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let root = nix::unistd::geteuid().is_root();
    if root {
        // The broker runs as nobody below: the directory is its own.
        std::os::unix::fs::chown(dir.path(), Some(NOBODY), Some(NOBODY)).unwrap();
    }
    let config = write_config(
        dir.path(),
        &format!(
            "emulator = true\n{}",
            id_sink(&dir.path().join("token"), "https://a", &["owner = \"0\""])
        ),
    );
    let socket = dir.path().join("s.sock");
    // Giving a file to root needs root: run as nobody if we are root.
    let mut command = if root {
        as_uid(NOBODY, BINARY)
    } else {
        binary()
    };
    let output = output(
        command
            .args(["serve", "--config", &config, "--socket"])
            .arg(&socket),
    )
    .await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot set the file's owner or group")
            && stderr.contains("needs root or CAP_CHOWN"),
        "{stderr}"
    );
    assert!(!dir.path().join("token").exists());
    assert!(!socket.exists());
}
