//! Per-pod identity on a Kubernetes node (`--workload-identity
//! kubernetes`): which pod a peer runs in (`peer::cgroup`), the pods of this
//! node and the Kubernetes service accounts they run as, kept current
//! from the API server ([`follow`]), and which Google service account each
//! maps to (the `iam.gke.io/gcp-service-account` annotation; the policy
//! file's `[[workload]]` table is the broker core's, and wins).
//!
//! A pod that is not (yet) in the map costs one direct list of the node's
//! pods before a decision; a pod that is gone is never served.

mod follow;

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod as PodObject;
use kube::api::{Api, ListParams};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::BrokerError;
pub use crate::peer::{Locator, PodUid};

/// The annotation that binds a Kubernetes service account to a Google
/// service account (the GKE Workload Identity convention).
pub const GOOGLE_ACCOUNT_ANNOTATION: &str = "iam.gke.io/gcp-service-account";

/// Longest wait for the direct list of an unknown pod (5 s), the wait
/// for another caller's list included.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long what a direct list found (or did not find) answers for the
/// pods the watcher has not told of yet (5 s).
pub const LOOKUP_MEMORY: Duration = Duration::from_secs(5);

/// Whether peers in pods get their own identity (`--workload-identity`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum WorkloadIdentity {
    /// Every peer gets the broker's own identity.
    #[default]
    Off,
    /// Peers in Kubernetes pods get their pod's Google service account.
    Kubernetes,
}

/// What a pod whose Kubernetes service account maps to no Google service
/// account gets (`--unmapped-pods`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum UnmappedPods {
    /// `PERMISSION_DENIED`, naming the annotation to add.
    #[default]
    Deny,
    /// The broker's own identity, as without workload identity.
    Node,
}

/// Where the API server's address and credentials come from.
#[derive(Clone, Debug)]
pub enum Kubeconfig {
    /// `--kubeconfig FILE`.
    File(PathBuf),
    /// A kubeconfig's text (the emulator's fake API).
    Text(String),
    /// The in-cluster configuration (the pod's service-account token and
    /// CA), else kube's usual discovery (`KUBECONFIG`, `~/.kube/config`).
    Infer,
}

/// How to reach the API server and which node this is.
#[derive(Clone, Debug)]
pub struct WorkloadConfig {
    /// The API server.
    pub kubeconfig: Kubeconfig,
    /// `--node-name`: this node, whose pods are followed.
    pub node_name: String,
    /// `--unmapped-pods`.
    pub unmapped: UnmappedPods,
}

/// A service account's binding annotation, checked once when read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Annotation {
    /// A service account email.
    Account(Arc<str>),
    /// Anything else, kept to be named in refusals.
    NotAnEmail(Arc<str>),
}

impl Annotation {
    /// Reads an annotation's value.
    pub fn read(value: &str) -> Self {
        let value = value.trim();
        if crate::request::is_service_account_email(value) {
            Self::Account(Arc::from(value))
        } else {
            Self::NotAnEmail(Arc::from(value))
        }
    }
}

/// Values by Kubernetes service account: namespace, then name (nested,
/// so that a lookup by `&str` allocates nothing).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ByServiceAccount<T>(HashMap<String, HashMap<String, T>>);

impl<T> Default for ByServiceAccount<T> {
    fn default() -> Self {
        Self(HashMap::new())
    }
}

impl<T> ByServiceAccount<T> {
    /// The value of `namespace/name`.
    pub fn get(&self, namespace: &str, name: &str) -> Option<&T> {
        self.0.get(namespace)?.get(name)
    }

    /// Sets the value of `namespace/name`; returns the one it replaces.
    pub fn insert(&mut self, namespace: String, name: String, value: T) -> Option<T> {
        self.0.entry(namespace).or_default().insert(name, value)
    }

    /// Takes the value of `namespace/name` out.
    pub fn remove(&mut self, namespace: &str, name: &str) -> Option<T> {
        let names = self.0.get_mut(namespace)?;
        let removed = names.remove(name);
        if names.is_empty() {
            self.0.remove(namespace);
        }
        removed
    }
}

