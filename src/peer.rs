//! The process at the other end of a Unix socket: its uid, gid and pid
//! from `SO_PEERCRED`, and where it runs (the host, or with workload
//! identity a Kubernetes pod, read from its cgroup when it connects).

pub mod cgroup;

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Once;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{getsockopt, sockopt};
use tokio::net::UnixStream;

pub use cgroup::{Locator, Place, PodUid};

/// The identity of a connected process, from `SO_PEERCRED`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Effective user id.
    pub uid: u32,
    /// Effective (primary) group id; supplementary groups are not known.
    pub gid: u32,
    /// Process id, for logs.
    pub pid: Option<i32>,
    /// Where the process runs: the host, or (with workload identity) a
    /// pod, read from its cgroup when it connected.
    pub place: Place,
}

/// Whom a peer's places (connections, watches, long-polls, cache keys)
/// are charged to: a host process by its uid; with workload identity, a
/// process in a pod by its pod, since the containers of many pods often
/// share one uid and one pod must not use up the others' share.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Holder {
    /// A process of the host, by uid.
    Uid(u32),
    /// A process in a pod.
    Pod(PodUid),
    /// Processes whose pod cannot be told (refused anyway), together: they
    /// must not use up the places of their uid on the host.
    Unknown,
}

impl Peer {
    /// The process at the other end of `stream`, as the kernel names it;
    /// with workload identity on, placed by `locator` now (the pid is
    /// freshest at accept), else on the host, as every peer is without
    /// it. `None` if the kernel names no peer.
    pub fn of(stream: &UnixStream, locator: Option<&Locator>) -> Option<Self> {
        let credentials = stream.peer_cred().ok()?;
        let pid = credentials.pid();
        Some(Self {
            uid: credentials.uid(),
            gid: credentials.gid(),
            pid,
            place: locator.map_or(Place::Host, |locator| place_of_peer(stream, pid, locator)),
        })
    }

    /// Whom the places this peer takes are charged to: its pod, if it is
    /// in one, else its uid.
    pub fn holder(&self) -> Holder {
        match self.place {
            Place::Host => Holder::Uid(self.uid),
            Place::Pod(pod) => Holder::Pod(pod),
            Place::Unknown => Holder::Unknown,
        }
    }
}

/// The place of the process at the other end of `stream`, whose pid the
/// kernel gave as `pid`. A pid is only a number: once its process exits,
/// the number may go to a process in another pod, whose cgroup would then
/// be read. So the process itself is held (a pidfd, from `SO_PEERPIDFD`)
/// while its cgroup is read, and its place is unknown unless it is still
/// running after the read: a running process keeps its pid.
fn place_of_peer(stream: &impl AsFd, pid: Option<i32>, locator: &Locator) -> Place {
    let process = match getsockopt(stream, sockopt::PeerPidfd) {
        Ok(process) => Some(process),
        // Linux before 6.5: the pid is all there is.
        Err(Errno::ENOPROTOOPT) => {
            warn_without_pidfd();
            None
        }
        Err(error) => {
            tracing::debug!(?pid, %error, "the peer process cannot be held; it has exited");
            return Place::Unknown;
        }
    };
    let place = locator.place_of(pid);
    match process {
        Some(process) if has_exited(&process) => {
            tracing::debug!(?pid, "the peer process exited while its cgroup was read");
            Place::Unknown
        }
        _ => place,
    }
}

/// Whether the process a pidfd holds has exited (a pidfd is readable then).
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

/// Says once that this kernel cannot hold a peer process while its cgroup
/// is read.
fn warn_without_pidfd() {
    static WARNED: Once = Once::new();
    WARNED.call_once(|| {
        tracing::warn!(
            "this kernel has no SO_PEERPIDFD (Linux 6.5 or later has it): a peer's pod is read \
             by pid alone, and a peer that exits before it is accepted may leave its pid to a \
             process in another pod"
        );
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";

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

    #[tokio::test]
    async fn a_running_peer_is_placed_by_its_cgroup() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let root = proc_root_with_pod_process(std::process::id());
        let locator = Locator::new(root.path());

        let peer = Peer::of(&ours, Some(&locator)).unwrap();

        assert_eq!(peer.pid, Some(std::process::id() as i32));
        assert_eq!(peer.place, Place::Pod(PodUid::parse(UID).unwrap()));
        assert_eq!(Peer::of(&ours, None).unwrap().place, Place::Host);
    }

    /// A peer that connects and exits before it is accepted: its pid's
    /// cgroup (here, as if the pid had gone to a process in a pod) is not
    /// its own, and the peer is unknown.
    #[tokio::test]
    async fn a_peer_that_has_exited_is_unknown_whatever_its_pid_now_names() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let mut child = std::process::Command::new("python3")
            .args([
                "-c",
                "import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])",
            ])
            .arg(&path)
            .spawn()
            .unwrap();
        let pid = child.id();
        assert!(child.wait().unwrap().success());
        let (stream, _) = listener.accept().await.unwrap();
        let root = proc_root_with_pod_process(pid);
        let locator = Locator::new(root.path());

        let peer = Peer::of(&stream, Some(&locator)).unwrap();

        assert_eq!(peer.pid, Some(pid as i32));
        assert_eq!(peer.place, Place::Unknown);
        assert_eq!(peer.holder(), Holder::Unknown);
    }
}
