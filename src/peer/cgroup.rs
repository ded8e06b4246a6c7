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
    /// writes it, with underscores. (A static pod's cgroup carries a hash
    /// instead, which its mirror pod's annotation repeats; any user who may
    /// create pods could forge that annotation, so static pods are not
    /// told apart: their processes are unknown peers.)
    pub fn parse(text: &str) -> Option<Self> {
        if text.len() != 36 {
            return None;
        }
        let mut value = 0u128;
        for (i, byte) in text.bytes().enumerate() {
            if matches!(i, 8 | 13 | 18 | 23) {
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

fn read_bounded(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(MAX_CGROUP_FILE)
        .read_to_string(&mut text)?;
    Ok(text)
}

/// The place a `/proc/<pid>/cgroup` text names. Every line counts (a
/// hybrid host lists several v1 hierarchies and the v2 one): a pod if
/// lines name one pod and none is unknown; unknown if any line is, if
/// lines name different pods, or if no line is well formed
/// (`id:controllers:path`); else the host.
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
        place = Some(match (place, in_path(path)) {
            (_, Place::Unknown) | (Some(Place::Unknown), _) => return Place::Unknown,
            (Some(Place::Pod(a)), Place::Pod(b)) if a != b => return Place::Unknown,
            (Some(Place::Pod(pod)), _) | (_, Place::Pod(pod)) => Place::Pod(pod),
            (None | Some(Place::Host), Place::Host) => Place::Host,
        });
    }
    place.unwrap_or(Place::Unknown)
}

/// The place one cgroup path names.
///
/// kubelet's hierarchy is `kubepods` (cgroupfs) or `kubepods.slice`
/// (systemd) at the root of the cgroup file system, and only there: a
/// host user may create a `kubepods/pod<uid>` of its own below its
/// delegated `user.slice` subtree, which must not pass for that pod. Below
/// it comes the pod's segment, `pod<uid>` (cgroupfs) or
/// `kubepods[-<qos>]-pod<uid>.slice` (systemd), either first or after a
/// QoS level (`burstable`, `besteffort`, `kubepods-<qos>.slice`). Anything
/// else in kubelet's hierarchy, and any segment elsewhere that looks like
/// kubelet's (a runtime whose cgroup driver differs from kubelet's writes
/// `/system.slice/containerd.service/kubepods-…-pod<uid>.slice:cri-containerd:<id>`),
/// is unknown rather than the host.
///
/// A broker in its own cgroup namespace (a container's, on cgroup v2)
/// reads paths relative to its own cgroup: `/../../kubepods-…-pod<uid>.slice/…`.
/// After the `..` run comes kubelet's hierarchy (from `kubepods`, a QoS
/// level or a pod's segment), the host's top level (`system.slice`,
/// `user.slice`, …), or, for the other containers of the broker's own pod,
/// a container's scope, which is unknown.
fn in_path(path: &str) -> Place {
    let segments: Vec<&str> = path.split('/').skip(1).filter(|s| !s.is_empty()).collect();
    let dots = segments.iter().take_while(|s| **s == "..").count();
    let below = if dots > 0 {
        let rest = &segments[dots..];
        match rest.first() {
            None => return Place::Unknown,
            Some(first) if is_kubepods(first) => &rest[1..],
            Some(first) if is_kubelet_level(first) || pod_segment(first).is_some() => rest,
            Some(first) if is_container(first) => return Place::Unknown,
            Some(_) => return host_unless_kubelet_like(rest),
        }
    } else {
        match segments.split_first() {
            Some((first, rest)) if is_kubepods(first) => rest,
            _ => return host_unless_kubelet_like(&segments),
        }
    };
    let pod = match below {
        [first, ..] if pod_segment(first).is_some() => pod_segment(first),
        [qos, second, ..] if is_qos_level(qos) => pod_segment(second),
        _ => None,
    };
    match pod {
        Some(Some(uid)) => Place::Pod(uid),
        _ => Place::Unknown,
    }
}

/// The host, unless a segment looks like kubelet's (then unknown).
fn host_unless_kubelet_like(segments: &[&str]) -> Place {
    let kubelet_like = segments
        .iter()
        .any(|s| s.contains("kubepods") || pod_segment(s).is_some());
    if kubelet_like {
        Place::Unknown
    } else {
        Place::Host
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
fn is_qos_level(segment: &str) -> bool {
    matches!(
        segment,
        "burstable" | "besteffort" | "kubepods-burstable.slice" | "kubepods-besteffort.slice"
    )
}

/// A level of kubelet's hierarchy.
fn is_kubelet_level(segment: &str) -> bool {
    is_kubepods(segment) || is_qos_level(segment)
}

/// A container's own cgroup: a runtime's scope, or a bare container id.
fn is_container(segment: &str) -> bool {
    ["cri-containerd-", "crio-", "docker-", "containerd-"]
        .iter()
        .any(|runtime| segment.starts_with(runtime))
        || (segment.len() == 64 && segment.bytes().all(|b| b.is_ascii_hexdigit()))
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
    fn host_processes_are_the_host() {
        for text in [
            "0::/\n",
            "0::/system.slice/tokenbroker.service\n",
            "0::/user.slice/user-1000.slice/session-3.scope\n",
            "1:name=systemd:/user.slice\n0::/init.scope\n",
            // Seen from the broker's cgroup namespace.
            "0::/../../../../system.slice/containerd.service\n",
        ] {
            assert_eq!(place_in(text), Place::Host, "{text}");
        }
    }

    #[test]
    fn lookalikes_of_kubelets_hierarchy_elsewhere_are_refused_not_served() {
        let underscored = UID.replace('-', "_");
        for text in [
            // A pod-like name outside kubelet's hierarchy.
            format!("0::/mine/pod{UID}/x\n"),
            // A kubepods hierarchy a host user made in its own delegated
            // subtree is not kubelet's: that user only refuses itself.
            format!("0::/user.slice/user-1000.slice/user@1000.service/kubepods/pod{UID}/x\n"),
            format!(
                "0::/user.slice/user-1000.slice/user@1000.service/kubepods.slice/kubepods-pod{underscored}.slice/x\n"
            ),
            format!("0::/../../user.slice/user-1000.slice/user@1000.service/kubepods/pod{UID}/x\n"),
        ] {
            assert_eq!(place_in(&text), Place::Unknown, "{text}");
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
    fn static_pods_and_misconfigured_runtimes_are_unknown() {
        let hash = "6d2a0a8f3ec1e0f1b1d25bd6a3cfcb21";
        let underscored = UID.replace('-', "_");
        for text in [
            format!("0::/kubepods/burstable/pod{hash}/c\n"),
            format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{hash}.slice/crio-1.scope\n"
            ),
            // containerd with another cgroup driver than kubelet's.
            format!(
                "0::/system.slice/containerd.service/kubepods-burstable-pod{underscored}.slice:cri-containerd:0123\n"
            ),
            // Lines naming different pods, or a pod and an unknown.
            format!(
                "4:memory:/kubepods/pod{UID}/c\n3:pids:/kubepods/pod{}/c\n",
                UID.replace('f', "e")
            ),
            format!("4:memory:/kubepods/pod{UID}/c\n0::/kubepods/burstable\n"),
            // Only the way up: the broker's own cgroup's parents.
            "0::/..\n".to_string(),
            "0::/../..\n".to_string(),
            // The other containers of the broker's own pod.
            "0::/../cri-containerd-0123.scope\n".to_string(),
            // A pod segment after something that is no QoS level.
            format!("0::/../ctr/pod{UID}\n"),
            format!("0::/kubepods/ctr/kubepods-pod{underscored}.slice\n"),
        ] {
            assert_eq!(place_in(&text), Place::Unknown, "{text}");
        }
    }

    #[test]
    fn a_broker_outside_kubelets_hierarchy_reads_relative_kubepods_paths() {
        let underscored = UID.replace('-', "_");
        for text in [
            format!(
                "0::/../../kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{underscored}.slice/crio-1.scope\n"
            ),
            format!("0::/../../kubepods/burstable/pod{UID}/c\n"),
            format!("0::/../../kubepods.slice/kubepods-pod{underscored}.slice/c.scope\n"),
        ] {
            assert_eq!(place_in(&text), pod(), "{text}");
        }
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
