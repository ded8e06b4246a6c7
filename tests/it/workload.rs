//! Per-pod identity (`serve --workload-identity kubernetes`), end to end:
//! real client processes (the `tokenbroker token` CLI, curl on the
//! metadata socket) run inside cgroups named as kubelet names them, pods
//! and service accounts come from the emulator's fake Kubernetes API, and
//! the emulator's tokeninfo tells whose token each process got.
//!
//! Creating cgroups needs root: without it those tests say so and stop.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tokenbroker::emulator::kubernetes::FakePod;
use tokenbroker::emulator::{DEFAULT_ACCOUNT, Emulator, EmulatorConfig};
use tokio::process::Command;

use crate::common::http::{Scrape, get_local, scrape_until};
use crate::common::{
    BINARY, Broker, Printing, emulator, fails, is_root, output, scrub_env, succeeds, write_policy,
};

/// The node the broker serves.
const NODE: &str = "node-a";
const CART: &str = "cart@shop-project.iam.gserviceaccount.com";
const REPORT: &str = "report@shop-project.iam.gserviceaccount.com";
const ANNOTATION: &str = "iam.gke.io/gcp-service-account";

/// How kubelet names a pod's cgroup.
#[derive(Clone, Copy, Debug)]
enum Driver {
    /// `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice/cri-containerd-<id>.scope`
    Systemd(&'static str),
    /// `kubepods/<qos>/pod<uid>/<id>`
    Cgroupfs(&'static str),
}

/// A writable cgroup hierarchy: the v2 one if mounted, else the first v1
/// one (`pids`, `cpu`, ...).
fn hierarchy() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    let mut v1 = None;
    for line in mounts.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.get(2) {
            Some(&"cgroup2") => return Some(PathBuf::from(fields[1])),
            // Not cpuset: a cgroup there takes no process until it is
            // given CPUs and memory nodes.
            Some(&"cgroup")
                if (v1.is_none() || fields[3].contains("pids"))
                    && !fields[3].contains("name=")
                    && !fields[3].contains("cpuset") =>
            {
                v1 = Some(PathBuf::from(fields[1]));
            }
            _ => {}
        }
    }
    v1
}

/// A pod's cgroup on this machine, removed when dropped; the pod's
/// processes join it before they exec.
struct PodCgroup {
    uid: String,
    leaf: PathBuf,
    created: Vec<PathBuf>,
}

impl PodCgroup {
    /// Creates the cgroup of a new pod (a fresh UID) under `root`.
    fn create(root: &Path, driver: Driver) -> PodCgroup {
        let uid = format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            fastrand::u32(..),
            fastrand::u16(..),
            fastrand::u16(..0x1000),
            fastrand::u16(..0x1000),
            fastrand::u64(..1 << 48)
        );
        let container = format!("{:016x}", fastrand::u64(..));
        let segments: Vec<String> = match driver {
            Driver::Systemd(qos) => {
                let underscored = uid.replace('-', "_");
                let mut segments = vec!["kubepods.slice".to_string()];
                if qos.is_empty() {
                    segments.push(format!("kubepods-pod{underscored}.slice"));
                } else {
                    segments.push(format!("kubepods-{qos}.slice"));
                    segments.push(format!("kubepods-{qos}-pod{underscored}.slice"));
                }
                segments.push(format!("cri-containerd-{container}.scope"));
                segments
            }
            Driver::Cgroupfs(qos) => {
                let mut segments = vec!["kubepods".to_string()];
                if !qos.is_empty() {
                    segments.push(qos.to_string());
                }
                segments.push(format!("pod{uid}"));
                segments.push(container);
                segments
            }
        };
        // kubelet's own levels (kubepods, the QoS classes) are shared by
        // the tests running at once: made if missing, never removed. The
        // pod's own cgroups are this test's.
        let mut dir = root.to_path_buf();
        let mut created = Vec::new();
        let pod_level = segments.len() - 2;
        for (level, segment) in segments.into_iter().enumerate() {
            dir.push(segment);
            match std::fs::create_dir(&dir) {
                Ok(()) if level >= pod_level => created.push(dir.clone()),
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => panic!("cannot create cgroup {}: {e}", dir.display()),
            }
        }
        PodCgroup {
            uid,
            leaf: dir,
            created,
        }
    }

    /// `program` run inside the pod: a shell joins the cgroup, then execs.
    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(r#"echo $$ > "$0/cgroup.procs" && exec "$@""#)
            .arg(&self.leaf)
            .arg(program);
        scrub_env(&mut command);
        command
    }

    /// The pod as the fake API lists it.
    fn pod(&self, namespace: &str, name: &str, service_account: &str) -> FakePod {
        FakePod {
            namespace: namespace.into(),
            name: name.into(),
            uid: Some(self.uid.clone()),
            node: NODE.into(),
            service_account: service_account.into(),
        }
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        // Leaf first.
        for dir in self.created.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Root and a cgroup hierarchy, or a message saying why the test stops.
fn cgroups(needed_for: &str) -> Option<PathBuf> {
    if !is_root(needed_for) {
        return None;
    }
    let Some(root) = hierarchy() else {
        eprintln!("no cgroup hierarchy mounted: {needed_for} is left out");
        return None;
    };
    let probe = root.join(format!("tokenbroker-probe-{:08x}", fastrand::u32(..)));
    if let Err(error) = std::fs::create_dir(&probe) {
        eprintln!(
            "cannot create cgroups in {}: {error}; {needed_for} is left out",
            root.display()
        );
        return None;
    }
    let _ = std::fs::remove_dir(&probe);
    Some(root)
}

fn annotated(account: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(ANNOTATION.to_string(), account.to_string())])
}

