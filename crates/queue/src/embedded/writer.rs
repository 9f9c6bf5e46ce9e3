//! The single writer thread: owns every mutation, batches them into one redb transaction per
//! loop turn, and commits with `Durability::Immediate` whenever the batch holds a submit (group
//! commit) or unflushed acks are older than the flush interval. The layout (chunks, settled
//! bitmaps, the retry schedule; ready and leased messages tracked in memory) is described in
//! the crate documentation.

use super::chunk::{ChunkBuilder, ChunkView, Settled};
use super::codec::{
    Corrupt, DeadView, MessageView, QueueRow, StoredAttempt, decode_dead, decode_expiring,
    decode_history, decode_message, decode_queue_row, dur_ms, encode_dead, encode_expiring,
    encode_history, encode_message_into, encode_queue_row, message_len, ms_to_time, now_ms,
};
use super::{EmbeddedOptions, Shared};
use crate::{
    AttemptRecord, BackendConfig, DeadLetter, Leased, MAX_BODY_BYTES, MAX_RECEIVE_BATCH,
    NackOutcome, NewMessage, QueueError, QueueStats, Selection, SubmitFate, validate_queue_name,
};
use agentmesh_resilience::full_jitter_delay;
use bytes::Bytes;
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, Table, TableDefinition, TableHandle,
    WriteTransaction,
};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::oneshot;

/// Queue name → encoded [`QueueRow`].
const QUEUES: TableDefinition<&str, &[u8]> = TableDefinition::new("queues");
/// Counters such as `next_seq`.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// `(queue id, first seq)` → a chunk of messages appended together (see `chunk`); deleted
/// once every message in it is settled (acked or dead-lettered).
const CHUNKS: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("chunks");
/// `(queue id, first seq)` → which messages of a partly settled chunk are settled.
const SETTLED: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("settled");
/// `(queue id, seq)` → encoded failed attempts, only for messages that failed at least once.
const HISTORY: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("history");
/// `(queue id, due ms, seq)`: messages waiting for a retry (nacked with a delay), in due order. Every other live message is ready or leased, which only memory tracks.
const SCHEDULE: TableDefinition<(u32, u64, u64), ()> = TableDefinition::new("schedule");
/// `(queue id, seq)` → due ms: the same set as `SCHEDULE`, by message, so that the ready scan
/// after a restart can tell a waiting message from a ready one.
const SCHEDULED: TableDefinition<(u32, u64), u64> = TableDefinition::new("scheduled");
/// Tables of the earlier layout (every ready message indexed, leases persisted); migrated on
/// open.
const LEGACY_READY: TableDefinition<(u32, u64, u64), ()> = TableDefinition::new("ready");
const LEGACY_INFLIGHT: TableDefinition<(u32, u64), ()> = TableDefinition::new("inflight");
const LEGACY_MESSAGES: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("messages");
/// `(queue id, seq)` → encoded dead letter (header, history, message).
const DEAD: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("dead");
/// `(queue id, idempotency key)` → `(expires ms, message id)`.
const DEDUP: TableDefinition<(u32, &str), &[u8]> = TableDefinition::new("dedup");
/// `(expires ms, queue id, idempotency key)`: expiry index of `DEDUP`.
const DEDUP_EXP: TableDefinition<(u64, u32, &str), ()> = TableDefinition::new("dedup_exp");
/// Correlation id → `(expires ms, result body)`.
pub(crate) const RESULTS: TableDefinition<&str, &[u8]> = TableDefinition::new("results");
/// `(expires ms, correlation id)`: expiry index of `RESULTS`.
const RESULTS_EXP: TableDefinition<(u64, &str), ()> = TableDefinition::new("results_exp");

const NEXT_SEQ: &str = "next_seq";
/// Least time between two sweeps of expired dedup keys and results, so expiries batch up.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
const SWEEP_CHUNK: usize = 1024;
/// How often a database that failed to reopen after an I/O error is tried again.
const REOPEN_EVERY: Duration = Duration::from_secs(1);
/// Least time between two log lines about failed batches.
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(5);

/// A reply channel.
pub(crate) type Tx<T> = oneshot::Sender<Result<T, QueueError>>;

/// A request to the writer thread.
pub(crate) enum Cmd {
    Submit {
        queue: String,
        messages: Vec<NewMessage>,
        tx: Tx<Vec<SubmitFate>>,
    },
    Receive {
        queue: String,
        consumer: String,
        max: usize,
        lease_ms: u64,
        wait_ms: u64,
        tx: Tx<Vec<Leased>>,
    },
    Ack {
        receipt: String,
        result: Option<Bytes>,
        tx: Tx<()>,
    },
    AckMany {
        acks: Vec<(String, Option<Bytes>)>,
        tx: Tx<Vec<Result<(), QueueError>>>,
    },
    Nack {
        receipt: String,
        error: String,
        delay: Option<Duration>,
        tx: Tx<NackOutcome>,
    },
    Extend {
        receipt: String,
        lease_ms: u64,
        tx: Tx<SystemTime>,
    },
    Release {
        receipts: Vec<String>,
        tx: Tx<u64>,
    },
    Stats {
        tx: Tx<Vec<QueueStats>>,
    },
    ListDead {
        queue: String,
        page_size: usize,
        after: Option<String>,
        tx: Tx<(Vec<DeadLetter>, Option<String>)>,
    },
    Redrive {
        queue: String,
        selection: Selection,
        tx: Tx<u64>,
    },
    Purge {
        queue: String,
        selection: Selection,
        tx: Tx<u64>,
    },
    Shutdown,
}