impl<T> FromIterator<(String, String, T)> for ByServiceAccount<T> {
    fn from_iter<I: IntoIterator<Item = (String, String, T)>>(entries: I) -> Self {
        let mut map = Self::default();
        for (namespace, name, value) in entries {
            map.insert(namespace, name, value);
        }
        map
    }
}

/// A pod on this node, as far as identity goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    /// The pod's UID, as its cgroup names it.
    pub uid: PodUid,
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// The Kubernetes service account it runs as.
    pub service_account: String,
}

impl fmt::Display for Pod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl Pod {
    /// Its Kubernetes service account, as `namespace/name`.
    pub fn kubernetes_service_account(&self) -> String {
        format!("{}/{}", self.namespace, self.service_account)
    }

    /// The pod an API object describes, if it has what identity needs.
    fn of(object: &PodObject) -> Option<Self> {
        let meta = &object.metadata;
        let service_account = object
            .spec
            .as_ref()
            .and_then(|spec| spec.service_account_name.clone())
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| "default".to_string());
        Some(Self {
            uid: PodUid::parse(meta.uid.as_ref()?)?,
            namespace: meta.namespace.clone()?,
            name: meta.name.clone()?,
            service_account,
        })
    }
}

/// The node's pods and the service accounts' bindings, shared by every
/// request; cloning is cheap.
#[derive(Clone)]
pub struct Workloads(Arc<Inner>);

struct Inner {
    config: WorkloadConfig,
    client: kube::Client,
    directory: RwLock<Directory>,
    /// Bumped whenever a pod goes or changes, a binding changes, a whole
    /// list is read or the policy is reloaded: watches check their pod
    /// again, and what pods were served as is worked out anew.
    changes: watch::Sender<u64>,
    /// Whether both lists have been read once: until then pods are not
    /// served and `/readyz` is 503.
    synced: watch::Sender<bool>,
    /// One direct list at a time: a burst of unknown pods waits for it.
    lookup: tokio::sync::Mutex<()>,
    /// What each pod was served as, for the generation of `changes` it was
    /// worked out in: the hit path's one lookup.
    served_as: RwLock<Memo>,
}

/// Identities worked out since the last change.
#[derive(Default)]
struct Memo {
    generation: u64,
    identities: HashMap<PodUid, PodIdentity>,
}

/// What a pod is served as: the pod, and the Google service account it
/// maps to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodIdentity {
    /// The pod.
    pub pod: Arc<Pod>,
    /// Its Google service account; `None` for a pod that maps to none and
    /// gets the broker's own identity (`--unmapped-pods node`).
    pub google: Option<Arc<str>>,
}

#[derive(Default)]
struct Directory {
    /// The node's pods, as the watcher last saw them.
    pods: HashMap<PodUid, Arc<Pod>>,
    /// Pods a direct list found (or did not find) before the watcher
    /// told, and pods the watcher deleted (`None`): kept
    /// [`LOOKUP_MEMORY`]; a pod the watcher adds, or a new whole list,
    /// replaces them.
    looked_up: HashMap<PodUid, (Option<Arc<Pod>>, Instant)>,
    /// Each service account's binding annotation.
    bindings: ByServiceAccount<Annotation>,
    pods_synced: bool,
    accounts_synced: bool,
}

impl Directory {
    /// The pod with `uid`: in the map, or found by a recent direct list
    /// (`Some(None)`: a recent list did not find it).
    fn pod(&self, uid: PodUid, now: Instant) -> Option<Option<Arc<Pod>>> {
        if let Some(pod) = self.pods.get(&uid) {
            return Some(Some(pod.clone()));
        }
        self.looked_up
            .get(&uid)
            .filter(|(_, at)| now.saturating_duration_since(*at) < LOOKUP_MEMORY)
            .map(|(pod, _)| pod.clone())
    }
}

