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

pub mod quota;

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use moka::ops::compute::Op;
use tokio::sync::{Notify, watch};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use crate::cache::quota::{KeyQuota, Owner, Refused};
use crate::error::BrokerError;
use crate::error::FetchError;
use crate::request::{TokenKey, TokenRequest};
use crate::schedule::{self, Backoff, refresh_delay};
use crate::secret::Secret;
use crate::telemetry::metrics::{Metrics, Outcome};
use crate::token::{Token, TokenKind};
use crate::upstream::TokenSource;

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

/// Most entries a worker thread remembers in front of the index.
const RECENT_PER_THREAD: usize = 1024;

thread_local! {
    /// Entries this thread looked up lately, for [`Inner::recent`]. Retired
    /// entries are noticed (they are closed) and forgotten on use.
    static RECENT: RefCell<Recent> = RefCell::new(Recent::default());
}

#[derive(Default)]
struct Recent {
    /// The cache (its `Inner`'s address) the entries belong to.
    cache: usize,
    entries: HashMap<TokenKey, Arc<KeyEntry>>,
}

/// How many times a call looks its key up again after the key's entry was
/// retired under it (idle eviction racing the call, or a failed task).
const MAX_LOOKUPS: usize = 3;

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
}

/// What an entry publishes to its readers.
#[derive(Clone, Debug, Default)]
struct Snapshot {
    /// The newest token; a failed refresh never replaces it.
    token: Option<Arc<Token>>,
    /// Counts completed fetches, successful or not.
    generation: u64,
    /// The error of the latest fetch, if it failed.
    error: Option<FetchError>,
    /// Whether a fetch is under way.
    fetching: bool,
    /// The entry was dropped from the cache; look the key up again.
    closed: bool,
    /// When the latest fetch completed, successful or not.
    fetched_at: Option<Instant>,
    /// When the newest token published stops being usable (its expiry less
    /// the skew). Kept when an invalidation drops that token: watchers
    /// still hold it, and the refresh task tells them at this moment.
    unusable_at: Option<Instant>,
}

