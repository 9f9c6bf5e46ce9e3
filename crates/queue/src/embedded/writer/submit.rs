//! Submit: validating messages, suppressing duplicates within the dedup window, and appending
//! records to the queue's open chunk (written when it fills, when something reads the queue,
//! or at the end of the batch); and reading a record back by seq.

use super::batch::Batch;
use super::failure::Fail;
use super::schema::Tables;
use super::{QState, Writer};
use crate::embedded::chunk::{ChunkBuilder, ChunkView};
use crate::embedded::codec::{
    MessageView, QueueRow, decode_expiring, dur_ms, encode_expiring, encode_message_into,
    encode_queue_row, message_len,
};
use crate::{NewMessage, QueueError, SubmitFate, validate_queue_name};
use bytes::Bytes;
use redb::ReadableTable;

impl Writer {
    /// Enqueues `messages` on `queue` (created on first use); one fate per message, in order.
    pub(super) fn submit(
        &mut self,
        t: &mut Tables<'_>,
        batch: &mut Batch,
        queue: &str,
        messages: Vec<NewMessage>,
        now: u64,
    ) -> Result<Result<Vec<SubmitFate>, QueueError>, Fail> {
        if let Err(e) = validate_queue_name(queue) {
            return Ok(Err(e));
        }
        let mut fates = Vec::with_capacity(messages.len());
        for m in &messages {
            fates.push(self.enqueue(t, batch, queue, m, now)?);
        }
        Ok(Ok(fates))
    }

    /// Enqueues one message unless it is invalid or its idempotency key is still in its
    /// dedup window. Also how an ack's result reaches its `reply_to` queue.
    pub(super) fn enqueue(
        &mut self,
        t: &mut Tables<'_>,
        batch: &mut Batch,
        queue: &str,
        m: &NewMessage,
        now: u64,
    ) -> Result<SubmitFate, Fail> {
        if let Some(reason) = m.reject_reason() {
            return Ok(SubmitFate::Rejected { reason });
        }
        let qid = self.queue_id(t, queue)?;
        batch.changed = true;
        if let Some(key) = m.idempotency_key.as_deref() {
            if let Some(v) = t.dedup.get((qid, key))? {
                let (expires, id) = decode_expiring(v.value())?;
                if expires > now {
                    let id = String::from_utf8_lossy(id).into_owned();
                    return Ok(SubmitFate::Duplicate { id });
                }
            }
            let window = dur_ms(self.config.for_queue(queue).dedup_window);
            let expires = now.saturating_add(window);
            t.dedup.insert(
                (qid, key),
                encode_expiring(expires, m.id.as_bytes()).as_slice(),
            )?;
            t.dedup_exp.insert((expires, qid, key), ())?;
            self.expires_at(expires);
        }
        let view = MessageView {
            enqueued_ms: now,
            id: &m.id,
            idempotency_key: m.idempotency_key.as_deref(),
            correlation_id: &m.correlation_id,
            reply_to: m.reply_to.as_deref(),
            body: &m.body,
        };
        self.append(t, qid, message_len(&view), |out| {
            encode_message_into(out, &view)
        })?;
        batch.needs_sync = true;
        batch.accepted += 1;
        Ok(SubmitFate::Accepted { id: m.id.clone() })
    }

    /// The id of queue `name`, creating the queue if it is new.
    fn queue_id(&mut self, t: &mut Tables<'_>, name: &str) -> Result<u32, Fail> {
        if let Some(q) = self.queues.get(name) {
            return Ok(q.id);
        }
        let id = self.next_qid;
        // Only a damaged file gets here (4 billion queues): fail rather than reuse an id.
        self.next_qid = id
            .checked_add(1)
            .ok_or(Fail::Corrupt("every queue id is taken"))?;
        let row = QueueRow {
            id,
            live: 0,
            dead: 0,
        };
        t.queues.insert(name, encode_queue_row(row).as_slice())?;
        self.names.insert(id, name.to_owned());
        self.queues.insert(name.to_owned(), QState::new(id, 0, 0));
        Ok(id)
    }

