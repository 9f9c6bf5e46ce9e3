//! The single writer thread: owns every mutation, batches them into one redb transaction per
//! loop turn, and commits with `Durability::Immediate` whenever the batch holds a submit (group
//! commit) or unflushed acks are older than the flush interval. The layout (chunks, settled
//! bitmaps, the retry schedule; ready and leased messages tracked in memory) is described in
//! the crate documentation.
//!
//! One concern per file, each adding its own `impl Writer` blocks:
//!
//! * this file: the writer's state, its loop, and how a batch is applied, committed and synced;
//! * `command`: the requests the thread takes, each handed to the concern below that serves it;
//! * `batch`: per-batch scratch state and the replies held back until the batch commits;
//! * `failure`: what aborts a batch, how callers and the log hear of it, reopening the file;
//! * `schema`: the tables, opening the file, converting the earlier layout, reloading state;
//! * `submit`: submit and dedup, appending records to chunks and reading them back;
//! * `receive`: picking ready messages (redeliveries, due retries, the scan), long-poll waiters;
//! * `lease`: leasing the picks, receipts, extend and release, lapsed leases, orphaned deliveries;
//! * `settle`: ack (results, `reply_to`), nack and the retry schedule, settled bitmaps;
//! * `sweep`: deleting expired dedup keys and results, and knowing when the next one expires;
//! * `dead_letters`: dead-lettering, listing, redrive and purge;
//! * `stats`: per-queue counters;
//! * `fixture` (tests only): a writer on a temp directory, driven one loop turn at a time.

mod batch;
mod command;
mod dead_letters;
mod failure;
mod lease;
mod receive;
mod schema;
mod settle;
mod stats;
mod submit;
mod sweep;

#[cfg(test)]
mod fixture;

pub(crate) use command::{Cmd, Tx};
pub(crate) use failure::panic_message;
pub(crate) use schema::open_database;
pub(crate) use settle::read_result;

use super::chunk::ChunkBuilder;
use super::codec::{QueueRow, encode_queue_row, now_ms};
use super::{EmbeddedOptions, Shared};
use crate::{BackendConfig, QueueError};
use batch::Batch;
use command::refuse;
use failure::{Fail, contain};
use lease::{Lease, LeaseKey};
use receive::Waiter;
use redb::{Database, Durability};
use schema::{NEXT_SEQ, Tables};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

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