struct KeyEntry {
    key: TokenKey,
    /// Whom the key is charged to: the creator, for the key's whole life.
    owner: Owner,
    state: watch::Sender<Snapshot>,
    /// The generation readers wait for; the task fetches while it is ahead
    /// of the published one.
    wanted: AtomicU64,
    /// Wakes the task: a reader raised `wanted`, or the last watcher left.
    wake: Notify,
    /// Milliseconds since the cache's epoch when the key was last asked for.
    last_used_ms: AtomicU64,
    watchers: AtomicUsize,
    /// One more than the milliseconds since the cache's epoch at the last
    /// invalidation; 0: never invalidated.
    invalidated_at_ms: AtomicU64,
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
            }),
        }
    }

    /// Returns a token for the request's key that stays valid at least
    /// `min_valid_for` (plus the expiry skew), fetching one if needed. A key
    /// the source never serves is refused before anything is cached; a new
    /// key is charged to `owner`, and refused if that exceeds its quota.
    /// Callers bound the wait with their own deadline.
    pub async fn get(&self, request: &TokenRequest, owner: Owner) -> Result<Served, BrokerError> {
        self.inner.source.admits(&request.key)?;
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
        self.inner.source.admits(&request.key)?;
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
            if !current.is_some_and(|t| same_secret(t.secret(), token)) {
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
    pub fn len(&self) -> usize {
        self.inner.live_keys.load(Ordering::Relaxed)
    }

    /// Whether the cache holds no key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many keys are charged to `owner`.
    pub fn held_by(&self, owner: Owner) -> usize {
        self.inner.quota.held_by(owner)
    }

    /// How many keys of one kind the cache holds.
    pub fn len_of(&self, kind: TokenKind) -> usize {
        self.inner.live_by_kind[kind_index(kind)].load(Ordering::Relaxed)
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

// === impl Inner ===

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
            uid: owner.uid(),
            limit: self.quota.limit(),
        }
    }

    /// The key's entry if this thread looked it up recently and it is still
    /// live. moka records every read for its eviction policy and applies
    /// the records in batches on the reading thread, which showed as a
    /// higher median latency under load; the broker evicts by itself, so
    /// hits are served from this per-thread memory instead.
    fn recent(&self, key: &TokenKey) -> Option<Arc<KeyEntry>> {
        let cache = std::ptr::from_ref(self) as usize;
        RECENT.with_borrow_mut(|recent| {
            if recent.cache != cache {
                recent.cache = cache;
                recent.entries.clear();
                return None;
            }
            let entry = recent.entries.get(key)?;
            if entry.state.borrow().closed {
                recent.entries.remove(key);
                return None;
            }
            Some(entry.clone())
        })
    }

    fn remember(&self, key: &TokenKey, entry: &Arc<KeyEntry>) {
        let cache = std::ptr::from_ref(self) as usize;
        RECENT.with_borrow_mut(|recent| {
            if recent.cache != cache || recent.entries.len() >= RECENT_PER_THREAD {
                recent.cache = cache;
                recent.entries.clear();
            }
            recent.entries.insert(key.clone(), entry.clone());
        });
    }

    /// Serves `request` from `entry`, waiting for a fetch if needed.
    /// `Ok(None)` means the entry was dropped meanwhile: look it up again.
    async fn serve(
        &self,
        entry: &KeyEntry,
        request: &TokenRequest,
    ) -> Result<Option<Served>, BrokerError> {
        let required = request.min_valid_for + self.config.expiry_skew;
        let now = Instant::now();
        entry.touch(self.now_ms(now));
        let (seen, fetching) = {
            let snapshot = entry.state.borrow();
            if let Some(token) = usable(&snapshot, now, required) {
                return Ok(Some(Served {
                    token,
                    outcome: Outcome::Hit,
                }));
            }
            if snapshot.closed {
                return Ok(None);
            }
            self.refetch_allowed(entry, &snapshot, request, now)?;
            (snapshot.generation, snapshot.fetching)
        };
        let caused = entry.want(seen + 1);
        let outcome = if caused && !fetching {
            Outcome::Miss
        } else {
            Outcome::Coalesced
        };
        let mut states = entry.state.subscribe();
        let snapshot = states
            .wait_for(|s| s.generation > seen || s.closed)
            .await
            .map_err(|_| BrokerError::ShuttingDown)?
            .clone();
        if snapshot.generation <= seen {
            return Ok(None);
        }
        let now = Instant::now();
        if let Some(token) = usable(&snapshot, now, required) {
            return Ok(Some(Served { token, outcome }));
        }
        Err(match (snapshot.error, snapshot.token) {
            (Some(source), _) => BrokerError::Upstream {
                account: request.key.account().to_string(),
                source,
            },
            (None, token) => BrokerError::MinValidForUnmet {
                wanted: request.min_valid_for,
                remaining: token.map_or(Duration::ZERO, |t| {
                    t.remaining(now).saturating_sub(self.config.expiry_skew)
                }),
            },
        })
    }

    /// Refuses a fetch for a `min_valid_for` that the cached token does not
    /// meet (though it would serve a plain request) when the key was
    /// fetched less than [`MIN_VALID_FOR_REFETCH_INTERVAL`] ago. A fetch
    /// already under way or asked for is always joined: it costs nothing.
    fn refetch_allowed(
        &self,
        entry: &KeyEntry,
        snapshot: &Snapshot,
        request: &TokenRequest,
        now: Instant,
    ) -> Result<(), BrokerError> {
        let skew = self.config.expiry_skew;
        let pending =
            snapshot.fetching || entry.wanted.load(Ordering::Acquire) > snapshot.generation;
        let (Some(token), Some(fetched_at)) = (usable(snapshot, now, skew), snapshot.fetched_at)
        else {
            return Ok(());
        };
        let interval = MIN_VALID_FOR_REFETCH_INTERVAL;
        let retry_in = (fetched_at + interval).saturating_duration_since(now);
        if pending || retry_in.is_zero() {
            return Ok(());
        }
        self.metrics
            .cache_refused(entry.key.kind(), "min_valid_for_interval");
        Err(BrokerError::MinValidForThrottled {
            wanted: request.min_valid_for,
            remaining: token.remaining(now).saturating_sub(skew),
            retry_in,
            interval,
        })
    }

    /// Publishes the result of a fetch and returns when to refresh next
    /// (`None`: only when asked).
    fn record(
        &self,
        entry: &KeyEntry,
        result: Result<Token, FetchError>,
        backoff: &mut Backoff,
    ) -> Option<Instant> {
        let now = Instant::now();
        let skew = self.config.expiry_skew;
        match result {
            Ok(token) => {
                backoff.reset();
                let usable_for = token.remaining(now).saturating_sub(skew);
                entry.state.send_modify(|s| {
                    // The metadata server hands back the same token until
                    // shortly before expiry: keep the one readers already
                    // have, so watchers are not sent a duplicate.
                    let unchanged = s
                        .token
                        .as_ref()
                        .is_some_and(|old| old.secret() == token.secret());
                    if !unchanged {
                        s.unusable_at = token.expires_at().checked_sub(skew);
                        s.token = Some(Arc::new(token));
                    }
                    s.error = None;
                    s.generation += 1;
                    s.fetching = false;
                    s.fetched_at = Some(now);
                });
                tracing::debug!(key = ?entry.key, valid_for = ?usable_for, "token fetched");
                Some(now + refresh_delay(usable_for, self.config.refresh_margin, fastrand::f64()))
            }
            Err(error) => {
                let mut still_usable = None;
                entry.state.send_modify(|s| {
                    s.error = Some(error.clone());
                    s.generation += 1;
                    s.fetching = false;
                    s.fetched_at = Some(now);
                    still_usable = s
                        .token
                        .as_ref()
                        .map(|t| t.remaining(now).saturating_sub(skew))
                        .filter(|usable| !usable.is_zero());
                });
                tracing::warn!(
                    kind = entry.key.kind().as_str(),
                    account = %entry.key.account(),
                    error = %error,
                    serving_cached_for = ?still_usable,
                    "token fetch failed"
                );
                // Keep serving the old token and try again before it
                // expires; without one, wait until somebody asks.
                still_usable.map(|usable| {
                    let wait = backoff.next_delay(fastrand::f64()).min(usable / 2);
                    now + wait.max(schedule::MIN_RETRY_DELAY)
                })
            }
        }
    }

    /// Fetches a token for `entry`; if its published token stops being
    /// usable meanwhile, tells the watchers at that moment.
    async fn fetch_for(
        &self,
        entry: &KeyEntry,
        told: &mut Option<Instant>,
    ) -> Result<Token, FetchError> {
        let mut fetch = self.source.fetch(&entry.key);
        loop {
            let expiry_at = entry.expiry_untold(*told);
            tokio::select! {
                result = &mut fetch => return result,
                () = sleep_until(expiry_at.unwrap_or_else(Instant::now)), if expiry_at.is_some() => {
                    entry.tell_watchers_if_expired(told, Instant::now());
                }
            }
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

/// Whether two tokens are the same, in time that depends only on their
/// lengths.
fn same_secret(a: &Secret, b: &Secret) -> bool {
    use subtle::ConstantTimeEq;
    bool::from(a.expose().as_bytes().ct_eq(b.expose().as_bytes()))
}

fn usable(snapshot: &Snapshot, now: Instant, required: Duration) -> Option<Arc<Token>> {
    snapshot
        .token
        .as_ref()
        .filter(|token| token.remaining(now) > required)
        .cloned()
}

/// The life of one key: fetch when asked, refresh before expiry, retry
/// failed refreshes while the old token lasts, and leave when idle.
async fn refresh_task(cache: Weak<Inner>, entry: Arc<KeyEntry>, stop: CancellationToken) {
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
        let result = inner.fetch_for(&entry, &mut told).await;
        produced |= result.is_ok();
        if !asked {
            inner.metrics.refreshed(entry.key.kind(), result.is_ok());
        }
        refresh_at = inner.record(&entry, result, &mut backoff);
    }
}

/// Retires a key when its refresh task ends, however it ends (a panic
/// included): out of the index, waiters told to look again, counts down.
struct Retire {
    cache: Weak<Inner>,
    entry: Arc<KeyEntry>,
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
        });
        if let Some(inner) = inner {
            inner.quota.release(self.entry.owner);
            inner.live_keys.fetch_sub(1, Ordering::AcqRel);
            inner.live_by_kind[kind_index(self.entry.key.kind())].fetch_sub(1, Ordering::AcqRel);
        }
    }
}

