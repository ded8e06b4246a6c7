//! Places counted against a total bound and a bound per owner (a peer
//! uid): open watch streams, connections, long-polls. A place is held by a
//! [`QuotaPermit`] and freed when the permit is dropped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::BrokerError;

/// Which bound refused a place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exceeded {
    /// All this many places are taken.
    Total(usize),
    /// The owner holds this many places already.
    Owner(usize),
}

impl Exceeded {
    /// The error a caller gets (`RESOURCE_EXHAUSTED`), saying `total` or
    /// `per_uid` by which bound refused it.
    pub fn into_error(self, total: &'static str, per_uid: &'static str) -> BrokerError {
        let (what, limit) = match self {
            Self::Total(limit) => (total, limit),
            Self::Owner(limit) => (per_uid, limit),
        };
        BrokerError::LimitExceeded { what, limit }
    }
}

/// A total bound and a per-owner bound; clones share the counts.
#[derive(Clone, Debug)]
pub struct Quota {
    state: Arc<State>,
}

#[derive(Debug)]
struct State {
    max_total: usize,
    max_per_owner: usize,
    taken: Mutex<Taken>,
}

#[derive(Debug, Default)]
struct Taken {
    total: usize,
    per_owner: HashMap<u32, usize>,
}

/// One place; dropping it frees the place.
#[derive(Debug)]
pub struct QuotaPermit {
    state: Arc<State>,
    owner: Option<u32>,
}

impl Quota {
    /// At most `max_total` places, and `max_per_owner` for any one owner.
    pub fn new(max_total: usize, max_per_owner: usize) -> Self {
        Self {
            state: Arc::new(State {
                max_total,
                max_per_owner,
                taken: Mutex::new(Taken::default()),
            }),
        }
    }

    /// At most `max_total` places, owners unbounded.
    pub fn total(max_total: usize) -> Self {
        Self::new(max_total, usize::MAX)
    }

    /// Takes a place for `owner` (`None`: only the total applies).
    pub fn acquire(&self, owner: Option<u32>) -> Result<QuotaPermit, Exceeded> {
        let mut taken = self.state.taken.lock().unwrap_or_else(|e| e.into_inner());
        if taken.total >= self.state.max_total {
            return Err(Exceeded::Total(self.state.max_total));
        }
        if let Some(owner) = owner {
            let held = taken.per_owner.entry(owner).or_default();
            if *held >= self.state.max_per_owner {
                return Err(Exceeded::Owner(self.state.max_per_owner));
            }
            *held += 1;
        }
        taken.total += 1;
        Ok(QuotaPermit {
            state: self.state.clone(),
            owner,
        })
    }
}

impl Drop for QuotaPermit {
    fn drop(&mut self) {
        let mut taken = self.state.taken.lock().unwrap_or_else(|e| e.into_inner());
        taken.total -= 1;
        if let Some(owner) = self.owner
            && let Some(held) = taken.per_owner.get_mut(&owner)
        {
            *held -= 1;
            if *held == 0 {
                taken.per_owner.remove(&owner);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_count_per_owner_and_in_total() {
        let quota = Quota::new(3, 2);
        let a1 = quota.acquire(Some(1)).unwrap();
        let _a2 = quota.acquire(Some(1)).unwrap();
        assert_eq!(quota.acquire(Some(1)).err(), Some(Exceeded::Owner(2)));
        let _b1 = quota.acquire(Some(2)).unwrap();
        assert_eq!(quota.acquire(None).err(), Some(Exceeded::Total(3)));
        assert_eq!(quota.state.taken.lock().unwrap().total, 3);
        drop(a1);
        assert!(quota.acquire(Some(1)).is_ok());
    }

    #[test]
    fn an_owner_with_no_places_is_forgotten() {
        let quota = Quota::new(10, 1);
        drop(quota.acquire(Some(7)).unwrap());
        let taken = quota.state.taken.lock().unwrap();
        assert!(taken.per_owner.is_empty());
        assert_eq!(taken.total, 0);
    }
}
