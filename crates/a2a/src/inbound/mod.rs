//! Every agent on the mesh as an A2A agent, at `/a2a/{agent}` on the node's port.
//!
//! - [`service`]: the operations ([`A2aInbound`]), mapped onto Invoke, Stream and the queue;
//! - [`http`]: the JSON-RPC 2.0 and HTTP+JSON bindings and the agent card;
//! - [`mapping`]: A2A parts ↔ envelope payloads;
//! - [`tasks`]: where tasks are kept ([`TaskStore`]);
//! - [`worker`]: the node's consumer of non-blocking tasks;
//! - [`push`]: push notification configs and their delivery.

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub mod http;
pub mod mapping;
pub mod push;
pub mod service;
pub mod tasks;
mod worker;

pub use http::router;
pub use service::{A2aError, A2aInbound};
pub use tasks::{MemoryTaskStore, TaskRecord, TaskStore};

/// The `[a2a]` section of the node's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct A2aConfig {
    /// Serve every agent as an A2A agent under `/a2a/{agent}`.
    pub enabled: bool,
    /// Prefix of the durable queues non-blocking tasks wait in (one per agent).
    pub queue_prefix: String,
    /// Non-blocking tasks worked on at once by this node.
    pub worker_concurrency: usize,
    /// Deadline of the call that works on a non-blocking task.
    #[serde(with = "humantime_serde")]
    pub task_timeout: Duration,
    /// How often a followed queued task is looked at, and the first pause after a failed
    /// queue read (idle queues are waited on, not polled).
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Tasks kept by the in-process task store (the oldest are forgotten first).
    pub task_capacity: usize,
    /// How long a task is kept after its last change when tasks live in Redis.
    #[serde(with = "humantime_serde")]
    pub task_retention: Duration,
    /// External A2A agents to list on the mesh from the start.
    pub agents: Vec<crate::outbound::ExternalAgent>,
    /// How often each external agent's card is fetched again.
    #[serde(with = "humantime_serde")]
    pub card_refresh: Duration,
    /// How long fetching an external agent's card may take.
    #[serde(with = "humantime_serde")]
    pub card_timeout: Duration,
}

impl A2aConfig {
    /// The settings of the external agents.
    pub fn external(&self) -> crate::outbound::ExternalAgentsConfig {
        crate::outbound::ExternalAgentsConfig {
            agents: self.agents.clone(),
            card_refresh: self.card_refresh,
            card_timeout: self.card_timeout,
        }
    }
}

impl Default for A2aConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            queue_prefix: "a2a.tasks.".to_owned(),
            worker_concurrency: 16,
            task_timeout: Duration::from_secs(30),
            poll_interval: Duration::from_millis(100),
            task_capacity: 100_000,
            task_retention: Duration::from_secs(86_400),
            agents: Vec::new(),
            card_refresh: Duration::from_secs(300),
            card_timeout: Duration::from_secs(10),
        }
    }
}
