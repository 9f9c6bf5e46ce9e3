//! The embedded backend: one redb file in a directory, one writer thread doing group commit.
//!
//! * this file: [`EmbeddedBackend`], which checks arguments, hands each call to the writer
//!   thread and awaits its reply (results are read directly), its options and I/O counters;
//! * `writer`: the writer thread, owner of every mutation, split by concern (mapped in its docs);
//! * `chunk`: the chunk format (messages appended together, stored as one value) and the
//!   settled bitmap of a partly settled chunk;
//! * `codec`: binary encoding of the other stored records (messages, attempt histories, dead
//!   letters, expiring entries, queue rows) and time conversions.

mod chunk;
mod codec;
mod writer;

use crate::{
    BackendConfig, DeadLetter, Leased, NackOutcome, NewMessage, QueueBackend, QueueError,
    QueueStats, Selection, SubmitFate,
};
use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};
use tokio::sync::oneshot;
use writer::{Cmd, Tx, Writer};

/// File name of the database inside the queue directory.
pub const DATABASE_FILE: &str = "queue.redb";

/// Tuning of the embedded engine (queue semantics live in [`BackendConfig`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbeddedOptions {
    /// Size of redb's page cache, the main memory bound (default 32 MiB).
    pub cache_bytes: usize,
    /// Longest time acks and other non-submit changes stay un-fsync'd (default 100 ms).
    pub ack_flush_interval: Duration,
    /// Most requests applied in one transaction (default 4096).
    pub max_batch_commands: usize,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        Self {
            cache_bytes: 32 * 1024 * 1024,
            ack_flush_interval: Duration::from_millis(100),
            max_batch_commands: 4096,
        }
    }
}

/// Counters of the writer thread, for benchmarks and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoStats {
    /// Transactions committed (durable or not).
    pub commits: u64,
    /// Commits made durable with an fsync.
    pub durable_commits: u64,
    /// Durable commits that carried at least one accepted message.
    pub submit_commits: u64,
    /// Messages accepted by submit.
    pub accepted_messages: u64,
    /// Write transactions begun, committed or not (an idle store begins none).
    pub transactions: u64,
    /// Turns of the writer loop woken by a timer (a lease expiry, an ack flush, a sweep)
    /// rather than by a request.
    pub timer_wakeups: u64,
}

impl IoStats {
    /// Average accepted messages per fsync'd submit commit (the group-commit batch size).
    pub fn avg_submit_batch(&self) -> f64 {
        if self.submit_commits == 0 {
            0.0
        } else {
            self.accepted_messages as f64 / self.submit_commits as f64
        }
    }
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) commits: AtomicU64,
    pub(crate) durable_commits: AtomicU64,
    pub(crate) submit_commits: AtomicU64,
    pub(crate) accepted: AtomicU64,
    /// Write transactions begun (committed or aborted).
    pub(crate) transactions: AtomicU64,
    /// Turns of the writer loop woken by a timer rather than by a request.
    pub(crate) timer_wakeups: AtomicU64,
}

/// State shared between the handle and the writer thread.
#[derive(Default)]
pub(crate) struct Shared {
    pub(crate) counters: Counters,
    /// The open database, for readers outside the writer thread; `None` while the writer
    /// reopens it (after an I/O error) and after close.
    pub(crate) db: parking_lot::RwLock<Option<Arc<redb::Database>>>,
    /// `wait_result` callers, by correlation id.
    pub(crate) result_waiters: Mutex<HashMap<String, Vec<oneshot::Sender<Bytes>>>>,
}

/// The embedded, crash-safe backend: a redb database in a directory.
///
/// Dropping it (or calling [`EmbeddedBackend::close`]) flushes pending acks, stops the writer
/// thread and releases the file, so the directory can be reopened at once.
pub struct EmbeddedBackend {
    tx: Mutex<Option<mpsc::Sender<Cmd>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    shared: Arc<Shared>,
    path: PathBuf,
}

