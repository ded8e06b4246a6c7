//! Keeps the directory of [`Workloads`] current with kube's watcher: the
//! pods of this node (`spec.nodeName`) and every service account's
//! binding annotation. The watcher lists, then watches, and lists again
//! (with backoff) whenever the watch breaks; the directory keeps the last
//! known map meanwhile, and a new list replaces it whole, so pods deleted
//! during an outage go then.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Pod as PodObject, ServiceAccount};
use kube::api::Api;
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, watcher as watch_stream};
use tokio_util::sync::CancellationToken;

use super::{Directory, GOOGLE_ACCOUNT_ANNOTATION, Pod, PodUid, Workloads};
use crate::telemetry::RateLimitedLog;

/// Follows this node's pods until `stop`.
pub(super) async fn pods(workloads: Workloads, stop: CancellationToken) {
    let api: Api<PodObject> = Api::all(workloads.client());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={}", workloads.node()));
    follow(
        &workloads,
        api,
        config,
        "pods",
        |object| Pod::of(object).map(|pod| (pod.uid, Arc::new(pod))),
        |object| object.metadata.uid.as_deref().and_then(PodUid::parse),
        |directory| &mut directory.pods,
        |directory| directory.pods_synced = true,
        stop,
    )
    .await;
}

/// Follows every service account's binding annotation until `stop`.
pub(super) async fn service_accounts(workloads: Workloads, stop: CancellationToken) {
    let api: Api<ServiceAccount> = Api::all(workloads.client());
    follow(
        &workloads,
        api,
        watcher::Config::default(),
        "service accounts",
        |object| {
            let meta = &object.metadata;
            let account = meta.annotations.as_ref()?.get(GOOGLE_ACCOUNT_ANNOTATION)?;
            Some((account_key(object)?, account.trim().to_string()))
        },
        account_key,
        |directory| &mut directory.bindings,
        |directory| directory.accounts_synced = true,
        stop,
    )
    .await;
}

fn account_key(object: &ServiceAccount) -> Option<(String, String)> {
    Some((
        object.metadata.namespace.clone()?,
        object.metadata.name.clone()?,
    ))
}

/// Feeds one watcher's events into one map of the directory: `entry`
/// reads an object's entry (none: the object is not kept, or no longer),
/// `key` its key for deletions.
#[allow(clippy::too_many_arguments)]
async fn follow<K, Key, Value>(
    workloads: &Workloads,
    api: Api<K>,
    config: watcher::Config,
    what: &'static str,
    entry: impl Fn(&K) -> Option<(Key, Value)>,
    key: impl Fn(&K) -> Option<Key>,
    map: impl Fn(&mut Directory) -> &mut HashMap<Key, Value>,
    synced: impl Fn(&mut Directory),
    stop: CancellationToken,
) where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
    Key: Eq + Hash,
    Value: PartialEq,
{
    let errors = RateLimitedLog::default();
    let stream = watch_stream(api, config).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut listing: Option<HashMap<Key, Value>> = None;
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
                    tracing::warn!(%error, failures, what, "Kubernetes watch failed; listing again with backoff, serving the pods known (logged at most once a second)")
                });
                continue;
            }
        };
        match event {
            Event::Init => listing = Some(HashMap::new()),
            Event::InitApply(object) => {
                if let (Some(listing), Some((key, value))) = (&mut listing, entry(&object)) {
                    listing.insert(key, value);
                }
            }
            Event::InitDone => {
                let listed = listing.take().unwrap_or_default();
                workloads.update(|directory| {
                    synced(directory);
                    let map = map(directory);
                    // Anything gone, new or changed matters to open watches.
                    let changed = map.len() != listed.len()
                        || map
                            .iter()
                            .any(|(key, value)| listed.get(key) != Some(value));
                    *map = listed;
                    changed
                });
                tracing::debug!(what, "Kubernetes list read");
            }
            Event::Apply(object) => match (entry(&object), key(&object)) {
                (Some((key, value)), _) => workloads.update(|directory| {
                    let map = map(directory);
                    let changed = map.get(&key) != Some(&value);
                    map.insert(key, value);
                    changed
                }),
                // No longer kept (an annotation removed): gone.
                (None, Some(key)) => {
                    workloads.update(|directory| map(directory).remove(&key).is_some())
                }
                (None, None) => {}
            },
            Event::Delete(object) => {
                if let Some(key) = key(&object) {
                    workloads.update(|directory| map(directory).remove(&key).is_some());
                }
            }
        }
    }
}