/// A broker with workload identity, and its metadata socket.
struct PodBroker {
    broker: Broker,
    metadata: PathBuf,
    _dir: tempfile::TempDir,
}

impl std::ops::Deref for PodBroker {
    type Target = Broker;

    fn deref(&self) -> &Broker {
        &self.broker
    }
}

/// A broker with workload identity on `emulator`'s fake API, for `NODE`,
/// a metadata endpoint on a Unix socket and a metrics port; serving (the
/// pods read) before it returns.
async fn broker(emulator: &Emulator, extra: &[&str]) -> PodBroker {
    let broker = start(emulator, extra).await;
    broker.wait_until_serving().await;
    broker
}

/// [`broker`] without waiting for it to serve.
async fn start(emulator: &Emulator, extra: &[&str]) -> PodBroker {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, emulator.kubeconfig()).unwrap();
    let iam = emulator.iam_endpoint();
    let socket = dir.path().join("metadata.sock");
    let metadata = format!("unix:{}", socket.display());
    let mut args = vec![
        "--workload-identity",
        "kubernetes",
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "--node-name",
        NODE,
        "--iam-endpoint",
        &iam,
        "--metadata-addr",
        &metadata,
        "--metrics-addr",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    PodBroker {
        broker: Broker::start(emulator, &args).await,
        metadata: socket,
        _dir: dir,
    }
}

/// The binary under test, run in `pod`, or on the host.
fn cli(pod: Option<&PodCgroup>) -> Command {
    match pod {
        Some(pod) => pod.command(BINARY),
        None => crate::common::binary(),
    }
}

/// `tokenbroker token access` in `pod` (or on the host), with `args`.
fn access_token(broker: &Broker, pod: Option<&PodCgroup>, args: &[&str]) -> Command {
    let mut command = cli(pod);
    command
        .args(["token", "access", "--socket"])
        .arg(&broker.socket)
        .args(args);
    command
}

/// The token [`access_token`] printed; a panic with its stderr if it
/// failed.
async fn served(broker: &Broker, pod: Option<&PodCgroup>, args: &[&str]) -> String {
    let printed = succeeds(&mut access_token(broker, pod, args)).await;
    printed.trim().to_string()
}

/// What a refused [`access_token`] said on stderr; a panic if it was not
/// refused.
async fn refused(broker: &Broker, pod: Option<&PodCgroup>, args: &[&str]) -> String {
    fails(&mut access_token(broker, pod, args)).await
}

/// Whose token `token` is, by the emulator's tokeninfo.
fn owner_of(emulator: &Emulator, token: &str) -> String {
    emulator
        .token_info(token)
        .unwrap_or_else(|| panic!("the emulator did not issue that token"))
        .email
}

