//! The Redis Streams backend: [`RedisBackend`], a queue that several agentmesh nodes share.
//!
//! Every node connects to the same Redis with the same key prefix (and the same
//! [`BackendConfig`]: each node applies its own `max_attempts`, backoff, dedup window and result
//! TTL). The semantics are those of [`QueueBackend`]; what differs is written below.
//!
//! # Layout
//!
//! * this file: the backend, `connect`, `Drop` and the trait impl (each method a thin call);
//! * `options`: [`RedisOptions`] and [`RedisDurability`];
//! * `connection`: the shared reconnecting connection, dedicated connections for blocking
//!   reads, and the error mapping;
//! * `library` and `lua/`: the Lua functions every state change runs in (one atomic step
//!   each), loaded as one Redis function library;
//! * `keys`: key names and receipts; `reply`: reading replies and stream entries;
//! * `submit`, `receive`, `settle` (ack, nack, extend, release), `dead_letters`, `stats`,
//!   `results`: the operations, one concern per file; `held`: leases to hand back on drop.
//!
//! # Data model
//!
//! Under the prefix `{p}`, per queue `{q}`:
//!
//! | key               | type   | holds                                                       |
//! |-------------------|--------|-------------------------------------------------------------|
//! | `{p}:q:{q}`       | stream | every message not yet acked nor dead: fields `m` id, `c` correlation id, `r` reply_to, `b` body (`t`: first enqueue time of a redriven one); consumer group `agentmesh` |
//! | `{p}:leases:{q}`  | zset   | lease name by expiry (one lease per receive; see below)     |
//! | `{p}:holders:{q}` | hash   | lease name → when it was taken, how many of its entries were claimed retries, by which consumer |
//! | `{p}:fresh:{q}`   | hash   | lease name → "first last": the span of new entries a lease read, while none has left it |
//! | `{p}:retry:{q}`   | zset   | entry id by the time it is ready again (released: 0, nacked: now + delay) |
//! | `{p}:fails:{q}`   | hash   | entry id → failed attempts and their history               |
//! | `{p}:dlq:{q}`     | stream | dead letters: the message, `e` last error, `h` history      |
//! | `{p}:dlx:{q}`     | hash   | message id → dead-letter entry ids (redrive/purge by id)    |
//! | `{p}:wake:{q}`    | stream | one entry, appended when a message is ready again without an append |
//! | `{p}:dedup:{len(q)}:{q}:{key}` | string | the message id that used an idempotency key (`SET NX PX` window) |
//!
//! and `{p}:queues` (set of names), `{p}:result:{corr}`
//! (`SET PX` with the queue's result TTL) and `{p}:result-ready:{corr}` (a one-entry stream,
//! same TTL). The Lua functions build key names from the prefix and from stored data (a
//! reply_to queue), so this needs a standalone Redis (with or without replicas), not Redis
//! Cluster.
//!
//! A message enters the group's pending entries list when it is first read (`XREADGROUP >`)
//! and stays there until it is acked (`XACK` + `XDEL`) or dead-lettered. While pending it is
//! held either by a lease (group consumer `L{name}`) or by the group consumer `parked` while it
//! waits in `retry`. Depth is the stream's length minus the leased ones (pending minus
//! parked); the oldest age is that of the stream's first entry (its id is Redis's clock when
//! it was appended; a redriven message rejoins at the tail with its first enqueue time, so
//! while it is not first it does not count).
//!
//! # Leases, attempts, delays
//!
//! Each receive opens one lease: a fresh random name (also the receipts' token), a group
//! consumer `L{name}` that holds what the receive took in the pending entries list, and one
//! expiry in `leases`. So a receive of a thousand messages writes one lease record, not a
//! thousand, and an ack batch checks its entries with one `XPENDING` over that consumer. The
//! lease is ours rather than `XAUTOCLAIM`'s idle time because each receive asks for its own
//! duration and a lease can be extended: an entry extended on its own moves to a lease of its
//! own (`{name}/{entry id}`), so its siblings keep their expiry. The attempt count is ours too
//! (`fails`), because the group's delivery count also counts releases, which must not count
//! as attempts. Each receive (and `stats`) first lapses the expired leases of its queue: each
//! entry they hold is a failed attempt ("lease expired"), ready again at once or dead-lettered
//! on the last attempt. A nack parks the entry in `retry` at now + delay; a receive claims due
//! entries of `retry` (`XCLAIM`) before reading new ones. Times are Redis's clock (`TIME`), so
//! nodes with skewed clocks agree.
//!
//! Hot paths keep per-message work out of Lua, which cost Redis more than the commands
//! themselves: a submit without idempotency keys is a `MULTI` of plain `XADD`s behind the
//! `ensure` function; a receive is a `MULTI` of `receive_open`, `XREADGROUP` and
//! `receive_close`, so new entries go from Redis to the node untouched; an ack is one function
//! call whose per-entry work is a table lookup. A lease that read only new entries is marked
//! fresh with the span of ids it read (`fresh`); every way an entry leaves a lease other than
//! an ack (nack, release, extend on its own, lapse) and every ack clears the mark. So the first
//! ack of a fresh lease whose entries lie in that span knows they are all still held, and is
//! one `XACK` and one `XDEL` with no `XPENDING` over them (converting its reply to Lua tables
//! cost Redis more than the `XACK`); `XACK` acknowledging fewer than asked (an id that names
//! no entry, or one id twice) falls back to checking each.
//!
//! A receive that finds nothing blocks on a dedicated connection with `XREAD BLOCK` on the
//! queue stream and its `wake` stream, from their last ids, for at most the time until the
//! next lease expiry or retry becomes due: a submit, release, lapse or nack through any node
//! wakes it. `wait_result` blocks the same way on `result-ready`.
//!
//! Receipts (`{entry id}.{token}.{attempt}.{queue}`) hold everything needed to settle the
//! delivery, so any node can ack, nack, extend or release them, including one started after
//! the issuing node crashed (until the lease lapses). A backend that is dropped hands back the
//! leases it issued and still holds (no failed attempt counted), as the embedded backend's
//! restart does; a node shutting down hands back its consumers' messages at once instead of
//! letting them wait for their leases to lapse ([`RedisOptions::release_leases_on_drop`]).
//! That is one blocking round trip in `drop` (bounded by the connect and response timeouts).
//!
//! # What an acknowledged submit means
//!
//! A submit is one round trip: one function call appends the whole batch (idempotency keys checked
//! and set with `SET NX PX` in the same atomic step, so a duplicate is never appended). With
//! [`RedisDurability::Primary`] (the default) a message is `Accepted` once the primary has
//! applied the call, which means:
//!
//! * **AOF `appendfsync always`**: Redis writes and fsyncs the AOF before it sends the reply,
//!   so an accepted message survives a crash of Redis or of its machine.
//! * **AOF `appendfsync everysec`** (Redis's default): the reply goes out once the AOF is
//!   written to the OS (Redis may postpone that write by up to 2 s while a slow fsync is
//!   under way), and fsync'd about every second: a crash of the machine (power, kernel) can
//!   lose the last one to two seconds of accepted messages; a crash of the Redis process alone
//!   loses nothing unless a write was being postponed.
//! * **No AOF** (RDB snapshots only, or nothing, like the test instance here): accepted only
//!   means in memory; a restart loses what the last snapshot did not hold.
//! * **Replicas** are asynchronous: a failover can promote a replica that had not received
//!   the last accepted messages, which are then lost.
//!
//! [`RedisDurability::Wait`] adds `WAIT replicas timeout` after the call (on a dedicated
//! connection, in the same round trip): a message is accepted only once that many replicas have
//! *received* it, so it survives losing the primary as long as one of those replicas is the
//! one promoted. Replicas acknowledge what they received, not what they fsync'd: `WAITAOF`,
//! which waits for fsyncs, arrived in Redis 7.2, and this backend targets 7.0, which does not
//! have it. Fewer replicas within the timeout fail the submit with [`QueueError::Storage`]
//! although the batch was appended (resend with idempotency keys). Acks, nacks and leases are
//! never waited for: a lost ack only means a redelivery.
//!
//! # What [`RedisOptions`] controls
//!
//! * `durability`: [`RedisDurability::Primary`] or [`RedisDurability::Wait`], above;
//! * `response_timeout` (5 s) and `connect_timeout` (2 s): how long a command may wait for its
//!   answer (blocking reads: their block time plus this) and a connection for its handshake,
//!   so a Redis that hangs or vanishes yields errors, not stuck calls;
//! * `max_idle_blocking_connections` (16): dedicated connections kept for blocking reads and
//!   `WAIT`; as many more are opened as there are waits at once;
//! * `release_leases_on_drop` (on): whether dropping the backend hands back its leases.
//!
//! # Throughput
//!
//! `cargo bench -p agentmesh-queue --bench queue_throughput` with `AGENTMESH_TEST_REDIS` set,
//! 256-byte bodies, Redis 7.0 without AOF on the same 2 cores as the bench (one busy run):
//! 148k msgs/s submitting one message per call from 64 tasks, 350k at 64 per call;
//! submit→receive→ack 40k, with `ack_many` 77k. End to end, Redis's single thread is the
//! limit: the functions spend about 3 µs of it per message leasing and 2 µs acking.
//!
//! # When Redis is away
//!
//! Every call fails with [`QueueError::Storage`] naming the server and the operation (or
//! [`QueueError::StorageFull`] when Redis refuses writes at `maxmemory`), within about the
//! configured timeouts; nothing panics. A call cut off on its way may still have been applied
//! (a submit: resend with idempotency keys; an ack: the ack of the redelivery settles it). The
//! shared connection reconnects by itself on the next calls, dedicated connections are
//! replaced, and a Redis that restarted without the function library gets it again, so calls
//! succeed again once Redis is back.
//!
//! # Requirements and limits
//!
//! Redis 7.0 or later (functions), standalone or primary with replicas; not Redis Cluster.
//! Every node must use the same [`BackendConfig`]: each applies its own policy (attempts,
//! backoff, dedup window, result TTL) to what it settles.

