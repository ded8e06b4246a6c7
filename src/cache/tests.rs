//! The cache's behaviour, with paused time and fake token sources.

use std::sync::Mutex;
use std::time::SystemTime;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tokio::sync::Semaphore;

use super::*;
use crate::error::FetchError;
use crate::request::boundary::{AccessBoundary, RuleInput};
use crate::request::{AccessTokenKey, IdTokenFormat, IdTokenKey, ServiceAccount};

/// A source minting `token-N` with a set lifetime, optionally failing or
/// held at a gate, and counting its fetches.
struct FakeSource {
    fetches: AtomicUsize,
    /// Of those, the first fetches of keys that never had a token.
    first_fetches: AtomicUsize,
    lifetime: Mutex<Duration>,
    failure: Mutex<Option<FetchError>>,
    gate: Option<Semaphore>,
    panic_once: std::sync::atomic::AtomicBool,
    /// The subject token of each downscoping exchange, in order.
    exchanges: Mutex<Vec<String>>,
    /// Lifetime of downscoped tokens; `None`: as long as the source token.
    exchange_lifetime: Mutex<Option<Duration>>,
}

impl FakeSource {
    fn new(lifetime: Duration) -> Arc<Self> {
        Arc::new(Self {
            fetches: AtomicUsize::new(0),
            first_fetches: AtomicUsize::new(0),
            lifetime: Mutex::new(lifetime),
            failure: Mutex::new(None),
            gate: None,
            panic_once: Default::default(),
            exchanges: Mutex::default(),
            exchange_lifetime: Mutex::default(),
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

    fn exchanges(&self) -> Vec<String> {
        self.exchanges.lock().unwrap().clone()
    }
}

impl TokenSource for FakeSource {
    fn fetch_first<'a>(&'a self, key: &'a TokenKey) -> BoxFuture<'a, Result<Token, FetchError>> {
        self.first_fetches.fetch_add(1, Ordering::SeqCst);
        self.fetch(key)
    }

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

    fn downscope<'a>(
        &'a self,
        _boundary: &'a AccessBoundary,
        subject: &'a Token,
        _established: bool,
    ) -> BoxFuture<'a, Result<Token, FetchError>> {
        async move {
            let mut exchanges = self.exchanges.lock().unwrap();
            exchanges.push(subject.secret().expose().to_string());
            let lifetime = self
                .exchange_lifetime
                .lock()
                .unwrap()
                .unwrap_or_else(|| subject.remaining(Instant::now()));
            Ok(Token::expiring_in(
                Secret::new(format!(
                    "down-{}-of-{}",
                    exchanges.len(),
                    subject.secret().expose()
                )),
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
async fn only_keys_that_never_had_a_token_fetch_as_new_ones() {
    let source = FakeSource::new(HOUR);
    let cache = cache(source.clone());
    source.fail_with(Some(unavailable()));
    cache.get(&request("aud"), ME).await.unwrap_err();
    source.fail_with(None);
    cache.get(&request("aud"), ME).await.unwrap();
    let first_fetches = source.first_fetches.load(Ordering::SeqCst);
    assert_eq!(
        first_fetches,
        source.fetches(),
        "each until the first token"
    );
    tokio::time::advance(HOUR).await;
    settle().await;
    assert!(source.fetches() > first_fetches, "refreshed");
    assert_eq!(
        source.first_fetches.load(Ordering::SeqCst),
        first_fetches,
        "a refresh of a key in use goes before new keys"
    );
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
            creator: ME.creator(),
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
async fn a_retired_key_lets_go_of_its_token_at_once() {
    let source = FakeSource::new(HOUR);
    let cache = TokenCache::new(source.clone(), CacheConfig::default(), Metrics::disabled());
    let served = cache.get(&request("aud"), ME).await.unwrap();
    assert!(Arc::strong_count(&served.token) > 1, "the cache holds it");
    tokio::time::advance(DEFAULT_IDLE_TIMEOUT + Duration::from_secs(1)).await;
    settle().await;
    assert_eq!(cache.len(), 0);
    // The thread's memory of recent entries still holds the entry; the
    // token (a secret) must not wait for that to go.
    assert_eq!(Arc::strong_count(&served.token), 1);
}

#[tokio::test(start_paused = true)]
async fn watched_keys_stay_and_stream_every_refresh() {
    let source = FakeSource::new(HOUR);
    let cache = TokenCache::new(source.clone(), CacheConfig::default(), Metrics::disabled());
    let (first, mut watch) = cache.watch(&request("aud"), ME).await.unwrap();
    let (_, mut second_watch) = cache.watch(&request("aud"), ME).await.unwrap();
    let mut previous = first.token;
    for round in 2..=4 {
        let next = watch.next().await.unwrap();
        assert!(next.expires_at() > previous.expires_at());
        assert!(
            Instant::now() < previous.expires_at(),
            "refresh came after expiry"
        );
        assert_eq!(second_watch.next().await.unwrap().secret(), next.secret());
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
async fn ending_watches_wakes_open_ones_and_ends_later_ones() {
    let source = FakeSource::new(HOUR);
    let cache = cache(source.clone());
    let (_, mut waiting) = cache.watch(&request("a"), ME).await.unwrap();
    let (_, mut later) = cache.watch(&request("b"), ME).await.unwrap();
    let waiter = tokio::spawn(async move { waiting.next().await });
    settle().await;
    assert!(!waiter.is_finished(), "no new token yet");
    cache.end_watches();
    // Woken through its key's channel, long before the token's refresh.
    let ended = tokio::time::timeout(Duration::from_secs(1), waiter)
        .await
        .expect("the waiting watch ends at once")
        .unwrap();
    assert!(matches!(ended, Err(BrokerError::ShuttingDown)));
    assert!(matches!(later.next().await, Err(BrokerError::ShuttingDown)));
    let (_, mut opened_after) = cache.watch(&request("c"), ME).await.unwrap();
    assert!(matches!(
        opened_after.next().await,
        Err(BrokerError::ShuttingDown)
    ));
    assert_eq!(source.fetches(), 3, "ending watches fetches nothing");
}

#[tokio::test(start_paused = true)]
async fn watch_ends_when_the_token_expires_without_replacement() {
    let source = FakeSource::new(HOUR);
    let cache = cache(source.clone());
    let (first, mut watch) = cache.watch(&request("aud"), ME).await.unwrap();
    source.fail_with(Some(unavailable()));
    let error = watch.next().await.unwrap_err();
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
    let next = tokio::time::timeout(2 * HOUR, watch.next()).await;
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
    let next = watch.next().await.unwrap();
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
    let next = tokio::time::timeout(2 * HOUR, watch.next()).await;
    let error = next.expect("the watcher is told").unwrap_err();
    assert!(matches!(error, BrokerError::Expired { .. }), "{error:?}");
    let usable_until = first.token.expires_at() - CacheConfig::default().expiry_skew;
    assert_eq!(Instant::now(), usable_until);
}

/// An access-token request limited to read `bucket`.
fn downscoped(bucket: &str) -> TokenRequest {
    let boundary = AccessBoundary::new(
        "access_boundary",
        vec![RuleInput {
            resource: format!("//storage.googleapis.com/projects/_/buckets/{bucket}"),
            permissions: vec!["inRole:roles/storage.objectViewer".into()],
            condition: None,
        }],
    )
    .unwrap();
    TokenRequest {
        key: TokenKey::Access(AccessTokenKey {
            account: ServiceAccount::Default,
            scopes: vec![],
        }),
        min_valid_for: Duration::ZERO,
    }
    .with_boundary(Some(boundary))
}

#[tokio::test(start_paused = true)]
async fn downscoped_keys_share_one_source_token_and_one_exchange_per_boundary() {
    let source = FakeSource::new(HOUR);
    let cache = cache(source.clone());
    let asks: Vec<_> = (0..50)
        .map(|i| {
            let cache = cache.clone();
            let bucket = if i % 2 == 0 { "a" } else { "b" };
            tokio::spawn(async move { cache.get(&downscoped(bucket), ME).await })
        })
        .collect();
    for ask in asks {
        let served = ask.await.unwrap().unwrap();
        assert!(secret(&served).starts_with("down-"), "{}", secret(&served));
        assert!(secret(&served).ends_with("-of-token-1"));
    }
    assert_eq!(source.fetches(), 1, "one source token for both boundaries");
    assert_eq!(
        source.exchanges(),
        ["token-1", "token-1"],
        "one exchange per boundary"
    );
}

#[tokio::test(start_paused = true)]
async fn a_refreshed_source_token_is_exchanged_again_and_watchers_get_it() {
    let source = FakeSource::new(HOUR);
    let cache = cache(source.clone());
    let (first, mut watch) = cache.watch(&downscoped("a"), ME).await.unwrap();
    assert_eq!(secret(&first), "down-1-of-token-1");
    let next = tokio::time::timeout(HOUR, watch.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(next.secret().expose(), "down-2-of-token-2");
    assert_eq!(source.fetches(), 2);
    assert_eq!(
        source.exchanges(),
        ["token-1", "token-2"],
        "exchanged once per source token, not also on its own timer"
    );
    let left = first.token.remaining(Instant::now());
    assert!(
        left > Duration::from_secs(200),
        "replaced when the source was refreshed ({left:?} before expiry), not at the end"
    );
}

#[tokio::test(start_paused = true)]
async fn a_downscoped_token_never_outlives_its_source() {
    let source = FakeSource::new(HOUR);
    *source.exchange_lifetime.lock().unwrap() = Some(2 * HOUR);
    let cache = cache(source.clone());
    let plain = TokenRequest {
        key: downscoped("a").key.source_key().into_owned(),
        min_valid_for: Duration::ZERO,
    };
    let plain = cache.get(&plain, ME).await.unwrap();
    let limited = cache.get(&downscoped("a"), ME).await.unwrap();
    assert_eq!(limited.token.expires_at(), plain.token.expires_at());
    assert_eq!(limited.token.expire_time(), plain.token.expire_time());
}

#[tokio::test(start_paused = true)]
async fn a_shorter_sts_lifetime_is_refreshed_on_its_own() {
    let source = FakeSource::new(HOUR);
    *source.exchange_lifetime.lock().unwrap() = Some(Duration::from_secs(600));
    let cache = cache(source.clone());
    let (_, mut watch) = cache.watch(&downscoped("a"), ME).await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(600), watch.next());
    assert_eq!(
        next.await.unwrap().unwrap().secret().expose(),
        "down-2-of-token-1"
    );
    assert_eq!(source.fetches(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_downscoped_key_keeps_its_source_key_and_charges_both_to_its_owner() {
    let source = FakeSource::new(HOUR);
    let cache = cache(source.clone());
    cache.get(&downscoped("a"), ME).await.unwrap();
    assert_eq!(cache.held_by(ME), 2);
    assert_eq!(cache.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_downscoped_key_keeps_its_source_refreshed_while_it_lives() {
    let source = FakeSource::new(HOUR);
    let config = CacheConfig {
        idle_timeout: Duration::from_secs(600),
        ..CacheConfig::default()
    };
    let cache = TokenCache::new(source.clone(), config, Metrics::disabled());
    for _ in 0..4 {
        // Only the downscoped key is asked for (hits); its source key is
        // never touched by a caller, yet stays.
        cache.get(&downscoped("a"), ME).await.unwrap();
        tokio::time::advance(Duration::from_secs(500)).await;
        settle().await;
    }
    assert_eq!(cache.len(), 2, "the source key outlived its idle timeout");
    assert_eq!(source.fetches(), 1);
    // Once the downscoped key goes idle, so does its source (an idle
    // timeout after the link let go of it).
    tokio::time::advance(Duration::from_secs(700)).await;
    settle().await;
    assert_eq!(cache.len(), 1, "the downscoped key went idle");
    tokio::time::advance(Duration::from_secs(700)).await;
    settle().await;
    assert_eq!(cache.len(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_downscoped_key_over_quota_is_refused_as_a_quota() {
    let source = FakeSource::new(HOUR);
    let config = CacheConfig {
        max_keys_per_uid: 1,
        ..CacheConfig::default()
    };
    let cache = TokenCache::new(source.clone(), config, Metrics::disabled());
    let error = cache.get(&downscoped("a"), ME).await.unwrap_err();
    assert!(
        matches!(error, BrokerError::KeyQuotaExceeded { .. }),
        "{error:?}"
    );
    assert!(source.exchanges().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_failing_source_refresh_costs_at_most_one_more_exchange() {
    let source = FakeSource::new(HOUR);
    let cache = cache(source.clone());
    let (_, mut watch) = cache.watch(&downscoped("a"), ME).await.unwrap();
    source.fail_with(Some(unavailable()));
    let ended = tokio::time::timeout(2 * HOUR, watch.next()).await.unwrap();
    let mut exchanged = source.exchanges();
    // The watcher may get the one extra exchange of the same source token
    // before the end; never more.
    if let Ok(token) = ended {
        assert_eq!(token.secret().expose(), "down-2-of-token-1");
        assert!(watch.next().await.is_err());
    }
    exchanged.dedup();
    assert_eq!(exchanged, ["token-1"]);
    assert!(source.exchanges().len() <= 2, "{:?}", source.exchanges());
}