/// `curl` in `pod` against the broker's metadata socket: status and body.
async fn metadata(broker: &PodBroker, pod: &PodCgroup, path: &str) -> (u16, String) {
    let mut command = pod.command("curl");
    command
        .args([
            "-sS",
            "-w",
            "\n%{http_code}",
            "-H",
            "Metadata-Flavor: Google",
            "--unix-socket",
        ])
        .arg(&broker.metadata)
        .arg(format!(
            "http://metadata.google.internal/computeMetadata/v1/{path}"
        ));
    let output = output(&mut command).await;
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    let (body, status) = text.rsplit_once('\n').expect("curl printed a status");
    (status.parse().unwrap(), body.to_string())
}

/// An emulator whose fake cluster has service account shop/cart bound to
/// `CART`, which (like `REPORT`) the broker may impersonate.
async fn shop() -> Emulator {
    let emulator = emulator(EmulatorConfig::default()).await;
    for account in [CART, REPORT] {
        emulator.allow_impersonation(account);
    }
    emulator.put_service_account("shop", "cart", annotated(CART));
    emulator
}

/// A new pod of service account shop/cart, named `name`, in a cgroup of
/// `driver`'s naming.
fn cart_pod(emulator: &Emulator, root: &Path, driver: Driver, name: &str) -> PodCgroup {
    let pod = PodCgroup::create(root, driver);
    emulator.add_pod(pod.pod("shop", name, "cart"));
    pod
}

/// `tokenbroker token access FLAG` (`--watch` or `--watch-once`) in `pod`
/// (or on the host), printing its tokens; its stderr is kept.
fn watching(broker: &PodBroker, pod: Option<&PodCgroup>, flag: &str) -> Printing {
    Printing::spawn(
        cli(pod)
            .args(["token", "access", flag, "--socket"])
            .arg(&broker.socket)
            .stderr(std::process::Stdio::piped()),
    )
}

/// What `watch` printed on stderr, once it has ended.
async fn stderr_of(watch: &mut Printing) -> String {
    let mut stderr = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut watch.child.stderr.take().unwrap(), &mut stderr)
        .await
        .unwrap();
    stderr
}

