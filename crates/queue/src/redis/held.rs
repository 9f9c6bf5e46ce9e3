//! The leases this backend instance handed out and has not seen settled, so that dropping it
//! can hand them back (`RedisOptions::release_leases_on_drop`), as a node shutting down does
//! for its consumers.
//!
//! Kept per lease (one receive), not per delivery: a receive adds one record and an ack call
//! counts down each lease it settled, so a message costs no map insert and removal of its own.
//! A lease whose deliveries were all seen settled is forgotten; one settled (in part) elsewhere
//! stays until it is pruned after its expiry. Dropping hands back every delivery of the leases
//! still known, settled ones included: releasing those is a no-op on Redis, so that is harmless.

use super::keys::Receipt;
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
    /// Lease token → its deliveries.
    leases: HashMap<String, Lease>,
    /// Size at which the next insert prunes lapsed leases.
    prune_at: usize,
}

#[derive(Debug)]
struct Lease {
    queue: String,
    /// Entry id and attempt of each delivery (what its receipt is made of, with the token).
    deliveries: Vec<(String, u32)>,
    /// Deliveries not seen settled yet.
    outstanding: usize,
    /// The latest expiry of its deliveries (ms, Redis's clock).
    expires_ms: u64,
}

fn local_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl HeldLeases {
    /// Records the deliveries (entry id, attempt) of one receive's lease.
    pub(super) fn add(
        &self,
        queue: &str,
        token: &str,
        expires_ms: u64,
        deliveries: Vec<(String, u32)>,
    ) {
        if deliveries.is_empty() {
            return;
        }
        let mut held = self.inner.lock();
        held.leases.insert(
            token.to_owned(),
            Lease {
                queue: queue.to_owned(),
                outstanding: deliveries.len(),
                deliveries,
                expires_ms,
            },
        );
        if held.leases.len() >= held.prune_at.max(1024) {
            let now = local_now_ms();
            held.leases
                .retain(|_, l| l.expires_ms.saturating_add(PRUNE_SLACK_MS) > now);
            held.prune_at = held.leases.len() * 2;
        }
    }

    /// A delivery of lease `token` now lasts until `expires_ms`.
    pub(super) fn extend(&self, token: &str, expires_ms: u64) {
        if let Some(lease) = self.inner.lock().leases.get_mut(token) {
            lease.expires_ms = lease.expires_ms.max(expires_ms);
        }
    }

    /// `n` deliveries of lease `token` were settled (each counted once: acked, nacked or
    /// released successfully).
    pub(super) fn settled(&self, token: &str, n: usize) {
        let mut held = self.inner.lock();
        if let Some(lease) = held.leases.get_mut(token) {
            lease.outstanding = lease.outstanding.saturating_sub(n);
            if lease.outstanding == 0 {
                held.leases.remove(token);
            }
        }
    }

    /// The receipts of every lease still known, emptying the set.
    pub(super) fn take_all(&self) -> Vec<String> {
        let mut held = self.inner.lock();
        held.prune_at = 0;
        held.leases
            .drain()
            .flat_map(|(token, lease)| {
                lease
                    .deliveries
                    .into_iter()
                    .map(move |(entry, attempt)| {
                        Receipt::format(&entry, &token, attempt, &lease.queue)
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.lock().leases.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deliveries(n: usize) -> Vec<(String, u32)> {
        (0..n).map(|i| (format!("1-{i}"), 1)).collect()
    }

    #[test]
    fn lapsed_leases_are_pruned_once_the_set_grows() {
        let held = HeldLeases::default();
        let now = local_now_ms();
        for i in 0..1000 {
            held.add("q", &format!("old-{i}"), 1, deliveries(1));
        }
        for i in 0..30 {
            held.add("q", &format!("live-{i}"), now + 60_000, deliveries(2));
        }
        assert_eq!(
            held.len(),
            30,
            "the lapsed ones went when the set reached 1024"
        );
        held.settled("live-0", 2);
        held.settled("live-1", 1);
        held.extend("live-2", now + 120_000);
        assert_eq!(
            held.len(),
            29,
            "a lease is forgotten once all of it is settled"
        );
        let mut all = held.take_all();
        all.sort();
        assert_eq!(
            all.len(),
            29 * 2,
            "every delivery of the leases still known"
        );
        assert!(all.contains(&"1-0.live-1.1.q".to_owned()));
        assert_eq!(held.len(), 0);
    }
}
