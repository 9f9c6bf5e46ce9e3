//! Receive: one function call lapses expired leases, claims due retries and reads new entries, and
//! leases what it got; when nothing was ready, a blocking `XREAD` on a dedicated connection
//! waits for an append to the queue or its wake stream, or for the next due time.

use super::keys::{Receipt, stream_id_ms};
use super::library::Function;
use super::reply::{self, BadReply, Fields, ms_to_time};
use super::{Store, ms, positive_ms};
use crate::{Leased, MAX_RECEIVE_BATCH, QueueError, validate_queue_name};
use ::redis::Value;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// What one pass of the receive function found.
#[derive(Debug)]
enum Picked {
    /// Deliveries (at least one) and their lease expiry (ms).
    Leased(Vec<Leased>, u64),
    /// Nothing ready: what to wait for.
    Idle(Idle),
}

#[derive(Debug)]
struct Idle {
    now_ms: u64,
    /// The next lease expiry or retry time of the queue, if any.
    next_due_ms: Option<u64>,
    /// Last ids of the queue stream and its wake stream ("0-0" when empty).
    stream_last: String,
    wake_last: String,
}

impl Store {
    pub(super) async fn receive(
        store: &Arc<Store>,
        queue: &str,
        consumer: &str,
        max: usize,
        lease: Duration,
        wait: Duration,
    ) -> Result<Vec<Leased>, QueueError> {
        validate_queue_name(queue)?;
        if max == 0 {
            return Err(QueueError::InvalidArgument("max must be at least 1".into()));
        }
        let lease_ms = positive_ms("lease", lease)?;
        let max = max.min(MAX_RECEIVE_BATCH);
        let deadline = Instant::now() + wait;
        loop {
            let idle = match Self::pick_detached(store, queue, consumer, max, lease_ms).await? {
                Picked::Leased(leased, _) => return Ok(leased),
                Picked::Idle(idle) => idle,
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(Vec::new());
            }
            let until_due = idle
                .next_due_ms
                .map(|due| Duration::from_millis(due.saturating_sub(idle.now_ms) + 1));
            let block = until_due.map_or(left, |d| d.min(left));
            store.wait_for_news(queue, &idle, block).await?;
        }
    }

    /// Runs the pick in a task of its own: if the caller goes away before the answer, the
    /// task hands the messages back instead of letting their leases lapse.
    async fn pick_detached(
        store: &Arc<Store>,
        queue: &str,
        consumer: &str,
        max: usize,
        lease_ms: u64,
    ) -> Result<Picked, QueueError> {
        let (tx, rx) = oneshot::channel();
        let task_store = store.clone();
        let (queue, consumer) = (queue.to_owned(), consumer.to_owned());
        tokio::spawn(async move {
            let picked = task_store.pick(&queue, &consumer, max, lease_ms).await;
            if let Err(Ok(Picked::Leased(orphans, _))) = tx.send(picked) {
                let receipts: Vec<String> = orphans.into_iter().map(|m| m.receipt).collect();
                if let Err(e) = task_store.release(&receipts).await {
                    tracing::warn!(error = %e, %queue, "could not hand back an unanswered receive");
                }
            }
        });
        rx.await
            .map_err(|_| QueueError::Storage("the receive task ended without an answer".into()))?
    }

    async fn pick(
        &self,
        queue: &str,
        consumer: &str,
        max: usize,
        lease_ms: u64,
    ) -> Result<Picked, QueueError> {
        let mut cmd = self.lib.call(Function::Receive, self.keys.prefix());
        cmd.arg(queue)
            .arg(consumer)
            .arg(max)
            .arg(lease_ms)
            .arg(self.config.for_queue(queue).max_attempts);
        let mut con = self.conns.shared();
        let reply = self
            .lib
            .run(&mut con, &cmd)
            .await
            .map_err(|e| self.conns.error("receive", &e))?;
        let picked = read_picked(reply, queue).map_err(|e| self.conns.bad_reply("receive", e))?;
        if let Picked::Leased(leased, expires_ms) = &picked {
            if self.options.release_leases_on_drop {
                self.held
                    .add(leased.iter().map(|m| (m.receipt.clone(), *expires_ms)));
            }
        }
        Ok(picked)
    }

    /// Blocks until something is appended to the queue or its wake stream after the ids the
    /// pick saw, or `block` passed.
    async fn wait_for_news(
        &self,
        queue: &str,
        idle: &Idle,
        block: Duration,
    ) -> Result<(), QueueError> {
        let block_ms = ms(block).max(1);
        let (stream, wake) = (self.keys.stream(queue), self.keys.wake(queue));
        let _: Value = self
            .conns
            .on_dedicated("receive (waiting)", block, true, |mut con| {
                let mut cmd = ::redis::cmd("XREAD");
                cmd.arg("COUNT")
                    .arg(1)
                    .arg("BLOCK")
                    .arg(block_ms)
                    .arg("STREAMS")
                    .arg(&stream)
                    .arg(&wake)
                    .arg(&idle.stream_last)
                    .arg(&idle.wake_last);
                async move { cmd.query_async(&mut con).await }
            })
            .await?;
        Ok(())
    }
}

fn read_picked(reply: Value, queue: &str) -> Result<Picked, BadReply> {
    let mut items = reply::array(reply)?.into_iter();
    let now_ms = reply::int(reply::next(&mut items, "the time")?)? as u64;
    let expires_ms = reply::int(reply::next(&mut items, "the lease expiry")?)? as u64;
    let next_due = reply::string(reply::next(&mut items, "the next due time")?)?;
    let stream_last = reply::string(reply::next(&mut items, "the stream's last id")?)?;
    let wake_last = reply::string(reply::next(&mut items, "the wake stream's last id")?)?;
    let mut leased = Vec::new();
    while let Some(entry) = items.next() {
        let entry = reply::string(entry)?;
        let token = reply::string(reply::next(&mut items, "a token")?)?;
        let attempt = u32::try_from(reply::int(reply::next(&mut items, "an attempt")?)?)
            .map_err(|e| BadReply(format!("attempt out of range: {e}")))?;
        let fields = Fields::parse(reply::next(&mut items, "an entry's fields")?)?;
        let enqueued_ms = fields
            .enqueued_ms
            .or_else(|| stream_id_ms(&entry))
            .unwrap_or(0);
        leased.push(Leased {
            receipt: Receipt::format(&entry, &token, attempt, queue),
            message_id: fields.id,
            correlation_id: fields.correlation_id,
            body: fields.body,
            attempt,
            lease_expires_at: ms_to_time(expires_ms),
            enqueued_at: ms_to_time(enqueued_ms),
        });
    }
    if !leased.is_empty() {
        return Ok(Picked::Leased(leased, expires_ms));
    }
    Ok(Picked::Idle(Idle {
        now_ms,
        next_due_ms: next_due.parse().ok(),
        stream_last,
        wake_last,
    }))
}
