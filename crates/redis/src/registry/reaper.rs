//! When to look for lapsed leases. The plan is one instant: the earliest expiry this node
//! knows of. Changes only bring it forward (a new lease that lapses sooner); the reaper
//! takes it, asks Redis to remove what really lapsed, and plans again from Redis's answer
//! (the time left on the next lease), so a lease renewed through another node costs at
//! most one early look. With nothing registered there is no plan and the reaper sleeps
//! until a registration arrives.

use std::time::Instant;

use parking_lot::Mutex;
use tokio::sync::Notify;

/// The reaper's next wake-up.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    next: Mutex<Option<Instant>>,
    wake: Notify,
}

impl Plan {
    /// Makes sure the reaper looks at `at` or earlier.
    pub(crate) fn before(&self, at: Instant) {
        let mut next = self.next.lock();
        if next.is_none_or(|planned| at < planned) {
            *next = Some(at);
            self.wake.notify_one();
        }
    }

    /// The planned time, if any.
    pub(crate) fn next(&self) -> Option<Instant> {
        *self.next.lock()
    }

    /// Takes the plan if it is due at `now`: the caller reaps and plans again.
    pub(crate) fn take_due(&self, now: Instant) -> bool {
        let mut next = self.next.lock();
        match *next {
            Some(at) if at <= now => {
                *next = None;
                true
            }
            _ => false,
        }
    }

    /// Resolves when the plan is brought forward.
    pub(crate) async fn changed(&self) {
        self.wake.notified().await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn only_an_earlier_time_changes_the_plan() {
        let plan = Plan::default();
        let now = Instant::now();
        assert_eq!(plan.next(), None);
        plan.before(now + Duration::from_secs(5));
        plan.before(now + Duration::from_secs(9));
        assert_eq!(plan.next(), Some(now + Duration::from_secs(5)));
        plan.before(now + Duration::from_secs(1));
        assert_eq!(plan.next(), Some(now + Duration::from_secs(1)));
        assert!(!plan.take_due(now));
        assert!(plan.take_due(now + Duration::from_secs(1)));
        assert_eq!(plan.next(), None, "taken: the reaper plans again");
    }
}
