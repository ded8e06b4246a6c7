//! The audit trail (`--audit-log`), end to end: the broker binary writes one
//! JSON line per decision (gRPC, the metadata endpoint on TCP, watch
//! streams, sinks, invalidations, denials and failures) with the peer and a
//! fingerprint of the token, never the token; a rotated file loses no line;
//! an unsafe directory stops the broker.

use nix::sys::signal::Signal;
use serde_json::Value;
use tokenbroker::emulator::EmulatorConfig;
use tokenbroker::proto::v1::{GetIdTokenRequest, InvalidateTokenRequest, invalidate_token_request};

use crate::common::audit::{lines, wait_for_line, wait_for_lines};
use crate::common::http::{Endpoint, get};
use crate::common::{
    Broker, access_request, chmod, emulator, id_request, id_sink, next_token, poll_until,
    serve_fails, write_config,
};

/// The first 16 hex digits of the SHA-256 of `token`.
fn fingerprint(token: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test]
async fn every_decision_is_a_json_line_with_the_peer_and_a_fingerprint_never_the_token() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    chmod(dir.path(), 0o700);
    let audit = dir.path().join("audit.log");
    let me = nix::unistd::getuid().as_raw();
    let policy = crate::common::write_policy(
        dir.path(),
        &format!(
            "[[allow]]\nuids = [{me}]\nservice_accounts = [\"default\"]\naudiences = [\"https://allowed.example.com\"]\nscopes = [\"*\"]\n"
        ),
    );
    let sink = dir.path().join("sink.jwt");
    let config = write_config(
        dir.path(),
        &format!(
            "metadata_addr = \"127.0.0.1:0\"\n{}",
            id_sink(&sink, "https://sink.example.com", &[])
        ),
    );
    let audit_flag = audit.to_str().unwrap().to_string();
    let broker = Broker::start(
        &emulator,
        &[
            "--config",
            &config,
            "--policy",
            &policy,
            "--audit-log",
            &audit_flag,
        ],
    )
    .await;
    // The sink's first write.
    let first = wait_for_lines(&audit, 1).await;
    assert_eq!(first[0]["event"], "sink_write");
    assert_eq!(first[0]["transport"], "sink");
    assert_eq!(first[0]["audience"], "https://sink.example.com");
    let sink_token = std::fs::read_to_string(&sink).unwrap();
    assert_eq!(first[0]["token_sha256"], fingerprint(sink_token.trim()));

    let mut tokens = broker.typed_client().await;
    let mut client = broker.client().await;
    let miss = tokens
        .access_token(access_request(&["scope:a"]))
        .await
        .unwrap();
    let hit = tokens
        .access_token(access_request(&["scope:a"]))
        .await
        .unwrap();
    let id = tokens
        .id_token(id_request("https://allowed.example.com"))
        .await
        .unwrap();
    let denied = client
        .get_id_token(id_request("https://other.example.com"))
        .await
        .unwrap_err();
    let invalid = client
        .get_id_token(GetIdTokenRequest::default())
        .await
        .unwrap_err();
    let handed_back = InvalidateTokenRequest {
        token: id.token.clone(),
        request: Some(invalidate_token_request::Request::IdToken(id_request(
            "https://allowed.example.com",
        ))),
    };
    client.invalidate_token(handed_back).await.unwrap();
    let mut watch = tokens.watch(access_request(&["scope:a"])).await.unwrap();
    let watched = next_token(&mut watch).await;
    let to = Endpoint::Tcp(broker.metadata_addr().await);
    let metadata = get(
        to,
        "/computeMetadata/v1/instance/service-accounts/default/token?scopes=scope:m",
    )
    .await;
    assert_eq!(metadata.status, 200);
    let metadata_token = metadata.json()["access_token"]
        .as_str()
        .unwrap()
        .to_string();

    let all = wait_for_lines(&audit, 9).await;
    let find = |event: &str, rpc: &str| {
        all.iter()
            .find(|l| l["event"] == event && l["rpc"] == rpc)
            .unwrap_or_else(|| panic!("no {event} line for {rpc}: {all:#?}"))
            .clone()
    };
    let grants: Vec<&Value> = all
        .iter()
        .filter(|l| l["event"] == "grant" && l["rpc"] == "GetAccessToken")
        .collect();
    assert_eq!(grants.len(), 2);
    assert_eq!(grants[0]["cache"], "miss");
    assert_eq!(grants[1]["cache"], "hit");
    let grant = grants[0];
    assert_eq!(grant["transport"], "grpc");
    assert_eq!(grant["peer"]["uid"], me);
    assert_eq!(grant["peer"]["pid"], std::process::id());
    let exe = std::env::current_exe().unwrap();
    assert_eq!(grant["peer"]["exe"], exe.display().to_string());
    assert_eq!(grant["service_account"], "default");
    assert_eq!(grant["token_kind"], "access_token");
    assert_eq!(grant["scopes"], serde_json::json!(["scope:a"]));
    assert_eq!(grant["outcome"], "ok");
    assert_eq!(grant["code"], "OK");
    assert_eq!(grant["token_sha256"], fingerprint(&miss.token));
    assert_eq!(grants[1]["token_sha256"], fingerprint(&hit.token));
    assert!(grant["expire_time"].as_str().unwrap().ends_with('Z'));
    assert!(humantime::parse_rfc3339(grant["time"].as_str().unwrap()).is_ok());

    let id_grant = find("grant", "GetIdToken");
    assert_eq!(id_grant["audience"], "https://allowed.example.com");
    assert_eq!(id_grant["token_sha256"], fingerprint(&id.token));
    let deny = find("deny", "GetIdToken");
    assert_eq!(deny["audience"], "https://other.example.com");
    assert_eq!(deny["code"], "PERMISSION_DENIED");
    assert_eq!(deny["outcome"], "denied");
    assert!(deny.get("token_sha256").is_none());
    let error = find("error", "GetIdToken");
    assert_eq!(error["code"], "INVALID_ARGUMENT");
    let invalidate = find("invalidate", "InvalidateToken");
    assert_eq!(invalidate["token_sha256"], fingerprint(&id.token));
    let watch_line = find("watch_token", "WatchToken");
    let tokenbroker::proto::v1::token::Token::AccessToken(watched) = watched else {
        panic!("an access token");
    };
    assert_eq!(watch_line["token_sha256"], fingerprint(&watched.token));
    let over_tcp = find("grant", "MetadataToken");
    assert_eq!(over_tcp["transport"], "metadata_tcp");
    assert!(over_tcp.get("peer").is_none(), "a TCP peer is unknown");
    assert_eq!(over_tcp["token_sha256"], fingerprint(&metadata_token));
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    assert_eq!(invalid.code(), tonic::Code::InvalidArgument);

    // The file holds no token, and only its owner may read it.
    let text = std::fs::read_to_string(&audit).unwrap();
    for token in [
        miss.token.as_str(),
        &id.token,
        &watched.token,
        &metadata_token,
        sink_token.trim(),
    ] {
        assert!(!text.contains(token), "a token is in the audit log");
    }
    assert_eq!(crate::common::mode_of(&audit) & 0o777, 0o600);
}

