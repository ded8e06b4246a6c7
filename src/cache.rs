//! The shared token cache: one entry per key, one refresh task per entry,
//! and every waiter for a key served by the same upstream fetch.
//!
//! Each entry publishes a [`Snapshot`] on a `watch` channel. Readers take
//! the current token from it without waiting; a reader that finds no usable
//! token asks the entry's task for a newer *generation* and waits for it, so
//! any number of concurrent readers cause one fetch. The task also refreshes
//! the token before it expires, keeps the old token when a refresh fails,
//! and removes the entry once nobody has used or watched it for the idle
//! timeout (a minute, for a key that never got a token).
//!
//! No caller can take the cache from the others: each key is charged to
//! the uid that created it, up to `--max-keys-per-uid` ([`crate::cache::quota`]),
//! and a `min_valid_for` the cached token does not meet refetches a key at
//! most once per [`MIN_VALID_FOR_REFETCH_INTERVAL`].

mod downscoped;
mod entry;
mod memo;
pub mod quota;
mod refresh;
mod serve;
mod watch;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use moka::ops::compute::Op;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cache::quota::{KeyQuota, Owner, Refused};
use crate::error::BrokerError;
use crate::request::{TokenKey, TokenRequest};
use crate::schedule::{self};
use crate::secret::Secret;
use crate::telemetry::metrics::{Metrics, Outcome};
use crate::token::{Token, TokenKind};
use crate::upstream::TokenSource;

use entry::{KeyEntry, usable};

use refresh::refresh_task;
pub use watch::TokenWatch;
use watch::WatcherGuard;

/// How many times a call looks its key up again after the key's entry was
/// retired under it (idle eviction racing the call, or a failed task).
const MAX_LOOKUPS: usize = 3;

/// Default idle timeout (30 minutes): a key nobody asked for or watched for
/// this long stops being refreshed and is dropped.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Default bound on cached keys (10 000).
pub const DEFAULT_MAX_KEYS: usize = 10_000;

/// Default bound on the keys one uid may create (1 000); callers without a
/// uid share one such quota, the broker's own sinks have none.
pub const DEFAULT_MAX_KEYS_PER_UID: usize = 1_000;

/// How long a key that never got a token (its fetches failed) stays
/// unused before it is dropped (1 minute), instead of the idle timeout:
/// failed keys must not hold their creator's quota for half an hour.
pub const FAILED_KEY_TIMEOUT: Duration = Duration::from_secs(60);

/// Least time between the last fetch of a key and a fetch for a
/// `min_valid_for` its token does not meet (10 s). With single flight,
/// such refetches are also one at a time per key; other calls in this time
/// get `UNAVAILABLE` at once.
pub const MIN_VALID_FOR_REFETCH_INTERVAL: Duration = Duration::from_secs(10);

/// Default expiry skew (10 s): a token this close to expiry is treated as
/// expired, so it is still valid when the receiving service checks it.
pub const DEFAULT_EXPIRY_SKEW: Duration = Duration::from_secs(10);

/// Default least time between two invalidations of one key (30 s): a
/// client that keeps handing back tokens causes at most one upstream fetch
/// per key in this time.
pub const DEFAULT_INVALIDATE_INTERVAL: Duration = Duration::from_secs(30);

