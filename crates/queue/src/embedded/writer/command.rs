//! The requests the writer thread takes, each handed to the concern that serves it, and how a
//! request is refused unheard (after shutdown, or while the database is lost to an I/O error).

use super::Writer;
use super::batch::Batch;
use super::failure::Fail;
use super::receive::Waiter;
use super::schema::Tables;
use crate::{
    DeadLetter, Leased, MAX_RECEIVE_BATCH, NackOutcome, NewMessage, QueueError, QueueStats,
    Selection, SubmitFate,
};
use bytes::Bytes;
use std::time::{Duration, SystemTime};
use tokio::sync::oneshot;

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
    /// Stops the thread at once, committing nothing more: what a killed process leaves.
    Halt,
}

impl Writer {
    /// Applies one request within the batch's transaction; its reply waits in `batch` until
    /// the commit outcome is known. An `Err` aborts the whole batch.
    pub(super) fn apply(
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
                batch.reply_when_durable(tx, r);
            }
            Cmd::Receive {
                queue,
                consumer,
                max,
                lease_ms,
                wait_ms,
                tx,
            } => {
                let request = Waiter {
                    consumer,
                    max: max.min(MAX_RECEIVE_BATCH),
                    lease_ms,
                    deadline_ms: now.saturating_add(wait_ms),
                    tx,
                };
                self.receive(t, batch, queue, request, now)?;
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
                let r = self.nack(t, batch, &receipt, &error, delay, now)?;
                batch.reply(tx, r);
            }
            Cmd::Extend {
                receipt,
                lease_ms,
                tx,
            } => {
                let r = self.extend(&receipt, lease_ms, now);
                batch.reply(tx, r);
            }
            Cmd::Release { receipts, tx } => {
                let released = self.release(&receipts);
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
            Cmd::Shutdown | Cmd::Halt => {}
        }
        Ok(())
    }
}

/// Answers a command with `err` without running it.
pub(super) fn refuse(cmd: Cmd, err: &QueueError) {
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
        Cmd::Shutdown | Cmd::Halt => {}
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixture::{LONG_LEASE_MS, TestWriter, quick_config};
    use super::{Cmd, refuse};
    use crate::{MAX_RECEIVE_BATCH, NewMessage, QueueError, Selection};
    use tokio::sync::oneshot;

    /// Refuses the request `make` builds and returns its answer.
    fn refused<T>(make: impl FnOnce(super::Tx<T>) -> Cmd) -> Result<T, QueueError> {
        let (tx, mut rx) = oneshot::channel();
        refuse(make(tx), &QueueError::Closed);
        rx.try_recv().expect("answered")
    }

    #[test]
    fn refuse_answers_every_request_with_the_error() {
        let (q, r) = (String::from("q"), String::from("1.2.3"));
        let closed = |e: Option<QueueError>| assert_eq!(e, Some(QueueError::Closed));
        closed(
            refused(|tx| Cmd::Submit {
                queue: q.clone(),
                messages: Vec::new(),
                tx,
            })
            .err(),
        );
        closed(
            refused(|tx| Cmd::Receive {
                queue: q.clone(),
                consumer: q.clone(),
                max: 1,
                lease_ms: 1,
                wait_ms: 0,
                tx,
            })
            .err(),
        );
        closed(
            refused(|tx| Cmd::Ack {
                receipt: r.clone(),
                result: None,
                tx,
            })
            .err(),
        );
        closed(
            refused(|tx| Cmd::AckMany {
                acks: Vec::new(),
                tx,
            })
            .err(),
        );
        closed(
            refused(|tx| Cmd::Nack {
                receipt: r.clone(),
                error: q.clone(),
                delay: None,
                tx,
            })
            .err(),
        );
        closed(
            refused(|tx| Cmd::Extend {
                receipt: r.clone(),
                lease_ms: 1,
                tx,
            })
            .err(),
        );
        closed(
            refused(|tx| Cmd::Release {
                receipts: Vec::new(),
                tx,
            })
            .err(),
        );
        closed(refused(|tx| Cmd::Stats { tx }).err());
        closed(
            refused(|tx| Cmd::ListDead {
                queue: q.clone(),
                page_size: 1,
                after: None,
                tx,
            })
            .err(),
        );
        closed(
            refused(|tx| Cmd::Redrive {
                queue: q.clone(),
                selection: Selection::All,
                tx,
            })
            .err(),
        );
        closed(
            refused(|tx| Cmd::Purge {
                queue: q.clone(),
                selection: Selection::All,
                tx,
            })
            .err(),
        );
        refuse(Cmd::Shutdown, &QueueError::Closed);
    }

    #[test]
    fn malformed_receipts_are_invalid_except_to_release() {
        let mut w = TestWriter::new(quick_config());
        let invalid = |r: Result<_, QueueError>| matches!(r, Err(QueueError::InvalidArgument(_)));
        assert!(invalid(w.ack("nope").map(|_| ())));
        assert!(invalid(w.nack("nope", None).map(|_| ())));
        let extended = w.call(|tx| Cmd::Extend {
            receipt: "nope".into(),
            lease_ms: 1,
            tx,
        });
        assert!(invalid(extended.map(|_| ())));
        let released = w.call(|tx| Cmd::Release {
            receipts: vec!["nope".into()],
            tx,
        });
        assert_eq!(released, Ok(0));
    }

    #[test]
    fn ack_many_answers_each_receipt_in_order() {
        let mut w = TestWriter::new(quick_config());
        w.submit_ids("q", &["a", "b"]);
        let got = w.receive("q", 2, LONG_LEASE_MS);
        let acks = vec![
            (got[0].receipt.clone(), None),
            (got[0].receipt.clone(), None),
            ("nope".to_owned(), None),
            (got[1].receipt.clone(), None),
        ];
        let outcomes = w.call(|tx| Cmd::AckMany { acks, tx }).expect("ack_many");
        assert!(outcomes[0].is_ok() && outcomes[3].is_ok(), "{outcomes:?}");
        assert!(matches!(outcomes[1], Err(QueueError::LeaseLost(_))));
        assert!(matches!(outcomes[2], Err(QueueError::InvalidArgument(_))));
    }

    #[test]
    fn a_receive_is_clamped_to_the_largest_batch() {
        let mut w = TestWriter::new(quick_config());
        let messages = (0..MAX_RECEIVE_BATCH + 10)
            .map(|i| NewMessage::new(format!("m{i}"), "x"))
            .collect();
        w.submit("q", messages);
        assert_eq!(
            w.receive("q", usize::MAX, LONG_LEASE_MS).len(),
            MAX_RECEIVE_BATCH
        );
    }
}
