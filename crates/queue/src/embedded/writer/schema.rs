//! The tables of the store, opening the file, converting the earlier layout, and rebuilding
//! the writer's in-memory state from disk (at open, and after a failed batch).

use super::failure::{Fail, contain, panic_message};
use super::{QState, Writer};
use crate::embedded::chunk::{ChunkBuilder, ChunkView};
use crate::embedded::codec::{decode_queue_row, now_ms};
use crate::embedded::{EmbeddedOptions, Shared};
use crate::{BackendConfig, QueueError};
use redb::{Database, ReadableTable, Table, TableDefinition, TableHandle, WriteTransaction};
use std::collections::{BinaryHeap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Queue name → encoded `QueueRow` (see `codec`).
pub(super) const QUEUES: TableDefinition<&str, &[u8]> = TableDefinition::new("queues");
/// Counters such as `next_seq`.
pub(super) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// `(queue id, first seq)` → a chunk of messages appended together (see `chunk`); deleted
/// once every message in it is settled (acked or dead-lettered).
pub(super) const CHUNKS: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("chunks");
/// `(queue id, first seq)` → which messages of a partly settled chunk are settled.
pub(super) const SETTLED: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("settled");
/// `(queue id, seq)` → encoded failed attempts, only for messages that failed at least once.
pub(super) const HISTORY: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("history");
/// `(queue id, due ms, seq)`: messages waiting for a retry (nacked with a delay), in due
/// order. Every other live message is ready or leased, which only memory tracks.
pub(super) const SCHEDULE: TableDefinition<(u32, u64, u64), ()> = TableDefinition::new("schedule");
/// `(queue id, seq)` → due ms: the same set as `SCHEDULE`, by message, so that the ready scan
/// after a restart can tell a waiting message from a ready one.
pub(super) const SCHEDULED: TableDefinition<(u32, u64), u64> = TableDefinition::new("scheduled");
/// Tables of the earlier layout (every ready message indexed, leases persisted); migrated on
/// open.
const LEGACY_READY: TableDefinition<(u32, u64, u64), ()> = TableDefinition::new("ready");
const LEGACY_INFLIGHT: TableDefinition<(u32, u64), ()> = TableDefinition::new("inflight");
const LEGACY_MESSAGES: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("messages");
/// `(queue id, seq)` → encoded dead letter (header, history, message).
pub(super) const DEAD: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("dead");
/// `(queue id, idempotency key)` → `(expires ms, message id)`.
pub(super) const DEDUP: TableDefinition<(u32, &str), &[u8]> = TableDefinition::new("dedup");
/// `(expires ms, queue id, idempotency key)`: expiry index of `DEDUP`.
pub(super) const DEDUP_EXP: TableDefinition<(u64, u32, &str), ()> =
    TableDefinition::new("dedup_exp");
/// Correlation id → `(expires ms, result body)`.
pub(super) const RESULTS: TableDefinition<&str, &[u8]> = TableDefinition::new("results");
/// `(expires ms, correlation id)`: expiry index of `RESULTS`.
pub(super) const RESULTS_EXP: TableDefinition<(u64, &str), ()> =
    TableDefinition::new("results_exp");

/// Key in `META` of the next message seq (seqs are global across queues).
pub(super) const NEXT_SEQ: &str = "next_seq";

/// All tables of one write transaction.
pub(super) struct Tables<'t> {
    pub(super) queues: Table<'t, &'static str, &'static [u8]>,
    pub(super) meta: Table<'t, &'static str, u64>,
    pub(super) chunks: Table<'t, (u32, u64), &'static [u8]>,
    pub(super) settled: Table<'t, (u32, u64), &'static [u8]>,
    pub(super) history: Table<'t, (u32, u64), &'static [u8]>,
    pub(super) schedule: Table<'t, (u32, u64, u64), ()>,
    pub(super) scheduled: Table<'t, (u32, u64), u64>,
    pub(super) dead: Table<'t, (u32, u64), &'static [u8]>,
    pub(super) dedup: Table<'t, (u32, &'static str), &'static [u8]>,
    pub(super) dedup_exp: Table<'t, (u64, u32, &'static str), ()>,
    pub(super) results: Table<'t, &'static str, &'static [u8]>,
    pub(super) results_exp: Table<'t, (u64, &'static str), ()>,
}

