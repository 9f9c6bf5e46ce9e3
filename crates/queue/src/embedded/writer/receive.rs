//! Receive: what is ready (redeliveries first, then the scan from the queue's cursor, with
//! due retries promoted from the schedule), and long-poll waiters answered as messages arrive
//! or their deadline passes. Handing the picks out under a lease is `lease`'s.

use super::Writer;
use super::batch::Batch;
use super::command::Tx;
use super::failure::Fail;
use super::schema::Tables;
use crate::embedded::chunk::{ChunkView, Settled};
use crate::{Leased, QueueError};
use bytes::Bytes;
use redb::ReadableTable;
use std::collections::VecDeque;

/// A receive: answered at once when something is ready, otherwise kept as a long-poll waiter
/// until a message arrives or its deadline passes.
pub(super) struct Waiter {
    pub(super) consumer: String,
    pub(super) max: usize,
    pub(super) lease_ms: u64,
    pub(super) deadline_ms: u64,
    pub(super) tx: Tx<Vec<Leased>>,
}

/// A message chosen for delivery.
pub(super) struct Pick {
    pub(super) seq: u64,
    /// Known never to have been delivered (attempt 1, no history to read).
    pub(super) fresh: bool,
    /// Its chunk's first seq and its record, when the scan already read them.
    pub(super) found: Option<(u64, Bytes)>,
}

impl Writer {
    /// Leases what is ready of `queue` to `request`; with nothing ready, it waits (unless its
    /// deadline is already here) until `serve_waiters` can answer it.
    pub(super) fn receive(
        &mut self,
        t: &mut Tables<'_>,
        batch: &mut Batch,
        queue: String,
        request: Waiter,
        now: u64,
    ) -> Result<(), Fail> {
        let (leased, keys) = match self.queues.get(&queue) {
            Some(q) if q.live > q.in_flight && !request.tx.is_closed() => {
                let qid = q.id;
                let Waiter {
                    consumer,
                    max,
                    lease_ms,
                    ..
                } = &request;
                self.lease_ready(t, batch, qid, consumer, *max, *lease_ms, now)?
            }
            _ => (Vec::new(), Vec::new()),
        };
        if !leased.is_empty() || request.deadline_ms <= now {
            batch.reply_leased(request.tx, leased, keys);
        } else {
            self.waiters.entry(queue).or_default().push_back(request);
        }
        Ok(())
    }

    /// Answers waiters that can now get messages, and those whose deadline passed (with
    /// nothing); notes when the earliest retry a remaining waiter could get falls due.
    pub(super) fn serve_waiters(
        &mut self,
        t: &mut Tables<'_>,
        batch: &mut Batch,
        now: u64,
    ) -> Result<(), Fail> {
        self.next_ready_ms = None;
        let names: Vec<String> = self
            .waiters
            .iter()
            .filter(|(_, ws)| !ws.is_empty())
            .map(|(n, _)| n.clone())
            .collect();
        for name in names {
            let mut ws = self.waiters.remove(&name).unwrap_or_default();
            ws.retain(|w| !w.tx.is_closed());
            let qid = self.queues.get(&name).map(|q| q.id);
            if let Some(qid) = qid {
                while let Some(w) = ws.front() {
                    let (leased, keys) =
                        self.lease_ready(t, batch, qid, &w.consumer, w.max, w.lease_ms, now)?;
                    if leased.is_empty() {
                        break;
                    }
                    if let Some(w) = ws.pop_front() {
                        batch.reply_leased(w.tx, leased, keys);
                    }
                }
            }
            let mut still = VecDeque::with_capacity(ws.len());
            for w in ws {
                if w.deadline_ms <= now {
                    batch.reply_leased(w.tx, Vec::new(), Vec::new());
                } else {
                    still.push_back(w);
                }
            }
            if still.is_empty() {
                continue;
            }
            if let Some(qid) = qid {
                if let Some(item) = t
                    .schedule
                    .range((qid, 0u64, 0u64)..=(qid, u64::MAX, u64::MAX))?
                    .next()
                {
                    let (k, _) = item?;
                    let at = k.value().1;
                    self.next_ready_ms = Some(self.next_ready_ms.map_or(at, |n| n.min(at)));
                }
            }
            self.waiters.insert(name, still);
        }
        Ok(())
    }

