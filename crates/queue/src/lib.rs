//! Durable at-least-once queue storage for agentmesh.
//!
//! The node's `QueueService` talks to a [`QueueBackend`] (an object-safe async trait, used as
//! `Arc<dyn QueueBackend>`). Message bodies are opaque bytes (encoded envelopes); this crate knows
//! nothing about the protocol.
//!
//! # Layout
//!
//! * this file: the [`QueueBackend`] trait, the API limits and queue-name validation;
//! * `types`: the values passed through the API (messages, deliveries, fates, dead letters, stats);
//! * `config`: each queue's delivery policy ([`QueueConfig`]) and the backend's [`BackendConfig`];
//! * `error`: [`QueueError`], the crate's one error type;
//! * `embedded`: [`EmbeddedBackend`], the redb store and its writer thread (mapped in its own docs);
//! * [`redis`]: [`RedisBackend`], a queue on Redis Streams that several nodes share (its docs
//!   say what an acknowledged submit means there, and where it differs from the embedded one);
//! * `conformance` (feature `conformance`): the suite every backend must pass (see below).
//!
//! Retry backoff comes from `agentmesh-resilience` (`full_jitter_delay`), shared with the
//! node's router and the SDK.
//!
//! # Semantics
//!
//! As the embedded backend implements them (the Redis backend's docs list its differences):
//!
//! * [`QueueBackend::submit`] returns only once every accepted message is durable. Writers are
//!   batched: a single writer thread takes every request that arrived while the previous commit
//!   was syncing and commits them together with one fsync (group commit).
//!   Other requests in the same batch (receives, acks, ...) are answered as soon as the batch is
//!   committed, before its fsync, so consumers never wait for the disk; only the submits wait.
//! * [`QueueBackend::receive`] long-polls and hands out messages under a lease. Competing
//!   consumers never see the same message while its lease is live. A lapsed lease counts as a
//!   failed attempt ("lease expired") and the message is ready again at once.
//! * [`QueueBackend::ack`] deletes the message, optionally storing a result by correlation id
//!   (with a TTL) and forwarding it to the message's `reply_to` queue, atomically with the ack.
//!   Acks are not fsync'd one by one: they ride on the next group commit or on a periodic flush
//!   (100 ms by default). A lost ack only causes a redelivery.
//! * [`QueueBackend::release`] hands leases back without counting a failed attempt (a node
//!   shutting down gracefully releases what its consumers still hold, so others get it at once).
//! * [`QueueBackend::abandon`] fails the deliveries of a consumer that went away (crashed or
//!   disconnected) while holding them: each is a failed attempt, ready again at once, so a
//!   message that keeps killing its consumers reaches the dead letters.
//! * [`QueueBackend::nack`] schedules a retry (explicit delay, or exponential backoff with full
//!   jitter); after `max_attempts` failed attempts the message moves to the queue's dead-letter
//!   set with its whole attempt history.
//! * Leases live in memory: after a restart every un-acked message is ready again, and one that
//!   was waiting for a retry still waits until its retry time. A delivery in flight when the
//!   process died is not counted as a failed attempt.
//! * A full disk fails the writes of that batch with [`QueueError::StorageFull`] (none of it
//!   is acknowledged, though a failed commit may have stored part of it); reads go on, and writes work again as soon as space is freed. After
//!   any I/O error the embedded backend reopens its file (redb refuses every operation after
//!   one) and reloads its state; leases handed out before are lost, so their messages are
//!   delivered again.
//!
//! # The embedded engine
//!
//! [`EmbeddedBackend`] keeps everything in one [redb](https://docs.rs/redb) file (redb 4,
//! copy-on-write B-trees, checksummed commit slots), written by one thread that commits each
//! batch of requests in one transaction. The layout keeps storage operations per message to a
//! minimum, because the writer thread is what limits throughput:
//!
//! * **Chunks.** The messages one batch appends to a queue are stored as one value (a chunk of
//!   up to 31 KiB), so a submit costs one B-tree insert per chunk, not per message. Settling a
//!   message (ack or dead letter) sets its bit in the chunk's settled bitmap, written once per
//!   chunk and batch; the chunk is deleted when its last message is settled.
//! * **Ready and leased messages are not indexed on disk.** Each queue has a cursor: messages
//!   past it are ready, in order, and a receive reads them straight from the chunks. Leases,
//!   and messages ready again (released, lease lapsed), live in memory; neither grows with the
//!   queue depth, only with what consumers hold. Only nacked messages waiting for a retry are
//!   indexed on disk (`schedule`), and that index is what a restart consults.
//! * Dedup keys, results, dead letters and attempt histories are tables of their own, with
//!   expiry indexes swept a bounded chunk at a time.
//!
//! Memory stays bounded whatever the queue depth (redb's page cache, 32 MiB by default): with
//! 400k queued 1-KiB messages (a 544 MiB file), peak RSS was 38 MiB (`-- --depth`). Chunks stay
//! under 32 KiB because redb rounds larger values up to page runs (60 KiB chunks made that file
//! 784 MiB, 256 KiB chunks 1092 MiB).
//!
//! Why redb rather than a hand-written segment log: a log writes faster per sync (raw append +
//! fdatasync of ~300-byte records: 478k rec/s vs redb's 158k rec/s at 256 records per sync,
//! `-- --engine`), but would need a compactor and on-disk indexes of its own for the retry
//! schedule, dedup window, dead letters and results to keep memory bounded. With chunks, redb's
//! per-message cost is no longer the limit: end to end through a node, the queue outruns Redis
//! Streams (see the `queue` section of the `mesh` bench of the `agentmesh` crate).
//!
//! Whole-queue numbers (`cargo bench -p agentmesh-queue --bench queue_throughput`, 256-byte
//! bodies, 2 cores, virtual disk with fdatasync ≈ 160 µs; one run):
//!
//! | workload                                          | msgs/s | msgs per fsync |
//! |---------------------------------------------------|-------:|---------------:|
//! | durable submit, 64 tasks × 1 msg per call         | 64k    | 32             |
//! | durable submit, 256 tasks × 1 msg per call        | 209k   | 129            |
//! | durable submit, 8 tasks × 64 msgs per call        | 407k   | 256            |
//! | submit → receive → ack (16 producers, 4 consumers)| 181k   | 130            |
//!
//! The layout before chunks (one entry per message, ready and in-flight indexes on disk) did
//! 62k, 152k, 246k and 107k on the same workloads; stores in that layout are converted when
//! opened.
//!
//! # Conformance suite
//!
//! With the `conformance` feature, the `conformance` module exposes one async function per
//! required behaviour, each taking a `conformance::BackendFactory`, and the
//! `conformance_suite!` macro turns them all into `#[tokio::test]`s, so every backend runs the
//! same tests. `tests/conformance.rs` runs it on the embedded backend and
//! `tests/conformance_redis.rs` on the Redis backend; from another crate:
//!
//! ```toml
//! [dev-dependencies]
//! agentmesh-queue = { workspace = true, features = ["conformance"] }
//! async-trait.workspace = true
//! tokio = { workspace = true, features = ["macros", "rt-multi-thread"] }
//! ```
//!
//! ```ignore
//! struct MyFactory { prefix: String } // fresh storage per instance
//! #[async_trait::async_trait]
//! impl agentmesh_queue::conformance::BackendFactory for MyFactory {
//!     async fn open(&self, config: BackendConfig) -> Result<Arc<dyn QueueBackend>, QueueError> {
//!         /* connect; the same storage on every call, so a reopen sees the same data */
//!     }
//! }
//! agentmesh_queue::conformance_suite!(MyFactory::new());
//! // or, for a backend that needs a service the default test run lacks:
//! agentmesh_queue::conformance_suite!(ignore = "needs MY_SERVICE"; MyFactory::new());
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod config;
mod embedded;
mod error;
pub mod redis;
mod types;