impl<'t> Tables<'t> {
    /// Opens every table, creating the missing ones.
    pub(super) fn open(txn: &'t WriteTransaction) -> Result<Self, Fail> {
        Ok(Self {
            queues: txn.open_table(QUEUES)?,
            meta: txn.open_table(META)?,
            chunks: txn.open_table(CHUNKS)?,
            settled: txn.open_table(SETTLED)?,
            history: txn.open_table(HISTORY)?,
            schedule: txn.open_table(SCHEDULE)?,
            scheduled: txn.open_table(SCHEDULED)?,
            dead: txn.open_table(DEAD)?,
            dedup: txn.open_table(DEDUP)?,
            dedup_exp: txn.open_table(DEDUP_EXP)?,
            results: txn.open_table(RESULTS)?,
            results_exp: txn.open_table(RESULTS_EXP)?,
        })
    }
}

/// Opens (or creates) the database file with a page cache of `cache_bytes`.
pub(crate) fn open_database(
    path: &Path,
    cache_bytes: usize,
) -> Result<Arc<Database>, redb::DatabaseError> {
    // redb panics on some damaged files instead of returning an error.
    std::panic::catch_unwind(|| {
        redb::Builder::new()
            .set_cache_size(cache_bytes)
            .create(path)
    })
    .unwrap_or_else(|payload| {
        Err(redb::DatabaseError::Storage(redb::StorageError::Corrupted(
            format!("the file is damaged ({})", panic_message(payload.as_ref())),
        )))
    })
    .map(Arc::new)
}

impl Writer {
    /// Opens (creating if needed) every table, loads the queue rows and makes every message
    /// that was leased when the process stopped ready again.
    pub(crate) fn recover(
        db: Arc<Database>,
        path: PathBuf,
        config: BackendConfig,
        options: EmbeddedOptions,
        shared: Arc<Shared>,
    ) -> Result<Self, QueueError> {
        let mut w = Self {
            db: Some(db),
            reopen_failed_at: None,
            failure_logged_at: None,
            failures_not_logged: 0,
            path,
            config,
            options,
            shared,
            queues: HashMap::new(),
            names: HashMap::new(),
            waiters: HashMap::new(),
            leases: HashMap::new(),
            lease_heap: BinaryHeap::new(),
            orphans: Vec::new(),
            next_seq: 1,
            seq_dirty: false,
            next_qid: 1,
            next_token: rand::random::<u32>() as u64,
            unsynced: false,
            last_sync: Instant::now(),
            last_sweep_ms: 0,
            next_expiry_ms: None,
            next_ready_ms: None,
            open_chunks: HashMap::new(),
            pending_settles: HashMap::new(),
        };
        w.reload().map_err(|e| w.storage("recovering", &e))?;
        Ok(w)
    }

    /// Rebuilds the in-memory state from disk (at open, or after a failed commit).
    ///
    /// Leases are not persisted: every live message that is not waiting in the schedule is
    /// ready again, found by the ready scan from the start of its queue.
    pub(super) fn reload(&mut self) -> Result<(), Fail> {
        contain(|| self.load())
    }

    fn load(&mut self) -> Result<(), Fail> {
        self.queues.clear();
        self.names.clear();
        self.leases.clear();
        self.lease_heap.clear();
        self.orphans.clear();
        self.open_chunks.clear();
        self.pending_settles.clear();
        let txn = self.db()?.begin_write()?;
        migrate_legacy_tables(&txn, now_ms())?;
        {
            let t = Tables::open(&txn)?;
            self.next_seq = t.meta.get(NEXT_SEQ)?.map_or(1, |v| v.value());
            self.seq_dirty = false;
            for item in t.queues.iter()? {
                let (k, v) = item?;
                let row = decode_queue_row(v.value())?;
                self.next_qid = self.next_qid.max(row.id.saturating_add(1));
                if self.names.insert(row.id, k.value().to_owned()).is_some() {
                    return Err(Fail::Corrupt("two queues share an id"));
                }
                let mut q = QState::new(row.id, row.live, row.dead);
                q.recovered_max = self.next_seq.saturating_sub(1);
                if let Some(last) = t
                    .chunks
                    .range((row.id, 0u64)..=(row.id, u64::MAX))?
                    .next_back()
                {
                    let (k, v) = last?;
                    let count = ChunkView::new(v.value())?.count() as u64;
                    q.tail = (k.value().1.saturating_add(count)).saturating_sub(1);
                }
                // New messages must not take a seq this queue already used: a damaged
                // `next_seq` must not make them overwrite stored ones.
                let used = [
                    q.tail,
                    last_seq(&t.dead, row.id)?,
                    last_seq(&t.history, row.id)?,
                    last_seq(&t.settled, row.id)?,
                ];
                let highest = used.into_iter().max().unwrap_or(0);
                self.next_seq = self.next_seq.max(highest.saturating_add(1));
                q.recovered_max = q.recovered_max.max(highest);
                self.queues.insert(k.value().to_owned(), q);
            }
            // Nor may a new queue take the id of data whose queue row is gone (a damaged file):
            // it would find those messages as its own.
            for qid in [
                t.chunks.last()?.map(|(k, _)| k.value().0),
                t.dead.last()?.map(|(k, _)| k.value().0),
                t.history.last()?.map(|(k, _)| k.value().0),
                t.settled.last()?.map(|(k, _)| k.value().0),
                t.scheduled.last()?.map(|(k, _)| k.value().0),
                t.dedup.last()?.map(|(k, _)| k.value().0),
            ]
            .into_iter()
            .flatten()
            {
                self.next_qid = self.next_qid.max(qid.saturating_add(1));
            }
            self.next_expiry_ms = t.first_expiry()?;
            for item in t.scheduled.iter()? {
                let (k, _) = item?;
                let qid = k.value().0;
                if let Some(q) = self.qstate(qid) {
                    q.scheduled += 1;
                }
            }
        }
        txn.commit()?;
        self.unsynced = false;
        self.last_sync = Instant::now();
        Ok(())
    }
}