/// Tunables of the cache; [`Default`] gives the documented defaults.
#[derive(Clone, Debug)]
pub struct CacheConfig {
    /// How long before expiry tokens are refreshed ([`schedule::DEFAULT_REFRESH_MARGIN`]).
    pub refresh_margin: Duration,
    /// Tokens closer than this to expiry are never handed out ([`DEFAULT_EXPIRY_SKEW`]).
    pub expiry_skew: Duration,
    /// Unused, unwatched keys are dropped after this ([`DEFAULT_IDLE_TIMEOUT`]).
    pub idle_timeout: Duration,
    /// Most keys held at once ([`DEFAULT_MAX_KEYS`]).
    pub max_keys: usize,
    /// Most keys charged to one uid at once ([`DEFAULT_MAX_KEYS_PER_UID`]).
    pub max_keys_per_uid: usize,
    /// First wait after a failed refresh ([`schedule::DEFAULT_RETRY_INITIAL`]).
    pub retry_initial: Duration,
    /// Longest wait between failed refreshes ([`schedule::DEFAULT_RETRY_MAX`]).
    pub retry_max: Duration,
    /// Least time between two invalidations of one key ([`DEFAULT_INVALIDATE_INTERVAL`]).
    pub invalidate_interval: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            refresh_margin: schedule::DEFAULT_REFRESH_MARGIN,
            expiry_skew: DEFAULT_EXPIRY_SKEW,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_keys: DEFAULT_MAX_KEYS,
            max_keys_per_uid: DEFAULT_MAX_KEYS_PER_UID,
            retry_initial: schedule::DEFAULT_RETRY_INITIAL,
            retry_max: schedule::DEFAULT_RETRY_MAX,
            invalidate_interval: DEFAULT_INVALIDATE_INTERVAL,
        }
    }
}

/// A token handed to a caller, and how it was obtained.
#[derive(Clone, Debug)]
pub struct Served {
    /// The token; valid for at least the request's `min_valid_for`.
    pub token: Arc<Token>,
    /// Hit, miss or coalesced.
    pub outcome: Outcome,
}

/// The cache shared by every client of the broker. Cloning is cheap.
#[derive(Clone)]
pub struct TokenCache {
    inner: Arc<Inner>,
}

struct Inner {
    entries: moka::sync::Cache<TokenKey, Arc<KeyEntry>>,
    source: Arc<dyn TokenSource>,
    config: CacheConfig,
    metrics: Metrics,
    live_keys: AtomicUsize,
    /// Live keys per token kind, indexed by [`kind_index`].
    live_by_kind: [AtomicUsize; 2],
    /// Live keys per creator.
    quota: KeyQuota,
    epoch: Instant,
    /// Stops every refresh task when the last handle to the cache is gone.
    stop: CancellationToken,
    /// Set by [`TokenCache::end_watches`]: every watch ends.
    watches_ended: AtomicBool,
}

impl TokenCache {
    /// A cache fetching through `source`, counting background refreshes
    /// in `metrics`.
    pub fn new(source: Arc<dyn TokenSource>, config: CacheConfig, metrics: Metrics) -> Self {
        let quota = KeyQuota::new(config.max_keys_per_uid);
        Self {
            inner: Arc::new(Inner {
                entries: moka::sync::Cache::builder().build(),
                source,
                config,
                metrics,
                live_keys: AtomicUsize::new(0),
                live_by_kind: Default::default(),
                quota,
                epoch: Instant::now(),
                stop: CancellationToken::new(),
                watches_ended: AtomicBool::new(false),
            }),
        }
    }

    /// Returns a token for the request's key that stays valid at least
    /// `min_valid_for` (plus the expiry skew), fetching one if needed. A key
    /// the source never serves is refused before anything is cached; a new
    /// key is charged to `owner`, and refused if that exceeds its quota.
    /// Callers bound the wait with their own deadline.
    pub async fn get(&self, request: &TokenRequest, owner: Owner) -> Result<Served, BrokerError> {
        self.inner.source.admits(&request.key.source_key())?;
        for _ in 0..MAX_LOOKUPS {
            let entry = self.inner.entry(&request.key, owner)?;
            if let Some(served) = self.inner.serve(&entry, request).await? {
                return Ok(served);
            }
        }
        Err(BrokerError::EntryRetired)
    }

    /// Like [`get`](Self::get), then keeps following the key: the returned
    /// [`TokenWatch`] yields every later token of the key.
    pub async fn watch(
        &self,
        request: &TokenRequest,
        owner: Owner,
    ) -> Result<(Served, TokenWatch), BrokerError> {
        self.inner.source.admits(&request.key.source_key())?;
        for _ in 0..MAX_LOOKUPS {
            let entry = self.inner.entry(&request.key, owner)?;
            let watcher = WatcherGuard::new(entry, self.inner.clone());
            let states = watcher.entry.state.subscribe();
            let Some(served) = self.inner.serve(&watcher.entry, request).await? else {
                continue;
            };
            // Subscribing marks the current state as seen, so an entry
            // retired just before would never signal it: look again.
            if states.borrow().closed {
                continue;
            }
            let watch = TokenWatch {
                watcher,
                states,
                current: served.token.clone(),
                owner,
            };
            return Ok((served, watch));
        }
        Err(BrokerError::EntryRetired)
    }

