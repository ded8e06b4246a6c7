//! The process at the other end of a Unix socket: its uid, gid and pid
//! from `SO_PEERCRED`, and where it runs (the host, or with workload
//! identity a Kubernetes pod, read from its cgroup when it connects:
//! `connections::credentials` reads both at accept).

pub mod cgroup;

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
