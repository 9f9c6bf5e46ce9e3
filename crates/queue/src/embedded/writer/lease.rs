//! Leases: handing picked messages out under a lease, receipts, extending and releasing
//! leases, lapsing expired ones (a failed attempt), and putting back deliveries nobody took.

use super::Writer;
use super::batch::Batch;
use super::failure::Fail;
use super::receive::Pick;
use super::schema::Tables;
use crate::embedded::codec::{decode_message, ms_to_time};
use crate::{Leased, QueueError};
use redb::ReadableTable;
use std::cmp::Reverse;
use std::sync::Arc;
use std::time::SystemTime;

/// `(queue id, seq, lease token)`.
pub(super) type LeaseKey = (u32, u64, u64);

/// A live lease on one message.
pub(super) struct Lease {
    pub(super) token: u64,
    /// First seq of the chunk holding the message.
    pub(super) chunk: u64,
    /// Shared by every lease of one receive.
    pub(super) consumer: Arc<str>,
    pub(super) delivered_ms: u64,
    pub(super) expires_ms: u64,
    pub(super) attempt: u32,
}

/// The lease a receipt (`"{queue id}.{seq}.{token}"`) names.
pub(super) fn parse_receipt(receipt: &str) -> Result<LeaseKey, QueueError> {
    let bad = || QueueError::InvalidArgument(format!("malformed receipt {receipt:?}"));
    let mut parts = receipt.split('.');
    let mut next = || parts.next().ok_or_else(bad);
    let qid = next()?.parse::<u32>().map_err(|_| bad())?;
    let seq = next()?.parse::<u64>().map_err(|_| bad())?;
    let token = next()?.parse::<u64>().map_err(|_| bad())?;
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok((qid, seq, token))
}

pub(super) fn lease_lost(receipt: &str) -> QueueError {
    QueueError::LeaseLost(format!(
        "receipt {receipt} is no longer valid: its lease lapsed or it was already settled"
    ))
}

