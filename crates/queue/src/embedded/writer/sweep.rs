//! Expiry of dedup keys and results: the earliest expiry on disk is tracked so the loop wakes
//! for it, and expired entries are deleted a bounded chunk at a time, at most once per
//! `SWEEP_EVERY` so that expiries batch up.

use super::Writer;
use super::batch::Batch;
use super::failure::Fail;
use super::schema::Tables;
use crate::embedded::codec::{decode_expiring, dur_ms};
use redb::ReadableTable;
use std::time::Duration;

/// Least time between two sweeps of expired dedup keys and results, so expiries batch up.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Most entries of one index a sweep (or a redrive step) reads at once, to bound memory.
pub(super) const SWEEP_CHUNK: usize = 1024;

impl Writer {
    /// Notes that a dedup key or result expires at `at`, so the loop wakes to sweep it.
    pub(super) fn expires_at(&mut self, at: u64) {
        self.next_expiry_ms = Some(self.next_expiry_ms.map_or(at, |n| n.min(at)));
    }

    /// The earliest time the next sweep may run.
    pub(super) fn next_sweep_allowed_ms(&self) -> u64 {
        self.last_sweep_ms.saturating_add(dur_ms(SWEEP_EVERY))
    }

    /// Sweeps if something has expired and the last sweep is `SWEEP_EVERY` ago, then finds the
    /// next expiry.
    pub(super) fn sweep_if_due(
        &mut self,
        t: &mut Tables<'_>,
        batch: &mut Batch,
        now: u64,
    ) -> Result<(), Fail> {
        if self.next_expiry_ms.is_some_and(|at| at <= now) && now >= self.next_sweep_allowed_ms() {
            self.last_sweep_ms = now;
            self.sweep(t, batch, now)?;
            self.next_expiry_ms = t.first_expiry()?;
        }
        Ok(())
    }

    /// Deletes expired dedup keys and results, a bounded chunk at a time.
    fn sweep(&mut self, t: &mut Tables<'_>, batch: &mut Batch, now: u64) -> Result<(), Fail> {
        // An entry is live while `expires > now`, so everything up to `now` inclusive goes.
        let expired_before = now.saturating_add(1);
        let mut expired = Vec::new();
        for item in t
            .dedup_exp
            .range((0u64, 0u32, "")..(expired_before, 0u32, ""))?
            .take(SWEEP_CHUNK)
        {
            let (k, _) = item?;
            let (exp, qid, key) = k.value();
            expired.push((exp, qid, key.to_owned()));
        }
        for (exp, qid, key) in expired {
            batch.changed = true;
            t.dedup_exp.remove((exp, qid, key.as_str()))?;
            let current = match t.dedup.get((qid, key.as_str()))? {
                Some(v) => decode_expiring(v.value())?.0 == exp,
                None => false,
            };
            if current {
                t.dedup.remove((qid, key.as_str()))?;
            }
        }
        let mut expired = Vec::new();
        for item in t
            .results_exp
            .range((0u64, "")..(expired_before, ""))?
            .take(SWEEP_CHUNK)
        {
            let (k, _) = item?;
            let (exp, corr) = k.value();
            expired.push((exp, corr.to_owned()));
        }
        for (exp, corr) in expired {
            batch.changed = true;
            t.results_exp.remove((exp, corr.as_str()))?;
            let current = match t.results.get(corr.as_str())? {
                Some(v) => decode_expiring(v.value())?.0 == exp,
                None => false,
            };
            if current {
                t.results.remove(corr.as_str())?;
            }
        }
        Ok(())
    }
}

impl Tables<'_> {
    /// The earliest expiry among the dedup keys and results on disk.
    pub(super) fn first_expiry(&self) -> Result<Option<u64>, Fail> {
        let dedup = self.dedup_exp.first()?.map(|(k, _)| k.value().0);
        let result = self.results_exp.first()?.map(|(k, _)| k.value().0);
        Ok(match (dedup, result) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::Cmd;
    use super::super::fixture::{LONG_LEASE_MS, TestWriter, quick_config};
    use super::super::schema::{DEDUP, DEDUP_EXP, RESULTS, RESULTS_EXP};
    use super::super::settle::read_result;
    use crate::embedded::codec::now_ms;
    use crate::{NewMessage, QueueConfig};
    use bytes::Bytes;
    use std::time::Duration;

    #[test]
    fn an_expired_key_is_swept_and_the_next_expiry_found() {
        let short = QueueConfig {
            dedup_window: Duration::from_millis(30),
            ..quick_config().defaults
        };
        let mut w = TestWriter::new(quick_config().with_queue("short", short));
        w.submit(
            "short",
            vec![NewMessage::new("a", "a").with_idempotency_key("k")],
        );
        w.submit(
            "long",
            vec![NewMessage::new("b", "b").with_idempotency_key("k")],
        );
        let first = w.writer.next_expiry_ms.expect("an expiry");
        assert!(first <= now_ms() + 30);
        assert_eq!((w.rows(DEDUP), w.rows(DEDUP_EXP)), (2, 2));
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(w.writer.time_to_next_wake(), Some(Duration::ZERO));
        w.tick();
        assert_eq!((w.rows(DEDUP), w.rows(DEDUP_EXP)), (1, 1));
        let next = w.writer.next_expiry_ms.expect("the long window's key");
        assert!(next > now_ms() + 3_500_000, "{next}");
    }

    #[test]
    fn sweeps_are_at_least_a_second_apart() {
        let short = QueueConfig {
            dedup_window: Duration::from_millis(10),
            ..quick_config().defaults
        };
        let mut w = TestWriter::new(quick_config().with_queue("short", short));
        w.submit(
            "short",
            vec![NewMessage::new("a", "a").with_idempotency_key("k1")],
        );
        std::thread::sleep(Duration::from_millis(20));
        w.tick();
        assert_eq!(w.rows(DEDUP), 0, "first sweep");
        w.submit(
            "short",
            vec![NewMessage::new("b", "b").with_idempotency_key("k2")],
        );
        std::thread::sleep(Duration::from_millis(20));
        w.tick();
        assert_eq!(w.rows(DEDUP), 1, "too soon after the last sweep");
        let wake = w.writer.time_to_next_wake().expect("the next sweep");
        assert!(wake > Duration::from_millis(500), "{wake:?}");
        // As if that second had passed.
        w.writer.last_sweep_ms -= 1_000;
        w.tick();
        assert_eq!(w.rows(DEDUP), 0);
        assert_eq!(w.writer.next_expiry_ms, None);
    }

    #[test]
    fn an_expired_result_is_no_longer_read_and_is_swept() {
        let config = crate::BackendConfig::new(QueueConfig {
            result_ttl: Duration::from_millis(20),
            ..quick_config().defaults
        });
        let mut w = TestWriter::new(config);
        w.submit_ids("q", &["m"]);
        let receipt = w.receive("q", 1, LONG_LEASE_MS)[0].receipt.clone();
        w.call(|tx| Cmd::Ack {
            receipt,
            result: Some(Bytes::from_static(b"r")),
            tx,
        })
        .expect("ack");
        assert_eq!((w.rows(RESULTS), w.rows(RESULTS_EXP)), (1, 1));
        std::thread::sleep(Duration::from_millis(30));
        let db = w.writer.db.clone().expect("open");
        assert_eq!(read_result(&db, "m").expect("read"), None, "expired");
        w.tick();
        assert_eq!((w.rows(RESULTS), w.rows(RESULTS_EXP)), (0, 0));
        assert_eq!(w.writer.next_expiry_ms, None);
    }
}
