//! Keeps the directory of [`Workloads`] current with kube's watcher: the
//! pods of this node (`spec.nodeName`, running or pending) and every
//! service account's binding annotation (their metadata only: the
//! annotation is all that is read). The watcher lists, then watches,
//! and lists again (with backoff) whenever the watch breaks; the directory
//! keeps the last known map meanwhile, and a new list replaces it whole,
//! so pods deleted during an outage go then.

use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Pod as PodObject, ServiceAccount};
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, watcher as watch_stream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{
    Annotation, ByServiceAccount, Directory, GOOGLE_ACCOUNT_ANNOTATION, Pod, PodUid, Workloads,
};
use crate::telemetry::RateLimitedLog;

/// Follows this node's pods until `stop`.
pub(super) async fn pods(workloads: Workloads, stop: CancellationToken) {
    let api: Api<PodObject> = Api::all(workloads.client());
    let config = watcher::Config::default().fields(&workloads.field_selector());
    follow::<Pods>(&workloads, api, config, stop).await;
}

/// Follows every service account's binding annotation until `stop`, from
/// their metadata only.
pub(super) async fn service_accounts(workloads: Workloads, stop: CancellationToken) {
    let api: Api<PartialObjectMeta<ServiceAccount>> = Api::all(workloads.client());
    follow::<Bindings>(&workloads, api, watcher::Config::default(), stop).await;
}

/// Takes a pod the watcher reports deleted out of the directory (and out
/// of what direct lists found); says whether it was in.
#[cfg(test)]
pub(super) fn remove_pod(directory: &mut Directory, object: &PodObject) -> bool {
    Pods::remove(directory, object)
}

/// What one watcher keeps of its objects, and where in the directory.
trait Kept {
    /// The API object, as the watcher reads it.
    type Object: kube::Resource
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + 'static;
    /// What the directory keeps of one object.
    type Entry;
    /// For logs.
    const WHAT: &'static str;

    /// The object's entry; `None`: not kept (or no longer).
    fn entry(object: &Self::Object) -> Option<Self::Entry>;
    /// Puts `entry` in; says whether something open watches depend on
    /// changed.
    fn apply(directory: &mut Directory, entry: Self::Entry) -> bool;
    /// Takes the object out; says whether it was in.
    fn remove(directory: &mut Directory, object: &Self::Object) -> bool;
    /// Replaces everything with a whole new list; says whether anything
    /// changed.
    fn replace(directory: &mut Directory, listed: Vec<Self::Entry>) -> bool;
}

/// The node's pods, by UID.
struct Pods;

impl Kept for Pods {
    type Object = PodObject;
    type Entry = Arc<Pod>;
    const WHAT: &'static str = "pods";

    fn entry(object: &PodObject) -> Option<Arc<Pod>> {
        Pod::of(object).map(Arc::new)
    }

    fn apply(directory: &mut Directory, pod: Arc<Pod>) -> bool {
        directory.looked_up.remove(&pod.uid);
        // A new pod changes nothing for open watches; a changed one might.
        let old = directory.pods.insert(pod.uid, pod.clone());
        old.is_some_and(|old| old != pod)
    }

    fn remove(directory: &mut Directory, object: &PodObject) -> bool {
        let Some(uid) = object.metadata.uid.as_deref().and_then(PodUid::parse) else {
            return false;
        };
        // Kept as gone for a while, so that a direct list under way cannot
        // bring it back. Always a change: what the pod was served as may be
        // remembered even when the maps no longer hold it.
        directory.looked_up.insert(uid, (None, Instant::now()));
        directory.pods.remove(&uid);
        true
    }

    fn replace(directory: &mut Directory, listed: Vec<Arc<Pod>>) -> bool {
        // A whole list is newer than any direct one.
        directory.looked_up.clear();
        directory.pods_synced = true;
        directory.pods = listed.into_iter().map(|pod| (pod.uid, pod)).collect();
        // Always a change (lists are rare: at start, after a broken watch):
        // a pod deleted meanwhile may be remembered outside the maps.
        true
    }
}

/// Service accounts' binding annotations: (namespace, name, annotation).
struct Bindings;

impl Kept for Bindings {
    type Object = PartialObjectMeta<ServiceAccount>;
    type Entry = (String, String, Annotation);
    const WHAT: &'static str = "service accounts";

    fn entry(object: &Self::Object) -> Option<Self::Entry> {
        let meta = &object.metadata;
        let account = meta.annotations.as_ref()?.get(GOOGLE_ACCOUNT_ANNOTATION)?;
        Some((
            meta.namespace.clone()?,
            meta.name.clone()?,
            Annotation::read(account),
        ))
    }

    fn apply(directory: &mut Directory, (namespace, name, annotation): Self::Entry) -> bool {
        let old = directory
            .bindings
            .insert(namespace, name, annotation.clone());
        // A new binding matters too: a pod served as the node maps now.
        old.is_none_or(|old| old != annotation)
    }

    fn remove(directory: &mut Directory, object: &Self::Object) -> bool {
        let meta = &object.metadata;
        let (Some(namespace), Some(name)) = (&meta.namespace, &meta.name) else {
            return false;
        };
        directory.bindings.remove(namespace, name).is_some()
    }

    fn replace(directory: &mut Directory, listed: Vec<Self::Entry>) -> bool {
        let bindings: ByServiceAccount<Annotation> = listed.into_iter().collect();
        directory.accounts_synced = true;
        let changed = directory.bindings != bindings;
        directory.bindings = bindings;
        changed
    }
}

/// Feeds one watcher's events into the directory until `stop`.
async fn follow<K: Kept>(
    workloads: &Workloads,
    api: Api<K::Object>,
    config: watcher::Config,
    stop: CancellationToken,
) {
    let errors = RateLimitedLog::default();
    let stream = watch_stream(api, config).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut listing: Option<Vec<K::Entry>> = None;
    loop {
        let event = tokio::select! {
            () = stop.cancelled() => return,
            event = stream.next() => event,
        };
        let event = match event {
            None => return,
            Some(Ok(event)) => event,
            Some(Err(error)) => {
                errors.warn(|failures| {
                    tracing::warn!(%error, failures, what = K::WHAT, "Kubernetes watch failed; listing again with backoff, serving the pods known (logged at most once a second)")
                });
                continue;
            }
        };
        match event {
            Event::Init => listing = Some(Vec::new()),
            Event::InitApply(object) => {
                if let (Some(listing), Some(entry)) = (&mut listing, K::entry(&object)) {
                    listing.push(entry);
                }
            }
            Event::InitDone => {
                let listed = listing.take().unwrap_or_default();
                workloads.update(|directory| K::replace(directory, listed));
                tracing::debug!(what = K::WHAT, "Kubernetes list read");
            }
            Event::Apply(object) => match K::entry(&object) {
                Some(entry) => workloads.update(|directory| K::apply(directory, entry)),
                // No longer kept (an annotation removed): gone.
                None => workloads.update(|directory| K::remove(directory, &object)),
            },
            Event::Delete(object) => workloads.update(|directory| K::remove(directory, &object)),
        }
    }
}