/// The number of failed attempts in an encoded history (its leading count).
fn history_len(buf: &[u8]) -> u32 {
    buf.get(..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .unwrap_or(0)
}

impl Writer {
    /// Leases up to `max` ready messages of queue `qid` to `consumer` for `lease_ms`; returns
    /// the deliveries and their lease keys.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn lease_ready(
        &mut self,
        t: &mut Tables<'_>,
        batch: &mut Batch,
        qid: u32,
        consumer: &str,
        max: usize,
        lease_ms: u64,
        now: u64,
    ) -> Result<(Vec<Leased>, Vec<LeaseKey>), Fail> {
        let picks = self.pick_ready(t, batch, qid, max, now)?;
        let mut leased = Vec::with_capacity(picks.len());
        let mut keys = Vec::with_capacity(picks.len());
        let consumer: Arc<str> = Arc::from(consumer);
        let expires_ms = now.saturating_add(lease_ms);
        for Pick { seq, fresh, found } in picks {
            let (chunk, rec) = match found {
                Some(found) => found,
                None => match Self::read_record(t, qid, seq)? {
                    Some(found) => found,
                    None => {
                        tracing::warn!(qid, seq, "ready message has no record; skipping it");
                        continue;
                    }
                },
            };
            let m = decode_message(&rec)?;
            let attempt = if fresh {
                1
            } else {
                t.history
                    .get((qid, seq))?
                    .map_or(0, |h| history_len(h.value()))
                    + 1
            };
            let token = self.next_token;
            self.next_token += 1;
            leased.push(Leased {
                receipt: format!("{qid}.{seq}.{token}"),
                message_id: m.id.to_owned(),
                correlation_id: m.correlation_id.to_owned(),
                body: rec.slice_ref(m.body),
                attempt,
                lease_expires_at: ms_to_time(expires_ms),
                enqueued_at: ms_to_time(m.enqueued_ms),
            });
            self.leases.insert(
                (qid, seq),
                Lease {
                    token,
                    chunk,
                    consumer: consumer.clone(),
                    delivered_ms: now,
                    expires_ms,
                    attempt,
                },
            );
            self.lease_heap.push(Reverse((expires_ms, qid, seq, token)));
            keys.push((qid, seq, token));
        }
        if let Some(q) = self.qstate(qid) {
            q.in_flight += keys.len() as u64;
        }
        Ok((leased, keys))
    }

    /// Removes and returns the live lease matching `key`.
    pub(super) fn take_lease(&mut self, (qid, seq, token): LeaseKey, now: u64) -> Option<Lease> {
        match self.leases.get(&(qid, seq)) {
            Some(l) if l.token == token && l.expires_ms > now => self.leases.remove(&(qid, seq)),
            _ => None,
        }
    }

    /// Extends the live lease `receipt` names to `lease_ms` from now; returns its new expiry.
    pub(super) fn extend(
        &mut self,
        receipt: &str,
        lease_ms: u64,
        now: u64,
    ) -> Result<SystemTime, QueueError> {
        let (qid, seq, token) = parse_receipt(receipt)?;
        match self.leases.get_mut(&(qid, seq)) {
            Some(l) if l.token == token && l.expires_ms > now => {
                l.expires_ms = now.saturating_add(lease_ms);
                self.lease_heap
                    .push(Reverse((l.expires_ms, qid, seq, token)));
                Ok(ms_to_time(l.expires_ms))
            }
            _ => Err(lease_lost(receipt)),
        }
    }

    /// Hands the leases `receipts` name back without a failed attempt; returns how many
    /// were live.
    pub(super) fn release(&mut self, receipts: &[String]) -> u64 {
        let mut released = 0u64;
        for receipt in receipts {
            // Malformed or stale receipts are ignored: there is nothing to put back.
            if let Ok(key) = parse_receipt(receipt) {
                if self.put_back(key) {
                    released += 1;
                }
            }
        }
        released
    }

    /// Lapses every lease whose time is up: a failed attempt ("lease expired"), after which
    /// the message is ready again at once (or dead-lettered on its last attempt).
    pub(super) fn expire_leases(
        &mut self,
        t: &mut Tables<'_>,
        batch: &mut Batch,
        now: u64,
    ) -> Result<(), Fail> {
        while let Some(&Reverse((exp, qid, seq, token))) = self.lease_heap.peek() {
            if exp > now {
                break;
            }
            self.lease_heap.pop();
            let current = matches!(
                self.leases.get(&(qid, seq)),
                Some(l) if l.token == token && l.expires_ms == exp
            );
            if !current {
                continue;
            }
            if let Some(lease) = self.leases.remove(&(qid, seq)) {
                self.fail_attempt(t, batch, (qid, seq), lease, "lease expired", Some(0), now)?;
            }
        }
        Ok(())
    }

    /// Puts back messages whose receive reply could not be delivered (not a failed attempt).
    pub(super) fn release_orphans(&mut self) {
        for key in std::mem::take(&mut self.orphans) {
            self.put_back(key);
        }
    }

    /// Ends the lease `key` (if it is still the current one) and makes its message ready at
    /// once, without recording a failed attempt; returns whether a lease was ended.
    fn put_back(&mut self, (qid, seq, token): LeaseKey) -> bool {
        if !matches!(self.leases.get(&(qid, seq)), Some(l) if l.token == token) {
            return false;
        }
        self.leases.remove(&(qid, seq));
        if let Some(q) = self.qstate(qid) {
            q.in_flight = q.in_flight.saturating_sub(1);
            q.redeliver.push_back(seq);
        }
        true
    }

    /// Drops stale heap entries (acked or extended leases) once they dominate the heap.
    pub(super) fn maybe_compact_heap(&mut self) {
        if self.lease_heap.len() > 1024 && self.lease_heap.len() > 2 * self.leases.len() {
            self.lease_heap = self
                .leases
                .iter()
                .map(|(&(qid, seq), l)| Reverse((l.expires_ms, qid, seq, l.token)))
                .collect();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::Cmd;
    use super::super::fixture::{LONG_LEASE_MS, TestWriter, quick_config};
    use super::super::schema::HISTORY;
    use super::parse_receipt;
    use crate::QueueError;
    use crate::embedded::codec::now_ms;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn a_lapsed_lease_counts_an_attempt_and_the_message_is_ready_again() {
        let mut w = TestWriter::new(quick_config());
        w.submit_ids("q", &["x"]);
        let first = w.receive("q", 1, 200);
        assert_eq!(first[0].attempt, 1);
        assert!(w.receive("q", 1, LONG_LEASE_MS).is_empty(), "leased");
        std::thread::sleep(Duration::from_millis(250));
        let again = w.receive("q", 1, LONG_LEASE_MS);
        assert_eq!(again[0].message_id, "x");
        assert_eq!(again[0].attempt, 2);
        assert_eq!(w.rows(HISTORY), 1, "the lapse is in the history");
        assert!(matches!(
            w.ack(&first[0].receipt),
            Err(QueueError::LeaseLost(_))
        ));
        w.ack(&again[0].receipt).expect("ack");
        assert_eq!(w.rows(HISTORY), 0);
    }

    #[test]
    fn extend_outlives_the_original_lease() {
        let mut w = TestWriter::new(quick_config());
        w.submit_ids("q", &["x"]);
        let got = w.receive("q", 1, 200);
        let receipt = got[0].receipt.clone();
        let until = w
            .call(|tx| Cmd::Extend {
                receipt: receipt.clone(),
                lease_ms: LONG_LEASE_MS,
                tx,
            })
            .expect("extend");
        let until_ms = until
            .duration_since(UNIX_EPOCH)
            .expect("after epoch")
            .as_millis() as u64;
        assert!(until_ms > now_ms() + LONG_LEASE_MS - 1_000);
        std::thread::sleep(Duration::from_millis(250));
        assert!(w.receive("q", 1, LONG_LEASE_MS).is_empty(), "still leased");
        w.ack(&receipt).expect("the extended lease is live");
    }

    #[test]
    fn release_hands_back_without_an_attempt() {
        let mut w = TestWriter::new(quick_config());
        w.submit_ids("q", &["x", "y"]);
        let got = w.receive("q", 2, LONG_LEASE_MS);
        let receipts = vec![
            got[0].receipt.clone(),
            got[0].receipt.clone(),
            "not-a-receipt".into(),
        ];
        let released = w.call(|tx| Cmd::Release { receipts, tx });
        assert_eq!(released.expect("release"), 1, "one live lease among them");
        assert_eq!(w.stats_of("q").in_flight, 1);
        let again = w.receive("q", 2, LONG_LEASE_MS);
        assert_eq!(again[0].message_id, "x");
        assert_eq!(again[0].attempt, 1);
        assert_eq!(w.rows(HISTORY), 0);
    }

    #[test]
    fn an_orphaned_delivery_is_put_back_in_the_next_turn() {
        let mut w = TestWriter::new(quick_config());
        w.submit_ids("q", &["x"]);
        let got = w.receive("q", 1, LONG_LEASE_MS);
        // As if the receive's caller had gone before its answer was sent.
        let key = parse_receipt(&got[0].receipt).expect("receipt");
        w.writer.orphans.push(key);
        assert_eq!(w.writer.time_to_next_wake(), Some(Duration::ZERO));
        w.tick();
        let again = w.receive("q", 1, LONG_LEASE_MS);
        assert_eq!((again[0].message_id.as_str(), again[0].attempt), ("x", 1));
        assert!(matches!(
            w.ack(&got[0].receipt),
            Err(QueueError::LeaseLost(_))
        ));
    }

    #[test]
    fn receipts_name_queue_seq_and_token() {
        assert_eq!(parse_receipt("1.2.3").expect("valid"), (1, 2, 3));
        for bad in ["", "1.2", "1.2.3.4", "a.2.3", "1.-2.3"] {
            assert!(
                matches!(parse_receipt(bad), Err(QueueError::InvalidArgument(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn stale_expiry_entries_are_compacted() {
        let mut w = TestWriter::new(quick_config());
        w.submit_ids("q", &["x"]);
        let receipt = w.receive("q", 1, LONG_LEASE_MS)[0].receipt.clone();
        for _ in 0..1100 {
            w.writer
                .extend(&receipt, LONG_LEASE_MS, now_ms())
                .expect("extend");
        }
        assert!(w.writer.lease_heap.len() > 1100);
        w.tick();
        assert_eq!(w.writer.lease_heap.len(), 1);
        w.ack(&receipt).expect("ack");
    }
}
