//! A retry budget: retries may add at most a fixed fraction of extra load.

use std::time::Duration;

// tokio's clock: the same as std's outside tests, and paused and advanced by hand in them.
use tokio::time::Instant;

use parking_lot::Mutex;

/// Token bucket in the style of gRPC's retry throttling and Finagle's retry
/// budgets: every first attempt deposits `ratio` of a token, every retry
/// withdraws one, and a small floor per second lets a quiet client still
/// retry. In an outage, retries stop once the bucket is empty instead of
/// multiplying the load.
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    min_per_second: f64,
    max_tokens: f64,
    state: Mutex<(f64, Instant)>,
}

impl RetryBudget {
    /// Retries may add `ratio` (e.g. 0.2 = 20 %) of the request rate, plus
    /// `min_per_second`.
    pub fn new(ratio: f64, min_per_second: u32) -> Self {
        let max_tokens = (min_per_second as f64).max(1.0) * 10.0;
        Self {
            ratio,
            min_per_second: min_per_second as f64,
            max_tokens,
            state: Mutex::new((min_per_second as f64, Instant::now())),
        }
    }

    fn refill(&self, state: &mut (f64, Instant)) {
        let elapsed = state.1.elapsed();
        if elapsed > Duration::from_millis(10) {
            state.0 = (state.0 + elapsed.as_secs_f64() * self.min_per_second).min(self.max_tokens);
            state.1 = Instant::now();
        }
    }

    /// Records a first attempt.
    pub fn deposit(&self) {
        let mut state = self.state.lock();
        self.refill(&mut state);
        state.0 = (state.0 + self.ratio).min(self.max_tokens);
    }

    /// Takes a token for a retry; `false` means the budget is spent.
    pub fn withdraw(&self) -> bool {
        let mut state = self.state.lock();
        self.refill(&mut state);
        if state.0 >= 1.0 {
            state.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_capped_by_the_ratio() {
        let budget = RetryBudget::new(0.1, 0);
        let mut retries = 0;
        for _ in 0..1000 {
            budget.deposit();
            if budget.withdraw() {
                retries += 1;
            }
        }
        assert!((95..=101).contains(&retries), "{retries}");
    }
}