/// An internal failure that aborts the whole batch.
#[derive(Debug)]
pub(crate) enum Fail {
    Db(redb::Error),
    Corrupt(&'static str),
}

macro_rules! fail_from {
    ($($t:ty),*) => {$(
        impl From<$t> for Fail {
            fn from(e: $t) -> Self {
                Fail::Db(e.into())
            }
        }
    )*};
}
fail_from!(
    redb::Error,
    redb::StorageError,
    redb::TableError,
    redb::TransactionError,
    redb::CommitError,
    redb::SetDurabilityError
);

impl Fail {
    /// The disk (or quota) is full: freeing space fixes it.
    fn is_out_of_space(&self) -> bool {
        use std::io::ErrorKind;
        matches!(self, Fail::Db(redb::Error::Io(e))
            if matches!(e.kind(), ErrorKind::StorageFull | ErrorKind::QuotaExceeded | ErrorKind::FileTooLarge))
    }

    /// After an I/O error redb refuses every later operation until the database is reopened.
    fn needs_reopen(&self) -> bool {
        matches!(
            self,
            Fail::Db(redb::Error::Io(_) | redb::Error::PreviousIo | redb::Error::DatabaseClosed)
        )
    }
}

impl From<Corrupt> for Fail {
    fn from(c: Corrupt) -> Self {
        Fail::Corrupt(c.0)
    }
}

impl std::fmt::Display for Fail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fail::Db(e) => write!(f, "{e}"),
            Fail::Corrupt(what) => write!(f, "corrupt record: {what}"),
        }
    }
}

/// A page of dead letters and the next page token.
type DeadPage = (Vec<DeadLetter>, Option<String>);

/// `(queue id, seq, lease token)`.
type LeaseKey = (u32, u64, u64);

struct Lease {
    token: u64,
    /// First seq of the chunk holding the message.
    chunk: u64,
    /// Shared by every lease of one receive.
    consumer: Arc<str>,
    delivered_ms: u64,
    expires_ms: u64,
    attempt: u32,
}

/// A message chosen for delivery.
struct Pick {
    seq: u64,
    /// Known never to have been delivered (attempt 1, no history to read).
    fresh: bool,
    /// Its chunk's first seq and its record, when the scan already read them.
    found: Option<(u64, Bytes)>,
}

/// In-memory state of one queue.
///
/// Where each live message is, without a write per move:
/// * `seq > cursor`: ready, found by scanning `CHUNKS` from the cursor (after a restart, also
///   settled and waiting ones: while `seq <= recovered_max` the scan skips those set in the
///   chunk's `SETTLED` bitmap or listed in `SCHEDULED`);
/// * `seq <= cursor` (or in `ahead`): leased, queued in `redeliver`, or waiting in `SCHEDULE`.
///
/// Memory stays bounded: `redeliver` and `ahead` only hold messages that were leased or just
/// promoted from the schedule (at most one receive's worth at a time).
struct QState {
    id: u32,
    live: u64,
    dead: u64,
    in_flight: u64,
    row_dirty: bool,
    /// Highest seq the ready scan has passed.
    cursor: u64,
    /// Highest seq of a message submitted to this queue.
    tail: u64,
    /// Highest seq that existed when the store was opened: below it the scan may meet
    /// messages that were delivered before the restart (waiting ones, or ones with a history).
    recovered_max: u64,
    /// Messages ready again (released, lease lapsed, or due retries), delivered before the scan.
    redeliver: VecDeque<u64>,
    /// Due retries promoted to `redeliver` although the scan has not passed them yet.
    ahead: HashSet<u64>,
    /// Entries in `SCHEDULE`.
    scheduled: u64,
}

impl QState {
    fn new(id: u32, live: u64, dead: u64) -> Self {
        Self {
            id,
            live,
            dead,
            in_flight: 0,
            row_dirty: false,
            cursor: 0,
            tail: 0,
            recovered_max: 0,
            redeliver: VecDeque::new(),
            ahead: HashSet::new(),
            scheduled: 0,
        }
    }
}

struct Waiter {
    consumer: String,
    max: usize,
    lease_ms: u64,
    deadline_ms: u64,
    tx: Tx<Vec<Leased>>,
}

/// A reply held back until the batch's commit outcome is known.
trait Deliver: Send {
    /// Sends the reply (or `failure`); returns leases to release if the receiver is gone.
    fn deliver(self: Box<Self>, failure: Option<&QueueError>) -> Option<Vec<LeaseKey>>;
}

struct Reply<T>(Tx<T>, Result<T, QueueError>);