// === impl KeyEntry ===

impl KeyEntry {
    fn new(key: TokenKey, owner: Owner, now_ms: u64) -> Arc<Self> {
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
    fn invalidation_wait(&self, now_ms: u64, interval: Duration) -> Option<Duration> {
        let last = self
            .invalidated_at_ms
            .load(Ordering::Acquire)
            .checked_sub(1)?;
        let since = Duration::from_millis(now_ms.saturating_sub(last));
        interval.checked_sub(since).filter(|wait| !wait.is_zero())
    }

    fn touch(&self, now_ms: u64) {
        self.last_used_ms.fetch_max(now_ms, Ordering::Relaxed);
    }

    fn last_used_ms(&self) -> u64 {
        self.last_used_ms.load(Ordering::Relaxed)
    }

    /// When the newest published token stops being usable, unless the
    /// watchers were already told of that moment.
    fn expiry_untold(&self, told: Option<Instant>) -> Option<Instant> {
        self.state
            .borrow()
            .unusable_at
            .filter(|at| Some(*at) != told)
    }

    /// If the newest published token has stopped being usable and the
    /// watchers were not told yet, wakes every watcher to look at its token:
    /// one without a newer one ends. However the task woke (its timer, a
    /// request, a watcher leaving), the moment is told once.
    fn tell_watchers_if_expired(&self, told: &mut Option<Instant>, now: Instant) {
        if let Some(at) = self.expiry_untold(*told).filter(|at| now >= *at) {
            *told = Some(at);
            self.state.send_modify(|_| {});
        }
    }

    /// Asks the task for generation `generation`; returns whether this call
    /// raised the demand (rather than joining one already made).
    fn want(&self, generation: u64) -> bool {
        let raised = self.wanted.fetch_max(generation, Ordering::AcqRel) < generation;
        if raised {
            // A stored permit wakes the task even if it is not waiting yet.
            self.wake.notify_one();
        }
        raised
    }
}

/// Counts a watcher on an entry for as long as it lives; the entry is not
/// dropped while watched, and its idle clock restarts when the last watcher
/// leaves.
struct WatcherGuard {
    entry: Arc<KeyEntry>,
    cache: Arc<Inner>,
}

impl WatcherGuard {
    fn new(entry: Arc<KeyEntry>, cache: Arc<Inner>) -> Self {
        entry.watchers.fetch_add(1, Ordering::AcqRel);
        Self { entry, cache }
    }
}

impl Drop for WatcherGuard {
    fn drop(&mut self) {
        self.entry.touch(self.cache.now_ms(Instant::now()));
        if self.entry.watchers.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.entry.wake.notify_one();
        }
    }
}

/// Follows one key after [`TokenCache::watch`]: yields each new token.
/// Thousands may be open, so it holds no timer of its own: the key's
/// refresh task wakes it when the newest token stops being usable.
pub struct TokenWatch {
    watcher: WatcherGuard,
    states: watch::Receiver<Snapshot>,
    current: Arc<Token>,
    /// Who watches: a new entry of the key is charged to them.
    owner: Owner,
}

impl TokenWatch {
    /// Waits for the next token of the key. Fails with
    /// [`BrokerError::Expired`] when the current token expires before a
    /// replacement arrives, and with [`BrokerError::ShuttingDown`] once
    /// `stop` is cancelled.
    pub async fn next(&mut self, stop: &CancellationToken) -> Result<Arc<Token>, BrokerError> {
        let mut lookups = 0;
        loop {
            if self.states.borrow().closed {
                lookups += 1;
                if lookups > MAX_LOOKUPS {
                    return Err(BrokerError::EntryRetired);
                }
                self.reattach()?;
                continue;
            }
            if let Some(token) = self.replacement() {
                return Ok(token);
            }
            let skew = self.watcher.cache.config.expiry_skew;
            if self.current.remaining(Instant::now()) <= skew {
                let last_error = self.states.borrow().error.clone();
                return Err(BrokerError::Expired { last_error });
            }
            tokio::select! {
                () = stop.cancelled() => return Err(BrokerError::ShuttingDown),
                changed = self.states.changed() => {
                    if changed.is_err() {
                        return Err(BrokerError::ShuttingDown);
                    }
                }
            }
        }
    }

