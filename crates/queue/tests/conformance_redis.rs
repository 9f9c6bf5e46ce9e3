//! Runs the backend conformance suite against the Redis backend. Ignored by default: run with
//! `AGENTMESH_TEST_REDIS=redis://127.0.0.1:6379 cargo nextest run -p agentmesh-queue
//! --all-features --run-ignored all`. Each test works under a key prefix of its own and
//! deletes its keys at the end.

mod redis_fixture;

use agentmesh_queue::conformance::BackendFactory;
use agentmesh_queue::{BackendConfig, QueueBackend, QueueError, RedisOptions};
use redis_fixture::TestRedis;
use std::sync::Arc;

/// Every `open` connects a new backend to the same prefix: a restart is a node going away
/// and another one connecting.
struct RedisFactory {
    redis: TestRedis,
}

#[async_trait::async_trait]
impl BackendFactory for RedisFactory {
    async fn open(&self, config: BackendConfig) -> Result<Arc<dyn QueueBackend>, QueueError> {
        let backend = self.redis.connect(config, RedisOptions::default()).await?;
        Ok(Arc::new(backend))
    }
}

agentmesh_queue::conformance_suite!(
    ignore = "needs AGENTMESH_TEST_REDIS";
    RedisFactory { redis: TestRedis::new() }
);