impl std::fmt::Debug for EmbeddedBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBackend")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl EmbeddedBackend {
    /// Opens (or creates) the queue store in `dir` with default engine options.
    ///
    /// Blocks while redb recovers the file after a crash; call it from `spawn_blocking` if that
    /// matters.
    pub fn open(dir: &Path, config: BackendConfig) -> Result<Self, QueueError> {
        Self::open_with_options(dir, config, EmbeddedOptions::default())
    }

    /// Opens (or creates) the queue store in `dir` with explicit engine options.
    pub fn open_with_options(
        dir: &Path,
        config: BackendConfig,
        options: EmbeddedOptions,
    ) -> Result<Self, QueueError> {
        config.validate()?;
        if options.max_batch_commands == 0 {
            return Err(QueueError::InvalidArgument(
                "max_batch_commands must be at least 1".into(),
            ));
        }
        std::fs::create_dir_all(dir).map_err(|e| {
            QueueError::Storage(format!(
                "cannot create queue directory {}: {e}",
                dir.display()
            ))
        })?;
        let path = dir.join(DATABASE_FILE);
        let db = writer::open_database(&path, options.cache_bytes).map_err(|e| {
            QueueError::Storage(format!(
                "cannot open queue database {}: {e}",
                path.display()
            ))
        })?;
        let shared = Arc::new(Shared::default());
        *shared.db.write() = Some(db.clone());
        let recovered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let recovered = Writer::recover(db, path.clone(), config, options, shared.clone());
            if recovered.is_err() {
                // The last handle: its drop (which writes to the file) may meet the damage too.
                release_database(shared.db.write().take());
            }
            recovered
        }));
        let writer = recovered.unwrap_or_else(|payload| {
            Err(QueueError::Storage(format!(
                "queue database {} is damaged ({})",
                path.display(),
                writer::panic_message(payload.as_ref())
            )))
        })?;
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("agentmesh-queue-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| {
                QueueError::Storage(format!(
                    "cannot start the writer thread for {}: {e}",
                    path.display()
                ))
            })?;
        Ok(Self {
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            shared,
            path,
        })
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writer-thread counters (commits, fsyncs, accepted messages).
    pub fn io_stats(&self) -> IoStats {
        let c = &self.shared.counters;
        IoStats {
            commits: c.commits.load(Ordering::Relaxed),
            durable_commits: c.durable_commits.load(Ordering::Relaxed),
            submit_commits: c.submit_commits.load(Ordering::Relaxed),
            accepted_messages: c.accepted.load(Ordering::Relaxed),
            transactions: c.transactions.load(Ordering::Relaxed),
            timer_wakeups: c.timer_wakeups.load(Ordering::Relaxed),
        }
    }

    /// Flushes pending acks, stops the writer thread and waits for it; later calls fail with
    /// [`QueueError::Closed`]. Blocks briefly (one commit).
    pub fn close(&self) {
        if let Some(tx) = self.tx.lock().take() {
            let _ = tx.send(Cmd::Shutdown);
        }
        if let Some(handle) = self.thread.lock().take() {
            if handle.join().is_err() {
                tracing::error!(path = %self.path.display(), "queue writer thread panicked");
            }
        }
        release_database(self.shared.db.write().take());
    }

    /// Simulates a crash of the process, for tests: stops the writer thread without the
    /// commit a [`close`](Self::close) makes (acks and nacks not yet synced stay unsynced),
    /// copies the database file as it stands on disk into `dir` (which is what a killed
    /// process would leave behind), then lets go of this store. Open `dir` to "restart".
    #[doc(hidden)]
    pub fn crash_into(self, dir: &Path) -> Result<(), QueueError> {
        if let Some(tx) = self.tx.lock().take() {
            let _ = tx.send(Cmd::Halt);
        }
        if let Some(handle) = self.thread.lock().take() {
            let _ = handle.join();
        }
        std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::copy(&self.path, dir.join(DATABASE_FILE)))
            .map_err(|e| {
                QueueError::Storage(format!("cannot copy {}: {e}", self.path.display()))
            })?;
        Ok(())
    }

    async fn call<T>(&self, make: impl FnOnce(Tx<T>) -> Cmd) -> Result<T, QueueError> {
        let (tx, rx) = oneshot::channel();
        {
            let guard = self.tx.lock();
            let sender = guard.as_ref().ok_or(QueueError::Closed)?;
            sender.send(make(tx)).map_err(|_| QueueError::Closed)?;
        }
        rx.await.map_err(|_| self.dropped_reply())?
    }

    /// Why a request got no answer: the store was closed, or the writer gave up on the batch
    /// that held it (it met a damaged page of the file) and goes on with the next.
    fn dropped_reply(&self) -> QueueError {
        let running = self.tx.lock().is_some()
            && self
                .thread
                .lock()
                .as_ref()
                .is_some_and(|thread| !thread.is_finished());
        if running {
            QueueError::Storage(format!(
                "queue database {} failed this request: the file is damaged",
                self.path.display()
            ))
        } else {
            QueueError::Closed
        }
    }
}

impl Drop for EmbeddedBackend {
    fn drop(&mut self) {
        self.close();
    }
}

/// Drops a database handle; if it is the last, redb writes to the file as it closes it, and
/// panics there on some damaged files: contained, since the file is being let go of anyway.
pub(crate) fn release_database(db: Option<Arc<redb::Database>>) {
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(db))).is_err() {
        tracing::error!("closing a damaged queue database failed");
    }
}

fn positive_ms(what: &str, d: Duration) -> Result<u64, QueueError> {
    let ms = codec::dur_ms(d);
    if ms == 0 {
        return Err(QueueError::InvalidArgument(format!(
            "{what} must be at least 1 ms"
        )));
    }
    Ok(ms)
}

#[async_trait]
impl QueueBackend for EmbeddedBackend {
    async fn submit(
        &self,
        queue: &str,
        messages: Vec<NewMessage>,
    ) -> Result<Vec<SubmitFate>, QueueError> {
        crate::validate_queue_name(queue)?;
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let queue = queue.to_owned();
        self.call(|tx| Cmd::Submit {
            queue,
            messages,
            tx,
        })
        .await
    }

