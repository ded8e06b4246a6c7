//! When to refresh a token and how long to wait after a failure: pure
//! functions of durations and a jitter value, so they are tested exactly.

use std::time::Duration;

/// Default refresh margin (5 minutes): tokens are refreshed between 5 and 4
/// minutes before they expire, when the metadata server's own cache has a
/// new token ready.
pub const DEFAULT_REFRESH_MARGIN: Duration = Duration::from_secs(300);
/// Share of the margin (or of half a short lifetime) spread by jitter, so
/// that keys fetched together do not refresh together.
pub const JITTER_SHARE: f64 = 0.2;
/// Shortest wait before a refresh, so an upstream that keeps returning
/// nearly-expired tokens is not polled in a tight loop (1 s).
pub const MIN_REFRESH_DELAY: Duration = Duration::from_secs(1);
/// First wait after a failed refresh (1 s), doubled per failure.
pub const DEFAULT_RETRY_INITIAL: Duration = Duration::from_secs(1);
/// Longest wait after failed refreshes (60 s).
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(60);
/// Shortest wait after a failure (50 ms), whatever the jitter draws.
pub const MIN_RETRY_DELAY: Duration = Duration::from_millis(50);

/// How long to wait before refreshing a token that stays usable for
/// `remaining`, given `jitter` drawn uniformly from `[0, 1)`.
///
/// A token with at least twice the margin left is refreshed `margin` before
/// it expires, up to [`JITTER_SHARE`] of the margin later. A shorter-lived
/// token is refreshed when half its remaining life has passed, up to
/// [`JITTER_SHARE`] of that earlier.
pub fn refresh_delay(remaining: Duration, margin: Duration, jitter: f64) -> Duration {
    let jitter = jitter.clamp(0.0, 1.0) * JITTER_SHARE;
    let delay = if remaining >= margin * 2 {
        remaining - margin + margin.mul_f64(jitter)
    } else {
        (remaining / 2).mul_f64(1.0 - jitter)
    };
    delay.max(MIN_REFRESH_DELAY)
}

/// Exponential backoff with full jitter: the n-th wait is drawn from
/// `[0, min(max, initial * 2^n))`, and is never below [`MIN_RETRY_DELAY`].
#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    /// A backoff starting at `initial` and capped at `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            failures: 0,
        }
    }

    /// The wait after one more failure, for `jitter` in `[0, 1)`.
    pub fn next_delay(&mut self, jitter: f64) -> Duration {
        let ceiling = self
            .initial
            .saturating_mul(1 << self.failures.min(20))
            .min(self.max);
        self.failures = self.failures.saturating_add(1);
        ceiling.mul_f64(jitter.clamp(0.0, 1.0)).max(MIN_RETRY_DELAY)
    }

    /// Forgets past failures after a success.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MARGIN: Duration = DEFAULT_REFRESH_MARGIN;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn hour_long_token_refreshes_between_five_and_four_minutes_before_expiry() {
        assert_eq!(refresh_delay(secs(3600), MARGIN, 0.0), secs(3300));
        assert_eq!(refresh_delay(secs(3600), MARGIN, 0.999_999).as_secs(), 3359);
        for jitter in [0.0, 0.3, 0.7, 0.99] {
            let delay = refresh_delay(secs(3600), MARGIN, jitter);
            let left_at_refresh = secs(3600) - delay;
            assert!(left_at_refresh > secs(240) && left_at_refresh <= secs(300));
        }
    }

    #[test]
    fn short_token_refreshes_at_half_its_remaining_life() {
        assert_eq!(
            refresh_delay(secs(599), MARGIN, 0.0),
            Duration::from_millis(299_500)
        );
        assert_eq!(refresh_delay(secs(10), MARGIN, 0.0), secs(5));
        assert_eq!(
            refresh_delay(secs(10), MARGIN, 0.5),
            secs(4) + Duration::from_millis(500)
        );
        assert!(refresh_delay(secs(10), MARGIN, 0.99) > secs(4));
    }

    #[test]
    fn the_boundary_is_twice_the_margin() {
        assert_eq!(refresh_delay(MARGIN * 2, MARGIN, 0.0), MARGIN);
        assert!(refresh_delay(MARGIN * 2 - secs(1), MARGIN, 0.0) < MARGIN);
    }

    #[test]
    fn never_refreshes_in_a_tight_loop() {
        assert_eq!(
            refresh_delay(Duration::ZERO, MARGIN, 0.0),
            MIN_REFRESH_DELAY
        );
        assert_eq!(
            refresh_delay(Duration::from_millis(300), MARGIN, 0.5),
            MIN_REFRESH_DELAY
        );
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let mut backoff = Backoff::new(secs(1), secs(60));
        let ceilings: Vec<Duration> = (0..8).map(|_| backoff.next_delay(1.0)).collect();
        assert_eq!(ceilings, [1, 2, 4, 8, 16, 32, 60, 60].map(secs).to_vec());
        assert_eq!(backoff.next_delay(0.5), secs(30));
        backoff.reset();
        assert_eq!(backoff.next_delay(1.0), secs(1));
    }

    #[test]
    fn backoff_jitter_never_gives_zero() {
        let mut backoff = Backoff::new(secs(1), secs(60));
        assert_eq!(backoff.next_delay(0.0), MIN_RETRY_DELAY);
        for _ in 0..100 {
            backoff.next_delay(1.0);
        }
        assert_eq!(backoff.next_delay(1.0), secs(60));
    }
}