/// Converts the earlier layout: its retry schedule moves to `SCHEDULE`/`SCHEDULED`, its ready
/// and in-flight indexes are dropped (both now live in memory), and each message becomes a
/// chunk of one. A no-op on a current database.
fn migrate_legacy_tables(txn: &WriteTransaction, now: u64) -> Result<(), Fail> {
    let legacy: Vec<String> = txn
        .list_tables()?
        .map(|h| h.name().to_owned())
        .filter(|n| {
            [
                LEGACY_READY.name(),
                LEGACY_INFLIGHT.name(),
                LEGACY_MESSAGES.name(),
            ]
            .contains(&n.as_str())
        })
        .collect();
    if legacy.is_empty() {
        return Ok(());
    }
    {
        let ready = txn.open_table(LEGACY_READY)?;
        let mut schedule = txn.open_table(SCHEDULE)?;
        let mut scheduled = txn.open_table(SCHEDULED)?;
        for item in ready.range((0u32, 0u64, 0u64)..)? {
            let (k, _) = item?;
            let (qid, at, seq) = k.value();
            if at > now {
                schedule.insert((qid, at, seq), ())?;
                scheduled.insert((qid, seq), at)?;
            }
        }
        let messages = txn.open_table(LEGACY_MESSAGES)?;
        let mut chunks = txn.open_table(CHUNKS)?;
        for item in messages.range((0u32, 0u64)..)? {
            let (k, v) = item?;
            let (qid, seq) = k.value();
            let mut chunk = ChunkBuilder::new(seq);
            chunk.push(v.value());
            chunks.insert((qid, seq), chunk.encode().as_slice())?;
        }
    }
    txn.delete_table(LEGACY_READY)?;
    txn.delete_table(LEGACY_INFLIGHT)?;
    txn.delete_table(LEGACY_MESSAGES)?;
    Ok(())
}

/// The highest seq `queue` has in a table keyed by `(queue id, seq)` (0 if none).
fn last_seq(table: &Table<'_, (u32, u64), &'static [u8]>, queue: u32) -> Result<u64, Fail> {
    Ok(table
        .range((queue, 0u64)..=(queue, u64::MAX))?
        .next_back()
        .transpose()?
        .map_or(0, |(k, _)| k.value().1))
}

#[cfg(test)]
mod tests {
    use super::super::Cmd;
    use super::super::fixture::{LONG_LEASE_MS, TestWriter, quick_config};
    use super::{SCHEDULE, TableHandle};
    use crate::embedded::codec::{MessageView, QueueRow, encode_message, encode_queue_row, now_ms};
    use crate::{
        BackendConfig, DATABASE_FILE, EmbeddedBackend, NewMessage, QueueBackend, SubmitFate,
    };
    use redb::{ReadableDatabase, TableDefinition};
    use std::time::Duration;