impl Workloads {
    /// Connects to the API server as `config` says (nothing is sent yet);
    /// `synced` is set once both lists have been read (it starts false).
    pub async fn connect(
        config: WorkloadConfig,
        synced: watch::Sender<bool>,
    ) -> Result<Self, String> {
        let custom = |file, name: String| async move {
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .map_err(|e| format!("{name}: {e}"))
        };
        let client_config = match &config.kubeconfig {
            Kubeconfig::File(path) => {
                let name = format!("--kubeconfig {}", path.display());
                let file = kube::config::Kubeconfig::read_from(path)
                    .map_err(|e| format!("{name}: {e}"))?;
                custom(file, name).await?
            }
            Kubeconfig::Text(text) => {
                let file = kube::config::Kubeconfig::from_yaml(text)
                    .map_err(|e| format!("the emulator's kubeconfig: {e}"))?;
                custom(file, "the emulator's kubeconfig".into()).await?
            }
            Kubeconfig::Infer => kube::Config::infer().await.map_err(|e| {
                format!("--workload-identity kubernetes: no in-cluster configuration and no kubeconfig ({e}); run in a pod with a service account token, or pass --kubeconfig")
            })?,
        };
        // kube retries a 429, 503 or 504 up to 15 times by default, which
        // would hide an unreachable API server for minutes: the watcher
        // backs off and lists again on its own, and a pod's direct lookup
        // has its own deadline.
        let mut client_config = client_config;
        client_config.default_retry = false;
        let client = kube::Client::try_from(client_config)
            .map_err(|e| format!("cannot build the Kubernetes client: {e}"))?;
        Ok(Self(Arc::new(Inner {
            config,
            client,
            directory: RwLock::default(),
            changes: watch::Sender::new(0),
            synced,
            lookup: tokio::sync::Mutex::new(()),
            served_as: RwLock::default(),
        })))
    }

    /// Follows the node's pods and the service accounts until `stop`.
    pub fn follow(&self, stop: CancellationToken) {
        tokio::spawn(follow::pods(self.clone(), stop.clone()));
        tokio::spawn(follow::service_accounts(self.clone(), stop));
    }

    /// The node whose pods are served.
    pub fn node(&self) -> &str {
        &self.0.config.node_name
    }

    /// What pods without a Google service account get.
    pub fn unmapped(&self) -> UnmappedPods {
        self.0.config.unmapped
    }

    /// How many pods of this node are known.
    pub fn len(&self) -> usize {
        self.read().pods.len()
    }

    /// Whether both lists have been read once.
    pub fn is_synced(&self) -> bool {
        *self.0.synced.borrow()
    }

    /// Changes whenever anything a pod's identity depends on changes.
    pub fn subscribe_changes(&self) -> watch::Receiver<u64> {
        self.0.changes.subscribe()
    }

    /// The pod with `uid` as known now, from the watcher or a recent direct
    /// list, for an open watch: refused if it is known to be gone;
    /// `UNAVAILABLE` (watch again, which looks it up) if nothing is known
    /// of it now.
    pub fn current(&self, uid: PodUid) -> Result<Arc<Pod>, BrokerError> {
        match self.read().pod(uid, Instant::now()) {
            Some(Some(pod)) => Ok(pod),
            Some(None) => Err(BrokerError::PodDenied {
                reason: format!("pod {uid} is no longer on node {}", self.node()),
            }),
            None => Err(BrokerError::PodUnavailable {
                reason: format!("pod {uid} is not known to the broker now; watch again"),
            }),
        }
    }

    /// The pod with `uid`: known, else from one direct list of the node's
    /// pods (concurrent callers wait for it and share what it found, and
    /// what it did not find is remembered [`LOOKUP_MEMORY`]). A pod that
    /// is in neither is refused; an API server that cannot be asked within
    /// [`LOOKUP_TIMEOUT`] is `UNAVAILABLE`.
    pub async fn pod(&self, uid: PodUid) -> Result<Arc<Pod>, BrokerError> {
        let unavailable = |reason: String| BrokerError::PodUnavailable {
            reason: format!(
                "pod {uid} is not known yet and the Kubernetes API server could not be asked: {reason}"
            ),
        };
        // Bound first: the read guard must not live across the lookup.
        let known = self.read().pod(uid, Instant::now());
        let found = match known {
            Some(found) => found,
            None => tokio::time::timeout(LOOKUP_TIMEOUT, self.look_up(uid))
                .await
                .map_err(|_| unavailable(format!("no answer within {LOOKUP_TIMEOUT:?}")))?
                .map_err(unavailable)?,
        };
        found.ok_or_else(|| BrokerError::PodDenied {
            reason: format!(
                "pod {uid} is not a pod of node {} (deleted, or not scheduled here)",
                self.node()
            ),
        })
    }