/// A sink's `sink_write` line comes once its file holds the token. A write
/// that fails (the path is now a directory) is an `error` line without the
/// token, which never left; the next write that lands is a `sink_write`.
#[tokio::test]
async fn a_sink_write_is_audited_once_the_file_holds_the_token_and_a_failed_one_as_an_error() {
    // 4 s tokens, usable for 3 s: the sink is rewritten every 1.5 s or so.
    let emulator = crate::common::emulator_with_lifetime(std::time::Duration::from_secs(4)).await;
    let dir = tempfile::tempdir().unwrap();
    chmod(dir.path(), 0o700);
    let audit = dir.path().join("audit.log");
    let sink = dir.path().join("sink.jwt");
    let config = write_config(dir.path(), &id_sink(&sink, "https://sink.example.com", &[]));
    let audit_flag = audit.to_str().unwrap().to_string();
    let _broker = Broker::start(
        &emulator,
        &[
            "--config",
            &config,
            "--audit-log",
            &audit_flag,
            "--expiry-skew",
            "1s",
        ],
    )
    .await;
    let is_write = |line: &Value| line["event"] == "sink_write";
    wait_for_line(&audit, is_write).await;
    // The line came after the write: the file is there, and its token
    // (this one or a later one) is audited.
    let written = std::fs::read_to_string(&sink).expect("the sink's file");
    let fingerprint_of = |token: &str| fingerprint(token.trim());
    let first = fingerprint_of(&written);
    wait_for_line(&audit, |line| {
        is_write(line) && line["token_sha256"] == first
    })
    .await;

    // The next write cannot replace a directory.
    std::fs::remove_file(&sink).unwrap();
    std::fs::create_dir(&sink).unwrap();
    std::fs::write(sink.join("keep"), "").unwrap();
    let failed = wait_for_line(&audit, |line| line["event"] == "error").await;
    assert_eq!(failed["rpc"], "Sink");
    assert_eq!(failed["transport"], "sink");
    assert_eq!(failed["outcome"], "failed");
    assert_eq!(failed["code"], "INTERNAL");
    assert_eq!(failed["audience"], "https://sink.example.com");
    assert!(failed.get("token_sha256").is_none(), "{failed}");
    assert!(failed.get("expire_time").is_none(), "{failed}");

    std::fs::remove_dir_all(&sink).unwrap();
    let failures = lines(&audit)
        .iter()
        .position(|line| line["event"] == "error")
        .unwrap();
    poll_until(
        "a write after the failure",
        || lines(&audit)[failures..].iter().any(is_write),
        || format!("{:#?}", lines(&audit)),
    )
    .await;
    let rewritten = std::fs::read_to_string(&sink).expect("the sink's file");
    assert_ne!(written, rewritten, "a fresh token");
    let last = fingerprint_of(&rewritten);
    wait_for_line(&audit, |line| {
        is_write(line) && line["token_sha256"] == last
    })
    .await;
}

