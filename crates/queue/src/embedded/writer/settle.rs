//! Settling deliveries: ack (with its result stored by correlation id and forwarded to
//! `reply_to`), nack and lapsed leases (a failed attempt: a retry, scheduled or at once, or a
//! dead letter), and the settled bitmaps that delete a chunk once all of it is settled.

use super::Writer;
use super::batch::Batch;
use super::failure::Fail;
use super::lease::{Lease, lease_lost, parse_receipt};
use super::schema::{RESULTS, Tables};
use crate::embedded::chunk::{ChunkView, Settled};
use crate::embedded::codec::{
    StoredAttempt, decode_expiring, decode_history, decode_message, dur_ms, encode_expiring,
    encode_history, ms_to_time, now_ms,
};
use crate::{MAX_BODY_BYTES, NackOutcome, NewMessage, QueueError, SubmitFate};
use agentmesh_resilience::full_jitter_delay;
use bytes::Bytes;
use redb::{Database, ReadableDatabase, ReadableTable};
use std::time::Duration;

impl Writer {
    /// Completes the delivery `receipt` names; with a result, stores it by correlation id and
    /// forwards it to the message's `reply_to` queue, in the same transaction.
    pub(super) fn ack(
        &mut self,
        t: &mut Tables<'_>,
        batch: &mut Batch,
        receipt: &str,
        result: Option<Bytes>,
        now: u64,
    ) -> Result<Result<(), QueueError>, Fail> {
        let key = match parse_receipt(receipt) {
            Ok(k) => k,
            Err(e) => return Ok(Err(e)),
        };
        if let Some(r) = &result {
            if r.len() > MAX_BODY_BYTES {
                return Ok(Err(QueueError::InvalidArgument(format!(
                    "result is {} bytes, the limit is {MAX_BODY_BYTES}",
                    r.len()
                ))));
            }
        }
        let Some(lease) = self.take_lease(key, now) else {
            return Ok(Err(lease_lost(receipt)));
        };
        let (qid, seq, _) = key;
        self.settle(batch, qid, lease.chunk, seq);
        // Only a message that failed before has a history (a first attempt has none).
        if lease.attempt > 1 {
            t.history.remove((qid, seq))?;
        }
        if let Some(q) = self.qstate(qid) {
            q.in_flight = q.in_flight.saturating_sub(1);
            q.live = q.live.saturating_sub(1);
            q.row_dirty = true;
        }
        if let Some(body) = result {
            // Where the result goes is in the message record (its chunk is settled at the end
            // of the batch, so it is still there).
            let Some((_, record)) = Self::read_record(t, qid, seq)? else {
                tracing::warn!(
                    qid,
                    seq,
                    "acked message has no record; its result is dropped"
                );
                return Ok(Ok(()));
            };
            let message = decode_message(&record)?;
            let corr = message.correlation_id.to_owned();
            let reply_to = message.reply_to.map(str::to_owned);
            let qname = self.names.get(&qid).map_or("", String::as_str);
            let ttl = dur_ms(self.config.for_queue(qname).result_ttl);
            if !corr.is_empty() {
                let expires = now.saturating_add(ttl);
                t.results
                    .insert(corr.as_str(), encode_expiring(expires, &body).as_slice())?;
                t.results_exp.insert((expires, corr.as_str()), ())?;
                self.expires_at(expires);
                batch.results.push((corr.clone(), body.clone()));
            }
            if let Some(reply_to) = reply_to {
                let reply = NewMessage {
                    id: uuid::Uuid::now_v7().to_string(),
                    idempotency_key: None,
                    correlation_id: corr,
                    reply_to: None,
                    body,
                };
                // Acks are flushed lazily, and the reply rides along in the same commit.
                let needs_sync = batch.needs_sync;
                let accepted = batch.accepted;
                let fate = self.enqueue(t, batch, &reply_to, &reply, now)?;
                batch.needs_sync = needs_sync;
                batch.accepted = accepted;
                if let SubmitFate::Rejected { reason } = fate {
                    tracing::warn!(%reply_to, %reason, "reply could not be enqueued");
                }
            }
        }
        Ok(Ok(()))
    }

    /// Fails the delivery `receipt` names: a retry after `delay` (default: backoff with full
    /// jitter) or, on its last attempt, a dead letter.
    pub(super) fn nack(
        &mut self,
        t: &mut Tables<'_>,
        batch: &mut Batch,
        receipt: &str,
        error: &str,
        delay: Option<Duration>,
        now: u64,
    ) -> Result<Result<NackOutcome, QueueError>, Fail> {
        let key = match parse_receipt(receipt) {
            Ok(k) => k,
            Err(e) => return Ok(Err(e)),
        };
        let Some(lease) = self.take_lease(key, now) else {
            return Ok(Err(lease_lost(receipt)));
        };
        let delay_ms = delay.map(dur_ms);
        let outcome = self.fail_attempt(t, batch, (key.0, key.1), lease, error, delay_ms, now)?;
        Ok(Ok(outcome))
    }

