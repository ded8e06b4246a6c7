//! Process hardening with the real binary: the socket's lock file, and no
//! core dumps unless `--allow-core-dumps`.

use std::os::unix::fs::MetadataExt;

use nix::sys::resource::{Resource, getrlimit, setrlimit};

use crate::common::{self, BINARY, Broker, NOBODY, as_uid, serve_fails};

/// The soft and hard core file size limits in `/proc/<pid>/limits`.
fn core_limits(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find_map(|line| line.strip_prefix("Max core file size"))
        .expect("a core file size line");
    let mut values = line.split_whitespace();
    (
        values.next().unwrap().to_string(),
        values.next().unwrap().to_string(),
    )
}

#[tokio::test]
async fn core_dumps_are_off_unless_allowed() {
    // Give the broker a non-zero limit to inherit, so turning it off shows.
    let (_, hard) = getrlimit(Resource::RLIMIT_CORE).unwrap();
    let soft = hard.min(1 << 20);
    assert!(soft > 0, "the test's hard core limit is 0");
    setrlimit(Resource::RLIMIT_CORE, soft, hard).unwrap();
    let inherited = core_limits(std::process::id());
    assert_ne!(inherited.0, "0");

    let broker = Broker::emulated(&[]).await;
    assert_eq!(core_limits(broker.pid()), ("0".into(), "0".into()));
    drop(broker);

    let broker = Broker::emulated(&["--allow-core-dumps"]).await;
    assert_eq!(core_limits(broker.pid()), inherited);
    drop(broker);

    // The flag can come from the environment and the config file too.
    let broker = Broker::spawn(
        vec!["--emulator".into()],
        &[("TOKENBROKER_ALLOW_CORE_DUMPS", "true")],
    )
    .await;
    assert_eq!(core_limits(broker.pid()), inherited);
    drop(broker);
    let dir = tempfile::tempdir().unwrap();
    let config = common::write_config(dir.path(), "emulator = true\nallow_core_dumps = true\n");
    let broker = Broker::spawn(vec!["--config".into(), config], &[]).await;
    assert_eq!(core_limits(broker.pid()), inherited);
}

/// The owner of `/proc/<pid>/environ` of a broker run as `nobody`: root's
/// when the broker is not dumpable, else `nobody`'s.
async fn environ_owner_as_nobody(extra: &[&str]) -> u32 {
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::chown(dir.path(), Some(NOBODY), Some(NOBODY)).unwrap();
    let socket = dir.path().join("tokenbroker.sock");
    let mut command = as_uid(NOBODY, BINARY);
    command
        .args(["serve", "--emulator", "--socket"])
        .arg(&socket)
        .args(extra);
    let broker = Broker::spawn_command(command, &socket, dir);
    broker.wait_until_ready().await;
    let status = std::fs::read_to_string(format!("/proc/{}/status", broker.pid())).unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.contains(&NOBODY.to_string())),
        "the broker runs as nobody:\n{status}"
    );
    std::fs::metadata(format!("/proc/{}/environ", broker.pid()))
        .unwrap()
        .uid()
}

#[tokio::test]
async fn the_broker_is_not_dumpable_unless_allowed() {
    if !common::is_root("running the broker as another uid") {
        return;
    }
    assert_eq!(environ_owner_as_nobody(&[]).await, 0, "non-dumpable");
    assert_eq!(
        environ_owner_as_nobody(&["--allow-core-dumps"]).await,
        NOBODY,
        "dumpable with --allow-core-dumps"
    );
}

#[tokio::test]
async fn an_unsafe_lock_file_stops_the_broker_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("tokenbroker.sock");
    let lock = dir.path().join("tokenbroker.sock.lock");
    let target = dir.path().join("elsewhere");
    std::os::unix::fs::symlink(&target, &lock).unwrap();
    let stderr = serve_fails(&socket, &["--emulator"]).await;
    assert!(
        stderr.contains(&format!(
            "refusing lock file {}: it is a symbolic link",
            lock.display()
        )),
        "{stderr}"
    );
    assert!(!target.exists(), "the link was not followed");

    if !common::is_root("giving the lock file to another uid") {
        return;
    }
    std::fs::remove_file(&lock).unwrap();
    std::fs::write(&lock, "").unwrap();
    std::os::unix::fs::chown(&lock, Some(NOBODY), None).unwrap();
    let stderr = serve_fails(&socket, &["--emulator"]).await;
    assert!(
        stderr.contains(&format!(
            "refusing lock file {}: it is owned by uid {NOBODY}, not by the broker's user (uid 0)",
            lock.display()
        )),
        "{stderr}"
    );
}
