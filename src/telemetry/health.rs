//! Whether the broker can hand out tokens. It is SERVING once the token
//! source (metadata server, OAuth endpoint, IAM Credentials API) has
//! answered, and NOT_SERVING while it cannot be reached and no cached token
//! is usable, and for good once the broker drains. The state feeds gRPC
//! health and `/readyz`.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::error::FetchError;
use crate::schedule::Backoff;

/// First wait between probes of an unreachable metadata server (500 ms).
pub const PROBE_INITIAL: Duration = Duration::from_millis(500);
/// Longest wait between probes of an unreachable metadata server (5 s).
pub const PROBE_MAX: Duration = Duration::from_secs(5);

/// The outcome of the latest contact with the metadata server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Contact {
    /// Not tried yet.
    Unknown,
    /// It answered.
    Reached,
    /// No connection, no answer in time, or a 5xx.
    Unreachable,
}

/// Shared health state. Cloning is cheap; all clones see the same state.
#[derive(Clone)]
pub struct Health {
    contact: watch::Sender<Contact>,
    serving: watch::Sender<bool>,
    draining: Arc<AtomicBool>,
    /// With workload identity: whether the node's pods have been read once.
    pods_known: watch::Sender<bool>,
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    /// Not serving until the metadata server has answered once.
    pub fn new() -> Self {
        Self {
            contact: watch::Sender::new(Contact::Unknown),
            serving: watch::Sender::new(false),
            draining: Arc::new(AtomicBool::new(false)),
            pods_known: watch::Sender::new(true),
        }
    }

    /// The broker is draining: NOT_SERVING from now on.
    pub fn drain(&self) {
        // Under the channel's lock, so a monitor's update cannot undo it.
        self.serving.send_if_modified(|serving| {
            self.draining.store(true, Ordering::Release);
            std::mem::replace(serving, false)
        });
    }

    /// Sets the serving state, unless the broker drains; says whether it
    /// changed.
    fn set_serving(&self, serving: bool) -> bool {
        self.serving.send_if_modified(|current| {
            let serving = serving && !self.draining.load(Ordering::Acquire);
            std::mem::replace(current, serving) != serving
        })
    }

    /// Notes the outcome of a request to the metadata server.
    pub fn record<T>(&self, result: &Result<T, FetchError>) {
        let contact = match result {
            Err(error) if error.is_unreachable() => Contact::Unreachable,
            _ => Contact::Reached,
        };
        self.contact.send_if_modified(|current| {
            let changed = *current != contact;
            *current = contact;
            changed
        });
    }

    /// Makes serving wait until the node's pods have been read once from
    /// the Kubernetes API server (workload identity): whoever reads them
    /// sets the returned flag.
    pub fn require_pods(&self) -> watch::Sender<bool> {
        self.pods_known.send_replace(false);
        self.pods_known.clone()
    }

    /// Whether the broker is serving now.
    pub fn is_serving(&self) -> bool {
        *self.serving.borrow()
    }

    /// Follows the serving state.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.serving.subscribe()
    }

    /// Keeps the serving state current until `stop`: recomputes it after
    /// every change of contact, and while the metadata server is not known
    /// to answer, probes it with `probe` (backing off to [`PROBE_MAX`]) and
    /// notices, through `has_usable_token`, when the last cached token
    /// expires.
    pub async fn monitor<F, Fut>(
        self,
        has_usable_token: impl Fn() -> bool,
        probe: F,
        stop: CancellationToken,
    ) where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<(), FetchError>>,
    {
        let mut contact = self.contact.subscribe();
        let mut pods_known = self.pods_known.subscribe();
        let mut backoff = Backoff::new(PROBE_INITIAL, PROBE_MAX);
        loop {
            let current = *contact.borrow_and_update();
            let pods = *pods_known.borrow_and_update();
            let serving = (current == Contact::Reached || has_usable_token()) && pods;
            if self.set_serving(serving) {
                tracing::info!(serving, ?current, pods_known = pods, "health changed");
            }
            if current == Contact::Reached {
                backoff.reset();
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = contact.changed() => continue,
                    _ = pods_known.changed() => continue,
                }
            }
            let probed = probe().await;
            if let Err(error) = &probed {
                tracing::debug!(%error, "token source probe failed");
            }
            self.record(&probed);
            if probed.is_ok() {
                continue;
            }
            tokio::select! {
                () = stop.cancelled() => return,
                _ = contact.changed() => {}
                _ = pods_known.changed() => {}
                () = tokio::time::sleep(backoff.next_delay(fastrand::f64())) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn serving_follows_reachability_and_probes_recover_it() {
        let health = Health::new();
        let up = Arc::new(AtomicBool::new(false));
        let probes = Arc::new(AtomicUsize::new(0));
        let probe = {
            let (up, probes) = (up.clone(), probes.clone());
            move || {
                let reachable = up.load(Ordering::SeqCst);
                probes.fetch_add(1, Ordering::SeqCst);
                async move {
                    if reachable {
                        Ok(())
                    } else {
                        Err(FetchError::Connect("refused".into()))
                    }
                }
            }
        };
        let stop = CancellationToken::new();
        // No token is cached: serving follows reachability alone.
        tokio::spawn(health.clone().monitor(|| false, probe, stop.clone()));
        let mut serving = health.subscribe();

        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(!health.is_serving());
        assert!(
            probes.load(Ordering::SeqCst) >= 6,
            "keeps probing while down"
        );

        up.store(true, Ordering::SeqCst);
        serving.wait_for(|s| *s).await.unwrap();

        // A fetch that cannot connect, with nothing cached: not serving.
        health.record::<()>(&Err(FetchError::Connect("refused".into())));
        up.store(false, Ordering::SeqCst);
        serving.wait_for(|s| !*s).await.unwrap();

        // A 404 is an answer: the server is reachable.
        health.record::<()>(&Err(FetchError::Status {
            status: 404,
            retry_after: None,
            detail: None,
        }));
        serving.wait_for(|s| *s).await.unwrap();
        stop.cancel();
    }
}
