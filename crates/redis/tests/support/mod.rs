//! Fixtures of the Redis tests: the Redis to use, a key prefix of each test's own (its
//! keys deleted when the test ends, even by a panic), nodes on it, and a proxy that can
//! cut a node off from Redis.

#![allow(dead_code, unreachable_pub)]

use std::{
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use agentmesh_core::registry::LeaseConfig;
use agentmesh_proto::v1::{AgentCard, Skill};
use agentmesh_redis::{RedisRegistry, RedisStore, StoreOptions};
use agentmesh_resilience::BreakerConfig;
use tokio::{net::TcpListener, sync::watch};

/// The Redis named by `AGENTMESH_TEST_REDIS`.
pub fn redis_url() -> String {
    std::env::var("AGENTMESH_TEST_REDIS").unwrap_or_else(|_| {
        panic!(
            "AGENTMESH_TEST_REDIS is not set: these tests need a Redis they may write to, \
             e.g. AGENTMESH_TEST_REDIS=redis://127.0.0.1:6379"
        )
    })
}

/// A key prefix of this test's own; its keys are deleted when dropped.
#[derive(Debug)]
pub struct Prefix(pub String);

impl Prefix {
    pub fn new() -> Self {
        Self(format!("agentmesh-test-{}", uuid::Uuid::now_v7().simple()))
    }

    /// Every key under the prefix.
    pub fn keys(&self) -> Vec<String> {
        let mut connection = redis::Client::open(redis_url())
            .and_then(|client| client.get_connection())
            .expect("Redis for the test's keys");
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", self.0))
            .query(&mut connection)
            .expect("KEYS");
        keys
    }

    /// A command on the test's Redis.
    pub fn query<T: redis::FromRedisValue>(&self, command: &redis::Cmd) -> T {
        let mut connection = redis::Client::open(redis_url())
            .and_then(|client| client.get_connection())
            .expect("Redis for the test");
        command.query(&mut connection).expect("a test query")
    }
}

impl Drop for Prefix {
    /// Best effort, and never a second panic while a failed test unwinds.
    fn drop(&mut self) {
        let Ok(url) = std::env::var("AGENTMESH_TEST_REDIS") else {
            return;
        };
        let Ok(mut connection) = redis::Client::open(url).and_then(|c| c.get_connection()) else {
            return;
        };
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", self.0))
            .query(&mut connection)
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: Result<(), _> = redis::cmd("DEL").arg(&keys).query(&mut connection);
        }
    }
}

/// A node's store on `url` under `prefix`.
pub async fn store_at(url: &str, prefix: &Prefix, node: &str) -> RedisStore {
    RedisStore::connect(
        url,
        StoreOptions {
            key_prefix: prefix.0.clone(),
            node_id: node.into(),
            ..StoreOptions::default()
        },
    )
    .await
    .expect("the test Redis is reachable")
}

/// A node's store on the test Redis.
pub async fn store(prefix: &Prefix, node: &str) -> RedisStore {
    store_at(&redis_url(), prefix, node).await
}

/// Leases as short as the tests need.
pub fn short_leases() -> LeaseConfig {
    LeaseConfig {
        default_ttl: Duration::from_secs(10),
        min_ttl: Duration::from_millis(50),
        max_ttl: Duration::from_secs(60),
    }
}

/// A node's registry, reaper started.
pub async fn registry(store: &RedisStore) -> Arc<RedisRegistry> {
    let registry = Arc::new(
        RedisRegistry::connect(store, short_leases(), BreakerConfig::default())
            .await
            .expect("the registry connects"),
    );
    use agentmesh_core::registry::AgentRegistry;
    Arc::clone(&registry).start();
    registry
}

/// A card for `name` with one skill `<name>-skill`.
pub fn card(name: &str) -> AgentCard {
    AgentCard {
        name: name.into(),
        endpoint: "http://127.0.0.1:9".into(),
        skills: vec![Skill {
            id: format!("{name}-skill"),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Polls `check` until it holds or `within` passes; whether it held.
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let until = Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A TCP proxy in front of the test Redis that can cut every connection through it, as a
/// network partition or a Redis restart would look to the node behind it.
#[derive(Debug)]
pub struct Proxy {
    /// The proxied Redis's URL.
    pub url: String,
    up: watch::Sender<bool>,
}

impl Proxy {
    pub async fn start() -> Self {
        let upstream_url = redis_url();
        let rest = upstream_url
            .split_once("://")
            .map_or(upstream_url.as_str(), |(_, rest)| rest);
        let (upstream, path) = rest.split_once('/').unwrap_or((rest, ""));
        let upstream = upstream.rsplit('@').next().unwrap().to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("redis://{}/{path}", listener.local_addr().unwrap());
        let (up, _) = watch::channel(true);
        let state = up.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                let mut state = state.subscribe();
                if !*state.borrow_and_update() {
                    continue; // Dropped at once: Redis is "away".
                }
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = state.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Self { url, up }
    }

    /// Closes every connection through the proxy and refuses new ones.
    pub fn cut(&self) {
        self.up.send_replace(false);
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.up.send_replace(true);
    }
}
