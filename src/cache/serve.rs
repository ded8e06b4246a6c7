//! How one request is served from its key's entry: the usable token at
//! once, or one fetch shared by every waiter (a refetch for `min_valid_for`
//! at most once per [`MIN_VALID_FOR_REFETCH_INTERVAL`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::{Instant, sleep_until};

use crate::error::BrokerError;
use crate::error::FetchError;
use crate::request::{TokenKey, TokenRequest};
use crate::schedule::{self, Backoff, refresh_delay};
use crate::telemetry::metrics::Outcome;
use crate::token::Token;

use super::downscoped::SourceLink;
use super::entry::{KeyEntry, Snapshot, usable};
use super::{Inner, MIN_VALID_FOR_REFETCH_INTERVAL, Served};

impl Inner {
    /// Serves `request` from `entry`, waiting for a fetch if needed.
    /// `Ok(None)` means the entry was dropped meanwhile: look it up again.
    pub(super) async fn serve(
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
    pub(super) fn refetch_allowed(
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
    pub(super) fn record(
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

    /// Fetches a token for `entry` (as a first fetch unless the key is
    /// `established`, i.e. once had a token; a downscoped key's by
    /// exchange, tied to its source through `link`); if its published
    /// token stops being usable meanwhile, tells the watchers at that
    /// moment.
    pub(super) async fn fetch_for(
        self: &Arc<Self>,
        entry: &KeyEntry,
        told: &mut Option<Instant>,
        established: bool,
        link: &mut Option<SourceLink>,
    ) -> Result<Token, FetchError> {
        let mut fetch = match &entry.key {
            TokenKey::Downscoped(key) => Box::pin(self.exchange_for(entry, key, link, established)),
            key if established => self.source.fetch(key),
            key => self.source.fetch_first(key),
        };
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
}
