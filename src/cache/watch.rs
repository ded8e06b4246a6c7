//! Following one key after [`TokenCache::watch`](super::TokenCache::watch):
//! each new token, and the end when none replaces an expired one.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::cache::quota::Owner;
use crate::error::BrokerError;
use crate::request::TokenKey;
use crate::token::Token;

use super::entry::{KeyEntry, Snapshot};
use super::{Inner, MAX_LOOKUPS};

/// Counts a watcher on an entry for as long as it lives; the entry is not
/// dropped while watched, and its idle clock restarts when the last watcher
/// leaves.
pub(super) struct WatcherGuard {
    pub(super) entry: Arc<KeyEntry>,
    pub(super) cache: Arc<Inner>,
}

impl WatcherGuard {
    pub(super) fn new(entry: Arc<KeyEntry>, cache: Arc<Inner>) -> Self {
        entry.watchers.fetch_add(1, Ordering::AcqRel);
        Self { entry, cache }
    }
}

impl Drop for WatcherGuard {
    fn drop(&mut self) {
        self.entry.unwatch(self.cache.now_ms(Instant::now()));
    }
}

/// Follows one key after [`TokenCache::watch`]: yields each new token.
/// Thousands may be open, so it holds no timer of its own: the key's
/// refresh task wakes it when the newest token stops being usable.
pub struct TokenWatch {
    pub(super) watcher: WatcherGuard,
    pub(super) states: watch::Receiver<Snapshot>,
    pub(super) current: Arc<Token>,
    /// Who watches: a new entry of the key is charged to them.
    pub(super) owner: Owner,
}

impl TokenWatch {
    /// Waits for the next token of the key. Fails with
    /// [`BrokerError::Expired`] when the current token expires before a
    /// replacement arrives, and with [`BrokerError::ShuttingDown`] once
    /// the cache ends its watches ([`TokenCache::end_watches`]).
    ///
    /// Thousands of these wait at once, so the future is kept small: it
    /// waits on the key's channel alone.
    pub async fn next(&mut self) -> Result<Arc<Token>, BrokerError> {
        let mut lookups = 0;
        loop {
            if self.watcher.cache.watches_ended.load(Ordering::Acquire) {
                return Err(BrokerError::ShuttingDown);
            }
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
            if self.states.changed().await.is_err() {
                return Err(BrokerError::ShuttingDown);
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