    #[test]
    fn reopening_keeps_messages_schedule_dedup_keys_and_seqs() {
        let mut w = TestWriter::new(quick_config());
        w.submit(
            "q",
            vec![
                NewMessage::new("a", "a"),
                NewMessage::new("b", "b").with_idempotency_key("kb"),
                NewMessage::new("c", "c"),
            ],
        );
        w.submit_ids("other", &["d"]);
        let got = w.receive("q", 3, LONG_LEASE_MS);
        w.ack(&got[0].receipt).expect("ack");
        w.nack(&got[1].receipt, Some(Duration::from_secs(60)))
            .expect("nack");
        // `c` is still leased when the writer stops.
        let (next_seq, qid) = (w.writer.next_seq, w.writer.queues["q"].id);

        let mut w = w.restart();
        assert_eq!(
            (w.writer.next_seq, w.writer.queues["q"].id),
            (next_seq, qid)
        );
        assert_eq!(w.writer.queues["q"].scheduled, 1);
        assert_eq!(w.rows(SCHEDULE), 1);
        let s = w.stats_of("q");
        assert_eq!((s.depth, s.in_flight, s.dead_letters), (2, 0, 0));
        assert_eq!(w.stats_of("other").depth, 1);
        let again = w.receive("q", 10, LONG_LEASE_MS);
        let ids: Vec<(&str, u32)> = again
            .iter()
            .map(|m| (m.message_id.as_str(), m.attempt))
            .collect();
        assert_eq!(
            ids,
            [("c", 1)],
            "b waits for its retry; c's lease died with the writer"
        );
        let dup = w.submit(
            "q",
            vec![NewMessage::new("b2", "b").with_idempotency_key("kb")],
        );
        assert_eq!(dup, [SubmitFate::Duplicate { id: "b".into() }]);
        w.submit_ids("q", &["e"]);
        assert_eq!(w.writer.next_seq, next_seq + 1);
    }

