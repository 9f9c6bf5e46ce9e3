//! What aborts a batch, how callers and the log hear of it, and how the writer gets a working
//! database back after an I/O error (redb refuses every operation after one).

use super::Writer;
use super::schema::open_database;
use crate::QueueError;
use crate::embedded::codec::Corrupt;
use crate::embedded::release_database;
use redb::Database;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often a database that failed to reopen after an I/O error is tried again.
const REOPEN_EVERY: Duration = Duration::from_secs(1);
/// Least time between two log lines about failed batches.
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(5);

/// An internal failure that aborts the whole batch.
#[derive(Debug)]
pub(crate) enum Fail {
    Db(redb::Error),
    Corrupt(&'static str),
    /// redb panicked (it does on some damaged files instead of returning an error).
    Panicked(String),
}

/// Runs `f`, turning a panic (redb meeting a damaged page) into [`Fail::Panicked`], so a
/// damaged file fails requests instead of killing the writer thread.
pub(crate) fn contain<T>(f: impl FnOnce() -> Result<T, Fail>) -> Result<T, Fail> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or_else(|payload| Err(Fail::Panicked(panic_message(payload.as_ref()))))
}

/// The text of a panic payload.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".to_owned())
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
    pub(super) fn needs_reopen(&self) -> bool {
        // After a panic inside redb its state is unknown: start from the file again.
        matches!(
            self,
            Fail::Db(redb::Error::Io(_) | redb::Error::PreviousIo | redb::Error::DatabaseClosed)
                | Fail::Panicked(_)
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
            Fail::Panicked(what) => write!(f, "the database file is damaged ({what})"),
        }
    }
}

impl Writer {
    /// The error callers get for `e`, naming what was being done to which file.
    pub(super) fn storage(&self, what: &str, e: &Fail) -> QueueError {
        let message = format!("{what} queue database {} failed: {e}", self.path.display());
        if e.is_out_of_space() {
            QueueError::StorageFull(message)
        } else {
            QueueError::Storage(message)
        }
    }

    /// Logs a failed batch; while failures repeat (a full disk under load), at most one line
    /// per `FAILURE_LOG_EVERY`, with the number left out.
    pub(super) fn log_failure(&mut self, err: &QueueError) {
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

    /// The open database, or the error redb itself gives once it is closed.
    pub(super) fn db(&self) -> Result<&Database, Fail> {
        self.db
            .as_deref()
            .ok_or(Fail::Db(redb::Error::DatabaseClosed))
    }

    /// While the database is lost to an I/O error: how long until the next reopen attempt.
    pub(super) fn time_to_reopen(&self) -> Duration {
        let since = self
            .reopen_failed_at
            .map_or(REOPEN_EVERY, |at| at.elapsed());
        REOPEN_EVERY.saturating_sub(since)
    }

    /// Before a batch: tries to reopen a database lost to an I/O error (at most once per
    /// `REOPEN_EVERY`); returns the error to refuse the batch with while it stays lost.
    pub(super) fn unavailable(&mut self) -> Option<QueueError> {
        if self.db.is_some() {
            return None;
        }
        if self
            .reopen_failed_at
            .is_none_or(|at| at.elapsed() >= REOPEN_EVERY)
        {
            self.reopen();
        }
        if self.db.is_some() {
            return None;
        }
        Some(QueueError::Storage(format!(
            "queue database {} is unavailable after an I/O error; it is reopened every {} s",
            self.path.display(),
            REOPEN_EVERY.as_secs()
        )))
    }

    /// After a failed batch: the in-memory state may be ahead of the disk, so it is rebuilt
    /// from the file (reopened first if redb needs that).
    pub(super) fn restore_after_failure(&mut self, needs_reopen: bool) {
        if needs_reopen {
            self.reopen();
        } else if let Err(e) = self.reload() {
            tracing::error!(error = %self.storage("reloading", &e), "queue reload failed");
        }
    }

    /// Closes and reopens the database after an I/O error (redb refuses every operation after
    /// one), then reloads the state from disk. Leases are lost: their messages are ready again.
    fn reopen(&mut self) {
        release_database(self.shared.db.write().take());
        if let Some(old) = self.db.take() {
            // Readers (`get_result`) hold the database briefly; its file lock goes with the last.
            let until = Instant::now() + Duration::from_secs(5);
            while Arc::strong_count(&old) > 1 && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(1));
            }
            release_database(Some(old));
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
}

#[cfg(test)]
mod tests {
    use super::super::Cmd;
    use super::super::fixture::{LONG_LEASE_MS, TestWriter, quick_config};
    use super::super::schema::HISTORY;
    use super::Fail;
    use crate::QueueError;
    use std::io::{Error, ErrorKind};
    use std::time::{Duration, Instant};