#[tokio::test]
async fn pods_get_their_own_accounts_through_grpc_and_the_metadata_socket() {
    let Some(root) = cgroups("the per-pod identity test") else {
        return;
    };
    // cart's account by its annotation; report's by the policy's
    // [[workload]] table, which wins over its annotation.
    let emulator = shop().await;
    emulator.put_service_account("batch", "report", annotated(CART));
    let cart = cart_pod(&emulator, &root, Driver::Systemd("burstable"), "cart-1");
    let report = PodCgroup::create(&root, Driver::Cgroupfs("besteffort"));
    emulator.add_pod(report.pod("batch", "report-1", "report"));
    // A pod of another node is not this broker's.
    emulator.add_pod(FakePod {
        node: "node-b".into(),
        ..PodCgroup::create(&root, Driver::Systemd("")).pod("shop", "cart-2", "cart")
    });
    let dir = tempfile::tempdir().unwrap();
    // Host processes get the node's account; each namespace, or service
    // account, the Google accounts the operator allows it: an admin of
    // `shop` who annotates a service account with report's account gets
    // nothing.
    let policy = write_policy(
        dir.path(),
        &format!(
            "[[allow]]\nservice_accounts = [\"default\"]\nscopes = [\"*\"]\n\n\
             [[allow]]\nnamespaces = [\"shop\"]\nservice_accounts = [\"{CART}\"]\nscopes = [\"*\"]\n\n\
             [[allow]]\nkubernetes_service_accounts = [\"batch/report\"]\nservice_accounts = [\"{REPORT}\"]\nscopes = [\"*\"]\n\n\
             [[workload]]\nnamespace = \"batch\"\nservice_account = \"report\"\ngoogle_service_account = \"{REPORT}\"\n"
        ),
    );
    emulator.put_service_account("shop", "sneaky", annotated(REPORT));
    let sneaky = PodCgroup::create(&root, Driver::Cgroupfs(""));
    emulator.add_pod(sneaky.pod("shop", "sneaky-1", "sneaky"));
    let broker = broker(
        &emulator,
        &["--policy", &policy, "--metadata-passthrough", "all"],
    )
    .await;

    // gRPC, through the CLI.
    let token = served(&broker, Some(&cart), &[]).await;
    assert_eq!(owner_of(&emulator, &token), CART);
    let by_email = served(&broker, Some(&cart), &["--service-account", CART]).await;
    assert_eq!(by_email, token, "default and the email are one key");
    let token = served(&broker, Some(&report), &[]).await;
    assert_eq!(owner_of(&emulator, &token), REPORT);
    // A host process is served as before: the node's own account.
    let token = served(&broker, None, &[]).await;
    assert_eq!(owner_of(&emulator, &token), DEFAULT_ACCOUNT);
    // The policy decides which Google accounts a namespace may be served as.
    let said = refused(&broker, Some(&sneaky), &[]).await;
    assert!(
        said.contains("denied by policy") && said.contains("pod shop/sneaky-1"),
        "{said}"
    );

    // No request field gets a pod another account.
    for other in [REPORT, DEFAULT_ACCOUNT] {
        let said = refused(&broker, Some(&cart), &["--service-account", other]).await;
        assert!(
            said.contains("PERMISSION_DENIED") || said.contains("ermission"),
            "{said}"
        );
        assert!(
            said.contains(&format!("gets tokens of {CART} only")),
            "{said}"
        );
    }

    // The metadata socket: the pod's own account, as default and by email.
    let (status, body) =
        metadata(&broker, &report, "instance/service-accounts/default/token").await;
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    let token = json["access_token"].as_str().unwrap();
    assert_eq!(owner_of(&emulator, token), REPORT);
    let (status, email) =
        metadata(&broker, &report, "instance/service-accounts/default/email").await;
    assert_eq!((status, email.as_str()), (200, REPORT));
    let (_, listing) = metadata(&broker, &cart, "instance/service-accounts/").await;
    assert_eq!(listing, format!("default/\n{CART}/\n"));
    let (status, _) = metadata(
        &broker,
        &cart,
        &format!("instance/service-accounts/{DEFAULT_ACCOUNT}/email"),
    )
    .await;
    assert_eq!(status, 404, "the node's account is not shown to a pod");
    // Not in another spelling either, whatever the pass-through shows.
    let (_, listing) = metadata(&broker, &cart, "instance/service-accounts").await;
    assert_eq!(listing, format!("default/\n{CART}/\n"));
    for path in ["instance/?recursive=true", "?recursive=true"] {
        let (status, body) = metadata(&broker, &cart, path).await;
        assert_eq!(status, 404, "{path}: {body}");
    }

    // The gauge counts this node's pods only; no pod label anywhere.
    let addr = broker.metrics_addr().await;
    let scrape = scrape_until(addr, |s| s.value("tokenbroker_workload_pods", &[]) == 3.0).await;
    assert!(!scrape.0.contains("cart-1") && !scrape.0.contains(&cart.uid));
}

#[tokio::test]
async fn twenty_pods_of_one_account_cause_one_iam_call() {
    let Some(root) = cgroups("the shared-account test") else {
        return;
    };
    let emulator = shop().await;
    let pods: Vec<PodCgroup> = (0..20)
        .map(|i| {
            let driver = if i % 2 == 0 {
                Driver::Systemd("besteffort")
            } else {
                Driver::Cgroupfs("")
            };
            cart_pod(&emulator, &root, driver, &format!("cart-{i}"))
        })
        .collect();
    let broker = broker(&emulator, &[]).await;
    let calls = pods.iter().map(|pod| served(&broker, Some(pod), &[]));
    let tokens: Vec<String> = futures_util::future::join_all(calls).await;
    assert!(tokens.iter().all(|t| *t == tokens[0]), "one shared token");
    assert_eq!(owner_of(&emulator, &tokens[0]), CART);
    let minted: Vec<_> = emulator
        .iam_calls()
        .into_iter()
        .filter(|call| call.target == CART)
        .collect();
    assert_eq!(minted.len(), 1, "{minted:?}");
}

