//! A writer on a temp directory, driven one loop turn at a time on the test's own thread, so
//! each concern's tests see the writer's state and tables between turns.

use super::Writer;
use super::command::{Cmd, Tx};
use super::schema::open_database;
use crate::embedded::{EmbeddedOptions, Shared};
use crate::{
    BackendConfig, Leased, NackOutcome, NewMessage, QueueConfig, QueueError, QueueStats, SubmitFate,
};
use redb::{ReadableDatabase, ReadableTableMetadata, TableDefinition};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// A lease long enough never to lapse during a test.
pub(super) const LONG_LEASE_MS: u64 = 30_000;

/// Queue policy with short timings, so retries and expiries happen within a test.
pub(super) fn quick_config() -> BackendConfig {
    BackendConfig::new(QueueConfig {
        max_attempts: 3,
        dedup_window: Duration::from_secs(3600),
        backoff_base: Duration::from_millis(10),
        backoff_max: Duration::from_millis(40),
        result_ttl: Duration::from_secs(3600),
    })
}

/// A writer over a database in its own temp directory.
pub(super) struct TestWriter {
    pub(super) writer: Writer,
    config: BackendConfig,
    options: EmbeddedOptions,
    dir: tempfile::TempDir,
}

impl TestWriter {
    pub(super) fn new(config: BackendConfig) -> Self {
        Self::with_options(config, EmbeddedOptions::default())
    }

    pub(super) fn with_options(config: BackendConfig, options: EmbeddedOptions) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let writer = open_writer(&dir, config.clone(), options.clone());
        Self {
            writer,
            config,
            options,
            dir,
        }
    }

    /// Shuts the writer down as `EmbeddedBackend::close` does and opens the file again.
    pub(super) fn restart(self) -> Self {
        let Self {
            mut writer,
            config,
            options,
            dir,
        } = self;
        writer.run_batch(Vec::new(), true);
        drop(writer);
        let writer = open_writer(&dir, config.clone(), options.clone());
        Self {
            writer,
            config,
            options,
            dir,
        }
    }

    /// The writer, to run on a thread of its own, and the directory that must outlive it.
    pub(super) fn into_parts(self) -> (Writer, tempfile::TempDir) {
        (self.writer, self.dir)
    }

    /// Runs one request as a loop turn of its own and returns its answer.
    pub(super) fn call<T>(&mut self, make: impl FnOnce(Tx<T>) -> Cmd) -> Result<T, QueueError> {
        let (tx, mut rx) = oneshot::channel();
        self.writer.run_batch(vec![make(tx)], false);
        rx.try_recv().expect("answered in its own turn")
    }

    /// A loop turn without a request, as when a timer wakes the thread.
    pub(super) fn tick(&mut self) {
        self.writer.run_batch(Vec::new(), false);
    }

    pub(super) fn submit(&mut self, queue: &str, messages: Vec<NewMessage>) -> Vec<SubmitFate> {
        let queue = queue.to_owned();
        self.call(|tx| Cmd::Submit {
            queue,
            messages,
            tx,
        })
        .expect("submit")
    }

    /// Submits messages with these ids (each body is its id); all must be accepted.
    pub(super) fn submit_ids(&mut self, queue: &str, ids: &[&str]) {
        let messages = ids
            .iter()
            .map(|id| NewMessage::new(*id, id.to_string()))
            .collect();
        for fate in self.submit(queue, messages) {
            assert!(matches!(fate, SubmitFate::Accepted { .. }), "{fate:?}");
        }
    }

    /// Receives up to `max` messages without waiting.
    pub(super) fn receive(&mut self, queue: &str, max: usize, lease_ms: u64) -> Vec<Leased> {
        let queue = queue.to_owned();
        self.call(|tx| Cmd::Receive {
            queue,
            consumer: "consumer".into(),
            max,
            lease_ms,
            wait_ms: 0,
            tx,
        })
        .expect("receive")
    }

    pub(super) fn ack(&mut self, receipt: &str) -> Result<(), QueueError> {
        let receipt = receipt.to_owned();
        self.call(|tx| Cmd::Ack {
            receipt,
            result: None,
            tx,
        })
    }

    pub(super) fn nack(
        &mut self,
        receipt: &str,
        delay: Option<Duration>,
    ) -> Result<NackOutcome, QueueError> {
        let receipt = receipt.to_owned();
        self.call(|tx| Cmd::Nack {
            receipt,
            error: "failed".into(),
            delay,
            tx,
        })
    }

    pub(super) fn stats_of(&mut self, queue: &str) -> QueueStats {
        self.call(|tx| Cmd::Stats { tx })
            .expect("stats")
            .into_iter()
            .find(|s| s.name == queue)
            .unwrap_or_else(|| panic!("no stats for {queue}"))
    }

    /// Entries in `table`, read outside the writer's transactions.
    pub(super) fn rows<K: redb::Key + 'static, V: redb::Value + 'static>(
        &self,
        table: TableDefinition<K, V>,
    ) -> u64 {
        let db = self.writer.db.as_ref().expect("database open");
        let txn = db.begin_read().expect("read transaction");
        txn.open_table(table).expect("table").len().expect("len")
    }
}

fn open_writer(dir: &tempfile::TempDir, config: BackendConfig, options: EmbeddedOptions) -> Writer {
    let path = dir.path().join(crate::DATABASE_FILE);
    let db = open_database(&path, options.cache_bytes).expect("open database");
    let shared = Arc::new(Shared::default());
    *shared.db.write() = Some(db.clone());
    Writer::recover(db, path, config, options, shared).expect("recover")
}