impl<T: Send> Deliver for Reply<T> {
    fn deliver(self: Box<Self>, failure: Option<&QueueError>) -> Option<Vec<LeaseKey>> {
        let result = match failure {
            Some(e) => Err(e.clone()),
            None => self.1,
        };
        let _ = self.0.send(result);
        None
    }
}

struct ReceiveReply {
    tx: Tx<Vec<Leased>>,
    leased: Vec<Leased>,
    keys: Vec<LeaseKey>,
}

impl Deliver for ReceiveReply {
    fn deliver(self: Box<Self>, failure: Option<&QueueError>) -> Option<Vec<LeaseKey>> {
        match failure {
            Some(e) => {
                let _ = self.tx.send(Err(e.clone()));
                None
            }
            None => match self.tx.send(Ok(self.leased)) {
                Ok(()) => None,
                // The caller went away (cancelled long-poll): hand the messages back.
                Err(_) => Some(self.keys),
            },
        }
    }
}

/// All tables of one write transaction.
struct Tables<'t> {
    queues: Table<'t, &'static str, &'static [u8]>,
    meta: Table<'t, &'static str, u64>,
    chunks: Table<'t, (u32, u64), &'static [u8]>,
    settled: Table<'t, (u32, u64), &'static [u8]>,
    history: Table<'t, (u32, u64), &'static [u8]>,
    schedule: Table<'t, (u32, u64, u64), ()>,
    scheduled: Table<'t, (u32, u64), u64>,
    dead: Table<'t, (u32, u64), &'static [u8]>,
    dedup: Table<'t, (u32, &'static str), &'static [u8]>,
    dedup_exp: Table<'t, (u64, u32, &'static str), ()>,
    results: Table<'t, &'static str, &'static [u8]>,
    results_exp: Table<'t, (u64, &'static str), ()>,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Self, Fail> {
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

/// Per-batch scratch state.
#[derive(Default)]
struct Batch {
    /// Replies that may go out once the batch is committed (fsync'd or not).
    pending: Vec<Box<dyn Deliver>>,
    /// Submit replies: they wait for the fsync.
    durable: Vec<Box<dyn Deliver>>,
    /// Results to hand to `wait_result` callers once committed.
    results: Vec<(String, Bytes)>,
    /// Commands not applied because the batch failed before them.
    unapplied: Vec<Cmd>,
    /// Messages were accepted: the commit must be durable before anyone hears of it.
    needs_sync: bool,
    /// Something was written.
    changed: bool,
    accepted: u64,
}

impl Batch {
    fn reply<T: Send + 'static>(&mut self, tx: Tx<T>, result: Result<T, QueueError>) {
        self.pending.push(Box::new(Reply(tx, result)));
    }
}

/// State owned by the writer thread.
pub(crate) struct Writer {
    /// `None` after an I/O error until the database is reopened.
    db: Option<Arc<Database>>,
    /// When reopening last failed (retried at most once per `REOPEN_EVERY`).
    reopen_failed_at: Option<Instant>,
    /// When a failed batch was last logged, and how many failed since without a log line.
    failure_logged_at: Option<Instant>,
    failures_not_logged: u64,
    path: PathBuf,
    config: BackendConfig,
    options: EmbeddedOptions,
    shared: Arc<Shared>,
    queues: HashMap<String, QState>,
    names: HashMap<u32, String>,
    waiters: HashMap<String, VecDeque<Waiter>>,
    leases: HashMap<(u32, u64), Lease>,
    lease_heap: BinaryHeap<Reverse<(u64, u32, u64, u64)>>,
    orphans: Vec<LeaseKey>,
    next_seq: u64,
    seq_dirty: bool,
    next_qid: u32,
    next_token: u64,
    unsynced: bool,
    last_sync: Instant,
    /// When the last sweep ran (ms since the epoch).
    last_sweep_ms: u64,
    /// Earliest expiry of a dedup key or result still on disk; `None` when there is none.
    next_expiry_ms: Option<u64>,
    /// Earliest time a delayed message of a queue with waiters becomes ready.
    next_ready_ms: Option<u64>,
    /// Chunks being filled by this batch, by queue id; written before anything reads them.
    open_chunks: HashMap<u32, ChunkBuilder>,
    /// Messages settled in this batch, by chunk `(queue id, first seq)`; applied at its end.
    pending_settles: HashMap<(u32, u64), Vec<usize>>,
}

