//! A Redis for a test: the URL from `AGENTMESH_TEST_REDIS`, a key prefix of its own (so tests
//! run side by side on one Redis), and its keys deleted when it is dropped, panicking or not.

#![allow(dead_code)]

use agentmesh_queue::{BackendConfig, QueueError, RedisBackend, RedisOptions};

pub(crate) fn redis_url() -> String {
    std::env::var("AGENTMESH_TEST_REDIS").unwrap_or_else(|_| {
        panic!(
            "AGENTMESH_TEST_REDIS is not set: the Redis backend's tests need a Redis, e.g. \
             AGENTMESH_TEST_REDIS=redis://127.0.0.1:6379"
        )
    })
}

/// One test's share of the Redis.
pub(crate) struct TestRedis {
    pub(crate) url: String,
    pub(crate) prefix: String,
}

impl TestRedis {
    pub(crate) fn new() -> Self {
        Self {
            url: redis_url(),
            prefix: format!("agentmesh-test-{:016x}", rand::random::<u64>()),
        }
    }

    /// A backend (a "node") on this test's keys.
    pub(crate) async fn connect(
        &self,
        config: BackendConfig,
        options: RedisOptions,
    ) -> Result<RedisBackend, QueueError> {
        RedisBackend::connect(&self.url, &self.prefix, config, options).await
    }

    /// How many keys exist under this test's prefix.
    pub(crate) fn key_count(&self) -> usize {
        self.keys().len()
    }

    fn keys(&self) -> Vec<String> {
        let client = redis::Client::open(self.url.as_str()).expect("redis url");
        let mut con = client.get_connection().expect("connect to redis");
        let mut cursor = 0u64;
        let mut keys = Vec::new();
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{}:*", self.prefix))
                .arg("COUNT")
                .arg(1000)
                .query(&mut con)
                .expect("SCAN");
            keys.extend(batch);
            if next == 0 {
                return keys;
            }
            cursor = next;
        }
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        let keys = self.keys();
        if keys.is_empty() {
            return;
        }
        let client = redis::Client::open(self.url.as_str()).expect("redis url");
        let mut con = client.get_connection().expect("connect to redis");
        for chunk in keys.chunks(500) {
            let _: () = redis::cmd("DEL").arg(chunk).query(&mut con).expect("DEL");
        }
    }
}