    /// Records a failed attempt; schedules a retry or dead-letters the message.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn fail_attempt(
        &mut self,
        t: &mut Tables<'_>,
        batch: &mut Batch,
        (qid, seq): (u32, u64),
        lease: Lease,
        error: &str,
        delay_ms: Option<u64>,
        now: u64,
    ) -> Result<NackOutcome, Fail> {
        batch.changed = true;
        let mut history = match t.history.get((qid, seq))? {
            Some(h) => decode_history(h.value())?,
            None => Vec::new(),
        };
        history.push(StoredAttempt {
            attempt: lease.attempt,
            delivered_ms: lease.delivered_ms,
            consumer_id: lease.consumer.to_string(),
            error: error.to_owned(),
        });
        let history = encode_history(&history);
        let qname = self.names.get(&qid).cloned().unwrap_or_default();
        let cfg = self.config.for_queue(&qname).clone();
        if lease.attempt >= cfg.max_attempts {
            self.dead_letter(t, batch, (qid, seq), lease.chunk, error, &history, now)?;
            return Ok(NackOutcome::DeadLettered);
        }
        if let Some(q) = self.queues.get_mut(&qname) {
            q.in_flight = q.in_flight.saturating_sub(1);
        }
        let delay = delay_ms.unwrap_or_else(|| {
            // `lease.attempt` is the attempt that just failed: the first retry is retry 0.
            dur_ms(full_jitter_delay(
                cfg.backoff_base,
                cfg.backoff_max,
                lease.attempt.saturating_sub(1),
            ))
        });
        let at = now.saturating_add(delay);
        t.history.insert((qid, seq), history.as_slice())?;
        if at <= now {
            if let Some(q) = self.qstate(qid) {
                q.redeliver.push_back(seq);
            }
        } else {
            self.schedule(t, qid, seq, at)?;
        }
        Ok(NackOutcome::Retry { at: ms_to_time(at) })
    }

    /// Puts a message in the retry schedule, due at `at`.
    fn schedule(&mut self, t: &mut Tables<'_>, qid: u32, seq: u64, at: u64) -> Result<(), Fail> {
        t.schedule.insert((qid, at, seq), ())?;
        t.scheduled.insert((qid, seq), at)?;
        if let Some(q) = self.qstate(qid) {
            q.scheduled += 1;
        }
        Ok(())
    }

    /// Marks message `seq` of chunk `first` settled (acked or dead-lettered).
    pub(super) fn settle(&mut self, batch: &mut Batch, qid: u32, first: u64, seq: u64) {
        batch.changed = true;
        self.pending_settles
            .entry((qid, first))
            .or_default()
            .push((seq - first) as usize);
    }

    /// Applies the batch's settles: a chunk whose messages are all settled is deleted,
    /// otherwise its settled bitmap is updated.
    pub(super) fn apply_settles(&mut self, t: &mut Tables<'_>) -> Result<(), Fail> {
        for ((qid, first), indices) in std::mem::take(&mut self.pending_settles) {
            let stored = t.settled.get((qid, first))?.map(|g| g.value().to_vec());
            let mut settled = match stored {
                Some(buf) => Settled::decode(&buf)?,
                None => match t.chunks.get((qid, first))? {
                    Some(chunk) => Settled::none(ChunkView::new(chunk.value())?.count()),
                    None => {
                        tracing::warn!(qid, first, "settled messages of a missing chunk");
                        continue;
                    }
                },
            };
            for i in indices {
                settled.insert(i);
            }
            if settled.all() {
                t.chunks.remove((qid, first))?;
                t.settled.remove((qid, first))?;
            } else {
                t.settled
                    .insert((qid, first), settled.encode().as_slice())?;
            }
        }
        Ok(())
    }

    /// Hands the results a committed batch stored to their `wait_result` callers.
    pub(super) fn notify_result_waiters(&self, results: Vec<(String, Bytes)>) {
        if results.is_empty() {
            return;
        }
        let mut waiters = self.shared.result_waiters.lock();
        for (corr, body) in results {
            if let Some(senders) = waiters.remove(&corr) {
                for s in senders {
                    let _ = s.send(body.clone());
                }
            }
        }
    }
}

/// Reads a stored, unexpired result (used by readers outside the writer thread).
pub(crate) fn read_result(db: &Database, correlation_id: &str) -> Result<Option<Bytes>, Fail> {
    let txn = db.begin_read()?;
    let table = txn.open_table(RESULTS)?;
    let Some(v) = table.get(correlation_id)? else {
        return Ok(None);
    };
    let (expires, body) = decode_expiring(v.value())?;
    if expires <= now_ms() {
        return Ok(None);
    }
    Ok(Some(Bytes::copy_from_slice(body)))
}