    /// Drops the key's token if it is still `token` (compared in constant
    /// time) and asks for a new one, which every waiter and watcher of the
    /// key then shares. Returns whether the token was dropped: `false` when
    /// the key holds another token or none (nothing happens then). Fails
    /// with [`BrokerError::InvalidateThrottled`] when the key was
    /// invalidated less than the invalidate interval ago. Never creates a
    /// key.
    pub fn invalidate(&self, key: &TokenKey, token: &Secret) -> Result<bool, BrokerError> {
        let Some(entry) = self.inner.entries.get(key) else {
            return Ok(false);
        };
        let now = Instant::now();
        let now_ms = self.inner.now_ms(now);
        let interval = self.inner.config.invalidate_interval;
        let mut result = Ok(false);
        let mut generation = 0;
        entry.state.send_if_modified(|s| {
            let current = s.token.as_ref().filter(|t| !t.remaining(now).is_zero());
            if !current.is_some_and(|t| t.secret() == token) {
                return false;
            }
            if let Some(wait) = entry.invalidation_wait(now_ms, interval) {
                result = Err(BrokerError::InvalidateThrottled {
                    retry_in: wait,
                    interval,
                });
                return false;
            }
            entry.invalidated_at_ms.store(now_ms + 1, Ordering::Release);
            s.token = None;
            generation = s.generation;
            result = Ok(true);
            true
        });
        if result == Ok(true) {
            entry.touch(now_ms);
            entry.want(generation + 1);
            tracing::info!(
                kind = entry.key.kind().as_str(),
                account = %entry.key.account(),
                "token invalidated by a client; fetching a new one"
            );
        }
        result
    }

    /// How many keys the cache holds.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.inner.live_keys.load(Ordering::Relaxed)
    }

    /// How many keys are charged to `owner`.
    #[cfg(test)]
    pub fn held_by(&self, owner: Owner) -> usize {
        self.inner.quota.held_by(owner)
    }

    /// How many keys of one kind the cache holds.
    pub fn len_of(&self, kind: TokenKind) -> usize {
        self.inner.live_by_kind[kind_index(kind)].load(Ordering::Relaxed)
    }

    /// Ends every watch, open or opened later, with
    /// [`BrokerError::ShuttingDown`] (the broker drains). Watchers are woken
    /// through their key's channel, so an open watch holds no waiter of its
    /// own for this.
    pub fn end_watches(&self) {
        self.inner.watches_ended.store(true, Ordering::Release);
        for (_, entry) in &self.inner.entries {
            entry.state.send_modify(|_| {});
        }
    }

    /// Whether any key holds a token that could be handed out now.
    pub fn has_usable_token(&self) -> bool {
        let now = Instant::now();
        let skew = self.inner.config.expiry_skew;
        self.inner
            .entries
            .iter()
            .any(|(_, entry)| usable(&entry.state.borrow(), now, skew).is_some())
    }
}

