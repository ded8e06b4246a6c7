//! systemd integration with the real binary: socket activation
//! (`LISTEN_FDS`/`LISTEN_PID`, the socket on fd 3) and `sd_notify`
//! (`READY=1` when serving, `STOPPING=1` on shutdown).

use std::ffi::OsStr;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::common;
use crate::common::{BINARY, Broker, PATIENCE};
use nix::sys::signal::Signal;
use tokio::net::UnixDatagram;
use tokio::process::Command;

/// `tokenbroker serve --socket SOCKET ARGS` socket-activated with
/// `listener` (see [`common::activation::activated`]).
pub fn activated(
    listener: &impl AsRawFd,
    listen_pid: Option<&str>,
    socket: &Path,
    dir: tempfile::TempDir,
    args: &[&str],
) -> Broker {
    let serve = [
        OsStr::new("serve"),
        OsStr::new("--socket"),
        socket.as_os_str(),
    ];
    let args = serve.into_iter().chain(args.iter().map(OsStr::new));
    let command = common::activation::activated(OsStr::new(BINARY), args, listener, listen_pid);
    Broker::spawn_command(Command::from(command), socket, dir)
}

#[tokio::test]
async fn serves_on_the_socket_systemd_passes_and_leaves_it_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let passed = dir.path().join("passed.sock");
    let unused = dir.path().join("unused.sock");
    let listener = std::os::unix::net::UnixListener::bind(&passed).unwrap();
    let mut broker = activated(&listener, None, &unused, dir, &["--emulator"]);
    drop(listener);
    broker.wait_until_ready().await;
    assert!(
        broker.logs().contains("socket activated"),
        "{}",
        broker.logs()
    );
    assert!(
        !unused.exists(),
        "--socket is not bound when a socket is passed"
    );

    let mut client = tokenbroker::client::Client::connect(&passed).await.unwrap();
    let token = client
        .id_token(common::id_request("https://activated"))
        .await
        .expect("served on the passed socket");
    assert_eq!(common::claims(&token.token)["aud"], "https://activated");

    broker.stop().await;
    assert!(passed.exists(), "the socket belongs to systemd and stays");
}

#[tokio::test]
async fn a_socket_meant_for_another_process_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let passed = dir.path().join("passed.sock");
    let own = dir.path().join("own.sock");
    let listener = std::os::unix::net::UnixListener::bind(&passed).unwrap();
    let broker = activated(&listener, Some("1"), &own, dir, &["--emulator"]);
    drop(listener);
    broker.wait_until_ready().await;
    assert!(broker.logs().contains("LISTEN_PID is not this process"));
    let mut client = broker.client().await;
    client
        .get_id_token(common::id_request("https://own"))
        .await
        .expect("served on its own --socket");
    assert!(own.exists());
}

#[tokio::test]
async fn tells_systemd_when_it_is_ready_and_when_it_stops() {
    let notify_dir = tempfile::tempdir().unwrap();
    let notify_path = notify_dir.path().join("notify.sock");
    let notifications = UnixDatagram::bind(&notify_path).unwrap();
    let mut broker = Broker::spawn(
        vec!["--emulator".into()],
        &[("NOTIFY_SOCKET", notify_path.to_str().unwrap())],
    )
    .await;
    let mut buffer = [0u8; 256];
    let received = |n: usize, buffer: &[u8]| String::from_utf8_lossy(&buffer[..n]).into_owned();
    let n = tokio::time::timeout(PATIENCE, notifications.recv(&mut buffer))
        .await
        .expect("READY=1 arrives")
        .unwrap();
    assert_eq!(received(n, &buffer), "READY=1\n");
    // Ready means serving: a call works now.
    let mut client = broker.client().await;
    client
        .get_access_token(common::access_request(&[]))
        .await
        .unwrap();

    broker.signal(Signal::SIGTERM);
    let n = tokio::time::timeout(PATIENCE, notifications.recv(&mut buffer))
        .await
        .expect("STOPPING=1 arrives")
        .unwrap();
    assert_eq!(received(n, &buffer), "STOPPING=1\n");
    assert!(broker.wait().await.success());
}

#[tokio::test]
async fn a_passed_socket_that_is_not_a_unix_stream_socket_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let own = dir.path().join("own.sock");
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut broker = activated(&tcp, None, &own, dir, &["--emulator"]);
    let status = broker.wait().await;
    assert!(!status.success());
    broker.wait_for_log("is not a Unix stream socket").await;
    assert!(!own.exists(), "nothing else was bound");
}
