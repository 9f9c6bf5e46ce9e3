//! Dead letters: a message that used its last attempt moves to the queue's dead set with its
//! attempt history; the dead set is listed a page at a time, redriven (back to the tail of the
//! queue with a fresh attempt count) or purged.

use super::Writer;
use super::batch::Batch;
use super::failure::Fail;
use super::schema::Tables;
use super::sweep::SWEEP_CHUNK;
use crate::embedded::codec::{
    DeadView, decode_dead, decode_history, decode_message, encode_dead, ms_to_time,
};
use crate::{AttemptRecord, DeadLetter, QueueError, Selection, validate_queue_name};
use bytes::Bytes;
use redb::ReadableTable;
use std::collections::HashSet;

/// A page of dead letters and the next page token.
type DeadPage = (Vec<DeadLetter>, Option<String>);

impl Writer {
    /// Moves message `seq` (in the chunk starting at `chunk`) to the dead set, with `history`
    /// (encoded, its last attempt included) and the last attempt's `error`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn dead_letter(
        &mut self,
        t: &mut Tables<'_>,
        batch: &mut Batch,
        (qid, seq): (u32, u64),
        chunk: u64,
        error: &str,
        history: &[u8],
        now: u64,
    ) -> Result<(), Fail> {
        let rec = Self::read_record(t, qid, seq)?.map(|(_, rec)| rec);
        t.history.remove((qid, seq))?;
        self.settle(batch, qid, chunk, seq);
        if let Some(q) = self.qstate(qid) {
            q.in_flight = q.in_flight.saturating_sub(1);
            q.live = q.live.saturating_sub(1);
            q.row_dirty = true;
            if rec.is_some() {
                q.dead = q.dead.saturating_add(1);
            }
        }
        if let Some(rec) = rec {
            let dead = encode_dead(&DeadView {
                dead_ms: now,
                last_error: error,
                history,
                message: &rec,
            });
            t.dead.insert((qid, seq), dead.as_slice())?;
        }
        Ok(())
    }

    /// The id of an existing queue (dead-letter requests never create one).
    fn known_queue(&self, queue: &str) -> Result<u32, QueueError> {
        validate_queue_name(queue)?;
        self.queues
            .get(queue)
            .map(|q| q.id)
            .ok_or_else(|| QueueError::NotFound(format!("queue {queue:?} does not exist")))
    }

    /// One page of `queue`'s dead letters, oldest first, after the page token `after`.
    pub(super) fn list_dead(
        &self,
        t: &mut Tables<'_>,
        queue: &str,
        page_size: usize,
        after: Option<&str>,
    ) -> Result<Result<DeadPage, QueueError>, Fail> {
        let qid = match self.known_queue(queue) {
            Ok(id) => id,
            Err(e) => return Ok(Err(e)),
        };
        let start = match after {
            None => 0,
            Some(token) => match token.parse::<u64>() {
                Ok(seq) => seq.saturating_add(1),
                Err(_) => {
                    return Ok(Err(QueueError::InvalidArgument(format!(
                        "malformed page token {token:?}"
                    ))));
                }
            },
        };
        let page_size = page_size.clamp(1, 1000);
        let mut out = Vec::new();
        let mut last_seq = None;
        let mut more = false;
        for item in t.dead.range((qid, start)..=(qid, u64::MAX))? {
            let (k, v) = item?;
            if out.len() == page_size {
                more = true;
                break;
            }
            let d = decode_dead(v.value())?;
            let m = decode_message(d.message)?;
            out.push(DeadLetter {
                message_id: m.id.to_owned(),
                correlation_id: m.correlation_id.to_owned(),
                reply_to: m.reply_to.map(str::to_owned),
                body: Bytes::copy_from_slice(m.body),
                enqueued_at: ms_to_time(m.enqueued_ms),
                dead_lettered_at: ms_to_time(d.dead_ms),
                last_error: d.last_error.to_owned(),
                attempts: decode_history(d.history)?
                    .into_iter()
                    .map(|a| AttemptRecord {
                        attempt: a.attempt,
                        delivered_at: ms_to_time(a.delivered_ms),
                        consumer_id: a.consumer_id,
                        error: a.error,
                    })
                    .collect(),
            });
            last_seq = Some(k.value().1);
        }
        let next = if more {
            last_seq.map(|s| s.to_string())
        } else {
            None
        };
        Ok(Ok((out, next)))
    }

    /// Redrives (`redrive`) or purges the selected dead letters of `queue`; returns how many.
    pub(super) fn redrive_or_purge(
        &mut self,
        t: &mut Tables<'_>,
        batch: &mut Batch,
        queue: &str,
        selection: &Selection,
        redrive: bool,
    ) -> Result<Result<u64, QueueError>, Fail> {
        let qid = match self.known_queue(queue) {
            Ok(id) => id,
            Err(e) => return Ok(Err(e)),
        };
        let mut moved = 0u64;
        let mut cursor = 0u64;
        let wanted: Option<HashSet<&str>> = match selection {
            Selection::All => None,
            Selection::Ids(ids) => Some(ids.iter().map(String::as_str).collect()),
        };
        loop {
            // Walk the dead set in chunks so memory stays bounded however many there are.
            let mut chunk = Vec::new();
            for item in t
                .dead
                .range((qid, cursor)..=(qid, u64::MAX))?
                .take(SWEEP_CHUNK)
            {
                let (k, v) = item?;
                let seq = k.value().1;
                let pick = match &wanted {
                    None => true,
                    Some(ids) => ids.contains(decode_message(decode_dead(v.value())?.message)?.id),
                };
                chunk.push((seq, pick));
            }
            let Some(&(last, _)) = chunk.last() else {
                break;
            };
            for (seq, pick) in chunk {
                if !pick {
                    continue;
                }
                let Some(v) = t.dead.remove((qid, seq))?.map(|g| g.value().to_vec()) else {
                    continue;
                };
                batch.changed = true;
                moved += 1;
                if redrive {
                    // Back at the tail of the queue (a new seq), with a fresh attempt count.
                    let message = decode_dead(&v)?.message;
                    self.append(t, qid, message.len(), |out| out.extend_from_slice(message))?;
                }
            }
            match last.checked_add(1) {
                Some(c) => cursor = c,
                None => break,
            }
        }
        if let Some(q) = self.qstate(qid) {
            q.dead = q.dead.saturating_sub(moved);
            q.row_dirty = true;
        }
        Ok(Ok(moved))
    }
}