impl Writer {
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
            if cmds.iter().any(|c| matches!(c, Cmd::Halt)) {
                // A simulated crash: whatever this turn took is never applied.
                for cmd in cmds.into_iter().chain(rx.try_iter()) {
                    refuse(cmd, &QueueError::Closed);
                }
                self.refuse_waiters(&QueueError::Closed);
                return;
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
                self.refuse_waiters(&QueueError::Closed);
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
            return Some(self.time_to_reopen());
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

    /// Whether un-fsync'd commits (acks, releases) have waited their flush interval.
    fn flush_due(&self) -> bool {
        self.unsynced && self.last_sync.elapsed() >= self.options.ack_flush_interval
    }

    /// One loop turn: applies `cmds` in one transaction, commits, and answers every request.
    fn run_batch(&mut self, cmds: Vec<Cmd>, shutdown: bool) {
        if let Some(err) = self.unavailable() {
            for cmd in cmds {
                refuse(cmd, &err);
            }
            return;
        }
        let mut batch = Batch::default();
        let mut outcome = contain(|| self.apply_and_commit(cmds, &mut batch, shutdown));
        if matches!(outcome, Ok(true)) && batch.answers_before_sync(shutdown) {
            // The batch is committed (not yet fsync'd): everything but the submits may be
            // answered now, so consumers do not wait for the disk. The submits are answered
            // after the fsync below. A delivery of a message whose submit is not yet durable is
            // fine: its submitter has not been told it was accepted.
            let orphans = batch.answer_committed();
            self.orphans.extend(orphans);
            outcome = contain(|| self.sync_now()).map(|()| true);
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
        let orphans = batch.answer_all(failure.as_ref().map(|(e, _)| e));
        if let Some((err, needs_reopen)) = failure {
            for cmd in batch.unapplied.drain(..) {
                refuse(cmd, &err);
            }
            self.restore_after_failure(needs_reopen);
            return;
        }
        self.orphans.extend(orphans);
        self.notify_result_waiters(std::mem::take(&mut batch.results));
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
            self.sweep_if_due(&mut t, batch, now)?;
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
        let sync = sync && !batch.answers_before_sync(shutdown);
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

    /// Writes every chunk this batch filled, then applies its settles (a chunk must be stored
    /// before a settle can mark it).
    fn flush_pending(&mut self, t: &mut Tables<'_>) -> Result<(), Fail> {
        self.flush_open_chunks(t)?;
        self.apply_settles(t)
    }

    /// Writes the queue rows and the seq counter that changed in this batch.
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

    fn qstate(&mut self, qid: u32) -> Option<&mut QState> {
        let name = self.names.get(&qid)?;
        self.queues.get_mut(name)
    }
}

#[cfg(test)]
mod tests {
    use super::Cmd;
    use super::fixture::{LONG_LEASE_MS, TestWriter, quick_config};
    use crate::embedded::EmbeddedOptions;
    use crate::{NewMessage, QueueError};
    use std::sync::atomic::Ordering;
    use std::time::Duration;
    use tokio::sync::oneshot;

    fn submit(
        queue: &str,
        id: &str,
    ) -> (
        Cmd,
        oneshot::Receiver<Result<Vec<crate::SubmitFate>, QueueError>>,
    ) {
        let (tx, rx) = oneshot::channel();
        let messages = vec![NewMessage::new(id, id.to_owned())];
        (
            Cmd::Submit {
                queue: queue.into(),
                messages,
                tx,
            },
            rx,
        )
    }

    #[test]
    fn an_idle_writer_has_nothing_to_wake_for() {
        let mut w = TestWriter::new(quick_config());
        assert_eq!(w.writer.time_to_next_wake(), None);
        w.submit_ids("q", &["x"]);
        assert_eq!(
            w.writer.time_to_next_wake(),
            None,
            "a submit is durable at once"
        );
        let got = w.receive("q", 1, LONG_LEASE_MS);
        let wake = w.writer.time_to_next_wake().expect("the lease expiry");
        assert!(
            wake > Duration::from_secs(29) && wake <= Duration::from_secs(30),
            "{wake:?}"
        );
        w.ack(&got[0].receipt).expect("ack");
        let wake = w.writer.time_to_next_wake().expect("the ack flush");
        assert!(wake <= Duration::from_millis(100), "{wake:?}");
    }

    #[test]
    fn submits_arriving_together_share_one_durable_commit() {
        let mut w = TestWriter::new(quick_config());
        let (cmds, rxs): (Vec<_>, Vec<_>) = (0..3).map(|i| submit("q", &format!("m{i}"))).unzip();
        w.writer.run_batch(cmds, false);
        for mut rx in rxs {
            assert!(rx.try_recv().expect("answered").is_ok());
        }
        let c = &w.writer.shared.counters;
        let counts = [
            &c.transactions,
            &c.commits,
            &c.durable_commits,
            &c.submit_commits,
            &c.accepted,
        ]
        .map(|n| n.load(Ordering::Relaxed));
        assert_eq!(counts, [1, 1, 1, 1, 3]);
    }

    #[test]
    fn a_batch_with_submits_answers_the_others_before_its_sync() {
        let mut w = TestWriter::new(quick_config());
        let (submit_cmd, mut submit_rx) = submit("q", "m");
        let (stats_tx, mut stats_rx) = oneshot::channel();
        w.writer
            .run_batch(vec![submit_cmd, Cmd::Stats { tx: stats_tx }], false);
        assert!(stats_rx.try_recv().expect("answered").is_ok());
        assert!(submit_rx.try_recv().expect("answered").is_ok());
        let c = &w.writer.shared.counters;
        // The batch's own commit, then an empty one that syncs it.
        assert_eq!(c.transactions.load(Ordering::Relaxed), 2);
        assert_eq!(c.durable_commits.load(Ordering::Relaxed), 1);
        assert!(!w.writer.unsynced);
    }

    #[test]
    fn an_idle_turn_makes_acks_durable_after_the_flush_interval() {
        let options = EmbeddedOptions {
            ack_flush_interval: Duration::from_millis(20),
            ..EmbeddedOptions::default()
        };
        let mut w = TestWriter::with_options(quick_config(), options);
        w.submit_ids("q", &["x"]);
        let got = w.receive("q", 1, LONG_LEASE_MS);
        w.ack(&got[0].receipt).expect("ack");
        assert!(w.writer.unsynced);
        let durable = w
            .writer
            .shared
            .counters
            .durable_commits
            .load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(w.writer.time_to_next_wake(), Some(Duration::ZERO));
        w.tick();
        assert!(!w.writer.unsynced);
        let now_durable = w
            .writer
            .shared
            .counters
            .durable_commits
            .load(Ordering::Relaxed);
        assert_eq!(now_durable, durable + 1);
        // No flush is due any more; only the acked lease's stale expiry entry is left.
        let wake = w.writer.time_to_next_wake();
        assert!(wake.is_none_or(|t| t > Duration::from_secs(1)), "{wake:?}");
    }

    #[test]
    fn the_loop_stops_at_shutdown_and_refuses_its_waiters() {
        let (writer, _dir) = TestWriter::new(quick_config()).into_parts();
        let (cmds, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || writer.run(rx));
        let (tx, waiting) = oneshot::channel();
        let receive = Cmd::Receive {
            queue: "q".into(),
            consumer: "c".into(),
            max: 1,
            lease_ms: LONG_LEASE_MS,
            wait_ms: 60_000,
            tx,
        };
        cmds.send(receive).expect("send");
        cmds.send(Cmd::Shutdown).expect("send");
        thread.join().expect("writer thread");
        assert_eq!(
            waiting.blocking_recv().expect("answered"),
            Err(QueueError::Closed)
        );
    }
}