    async fn receive(
        &self,
        queue: &str,
        consumer_id: &str,
        max: usize,
        lease: Duration,
        wait: Duration,
    ) -> Result<Vec<Leased>, QueueError> {
        crate::validate_queue_name(queue)?;
        if max == 0 {
            return Err(QueueError::InvalidArgument("max must be at least 1".into()));
        }
        let lease_ms = positive_ms("lease", lease)?;
        let (queue, consumer) = (queue.to_owned(), consumer_id.to_owned());
        self.call(|tx| Cmd::Receive {
            queue,
            consumer,
            max,
            lease_ms,
            wait_ms: codec::dur_ms(wait),
            tx,
        })
        .await
    }

    async fn ack(&self, receipt: &str, result: Option<Bytes>) -> Result<(), QueueError> {
        let receipt = receipt.to_owned();
        self.call(|tx| Cmd::Ack {
            receipt,
            result,
            tx,
        })
        .await
    }

    async fn ack_many(
        &self,
        acks: Vec<(String, Option<Bytes>)>,
    ) -> Result<Vec<Result<(), QueueError>>, QueueError> {
        if acks.is_empty() {
            return Ok(Vec::new());
        }
        self.call(|tx| Cmd::AckMany { acks, tx }).await
    }

    async fn nack(
        &self,
        receipt: &str,
        error: &str,
        delay: Option<Duration>,
    ) -> Result<NackOutcome, QueueError> {
        let (receipt, error) = (receipt.to_owned(), error.to_owned());
        self.call(|tx| Cmd::Nack {
            receipt,
            error,
            delay,
            tx,
        })
        .await
    }

    async fn extend(&self, receipt: &str, lease: Duration) -> Result<SystemTime, QueueError> {
        let lease_ms = positive_ms("lease", lease)?;
        let receipt = receipt.to_owned();
        self.call(|tx| Cmd::Extend {
            receipt,
            lease_ms,
            tx,
        })
        .await
    }

    async fn release(&self, receipts: Vec<String>) -> Result<u64, QueueError> {
        if receipts.is_empty() {
            return Ok(0);
        }
        self.call(|tx| Cmd::Release { receipts, tx }).await
    }

    async fn stats(&self) -> Result<Vec<QueueStats>, QueueError> {
        self.call(|tx| Cmd::Stats { tx }).await
    }

    async fn list_dead_letters(
        &self,
        queue: &str,
        page_size: usize,
        after: Option<&str>,
    ) -> Result<(Vec<DeadLetter>, Option<String>), QueueError> {
        let (queue, after) = (queue.to_owned(), after.map(str::to_owned));
        self.call(|tx| Cmd::ListDead {
            queue,
            page_size,
            after,
            tx,
        })
        .await
    }

    async fn redrive(&self, queue: &str, selection: Selection) -> Result<u64, QueueError> {
        let queue = queue.to_owned();
        self.call(|tx| Cmd::Redrive {
            queue,
            selection,
            tx,
        })
        .await
    }

    async fn purge(&self, queue: &str, selection: Selection) -> Result<u64, QueueError> {
        let queue = queue.to_owned();
        self.call(|tx| Cmd::Purge {
            queue,
            selection,
            tx,
        })
        .await
    }

    async fn get_result(&self, correlation_id: &str) -> Result<Option<Bytes>, QueueError> {
        if self.tx.lock().is_none() {
            return Err(QueueError::Closed);
        }
        let db = self.shared.db.read().clone().ok_or_else(|| {
            QueueError::Storage(format!(
                "queue database {} is being reopened after an I/O error",
                self.path.display()
            ))
        })?;
        let corr = correlation_id.to_owned();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            writer::read_result(&db, &corr).map_err(|e| {
                QueueError::Storage(format!(
                    "reading result from queue database {} failed: {e}",
                    path.display()
                ))
            })
        })
        .await
        .map_err(|e| QueueError::Storage(format!("result reader task failed: {e}")))?
    }

    async fn wait_result(
        &self,
        correlation_id: &str,
        timeout: Duration,
    ) -> Result<Option<Bytes>, QueueError> {
        let (tx, rx) = oneshot::channel();
        self.shared
            .result_waiters
            .lock()
            .entry(correlation_id.to_owned())
            .or_default()
            .push(tx);
        // Registered first, then looked up: a result landing in between is not missed.
        let found = match self.get_result(correlation_id).await {
            Ok(Some(body)) => Ok(Some(body)),
            Ok(None) => match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(body)) => Ok(Some(body)),
                Ok(Err(_)) => Err(QueueError::Closed),
                Err(_) => Ok(None),
            },
            Err(e) => Err(e),
        };
        let mut waiters = self.shared.result_waiters.lock();
        if let Some(list) = waiters.get_mut(correlation_id) {
            list.retain(|s| !s.is_closed());
            if list.is_empty() {
                waiters.remove(correlation_id);
            }
        }
        found
    }
}