mod connection;
mod dead_letters;
mod held;
mod keys;
mod library;
mod options;
mod receive;
mod reply;
mod results;
mod settle;
mod stats;
mod submit;

pub use options::{RedisDurability, RedisOptions};

use crate::{
    BackendConfig, DeadLetter, Leased, NackOutcome, NewMessage, QueueBackend, QueueError,
    QueueStats, Selection, SubmitFate,
};
use async_trait::async_trait;
use bytes::Bytes;
use connection::Connections;
use held::HeldLeases;
use keys::Keys;
use library::Library;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// A queue backend on Redis Streams, shared by every node that connects with the same prefix.
///
/// Dropping it hands back the leases it issued that are still held (see the module docs).
pub struct RedisBackend {
    store: Arc<Store>,
}

/// What every operation reads; shared with the tasks a receive spawns.
#[derive(Debug)]
pub(crate) struct Store {
    keys: Keys,
    config: BackendConfig,
    options: RedisOptions,
    conns: Connections,
    lib: Library,
    held: HeldLeases,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("server", &self.store.conns.server())
            .field("prefix", &self.store.keys.prefix())
            .finish_non_exhaustive()
    }
}

impl RedisBackend {
    /// Connects to the Redis at `url` (`redis://[user:password@]host:port[/db]`) and uses the
    /// keys under `key_prefix` (several meshes can share one Redis with different prefixes).
    ///
    /// Fails with [`QueueError::InvalidArgument`] for a bad URL, prefix or configuration, and
    /// with [`QueueError::Storage`] if Redis cannot be reached now.
    pub async fn connect(
        url: &str,
        key_prefix: &str,
        config: BackendConfig,
        options: RedisOptions,
    ) -> Result<Self, QueueError> {
        config.validate()?;
        if key_prefix.is_empty() || key_prefix.chars().any(char::is_control) {
            return Err(QueueError::InvalidArgument(format!(
                "redis key prefix {key_prefix:?} must be non-empty without control characters"
            )));
        }
        if let RedisDurability::Wait { timeout, .. } = options.durability {
            if timeout.is_zero() {
                return Err(QueueError::InvalidArgument(
                    "the WAIT timeout must be at least 1 ms (0 would wait forever)".into(),
                ));
            }
        }
        let conns = Connections::open(url, &options).await?;
        let lib = Library::new();
        // Loaded now so that a Redis without functions (before 7.0) fails here; one that lost
        // the library since gets it again on first use.
        let _: String = lib
            .load_cmd()
            .query_async(&mut conns.shared())
            .await
            .map_err(|e| conns.error("FUNCTION LOAD (the backend needs Redis 7.0 or later)", &e))?;
        Ok(Self {
            store: Arc::new(Store {
                keys: Keys::new(key_prefix),
                config,
                options,
                conns,
                lib,
                held: HeldLeases::default(),
            }),
        })
    }

