//! One key's entry: the token it publishes, its demand, watchers and
//! clock, and what retires it.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::cache::quota::Owner;
use crate::error::FetchError;
use crate::request::TokenKey;
use crate::token::Token;

use super::{Inner, kind_index};

/// What an entry publishes to its readers.
#[derive(Clone, Debug, Default)]
pub(super) struct Snapshot {
    /// The newest token; a failed refresh never replaces it.
    pub(super) token: Option<Arc<Token>>,
    /// Counts completed fetches, successful or not.
    pub(super) generation: u64,
    /// The error of the latest fetch, if it failed.
    pub(super) error: Option<FetchError>,
    /// Whether a fetch is under way.
    pub(super) fetching: bool,
    /// The entry was dropped from the cache; look the key up again.
    pub(super) closed: bool,
    /// When the latest fetch completed, successful or not.
    pub(super) fetched_at: Option<Instant>,
    /// When the newest token published stops being usable (its expiry less
    /// the skew). Kept when an invalidation drops that token: watchers
    /// still hold it, and the refresh task tells them at this moment.
    pub(super) unusable_at: Option<Instant>,
}

pub(super) struct KeyEntry {
    pub(super) key: TokenKey,
    /// Whom the key is charged to: the creator, for the key's whole life.
    pub(super) owner: Owner,
    pub(super) state: watch::Sender<Snapshot>,
    /// The generation readers wait for; the task fetches while it is ahead
    /// of the published one.
    pub(super) wanted: AtomicU64,
    /// Wakes the task: a reader raised `wanted`, or the last watcher left.
    pub(super) wake: Notify,
    /// Milliseconds since the cache's epoch when the key was last asked for.
    pub(super) last_used_ms: AtomicU64,
    pub(super) watchers: AtomicUsize,
    /// One more than the milliseconds since the cache's epoch at the last
    /// invalidation; 0: never invalidated.
    pub(super) invalidated_at_ms: AtomicU64,
}

// === impl KeyEntry ===
impl KeyEntry {
    pub(super) fn new(key: TokenKey, owner: Owner, now_ms: u64) -> Arc<Self> {
        Arc::new(Self {
            key,
            owner,
            state: watch::Sender::new(Snapshot::default()),
            wanted: AtomicU64::new(0),
            wake: Notify::new(),
            last_used_ms: AtomicU64::new(now_ms),
            watchers: AtomicUsize::new(0),
            invalidated_at_ms: AtomicU64::new(0),
        })
    }

    /// How long until the key may be invalidated again, if it was
    /// invalidated less than `interval` before `now_ms`.
    pub(super) fn invalidation_wait(&self, now_ms: u64, interval: Duration) -> Option<Duration> {
        let last = self
            .invalidated_at_ms
            .load(Ordering::Acquire)
            .checked_sub(1)?;
        let since = Duration::from_millis(now_ms.saturating_sub(last));
        interval.checked_sub(since).filter(|wait| !wait.is_zero())
    }

    pub(super) fn touch(&self, now_ms: u64) {
        self.last_used_ms.fetch_max(now_ms, Ordering::Relaxed);
    }

    pub(super) fn last_used_ms(&self) -> u64 {
        self.last_used_ms.load(Ordering::Relaxed)
    }

    /// When the newest published token stops being usable, unless the
    /// watchers were already told of that moment.
    pub(super) fn expiry_untold(&self, told: Option<Instant>) -> Option<Instant> {
        self.state
            .borrow()
            .unusable_at
            .filter(|at| Some(*at) != told)
    }

    /// If the newest published token has stopped being usable and the
    /// watchers were not told yet, wakes every watcher to look at its token:
    /// one without a newer one ends. However the task woke (its timer, a
    /// request, a watcher leaving), the moment is told once.
    pub(super) fn tell_watchers_if_expired(&self, told: &mut Option<Instant>, now: Instant) {
        if let Some(at) = self.expiry_untold(*told).filter(|at| now >= *at) {
            *told = Some(at);
            self.state.send_modify(|_| {});
        }
    }

    /// One watcher leaves at `now_ms`: the key counts as used then, and
    /// the last watcher to leave wakes the task to start its idle clock.
    pub(super) fn unwatch(&self, now_ms: u64) {
        self.touch(now_ms);
        if self.watchers.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.wake.notify_one();
        }
    }

    /// Asks the task for generation `generation`; returns whether this call
    /// raised the demand (rather than joining one already made).
    pub(super) fn want(&self, generation: u64) -> bool {
        let raised = self.wanted.fetch_max(generation, Ordering::AcqRel) < generation;
        if raised {
            // A stored permit wakes the task even if it is not waiting yet.
            self.wake.notify_one();
        }
        raised
    }
}

/// Retires a key when its refresh task ends, however it ends (a panic
/// included): out of the index, its token dropped (zeroed) at once rather
/// than when the last reference to the entry goes, waiters told to look
/// again, counts down.
pub(super) struct Retire {
    pub(super) cache: Weak<Inner>,
    pub(super) entry: Arc<KeyEntry>,
}

impl Drop for Retire {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!(key = ?self.entry.key, "refresh task panicked; key dropped");
        }
        let inner = self.cache.upgrade();
        if let Some(inner) = &inner {
            inner.remove(&self.entry);
        }
        self.entry.state.send_modify(|s| {
            s.closed = true;
            s.fetching = false;
            s.token = None;
            s.error = None;
        });
        if let Some(inner) = inner {
            inner.quota.release(self.entry.owner);
            inner.live_keys.fetch_sub(1, Ordering::AcqRel);
            inner.live_by_kind[kind_index(self.entry.key.kind())].fetch_sub(1, Ordering::AcqRel);
        }
    }
}

pub(super) fn usable(snapshot: &Snapshot, now: Instant, required: Duration) -> Option<Arc<Token>> {
    snapshot
        .token
        .as_ref()
        .filter(|token| token.remaining(now) > required)
        .cloned()
}
