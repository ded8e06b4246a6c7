//! Upstream HTTPS behind a corporate proxy: the broker binary with
//! `HTTPS_PROXY` reaches the emulator's fake STS and IAM Credentials API
//! (behind a TLS front) only through an HTTP CONNECT tunnel of a proxy
//! written here, which alone can resolve the target's name; `NO_PROXY`
//! bypasses it; a refusing proxy and a malformed variable fail clearly.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use base64::Engine;
use serde_json::json;
use tokenbroker::emulator::{Emulator, EmulatorConfig};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tonic::Code;

use crate::common::http::{TEST_CA, tls_front};
use crate::common::{Broker, access_request, assert_no_piece_of, claims, id_request, write_file};
use crate::federation::{
    AUDIENCE, JWT_TYPE, POOL, TARGET, access_refused, access_token, federating, holder,
    subject_token,
};

/// A name only the proxy knows: it stands for the TLS front.
const HIDDEN_HOST: &str = "sts.tokenbroker.test";

/// What the proxy saw of one CONNECT: its request line and its
/// `Proxy-Authorization`.
#[derive(Clone, Debug)]
struct Seen {
    line: String,
    auth: Option<String>,
}

/// An HTTP CONNECT proxy on a free port. It resolves [`HIDDEN_HOST`] to
/// `front` (other hosts as usual), and tunnels, unless `refuse`, when it
/// answers 403 instead.
async fn connect_proxy(front: SocketAddr, refuse: bool) -> (SocketAddr, Arc<Mutex<Vec<Seen>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let mut stream = BufReader::new(stream);
                let mut line = String::new();
                stream.read_line(&mut line).await.unwrap();
                let mut auth = None;
                loop {
                    let mut header = String::new();
                    stream.read_line(&mut header).await.unwrap();
                    if header.trim().is_empty() {
                        break;
                    }
                    if let Some((name, value)) = header.split_once(':')
                        && name.eq_ignore_ascii_case("proxy-authorization")
                    {
                        auth = Some(value.trim().to_string());
                    }
                }
                let line = line.trim().to_string();
                log.lock().unwrap().push(Seen {
                    line: line.clone(),
                    auth,
                });
                let target = line.split(' ').nth(1).unwrap_or_default().to_string();
                let mut stream = stream.into_inner();
                if refuse || !line.starts_with("CONNECT ") {
                    let _ = stream.write_all(b"HTTP/1.1 403 Forbidden\r\n\r\n").await;
                    return;
                }
                let upstream = match target.split_once(':') {
                    Some((HIDDEN_HOST, _)) => tokio::net::TcpStream::connect(front).await,
                    _ => tokio::net::TcpStream::connect(&target).await,
                };
                let Ok(mut upstream) = upstream else {
                    let _ = stream.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                    return;
                };
                stream
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await
                    .unwrap();
                let _ = tokio::io::copy_bidirectional(&mut stream, &mut upstream).await;
            });
        }
    });
    (addr, seen)
}

/// An `external_account` file whose STS and IAM URLs are under `base`,
/// impersonating [`crate::federation::TARGET`].
fn federation_file_at(dir: &Path, base: &str) -> std::path::PathBuf {
    let subject = dir.join("token");
    std::fs::write(&subject, subject_token("behind-proxy", 0)).unwrap();
    let json = json!({
        "type": "external_account",
        "audience": POOL,
        "subject_token_type": JWT_TYPE,
        "token_url": format!("{base}/v1/token"),
        "service_account_impersonation_url": format!("{base}/v1/projects/-/serviceAccounts/{TARGET}:generateAccessToken"),
        "credential_source": {"file": subject},
    });
    write_file(dir, "wif.json", &json, 0o600)
}

async fn broker_behind(emulator: &Emulator, file: &Path, env: &[(&str, &str)]) -> Broker {
    let args = [
        "--metadata-host",
        &emulator.host(),
        "--credentials",
        file.to_str().unwrap(),
        "--upstream-max-attempts",
        "1",
    ];
    let mut env = env.to_vec();
    env.push(("SSL_CERT_FILE", TEST_CA));
    Broker::spawn(args.map(String::from).to_vec(), &env).await
}

