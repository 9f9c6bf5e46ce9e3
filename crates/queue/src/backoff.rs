//! Retry backoff.

use rand::Rng;
use std::time::Duration;

/// Exponential backoff with full jitter: uniform in `[0, min(max, base * 2^(attempt-1))]`.
///
/// `attempt` is the number of the attempt that just failed (1 for the first delivery).
pub fn full_jitter_backoff(base: Duration, max: Duration, attempt: u32) -> Duration {
    let shift = attempt.saturating_sub(1).min(32);
    let ceiling = base
        .as_millis()
        .saturating_mul(1u128 << shift)
        .min(max.as_millis());
    let ceiling = u64::try_from(ceiling).unwrap_or(u64::MAX);
    if ceiling == 0 {
        return Duration::ZERO;
    }
    Duration::from_millis(rand::rng().random_range(0..=ceiling))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_within_the_exponential_ceiling() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(1);
        for attempt in 1..40 {
            let d = full_jitter_backoff(base, max, attempt);
            let ceiling = (100u64 << (attempt - 1).min(20)).min(1000);
            assert!(d <= Duration::from_millis(ceiling), "{attempt}: {d:?}");
        }
        assert_eq!(full_jitter_backoff(Duration::ZERO, max, 3), Duration::ZERO);
    }
}
