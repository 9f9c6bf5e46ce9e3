//! Connections to Redis: one shared multiplexed connection that reconnects by itself (every
//! non-blocking command, pipelined with everyone else's), a small pool of dedicated
//! connections for blocking commands (`XREAD BLOCK`, `WAIT`: on the shared connection they
//! would stall every other call queued behind them), and errors that name the server.

use crate::QueueError;
use crate::redis::options::RedisOptions;
use ::redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use ::redis::{AsyncConnectionConfig, Client, RedisError, RedisResult};
use parking_lot::Mutex;
use std::future::Future;
use std::time::Duration;

pub(super) struct Connections {
    client: Client,
    shared: ConnectionManager,
    idle: Mutex<Vec<MultiplexedConnection>>,
    max_idle: usize,
    dedicated_config: AsyncConnectionConfig,
    response_timeout: Duration,
    connect_timeout: Duration,
    /// `host:port` (or socket path) and database, for error messages.
    server: String,
}

impl std::fmt::Debug for Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connections")
            .field("server", &self.server)
            .field("idle", &self.idle.lock().len())
            .finish_non_exhaustive()
    }
}

impl Connections {
    /// Connects the shared connection (failing if Redis cannot be reached now).
    pub(super) async fn open(url: &str, options: &RedisOptions) -> Result<Self, QueueError> {
        let client = Client::open(url)
            .map_err(|e| QueueError::InvalidArgument(format!("bad redis url: {e}")))?;
        let info = client.get_connection_info();
        let server = format!("{}/{}", info.addr(), info.redis_settings().db());
        // Few reconnect attempts per call: while Redis is away, calls fail within about a
        // second instead of piling up; the next call starts reconnecting again.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(options.connect_timeout))
            .set_response_timeout(Some(options.response_timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let shared = ConnectionManager::new_with_config(client.clone(), config)
            .await
            .map_err(|e| storage(&server, "connect", &e))?;
        let dedicated_config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(options.connect_timeout))
            .set_response_timeout(None);
        Ok(Self {
            client,
            shared,
            idle: Mutex::new(Vec::new()),
            max_idle: options.max_idle_blocking_connections,
            dedicated_config,
            response_timeout: options.response_timeout,
            connect_timeout: options.connect_timeout,
            server,
        })
    }

    /// The shared connection (a cheap handle).
    pub(super) fn shared(&self) -> ConnectionManager {
        self.shared.clone()
    }

    /// The error for `op` failing with `e`.
    pub(super) fn error(&self, op: &str, e: &RedisError) -> QueueError {
        storage(&self.server, op, e)
    }

    /// The error for a reply that does not have the expected shape.
    pub(super) fn bad_reply(&self, op: &str, what: impl std::fmt::Display) -> QueueError {
        QueueError::Storage(format!(
            "redis at {}: unexpected reply to {op}: {what}",
            self.server
        ))
    }

    /// Runs `f` on a dedicated connection (pooled, or new) and gives the connection back when
    /// it answered. `block` is how long the command may legitimately block; the response
    /// timeout comes on top. With `retry_stale` (read-only commands), a pooled connection that
    /// turns out to be dead (Redis restarted since) is replaced once; writes are not retried,
    /// as they may have been applied. If the caller goes away meanwhile, the connection is
    /// closed, which ends a blocked command on the server too.
    pub(super) async fn on_dedicated<T, F, Fut>(
        &self,
        op: &str,
        block: Duration,
        retry_stale: bool,
        f: F,
    ) -> Result<T, QueueError>
    where
        F: Fn(MultiplexedConnection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let pooled = self.idle.lock().pop();
        let mut from_pool = pooled.is_some() && retry_stale;
        let mut con = match pooled {
            Some(c) => c,
            None => self.connect_dedicated(op).await?,
        };
        let limit = block.saturating_add(self.response_timeout);
        loop {
            match tokio::time::timeout(limit, f(con.clone())).await {
                Ok(Ok(v)) => {
                    self.give_back(con);
                    return Ok(v);
                }
                Ok(Err(e)) if is_connection_error(&e) => {
                    if from_pool {
                        from_pool = false;
                        con = self.connect_dedicated(op).await?;
                        continue;
                    }
                    return Err(self.error(op, &e));
                }
                Ok(Err(e)) => {
                    self.give_back(con);
                    return Err(self.error(op, &e));
                }
                Err(_) => {
                    return Err(QueueError::Storage(format!(
                        "redis at {}: {op} got no answer within {limit:?}",
                        self.server
                    )));
                }
            }
        }
    }

    async fn connect_dedicated(&self, op: &str) -> Result<MultiplexedConnection, QueueError> {
        self.client
            .get_multiplexed_async_connection_with_config(&self.dedicated_config)
            .await
            .map_err(|e| self.error(&format!("{op} (connecting)"), &e))
    }

    fn give_back(&self, con: MultiplexedConnection) {
        let mut idle = self.idle.lock();
        if idle.len() < self.max_idle {
            idle.push(con);
        }
    }

    /// A synchronous connection with the configured timeouts, for `Drop`.
    pub(super) fn sync(&self) -> RedisResult<::redis::Connection> {
        let con = self
            .client
            .get_connection_with_timeout(self.connect_timeout)?;
        con.set_read_timeout(Some(self.response_timeout))?;
        con.set_write_timeout(Some(self.response_timeout))?;
        Ok(con)
    }

    pub(super) fn server(&self) -> &str {
        &self.server
    }
}

fn is_connection_error(e: &RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout()
}

/// Redis out of memory (`maxmemory` reached) is a full store; anything else is a storage error.
fn storage(server: &str, op: &str, e: &RedisError) -> QueueError {
    if e.code() == Some("OOM") {
        QueueError::StorageFull(format!("redis at {server}: {op} refused: {e}"))
    } else {
        QueueError::Storage(format!("redis at {server}: {op} failed: {e}"))
    }
}