    #[test]
    fn opening_creates_every_table() {
        let mut w = TestWriter::new(BackendConfig::default());
        let stats = w.call(|tx| Cmd::Stats { tx }).expect("stats");
        assert!(stats.is_empty());
        let db = w.writer.db.clone().expect("open");
        let txn = db.begin_read().expect("read");
        let mut names: Vec<String> = txn
            .list_tables()
            .expect("tables")
            .map(|t| t.name().to_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "chunks",
                "dead",
                "dedup",
                "dedup_exp",
                "history",
                "meta",
                "queues",
                "results",
                "results_exp",
                "schedule",
                "scheduled",
                "settled",
            ]
        );
    }

    /// A store written by the earlier layout (one entry per message, ready and in-flight
    /// indexes on disk) opens with every message kept and its retry time respected.
    /// A damaged file that lost a queue's row, or whose `next_seq` went back, must not make new
    /// messages take ids or seqs of stored ones (found by the `store_recovery` fuzz target: a
    /// new queue was handed another queue's messages).
    #[tokio::test]
    async fn lost_queue_rows_and_seqs_are_not_reused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let lease = Duration::from_secs(60);
        {
            let b = EmbeddedBackend::open(dir.path(), BackendConfig::default()).expect("open");
            for (queue, id) in [("lost", "l1"), ("kept", "k1")] {
                b.submit(queue, vec![NewMessage::new(id, id)])
                    .await
                    .expect("submit");
            }
        }
        {
            let db = redb::Database::create(dir.path().join(DATABASE_FILE)).expect("open");
            let txn = db.begin_write().expect("txn");
            txn.open_table(super::QUEUES)
                .expect("queues")
                .remove("lost")
                .expect("remove");
            txn.open_table(super::META)
                .expect("meta")
                .insert(super::NEXT_SEQ, 1)
                .expect("set");
            txn.commit().expect("commit");
        }
        let b = EmbeddedBackend::open(dir.path(), BackendConfig::default()).expect("reopen");
        b.submit("new", vec![NewMessage::new("n1", "n1")])
            .await
            .expect("submit");
        b.submit("kept", vec![NewMessage::new("k2", "k2")])
            .await
            .expect("submit");
        let ids = |got: Vec<crate::Leased>| -> Vec<String> {
            got.into_iter().map(|m| m.message_id).collect()
        };
        let new = b
            .receive("new", "c", 10, lease, Duration::ZERO)
            .await
            .expect("receive");
        assert_eq!(ids(new), ["n1"]);
        let kept = b
            .receive("kept", "c", 10, lease, Duration::ZERO)
            .await
            .expect("receive");
        assert_eq!(ids(kept), ["k1", "k2"]);
    }

    /// A damaged file whose queue ids or seqs are at their limit fails new submits with a
    /// storage error instead of overflowing (found by the `store_recovery` fuzz target), and
    /// still serves what it holds.
    #[tokio::test]
    async fn exhausted_ids_and_seqs_fail_submits() {
        let dir = tempfile::tempdir().expect("temp dir");
        let lease = Duration::from_secs(60);
        {
            let b = EmbeddedBackend::open(dir.path(), BackendConfig::default()).expect("open");
            b.submit("q", vec![NewMessage::new("m1", "m1")])
                .await
                .expect("submit");
        }
        {
            let db = redb::Database::create(dir.path().join(DATABASE_FILE)).expect("open");
            let txn = db.begin_write().expect("txn");
            let row = QueueRow {
                id: u32::MAX,
                live: u64::MAX,
                dead: 0,
            };
            txn.open_table(super::QUEUES)
                .expect("queues")
                .insert("last", encode_queue_row(row).as_slice())
                .expect("insert");
            txn.open_table(super::META)
                .expect("meta")
                .insert(super::NEXT_SEQ, u64::MAX)
                .expect("set");
            txn.commit().expect("commit");
        }
        let b = EmbeddedBackend::open(dir.path(), BackendConfig::default()).expect("reopen");
        for queue in ["q", "new", "last"] {
            let e = b
                .submit(queue, vec![NewMessage::new("m2", "m2")])
                .await
                .expect_err("no seq or queue id left");
            assert!(matches!(e, crate::QueueError::Storage(_)), "{e:?}");
        }
        let got = b
            .receive("q", "c", 10, lease, Duration::ZERO)
            .await
            .expect("receive");
        assert_eq!(got.len(), 1);
        b.ack(&got[0].receipt, None).await.expect("ack");
    }

    #[tokio::test]
    async fn earlier_layout_is_migrated() {
        let dir = tempfile::tempdir().expect("temp dir");
        let queues: TableDefinition<&str, &[u8]> = TableDefinition::new("queues");
        let meta: TableDefinition<&str, u64> = TableDefinition::new("meta");
        let messages: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("messages");
        let ready: TableDefinition<(u32, u64, u64), ()> = TableDefinition::new("ready");
        let inflight: TableDefinition<(u32, u64), ()> = TableDefinition::new("inflight");
        {
            let db = redb::Database::create(dir.path().join(DATABASE_FILE)).expect("create");
            let txn = db.begin_write().expect("txn");
            {
                let row = QueueRow {
                    id: 1,
                    live: 3,
                    dead: 0,
                };
                txn.open_table(queues)
                    .expect("queues")
                    .insert("legacy", encode_queue_row(row).as_slice())
                    .expect("insert");
                txn.open_table(meta)
                    .expect("meta")
                    .insert("next_seq", 4)
                    .expect("insert");
                let mut m = txn.open_table(messages).expect("messages");
                for (seq, id) in [(1, "ready"), (2, "delayed"), (3, "leased")] {
                    let rec = encode_message(&MessageView {
                        enqueued_ms: now_ms(),
                        id,
                        idempotency_key: None,
                        correlation_id: id,
                        reply_to: None,
                        body: id.as_bytes(),
                    });
                    m.insert((1, seq), rec.as_slice()).expect("insert");
                }
                let mut r = txn.open_table(ready).expect("ready");
                r.insert((1, now_ms(), 1), ()).expect("insert");
                r.insert((1, now_ms() + 60_000, 2), ()).expect("insert");
                txn.open_table(inflight)
                    .expect("inflight")
                    .insert((1, 3), ())
                    .expect("insert");
            }
            txn.commit().expect("commit");
        }
        let b = EmbeddedBackend::open(dir.path(), BackendConfig::default()).expect("open");
        let got = b
            .receive("legacy", "c", 10, Duration::from_secs(30), Duration::ZERO)
            .await
            .expect("receive");
        let mut ids: Vec<&str> = got.iter().map(|m| m.message_id.as_str()).collect();
        ids.sort();
        assert_eq!(ids, ["leased", "ready"]);
        assert_eq!(&got[0].body[..], got[0].message_id.as_bytes());
        let stats = b.stats().await.expect("stats");
        assert_eq!((stats[0].depth, stats[0].in_flight), (1, 2), "{stats:?}");
        for m in got {
            b.ack(&m.receipt, None).await.expect("ack");
        }
        // A new message gets a seq after the migrated ones.
        let fates = b
            .submit("legacy", vec![NewMessage::new("new", "new")])
            .await
            .expect("submit");
        assert!(matches!(fates[0], SubmitFate::Accepted { .. }));
        let got = b
            .receive("legacy", "c", 10, Duration::from_secs(30), Duration::ZERO)
            .await
            .expect("receive");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].message_id, "new");
    }
}
