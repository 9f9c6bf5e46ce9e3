//! The leases this backend instance handed out and has not seen settled, so that dropping it
//! can hand them back (`RedisOptions::release_leases_on_drop`), as a node shutting down does
//! for its consumers.
//!
//! Settling through another node leaves an entry here until it is pruned after its expiry;
//! releasing such a stale receipt is a no-op on Redis, so that is harmless.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

/// Entries stay this long past their lease's expiry (clock skew between node and Redis).
const PRUNE_SLACK_MS: u64 = 60_000;

#[derive(Debug, Default)]
pub(super) struct HeldLeases {
    inner: Mutex<Held>,
}

#[derive(Debug, Default)]
struct Held {
    /// Receipt → lease expiry (ms, Redis's clock).
    leases: HashMap<String, u64>,
    /// Size at which the next insert prunes lapsed entries.
    prune_at: usize,
}

fn local_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl HeldLeases {
    pub(super) fn add(&self, receipts: impl IntoIterator<Item = (String, u64)>) {
        let mut held = self.inner.lock();
        held.leases.extend(receipts);
        if held.leases.len() >= held.prune_at.max(1024) {
            let now = local_now_ms();
            held.leases
                .retain(|_, exp| exp.saturating_add(PRUNE_SLACK_MS) > now);
            held.prune_at = held.leases.len() * 2;
        }
    }

    pub(super) fn extend(&self, receipt: &str, expires_ms: u64) {
        if let Some(exp) = self.inner.lock().leases.get_mut(receipt) {
            *exp = expires_ms;
        }
    }

    pub(super) fn remove<'a>(&self, receipts: impl IntoIterator<Item = &'a str>) {
        let mut held = self.inner.lock();
        for r in receipts {
            held.leases.remove(r);
        }
    }

    /// Every receipt still held, emptying the set.
    pub(super) fn take_all(&self) -> Vec<String> {
        let mut held = self.inner.lock();
        held.prune_at = 0;
        held.leases.drain().map(|(r, _)| r).collect()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.lock().leases.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lapsed_entries_are_pruned_once_the_set_grows() {
        let held = HeldLeases::default();
        let now = local_now_ms();
        held.add((0..1000).map(|i| (format!("old-{i}"), 1)));
        held.add((0..30).map(|i| (format!("live-{i}"), now + 60_000)));
        assert_eq!(
            held.len(),
            30,
            "the lapsed ones went when the set reached 1024"
        );
        held.remove(["live-0", "live-1"]);
        held.extend("live-2", now + 120_000);
        let mut all = held.take_all();
        all.sort();
        assert_eq!(all.len(), 28);
        assert!(all.iter().all(|r| r.starts_with("live-")));
        assert_eq!(held.len(), 0);
    }
}