    fn io(kind: ErrorKind) -> Fail {
        Fail::Db(redb::Error::Io(Error::from(kind)))
    }

    #[test]
    fn a_full_disk_is_storage_full_and_io_errors_need_a_reopen() {
        let w = TestWriter::new(quick_config());
        for kind in [ErrorKind::StorageFull, ErrorKind::QuotaExceeded] {
            let err = w.writer.storage("writing to", &io(kind));
            assert!(
                matches!(&err, QueueError::StorageFull(m) if m.contains("queue.redb")),
                "{err:?}"
            );
        }
        let err = w
            .writer
            .storage("writing to", &io(ErrorKind::PermissionDenied));
        assert!(matches!(err, QueueError::Storage(_)), "{err:?}");
        assert!(io(ErrorKind::Other).needs_reopen());
        assert!(Fail::Db(redb::Error::PreviousIo).needs_reopen());
        assert!(!Fail::Corrupt("history").needs_reopen());
    }

    #[test]
    fn a_failed_batch_answers_every_request_with_the_error_and_reloads() {
        let mut w = TestWriter::new(quick_config());
        w.submit_ids("q", &["x"]);
        let got = w.receive("q", 1, LONG_LEASE_MS);
        {
            // A history that claims one attempt but holds none: decoding it fails the nack.
            let db = w.writer.db.clone().expect("open");
            let txn = db.begin_write().expect("txn");
            txn.open_table(HISTORY)
                .expect("history")
                .insert((w.writer.queues["q"].id, 1), &[1u8, 0, 0, 0][..])
                .expect("insert");
            txn.commit().expect("commit");
        }
        let (nack_tx, mut nack_rx) = tokio::sync::oneshot::channel();
        let (stats_tx, mut stats_rx) = tokio::sync::oneshot::channel();
        let nack = Cmd::Nack {
            receipt: got[0].receipt.clone(),
            error: "boom".into(),
            delay: None,
            tx: nack_tx,
        };
        w.writer
            .run_batch(vec![nack, Cmd::Stats { tx: stats_tx }], false);
        // The request that failed is dropped unanswered (its caller sees `Closed`).
        assert!(!matches!(nack_rx.try_recv(), Ok(Ok(_))));
        let stats = stats_rx.try_recv().expect("not applied, still answered");
        assert!(
            matches!(&stats, Err(QueueError::Storage(m)) if m.contains("corrupt")),
            "{stats:?}"
        );
        // Reloaded from disk: the lease is gone, the message ready again.
        assert!(w.writer.leases.is_empty());
        assert_eq!(w.receive("q", 1, LONG_LEASE_MS).len(), 1);
    }

    #[test]
    fn a_lost_database_refuses_requests_until_it_reopens() {
        let mut w = TestWriter::new(quick_config());
        w.submit_ids("q", &["x"]);
        w.receive("q", 1, LONG_LEASE_MS);
        // As after an I/O error whose reopen just failed.
        w.writer.db = None;
        w.writer.reopen_failed_at = Some(Instant::now());
        let wake = w.writer.time_to_next_wake().expect("a reopen attempt");
        assert!(
            wake > Duration::ZERO && wake <= Duration::from_secs(1),
            "{wake:?}"
        );
        let refused = w.call(|tx| Cmd::Stats { tx });
        assert!(
            matches!(&refused, Err(QueueError::Storage(m)) if m.contains("unavailable")),
            "{refused:?}"
        );
        // Once the retry interval has passed, the next turn reopens and reloads.
        w.writer.reopen_failed_at = Instant::now().checked_sub(Duration::from_secs(2));
        let again = w.receive("q", 1, LONG_LEASE_MS);
        assert_eq!(
            again[0].attempt, 1,
            "the lost lease is not a failed attempt"
        );
        assert!(
            w.writer.shared.db.read().is_some(),
            "readers see the reopened file"
        );
    }

    #[test]
    fn repeated_failures_are_logged_at_most_every_few_seconds() {
        let mut w = TestWriter::new(quick_config());
        let err = QueueError::Storage("disk".into());
        w.writer.log_failure(&err);
        w.writer.log_failure(&err);
        w.writer.log_failure(&err);
        assert_eq!(w.writer.failures_not_logged, 2);
    }
}
