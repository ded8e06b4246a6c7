//! Which pod a process runs in, from its cgroup: kubelet names every pod's
//! cgroup after the pod's UID. Both cgroup versions (a hybrid host lists
//! several v1 hierarchies and the v2 one), both kubelet cgroup drivers
//! and every QoS class are read:
//!
//! - cgroupfs: `/kubepods/besteffort/pod<uid>/<container>`, and
//!   `/kubepods/pod<uid>/<container>` for Guaranteed pods;
//! - systemd: `/kubepods.slice/kubepods-burstable.slice/
//!   kubepods-burstable-pod<uid with _>.slice/cri-containerd-<id>.scope`
//!   (also `crio-`, `docker-`), and `kubepods-pod<uid>.slice` for
//!   Guaranteed pods.

use std::fmt;
use std::path::{Path, PathBuf};

/// Where `/proc` is unless `--proc-root` says otherwise.
pub const DEFAULT_PROC_ROOT: &str = "/proc";

/// Longest `/proc/<pid>/cgroup` read (64 KiB): far more than any real one.
const MAX_CGROUP_FILE: u64 = 64 * 1024;

/// A pod's UID (a UUID), as kubelet writes it in cgroup names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodUid(u128);

impl PodUid {
    /// Parses a UUID with dashes (`0f1e…-…`) or, as the systemd driver
    /// writes it, with underscores; or 32 hex digits, the UID kubelet gives
    /// a static pod (its mirror pod carries it in the
    /// `kubernetes.io/config.mirror` annotation).
    pub fn parse(text: &str) -> Option<Self> {
        let dashed = match text.len() {
            36 => true,
            32 => false,
            _ => return None,
        };
        let mut value = 0u128;
        for (i, byte) in text.bytes().enumerate() {
            if dashed && matches!(i, 8 | 13 | 18 | 23) {
                if byte != b'-' && byte != b'_' {
                    return None;
                }
                continue;
            }
            let digit = (byte as char).to_digit(16)?;
            value = value << 4 | u128::from(digit);
        }
        Some(Self(value))
    }
}

impl fmt::Display for PodUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hex = format!("{:032x}", self.0);
        write!(
            f,
            "{}-{}-{}-{}-{}",
            &hex[..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..]
        )
    }
}

/// Where a peer process runs, as far as its cgroup tells.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Place {
    /// Not in a pod: a process of the host (also every peer while
    /// workload identity is off).
    Host,
    /// In the pod with this UID.
    Pod(PodUid),
    /// Not known: no pid (the peer is in a pid namespace the broker cannot
    /// see), a process that has exited, or a cgroup file that cannot be
    /// read. Never served as a host process.
    Unknown,
}

/// Finds the pod of a process through `<proc root>/<pid>/cgroup`.
#[derive(Clone, Debug)]
pub struct Locator {
    proc_root: PathBuf,
}

impl Locator {
    /// Reads processes under `proc_root` (`/proc`, or a copy for tests).
    pub fn new(proc_root: &Path) -> Self {
        Self {
            proc_root: proc_root.to_path_buf(),
        }
    }

    /// The place of the process `pid` (from `SO_PEERCRED`; 0 or none when
    /// the kernel could not name it in the broker's pid namespace).
    pub fn place_of(&self, pid: Option<i32>) -> Place {
        let Some(pid) = pid.filter(|pid| *pid > 0) else {
            return Place::Unknown;
        };
        let path = self.proc_root.join(pid.to_string()).join("cgroup");
        match read_bounded(&path) {
            Ok(text) => place_in(&text),
            Err(error) => {
                tracing::debug!(pid, %error, "cannot read the peer's cgroup");
                Place::Unknown
            }
        }
    }
}

/// The place of the process `pid`: read by `locator` with workload
/// identity on, else the host (as every peer is without it).
pub fn place(locator: Option<&Locator>, pid: Option<i32>) -> Place {
    locator.map_or(Place::Host, |locator| locator.place_of(pid))
}

fn read_bounded(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(MAX_CGROUP_FILE)
        .read_to_string(&mut text)?;
    Ok(text)
}

/// The place a `/proc/<pid>/cgroup` text names: the pod of a line whose
/// path is a kubelet pod cgroup; unknown if a line lies in kubelet's
/// hierarchy but names no pod (or no line is well formed: `id:controllers:path`);
/// else the host.
pub fn place_in(cgroup_file: &str) -> Place {
    let mut place = None;
    for line in cgroup_file.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(_), Some(path)) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        if !path.starts_with('/') {
            continue;
        }
        match in_path(path) {
            Place::Pod(uid) => return Place::Pod(uid),
            Place::Unknown => place = Some(Place::Unknown),
            Place::Host => {
                place.get_or_insert(Place::Host);
            }
        }
    }
    place.unwrap_or(Place::Unknown)
}

