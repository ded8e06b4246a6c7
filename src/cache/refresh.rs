//! The refresh task of one key: fetches when asked for a newer
//! generation, refreshes before expiry, keeps a valid token when a refresh
//! fails, tells watchers when the token stops being usable, and retires
//! the entry once it is idle.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use crate::schedule::Backoff;

use super::Inner;
use super::downscoped::{SourceLink, fallback_refresh, source_replaced};
use super::entry::{KeyEntry, Retire};

/// The life of one key: fetch when asked, refresh before expiry, retry
/// failed refreshes while the old token lasts, and leave when idle.
pub(super) async fn refresh_task(
    cache: Weak<Inner>,
    entry: Arc<KeyEntry>,
    stop: CancellationToken,
) {
    let _retire = Retire {
        cache: cache.clone(),
        entry: entry.clone(),
    };
    let mut backoff = match cache.upgrade() {
        Some(inner) => Backoff::new(inner.config.retry_initial, inner.config.retry_max),
        None => return,
    };
    let mut refresh_at: Option<Instant> = None;
    // The last moment of unusability the watchers were told of.
    let mut told: Option<Instant> = None;
    // Whether a fetch ever succeeded: a key that never got a token is
    // dropped sooner, releasing its creator's quota.
    let mut produced = false;
    // A downscoped key's tie to its source key's entry.
    let mut link: Option<SourceLink> = None;
    loop {
        let generation = entry.state.borrow().generation;
        let asked = entry.wanted.load(Ordering::Acquire) > generation;
        if !asked {
            let Some(inner) = cache.upgrade() else { break };
            // A watched key is never idle; the last watcher to leave wakes
            // this task so the idle clock starts again.
            let idle_at = (entry.watchers.load(Ordering::Acquire) == 0)
                .then(|| inner.idle_deadline(&entry, produced));
            drop(inner);
            // One timer for whichever comes first (a task per key: small
            // futures keep the cache small). Watchers have no timer of
            // their own: the expiry of their token is this task's to tell.
            let expiry_at = entry.expiry_untold(told);
            let wake_at = [refresh_at, idle_at, expiry_at].into_iter().flatten().min();
            tokio::select! {
                () = stop.cancelled() => break,
                () = entry.wake.notified() => {}
                () = sleep_until(wake_at.unwrap_or_else(Instant::now)), if wake_at.is_some() => {}
                // The source token was refreshed: exchange it now.
                () = source_replaced(link.as_mut()) => refresh_at = Some(Instant::now()),
            }
            let now = Instant::now();
            entry.tell_watchers_if_expired(&mut told, now);
            if idle_at.is_some_and(|idle| now >= idle) {
                match cache.upgrade() {
                    Some(inner) if inner.evict_if_idle(&entry, produced) => break,
                    Some(_) => {}
                    None => break,
                }
            }
            if refresh_at.is_none_or(|refresh| now < refresh) {
                continue;
            }
        }
        let Some(inner) = cache.upgrade() else { break };
        entry.state.send_if_modified(|s| {
            s.fetching = true;
            false
        });
        let exchanged_before = link.as_ref().map(|l| l.exchanged_from().clone());
        // A key that once had a token goes before new ones upstream.
        let result = inner
            .fetch_for(&entry, &mut told, produced, &mut link)
            .await;
        produced |= result.is_ok();
        if !asked {
            inner.metrics.refreshed(entry.key.kind(), result.is_ok());
        }
        // A token its source token bounds is replaced by the source's
        // refresh: its own timer waits until that should have happened, and
        // is off once it was exchanged again from the same source token
        // (the source's refresh failed; another exchange gains nothing).
        let again_from_same_source = match (&result, &link) {
            (Ok(token), Some(link)) if link.bounds(token) => {
                Some(link.same_source(exchanged_before.as_ref()))
            }
            _ => None,
        };
        refresh_at = inner.record(&entry, result, &mut backoff);
        if let Some(again) = again_from_same_source {
            let now = Instant::now();
            let usable = entry
                .expiry_untold(None)
                .map(|at| at.saturating_duration_since(now));
            refresh_at = usable
                .filter(|_| !again)
                .map(|usable| now + fallback_refresh(usable, inner.config.refresh_margin));
        }
    }
}
