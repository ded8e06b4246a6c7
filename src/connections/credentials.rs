//! The peer of an accepted Unix connection, as the kernel names it:
//! `SO_PEERCRED`'s uid, gid and pid and, with workload identity, its place
//! (host or pod) from its cgroup, taken by a pidfd (`SO_PEERPIDFD`) so
//! that a pid reused by another pod's process is not read for it.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::{LazyLock, Once};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{getsockopt, sockopt};
use tokio::net::UnixStream;

use crate::peer::{Locator, Peer, Place};
use crate::telemetry::RateLimitedLog;

/// The process at the other end of `stream`, as the kernel names it;
/// with workload identity on, placed by `locator` now (the pid is
/// freshest at accept), else on the host, as every peer is without
/// it. `None` if the kernel names no peer.
pub fn peer_of(stream: &UnixStream, locator: Option<&Locator>) -> Option<Peer> {
    let credentials = stream.peer_cred().ok()?;
    let pid = credentials.pid();
    Some(Peer {
        uid: credentials.uid(),
        gid: credentials.gid(),
        pid,
        place: locator.map_or(Place::Host, |locator| place_of_peer(stream, pid, locator)),
    })
}

/// The place of the process at the other end of `stream`, whose pid the
/// kernel gave as `pid`. A pid is only a number: once its process has
/// exited and been reaped, the number may go to a process in another pod,
/// whose cgroup would then be read. So the peer is taken by a pidfd
/// (`SO_PEERPIDFD`: the very process that connected), its cgroup read by
/// pid, and its place is unknown if the pidfd then shows it has exited: a
/// process keeps its pid until it has exited and been reaped.
fn place_of_peer(stream: &impl AsFd, pid: Option<i32>, locator: &Locator) -> Place {
    let process = match getsockopt(stream, sockopt::PeerPidfd) {
        Ok(process) => Some(process),
        // Linux before 6.5: the pid is all there is.
        Err(Errno::ENOPROTOOPT) => {
            warn_without_pidfd();
            None
        }
        // Linux 6.5 to 6.16 for a peer already reaped.
        Err(Errno::EINVAL | Errno::ESRCH) => {
            tracing::debug!(?pid, "the peer process has exited; its pod is unknown");
            return Place::Unknown;
        }
        Err(error) => {
            CANNOT_TAKE_PIDFD.warn(|failures| {
                tracing::warn!(?pid, %error, failures, "cannot take a pidfd of a peer process; its pod is unknown and it is refused (logged at most once a second)");
            });
            return Place::Unknown;
        }
    };
    let place = locator.place_of(pid);
    match process {
        Some(process) if has_exited(&process) => {
            tracing::debug!(?pid, "the peer process has exited; its pod is unknown");
            Place::Unknown
        }
        _ => place,
    }
}

/// Failures to take a peer's pidfd other than its having exited (out of
/// file descriptors, a seccomp or LSM policy): each refuses a peer.
static CANNOT_TAKE_PIDFD: LazyLock<RateLimitedLog> = LazyLock::new(RateLimitedLog::default);

/// Whether the process a pidfd names has exited (even if it is not yet
/// reaped: a pidfd is readable from then on).
fn has_exited(process: &OwnedFd) -> bool {
    let mut polled = [PollFd::new(process.as_fd(), PollFlags::POLLIN)];
    match nix::poll::poll(&mut polled, PollTimeout::ZERO) {
        Ok(0) => false,
        Ok(_) => true,
        Err(error) => {
            tracing::debug!(%error, "cannot poll the peer process; taken as exited");
            true
        }
    }
}

