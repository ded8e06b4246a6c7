//! Downscoped keys: each token is exchanged from the cached token of the
//! key's source key, so every downscoped key of one account and scope set
//! shares one source token. The key's refresh task stays tied to the
//! source entry ([`SourceLink`]): it watches it, which keeps it refreshed
//! and never idle while the downscoped key lives, and exchanges again as
//! soon as the source token is replaced. A downscoped token never
//! outlives the token it was exchanged from.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::{BrokerError, FetchError};
use crate::request::{DownscopedKey, TokenKey, TokenRequest};
use crate::token::Token;

use super::entry::{KeyEntry, Snapshot};
use super::{Inner, MAX_LOOKUPS};

/// A downscoped key's tie to its source key's entry. It counts as a
/// watcher of the source entry (so that entry is refreshed and never idle
/// while the downscoped key lives), but holds the cache only weakly: the
/// refresh tasks that own links must not keep the cache alive.
pub(super) struct SourceLink {
    _watching: Watching,
    states: watch::Receiver<Snapshot>,
    /// The source token the current downscoped token was exchanged from.
    exchanged_from: Arc<Token>,
}

/// Counts as a watcher of an entry while it lives.
struct Watching {
    entry: Arc<KeyEntry>,
    /// The cache's epoch, for the entry's idle clock when this goes.
    epoch: Instant,
}

impl Watching {
    fn new(entry: Arc<KeyEntry>, epoch: Instant) -> Self {
        entry.watchers.fetch_add(1, Ordering::AcqRel);
        Self { entry, epoch }
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        let since_epoch = Instant::now().saturating_duration_since(self.epoch);
        self.entry
            .unwatch(u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX));
    }
}

impl SourceLink {
    /// Whether the source token is still the one `before` named.
    pub(super) fn same_source(&self, before: Option<&Arc<Token>>) -> bool {
        before.is_some_and(|before| Arc::ptr_eq(before, &self.exchanged_from))
    }

    /// The source token the current downscoped token came from.
    pub(super) fn exchanged_from(&self) -> &Arc<Token> {
        &self.exchanged_from
    }

    /// Whether `token` lives as long as the source token it came from:
    /// then the source's refresh, not the token's own expiry, is what
    /// replaces it.
    pub(super) fn bounds(&self, token: &Token) -> bool {
        ends_with(token.expires_at(), self.exchanged_from.expires_at())
    }
}

impl Inner {
    /// Exchanges the source key's token (fetched if needed, charged to
    /// the downscoped key's owner) for one limited to `key`'s boundary,
    /// and ties the entry to the source entry through `link`.
    pub(super) async fn exchange_for(
        self: &Arc<Self>,
        entry: &KeyEntry,
        key: &DownscopedKey,
        link: &mut Option<SourceLink>,
        established: bool,
    ) -> Result<Token, FetchError> {
        // A link to a retired entry would wake the task at once, again
        // and again: without a source token, there is none.
        *link = None;
        let source = self.source_token(entry, key).await?;
        let subject = source.exchanged_from.clone();
        *link = Some(source);
        self.source
            .downscope(&key.boundary, &subject, established)
            .await
            .map(|token| token.no_later_than(&subject))
    }

    /// The source key's usable token, with a link to its entry.
    async fn source_token(
        self: &Arc<Self>,
        entry: &KeyEntry,
        key: &DownscopedKey,
    ) -> Result<SourceLink, FetchError> {
        let request = TokenRequest {
            key: TokenKey::Access(key.source.clone()),
            min_valid_for: Duration::ZERO,
        };
        for _ in 0..MAX_LOOKUPS {
            let source = self
                .entry(&request.key, entry.owner)
                .map_err(source_failed)?;
            // Watched before it is served, so it cannot go idle between.
            let watching = Watching::new(source, self.epoch);
            let states = watching.entry.state.subscribe();
            if let Some(served) = self
                .serve(&watching.entry, &request)
                .await
                .map_err(source_failed)?
            {
                return Ok(SourceLink {
                    _watching: watching,
                    states,
                    exchanged_from: served.token,
                });
            }
        }
        Err(source_failed(BrokerError::EntryRetired))
    }
}

/// Why there is no source token, as the downscoped key's fetch error.
fn source_failed(error: BrokerError) -> FetchError {
    match error {
        BrokerError::Upstream { source, .. } => source,
        other => FetchError::SourceToken(other.to_string()),
    }
}

/// How much earlier than its source token a downscoped token may end and
/// still count as ending with it (5 s): STS says `expires_in` in whole
/// seconds of the subject's remaining life, counted here from before the
/// request was sent, so the same end comes back up to a second and a round
/// trip early. Counted as its own end instead, it would be refreshed on
/// its own timer, in a race with the source's refresh: an exchange of the
/// old source token for a token no longer-lived than the one it replaces.
const SAME_END_SLACK: Duration = Duration::from_secs(5);

/// Whether a token ending at `end` ends with its source, ending at
/// `source_end`.
fn ends_with(end: Instant, source_end: Instant) -> bool {
    end + SAME_END_SLACK >= source_end
}

/// Waits until the source token the link's downscoped token came from is
/// replaced (or the source entry is retired); never, without a link.
pub(super) async fn source_replaced(link: Option<&mut SourceLink>) {
    let Some(link) = link else {
        return std::future::pending().await;
    };
    loop {
        {
            let snapshot = link.states.borrow_and_update();
            let replaced = snapshot
                .token
                .as_ref()
                .is_some_and(|token| !Arc::ptr_eq(token, &link.exchanged_from));
            if snapshot.closed || replaced {
                return;
            }
        }
        if link.states.changed().await.is_err() {
            return;
        }
    }
}

/// When a downscoped token that its source token bounds is refreshed on
/// its own: late, after the source's refresh (which replaces it first)
/// should have come; only if that never came.
pub(super) fn fallback_refresh(usable_for: Duration, margin: Duration) -> Duration {
    usable_for.saturating_sub((usable_for / 10).min(margin / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_ending_within_seconds_of_its_source_ends_with_it() {
        let source_end = Instant::now() + Duration::from_secs(3600);
        // STS's whole seconds, and the round trip, make it a little early.
        for early in [0, 1, 5] {
            let end = source_end - Duration::from_secs(early);
            assert!(ends_with(end, source_end), "{early} s early");
        }
        // A shorter STS lifetime is its own.
        assert!(!ends_with(source_end - Duration::from_secs(6), source_end));
        assert!(!ends_with(
            source_end - Duration::from_secs(600),
            source_end
        ));
    }

    #[test]
    fn the_fallback_comes_after_the_source_refreshes() {
        let margin = Duration::from_secs(300);
        // An hour-long token: the source refreshes 300 to 240 s before
        // expiry; the fallback leaves 150 s.
        assert_eq!(
            fallback_refresh(Duration::from_secs(3590), margin),
            Duration::from_secs(3440)
        );
        // A short token: the source refreshes at half its life at most.
        assert_eq!(
            fallback_refresh(Duration::from_secs(20), margin),
            Duration::from_secs(18)
        );
    }
}