#[tokio::test]
async fn an_unmapped_pod_is_refused_or_served_as_the_node() {
    let Some(root) = cgroups("the unmapped-pod test") else {
        return;
    };
    let emulator = emulator(EmulatorConfig::default()).await;
    emulator.put_service_account("shop", "legacy", BTreeMap::new());
    let pod = PodCgroup::create(&root, Driver::Systemd("burstable"));
    emulator.add_pod(pod.pod("shop", "legacy-1", "legacy"));

    let refusing = broker(&emulator, &[]).await;
    let said = refused(&refusing, Some(&pod), &[]).await;
    for needle in [
        "pod shop/legacy-1",
        "Kubernetes service account shop/legacy",
        "kubectl annotate serviceaccount -n shop legacy iam.gke.io/gcp-service-account=",
    ] {
        assert!(said.contains(needle), "{needle:?} in {said}");
    }
    refusing.wait_for_log("pod shop/legacy-1").await;

    let as_node = broker(&emulator, &["--unmapped-pods", "node"]).await;
    let token = served(&as_node, Some(&pod), &[]).await;
    assert_eq!(owner_of(&emulator, &token), DEFAULT_ACCOUNT);
}

#[tokio::test]
async fn deleting_a_pod_ends_its_watch() {
    let Some(root) = cgroups("the pod-deletion test") else {
        return;
    };
    let emulator = shop().await;
    let pod = cart_pod(&emulator, &root, Driver::Cgroupfs("burstable"), "cart-1");
    let broker = broker(&emulator, &[]).await;

    let mut watcher = watching(&broker, Some(&pod), "--watch");
    let first = watcher.next_line().await;
    assert_eq!(owner_of(&emulator, &first), CART);

    assert!(emulator.delete_pod("shop", "cart-1"));
    let status = watcher.wait().await;
    assert!(!status.success());
    let stderr = stderr_of(&mut watcher).await;
    assert!(stderr.contains("no longer on node node-a"), "{stderr}");
    // And the deleted pod is not served again.
    refused(&broker, Some(&pod), &[]).await;
}

#[tokio::test]
async fn an_api_server_outage_keeps_known_pods_served_and_refuses_unknown_ones() {
    let Some(root) = cgroups("the API-outage test") else {
        return;
    };
    let emulator = shop().await;
    let known = cart_pod(&emulator, &root, Driver::Systemd("besteffort"), "cart-1");
    let broker = broker(&emulator, &[]).await;

    emulator.set_kubernetes_outage(true);
    // Another key, so that it is fetched now, during the outage.
    let scope = "https://www.googleapis.com/auth/devstorage.read_only";
    let token = served(&broker, Some(&known), &["--scope", scope]).await;
    assert_eq!(owner_of(&emulator, &token), CART);
    let token = served(&broker, None, &[]).await;
    assert_eq!(owner_of(&emulator, &token), DEFAULT_ACCOUNT);

    // A pod the broker never saw: one direct list, which fails.
    let unknown = PodCgroup::create(&root, Driver::Cgroupfs("besteffort"));
    emulator.add_pod(unknown.pod("shop", "cart-2", "cart"));
    let said = refused(&broker, Some(&unknown), &[]).await;
    assert!(said.contains("could not be asked"), "{said}");

    // Back up: the watch resumes and the new pod is served.
    emulator.set_kubernetes_outage(false);
    let token = served(&broker, Some(&unknown), &[]).await;
    assert_eq!(owner_of(&emulator, &token), CART);
}

#[tokio::test]
async fn an_api_server_down_at_start_keeps_pods_waiting_and_host_processes_served() {
    let Some(root) = cgroups("the API-down-at-start test") else {
        return;
    };
    let emulator = shop().await;
    let pod = cart_pod(&emulator, &root, Driver::Systemd("burstable"), "cart-1");
    emulator.set_kubernetes_outage(true);
    let broker = start(&emulator, &[]).await;
    let addr = broker.metrics_addr().await;

    let token = served(&broker, None, &[]).await;
    assert_eq!(owner_of(&emulator, &token), DEFAULT_ACCOUNT);
    let said = refused(&broker, Some(&pod), &[]).await;
    assert!(said.contains("has not read this node's pods"), "{said}");
    assert_eq!(get_local(addr, "/readyz").await.status, 503);

    emulator.set_kubernetes_outage(false);
    broker.wait_until_serving().await;
    assert_eq!(get_local(addr, "/readyz").await.status, 200);
    let token = served(&broker, Some(&pod), &[]).await;
    assert_eq!(owner_of(&emulator, &token), CART);
}

