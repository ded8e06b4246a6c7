//! Per-uid key quotas: whom each cached key is charged to, and how many
//! keys each may hold, so that no local process can fill the cache alone.
//!
//! A key is charged to the owner whose request created it, for as long as
//! the key lives, whoever uses it later; the charge is released when the
//! key is dropped. Peers on a Unix socket are charged by uid; callers
//! without one (the metadata endpoint on loopback TCP, a socket without
//! credentials) share one bucket with the same quota; the broker's own file
//! sinks are charged to nobody.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::peer::PodUid;

/// Least time between two warnings about one owner's refused keys (1 minute).
pub const WARN_INTERVAL: Duration = Duration::from_secs(60);

/// Whom a key is charged to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Owner {
    /// A peer on a Unix socket, by uid.
    Uid(u32),
    /// With workload identity, a peer in a pod, by the pod.
    Pod(PodUid),
    /// Every caller without a uid, together.
    Unidentified,
    /// The broker itself (file sinks): charged to nobody.
    Broker,
}

impl Owner {
    /// The owner in words (`uid 1000`, `pod <uid>`), for one that is a
    /// peer.
    pub fn creator(self) -> Option<String> {
        match self {
            Self::Uid(_) | Self::Pod(_) => Some(self.to_string()),
            Self::Unidentified | Self::Broker => None,
        }
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Uid(uid) => write!(f, "uid {uid}"),
            Self::Pod(pod) => write!(f, "pod {pod}"),
            Self::Unidentified => f.write_str("callers without a uid"),
            Self::Broker => f.write_str("the broker"),
        }
    }
}

/// Counts keys per owner against one quota per owner.
pub struct KeyQuota {
    max_per_owner: usize,
    held: Mutex<HashMap<Owner, Held>>,
}

/// One owner's keys, and its refusals since the last warning.
#[derive(Default)]
struct Held {
    keys: usize,
    refused: u64,
    warned_at: Option<Instant>,
}

/// An owner was refused a key.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused {
    /// Refusals of this owner to report in a warning now (this one
    /// included), or `None`: a warning was logged less than
    /// [`WARN_INTERVAL`] ago.
    pub warn: Option<u64>,
}

impl KeyQuota {
    /// A quota of `max_per_owner` keys for each owner but the broker.
    pub fn new(max_per_owner: usize) -> Self {
        Self {
            max_per_owner,
            held: Mutex::new(HashMap::new()),
        }
    }

    /// The quota of each owner.
    pub fn limit(&self) -> usize {
        self.max_per_owner
    }

    /// Charges one key to `owner`, unless it holds its quota already.
    pub fn charge(&self, owner: Owner) -> Result<(), Refused> {
        if owner == Owner::Broker {
            return Ok(());
        }
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let entry = held.entry(owner).or_default();
        if entry.keys < self.max_per_owner {
            entry.keys += 1;
            return Ok(());
        }
        entry.refused += 1;
        let now = Instant::now();
        if entry
            .warned_at
            .is_some_and(|at| now.duration_since(at) < WARN_INTERVAL)
        {
            return Err(Refused { warn: None });
        }
        entry.warned_at = Some(now);
        Err(Refused {
            warn: Some(std::mem::take(&mut entry.refused)),
        })
    }

    /// Releases one key charged to `owner`.
    pub fn release(&self, owner: Owner) {
        if owner == Owner::Broker {
            return;
        }
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = held.get_mut(&owner) {
            entry.keys = entry.keys.saturating_sub(1);
            // An owner holding nothing is forgotten (its warning clock too),
            // so the map holds only owners with keys.
            if entry.keys == 0 {
                held.remove(&owner);
            }
        }
    }

    /// How many keys are charged to `owner` (always 0 for the broker).
    #[cfg(test)]
    pub fn held_by(&self, owner: Owner) -> usize {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.get(&owner).map_or(0, |entry| entry.keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_owner_has_its_own_quota() {
        let quota = KeyQuota::new(2);
        assert!(quota.charge(Owner::Uid(1)).is_ok());
        assert!(quota.charge(Owner::Uid(1)).is_ok());
        assert!(quota.charge(Owner::Uid(1)).is_err());
        assert!(quota.charge(Owner::Uid(2)).is_ok());
        assert!(quota.charge(Owner::Unidentified).is_ok());
        for _ in 0..10 {
            assert!(quota.charge(Owner::Broker).is_ok());
        }
        assert_eq!(quota.held_by(Owner::Broker), 0);
        quota.release(Owner::Uid(1));
        assert_eq!(quota.held_by(Owner::Uid(1)), 1);
        assert!(quota.charge(Owner::Uid(1)).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_are_warned_of_once_a_minute_with_a_count() {
        let quota = KeyQuota::new(1);
        quota.charge(Owner::Uid(7)).unwrap();
        assert_eq!(quota.charge(Owner::Uid(7)), Err(Refused { warn: Some(1) }));
        for _ in 0..5 {
            assert_eq!(quota.charge(Owner::Uid(7)), Err(Refused { warn: None }));
        }
        tokio::time::advance(WARN_INTERVAL).await;
        assert_eq!(quota.charge(Owner::Uid(7)), Err(Refused { warn: Some(6) }));
    }
}
