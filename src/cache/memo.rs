//! A per-thread memory of recently looked-up entries in front of moka:
//! moka records every read for its eviction policy and applies the records
//! in batches on the reading thread, which showed on the hit path; the
//! broker evicts keys itself, so those reads need not be recorded.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use crate::request::TokenKey;

use super::{Inner, KeyEntry};

/// Most entries a worker thread remembers in front of the index.
const RECENT_PER_THREAD: usize = 1024;

thread_local! {
    /// Entries this thread looked up lately, for [`Inner::recent`]. Retired
    /// entries are noticed (they are closed) and forgotten on use.
    static RECENT: RefCell<Recent> = RefCell::new(Recent::default());
}

#[derive(Default)]
pub(super) struct Recent {
    /// The cache (its `Inner`'s address) the entries belong to.
    pub(super) cache: usize,
    pub(super) entries: HashMap<TokenKey, Arc<KeyEntry>>,
}

impl Inner {
    /// The key's entry if this thread looked it up recently and it is still
    /// live. moka records every read for its eviction policy and applies
    /// the records in batches on the reading thread, which showed as a
    /// higher median latency under load; the broker evicts by itself, so
    /// hits are served from this per-thread memory instead.
    pub(super) fn recent(&self, key: &TokenKey) -> Option<Arc<KeyEntry>> {
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

    pub(super) fn remember(&self, key: &TokenKey, entry: &Arc<KeyEntry>) {
        let cache = std::ptr::from_ref(self) as usize;
        RECENT.with_borrow_mut(|recent| {
            if recent.cache != cache || recent.entries.len() >= RECENT_PER_THREAD {
                recent.cache = cache;
                recent.entries.clear();
            }
            recent.entries.insert(key.clone(), entry.clone());
        });
    }
}
