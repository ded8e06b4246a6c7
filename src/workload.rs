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
use tokio_util::sync::CancellationToken;

use crate::error::BrokerError;
pub use crate::peer::{Locator, PodUid};

/// The annotation that binds a Kubernetes service account to a Google
/// service account (the GKE Workload Identity convention).
pub const GOOGLE_ACCOUNT_ANNOTATION: &str = "iam.gke.io/gcp-service-account";

/// Longest wait for the direct list of an unknown pod (5 s).
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

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
            uid: PodUid::parse(meta.uid.as_deref()?)?,
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
    /// Bumped whenever a pod goes or a binding changes, so that watches
    /// check their pod again.
    changes: watch::Sender<u64>,
    /// Whether both lists have been read once: until then pods are not
    /// served and `/readyz` is 503.
    synced: watch::Sender<bool>,
    /// One direct list at a time: a burst of unknown pods waits for it.
    lookup: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct Directory {
    pods: HashMap<PodUid, Arc<Pod>>,
    /// (namespace, service account) → the annotated Google account.
    bindings: HashMap<(String, String), String>,
    pods_synced: bool,
    accounts_synced: bool,
}

impl Workloads {
    /// Connects to the API server as `config` says (nothing is sent yet).
    pub async fn connect(config: WorkloadConfig) -> Result<Self, String> {
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
            synced: watch::Sender::new(false),
            lookup: tokio::sync::Mutex::new(()),
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

    /// Follows whether both lists have been read once.
    pub fn subscribe_synced(&self) -> watch::Receiver<bool> {
        self.0.synced.subscribe()
    }

    /// Changes whenever a pod goes or a binding changes.
    pub fn subscribe_changes(&self) -> watch::Receiver<u64> {
        self.0.changes.subscribe()
    }

    /// The pod with `uid`, if the map has it now.
    pub fn known(&self, uid: PodUid) -> Option<Arc<Pod>> {
        self.read().pods.get(&uid).cloned()
    }

    /// The pod with `uid`: from the map, else from one direct list of the
    /// node's pods (shared by concurrent callers). A pod that is in
    /// neither is refused; an API server that cannot be asked is
    /// `UNAVAILABLE`.
    pub async fn pod(&self, uid: PodUid) -> Result<Arc<Pod>, BrokerError> {
        if let Some(pod) = self.known(uid) {
            return Ok(pod);
        }
        let _one_at_a_time = self.0.lookup.lock().await;
        if let Some(pod) = self.known(uid) {
            return Ok(pod);
        }
        let api: Api<PodObject> = Api::all(self.0.client.clone());
        let params = ListParams::default().fields(&format!("spec.nodeName={}", self.node()));
        let listed = tokio::time::timeout(LOOKUP_TIMEOUT, api.list(&params))
            .await
            .map_err(|_| format!("no answer within {LOOKUP_TIMEOUT:?}"))
            .and_then(|listed| listed.map_err(|e| e.to_string()))
            .map_err(|reason| BrokerError::PodUnavailable {
                reason: format!(
                    "pod {uid} is not known yet and the Kubernetes API server could not be asked: {reason}"
                ),
            })?;
        listed
            .items
            .iter()
            .filter_map(Pod::of)
            .find(|pod| pod.uid == uid)
            .map(Arc::new)
            .ok_or_else(|| BrokerError::PodDenied {
                reason: format!(
                    "pod {uid} is not a pod of node {} (deleted, or not scheduled here)",
                    self.node()
                ),
            })
    }

    /// The Google service account `pod`'s Kubernetes service account is
    /// annotated with, if any.
    pub fn annotated_account(&self, pod: &Pod) -> Option<String> {
        self.read()
            .bindings
            .get(&(pod.namespace.clone(), pod.service_account.clone()))
            .cloned()
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