#[tokio::test]
async fn each_pod_has_its_own_share_of_watches() {
    let Some(root) = cgroups("the per-pod bounds test") else {
        return;
    };
    let emulator = shop().await;
    let first = cart_pod(&emulator, &root, Driver::Systemd("besteffort"), "cart-1");
    let second = cart_pod(&emulator, &root, Driver::Systemd("besteffort"), "cart-2");
    let broker = broker(&emulator, &["--max-watchers-per-uid", "1"]).await;

    // Both pods run as root here, as the test does: one pod's watch does
    // not use up the other's, nor the host's.
    let mut held = Vec::new();
    for pod in [Some(&first), Some(&second), None] {
        let mut watch = watching(&broker, pod, "--watch-once");
        // A token for each (a refused watch prints none and ends).
        watch.next_line().await;
        held.push(watch);
    }
    let mut over = watching(&broker, Some(&first), "--watch-once");
    let status = over.wait().await;
    assert!(!status.success());
    let stderr = stderr_of(&mut over).await;
    assert!(
        stderr.contains("too many open watch streams for this pod"),
        "{stderr}"
    );
    // Ended before the pods' cgroups are removed.
    for mut watch in held {
        watch.child.kill().await.unwrap();
    }
}

#[tokio::test]
async fn a_peer_whose_pod_cannot_be_told_is_refused() {
    // No root needed: a proc root with no processes in it makes every
    // peer's cgroup unreadable.
    let emulator = emulator(EmulatorConfig::default()).await;
    let empty = tempfile::tempdir().unwrap();
    let broker = broker(&emulator, &["--proc-root", empty.path().to_str().unwrap()]).await;
    let said = refused(&broker, None, &[]).await;
    assert!(said.contains("cannot tell which pod"), "{said}");
    let scrape = Scrape::of(broker.metrics_addr().await).await;
    assert_eq!(scrape.value("tokenbroker_workload_pods", &[]), 0.0);
}

#[tokio::test]
async fn a_pod_mapped_elsewhere_is_watched_again_under_its_new_account() {
    let Some(root) = cgroups("the remapping test") else {
        return;
    };
    let emulator = shop().await;
    let pod = cart_pod(&emulator, &root, Driver::Systemd("besteffort"), "cart-1");
    let dir = tempfile::tempdir().unwrap();
    let allow =
        "[[allow]]\nnamespaces = [\"shop\"]\nservice_accounts = [\"*\"]\nscopes = [\"*\"]\n";
    let policy = write_policy(dir.path(), allow);
    let audit = dir.path().join("audit.log");
    let audit_flag = audit.to_str().unwrap();
    let broker = broker(&emulator, &["--policy", &policy, "--audit-log", audit_flag]).await;

    // `--watch` subscribes again when a stream ends with UNAVAILABLE, as
    // it does when the pod's account changes.
    let mut watcher = watching(&broker, Some(&pod), "--watch");
    let mut next = async || owner_of(&emulator, &watcher.next_line().await);
    assert_eq!(next().await, CART);

    // The annotation changes: the stream ends, and the new one is report's.
    emulator.put_service_account("shop", "cart", annotated(REPORT));
    assert_eq!(next().await, REPORT);
    // The stream's end is audited as a decision, naming the pod.
    let end = &crate::common::audit::wait_for_line(&audit, |event| {
        event["event"] == "deny" && event["rpc"] == "WatchToken"
    })
    .await;
    assert_eq!(end["code"], "UNAVAILABLE", "{end}");
    assert_eq!(end["peer"]["pod_uid"], pod.uid.as_str(), "{end}");

    // A [[workload]] entry, read on SIGHUP, wins over the annotation.
    let bound = format!(
        "{allow}\n[[workload]]\nnamespace = \"shop\"\nservice_account = \"cart\"\ngoogle_service_account = \"{CART}\"\n"
    );
    write_policy(dir.path(), &bound);
    broker.signal(nix::sys::signal::Signal::SIGHUP);
    assert_eq!(next().await, CART);
    // Ended before the pod's cgroup is removed.
    watcher.child.kill().await.unwrap();
}