    /// Lists the node's pods (one list at a time; a caller that waited
    /// for another's takes its answer), remembers what was found and
    /// whether `uid` was, and returns that.
    async fn look_up(&self, uid: PodUid) -> Result<Option<Arc<Pod>>, String> {
        let _one_at_a_time = self.0.lookup.lock().await;
        let known = self.read().pod(uid, Instant::now());
        if let Some(found) = known {
            return Ok(found);
        }
        let api: Api<PodObject> = Api::all(self.client());
        let listed = api
            .list(&ListParams::default().fields(&self.field_selector()))
            .await
            .map_err(|e| e.to_string())?;
        let now = Instant::now();
        let mut directory = self.0.directory.write().unwrap_or_else(|e| e.into_inner());
        directory
            .looked_up
            .retain(|_, (_, at)| now.saturating_duration_since(*at) < LOOKUP_MEMORY);
        for pod in listed.items.iter().filter_map(Pod::of) {
            if !directory.pods.contains_key(&pod.uid) {
                directory
                    .looked_up
                    .insert(pod.uid, (Some(Arc::new(pod)), now));
            }
        }
        let found = directory.pod(uid, now).flatten();
        if found.is_none() {
            directory.looked_up.insert(uid, (None, now));
        }
        Ok(found)
    }

    /// The node's running and pending pods: finished ones hold no process.
    fn field_selector(&self) -> String {
        format!(
            "spec.nodeName={},status.phase!=Succeeded,status.phase!=Failed",
            self.node()
        )
    }

    /// The binding annotation of `pod`'s Kubernetes service account, if any.
    pub fn annotation(&self, pod: &Pod) -> Option<Annotation> {
        self.read()
            .bindings
            .get(&pod.namespace, &pod.service_account)
            .cloned()
    }

    /// What the pod with `uid` was served as since the last change, if it
    /// was: nothing it depends on (the pod, its binding, the policy) has
    /// changed since.
    pub fn served_as(&self, uid: PodUid) -> Option<PodIdentity> {
        let memo = self.0.served_as.read().unwrap_or_else(|e| e.into_inner());
        if memo.generation != *self.0.changes.borrow() {
            return None;
        }
        memo.identities.get(&uid).cloned()
    }

    /// Remembers what the pod with `uid` is served as, worked out when the
    /// changes were at `generation` (read before it was worked out, so a
    /// change meanwhile makes it stale at once).
    pub fn remember(&self, uid: PodUid, generation: u64, identity: PodIdentity) {
        let mut memo = self.0.served_as.write().unwrap_or_else(|e| e.into_inner());
        if memo.generation != generation {
            if generation != *self.0.changes.borrow() {
                return;
            }
            memo.generation = generation;
            memo.identities.clear();
        }
        memo.identities.insert(uid, identity);
    }

    /// The generation of changes now.
    pub fn generation(&self) -> u64 {
        *self.0.changes.borrow()
    }