#[tokio::test]
async fn a_rotated_audit_log_loses_no_line() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    chmod(dir.path(), 0o700);
    let audit = dir.path().join("audit.log");
    let broker = Broker::start(&emulator, &["--audit-log", audit.to_str().unwrap()]).await;
    let mut tokens = broker.typed_client().await;
    for _ in 0..50 {
        tokens.access_token(access_request(&[])).await.unwrap();
    }
    // As logrotate does: move the file, then SIGHUP.
    let rotated = dir.path().join("audit.log.1");
    std::fs::rename(&audit, &rotated).unwrap();
    for _ in 0..50 {
        tokens.access_token(access_request(&[])).await.unwrap();
    }
    broker.signal(Signal::SIGHUP);
    broker.wait_for_log("audit log reopened").await;
    for _ in 0..50 {
        tokens.access_token(access_request(&[])).await.unwrap();
    }
    // Lines recorded before the signal went to the moved file, even those
    // the writer had not written yet; the rest to the new one.
    let count = || lines(&rotated).len() + lines(&audit).len();
    poll_until(
        "every line",
        || count() >= 150,
        || format!("{} lines", count()),
    )
    .await;
    assert_eq!((lines(&rotated).len(), lines(&audit).len()), (100, 50));
}

#[tokio::test]
async fn an_audit_log_others_could_swap_stops_the_broker() {
    let dir = tempfile::tempdir().unwrap();
    chmod(dir.path(), 0o777);
    let audit = dir.path().join("audit.log");
    let socket = tempfile::tempdir().unwrap();
    let stderr = serve_fails(
        &socket.path().join("s.sock"),
        &["--emulator", "--audit-log", audit.to_str().unwrap()],
    )
    .await;
    assert!(
        stderr.contains("audit log")
            && stderr.contains("can be changed by users other than its owner"),
        "{stderr}"
    );
    assert!(!audit.exists());
}

#[tokio::test]
async fn a_full_disk_drops_and_counts_lines_and_tokens_keep_coming() {
    let emulator = emulator(EmulatorConfig::default()).await;
    // Every write to /dev/full fails with ENOSPC.
    let broker = Broker::start(
        &emulator,
        &["--audit-log", "/dev/full", "--metrics-addr", "127.0.0.1:0"],
    )
    .await;
    let mut tokens = broker.typed_client().await;
    for _ in 0..20 {
        tokens.access_token(access_request(&[])).await.unwrap();
    }
    let metrics = broker.metrics_addr().await;
    let scrape = crate::common::scrape_until(metrics, |scrape| {
        scrape.value("tokenbroker_audit_dropped_total", &[]) >= 20.0
    })
    .await;
    assert_eq!(scrape.value("tokenbroker_audit_dropped_total", &[]), 20.0);
    broker.wait_for_log("audit log lines dropped").await;
}

#[tokio::test]
async fn the_metadata_endpoint_on_a_unix_socket_is_audited_with_its_peer() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    chmod(dir.path(), 0o700);
    let audit = dir.path().join("audit.log");
    let socket = dir.path().join("metadata.sock");
    let metadata_addr = format!("unix:{}", socket.display());
    let broker = Broker::start(
        &emulator,
        &[
            "--audit-log",
            audit.to_str().unwrap(),
            "--metadata-addr",
            &metadata_addr,
        ],
    )
    .await;
    broker.wait_for_log("metadata-server-compatible").await;
    let answer = get(
        Endpoint::Unix(&socket),
        "/computeMetadata/v1/instance/service-accounts/default/identity?audience=https://unix.example.com",
    )
    .await;
    assert_eq!(answer.status, 200);
    let line = &wait_for_lines(&audit, 1).await[0];
    assert_eq!(line["event"], "grant");
    assert_eq!(line["rpc"], "MetadataIdentity");
    assert_eq!(line["transport"], "metadata_unix");
    assert_eq!(line["peer"]["uid"], nix::unistd::getuid().as_raw());
    assert_eq!(line["audience"], "https://unix.example.com");
    assert_eq!(line["token_sha256"], fingerprint(answer.body.trim()));
}

#[tokio::test]
async fn the_account_default_stands_for_is_named_where_the_source_knows_it() {
    use crate::common::{KEY_ACCOUNT, trusted_key_file};
    let emulator = emulator(EmulatorConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    chmod(dir.path(), 0o700);
    let audit = dir.path().join("audit.log");
    let key = trusted_key_file(&emulator, dir.path());
    let broker = Broker::start(
        &emulator,
        &[
            "--credentials",
            key.to_str().unwrap(),
            "--audit-log",
            audit.to_str().unwrap(),
        ],
    )
    .await;
    broker
        .typed_client()
        .await
        .access_token(access_request(&[]))
        .await
        .unwrap();
    let line = &wait_for_lines(&audit, 1).await[0];
    assert_eq!(line["service_account"], KEY_ACCOUNT, "not \"default\"");
}