    /// Appends a message record (`len` bytes, written by `write`) to queue `qid`'s open chunk;
    /// returns its seq. The chunk is written to the table when it fills, when something reads
    /// the queue, or at the end of the batch.
    pub(super) fn append(
        &mut self,
        t: &mut Tables<'_>,
        qid: u32,
        len: usize,
        write: impl FnOnce(&mut Vec<u8>),
    ) -> Result<u64, Fail> {
        // Seqs are global, so a chunk only grows while nothing else took a seq since.
        let next_seq = self.next_seq;
        if next_seq == u64::MAX {
            // Only a damaged file gets here: fail rather than reuse a seq.
            return Err(Fail::Corrupt("every message seq is taken"));
        }
        let extends = self
            .open_chunks
            .get(&qid)
            .is_some_and(|c| c.next_seq() == next_seq && c.fits(len));
        if !extends {
            self.flush_chunk(t, qid)?;
        }
        let seq = self
            .open_chunks
            .entry(qid)
            .or_insert_with(|| ChunkBuilder::new(next_seq))
            .push_with(write);
        self.next_seq = seq + 1;
        self.seq_dirty = true;
        if let Some(q) = self.qstate(qid) {
            // Counters come from the file: a damaged one may hold anything.
            q.live = q.live.saturating_add(1);
            q.tail = seq;
            q.row_dirty = true;
        }
        Ok(seq)
    }

    /// Writes queue `qid`'s open chunk, if any.
    pub(super) fn flush_chunk(&mut self, t: &mut Tables<'_>, qid: u32) -> Result<(), Fail> {
        if let Some(chunk) = self.open_chunks.remove(&qid) {
            if !chunk.is_empty() {
                t.chunks
                    .insert((qid, chunk.first), chunk.encode().as_slice())?;
            }
        }
        Ok(())
    }

    /// Writes every open chunk.
    pub(super) fn flush_open_chunks(&mut self, t: &mut Tables<'_>) -> Result<(), Fail> {
        let qids: Vec<u32> = self.open_chunks.keys().copied().collect();
        for qid in qids {
            self.flush_chunk(t, qid)?;
        }
        Ok(())
    }

    /// The record of message `seq` and the first seq of its chunk.
    pub(super) fn read_record(
        t: &Tables<'_>,
        qid: u32,
        seq: u64,
    ) -> Result<Option<(u64, Bytes)>, Fail> {
        let Some(item) = t.chunks.range((qid, 0u64)..=(qid, seq))?.next_back() else {
            return Ok(None);
        };
        let (k, v) = item?;
        let first = k.value().1;
        let view = ChunkView::new(v.value())?;
        let i = (seq - first) as usize;
        if i >= view.count() {
            return Ok(None);
        }
        Ok(Some((first, Bytes::copy_from_slice(view.record(i)?))))
    }
}

#[cfg(test)]
mod tests {
    use super::super::Cmd;
    use super::super::fixture::{TestWriter, quick_config};
    use super::super::schema::{CHUNKS, DEDUP};
    use crate::{MAX_BODY_BYTES, NewMessage, QueueConfig, QueueError, SubmitFate};
    use std::time::Duration;

    #[test]
    fn duplicates_within_the_dedup_window_name_the_first_message() {
        let short = QueueConfig {
            dedup_window: Duration::from_millis(40),
            ..quick_config().defaults
        };
        let mut w = TestWriter::new(quick_config().with_queue("short", short));
        let fates = w.submit(
            "short",
            vec![
                NewMessage::new("a", "a").with_idempotency_key("k1"),
                NewMessage::new("b", "b").with_idempotency_key("k1"),
                NewMessage::new("c", "c").with_idempotency_key("k2"),
            ],
        );
        assert_eq!(
            fates,
            [
                SubmitFate::Accepted { id: "a".into() },
                SubmitFate::Duplicate { id: "a".into() },
                SubmitFate::Accepted { id: "c".into() },
            ]
        );
        assert_eq!(w.rows(DEDUP), 2);
        // Keys are per queue.
        let other = w.submit(
            "other",
            vec![NewMessage::new("d", "d").with_idempotency_key("k1")],
        );
        assert_eq!(other, [SubmitFate::Accepted { id: "d".into() }]);
        // Past the window the key is free again, even before a sweep deletes it.
        std::thread::sleep(Duration::from_millis(60));
        let again = w.submit(
            "short",
            vec![NewMessage::new("e", "e").with_idempotency_key("k1")],
        );
        assert_eq!(again, [SubmitFate::Accepted { id: "e".into() }]);
        assert_eq!(w.stats_of("short").depth, 3);
    }

