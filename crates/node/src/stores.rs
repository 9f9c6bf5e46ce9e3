//! Where a node keeps its shared state, chosen by `store.url`: in this process (the
//! registry, stream replay and idempotency cache in memory, the queue on local disk), or in
//! Redis, so that several nodes serve one mesh — every node sees every agent, serves every
//! queue, deduplicates the same keys, and resumes any stream by forwarding to its owner.

use std::sync::Arc;

use agentmesh_core::{
    MeshError,
    idempotency::{IdempotencyCache, IdempotencyStore},
    journal::{MemoryJournal, NoJournal, TraceJournal},
    queue::QueueHandle,
    registry::{AgentRegistry, MemoryRegistry},
    replay::{ForwardingReplay, ReplayStore, StreamHub},
};
use agentmesh_queue::{QueueError, RedisBackend, RedisDurability, RedisOptions};
use agentmesh_redis::{
    IdempotencyOptions, NodeRoster, RedisIdempotency, RedisJournal, RedisRegistry, RedisStore,
    StoreOptions,
};

use crate::config::NodeConfig;

/// The stores one node works with.
#[derive(Debug, Clone)]
pub struct Stores {
    /// Agent instances, leases and changes.
    pub registry: Arc<dyn AgentRegistry>,
    /// The replay windows of resumable streams.
    pub replay: Arc<dyn ReplayStore>,
    /// Replies remembered by idempotency key.
    pub idempotency: Arc<dyn IdempotencyStore>,
    /// The durable queue; `None` opens the embedded store in `queue.data_dir` when the
    /// node starts serving.
    pub queue: Option<QueueHandle>,
    /// The mesh's list of nodes, when several share Redis.
    pub roster: Option<NodeRoster>,
    /// The trace journal.
    pub journal: Arc<dyn TraceJournal>,
    /// A2A tasks.
    pub a2a_tasks: Arc<dyn agentmesh_a2a::inbound::TaskStore>,
}

impl Stores {
    /// Everything in this process; the embedded queue is opened when serving starts.
    pub fn in_memory(config: &NodeConfig) -> Self {
        Self {
            registry: Arc::new(MemoryRegistry::new(
                config.leases.clone(),
                config.breaker.clone(),
            )),
            replay: Arc::new(StreamHub::new(config.replay.clone())),
            idempotency: Arc::new(IdempotencyCache::new(
                config.router.idempotency_window,
                config.router.idempotency_capacity,
            )),
            queue: None,
            roster: None,
            journal: match config.trace.journal {
                true => Arc::new(MemoryJournal::new(
                    config.trace.clone(),
                    config.store.node_id.clone(),
                )),
                false => Arc::new(NoJournal),
            },
            a2a_tasks: Arc::new(agentmesh_a2a::MemoryTaskStore::new(
                config.a2a.task_capacity,
            )),
        }
    }

    /// The stores `config.store` names: in memory when `store.url` is empty, else Redis
    /// (connected now, so a Redis that cannot be reached stops the node at start with a
    /// message naming it).
    pub async fn open(config: &NodeConfig) -> Result<Self, MeshError> {
        let settings = &config.store;
        if !settings.is_redis() {
            return Ok(Self::in_memory(config));
        }
        let store = RedisStore::connect(
            &settings.url,
            StoreOptions {
                key_prefix: settings.key_prefix.clone(),
                node_id: settings.node_id.clone(),
                ..Default::default()
            },
        )
        .await?;
        let registry =
            RedisRegistry::connect(&store, config.leases.clone(), config.breaker.clone()).await?;
        let idempotency = RedisIdempotency::connect(
            &store,
            IdempotencyOptions {
                window: config.router.idempotency_window,
                ..Default::default()
            },
        )
        .await?;
        let roster = NodeRoster::new(store.clone(), settings.node_ttl);
        let mut replay = ForwardingReplay::new(
            store.node_id().to_owned(),
            Arc::new(StreamHub::owned_by(config.replay.clone(), store.node_id())),
            Arc::new(roster.clone()),
        );
        // Resumes forwarded to other nodes go out like calls to agents.
        let outgoing = &config.tls.agents;
        if !outgoing.ca.is_empty() || !outgoing.cert.is_empty() {
            let tls = outgoing
                .client_config()
                .map_err(|error| MeshError::InvalidArgument(format!("tls.agents: {error}")))?;
            replay = replay.with_tls(tls);
        }
        let durability = match settings.redis_wait_replicas {
            0 => RedisDurability::Primary,
            replicas => RedisDurability::Wait {
                replicas,
                timeout: settings.redis_wait_timeout,
            },
        };
        let backend = RedisBackend::connect(
            &settings.url,
            &settings.key_prefix,
            config.queue.backend.clone(),
            RedisOptions {
                durability,
                ..Default::default()
            },
        )
        .await
        .map_err(|error| match error {
            QueueError::InvalidArgument(message) => MeshError::InvalidArgument(message),
            other => MeshError::Unavailable(format!("the queue on Redis: {other}")),
        })?;
        tracing::info!(store = %store.address(), prefix = %settings.key_prefix, node = %store.node_id(), "state shared through Redis");
        Ok(Self {
            registry: Arc::new(registry),
            replay: Arc::new(replay),
            idempotency: Arc::new(idempotency),
            queue: Some(QueueHandle::from_backend(Arc::new(backend))),
            roster: Some(roster),
            journal: match config.trace.journal {
                true => Arc::new(RedisJournal::new(store.clone(), config.trace.clone())),
                false => Arc::new(NoJournal),
            },
            a2a_tasks: Arc::new(agentmesh_redis::RedisTaskStore::new(
                &store,
                config.a2a.task_retention,
            )),
        })
    }
}