#[cfg(feature = "conformance")]
pub mod conformance;

pub use config::{BackendConfig, QueueConfig};
pub use embedded::{DATABASE_FILE, EmbeddedBackend, EmbeddedOptions, IoStats};
pub use error::QueueError;
pub use redis::{RedisBackend, RedisDurability, RedisOptions};
pub use types::{
    AttemptRecord, DeadLetter, Leased, NackOutcome, NewMessage, QueueStats, Selection, SubmitFate,
};

use async_trait::async_trait;
use bytes::Bytes;
use std::time::{Duration, SystemTime};

/// Longest queue name accepted, in bytes.
pub const MAX_QUEUE_NAME_BYTES: usize = 256;
/// Largest message body (or ack result) accepted, in bytes; larger messages are `Rejected`.
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// Most messages handed out by one `receive` call; larger `max` values are clamped to it.
pub const MAX_RECEIVE_BATCH: usize = 4096;

/// Storage for durable at-least-once queues; object-safe, shared as `Arc<dyn QueueBackend>`.
///
/// Queues are created implicitly by the first submit. Receipts are opaque strings that are only
/// meaningful to the backend that issued them (for a shared store such as Redis: to every
/// backend on that store).
#[async_trait]
pub trait QueueBackend: Send + Sync + 'static {
    /// Appends messages to `queue`; returns once every `Accepted` message is durable.
    ///
    /// The result has one [`SubmitFate`] per input message, in order. A message whose
    /// idempotency key was seen within the queue's dedup window is not enqueued again
    /// (`Duplicate` names the earlier message's id).
    async fn submit(
        &self,
        queue: &str,
        messages: Vec<NewMessage>,
    ) -> Result<Vec<SubmitFate>, QueueError>;

    /// Leases up to `max` ready messages to `consumer_id`; waits up to `wait` for the first one.
    ///
    /// Returns as soon as at least one message is ready, or an empty vector after `wait`.
    /// `max` must be at least 1 (values above [`MAX_RECEIVE_BATCH`] are clamped) and `lease` at
    /// least 1 ms. If the caller goes away before the answer, the messages are put back.
    async fn receive(
        &self,
        queue: &str,
        consumer_id: &str,
        max: usize,
        lease: Duration,
        wait: Duration,
    ) -> Result<Vec<Leased>, QueueError>;

    /// Completes a delivery; with a result, stores it by correlation id and forwards it to
    /// `reply_to`.
    ///
    /// Fails with [`QueueError::LeaseLost`] if the receipt's lease lapsed (or was already settled).
    async fn ack(&self, receipt: &str, result: Option<Bytes>) -> Result<(), QueueError>;

    /// Acks many deliveries in one call: one outcome per `(receipt, result)`, in order (each as
    /// [`QueueBackend::ack`] would answer). An `Err` fails the whole call. The default acks them
    /// one by one; backends override it to apply them together.
    async fn ack_many(
        &self,
        acks: Vec<(String, Option<Bytes>)>,
    ) -> Result<Vec<Result<(), QueueError>>, QueueError> {
        let mut outcomes = Vec::with_capacity(acks.len());
        for (receipt, result) in acks {
            outcomes.push(match self.ack(&receipt, result).await {
                Err(
                    e @ (QueueError::Storage(_) | QueueError::StorageFull(_) | QueueError::Closed),
                ) => return Err(e),
                other => other,
            });
        }
        Ok(outcomes)
    }

    /// Fails a delivery: retries after `delay` (default: backoff with full jitter) or dead-letters
    /// the message once it has used `max_attempts`.
    async fn nack(
        &self,
        receipt: &str,
        error: &str,
        delay: Option<Duration>,
    ) -> Result<NackOutcome, QueueError>;

    /// Extends a live lease to `lease` from now; returns the new expiry.
    async fn extend(&self, receipt: &str, lease: Duration) -> Result<SystemTime, QueueError>;

    /// Hands leased messages back at once, e.g. when the node shuts down: each message is
    /// ready again immediately and the delivery does not count as a failed attempt (the next
    /// delivery has the same attempt number). Stale or malformed receipts are ignored; returns
    /// how many leases were released.
    async fn release(&self, receipts: Vec<String>) -> Result<u64, QueueError>;

    /// Fails the deliveries of a consumer that went away while holding them (it crashed, or its
    /// connection dropped): each counts as a failed attempt with `error`, as a nack would, and is
    /// ready again at once (the next delivery carries the next attempt number), or becomes a
    /// dead letter on its last attempt. So a message that kills its consumer ends up a dead
    /// letter instead of being handed out forever. Stale or malformed receipts are ignored;
    /// returns how many deliveries were failed. The default nacks them all concurrently.
    async fn abandon(&self, receipts: Vec<String>, error: &str) -> Result<u64, QueueError> {
        let nacks = receipts
            .iter()
            .map(|receipt| self.nack(receipt, error, Some(Duration::ZERO)));
        let mut abandoned = 0;
        for outcome in futures::future::join_all(nacks).await {
            match outcome {
                Ok(_) => abandoned += 1,
                Err(QueueError::LeaseLost(_) | QueueError::InvalidArgument(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(abandoned)
    }

    /// Statistics for every known queue, sorted by name.
    async fn stats(&self) -> Result<Vec<QueueStats>, QueueError>;

    /// One page of `queue`'s dead letters, oldest first, and the token for the next page.
    ///
    /// `page_size` is clamped to 1..=1000. Fails with [`QueueError::NotFound`] for a queue that
    /// was never submitted to, and [`QueueError::InvalidArgument`] for a malformed token.
    async fn list_dead_letters(
        &self,
        queue: &str,
        page_size: usize,
        after: Option<&str>,
    ) -> Result<(Vec<DeadLetter>, Option<String>), QueueError>;

    /// Moves the selected dead letters back into `queue` with a fresh attempt count; returns how
    /// many moved (unknown ids are ignored; an unknown queue is [`QueueError::NotFound`]).
    async fn redrive(&self, queue: &str, selection: Selection) -> Result<u64, QueueError>;

    /// Deletes the selected dead letters of `queue`; returns how many were deleted (unknown ids
    /// are ignored; an unknown queue is [`QueueError::NotFound`]).
    async fn purge(&self, queue: &str, selection: Selection) -> Result<u64, QueueError>;

    /// The stored (unexpired) result for `correlation_id`, if any.
    async fn get_result(&self, correlation_id: &str) -> Result<Option<Bytes>, QueueError>;

    /// Waits up to `timeout` for the result of `correlation_id`; returns as soon as it lands.
    async fn wait_result(
        &self,
        correlation_id: &str,
        timeout: Duration,
    ) -> Result<Option<Bytes>, QueueError>;
}

/// Checks a queue name: non-empty, at most [`MAX_QUEUE_NAME_BYTES`], no control characters.
pub fn validate_queue_name(queue: &str) -> Result<(), QueueError> {
    if queue.is_empty() {
        return Err(QueueError::InvalidArgument("queue name is empty".into()));
    }
    if queue.len() > MAX_QUEUE_NAME_BYTES {
        return Err(QueueError::InvalidArgument(format!(
            "queue name is {} bytes, the limit is {MAX_QUEUE_NAME_BYTES}",
            queue.len()
        )));
    }
    if queue.chars().any(char::is_control) {
        return Err(QueueError::InvalidArgument(
            "queue name contains control characters".into(),
        ));
    }
    Ok(())
}