/// Says once that this kernel cannot tell a peer that has exited from
/// the process that may have its pid now.
fn warn_without_pidfd() {
    static WARNED: Once = Once::new();
    WARNED.call_once(|| {
        tracing::warn!(
            "this kernel has no SO_PEERPIDFD (Linux 6.5 or later has it): a peer's pod is read \
             by pid alone, and a peer that exits before its cgroup is read may leave its pid to \
             a process in another pod"
        );
    });
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::process::{Child, Command, Stdio};
    use std::time::Duration;

    use super::*;
    use crate::peer::{Holder, PodUid};

    const UID: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";

    /// Set for a child process of the test binary: the socket it connects
    /// to, as a peer of the test.
    const CONNECT_TO: &str = "TOKENBROKER_PEER_TEST_CONNECT_TO";

    /// A proc root where process `pid` runs in the pod `UID`.
    fn proc_root_with_pod_process(pid: u32) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join(pid.to_string());
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(
            dir.join("cgroup"),
            format!("0::/kubepods/besteffort/pod{UID}/app\n"),
        )
        .unwrap();
        root
    }

    /// A peer of a socket of the test's own: this test binary again,
    /// running `test` as a child, which connects and exits when its
    /// standard input closes.
    struct PeerProcess {
        child: Child,
        listener: tokio::net::UnixListener,
        _dir: tempfile::TempDir,
    }

    impl PeerProcess {
        fn start(test: &str) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let socket = dir.path().join("s");
            let listener = tokio::net::UnixListener::bind(&socket).unwrap();
            let child = Command::new(std::env::current_exe().unwrap())
                .args(["--exact", test])
                .env(CONNECT_TO, &socket)
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .spawn()
                .unwrap();
            Self {
                child,
                listener,
                _dir: dir,
            }
        }

        /// Its connection.
        async fn accept(&self) -> UnixStream {
            let accepted = tokio::time::timeout(Duration::from_secs(30), self.listener.accept());
            accepted
                .await
                .expect("the peer process never connected")
                .unwrap()
                .0
        }

        /// Lets it exit, and waits until it has.
        fn exit(&mut self) {
            drop(self.child.stdin.take());
            assert!(self.child.wait().unwrap().success());
        }
    }

    /// In the child [`PeerProcess`] starts: connects, waits for standard
    /// input to close, and says so (the test then ends). In the test
    /// itself: says nothing.
    fn was_the_peer_process() -> bool {
        let Some(socket) = std::env::var_os(CONNECT_TO) else {
            return false;
        };
        let _connected = std::os::unix::net::UnixStream::connect(socket).unwrap();
        std::io::stdin().read_to_end(&mut Vec::new()).unwrap();
        true
    }

    /// Whether this kernel has `SO_PEERPIDFD` (Linux 6.5 or later); the
    /// tests of what it adds say so and pass without it.
    fn kernel_has_peer_pidfd() -> bool {
        let (ours, _theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let has = !matches!(
            getsockopt(&ours, sockopt::PeerPidfd),
            Err(Errno::ENOPROTOOPT)
        );
        if !has {
            eprintln!("skipped: this kernel has no SO_PEERPIDFD (Linux 6.5 or later)");
        }
        has
    }

    #[tokio::test]
    async fn a_running_peer_is_placed_by_its_cgroup() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let root = proc_root_with_pod_process(std::process::id());
        let locator = Locator::new(root.path());

        let peer = peer_of(&ours, Some(&locator)).unwrap();

        assert_eq!(peer.pid, Some(std::process::id() as i32));
        assert_eq!(peer.place, Place::Pod(PodUid::parse(UID).unwrap()));
        assert_eq!(peer_of(&ours, None).unwrap().place, Place::Host);
    }

    /// A peer that connects and exits before it is accepted: its pid's
    /// cgroup (here, as if the pid had gone to a process in a pod) is not
    /// its own, and the peer is unknown.
    #[tokio::test]
    async fn a_peer_that_has_exited_is_unknown_whatever_its_pid_now_names() {
        if was_the_peer_process() || !kernel_has_peer_pidfd() {
            return;
        }
        let mut peer_process = PeerProcess::start(
            "connections::credentials::tests::a_peer_that_has_exited_is_unknown_whatever_its_pid_now_names",
        );
        peer_process.exit();
        let stream = peer_process.accept().await;
        let pid = peer_process.child.id();
        let root = proc_root_with_pod_process(pid);
        let locator = Locator::new(root.path());

        let peer = peer_of(&stream, Some(&locator)).unwrap();

        assert_eq!(peer.pid, Some(pid as i32));
        assert_eq!(peer.place, Place::Unknown);
        assert_eq!(peer.holder(), Holder::Unknown);
    }

    #[tokio::test]
    async fn a_peers_pidfd_tells_whether_it_has_exited() {
        if was_the_peer_process() || !kernel_has_peer_pidfd() {
            return;
        }
        let mut peer_process = PeerProcess::start(
            "connections::credentials::tests::a_peers_pidfd_tells_whether_it_has_exited",
        );
        let stream = peer_process.accept().await;
        let process = getsockopt(&stream, sockopt::PeerPidfd).unwrap();

        assert!(!has_exited(&process), "the peer is running");
        peer_process.exit();
        assert!(has_exited(&process), "the peer has exited");
    }
}