/// The place one cgroup path names.
///
/// kubelet's hierarchy is `kubepods` (cgroupfs) or `kubepods.slice`
/// (systemd) at the root of the cgroup file system, and only there: a
/// host user may create a `kubepods/pod<uid>` of its own below its
/// delegated `user.slice` subtree, which must not pass for that pod. Below
/// it, the segment after it (or after its QoS level) is `pod<uid>`
/// (cgroupfs) or `kubepods[-<qos>]-pod<uid>.slice` (systemd); anything
/// else below it is unknown.
///
/// A broker in its own cgroup namespace (a container's, on cgroup v2)
/// reads paths relative to its own cgroup: `/../../kubepods-…-pod<uid>.slice/…`,
/// where the common `kubepods` ancestor is one of the `..`. Then the
/// segments after the `..` run stand where those after `kubepods` would.
fn in_path(path: &str) -> Place {
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let below = match segments.split_first() {
        Some((&"..", _)) => {
            let after = segments
                .iter()
                .position(|s| *s != "..")
                .unwrap_or(segments.len());
            &segments[after..]
        }
        Some((first, rest)) if is_kubepods(first) => rest,
        _ => return Place::Host,
    };
    let found = below
        .iter()
        .take(2)
        .find_map(|segment| pod_segment(segment));
    match found {
        Some(Some(uid)) => Place::Pod(uid),
        // A pod segment with no UID in it, or a path in kubelet's hierarchy
        // that names no pod.
        Some(None) => Place::Unknown,
        None if !path.starts_with("/../") => Place::Unknown,
        None if below.first().is_some_and(|s| is_kubelet_level(s)) => Place::Unknown,
        None => Place::Host,
    }
}

/// `Some(uid)` for a pod's segment, `Some(None)` for one shaped like a
/// pod's without a UID, `None` for any other segment.
fn pod_segment(segment: &str) -> Option<Option<PodUid>> {
    if let Some(uid) = segment.strip_prefix("pod") {
        return Some(PodUid::parse(uid));
    }
    let slice = segment.strip_prefix("kubepods-")?.strip_suffix(".slice")?;
    let (qos, uid) = slice.rsplit_once("pod")?;
    let qos_ok = matches!(qos, "" | "burstable-" | "besteffort-");
    Some(qos_ok.then(|| PodUid::parse(uid)).flatten())
}

fn is_kubepods(segment: &str) -> bool {
    segment == "kubepods" || segment == "kubepods.slice"
}

