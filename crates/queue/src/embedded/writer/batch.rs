//! Per-batch scratch state, and the replies held back until the batch's commit outcome is
//! known: a request applied in a batch that then fails to commit is answered with the failure.

use super::command::{Cmd, Tx};
use super::lease::LeaseKey;
use crate::{Leased, QueueError};
use bytes::Bytes;

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

/// Per-batch scratch state.
#[derive(Default)]
pub(super) struct Batch {
    /// Replies that may go out once the batch is committed (fsync'd or not).
    pending: Vec<Box<dyn Deliver>>,
    /// Submit replies: they wait for the fsync.
    durable: Vec<Box<dyn Deliver>>,
    /// Results to hand to `wait_result` callers once committed.
    pub(super) results: Vec<(String, Bytes)>,
    /// Commands not applied because the batch failed before them.
    pub(super) unapplied: Vec<Cmd>,
    /// Messages were accepted: the commit must be durable before anyone hears of it.
    pub(super) needs_sync: bool,
    /// Something was written.
    pub(super) changed: bool,
    pub(super) accepted: u64,
}

impl Batch {
    /// Holds `result` for `tx` until the batch is committed.
    pub(super) fn reply<T: Send + 'static>(&mut self, tx: Tx<T>, result: Result<T, QueueError>) {
        self.pending.push(Box::new(Reply(tx, result)));
    }

    /// Holds a submit's `result` for `tx` until the batch is durable.
    pub(super) fn reply_when_durable<T: Send + 'static>(
        &mut self,
        tx: Tx<T>,
        result: Result<T, QueueError>,
    ) {
        self.durable.push(Box::new(Reply(tx, result)));
    }

    /// Holds a receive's deliveries until the batch is committed; if the receiver is gone by
    /// then, their leases `keys` come back from [`Batch::answer_all`].
    pub(super) fn reply_leased(
        &mut self,
        tx: Tx<Vec<Leased>>,
        leased: Vec<Leased>,
        keys: Vec<LeaseKey>,
    ) {
        self.pending
            .push(Box::new(ReceiveReply { tx, leased, keys }));
    }

    /// Whether a batch is committed without an fsync first, its non-submit replies sent, and
    /// then made durable (it holds submits and something else to answer).
    pub(super) fn answers_before_sync(&self, shutdown: bool) -> bool {
        self.needs_sync && !shutdown && !self.pending.is_empty()
    }

    /// Sends every reply but the submits' (the batch is committed, not yet durable); returns
    /// the leases of deliveries nobody was left to take.
    pub(super) fn answer_committed(&mut self) -> Vec<LeaseKey> {
        deliver_all(self.pending.drain(..), None)
    }

    /// Sends every reply still held, or `failure` in their place; returns the leases of
    /// deliveries nobody was left to take.
    pub(super) fn answer_all(&mut self, failure: Option<&QueueError>) -> Vec<LeaseKey> {
        deliver_all(
            self.pending.drain(..).chain(self.durable.drain(..)),
            failure,
        )
    }
}

fn deliver_all(
    replies: impl Iterator<Item = Box<dyn Deliver>>,
    failure: Option<&QueueError>,
) -> Vec<LeaseKey> {
    let mut orphans = Vec::new();
    for reply in replies {
        if let Some(keys) = reply.deliver(failure) {
            orphans.extend(keys);
        }
    }
    orphans
}

#[cfg(test)]
mod tests {
    use super::Batch;
    use crate::QueueError;
    use tokio::sync::oneshot;

    #[test]
    fn a_failed_batch_answers_with_the_failure() {
        let mut batch = Batch::default();
        let (tx, mut rx) = oneshot::channel::<Result<u64, QueueError>>();
        batch.reply(tx, Ok(7));
        let orphans = batch.answer_all(Some(&QueueError::Closed));
        assert!(orphans.is_empty());
        assert_eq!(rx.try_recv().expect("answered"), Err(QueueError::Closed));
    }

    #[test]
    fn deliveries_nobody_takes_come_back_as_leases() {
        let mut batch = Batch::default();
        let (gone, rx) = oneshot::channel();
        drop(rx);
        batch.reply_leased(gone, Vec::new(), vec![(1, 2, 3)]);
        let (tx, mut rx) = oneshot::channel();
        batch.reply_leased(tx, Vec::new(), vec![(1, 4, 5)]);
        assert_eq!(batch.answer_all(None), [(1, 2, 3)]);
        assert_eq!(rx.try_recv().expect("answered"), Ok(Vec::new()));
    }

    #[test]
    fn submits_are_answered_after_the_others() {
        let mut batch = Batch::default();
        let (submit_tx, mut submit_rx) = oneshot::channel::<Result<(), QueueError>>();
        let (other_tx, mut other_rx) = oneshot::channel::<Result<(), QueueError>>();
        batch.reply_when_durable(submit_tx, Ok(()));
        assert!(!batch.answers_before_sync(false), "nothing else to answer");
        batch.reply(other_tx, Ok(()));
        assert!(!batch.answers_before_sync(false), "nothing accepted");
        batch.needs_sync = true;
        assert!(batch.answers_before_sync(false));
        assert!(!batch.answers_before_sync(true), "shutdown syncs at once");
        batch.answer_committed();
        assert_eq!(other_rx.try_recv().expect("answered"), Ok(()));
        assert!(
            submit_rx.try_recv().is_err(),
            "the submit waits for the sync"
        );
        batch.answer_all(None);
        assert_eq!(submit_rx.try_recv().expect("answered"), Ok(()));
    }
}