    /// The policy was reloaded: open watches check their pods' accounts
    /// again (a `[[workload]]` entry may have changed).
    pub fn policy_reloaded(&self) {
        self.0.changes.send_modify(|generation| *generation += 1);
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Directory> {
        self.0.directory.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the directory, then tells watches to check their pods
    /// again if `update` says something they depend on changed.
    fn update(&self, update: impl FnOnce(&mut Directory) -> bool) {
        let (changed, synced) = {
            let mut directory = self.0.directory.write().unwrap_or_else(|e| e.into_inner());
            let changed = update(&mut directory);
            (changed, directory.pods_synced && directory.accounts_synced)
        };
        if changed {
            self.0.changes.send_modify(|generation| *generation += 1);
        }
        self.0.synced.send_if_modified(|current| {
            let newly = synced && !*current;
            *current |= synced;
            newly
        });
    }

    fn client(&self) -> kube::Client {
        self.0.client.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PodSpec;
    use kube::api::ObjectMeta;

    fn object(uid: &str, service_account: Option<&str>) -> PodObject {
        PodObject {
            metadata: ObjectMeta {
                name: Some("p-1".into()),
                namespace: Some("shop".into()),
                uid: Some(uid.into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                service_account_name: service_account.map(str::to_string),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    async fn emulator() -> crate::emulator::Emulator {
        let any_port = "127.0.0.1:0".parse().unwrap();
        crate::emulator::Emulator::start(any_port, Default::default())
            .await
            .unwrap()
    }

    /// Workloads on `emulator`'s fake API for node `node-a`, without the
    /// watchers: every pod comes from a direct list.
    async fn unfollowed(emulator: &crate::emulator::Emulator) -> Workloads {
        let config = WorkloadConfig {
            kubeconfig: Kubeconfig::Text(emulator.kubeconfig()),
            node_name: "node-a".into(),
            unmapped: UnmappedPods::Deny,
        };
        Workloads::connect(config, watch::Sender::new(false))
            .await
            .unwrap()
    }

    fn fake_pod(uid: &str, node: &str) -> crate::emulator::kubernetes::FakePod {
        crate::emulator::kubernetes::FakePod {
            namespace: "shop".into(),
            name: format!("p-{uid}"),
            uid: Some(uid.into()),
            node: node.into(),
            service_account: "cart".into(),
        }
    }

    #[tokio::test]
    async fn unknown_pods_cost_one_shared_list_and_its_answer_is_remembered() {
        let emulator = emulator().await;
        let uids: Vec<String> = (0..10)
            .map(|i| format!("00000000-0000-4000-8000-{i:012}"))
            .collect();
        for uid in &uids {
            emulator.add_pod(fake_pod(uid, "node-a"));
        }
        let elsewhere = "00000000-0000-4000-8000-999999999999";
        emulator.add_pod(fake_pod(elsewhere, "node-b"));
        let workloads = unfollowed(&emulator).await;
        let lists = || emulator.stats().kubernetes_lists;

        // Ten new pods at once: one list answers them all.
        let asked = uids
            .iter()
            .map(|uid| workloads.pod(PodUid::parse(uid).unwrap()));
        let found = futures_util::future::join_all(asked).await;
        assert!(found.iter().all(Result::is_ok), "{found:?}");
        assert_eq!(lists(), 1);
        assert_eq!(found[3].as_ref().unwrap().name, format!("p-{}", uids[3]));

        // A pod of another node, or of none, is refused, and the miss is
        // remembered rather than listed again.
        for _ in 0..3 {
            let refused = workloads.pod(PodUid::parse(elsewhere).unwrap()).await;
            assert!(
                matches!(refused, Err(BrokerError::PodDenied { .. })),
                "{refused:?}"
            );
        }
        assert_eq!(lists(), 2);
        assert!(workloads.current(PodUid::parse(&uids[0]).unwrap()).is_ok());

        // The API server away: an unknown pod is UNAVAILABLE.
        emulator.set_kubernetes_outage(true);
        let unknown = PodUid::parse("00000000-0000-4000-8000-777777777777").unwrap();
        let error = workloads.pod(unknown).await.unwrap_err();
        assert_eq!(error.code(), tonic::Code::Unavailable, "{error}");
    }

    #[tokio::test]
    async fn the_watcher_overrules_what_a_direct_list_found() {
        let emulator = emulator().await;
        let uid = "00000000-0000-4000-8000-000000000001";
        emulator.add_pod(fake_pod(uid, "node-a"));
        let workloads = unfollowed(&emulator).await;
        let pod_uid = PodUid::parse(uid).unwrap();
        workloads.pod(pod_uid).await.unwrap();
        // The watcher reports the pod deleted: it is gone at once, not
        // when the lookup's memory ends.
        let mut deleted = object(uid, Some("cart"));
        deleted.spec.as_mut().unwrap().node_name = Some("node-a".into());
        workloads.update(|directory| follow::remove_pod(directory, &deleted));
        let gone = workloads.current(pod_uid).unwrap_err();
        assert_eq!(gone.code(), tonic::Code::PermissionDenied, "{gone}");
        // Nor does a direct list under way bring it back: the watcher's word
        // is newer.
        assert!(workloads.pod(pod_uid).await.is_err());
        let unknown = PodUid::parse("00000000-0000-4000-8000-000000000002").unwrap();
        let error = workloads.current(unknown).unwrap_err();
        assert_eq!(error.code(), tonic::Code::Unavailable, "{error}");
    }

    #[tokio::test]
    async fn what_a_pod_is_served_as_is_remembered_until_anything_changes() {
        let emulator = emulator().await;
        let workloads = unfollowed(&emulator).await;
        let uid = PodUid::parse("00000000-0000-4000-8000-000000000001").unwrap();
        let pod = Arc::new(Pod::of(&object(&uid.to_string(), Some("cart"))).unwrap());
        let resolved = PodIdentity {
            pod,
            google: Some(Arc::from("cart@p.iam.gserviceaccount.com")),
        };
        let before = workloads.generation();
        workloads.remember(uid, before, resolved.clone());
        assert_eq!(workloads.served_as(uid), Some(resolved.clone()));
        // A reload (or a pod gone, a binding changed) forgets it…
        workloads.policy_reloaded();
        assert_eq!(workloads.served_as(uid), None);
        // …and what was worked out before the change is not remembered.
        workloads.remember(uid, before, resolved.clone());
        assert_eq!(workloads.served_as(uid), None);
        workloads.remember(uid, workloads.generation(), resolved.clone());
        assert_eq!(workloads.served_as(uid), Some(resolved));
    }

    #[test]
    fn values_by_service_account_are_found_by_namespace_and_name() {
        let mut map: ByServiceAccount<u8> =
            [("shop".into(), "cart".into(), 1)].into_iter().collect();
        assert_eq!(map.insert("shop".into(), "cart".into(), 2), Some(1));
        map.insert("shop".into(), "till".into(), 3);
        assert_eq!(map.get("shop", "cart"), Some(&2));
        assert_eq!(map.get("shop", "other"), None);
        assert_eq!(map.get("cart", "shop"), None);
        assert_eq!(map.remove("shop", "cart"), Some(2));
        assert_eq!(map.remove("shop", "cart"), None);
        assert_eq!(map.remove("shop", "till"), Some(3));
        // An emptied namespace goes too: the map equals a new one.
        assert_eq!(map, ByServiceAccount::default());
    }

    #[test]
    fn annotations_are_checked_once_when_read() {
        let gsa = "cart@p.iam.gserviceaccount.com";
        assert_eq!(
            Annotation::read(&format!(" {gsa} ")),
            Annotation::Account(Arc::from(gsa))
        );
        for bad in ["", "nope", "a/../b@p.iam.gserviceaccount.com", "default"] {
            assert_eq!(
                Annotation::read(bad),
                Annotation::NotAnEmail(Arc::from(bad))
            );
        }
    }

    #[test]
    fn a_pod_is_known_by_its_cgroups_uid() {
        let uid = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
        let pod = Pod::of(&object(uid, Some("cart"))).unwrap();
        assert_eq!(pod.uid, PodUid::parse(uid).unwrap());
        assert_eq!(
            (pod.to_string(), pod.service_account.as_str()),
            ("shop/p-1".into(), "cart")
        );
        assert_eq!(
            Pod::of(&object(uid, None)).unwrap().service_account,
            "default"
        );
        // A static pod's hash is no UID: its mirror is not served.
        assert_eq!(
            Pod::of(&object("6d2a0a8f3ec1e0f1b1d25bd6a3cfcb21", None)),
            None
        );
        assert_eq!(Pod::of(&object("not-a-uid", None)), None);
    }
}