impl Inner {
    fn now_ms(&self, now: Instant) -> u64 {
        u64::try_from((now - self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    /// The key's entry, created (with its refresh task) if missing and
    /// charged to `owner`, within `owner`'s quota and the bound on keys.
    fn entry(self: &Arc<Self>, key: &TokenKey, owner: Owner) -> Result<Arc<KeyEntry>, BrokerError> {
        if let Some(entry) = self.recent(key) {
            return Ok(entry);
        }
        if let Some(entry) = self.entries.get(key) {
            self.remember(key, &entry);
            return Ok(entry);
        }
        if let TokenKey::Downscoped(key) = key {
            // Its source key first, charged to the same owner: a refusal
            // (a quota) is the caller's to see, not a failed fetch.
            self.entry(&TokenKey::Access(key.source.clone()), owner)?;
        }
        let mut created = None;
        let mut over_quota = None;
        let inserted = self
            .entries
            .entry_by_ref(key)
            .or_optionally_insert_with(|| {
                if let Err(refused) = self.quota.charge(owner) {
                    over_quota = Some(refused);
                    return None;
                }
                let reserved = self
                    .live_keys
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                        (n < self.config.max_keys).then_some(n + 1)
                    })
                    .is_ok();
                if !reserved {
                    self.quota.release(owner);
                    return None;
                }
                let entry = KeyEntry::new(key.clone(), owner, self.now_ms(Instant::now()));
                created = Some(entry.clone());
                Some(entry)
            });
        let Some(inserted) = inserted else {
            return Err(match over_quota {
                Some(refused) => self.over_quota(key.kind(), owner, refused),
                None => self.over_max_keys(key.kind()),
            });
        };
        let entry = inserted.into_value();
        if let Some(created) = created {
            self.live_by_kind[kind_index(key.kind())].fetch_add(1, Ordering::AcqRel);
            tokio::spawn(refresh_task(
                Arc::downgrade(self),
                created,
                self.stop.clone(),
            ));
        }
        Ok(entry)
    }

    /// Counts and explains a key not created: the cache holds `max_keys`.
    fn over_max_keys(&self, kind: TokenKind) -> BrokerError {
        self.metrics.cache_refused(kind, "max_keys");
        BrokerError::LimitExceeded {
            what: "too many cached keys",
            limit: self.config.max_keys,
        }
    }

    /// Counts and explains a key not created: `owner` holds its quota. The
    /// warning is logged at most once a minute per owner, with a count.
    fn over_quota(&self, kind: TokenKind, owner: Owner, refused: Refused) -> BrokerError {
        self.metrics.cache_refused(kind, "max_keys_per_uid");
        if let Some(refusals) = refused.warn {
            tracing::warn!(
                owner = %owner,
                refusals,
                limit = self.quota.limit(),
                "new keys refused: this creator holds its quota of keys (--max-keys-per-uid); logged at most once a minute per creator"
            );
        }
        BrokerError::KeyQuotaExceeded {
            creator: owner.creator(),
            limit: self.quota.limit(),
        }
    }

    /// Drops `entry` if nobody used, watched or asked for it within its
    /// idle timeout (shorter if it never `produced` a token). Returns
    /// whether it was dropped.
    fn evict_if_idle(&self, entry: &Arc<KeyEntry>, produced: bool) -> bool {
        let timeout = self.idle_timeout(produced);
        let idle = self
            .now_ms(Instant::now())
            .saturating_sub(entry.last_used_ms())
            >= u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let pending = entry.wanted.load(Ordering::Acquire) > entry.state.borrow().generation;
        if !idle || pending || entry.watchers.load(Ordering::Acquire) > 0 {
            return false;
        }
        self.remove(entry);
        let reason = if produced { "idle" } else { "failed" };
        self.metrics.cache_evicted(entry.key.kind(), reason);
        tracing::debug!(key = ?entry.key, reason, "unused key dropped");
        true
    }

    /// Takes `entry` out of the index, unless another entry replaced it.
    fn remove(&self, entry: &Arc<KeyEntry>) {
        self.entries
            .entry_by_ref(&entry.key)
            .and_compute_with(|current| match current {
                Some(current) if Arc::ptr_eq(current.value(), entry) => Op::Remove,
                _ => Op::Nop,
            });
    }

    /// How long a key stays unused: the idle timeout, or at most
    /// [`FAILED_KEY_TIMEOUT`] if it never produced a token.
    fn idle_timeout(&self, produced: bool) -> Duration {
        if produced {
            self.config.idle_timeout
        } else {
            self.config.idle_timeout.min(FAILED_KEY_TIMEOUT)
        }
    }

    fn idle_deadline(&self, entry: &KeyEntry, produced: bool) -> Instant {
        self.epoch + Duration::from_millis(entry.last_used_ms()) + self.idle_timeout(produced)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn kind_index(kind: TokenKind) -> usize {
    match kind {
        TokenKind::Access => 0,
        TokenKind::Id => 1,
    }
}

#[cfg(test)]
mod tests;