    /// The published token, if it is usable and not the one last yielded.
    fn replacement(&mut self) -> Option<Arc<Token>> {
        let snapshot = self.states.borrow_and_update();
        let token = snapshot.token.as_ref()?;
        let fresh = !Arc::ptr_eq(token, &self.current)
            && token.remaining(Instant::now()) > self.watcher.cache.config.expiry_skew;
        fresh.then(|| {
            self.current = token.clone();
            token.clone()
        })
    }

    /// Moves to the key's new entry after the old one was dropped (possible
    /// only in the instant a watch starts on a key being evicted as idle),
    /// and asks it for a token.
    fn reattach(&mut self) -> Result<(), BrokerError> {
        let cache = self.watcher.cache.clone();
        let entry = cache.entry(&self.watcher.entry.key, self.owner)?;
        self.watcher = WatcherGuard::new(entry, cache);
        self.states = self.watcher.entry.state.subscribe();
        let generation = self.states.borrow().generation;
        self.watcher.entry.want(generation + 1);
        Ok(())
    }

    /// The key being watched.
    pub fn key(&self) -> &TokenKey {
        &self.watcher.entry.key
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::SystemTime;

    use futures_util::FutureExt;
    use futures_util::future::BoxFuture;
    use tokio::sync::Semaphore;

    use super::*;
    use crate::request::{IdTokenFormat, IdTokenKey, ServiceAccount};

    /// A source minting `token-N` with a set lifetime, optionally failing or
    /// held at a gate, and counting its fetches.
    struct FakeSource {
        fetches: AtomicUsize,
        lifetime: Mutex<Duration>,
        failure: Mutex<Option<FetchError>>,
        gate: Option<Semaphore>,
        panic_once: std::sync::atomic::AtomicBool,
    }

    impl FakeSource {
        fn new(lifetime: Duration) -> Arc<Self> {
            Arc::new(Self {
                fetches: AtomicUsize::new(0),
                lifetime: Mutex::new(lifetime),
                failure: Mutex::new(None),
                gate: None,
                panic_once: Default::default(),
            })
        }

        fn gated(lifetime: Duration) -> Arc<Self> {
            Arc::new(Self {
                gate: Some(Semaphore::new(0)),
                ..Arc::into_inner(Self::new(lifetime)).unwrap()
            })
        }

        fn fetches(&self) -> usize {
            self.fetches.load(Ordering::SeqCst)
        }

        fn fail_with(&self, error: Option<FetchError>) {
            *self.failure.lock().unwrap() = error;
        }
    }

    impl TokenSource for FakeSource {
        fn fetch<'a>(&'a self, _key: &'a TokenKey) -> BoxFuture<'a, Result<Token, FetchError>> {
            async move {
                let n = self.fetches.fetch_add(1, Ordering::SeqCst) + 1;
                if let Some(gate) = &self.gate {
                    gate.acquire().await.unwrap().forget();
                }
                if self.panic_once.swap(false, Ordering::SeqCst) {
                    panic!("source bug");
                }
                if let Some(error) = self.failure.lock().unwrap().clone() {
                    return Err(error);
                }
                let lifetime = *self.lifetime.lock().unwrap();
                Ok(Token::expiring_in(
                    Secret::new(format!("token-{n}")),
                    "Bearer".into(),
                    lifetime,
                    (Instant::now(), SystemTime::now()),
                ))
            }
            .boxed()
        }
    }

    const HOUR: Duration = Duration::from_secs(3600);
    /// The uid most tests ask as.
    const ME: Owner = Owner::Uid(1000);

    fn unavailable() -> FetchError {
        FetchError::Status {
            status: 503,
            retry_after: None,
            detail: None,
        }
    }

    fn request(audience: &str) -> TokenRequest {
        TokenRequest {
            key: TokenKey::Id(IdTokenKey {
                account: ServiceAccount::Default,
                audience: audience.into(),
                format: IdTokenFormat::Standard,
                include_licenses: false,
            }),
            min_valid_for: Duration::ZERO,
        }
    }

    /// A cache with default settings, except that keys stay for 4 hours
    /// unused, so tests can look at hour-long lifetimes.
    fn cache(source: Arc<FakeSource>) -> TokenCache {
        let config = CacheConfig {
            idle_timeout: 4 * HOUR,
            ..CacheConfig::default()
        };
        TokenCache::new(source, config, Metrics::disabled())
    }

    fn secret(served: &Served) -> &str {
        served.token.secret().expose()
    }

    /// Lets every spawned task run until all are parked: with the clock
    /// paused, time only advances once nothing else can make progress.
    async fn settle() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_misses_share_one_fetch() {
        let source = FakeSource::gated(HOUR);
        let cache = cache(source.clone());
        let waiters: Vec<_> = (0..200)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.get(&request("aud"), ME).await })
            })
            .collect();
        settle().await;
        assert_eq!(source.fetches(), 1);
        source.gate.as_ref().unwrap().add_permits(1);
        let mut outcomes = Vec::new();
        for waiter in waiters {
            let served = waiter.await.unwrap().unwrap();
            assert_eq!(secret(&served), "token-1");
            outcomes.push(served.outcome);
        }
        assert_eq!(source.fetches(), 1);
        assert_eq!(outcomes.iter().filter(|o| **o == Outcome::Miss).count(), 1);
        assert_eq!(
            outcomes
                .iter()
                .filter(|o| **o == Outcome::Coalesced)
                .count(),
            199
        );
        let hit = cache.get(&request("aud"), ME).await.unwrap();
        assert_eq!(hit.outcome, Outcome::Hit);
        assert_eq!(source.fetches(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn each_key_has_its_own_token() {
        let source = FakeSource::new(HOUR);
        let cache = cache(source.clone());
        let a = cache.get(&request("a"), ME).await.unwrap();
        let b = cache.get(&request("b"), ME).await.unwrap();
        assert_ne!(secret(&a), secret(&b));
        assert_eq!(
            secret(&cache.get(&request("a"), ME).await.unwrap()),
            secret(&a)
        );
        assert_eq!(cache.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn refreshes_before_expiry_without_being_asked() {
        let source = FakeSource::new(HOUR);
        let cache = cache(source.clone());
        let first = cache.get(&request("aud"), ME).await.unwrap();
        // Usable until an hour minus the skew; refreshed 300 to 240 s before.
        let usable = HOUR - DEFAULT_EXPIRY_SKEW;
        tokio::time::advance(usable - Duration::from_secs(301)).await;
        settle().await;
        assert_eq!(source.fetches(), 1, "refreshed earlier than the margin");
        tokio::time::advance(Duration::from_secs(62)).await;
        settle().await;
        assert_eq!(source.fetches(), 2, "not refreshed within the margin");
        let second = cache.get(&request("aud"), ME).await.unwrap();
        assert_eq!(second.outcome, Outcome::Hit);
        assert_ne!(secret(&second), secret(&first));
    }

    #[tokio::test(start_paused = true)]
    async fn failed_refresh_keeps_serving_the_valid_token() {
        let source = FakeSource::new(HOUR);
        let cache = cache(source.clone());
        let first = cache.get(&request("aud"), ME).await.unwrap();
        source.fail_with(Some(unavailable()));
        tokio::time::advance(HOUR - Duration::from_secs(200)).await;
        settle().await;
        let failed_refreshes = source.fetches() - 1;
        assert!(failed_refreshes >= 1);
        let served = cache.get(&request("aud"), ME).await.unwrap();
        assert_eq!(served.outcome, Outcome::Hit);
        assert_eq!(secret(&served), secret(&first));
        tokio::time::advance(Duration::from_secs(150)).await;
        settle().await;
        assert!(
            source.fetches() > failed_refreshes + 1,
            "no retries with backoff"
        );
        // Past expiry (minus skew) the old token is never returned.
        tokio::time::advance(Duration::from_secs(50)).await;
        let error = cache.get(&request("aud"), ME).await.unwrap_err();
        assert!(matches!(error, BrokerError::Upstream { .. }), "{error:?}");
        source.fail_with(None);
        let recovered = cache.get(&request("aud"), ME).await.unwrap();
        assert_eq!(recovered.outcome, Outcome::Miss);
        assert_ne!(secret(&recovered), secret(&first));
    }

    #[tokio::test(start_paused = true)]
    async fn errors_reach_every_waiter_and_are_not_cached() {
        let source = FakeSource::gated(HOUR);
        source.fail_with(Some(unavailable()));
        let cache = cache(source.clone());
        let waiters: Vec<_> = (0..10)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.get(&request("aud"), ME).await })
            })
            .collect();
        settle().await;
        source.gate.as_ref().unwrap().add_permits(2);
        for waiter in waiters {
            assert!(waiter.await.unwrap().is_err());
        }
        assert_eq!(source.fetches(), 1);
        source.fail_with(None);
        assert!(cache.get(&request("aud"), ME).await.is_ok());
        assert_eq!(source.fetches(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn min_valid_for_forces_one_fresh_fetch() {
        let source = FakeSource::new(Duration::from_secs(600));
        let cache = cache(source.clone());
        cache.get(&request("aud"), ME).await.unwrap();
        tokio::time::advance(Duration::from_secs(120)).await;
        let mut demanding = request("aud");
        demanding.min_valid_for = Duration::from_secs(500);
        let fresh = cache.get(&demanding, ME).await.unwrap();
        assert_eq!(fresh.outcome, Outcome::Miss);
        assert_eq!(source.fetches(), 2);
        demanding.min_valid_for = Duration::from_secs(700);
        tokio::time::advance(MIN_VALID_FOR_REFETCH_INTERVAL).await;
        let error = cache.get(&demanding, ME).await.unwrap_err();
        assert!(
            matches!(error, BrokerError::MinValidForUnmet { .. }),
            "{error:?}"
        );
        assert_eq!(source.fetches(), 3);
    }

    fn demanding(min_valid_for: Duration) -> TokenRequest {
        TokenRequest {
            min_valid_for,
            ..request("aud")
        }
    }

    #[tokio::test(start_paused = true)]
    async fn min_valid_for_refetches_are_one_at_a_time_and_one_per_interval() {
        let source = FakeSource::gated(HOUR);
        source.gate.as_ref().unwrap().add_permits(1);
        let cache = cache(source.clone());
        cache.get(&request("aud"), ME).await.unwrap();
        // Fetched just now: no refetch for a min_valid_for it cannot meet.
        let error = cache.get(&demanding(HOUR), ME).await.unwrap_err();
        assert_eq!(
            error,
            BrokerError::MinValidForThrottled {
                wanted: HOUR,
                remaining: HOUR - DEFAULT_EXPIRY_SKEW,
                retry_in: MIN_VALID_FOR_REFETCH_INTERVAL,
                interval: MIN_VALID_FOR_REFETCH_INTERVAL,
            }
        );
        assert_eq!(error.code(), tonic::Code::Unavailable);
        assert_eq!(source.fetches(), 1);
        // What the cached token meets is served as before.
        let met = cache.get(&demanding(HOUR / 2), ME).await.unwrap();
        assert_eq!(met.outcome, Outcome::Hit);

        tokio::time::advance(MIN_VALID_FOR_REFETCH_INTERVAL).await;
        let callers: Vec<_> = (0..50)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.get(&demanding(HOUR), ME).await })
            })
            .collect();
        settle().await;
        assert_eq!(source.fetches(), 2, "one refetch in flight, shared");
        assert_eq!(
            cache.get(&request("aud"), ME).await.unwrap().outcome,
            Outcome::Hit
        );
        source.gate.as_ref().unwrap().add_permits(1);
        for caller in callers {
            let error = caller.await.unwrap().unwrap_err();
            assert!(
                matches!(error, BrokerError::MinValidForUnmet { .. }),
                "{error:?}"
            );
        }
        tokio::time::advance(MIN_VALID_FOR_REFETCH_INTERVAL / 2).await;
        for _ in 0..50 {
            let error = cache.get(&demanding(HOUR), ME).await.unwrap_err();
            let BrokerError::MinValidForThrottled { retry_in, .. } = error else {
                panic!("{error:?}");
            };
            assert_eq!(retry_in, MIN_VALID_FOR_REFETCH_INTERVAL / 2);
        }
        assert_eq!(source.fetches(), 2, "no fetch within the interval");

        tokio::time::advance(MIN_VALID_FOR_REFETCH_INTERVAL / 2).await;
        source.gate.as_ref().unwrap().add_permits(1);
        let error = cache.get(&demanding(HOUR), ME).await.unwrap_err();
        assert!(
            matches!(error, BrokerError::MinValidForUnmet { .. }),
            "{error:?}"
        );
        assert_eq!(source.fetches(), 3);
    }

    fn with_quota(source: Arc<FakeSource>, max_keys_per_uid: usize) -> TokenCache {
        let config = CacheConfig {
            max_keys_per_uid,
            ..CacheConfig::default()
        };
        TokenCache::new(source, config, Metrics::disabled())
    }

    #[tokio::test(start_paused = true)]
    async fn one_uid_at_its_quota_leaves_new_keys_to_the_others() {
        let source = FakeSource::new(HOUR);
        let cache = with_quota(source.clone(), 2);
        let other = Owner::Uid(2);
        cache.get(&request("a"), ME).await.unwrap();
        cache.get(&request("b"), ME).await.unwrap();
        let error = cache.get(&request("c"), ME).await.unwrap_err();
        assert_eq!(
            error,
            BrokerError::KeyQuotaExceeded {
                uid: ME.uid(),
                limit: 2
            }
        );
        assert_eq!(error.code(), tonic::Code::ResourceExhausted);
        assert!(
            error.to_string().contains("--max-keys-per-uid 2"),
            "{error}"
        );
        assert_eq!((source.fetches(), cache.len()), (2, 2), "nothing changed");
        // Other uids, callers without a uid and the broker still get new keys.
        cache.get(&request("c"), other).await.unwrap();
        cache.get(&request("d"), Owner::Unidentified).await.unwrap();
        for audience in ["e", "f", "g"] {
            cache.get(&request(audience), Owner::Broker).await.unwrap();
        }
        assert_eq!(cache.len(), 7);
        // Keys others created are served to a uid at its quota, and stay
        // charged to their creator.
        assert!(cache.get(&request("c"), ME).await.is_ok());
        assert!(cache.get(&request("a"), other).await.is_ok());
        let held = |owner| cache.held_by(owner);
        assert_eq!(
            (held(ME), held(other), held(Owner::Unidentified)),
            (2, 1, 1)
        );
        assert_eq!(held(Owner::Broker), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_key_releases_its_charge() {
        let source = FakeSource::new(HOUR);
        let cache = with_quota(source.clone(), 1);
        cache.get(&request("a"), ME).await.unwrap();
        assert!(cache.get(&request("b"), ME).await.is_err());
        tokio::time::advance(DEFAULT_IDLE_TIMEOUT + Duration::from_secs(1)).await;
        settle().await;
        assert_eq!((cache.len(), cache.held_by(ME)), (0, 0));
        cache.get(&request("b"), ME).await.unwrap();
        assert_eq!(cache.held_by(ME), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_that_never_got_a_token_is_dropped_after_a_minute() {
        let source = FakeSource::gated(HOUR);
        source.fail_with(Some(unavailable()));
        let cache = cache(source.clone());
        let waiter = tokio::spawn({
            let cache = cache.clone();
            async move { cache.get(&request("failing"), ME).await }
        });
        settle().await;
        assert_eq!(source.fetches(), 1);
        // A request waiting keeps the key, however long the fetch takes.
        tokio::time::advance(2 * FAILED_KEY_TIMEOUT).await;
        settle().await;
        assert_eq!((cache.len(), cache.held_by(ME)), (1, 1));
        source.gate.as_ref().unwrap().add_permits(2);
        assert!(waiter.await.unwrap().is_err());
        // Its minute since the request is up: it goes as soon as it failed.
        settle().await;
        assert_eq!((cache.len(), cache.held_by(ME)), (0, 0));
        // Asked for again, it fails again and stays a minute.
        assert!(cache.get(&request("failing"), ME).await.is_err());
        tokio::time::advance(FAILED_KEY_TIMEOUT - Duration::from_millis(10)).await;
        settle().await;
        assert_eq!(cache.len(), 1);
        tokio::time::advance(Duration::from_millis(10)).await;
        settle().await;
        assert_eq!((cache.len(), cache.held_by(ME)), (0, 0));
        assert_eq!(source.fetches(), 2);
        // A key that got a token once stays for the idle timeout.
        source.fail_with(None);
        source.gate.as_ref().unwrap().add_permits(1);
        cache.get(&request("fine"), ME).await.unwrap();
        tokio::time::advance(2 * FAILED_KEY_TIMEOUT).await;
        settle().await;
        assert_eq!(cache.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn never_hands_out_a_token_inside_the_skew() {
        let source = FakeSource::new(Duration::from_secs(5));
        let cache = cache(source.clone());
        let error = cache.get(&request("aud"), ME).await.unwrap_err();
        assert!(
            matches!(error, BrokerError::MinValidForUnmet { .. }),
            "{error:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_keys_are_dropped_and_stop_refreshing() {
        let source = FakeSource::new(HOUR);
        let cache = TokenCache::new(source.clone(), CacheConfig::default(), Metrics::disabled());
        cache.get(&request("aud"), ME).await.unwrap();
        tokio::time::advance(DEFAULT_IDLE_TIMEOUT + Duration::from_secs(1)).await;
        settle().await;
        assert_eq!(cache.len(), 0);
        tokio::time::advance(4 * HOUR).await;
        settle().await;
        assert_eq!(source.fetches(), 1);
        assert_eq!(
            cache.get(&request("aud"), ME).await.unwrap().outcome,
            Outcome::Miss
        );
    }

    #[tokio::test(start_paused = true)]
    async fn watched_keys_stay_and_stream_every_refresh() {
        let source = FakeSource::new(HOUR);
        let cache = TokenCache::new(source.clone(), CacheConfig::default(), Metrics::disabled());
        let (first, mut watch) = cache.watch(&request("aud"), ME).await.unwrap();
        let (_, mut second_watch) = cache.watch(&request("aud"), ME).await.unwrap();
        let mut previous = first.token;
        for round in 2..=4 {
            let next = watch.next(&CancellationToken::new()).await.unwrap();
            assert!(next.expires_at() > previous.expires_at());
            assert!(
                Instant::now() < previous.expires_at(),
                "refresh came after expiry"
            );
            assert_eq!(
                second_watch
                    .next(&CancellationToken::new())
                    .await
                    .unwrap()
                    .secret(),
                next.secret()
            );
            assert_eq!(source.fetches(), round, "watchers do not share refreshes");
            previous = next;
        }
        assert_eq!(cache.len(), 1);
        drop((watch, second_watch));
        tokio::time::advance(DEFAULT_IDLE_TIMEOUT + Duration::from_secs(1)).await;
        settle().await;
        assert_eq!(cache.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn watch_ends_when_the_token_expires_without_replacement() {
        let source = FakeSource::new(HOUR);
        let cache = cache(source.clone());
        let (first, mut watch) = cache.watch(&request("aud"), ME).await.unwrap();
        source.fail_with(Some(unavailable()));
        let error = watch.next(&CancellationToken::new()).await.unwrap_err();
        assert!(
            matches!(
                error,
                BrokerError::Expired {
                    last_error: Some(_)
                }
            ),
            "{error:?}"
        );
        let usable_until = first.token.expires_at() - CacheConfig::default().expiry_skew;
        assert_eq!(
            Instant::now(),
            usable_until,
            "told exactly when it became unusable"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn watchers_learn_of_expiry_while_a_refresh_hangs() {
        let source = FakeSource::gated(HOUR);
        source.gate.as_ref().unwrap().add_permits(1);
        let cache = cache(source.clone());
        let (first, mut watch) = cache.watch(&request("aud"), ME).await.unwrap();
        // The refresh starts before expiry and never completes.
        let next = tokio::time::timeout(2 * HOUR, watch.next(&CancellationToken::new())).await;
        let error = next.expect("the watcher is told at expiry").unwrap_err();
        assert!(matches!(error, BrokerError::Expired { .. }), "{error:?}");
        assert_eq!(source.fetches(), 2, "the refresh was under way");
        let usable_until = first.token.expires_at() - CacheConfig::default().expiry_skew;
        assert_eq!(Instant::now(), usable_until);
    }

    #[tokio::test(start_paused = true)]
    async fn the_number_of_keys_is_bounded() {
        let source = FakeSource::new(HOUR);
        let config = CacheConfig {
            max_keys: 2,
            ..CacheConfig::default()
        };
        let cache = TokenCache::new(source, config, Metrics::disabled());
        cache.get(&request("a"), ME).await.unwrap();
        cache.get(&request("b"), ME).await.unwrap();
        let error = cache.get(&request("c"), ME).await.unwrap_err();
        assert!(matches!(error, BrokerError::LimitExceeded { limit: 2, .. }));
        assert!(cache.get(&request("a"), ME).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn caches_sharing_a_thread_never_mix_their_entries() {
        let (first_source, second_source) = (FakeSource::new(HOUR), FakeSource::new(HOUR));
        let first = cache(first_source.clone());
        let second = cache(second_source.clone());
        for _ in 0..3 {
            first.get(&request("aud"), ME).await.unwrap();
            second.get(&request("aud"), ME).await.unwrap();
        }
        assert_eq!((first_source.fetches(), second_source.fetches()), (1, 1));
        assert_eq!(first.len(), 1);
        assert_eq!(second.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_fetch_strands_no_waiter() {
        let source = FakeSource::new(HOUR);
        source.panic_once.store(true, Ordering::SeqCst);
        let cache = cache(source.clone());
        let served = cache.get(&request("aud"), ME).await.unwrap();
        assert_eq!(secret(&served), "token-2");
        assert_eq!(cache.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_cache_stops_its_tasks() {
        let source = FakeSource::new(HOUR);
        let cache = cache(source.clone());
        cache.get(&request("aud"), ME).await.unwrap();
        drop(cache);
        tokio::time::advance(3 * HOUR).await;
        settle().await;
        assert_eq!(source.fetches(), 1);
        assert_eq!(Arc::strong_count(&source), 1);
    }

    fn handed_back(served: &Served) -> Secret {
        served.token.secret().clone()
    }

    #[tokio::test(start_paused = true)]
    async fn invalidating_the_cached_token_fetches_a_new_one_once() {
        let source = FakeSource::new(HOUR);
        let cache = cache(source.clone());
        let first = cache.get(&request("aud"), ME).await.unwrap();
        let key = request("aud").key;
        assert!(cache.invalidate(&key, &handed_back(&first)).unwrap());
        let second = cache.get(&request("aud"), ME).await.unwrap();
        assert_eq!(secret(&second), "token-2");
        assert_eq!(source.fetches(), 2);
        // The old token again: the cache already moved on, nothing happens.
        assert!(!cache.invalidate(&key, &handed_back(&first)).unwrap());
        assert_eq!(
            cache.get(&request("aud"), ME).await.unwrap().outcome,
            Outcome::Hit
        );
        assert_eq!(source.fetches(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_invalidations_cause_one_fetch() {
        let source = FakeSource::gated(HOUR);
        let cache = cache(source.clone());
        let getter = tokio::spawn({
            let cache = cache.clone();
            async move { cache.get(&request("aud"), ME).await }
        });
        settle().await;
        source.gate.as_ref().unwrap().add_permits(1);
        let first = getter.await.unwrap().unwrap();
        let key = request("aud").key;
        let invalidations: Vec<_> = (0..50)
            .map(|_| {
                let (cache, key, token) = (cache.clone(), key.clone(), handed_back(&first));
                tokio::spawn(async move { cache.invalidate(&key, &token) })
            })
            .collect();
        let mut dropped = 0;
        for invalidation in invalidations {
            dropped += usize::from(invalidation.await.unwrap().unwrap());
        }
        assert_eq!(dropped, 1, "only the first invalidation drops the token");
        let waiters: Vec<_> = (0..20)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.get(&request("aud"), ME).await })
            })
            .collect();
        settle().await;
        source.gate.as_ref().unwrap().add_permits(1);
        for waiter in waiters {
            assert_eq!(secret(&waiter.await.unwrap().unwrap()), "token-2");
        }
        assert_eq!(source.fetches(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn unknown_keys_and_other_tokens_are_left_alone() {
        let source = FakeSource::new(HOUR);
        let cache = cache(source.clone());
        let key = request("aud").key;
        let stranger = Secret::new("token-1".into());
        assert!(!cache.invalidate(&key, &stranger).unwrap());
        assert_eq!(cache.len(), 0, "an invalidation never creates a key");
        cache.get(&request("aud"), ME).await.unwrap();
        assert!(
            !cache
                .invalidate(&key, &Secret::new("token-9".into()))
                .unwrap()
        );
        assert!(
            !cache
                .invalidate(&key, &Secret::new("token-".into()))
                .unwrap()
        );
        assert_eq!(
            cache.get(&request("aud"), ME).await.unwrap().outcome,
            Outcome::Hit
        );
        assert_eq!(source.fetches(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn invalidations_of_one_key_are_rate_limited() {
        let source = FakeSource::new(HOUR);
        let cache = cache(source.clone());
        let key = request("aud").key;
        let first = cache.get(&request("aud"), ME).await.unwrap();
        assert!(cache.invalidate(&key, &handed_back(&first)).unwrap());
        let second = cache.get(&request("aud"), ME).await.unwrap();
        tokio::time::advance(Duration::from_secs(10)).await;
        let error = cache.invalidate(&key, &handed_back(&second)).unwrap_err();
        assert_eq!(
            error,
            BrokerError::InvalidateThrottled {
                retry_in: Duration::from_secs(20),
                interval: DEFAULT_INVALIDATE_INTERVAL,
            }
        );
        assert_eq!(
            cache.get(&request("aud"), ME).await.unwrap().outcome,
            Outcome::Hit
        );
        // Other keys have their own allowance.
        let other = cache.get(&request("other"), ME).await.unwrap();
        assert!(
            cache
                .invalidate(&request("other").key, &handed_back(&other))
                .unwrap()
        );
        tokio::time::advance(Duration::from_secs(20)).await;
        assert!(cache.invalidate(&key, &handed_back(&second)).unwrap());
        assert_eq!(
            secret(&cache.get(&request("aud"), ME).await.unwrap()),
            "token-5"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn watchers_receive_the_token_fetched_after_an_invalidation() {
        let source = FakeSource::new(HOUR);
        let cache = cache(source.clone());
        let (first, mut watch) = cache.watch(&request("aud"), ME).await.unwrap();
        assert!(
            cache
                .invalidate(&request("aud").key, &handed_back(&first))
                .unwrap()
        );
        let next = watch.next(&CancellationToken::new()).await.unwrap();
        assert_eq!(next.secret().expose(), "token-2");
        assert_eq!(source.fetches(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn watchers_of_an_invalidated_token_end_at_its_expiry_if_no_new_one_comes() {
        let source = FakeSource::new(HOUR);
        let cache = cache(source.clone());
        let (first, mut watch) = cache.watch(&request("aud"), ME).await.unwrap();
        source.fail_with(Some(unavailable()));
        assert!(
            cache
                .invalidate(&request("aud").key, &handed_back(&first))
                .unwrap()
        );
        let next = tokio::time::timeout(2 * HOUR, watch.next(&CancellationToken::new())).await;
        let error = next.expect("the watcher is told").unwrap_err();
        assert!(matches!(error, BrokerError::Expired { .. }), "{error:?}");
        let usable_until = first.token.expires_at() - CacheConfig::default().expiry_skew;
        assert_eq!(Instant::now(), usable_until);
    }
}