#[cfg(test)]
mod tests {
    use super::super::Cmd;
    use super::super::fixture::{LONG_LEASE_MS, TestWriter, quick_config};
    use super::super::schema::{CHUNKS, HISTORY, SCHEDULE, SCHEDULED, SETTLED};
    use super::read_result;
    use crate::{MAX_BODY_BYTES, NackOutcome, NewMessage, QueueError};
    use bytes::Bytes;
    use std::time::{Duration, SystemTime};

    #[test]
    fn ack_of_a_stale_receipt_is_lease_lost() {
        let mut w = TestWriter::new(quick_config());
        w.submit_ids("q", &["a", "b"]);
        let got = w.receive("q", 2, LONG_LEASE_MS);
        w.ack(&got[0].receipt).expect("first ack");
        assert!(matches!(
            w.ack(&got[0].receipt),
            Err(QueueError::LeaseLost(_))
        ));
        assert!(matches!(
            w.nack(&got[0].receipt, None),
            Err(QueueError::LeaseLost(_))
        ));
        assert!(matches!(w.ack("1.2"), Err(QueueError::InvalidArgument(_))));
        // An oversized result is refused and the lease stays.
        let receipt = got[1].receipt.clone();
        let too_big = w.call(|tx| Cmd::Ack {
            receipt: receipt.clone(),
            result: Some(Bytes::from(vec![0u8; MAX_BODY_BYTES + 1])),
            tx,
        });
        assert!(
            matches!(too_big, Err(QueueError::InvalidArgument(_))),
            "{too_big:?}"
        );
        w.ack(&receipt).expect("still leased");
        let s = w.stats_of("q");
        assert_eq!((s.depth, s.in_flight), (0, 0));
    }

    #[test]
    fn nack_schedules_a_retry() {
        let mut w = TestWriter::new(quick_config());
        w.submit_ids("q", &["x", "y"]);
        let got = w.receive("q", 2, LONG_LEASE_MS);
        let before = SystemTime::now();
        let delayed = w.nack(&got[0].receipt, Some(Duration::from_secs(60)));
        let Ok(NackOutcome::Retry { at }) = delayed else {
            panic!("{delayed:?}");
        };
        assert!(at >= before + Duration::from_secs(59), "{at:?}");
        assert_eq!(
            (w.rows(SCHEDULE), w.rows(SCHEDULED), w.rows(HISTORY)),
            (1, 1, 1)
        );
        // Without a delay: the queue's backoff, at most `backoff_max` (40 ms) for attempt 1.
        let backed_off = w.nack(&got[1].receipt, None);
        let Ok(NackOutcome::Retry { at }) = backed_off else {
            panic!("{backed_off:?}");
        };
        assert!(
            at <= SystemTime::now() + Duration::from_millis(40),
            "{at:?}"
        );
        let s = w.stats_of("q");
        assert_eq!((s.depth, s.in_flight), (2, 0));
        std::thread::sleep(Duration::from_millis(50));
        let again = w.receive("q", 2, LONG_LEASE_MS);
        assert_eq!(again.len(), 1, "only y is due");
        assert_eq!((again[0].message_id.as_str(), again[0].attempt), ("y", 2));
    }

    #[test]
    fn ack_stores_the_result_wakes_its_waiter_and_replies() {
        let mut w = TestWriter::new(quick_config());
        let request = NewMessage::new("req", "question")
            .with_correlation_id("corr-1")
            .with_reply_to("replies");
        w.submit("requests", vec![request]);
        let got = w.receive("requests", 1, LONG_LEASE_MS);
        let (waiter, mut answer) = tokio::sync::oneshot::channel();
        w.writer
            .shared
            .result_waiters
            .lock()
            .insert("corr-1".into(), vec![waiter]);
        let receipt = got[0].receipt.clone();
        w.call(|tx| Cmd::Ack {
            receipt,
            result: Some(Bytes::from_static(b"answer")),
            tx,
        })
        .expect("ack");
        assert_eq!(&answer.try_recv().expect("woken")[..], b"answer");
        let db = w.writer.db.clone().expect("open");
        let stored = read_result(&db, "corr-1").expect("read");
        assert_eq!(stored.as_deref(), Some(&b"answer"[..]));
        let reply = w.receive("replies", 1, LONG_LEASE_MS);
        assert_eq!(&reply[0].body[..], b"answer");
        assert_eq!(reply[0].correlation_id, "corr-1");
    }

    #[test]
    fn a_chunk_is_deleted_once_every_message_in_it_is_settled() {
        let mut w = TestWriter::new(quick_config());
        w.submit_ids("q", &["a", "b", "c"]);
        let got = w.receive("q", 3, LONG_LEASE_MS);
        w.ack(&got[1].receipt).expect("ack");
        assert_eq!((w.rows(CHUNKS), w.rows(SETTLED)), (1, 1));
        w.ack(&got[0].receipt).expect("ack");
        w.ack(&got[2].receipt).expect("ack");
        assert_eq!((w.rows(CHUNKS), w.rows(SETTLED)), (0, 0));
    }
}