#[cfg(test)]
mod tests {
    use super::super::Cmd;
    use super::super::fixture::{LONG_LEASE_MS, TestWriter, quick_config};
    use super::super::schema::{CHUNKS, DEAD, HISTORY};
    use crate::{BackendConfig, DeadLetter, NackOutcome, QueueConfig, QueueError, Selection};
    use std::time::Duration;

    /// One attempt per message: the first failure dead-letters it.
    fn one_attempt() -> BackendConfig {
        BackendConfig::new(QueueConfig {
            max_attempts: 1,
            ..quick_config().defaults
        })
    }

    fn list(
        w: &mut TestWriter,
        queue: &str,
        page_size: usize,
        after: Option<&str>,
    ) -> Result<(Vec<DeadLetter>, Option<String>), QueueError> {
        let (queue, after) = (queue.to_owned(), after.map(str::to_owned));
        w.call(|tx| Cmd::ListDead {
            queue,
            page_size,
            after,
            tx,
        })
    }

    fn kill(w: &mut TestWriter, queue: &str, ids: &[&str]) {
        w.submit_ids(queue, ids);
        for m in w.receive(queue, ids.len(), LONG_LEASE_MS) {
            assert_eq!(w.nack(&m.receipt, None), Ok(NackOutcome::DeadLettered));
        }
    }

