//! Per-queue counters: depth, in flight, dead letters, and the age of the oldest live message.

use super::Writer;
use super::failure::Fail;
use super::schema::Tables;
use crate::QueueStats;
use crate::embedded::chunk::{ChunkView, Settled};
use crate::embedded::codec::decode_message;
use redb::ReadableTable;
use std::time::Duration;

impl Writer {
    /// Statistics of every known queue, sorted by name. Reads the chunks, so the batch's open
    /// chunks and settles must be flushed first.
    pub(super) fn stats(&self, t: &mut Tables<'_>, now: u64) -> Result<Vec<QueueStats>, Fail> {
        let mut out = Vec::with_capacity(self.queues.len());
        for (name, q) in &self.queues {
            // Fully settled chunks are deleted: the first one holds the oldest live message.
            let oldest_age = match t.chunks.range((q.id, 0u64)..=(q.id, u64::MAX))?.next() {
                Some(item) => {
                    let (k, v) = item?;
                    let chunk = ChunkView::new(v.value())?;
                    let first_live = match t.settled.get(k.value())? {
                        Some(g) => Settled::decode(g.value())?.first_unsettled(),
                        None => Some(0),
                    };
                    match first_live {
                        Some(i) => {
                            let enqueued = decode_message(chunk.record(i)?)?.enqueued_ms;
                            Some(Duration::from_millis(now.saturating_sub(enqueued)))
                        }
                        None => None,
                    }
                }
                None => None,
            };
            out.push(QueueStats {
                name: name.clone(),
                depth: q.live.saturating_sub(q.in_flight),
                in_flight: q.in_flight,
                dead_letters: q.dead,
                oldest_age,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::super::Cmd;
    use super::super::fixture::{LONG_LEASE_MS, TestWriter, quick_config};
    use crate::{BackendConfig, NackOutcome, QueueConfig};
    use std::time::Duration;

    #[test]
    fn depth_in_flight_and_dead_letters_are_counted_per_queue() {
        let mut w = TestWriter::new(BackendConfig::new(QueueConfig {
            max_attempts: 1,
            ..quick_config().defaults
        }));
        w.submit_ids("b", &["1", "2", "3", "4"]);
        w.submit_ids("a", &["5"]);
        let got = w.receive("b", 2, LONG_LEASE_MS);
        assert_eq!(w.nack(&got[0].receipt, None), Ok(NackOutcome::DeadLettered));
        let stats = w.call(|tx| Cmd::Stats { tx }).expect("stats");
        let names: Vec<&str> = stats.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["a", "b"], "sorted by name");
        let b = &stats[1];
        assert_eq!((b.depth, b.in_flight, b.dead_letters), (2, 1, 1));
        assert!(b.oldest_age.is_some());
        assert_eq!((stats[0].depth, stats[0].in_flight), (1, 0));
    }

    #[test]
    fn oldest_age_is_the_first_unsettled_message() {
        let mut w = TestWriter::new(quick_config());
        w.submit_ids("q", &["old"]);
        std::thread::sleep(Duration::from_millis(200));
        w.submit_ids("q", &["new"]);
        let age = w.stats_of("q").oldest_age.expect("an age");
        assert!(age >= Duration::from_millis(200), "{age:?}");
        let got = w.receive("q", 2, LONG_LEASE_MS);
        w.ack(&got[0].receipt).expect("ack");
        let age = w.stats_of("q").oldest_age.expect("an age");
        assert!(age < Duration::from_millis(200), "{age:?}");
        w.ack(&got[1].receipt).expect("ack");
        assert_eq!(w.stats_of("q").oldest_age, None);
    }
}