    /// The key prefix this backend works under.
    pub fn key_prefix(&self) -> &str {
        self.store.keys.prefix()
    }
}

impl Drop for RedisBackend {
    fn drop(&mut self) {
        if !self.store.options.release_leases_on_drop {
            return;
        }
        let receipts = self.store.held.take_all();
        if receipts.is_empty() {
            return;
        }
        match self.store.release_blocking(&receipts) {
            Ok(n) => tracing::debug!(released = n, "redis queue backend handed back its leases"),
            Err(e) => tracing::warn!(
                error = %e,
                leases = receipts.len(),
                "redis queue backend could not hand back its leases; they lapse instead"
            ),
        }
    }
}

/// A duration in whole milliseconds.
fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn positive_ms(what: &str, d: Duration) -> Result<u64, QueueError> {
    match ms(d) {
        0 => Err(QueueError::InvalidArgument(format!(
            "{what} must be at least 1 ms"
        ))),
        n => Ok(n),
    }
}

#[async_trait]
impl QueueBackend for RedisBackend {
    async fn submit(
        &self,
        queue: &str,
        messages: Vec<NewMessage>,
    ) -> Result<Vec<SubmitFate>, QueueError> {
        self.store.submit(queue, messages).await
    }

    async fn receive(
        &self,
        queue: &str,
        consumer_id: &str,
        max: usize,
        lease: Duration,
        wait: Duration,
    ) -> Result<Vec<Leased>, QueueError> {
        Store::receive(&self.store, queue, consumer_id, max, lease, wait).await
    }