    #[test]
    fn the_last_failed_attempt_dead_letters_with_its_history() {
        let mut w = TestWriter::new(BackendConfig::new(QueueConfig {
            max_attempts: 2,
            ..quick_config().defaults
        }));
        w.submit_ids("q", &["x"]);
        let first = w.receive("q", 1, LONG_LEASE_MS);
        let retry = w.nack(&first[0].receipt, Some(Duration::ZERO));
        assert!(matches!(retry, Ok(NackOutcome::Retry { .. })), "{retry:?}");
        let second = w.receive("q", 1, LONG_LEASE_MS);
        assert_eq!(second[0].attempt, 2);
        assert_eq!(
            w.nack(&second[0].receipt, None),
            Ok(NackOutcome::DeadLettered)
        );
        let s = w.stats_of("q");
        assert_eq!((s.depth, s.in_flight, s.dead_letters), (0, 0, 1));
        assert_eq!((w.rows(DEAD), w.rows(HISTORY), w.rows(CHUNKS)), (1, 0, 0));
        let (dead, next) = list(&mut w, "q", 10, None).expect("list");
        assert_eq!(next, None);
        assert_eq!(dead[0].message_id, "x");
        assert_eq!(dead[0].last_error, "failed");
        let attempts: Vec<u32> = dead[0].attempts.iter().map(|a| a.attempt).collect();
        assert_eq!(attempts, [1, 2]);
    }

    #[test]
    fn a_lease_lapsing_on_the_last_attempt_dead_letters() {
        let mut w = TestWriter::new(one_attempt());
        w.submit_ids("q", &["x"]);
        w.receive("q", 1, 10);
        std::thread::sleep(Duration::from_millis(20));
        w.tick();
        let (dead, _) = list(&mut w, "q", 10, None).expect("list");
        assert_eq!(dead[0].last_error, "lease expired");
        assert_eq!(w.stats_of("q").dead_letters, 1);
    }

    #[test]
    fn redrive_returns_dead_letters_with_a_fresh_attempt_count() {
        let mut w = TestWriter::new(one_attempt());
        kill(&mut w, "q", &["x", "y"]);
        let moved = w.call(|tx| Cmd::Redrive {
            queue: "q".into(),
            selection: Selection::Ids(vec!["y".into(), "unknown".into()]),
            tx,
        });
        assert_eq!(moved, Ok(1));
        let got = w.receive("q", 10, LONG_LEASE_MS);
        assert_eq!(
            (got.len(), got[0].message_id.as_str(), got[0].attempt),
            (1, "y", 1)
        );
        let s = w.stats_of("q");
        assert_eq!((s.in_flight, s.dead_letters), (1, 1));
    }

    #[test]
    fn dead_letters_page_and_purge() {
        let mut w = TestWriter::new(one_attempt());
        kill(&mut w, "q", &["a", "b", "c"]);
        let (page, next) = list(&mut w, "q", 2, None).expect("list");
        assert_eq!(page.len(), 2);
        let (rest, last) = list(&mut w, "q", 2, next.as_deref()).expect("list");
        assert_eq!(
            (rest.len(), rest[0].message_id.as_str(), last),
            (1, "c", None)
        );
        let bad = list(&mut w, "q", 2, Some("x"));
        assert!(
            matches!(bad, Err(QueueError::InvalidArgument(_))),
            "{bad:?}"
        );
        let unknown = list(&mut w, "never-used", 2, None);
        assert!(
            matches!(unknown, Err(QueueError::NotFound(_))),
            "{unknown:?}"
        );
        let purged = w.call(|tx| Cmd::Purge {
            queue: "q".into(),
            selection: Selection::All,
            tx,
        });
        assert_eq!(purged, Ok(3));
        assert_eq!(w.rows(DEAD), 0);
        assert_eq!(w.stats_of("q").dead_letters, 0);
    }
}
