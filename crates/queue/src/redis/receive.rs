//! Receive: one `MULTI` opens a lease (lapsing expired leases and claiming due retries for it),
//! reads new entries into it with `XREADGROUP` and closes it; when nothing was ready, a blocking
//! `XREAD` on a dedicated connection waits for an append to the queue or its wake stream, or for
//! the next due time. New entries go straight from `XREADGROUP` to the node: passing them through
//! a Lua function cost more of Redis's time than reading them.

use super::keys::{Receipt, stream_id_ms};
use super::library::{Function, is_missing_function_reply};
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
        // The lease's name, also the receipts' token: random, so nodes need not coordinate.
        let name = rand::random::<u64>().to_string();
        let pipe = self.receive_pipeline(queue, &name, consumer, max, lease_ms, true);
        let mut con = self.conns.shared();
        let mut replies = pipe
            .query_async::<Vec<Value>>(&mut con)
            .await
            .map_err(|e| self.conns.error("receive", &e))?;
        let mut read_before = None;
        if replies.first().is_some_and(is_missing_function_reply) {
            // The read ran without its lease: run the step again under the same name (the
            // lease then holds what the first read took too) and deliver both reads.
            self.lib
                .load(&mut con)
                .await
                .map_err(|e| self.conns.error("receive (loading functions)", &e))?;
            read_before = replies.get_mut(1).map(std::mem::take);
            replies = self
                .receive_pipeline(queue, &name, consumer, max, lease_ms, false)
                .query_async::<Vec<Value>>(&mut con)
                .await
                .map_err(|e| self.conns.error("receive", &e))?;
        }
        let picked = read_picked(replies, read_before, queue, &name)
            .map_err(|e| self.conns.bad_reply("receive", e))?;
        if let Picked::Leased(leased, expires_ms) = &picked {
            if self.options.release_leases_on_drop {
                // A receipt starts with its entry id (see `Receipt`).
                let deliveries = leased
                    .iter()
                    .map(|m| {
                        let entry = m.receipt.split_once('.').map_or("", |(entry, _)| entry);
                        (entry.to_owned(), m.attempt)
                    })
                    .collect();
                self.held.add(queue, &name, *expires_ms, deliveries);
            }
        }
        Ok(picked)
    }

    /// `MULTI`, open the lease, `XREADGROUP` into it, close it, `EXEC`; errors are kept per
    /// command so that a missing function library can be told apart. `first_read`: no earlier
    /// read went into this lease (the close may then mark it fresh, see `lua/ack.lua`).
    fn receive_pipeline(
        &self,
        queue: &str,
        name: &str,
        consumer: &str,
        max: usize,
        lease_ms: u64,
        first_read: bool,
    ) -> ::redis::Pipeline {
        let prefix = self.keys.prefix();
        let mut open = self.lib.call(Function::ReceiveOpen, prefix);
        open.arg(queue)
            .arg(name)
            .arg(consumer)
            .arg(max)
            .arg(lease_ms)
            .arg(self.config.for_queue(queue).max_attempts);
        let mut read = ::redis::cmd("XREADGROUP");
        read.arg("GROUP")
            .arg(GROUP)
            .arg(format!("L{name}"))
            .arg("COUNT")
            .arg(max)
            .arg("STREAMS")
            .arg(self.keys.stream(queue))
            .arg(">");
        let mut close = self.lib.call(Function::ReceiveClose, prefix);
        close
            .arg(queue)
            .arg(name)
            .arg(max)
            .arg(if first_read { "1" } else { "0" });
        let mut pipe = ::redis::pipe();
        pipe.atomic()
            .ignore_errors()
            .add_command(open)
            .add_command(read)
            .add_command(close);
        pipe
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

/// The consumer group of every queue stream (see `lua/prelude.lua`).
const GROUP: &str = "agentmesh";

/// Reads the replies of [`Store::receive_pipeline`] (with the entries of an earlier read under
/// the same lease, if one ran without its lease).
fn read_picked(
    replies: Vec<Value>,
    read_before: Option<Value>,
    queue: &str,
    name: &str,
) -> Result<Picked, BadReply> {
    let [open, read, close]: [Value; 3] = replies
        .try_into()
        .map_err(|r: Vec<Value>| BadReply(format!("{} replies to a receive", r.len())))?;
    let mut items = reply::array(ok(open)?)?.into_iter();
    let now_ms = reply::int(reply::next(&mut items, "the time")?)? as u64;
    let expires_ms = reply::int(reply::next(&mut items, "the lease expiry")?)? as u64;
    let mut leased = Vec::new();
    let mut deliver = |entry: String, attempt: u32, fields: Value| -> Result<(), BadReply> {
        let fields = Fields::parse(fields)?;
        let enqueued_ms = fields
            .enqueued_ms
            .or_else(|| stream_id_ms(&entry))
            .unwrap_or(0);
        leased.push(Leased {
            receipt: Receipt::format(&entry, name, attempt, queue),
            message_id: fields.id,
            correlation_id: fields.correlation_id,
            body: fields.body,
            attempt,
            lease_expires_at: ms_to_time(expires_ms),
            enqueued_at: ms_to_time(enqueued_ms),
        });
        Ok(())
    };
    // Claimed retries first: entry id, attempt, fields.
    while let Some(entry) = items.next() {
        let entry = reply::string(entry)?;
        let attempt = u32::try_from(reply::int(reply::next(&mut items, "an attempt")?)?)
            .map_err(|e| BadReply(format!("attempt out of range: {e}")))?;
        deliver(
            entry,
            attempt,
            reply::next(&mut items, "an entry's fields")?,
        )?;
    }
    let mut close = reply::array(ok(close)?)?.into_iter();
    let holds = reply::int(reply::next(&mut close, "whether the lease holds entries")?)?;
    if holds == 1 {
        // New entries, on their first attempt, but those handed back.
        let handed_back: Vec<String> = close.map(reply::string).collect::<Result<_, _>>()?;
        let before = read_before.filter(|v| !matches!(v, Value::ServerError(_)));
        for read in before.into_iter().chain([read]) {
            for (entry, fields) in stream_entries(ok(read)?)? {
                if !handed_back.contains(&entry) {
                    deliver(entry, 1, fields)?;
                }
            }
        }
        return Ok(Picked::Leased(leased, expires_ms));
    }
    let next_due = reply::string(reply::next(&mut close, "the next due time")?)?;
    let stream_last = reply::string(reply::next(&mut close, "the stream's last id")?)?;
    let wake_last = reply::string(reply::next(&mut close, "the wake stream's last id")?)?;
    Ok(Picked::Idle(Idle {
        now_ms,
        next_due_ms: next_due.parse().ok(),
        stream_last,
        wake_last,
    }))
}

/// A reply that is not an error.
fn ok(v: Value) -> Result<Value, BadReply> {
    match v {
        Value::ServerError(e) => Err(BadReply(format!("redis error: {e:?}"))),
        other => Ok(other),
    }
}

/// The entries of an `XREAD`/`XREADGROUP` reply of one stream: (id, fields).
fn stream_entries(v: Value) -> Result<Vec<(String, Value)>, BadReply> {
    let streams = match v {
        Value::Map(pairs) => pairs.into_iter().map(|(_, entries)| entries).collect(),
        other => reply::array(other)?
            .into_iter()
            .map(|stream| {
                let mut kv = reply::array(stream)?.into_iter();
                reply::next(&mut kv, "a stream's name")?;
                reply::next(&mut kv, "a stream's entries")
            })
            .collect::<Result<Vec<_>, _>>()?,
    };
    let mut out = Vec::new();
    for entries in streams {
        for entry in reply::array(entries)? {
            let mut e = reply::array(entry)?.into_iter();
            let id = reply::string(reply::next(&mut e, "an entry id")?)?;
            out.push((id, reply::next(&mut e, "an entry's fields")?));
        }
    }
    Ok(out)
}