    async fn ack(&self, receipt: &str, result: Option<Bytes>) -> Result<(), QueueError> {
        let mut outcomes = self
            .store
            .ack_many(vec![(receipt.to_owned(), result)])
            .await?;
        outcomes.pop().unwrap_or(Ok(()))
    }

    async fn ack_many(
        &self,
        acks: Vec<(String, Option<Bytes>)>,
    ) -> Result<Vec<Result<(), QueueError>>, QueueError> {
        self.store.ack_many(acks).await
    }

    async fn nack(
        &self,
        receipt: &str,
        error: &str,
        delay: Option<Duration>,
    ) -> Result<NackOutcome, QueueError> {
        self.store.nack(receipt, error, delay).await
    }

    async fn extend(&self, receipt: &str, lease: Duration) -> Result<SystemTime, QueueError> {
        self.store.extend(receipt, lease).await
    }

    async fn release(&self, receipts: Vec<String>) -> Result<u64, QueueError> {
        self.store.release(&receipts).await
    }

    async fn stats(&self) -> Result<Vec<QueueStats>, QueueError> {
        self.store.stats().await
    }

    async fn list_dead_letters(
        &self,
        queue: &str,
        page_size: usize,
        after: Option<&str>,
    ) -> Result<(Vec<DeadLetter>, Option<String>), QueueError> {
        self.store.list_dead_letters(queue, page_size, after).await
    }

    async fn redrive(&self, queue: &str, selection: Selection) -> Result<u64, QueueError> {
        self.store.redrive_or_purge(queue, selection, true).await
    }

    async fn purge(&self, queue: &str, selection: Selection) -> Result<u64, QueueError> {
        self.store.redrive_or_purge(queue, selection, false).await
    }

    async fn get_result(&self, correlation_id: &str) -> Result<Option<Bytes>, QueueError> {
        self.store.get_result(correlation_id).await
    }

    async fn wait_result(
        &self,
        correlation_id: &str,
        timeout: Duration,
    ) -> Result<Option<Bytes>, QueueError> {
        self.store.wait_result(correlation_id, timeout).await
    }
}
