//! Places counted against a total bound and a bound per owner: open watch
//! streams, connections, long-polls. An owner is a peer uid and, with
//! workload identity, also the peer's pod (the containers of many pods
//! often share one uid), each bounded alike. A place is held by a
//! [`QuotaPermit`] and freed when the permit is dropped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::BrokerError;
use crate::peer::Holder;

/// Which bound refused a place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exceeded {
    /// All this many places are taken.
    Total(usize),
    /// This holder (a uid, a pod) holds this many places already.
    Holder(Holder, usize),
}

impl Exceeded {
    /// The error a caller gets (`RESOURCE_EXHAUSTED`), saying `total`,
    /// `per_uid` or `per_pod` by which bound refused it (peers whose pod
    /// cannot be told are bounded as one uid is).
    pub fn into_error(
        self,
        total: &'static str,
        per_uid: &'static str,
        per_pod: &'static str,
    ) -> BrokerError {
        let (what, limit) = match self {
            Self::Total(limit) => (total, limit),
            Self::Holder(Holder::Uid(_) | Holder::Unknown, limit) => (per_uid, limit),
            Self::Holder(Holder::Pod(_), limit) => (per_pod, limit),
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
    per_owner: HashMap<Holder, usize>,
}

/// One place; dropping it frees the place.
#[derive(Debug)]
pub struct QuotaPermit {
    state: Arc<State>,
    holder: Option<Holder>,
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

    /// Takes a place for `holder` (`None`: only the total applies).
    pub fn acquire(&self, holder: Option<Holder>) -> Result<QuotaPermit, Exceeded> {
        let mut taken = self.state.taken.lock().unwrap_or_else(|e| e.into_inner());
        if taken.total >= self.state.max_total {
            return Err(Exceeded::Total(self.state.max_total));
        }
        if let Some(holder) = holder {
            let max = self.state.max_per_owner;
            let held = taken.per_owner.entry(holder).or_default();
            if *held >= max {
                return Err(Exceeded::Holder(holder, max));
            }
            *held += 1;
        }
        taken.total += 1;
        Ok(QuotaPermit {
            state: self.state.clone(),
            holder,
        })
    }
}

impl Drop for QuotaPermit {
    fn drop(&mut self) {
        let mut taken = self.state.taken.lock().unwrap_or_else(|e| e.into_inner());
        taken.total -= 1;
        if let Some(holder) = self.holder
            && let Some(held) = taken.per_owner.get_mut(&holder)
        {
            *held -= 1;
            if *held == 0 {
                taken.per_owner.remove(&holder);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::PodUid;

    fn uid(uid: u32) -> Option<Holder> {
        Some(Holder::Uid(uid))
    }

    #[test]
    fn places_count_per_owner_and_in_total() {
        let quota = Quota::new(3, 2);
        let a1 = quota.acquire(uid(1)).unwrap();
        let _a2 = quota.acquire(uid(1)).unwrap();
        assert_eq!(
            quota.acquire(uid(1)).err(),
            Some(Exceeded::Holder(Holder::Uid(1), 2))
        );
        let _b1 = quota.acquire(uid(2)).unwrap();
        assert_eq!(quota.acquire(None).err(), Some(Exceeded::Total(3)));
        assert_eq!(quota.state.taken.lock().unwrap().total, 3);
        drop(a1);
        assert!(quota.acquire(uid(1)).is_ok());
    }

    #[test]
    fn each_pod_has_its_own_share() {
        let pod = |n: u8| {
            let uid = format!("00000000-0000-0000-0000-0000000000{n:02}");
            Some(Holder::Pod(PodUid::parse(&uid).unwrap()))
        };
        let quota = Quota::new(100, 2);
        let a = quota.acquire(pod(1)).unwrap();
        let _a2 = quota.acquire(pod(1)).unwrap();
        let exceeded = quota.acquire(pod(1)).err().unwrap();
        assert_eq!(exceeded, Exceeded::Holder(pod(1).unwrap(), 2));
        // Another pod, whatever uid its containers run as, has its own.
        assert!(quota.acquire(pod(2)).is_ok());
        let error = exceeded.into_error("many", "many for this uid", "many for this pod");
        assert_eq!(error.to_string(), "many for this pod: the limit is 2");
        drop(a);
        assert!(quota.acquire(pod(1)).is_ok());
    }

    #[test]
    fn an_owner_with_no_places_is_forgotten() {
        let quota = Quota::new(10, 1);
        drop(quota.acquire(uid(7)).unwrap());
        let taken = quota.state.taken.lock().unwrap();
        assert!(taken.per_owner.is_empty());
        assert_eq!(taken.total, 0);
    }
}