/// A QoS level of kubelet's hierarchy, in either driver's spelling.
fn is_kubelet_level(segment: &str) -> bool {
    is_kubepods(segment)
        || matches!(segment, "burstable" | "besteffort")
        || segment.starts_with("kubepods-")
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";

    fn pod() -> Place {
        Place::Pod(PodUid::parse(UID).unwrap())
    }

    #[test]
    fn uids_parse_with_dashes_or_underscores_and_print_with_dashes() {
        let uid = PodUid::parse(UID).unwrap();
        assert_eq!(uid.to_string(), UID);
        assert_eq!(PodUid::parse(&UID.replace('-', "_")), Some(uid));
        for bad in ["", "0f1e2d3c", &UID.replace('-', "x"), &format!("{UID}0")] {
            assert_eq!(PodUid::parse(bad), None, "{bad}");
        }
        assert_eq!(PodUid::parse(&UID.replace('f', "g")), None);
    }

    #[test]
    fn cgroupfs_driver_paths_name_the_pod() {
        for qos in ["besteffort/", "burstable/", ""] {
            let text = format!("0::/kubepods/{qos}pod{UID}/0123456789abcdef\n");
            assert_eq!(place_in(&text), pod(), "{text}");
        }
    }

    #[test]
    fn systemd_driver_paths_name_the_pod() {
        let underscored = UID.replace('-', "_");
        for (qos, runtime) in [
            ("besteffort", "cri-containerd"),
            ("burstable", "crio"),
            ("burstable", "docker"),
        ] {
            let text = format!(
                "0::/kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{underscored}.slice/{runtime}-0123abcd.scope\n"
            );
            assert_eq!(place_in(&text), pod(), "{text}");
        }
        let guaranteed = format!(
            "0::/kubepods.slice/kubepods-pod{underscored}.slice/cri-containerd-0123abcd.scope\n"
        );
        assert_eq!(place_in(&guaranteed), pod());
    }

    #[test]
    fn hybrid_hosts_are_scanned_line_by_line() {
        let text = format!(
            "12:pids:/\n11:memory:/kubepods/burstable/pod{UID}/abc\n1:name=systemd:/\n0::/\n"
        );
        assert_eq!(place_in(&text), pod());
        let v1_only = format!("4:memory:/kubepods/pod{UID}/abc\n");
        assert_eq!(place_in(&v1_only), pod());
    }

    #[test]
    fn paths_relative_to_the_brokers_cgroup_namespace_name_the_pod() {
        let underscored = UID.replace('-', "_");
        let systemd = format!(
            "0::/../../kubepods-besteffort.slice/kubepods-besteffort-pod{underscored}.slice/cri-containerd-1.scope\n"
        );
        assert_eq!(place_in(&systemd), pod());
        let sibling = format!("0::/../../kubepods-pod{underscored}.slice/crio-1.scope\n");
        assert_eq!(place_in(&sibling), pod());
        let cgroupfs = format!("0::/../../burstable/pod{UID}/c\n");
        assert_eq!(place_in(&cgroupfs), pod());
        // The broker's own container (its namespace root) is no pod path.
        assert_eq!(place_in("0::/\n"), Place::Host);
    }

    #[test]
    fn host_processes_and_lookalikes_are_the_host() {
        for text in [
            "0::/\n",
            "0::/system.slice/tokenbroker.service\n",
            "0::/user.slice/user-1000.slice/session-3.scope\n",
            // A pod-like name outside kubelet's hierarchy.
            &format!("0::/mine/pod{UID}/x\n"),
            // A kubepods hierarchy a host user made in its own delegated
            // subtree is not kubelet's.
            &format!("0::/user.slice/user-1000.slice/user@1000.service/kubepods/pod{UID}/x\n"),
            &format!(
                "0::/user.slice/user-1000.slice/user@1000.service/kubepods.slice/kubepods-pod{}.slice/x\n",
                UID.replace('-', "_")
            ),
            // Seen from the broker's cgroup namespace: still the host's.
            &format!(
                "0::/../../user.slice/user-1000.slice/user@1000.service/kubepods/pod{UID}/x\n"
            ),
        ] {
            assert_eq!(place_in(text), Place::Host, "{text}");
        }
    }

    #[test]
    fn kubelets_hierarchy_without_a_pod_is_unknown() {
        for text in [
            // A bad UID below kubepods.
            "0::/kubepods/besteffort/podnot-a-uid/x\n",
            // Deeper than the pod level: a container's own sub-cgroup named
            // like a pod is not the pod.
            &format!("0::/kubepods/besteffort/x/y/pod{UID}\n"),
            &format!("0::/kubepods.slice/kubepods-other-pod{UID}.slice/x\n"),
            "0::/kubepods/burstable\n",
            "0::/../../kubepods-besteffort.slice/x\n",
            // A pod line wins over the others; an unknown one over the host.
            &format!("1:name=systemd:/\n0::/kubepods/pod{UID}x/c\n"),
        ] {
            assert_eq!(place_in(text), Place::Unknown, "{text}");
        }
    }

    #[test]
    fn static_pods_have_a_hash_for_a_uid() {
        let hash = "6d2a0a8f3ec1e0f1b1d25bd6a3cfcb21";
        let uid = PodUid::parse(hash).unwrap();
        assert_eq!(
            place_in(&format!("0::/kubepods/burstable/pod{hash}/c\n")),
            Place::Pod(uid)
        );
        assert_eq!(
            place_in(&format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{hash}.slice/crio-1.scope\n"
            )),
            Place::Pod(uid)
        );
    }

    #[test]
    fn text_that_parses_as_nothing_is_unknown() {
        for text in ["", "garbage", "\n\n", "1:2\n", "0::relative/path\n"] {
            assert_eq!(place_in(text), Place::Unknown, "{text:?}");
        }
    }

    #[test]
    fn pids_the_locator_cannot_read_are_unknown() {
        let root = tempfile::tempdir().unwrap();
        let locator = Locator::new(root.path());
        assert_eq!(locator.place_of(None), Place::Unknown);
        assert_eq!(locator.place_of(Some(0)), Place::Unknown);
        assert_eq!(locator.place_of(Some(-1)), Place::Unknown);
        assert_eq!(locator.place_of(Some(42)), Place::Unknown, "no such pid");
        std::fs::create_dir(root.path().join("42")).unwrap();
        std::fs::write(
            root.path().join("42/cgroup"),
            format!("0::/kubepods/pod{UID}/c\n"),
        )
        .unwrap();
        assert_eq!(locator.place_of(Some(42)), pod());
        let me = Locator::new(Path::new(DEFAULT_PROC_ROOT));
        assert_ne!(me.place_of(Some(std::process::id() as i32)), Place::Unknown);
    }
}
