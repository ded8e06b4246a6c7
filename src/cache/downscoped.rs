//! Downscoped keys: each token is exchanged from the cached token of the
//! key's source key, so every downscoped key of one account and scope set
//! shares one source token. The key's refresh task stays tied to the
//! source entry ([`SourceLink`]): it watches it, which keeps it refreshed
//! and never idle while the downscoped key lives, and exchanges again as
//! soon as the source token is replaced. A downscoped token never
//! outlives the token it was exchanged from.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::error::{BrokerError, FetchError};
use crate::request::{DownscopedKey, TokenKey, TokenRequest};
use crate::token::Token;

use super::entry::{KeyEntry, Snapshot};
use super::watch::WatcherGuard;
use super::{Inner, MAX_LOOKUPS};

/// A downscoped key's tie to its source key's entry.
pub(super) struct SourceLink {
    /// Keeps the source entry watched: refreshed, and never idle.
    _watcher: WatcherGuard,
    states: watch::Receiver<Snapshot>,
    /// The source token the current downscoped token was exchanged from.
    exchanged_from: Arc<Token>,
}

impl SourceLink {
    /// Whether `token` lives exactly as long as the source token it came
    /// from: then the source's refresh, not the token's own expiry, is
    /// what replaces it.
    pub(super) fn bounds(&self, token: &Token) -> bool {
        token.expires_at() >= self.exchanged_from.expires_at()
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
            let watcher = WatcherGuard::new(source, self.clone());
            let states = watcher.entry.state.subscribe();
            if let Some(served) = self
                .serve(&watcher.entry, &request)
                .await
                .map_err(source_failed)?
            {
                return Ok(SourceLink {
                    _watcher: watcher,
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