    #[test]
    fn invalid_messages_are_rejected_one_by_one() {
        let mut w = TestWriter::new(quick_config());
        let long = "x".repeat(1025);
        let fates = w.submit(
            "q",
            vec![
                NewMessage::new("", "empty id"),
                NewMessage::new("big", vec![0u8; MAX_BODY_BYTES + 1]),
                NewMessage::new("key", "k").with_idempotency_key(long.clone()),
                NewMessage::new("corr", "c").with_correlation_id(long),
                NewMessage::new("reply", "r").with_reply_to(""),
                NewMessage::new("ok", "ok"),
            ],
        );
        for (fate, why) in
            fates
                .iter()
                .zip(["empty", "body", "idempotency", "correlation", "reply_to"])
        {
            assert!(
                matches!(fate, SubmitFate::Rejected { reason } if reason.contains(why)),
                "{why}: {fate:?}"
            );
        }
        assert_eq!(fates[5], SubmitFate::Accepted { id: "ok".into() });
        assert_eq!(w.stats_of("q").depth, 1);
        let bad_queue = w.call(|tx| Cmd::Submit {
            queue: String::new(),
            messages: vec![NewMessage::new("m", "m")],
            tx,
        });
        assert!(
            matches!(bad_queue, Err(QueueError::InvalidArgument(_))),
            "{bad_queue:?}"
        );
    }

    #[test]
    fn a_batch_fills_one_chunk_until_it_is_full() {
        let mut w = TestWriter::new(quick_config());
        let ids: Vec<String> = (0..100).map(|i| format!("m{i}")).collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        w.submit_ids("q", &ids);
        assert_eq!(w.rows(CHUNKS), 1, "100 small messages share one chunk");
        // Two 20 KiB messages do not fit one 31 KiB chunk.
        let big = |id: &str| NewMessage::new(id, vec![b'x'; 20 * 1024]);
        w.submit("q", vec![big("big1"), big("big2")]);
        assert_eq!(w.rows(CHUNKS), 3);
        let got = w.receive("q", 200, 30_000);
        assert_eq!(got.len(), 102);
        assert_eq!(&got[0].body[..], b"m0");
        assert_eq!(got[101].message_id, "big2");
        assert_eq!(got[101].body.len(), 20 * 1024);
    }

    #[test]
    fn chunks_of_interleaved_queues_stay_apart() {
        let mut w = TestWriter::new(quick_config());
        // Seqs are global: a chunk only grows while no other queue took a seq in between.
        let (a, b) = (
            tokio::sync::oneshot::channel(),
            tokio::sync::oneshot::channel(),
        );
        let submit = |queue: &str, id: &str, tx| Cmd::Submit {
            queue: queue.into(),
            messages: vec![NewMessage::new(id, id.to_owned())],
            tx,
        };
        let c = tokio::sync::oneshot::channel();
        w.writer.run_batch(
            vec![
                submit("a", "a1", a.0),
                submit("b", "b1", b.0),
                submit("a", "a2", c.0),
            ],
            false,
        );
        for mut rx in [a.1, b.1, c.1] {
            assert!(rx.try_recv().expect("answered").is_ok());
        }
        assert_eq!(w.rows(CHUNKS), 3);
        let ids: Vec<String> = w
            .receive("a", 10, 30_000)
            .into_iter()
            .map(|m| m.message_id)
            .collect();
        assert_eq!(ids, ["a1", "a2"]);
    }
}
