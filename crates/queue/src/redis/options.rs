//! What [`RedisOptions`] controls: when a submit is acknowledged, timeouts, the pool of
//! connections for blocking reads, and what a dropped backend does with its leases.

use std::time::Duration;

/// When a submit counts as durable on Redis (see the module docs for what each one survives).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RedisDurability {
    /// Accepted once the primary answered: the messages are in its memory and in its AOF
    /// buffer, fsync'd according to its `appendfsync` setting.
    #[default]
    Primary,
    /// Accepted once the primary answered and `WAIT replicas timeout` confirmed that at least
    /// `replicas` replicas received the batch. Fewer within `timeout` fails the submit with
    /// [`QueueError::Storage`](crate::QueueError::Storage) (the batch may still be in the queue:
    /// resend with idempotency keys).
    Wait {
        /// Replicas that must have received the batch.
        replicas: u32,
        /// How long `WAIT` may take.
        timeout: Duration,
    },
}

/// Connection and durability settings of a [`RedisBackend`](super::RedisBackend).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisOptions {
    /// When a submit is acknowledged.
    pub durability: RedisDurability,
    /// How long one command may wait for its answer before failing with
    /// [`QueueError::Storage`](crate::QueueError::Storage) (blocking reads get their block time
    /// on top).
    pub response_timeout: Duration,
    /// How long opening a connection may take.
    pub connect_timeout: Duration,
    /// Idle dedicated connections kept for blocking reads (waiting receives, `wait_result`,
    /// `WAIT`); more are opened while more wait at once, and closed when they are done.
    pub max_idle_blocking_connections: usize,
    /// Whether dropping the backend hands back the leases it issued that are still held, as a
    /// node shutting down does for its consumers (no failed attempt is counted). Without it
    /// they stay valid, on every node, until they lapse.
    pub release_leases_on_drop: bool,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            durability: RedisDurability::Primary,
            response_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            max_idle_blocking_connections: 16,
            release_leases_on_drop: true,
        }
    }
}