fn parse_receipt(receipt: &str) -> Result<LeaseKey, QueueError> {
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

fn lease_lost(receipt: &str) -> QueueError {
    QueueError::LeaseLost(format!(
        "receipt {receipt} is no longer valid: its lease lapsed or it was already settled"
    ))
}

fn history_len(buf: &[u8]) -> u32 {
    buf.get(..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .unwrap_or(0)
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

    fn storage(&self, what: &str, e: &Fail) -> QueueError {
        let message = format!("{what} queue database {} failed: {e}", self.path.display());
        if e.is_out_of_space() {
            QueueError::StorageFull(message)
        } else {
            QueueError::Storage(message)
        }
    }

    /// Logs a failed batch; while failures repeat (a full disk under load), at most one line
    /// per `FAILURE_LOG_EVERY`, with the number left out.
    fn log_failure(&mut self, err: &QueueError) {
        if self
            .failure_logged_at
            .is_some_and(|at| at.elapsed() < FAILURE_LOG_EVERY)
        {
            self.failures_not_logged += 1;
            return;
        }
        tracing::error!(
            error = %err,
            earlier_failures_not_logged = self.failures_not_logged,
            "queue batch failed; its requests were answered with the error"
        );
        self.failure_logged_at = Some(Instant::now());
        self.failures_not_logged = 0;
    }

    fn db(&self) -> Result<&Database, Fail> {
        self.db
            .as_deref()
            .ok_or(Fail::Db(redb::Error::DatabaseClosed))
    }

    /// Closes and reopens the database after an I/O error (redb refuses every operation after
    /// one), then reloads the state from disk. Leases are lost: their messages are ready again.
    fn reopen(&mut self) {
        self.shared.db.write().take();
        if let Some(old) = self.db.take() {
            // Readers (`get_result`) hold the database briefly; its file lock goes with the last.
            let until = Instant::now() + Duration::from_secs(5);
            while Arc::strong_count(&old) > 1 && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let reopened = open_database(&self.path, self.options.cache_bytes)
            .map_err(|e| e.to_string())
            .and_then(|db| {
                self.db = Some(db);
                self.reload().map_err(|e| e.to_string())
            });
        match reopened {
            Ok(()) => {
                self.reopen_failed_at = None;
                *self.shared.db.write() = self.db.clone();
                tracing::debug!(path = %self.path.display(), "queue database reopened after an I/O error");
            }
            Err(error) => {
                self.db = None;
                self.reopen_failed_at = Some(Instant::now());
                tracing::error!(path = %self.path.display(), %error, "reopening the queue database failed; retrying");
            }
        }
    }

    /// Rebuilds the in-memory state from disk (at open, or after a failed commit).
    ///
    /// Leases are not persisted: every live message that is not waiting in the schedule is
    /// ready again, found by the ready scan from the start of its queue.
    fn reload(&mut self) -> Result<(), Fail> {
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
                self.next_qid = self.next_qid.max(row.id + 1);
                self.names.insert(row.id, k.value().to_owned());
                let mut q = QState::new(row.id, row.live, row.dead);
                q.recovered_max = self.next_seq.saturating_sub(1);
                if let Some(last) = t
                    .chunks
                    .range((row.id, 0u64)..=(row.id, u64::MAX))?
                    .next_back()
                {
                    let (k, v) = last?;
                    let count = ChunkView::new(v.value())?.count() as u64;
                    q.tail = (k.value().1 + count).saturating_sub(1);
                }
                self.queues.insert(k.value().to_owned(), q);
            }
            self.next_expiry_ms = first_expiry(&t)?;
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

    /// The writer loop; returns when the backend shuts down or every sender is gone.
    pub(crate) fn run(mut self, rx: Receiver<Cmd>) {
        loop {
            let mut cmds = Vec::new();
            let mut shutdown = false;
            // With nothing due, block until a request arrives: an idle store does no work.
            let received = match self.time_to_next_wake() {
                Some(timeout) => rx.recv_timeout(timeout),
                None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            match received {
                Ok(cmd) => cmds.push(cmd),
                Err(RecvTimeoutError::Timeout) => {
                    self.shared
                        .counters
                        .timer_wakeups
                        .fetch_add(1, Ordering::Relaxed);
                }
                Err(RecvTimeoutError::Disconnected) => shutdown = true,
            }
            while cmds.len() < self.options.max_batch_commands {
                match rx.try_recv() {
                    Ok(cmd) => cmds.push(cmd),
                    Err(_) => break,
                }
            }
            if cmds.iter().any(|c| matches!(c, Cmd::Shutdown)) {
                shutdown = true;
            }
            self.run_batch(cmds, shutdown);
            if shutdown {
                // Whatever raced in after the shutdown request is refused.
                while let Ok(cmd) = rx.try_recv() {
                    refuse(cmd, &QueueError::Closed);
                }
                for (_, ws) in self.waiters.drain() {
                    for w in ws {
                        let _ = w.tx.send(Err(QueueError::Closed));
                    }
                }
                return;
            }
        }
    }

    /// How long the loop may sleep before something falls due: a lease expiry, a waiter's
    /// deadline, a delayed message a waiter wants, an expired dedup key or result, a pending
    /// ack flush or a reopen attempt. `None` when nothing is due at all.
    ///
    /// Every deadline here is cleared by the turn it wakes, so a timeout of zero is never
    /// returned twice for the same reason: the loop cannot spin.
    fn time_to_next_wake(&self) -> Option<Duration> {
        if self.db.is_none() {
            let since = self
                .reopen_failed_at
                .map_or(REOPEN_EVERY, |at| at.elapsed());
            return Some(REOPEN_EVERY.saturating_sub(since));
        }
        if !self.orphans.is_empty() {
            return Some(Duration::ZERO);
        }
        let mut wake: Option<u64> = None;
        let mut at = |t: u64| wake = Some(wake.map_or(t, |w| w.min(t)));
        if let Some(Reverse((exp, ..))) = self.lease_heap.peek() {
            at(*exp);
        }
        if let Some(ready) = self.next_ready_ms {
            at(ready);
        }
        for w in self.waiters.values().flatten() {
            at(w.deadline_ms);
        }
        if let Some(expiry) = self.next_expiry_ms {
            at(expiry.max(self.next_sweep_allowed_ms()));
        }
        let now = now_ms();
        let mut timeout = wake.map(|w| Duration::from_millis(w.saturating_sub(now)));
        if self.unsynced {
            let flush_in = self
                .options
                .ack_flush_interval
                .saturating_sub(self.last_sync.elapsed());
            timeout = Some(timeout.map_or(flush_in, |t| t.min(flush_in)));
        }
        timeout
    }

    fn next_sweep_allowed_ms(&self) -> u64 {
        self.last_sweep_ms.saturating_add(dur_ms(SWEEP_EVERY))
    }

    /// Whether un-fsync'd commits (acks, releases) have waited their flush interval.
    fn flush_due(&self) -> bool {
        self.unsynced && self.last_sync.elapsed() >= self.options.ack_flush_interval
    }

    fn run_batch(&mut self, cmds: Vec<Cmd>, shutdown: bool) {
        if self.db.is_none() {
            if self
                .reopen_failed_at
                .is_none_or(|at| at.elapsed() >= REOPEN_EVERY)
            {
                self.reopen();
            }
            if self.db.is_none() {
                let err = QueueError::Storage(format!(
                    "queue database {} is unavailable after an I/O error; it is reopened every {} s",
                    self.path.display(),
                    REOPEN_EVERY.as_secs()
                ));
                for cmd in cmds {
                    refuse(cmd, &err);
                }
                return;
            }
        }
        let mut batch = Batch::default();
        let mut outcome = self.apply_and_commit(cmds, &mut batch, shutdown);
        if matches!(outcome, Ok(true)) && answers_before_sync(&batch, shutdown) {
            // The batch is committed (not yet fsync'd): everything but the submits may be
            // answered now, so consumers do not wait for the disk. The submits are answered
            // after the fsync below. A delivery of a message whose submit is not yet durable is
            // fine: its submitter has not been told it was accepted.
            let mut release = Vec::new();
            for p in batch.pending.drain(..) {
                if let Some(keys) = p.deliver(None) {
                    release.extend(keys);
                }
            }
            self.orphans.extend(release);
            outcome = self.sync_now().map(|()| true);
        }
        let failure = match outcome {
            Ok(committed) => {
                if committed {
                    let c = &self.shared.counters;
                    c.commits.fetch_add(1, Ordering::Relaxed);
                    c.accepted.fetch_add(batch.accepted, Ordering::Relaxed);
                    if batch.accepted > 0 {
                        c.submit_commits.fetch_add(1, Ordering::Relaxed);
                    }
                }
                None
            }
            Err(e) => {
                let err = self.storage("writing to", &e);
                self.log_failure(&err);
                Some((err, e.needs_reopen()))
            }
        };
        let mut release = Vec::new();
        for p in batch.pending.drain(..).chain(batch.durable.drain(..)) {
            if let Some(keys) = p.deliver(failure.as_ref().map(|(e, _)| e)) {
                release.extend(keys);
            }
        }
        if let Some((err, needs_reopen)) = failure {
            for cmd in batch.unapplied.drain(..) {
                refuse(cmd, &err);
            }
            if needs_reopen {
                self.reopen();
            } else if let Err(e) = self.reload() {
                tracing::error!(error = %self.storage("reloading", &e), "queue reload failed");
            }
            return;
        }
        self.orphans.extend(release);
        if !batch.results.is_empty() {
            let mut waiters = self.shared.result_waiters.lock();
            for (corr, body) in batch.results {
                if let Some(senders) = waiters.remove(&corr) {
                    for s in senders {
                        let _ = s.send(body.clone());
                    }
                }
            }
        }
    }

    /// Applies a batch in one transaction and commits it; returns whether anything was
    /// committed.
    fn apply_and_commit(
        &mut self,
        cmds: Vec<Cmd>,
        batch: &mut Batch,
        shutdown: bool,
    ) -> Result<bool, Fail> {
        let now = now_ms();
        let mut txn = self.db()?.begin_write()?;
        self.shared
            .counters
            .transactions
            .fetch_add(1, Ordering::Relaxed);
        {
            let mut t = Tables::open(&txn)?;
            self.release_orphans();
            self.expire_leases(&mut t, batch, now)?;
            let mut cmds = cmds.into_iter();
            while let Some(cmd) = cmds.next() {
                if let Err(e) = self.apply(&mut t, batch, cmd, now) {
                    // Answered with the batch's failure, like those applied before.
                    batch.unapplied.extend(cmds);
                    return Err(e);
                }
            }
            self.serve_waiters(&mut t, batch, now)?;
            if self.next_expiry_ms.is_some_and(|at| at <= now)
                && now >= self.next_sweep_allowed_ms()
            {
                self.last_sweep_ms = now;
                self.sweep(&mut t, batch, now)?;
                self.next_expiry_ms = first_expiry(&t)?;
            }
            self.maybe_compact_heap();
            self.flush_pending(&mut t)?;
            self.write_rows(&mut t)?;
        }
        // An idle turn still makes pending acks durable once their interval has passed;
        // otherwise they would stay un-fsync'd (and the flush timer due) for as long as no
        // new request arrives.
        let flush_due = self.flush_due();
        if !(batch.changed || (shutdown || flush_due) && self.unsynced) {
            txn.abort()?;
            return Ok(false);
        }
        let sync = batch.needs_sync || shutdown || flush_due;
        // A batch with submits and other replies commits without an fsync first; `run_batch`
        // answers the others, then makes it durable with `sync_now`.
        let sync = sync && !answers_before_sync(batch, shutdown);
        txn.set_durability(if sync {
            Durability::Immediate
        } else {
            Durability::None
        })?;
        txn.commit()?;
        if sync {
            self.unsynced = false;
            self.last_sync = Instant::now();
            self.shared
                .counters
                .durable_commits
                .fetch_add(1, Ordering::Relaxed);
        } else {
            self.unsynced = true;
        }
        Ok(true)
    }

    /// Makes every commit so far durable: an empty commit with an fsync.
    fn sync_now(&mut self) -> Result<(), Fail> {
        let mut txn = self.db()?.begin_write()?;
        self.shared
            .counters
            .transactions
            .fetch_add(1, Ordering::Relaxed);
        txn.set_durability(Durability::Immediate)?;
        txn.commit()?;
        self.unsynced = false;
        self.last_sync = Instant::now();
        self.shared
            .counters
            .durable_commits
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn apply(
        &mut self,
        t: &mut Tables<'_>,
        batch: &mut Batch,
        cmd: Cmd,
        now: u64,
    ) -> Result<(), Fail> {
        match cmd {
            Cmd::Submit {
                queue,
                messages,
                tx,
            } => {
                let r = self.submit(t, batch, &queue, messages, now)?;
                batch.durable.push(Box::new(Reply(tx, r)));
            }
            Cmd::Receive {
                queue,
                consumer,
                max,
                lease_ms,
                wait_ms,
                tx,
            } => {
                let max = max.min(MAX_RECEIVE_BATCH);
                let (leased, keys) = match self.queues.get(&queue) {
                    Some(q) if q.live > q.in_flight && !tx.is_closed() => {
                        let qid = q.id;
                        self.lease_ready(t, batch, qid, &consumer, max, lease_ms, now)?
                    }
                    _ => (Vec::new(), Vec::new()),
                };
                if !leased.is_empty() || wait_ms == 0 {
                    batch
                        .pending
                        .push(Box::new(ReceiveReply { tx, leased, keys }));
                } else {
                    self.waiters.entry(queue).or_default().push_back(Waiter {
                        consumer,
                        max,
                        lease_ms,
                        deadline_ms: now.saturating_add(wait_ms),
                        tx,
                    });
                }
            }
            Cmd::Ack {
                receipt,
                result,
                tx,
            } => {
                let r = self.ack(t, batch, &receipt, result, now)?;
                batch.reply(tx, r);
            }
            Cmd::AckMany { acks, tx } => {
                let mut outcomes = Vec::with_capacity(acks.len());
                for (receipt, result) in acks {
                    outcomes.push(self.ack(t, batch, &receipt, result, now)?);
                }
                batch.reply(tx, Ok(outcomes));
            }
            Cmd::Nack {
                receipt,
                error,
                delay,
                tx,
            } => {
                let r = match parse_receipt(&receipt) {
                    Err(e) => Err(e),
                    Ok(key) => match self.take_lease(key, now) {
                        None => Err(lease_lost(&receipt)),
                        Some(lease) => Ok(self.fail_attempt(
                            t,
                            batch,
                            (key.0, key.1),
                            lease,
                            &error,
                            delay.map(dur_ms),
                            now,
                        )?),
                    },
                };
                batch.reply(tx, r);
            }
            Cmd::Extend {
                receipt,
                lease_ms,
                tx,
            } => {
                let r = parse_receipt(&receipt).and_then(|(qid, seq, token)| {
                    match self.leases.get_mut(&(qid, seq)) {
                        Some(l) if l.token == token && l.expires_ms > now => {
                            l.expires_ms = now.saturating_add(lease_ms);
                            self.lease_heap
                                .push(Reverse((l.expires_ms, qid, seq, token)));
                            Ok(ms_to_time(l.expires_ms))
                        }
                        _ => Err(lease_lost(&receipt)),
                    }
                });
                batch.reply(tx, r);
            }
            Cmd::Release { receipts, tx } => {
                let mut released = 0u64;
                for receipt in &receipts {
                    // Malformed or stale receipts are ignored: there is nothing to put back.
                    if let Ok(key) = parse_receipt(receipt) {
                        if self.put_back(key) {
                            released += 1;
                        }
                    }
                }
                batch.reply(tx, Ok(released));
            }
            Cmd::Stats { tx } => {
                self.flush_pending(t)?;
                let r = self.stats(t, now)?;
                batch.reply(tx, Ok(r));
            }
            Cmd::ListDead {
                queue,
                page_size,
                after,
                tx,
            } => {
                let r = self.list_dead(t, &queue, page_size, after.as_deref())?;
                batch.reply(tx, r);
            }
            Cmd::Redrive {
                queue,
                selection,
                tx,
            } => {
                let r = self.redrive_or_purge(t, batch, &queue, &selection, true)?;
                batch.reply(tx, r);
            }
            Cmd::Purge {
                queue,
                selection,
                tx,
            } => {
                let r = self.redrive_or_purge(t, batch, &queue, &selection, false)?;
                batch.reply(tx, r);
            }
            Cmd::Shutdown => {}
        }
        Ok(())
    }

    fn queue_id(&mut self, t: &mut Tables<'_>, name: &str) -> Result<u32, Fail> {
        if let Some(q) = self.queues.get(name) {
            return Ok(q.id);
        }
        let id = self.next_qid;
        self.next_qid += 1;
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

    fn qstate(&mut self, qid: u32) -> Option<&mut QState> {
        let name = self.names.get(&qid)?;
        self.queues.get_mut(name)
    }

    fn submit(
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

    fn enqueue(
        &mut self,
        t: &mut Tables<'_>,
        batch: &mut Batch,
        queue: &str,
        m: &NewMessage,
        now: u64,
    ) -> Result<SubmitFate, Fail> {
        if let Some(reason) = reject_reason(m) {
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

    /// Appends a message record (`len` bytes, written by `write`) to queue `qid`'s open chunk;
    /// returns its seq. The chunk is written to the table when it fills, when something reads
    /// the queue, or at the end of the batch.
    fn append(
        &mut self,
        t: &mut Tables<'_>,
        qid: u32,
        len: usize,
        write: impl FnOnce(&mut Vec<u8>),
    ) -> Result<u64, Fail> {
        // Seqs are global, so a chunk only grows while nothing else took a seq since.
        let next_seq = self.next_seq;
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
            q.live += 1;
            q.tail = seq;
            q.row_dirty = true;
        }
        Ok(seq)
    }

    /// Writes queue `qid`'s open chunk, if any.
    fn flush_chunk(&mut self, t: &mut Tables<'_>, qid: u32) -> Result<(), Fail> {
        if let Some(chunk) = self.open_chunks.remove(&qid) {
            if !chunk.is_empty() {
                t.chunks
                    .insert((qid, chunk.first), chunk.encode().as_slice())?;
            }
        }
        Ok(())
    }

    /// Writes every open chunk and applies the batch's settles: a chunk whose messages are all
    /// settled is deleted, otherwise its settled bitmap is updated.
    fn flush_pending(&mut self, t: &mut Tables<'_>) -> Result<(), Fail> {
        let qids: Vec<u32> = self.open_chunks.keys().copied().collect();
        for qid in qids {
            self.flush_chunk(t, qid)?;
        }
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

    /// Marks message `seq` of chunk `first` settled (acked or dead-lettered).
    fn settle(&mut self, batch: &mut Batch, qid: u32, first: u64, seq: u64) {
        batch.changed = true;
        self.pending_settles
            .entry((qid, first))
            .or_default()
            .push((seq - first) as usize);
    }

    /// The record of message `seq` and the first seq of its chunk.
    fn read_record(t: &Tables<'_>, qid: u32, seq: u64) -> Result<Option<(u64, Bytes)>, Fail> {
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

    /// Picks up to `max` ready messages of queue `qid`: redeliveries first (released, lapsed,
    /// due retries), then the scan from the cursor.
    fn pick_ready(
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

    #[allow(clippy::too_many_arguments)]
    fn lease_ready(
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
    fn take_lease(&mut self, (qid, seq, token): LeaseKey, now: u64) -> Option<Lease> {
        match self.leases.get(&(qid, seq)) {
            Some(l) if l.token == token && l.expires_ms > now => self.leases.remove(&(qid, seq)),
            _ => None,
        }
    }

    fn ack(
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

    /// Records a failed attempt; schedules a retry or dead-letters the message.
    #[allow(clippy::too_many_arguments)]
    fn fail_attempt(
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
            let rec = Self::read_record(t, qid, seq)?.map(|(_, rec)| rec);
            t.history.remove((qid, seq))?;
            self.settle(batch, qid, lease.chunk, seq);
            let q = self.queues.get_mut(&qname);
            if let Some(q) = q {
                q.in_flight = q.in_flight.saturating_sub(1);
                q.live = q.live.saturating_sub(1);
                q.row_dirty = true;
                if rec.is_some() {
                    q.dead += 1;
                }
            }
            if let Some(rec) = rec {
                let dead = encode_dead(&DeadView {
                    dead_ms: now,
                    last_error: error,
                    history: &history,
                    message: &rec,
                });
                t.dead.insert((qid, seq), dead.as_slice())?;
            }
            return Ok(NackOutcome::DeadLettered);
        }
        if let Some(q) = self.queues.get_mut(&qname) {
            q.in_flight = q.in_flight.saturating_sub(1);
        }
        let delay = delay_ms.unwrap_or_else(|| {
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

    fn expire_leases(
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
    fn release_orphans(&mut self) {
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

    fn serve_waiters(
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
                        batch.pending.push(Box::new(ReceiveReply {
                            tx: w.tx,
                            leased,
                            keys,
                        }));
                    }
                }
            }
            let mut still = VecDeque::with_capacity(ws.len());
            for w in ws {
                if w.deadline_ms <= now {
                    batch.pending.push(Box::new(ReceiveReply {
                        tx: w.tx,
                        leased: Vec::new(),
                        keys: Vec::new(),
                    }));
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

    /// Notes that a dedup key or result expires at `at`, so the loop wakes to sweep it.
    fn expires_at(&mut self, at: u64) {
        self.next_expiry_ms = Some(self.next_expiry_ms.map_or(at, |n| n.min(at)));
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

    /// Drops stale heap entries (acked or extended leases) once they dominate the heap.
    fn maybe_compact_heap(&mut self) {
        if self.lease_heap.len() > 1024 && self.lease_heap.len() > 2 * self.leases.len() {
            self.lease_heap = self
                .leases
                .iter()
                .map(|(&(qid, seq), l)| Reverse((l.expires_ms, qid, seq, l.token)))
                .collect();
        }
    }

    fn write_rows(&mut self, t: &mut Tables<'_>) -> Result<(), Fail> {
        for (name, q) in self.queues.iter_mut().filter(|(_, q)| q.row_dirty) {
            let row = QueueRow {
                id: q.id,
                live: q.live,
                dead: q.dead,
            };
            t.queues
                .insert(name.as_str(), encode_queue_row(row).as_slice())?;
            q.row_dirty = false;
        }
        if self.seq_dirty {
            t.meta.insert(NEXT_SEQ, self.next_seq)?;
            self.seq_dirty = false;
        }
        Ok(())
    }

    fn stats(&self, t: &mut Tables<'_>, now: u64) -> Result<Vec<QueueStats>, Fail> {
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

    fn known_queue(&self, queue: &str) -> Result<u32, QueueError> {
        validate_queue_name(queue)?;
        self.queues
            .get(queue)
            .map(|q| q.id)
            .ok_or_else(|| QueueError::NotFound(format!("queue {queue:?} does not exist")))
    }

    fn list_dead(
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

    fn redrive_or_purge(
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

fn reject_reason(m: &NewMessage) -> Option<String> {
    if m.id.is_empty() {
        return Some("message id is empty".into());
    }
    if m.id.len() > 1024 {
        return Some("message id is longer than 1024 bytes".into());
    }
    if m.body.len() > MAX_BODY_BYTES {
        return Some(format!(
            "body is {} bytes, the limit is {MAX_BODY_BYTES}",
            m.body.len()
        ));
    }
    if m.idempotency_key.as_ref().is_some_and(|k| k.len() > 1024) {
        return Some("idempotency key is longer than 1024 bytes".into());
    }
    if m.correlation_id.len() > 1024 {
        return Some("correlation id is longer than 1024 bytes".into());
    }
    if let Some(r) = &m.reply_to {
        if let Err(e) = validate_queue_name(r) {
            return Some(format!("reply_to: {e}"));
        }
    }
    None
}

/// Whether a batch is committed without an fsync first, its non-submit replies sent, and then
/// made durable (it holds submits and something else to answer).
/// The earliest expiry among the dedup keys and results on disk.
fn first_expiry(t: &Tables<'_>) -> Result<Option<u64>, Fail> {
    let dedup = t.dedup_exp.first()?.map(|(k, _)| k.value().0);
    let result = t.results_exp.first()?.map(|(k, _)| k.value().0);
    Ok(match (dedup, result) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    })
}

fn answers_before_sync(batch: &Batch, shutdown: bool) -> bool {
    batch.needs_sync && !shutdown && !batch.pending.is_empty()
}

/// Answers a command with `err` without running it.
fn refuse(cmd: Cmd, err: &QueueError) {
    match cmd {
        Cmd::Submit { tx, .. } => drop(tx.send(Err(err.clone()))),
        Cmd::Receive { tx, .. } => drop(tx.send(Err(err.clone()))),
        Cmd::Ack { tx, .. } => drop(tx.send(Err(err.clone()))),
        Cmd::AckMany { tx, .. } => drop(tx.send(Err(err.clone()))),
        Cmd::Nack { tx, .. } => drop(tx.send(Err(err.clone()))),
        Cmd::Extend { tx, .. } => drop(tx.send(Err(err.clone()))),
        Cmd::Release { tx, .. } => drop(tx.send(Err(err.clone()))),
        Cmd::Stats { tx } => drop(tx.send(Err(err.clone()))),
        Cmd::ListDead { tx, .. } => drop(tx.send(Err(err.clone()))),
        Cmd::Redrive { tx, .. } | Cmd::Purge { tx, .. } => drop(tx.send(Err(err.clone()))),
        Cmd::Shutdown => {}
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

/// Opens (or creates) the database file with a page cache of `cache_bytes`.
pub(crate) fn open_database(
    path: &std::path::Path,
    cache_bytes: usize,
) -> Result<Arc<Database>, redb::DatabaseError> {
    redb::Builder::new()
        .set_cache_size(cache_bytes)
        .create(path)
        .map(Arc::new)
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
