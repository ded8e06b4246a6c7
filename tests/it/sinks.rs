//! File sinks against a hostile local user: a swapped directory redirects
//! no write, unsafe sink directories and modes stop the broker at start,
//! and a sink the socket's group may read is warned about.

use std::os::unix::fs::{MetadataExt, symlink};
use std::path::Path;

use crate::common::{
    self, Broker, NOBODY, as_uid, chmod, id_sink, names, serve_fails, succeeds, write_config,
};

/// A group that neither this process nor `nobody` is in.
const OTHER_GID: u32 = 12345;

fn is_root() -> bool {
    common::is_root("a broker with CAP_CHOWN and another uid")
}

/// Runs `script` with `sh` as uid and gid `NOBODY`.
async fn as_nobody(script: &str) {
    succeeds(as_uid(NOBODY, "sh").args(["-c", script])).await;
}

/// The broker runs as root and gives the sink's file to `nobody`, who owns
/// the sink directory's parent. Once the broker runs, `nobody` swaps the
/// directory for a link to a root-owned directory: the next refresh must
/// still land in the original directory, never through the link.
#[tokio::test]
async fn a_swapped_sink_directory_redirects_no_write() {
    if !is_root() {
        return;
    }
    let base = tempfile::tempdir().unwrap();
    chmod(base.path(), 0o755);
    let home = base.path().join("home");
    std::fs::create_dir(&home).unwrap();
    std::os::unix::fs::chown(&home, Some(NOBODY), Some(NOBODY)).unwrap();
    let sinks = home.join("sinks");
    std::fs::create_dir(&sinks).unwrap();
    chmod(&sinks, 0o755);
    let protected = base.path().join("protected");
    std::fs::create_dir(&protected).unwrap();
    chmod(&protected, 0o755);
    let path = sinks.join("token");
    let config = write_config(
        base.path(),
        &format!(
            "emulator = true\nemulator_token_lifetime = \"4s\"\nexpiry_skew = \"1s\"\n{}",
            id_sink(
                &path,
                "https://sink.a.run.app",
                &[&format!("owner = \"{NOBODY}\""), "mode = \"0600\""]
            )
        ),
    );
    let mut broker = Broker::spawn(vec!["--config".into(), config], &[]).await;
    let written = ["written", path.to_str().unwrap()];
    broker.wait_for_log_lines(&written, 1).await;
    let first = std::fs::read_to_string(&path).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().uid(), NOBODY);

    let moved = home.join("moved");
    as_nobody(&format!(
        "mv {sinks:?} {moved:?} && ln -s {protected:?} {sinks:?}"
    ))
    .await;
    assert!(std::fs::symlink_metadata(&sinks).unwrap().is_symlink());
    let before = broker.count_log_lines(&written);
    broker.wait_for_log_lines(&written, before + 1).await;

    assert!(
        names(&protected).is_empty(),
        "a write followed the link: {:?}",
        names(&protected)
    );
    let logs = broker.logs();
    if !logs.contains("sink not written") {
        let second = std::fs::read_to_string(moved.join("token")).unwrap();
        assert_ne!(
            first, second,
            "the refreshed token is in the original directory"
        );
        assert_eq!(
            std::fs::metadata(moved.join("token")).unwrap().uid(),
            NOBODY
        );
    }

    broker.stop().await;
    assert!(names(&protected).is_empty(), "{:?}", names(&protected));
    assert!(
        names(&moved).is_empty(),
        "removed from the original directory"
    );
}

/// Starts `serve` with one sink at `sink_path` (plus `extra` lines in its
/// table), which must fail; returns stderr.
async fn refused(dir: &Path, sink_path: &Path, extra: &[&str]) -> String {
    let config = write_config(
        dir,
        &format!(
            "emulator = true\n{}",
            id_sink(sink_path, "https://a", extra)
        ),
    );
    let stderr = serve_fails(&dir.join("s.sock"), &["--config", &config]).await;
    assert!(!sink_path.exists());
    stderr
}

#[tokio::test]
async fn unsafe_sink_directories_stop_the_broker_with_a_clear_error() {
    let base = tempfile::tempdir().unwrap();
    let shared = base.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    for mode in [0o770, 0o777, 0o1777] {
        chmod(&shared, mode);
        let stderr = refused(base.path(), &shared.join("token"), &[]).await;
        let expected = format!("directory {} has mode {mode:04o}", shared.display());
        assert!(
            stderr.contains(&expected) && stderr.contains("writable by its group or by every user"),
            "{stderr}"
        );
    }

    let private = base.path().join("private");
    std::fs::create_dir(&private).unwrap();
    let stderr = refused(base.path(), &private.join("token"), &["mode = \"0640\""]).await;
    assert!(
        stderr.contains("mode 0640 gives the file's group access, but no `group` is set")
            && stderr.contains("name the group whose members may read the token"),
        "{stderr}"
    );

    let real = base.path().join("real");
    std::fs::create_dir(&real).unwrap();
    let link = base.path().join("link");
    symlink(&real, &link).unwrap();
    let stderr = refused(base.path(), &link.join("token"), &[]).await;
    assert!(
        stderr.contains(&format!("{} is a symbolic link", link.display())),
        "{stderr}"
    );
    assert!(names(&real).is_empty());

    if !is_root() {
        return;
    }
    let theirs = base.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(NOBODY), None).unwrap();
    let stderr = refused(base.path(), &theirs.join("token"), &[]).await;
    assert!(
        stderr.contains(&format!(
            "directory {} is owned by uid {NOBODY}; it must be owned by the broker's user (uid 0) or root",
            theirs.display()
        )),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_sink_the_socket_group_may_read_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    // Root gives the files a group it is not in, so that the group shows;
    // others can only name their own.
    let root = is_root();
    let gid = if root {
        OTHER_GID
    } else {
        nix::unistd::getegid().as_raw()
    };
    let group = format!("group = \"{gid}\"");
    let shared = dir.path().join("shared.jwt");
    let private = dir.path().join("private.jwt");
    let config = write_config(
        dir.path(),
        &format!(
            "emulator = true\nsocket_group = \"{gid}\"\n{}{}",
            id_sink(&shared, "https://a", &[&group]),
            id_sink(&private, "https://a", &[&group, "mode = \"0600\""]),
        ),
    );
    let broker = Broker::spawn(vec!["--config".into(), config], &[]).await;
    let warning =
        "the sink's group is the socket's group: every client that may connect can read this token";
    broker
        .wait_for_log_lines(&[warning, shared.to_str().unwrap()], 1)
        .await;
    for path in [&shared, &private] {
        broker
            .wait_for_log_lines(&["sink written", path.to_str().unwrap()], 1)
            .await;
    }
    let logs = broker.logs();
    assert_eq!(logs.matches(warning).count(), 1, "{logs}");
    assert_eq!(common::mode_of(&shared), 0o640, "a group's default mode");
    assert_eq!(common::mode_of(&private), 0o600);
    if root {
        assert_ne!(nix::unistd::getegid().as_raw(), OTHER_GID);
        for path in [&shared, &private, &broker.socket] {
            assert_eq!(
                std::fs::metadata(path).unwrap().gid(),
                OTHER_GID,
                "{}",
                path.display()
            );
        }
    }
}