    /// Answers every waiter with `err` (at shutdown).
    pub(super) fn refuse_waiters(&mut self, err: &QueueError) {
        for (_, ws) in self.waiters.drain() {
            for w in ws {
                let _ = w.tx.send(Err(err.clone()));
            }
        }
    }

    /// Picks up to `max` ready messages of queue `qid`: redeliveries first (released, lapsed,
    /// due retries), then the scan from the cursor.
    pub(super) fn pick_ready(
        &mut self,
        t: &mut Tables<'_>,
        batch: &mut Batch,
        qid: u32,
        max: usize,
        now: u64,
    ) -> Result<Vec<Pick>, Fail> {
        self.flush_chunk(t, qid)?;
        self.promote_due(t, batch, qid, max, now)?;
        let Some(q) = self.qstate(qid) else {
            return Ok(Vec::new());
        };
        let mut picks = Vec::with_capacity(max.min(q.redeliver.len() + 64));
        while picks.len() < max {
            let Some(seq) = q.redeliver.pop_front() else {
                break;
            };
            picks.push(Pick {
                seq,
                fresh: false,
                found: None,
            });
        }
        if picks.len() == max || q.cursor >= q.tail {
            return Ok(picks);
        }
        let start = q.cursor + 1;
        // The chunk holding `start` may begin before it.
        let from = match t.chunks.range((qid, 0u64)..=(qid, start))?.next_back() {
            Some(item) => item?.0.value().1,
            None => start,
        };
        let mut cursor = q.cursor;
        let mut exhausted = true;
        'chunks: for item in t.chunks.range((qid, from)..=(qid, u64::MAX))? {
            let (k, v) = item?;
            let first = k.value().1;
            let chunk = ChunkView::new(v.value())?;
            // Below `recovered_max` a message may have been delivered before a restart: it may
            // be settled, waiting for a retry (the schedule delivers it) or already promoted.
            let settled = if first <= q.recovered_max {
                t.settled
                    .get((qid, first))?
                    .map(|g| Settled::decode(g.value()))
                    .transpose()?
            } else {
                None
            };
            for i in start.saturating_sub(first) as usize..chunk.count() {
                let seq = first + i as u64;
                cursor = seq;
                let fresh = seq > q.recovered_max;
                if !fresh
                    && (settled.as_ref().is_some_and(|s| s.contains(i))
                        || q.ahead.remove(&seq)
                        || t.scheduled.get((qid, seq))?.is_some())
                {
                    continue;
                }
                picks.push(Pick {
                    seq,
                    fresh,
                    found: Some((first, Bytes::copy_from_slice(chunk.record(i)?))),
                });
                if picks.len() == max {
                    exhausted = false;
                    break 'chunks;
                }
            }
        }
        q.cursor = if exhausted {
            q.tail.max(cursor)
        } else {
            cursor
        };
        if !q.ahead.is_empty() {
            let cursor = q.cursor;
            q.ahead.retain(|&s| s > cursor);
        }
        Ok(picks)
    }

    /// Moves due retries of queue `qid` from the schedule to `redeliver`, until it holds `want`.
    fn promote_due(
        &mut self,
        t: &mut Tables<'_>,
        batch: &mut Batch,
        qid: u32,
        want: usize,
        now: u64,
    ) -> Result<(), Fail> {
        let Some(q) = self.qstate(qid) else {
            return Ok(());
        };
        if q.scheduled == 0 || q.redeliver.len() >= want {
            return Ok(());
        }
        let room = want - q.redeliver.len();
        let mut due = Vec::new();
        for item in t
            .schedule
            .range((qid, 0u64, 0u64)..=(qid, now, u64::MAX))?
            .take(room)
        {
            due.push(item?.0.value());
        }
        for (qid, at, seq) in due {
            batch.changed = true;
            t.schedule.remove((qid, at, seq))?;
            t.scheduled.remove((qid, seq))?;
            q.scheduled = q.scheduled.saturating_sub(1);
            if seq > q.cursor {
                q.ahead.insert(seq);
            }
            q.redeliver.push_back(seq);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::Cmd;
    use super::super::fixture::{LONG_LEASE_MS, TestWriter, quick_config};
    use super::super::schema::{SCHEDULE, SCHEDULED};
    use crate::Leased;
    use std::time::Duration;
    use tokio::sync::oneshot;

    fn ids(leased: &[Leased]) -> Vec<&str> {
        leased.iter().map(|m| m.message_id.as_str()).collect()
    }

    /// Starts a receive that may wait `wait_ms`; returns where its answer will arrive.
    fn start_receive(
        w: &mut TestWriter,
        queue: &str,
        wait_ms: u64,
    ) -> oneshot::Receiver<Result<Vec<Leased>, crate::QueueError>> {
        let (tx, rx) = oneshot::channel();
        let cmd = Cmd::Receive {
            queue: queue.into(),
            consumer: "waiter".into(),
            max: 10,
            lease_ms: LONG_LEASE_MS,
            wait_ms,
            tx,
        };
        w.writer.run_batch(vec![cmd], false);
        rx
    }

    #[test]
    fn redeliveries_come_before_the_scan() {
        let mut w = TestWriter::new(quick_config());
        w.submit_ids("q", &["a", "b", "c"]);
        let first = w.receive("q", 1, LONG_LEASE_MS);
        assert_eq!(ids(&first), ["a"]);
        w.call(|tx| Cmd::Release {
            receipts: vec![first[0].receipt.clone()],
            tx,
        })
        .expect("release");
        let all = w.receive("q", 10, LONG_LEASE_MS);
        assert_eq!(ids(&all), ["a", "b", "c"]);
        assert!(w.receive("q", 10, LONG_LEASE_MS).is_empty());
    }

    #[test]
    fn a_waiting_receive_is_answered_by_the_next_submit() {
        let mut w = TestWriter::new(quick_config());
        let mut rx = start_receive(&mut w, "q", 60_000);
        assert!(rx.try_recv().is_err(), "nothing to deliver yet");
        let wake = w.writer.time_to_next_wake().expect("the waiter's deadline");
        assert!(wake <= Duration::from_secs(60), "{wake:?}");
        w.submit_ids("q", &["m"]);
        let got = rx.try_recv().expect("answered").expect("receive");
        assert_eq!(ids(&got), ["m"]);
        assert!(w.writer.waiters.values().all(|ws| ws.is_empty()));
    }

    #[test]
    fn a_waiter_gets_nothing_at_its_deadline() {
        let mut w = TestWriter::new(quick_config());
        let mut rx = start_receive(&mut w, "q", 20);
        std::thread::sleep(Duration::from_millis(30));
        w.tick();
        let got = rx.try_recv().expect("answered").expect("receive");
        assert!(got.is_empty());
        assert_eq!(w.writer.time_to_next_wake(), None);
    }

    #[test]
    fn a_due_retry_is_promoted_from_the_schedule() {
        let mut w = TestWriter::new(quick_config());
        w.submit_ids("q", &["x", "y"]);
        let got = w.receive("q", 1, LONG_LEASE_MS);
        w.nack(&got[0].receipt, Some(Duration::from_millis(200)))
            .expect("nack");
        assert_eq!((w.rows(SCHEDULE), w.rows(SCHEDULED)), (1, 1));
        assert_eq!(ids(&w.receive("q", 10, LONG_LEASE_MS)), ["y"]);
        // A waiter wakes the loop when the retry falls due.
        let mut rx = start_receive(&mut w, "q", 60_000);
        let wake = w.writer.time_to_next_wake().expect("the retry");
        assert!(wake <= Duration::from_millis(200), "{wake:?}");
        std::thread::sleep(Duration::from_millis(250));
        w.tick();
        let got = rx.try_recv().expect("answered").expect("receive");
        assert_eq!(ids(&got), ["x"]);
        assert_eq!(got[0].attempt, 2);
        assert_eq!((w.rows(SCHEDULE), w.rows(SCHEDULED)), (0, 0));
    }
}
