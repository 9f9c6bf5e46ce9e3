//! The agentmesh SDK: write agents and call them.
//!
//! - [`Agent`] is what an agent does: `invoke` (required), `stream` and
//!   `converse`; [`AgentRuntime`] serves it, registers it with the node,
//!   heartbeats, re-registers after a node restart, and deregisters on
//!   shutdown.
//! - [`MeshClient`] calls agents through the node by name or `skill:<id>`.
//! - [`MeshClient::submit`] puts messages on a durable queue,
//!   [`MeshClient::await_result`] waits for their results, and [`Worker`] runs
//!   a handler over a queue (prefetch, concurrency, lease extension,
//!   reconnects, draining shutdown).
//! - [`Context`] is the call being handled: calls made while handling it
//!   inherit its correlation id and a strictly shorter deadline.
//!
//! Modules, leaves first: `call_scope` (the task-local call that outgoing calls inherit),
//! `client` ([`MeshClient`]: unary, streams, fan-out, discovery), `queue` (its queue
//! methods), `conversation` ([`Conversation`] and [`MeshClient::converse`]), `context`
//! ([`Context`]), `agent` ([`Agent`], [`StreamSink`]), `host` ([`AgentHost`]: an agent
//! as `AgentService`), `runtime` ([`AgentRuntime`]: serve, register, heartbeat),
//! `worker` ([`Worker`]), `error` ([`SdkError`]).

mod agent;
mod call_scope;
mod client;
mod context;
mod conversation;
mod error;
mod host;
mod queue;
mod runtime;
mod worker;

pub use agent::{Agent, StreamSink};
pub use agentmesh_proto as proto;
pub use agentmesh_resilience::BreakerConfig;
pub use client::{CallOptions, Credentials, MeshClient, NodeChannel};
pub use context::Context;
pub use conversation::{
    Conversation, ConversationSender, ConversationStream, DEFAULT_HEARTBEAT, MISSED_HEARTBEATS,
};
pub use error::SdkError;
pub use host::AgentHost;
pub use queue::{DeadLetterSelection, SUBMIT_CALL_MESSAGES};
pub use runtime::{AgentRuntime, Registration, RunningAgent};
pub use worker::{RunningWorker, Worker, WorkerStats};
