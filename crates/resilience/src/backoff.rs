//! Exponential backoff with full jitter.

use std::time::Duration;

use rand::Rng;

/// Exponential backoff with full jitter: attempt `n` waits a random time in
/// `[0, min(cap, base * 2^n)]`, which spreads retries of many clients apart.
///
/// Keeps the attempt count itself; callers that already count attempts (the queue's nack
/// path stores them with the message) use [`full_jitter_delay`] instead.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// Backoff starting at `base`, never above `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The ceiling for the current attempt (without jitter).
    pub fn ceiling(&self) -> Duration {
        exponential_ceiling(self.base, self.cap, self.attempt)
    }

    /// The next delay, and advances to the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let delay = full_jitter_delay(self.base, self.cap, self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        delay
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// The delay before retry `n` (0 for the first retry): a random time in
/// `[0, min(cap, base * 2^n)]`. The stateless form of [`Backoff::next_delay`].
pub fn full_jitter_delay(base: Duration, cap: Duration, n: u32) -> Duration {
    exponential_ceiling(base, cap, n).mul_f64(rand::rng().random_range(0.0..=1.0))
}

/// `min(cap, base * 2^n)`.
fn exponential_ceiling(base: Duration, cap: Duration, n: u32) -> Duration {
    // Doubling stops at 2^31: by then any real cap has long been reached.
    base.saturating_mul(1u32 << n.min(31)).min(cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_with_jitter_below_the_ceiling() {
        let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(100));
        let mut ceilings = Vec::new();
        for _ in 0..6 {
            ceilings.push(backoff.ceiling());
            assert!(backoff.next_delay() <= *ceilings.last().unwrap());
        }
        assert_eq!(ceilings[0], Duration::from_millis(10));
        assert_eq!(ceilings[3], Duration::from_millis(80));
        assert_eq!(ceilings[5], Duration::from_millis(100));
        backoff.reset();
        assert_eq!(backoff.ceiling(), Duration::from_millis(10));
    }

    #[test]
    fn stateless_delay_stays_within_the_exponential_ceiling() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(1);
        for n in 0..40 {
            let d = full_jitter_delay(base, cap, n);
            let ceiling = (100u64 << n.min(20)).min(1000);
            assert!(d <= Duration::from_millis(ceiling), "{n}: {d:?}");
        }
        assert_eq!(full_jitter_delay(Duration::ZERO, cap, 2), Duration::ZERO);
    }

    #[test]
    fn huge_attempt_counts_saturate_at_the_cap() {
        let cap = Duration::from_secs(3600);
        assert_eq!(
            exponential_ceiling(Duration::from_millis(1), cap, u32::MAX),
            cap
        );
        assert_eq!(
            exponential_ceiling(Duration::MAX, Duration::MAX, 40),
            Duration::MAX
        );
    }
}