#[tokio::test]
async fn every_google_request_goes_through_the_proxys_tunnel_with_its_credentials() {
    let emulator = federating(EmulatorConfig::default()).await;
    let front = tls_front(emulator.addr()).await;
    let (proxy, seen) = connect_proxy(front, false).await;
    let dir = tempfile::tempdir().unwrap();
    // The broker cannot resolve this name: only a tunnel reaches it.
    let base = format!("https://{HIDDEN_HOST}:{}", front.port());
    let file = federation_file_at(dir.path(), &base);
    let proxy_url = format!("http://corp%5Cana:p%40ss@127.0.0.1:{}", proxy.port());
    let broker = broker_behind(&emulator, &file, &[("HTTPS_PROXY", &proxy_url)]).await;
    broker.wait_for_log("through the proxy").await;
    assert!(
        !broker.logs().contains("p%40ss"),
        "the proxy's password was logged"
    );

    let mut client = broker.typed_client().await;
    let access = client.access_token(access_request(&[])).await.unwrap();
    assert_eq!(holder(&emulator, &access.token), TARGET);
    let id = client.id_token(id_request(AUDIENCE)).await.unwrap();
    assert_eq!(claims(&id.token)["email"], TARGET);

    let seen = seen.lock().unwrap().clone();
    assert!(!seen.is_empty());
    let expected_auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("corp\\ana:p@ss")
    );
    for tunnel in &seen {
        assert_eq!(
            tunnel.line,
            format!("CONNECT {HIDDEN_HOST}:{} HTTP/1.1", front.port())
        );
        assert_eq!(tunnel.auth.as_deref(), Some(expected_auth.as_str()));
    }
    assert_eq!(emulator.stats().sts_requests, 1);
    assert_eq!(emulator.iam_calls().len(), 2);
    let logs = broker.logs();
    for secret in ["p@ss", "p%40ss", &expected_auth] {
        assert_no_piece_of(secret, &logs);
    }
}

#[tokio::test]
async fn no_proxy_bypasses_the_proxy() {
    let emulator = federating(EmulatorConfig::default()).await;
    let front = tls_front(emulator.addr()).await;
    let (proxy, seen) = connect_proxy(front, false).await;
    let dir = tempfile::tempdir().unwrap();
    let file = federation_file_at(dir.path(), &format!("https://127.0.0.1:{}", front.port()));
    let proxy_url = format!("http://127.0.0.1:{}", proxy.port());
    let broker = broker_behind(
        &emulator,
        &file,
        &[
            ("https_proxy", &proxy_url),
            ("no_proxy", "example.com,127.0.0.0/8"),
        ],
    )
    .await;
    // The proxy is configured (from the lower-case variables), and bypassed.
    broker.wait_for_log("except for NO_PROXY").await;
    let access = access_token(&broker, &[]).await;
    assert_eq!(holder(&emulator, &access), TARGET);
    assert!(seen.lock().unwrap().is_empty(), "the proxy was used");
}

#[tokio::test]
async fn a_refusing_proxy_fails_the_call_and_a_malformed_one_stops_the_broker() {
    let emulator = federating(EmulatorConfig::default()).await;
    let front = tls_front(emulator.addr()).await;
    let (proxy, seen) = connect_proxy(front, true).await;
    let dir = tempfile::tempdir().unwrap();
    let file = federation_file_at(
        dir.path(),
        &format!("https://{HIDDEN_HOST}:{}", front.port()),
    );
    let proxy_url = format!("127.0.0.1:{}", proxy.port());
    let broker = broker_behind(&emulator, &file, &[("HTTPS_PROXY", &proxy_url)]).await;
    let status = access_refused(&broker, &[]).await;
    assert_eq!(status.code(), Code::Unavailable, "{status}");
    assert!(status.message().contains("tunnel"), "{status}");
    // Every attempt was a tunnel, and none went through.
    let tunnels = seen.lock().unwrap().clone();
    assert!(!tunnels.is_empty() && tunnels.iter().all(|s| s.line.starts_with("CONNECT ")));
    assert_eq!(emulator.stats().sts_requests, 0);

    let socket = dir.path().join("s.sock");
    let mut command = crate::common::binary();
    command
        .args([
            "serve",
            "--socket",
            socket.to_str().unwrap(),
            "--credentials",
        ])
        .arg(&file)
        .env("HTTPS_PROXY", "socks5://ana:s3cret@proxy:1080");
    let output = crate::common::output(&mut command).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("HTTPS_PROXY") && stderr.contains("only http://"),
        "{stderr}"
    );
    assert!(!stderr.contains("s3cret"), "{stderr}");
    assert!(!socket.exists(), "nothing was served");
}
