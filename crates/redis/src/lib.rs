//! Shared state of several agentmesh nodes in one Redis: the registry of agents and the
//! idempotency keys, so nodes behind one load balancer see the same agents and answer a
//! duplicate call the same way whichever node it reaches.
//!
//! The core defines the seams ([`AgentRegistry`](agentmesh_core::registry::AgentRegistry),
//! [`IdempotencyStore`](agentmesh_core::idempotency::IdempotencyStore)) and keeps them in
//! memory for a single node; this crate implements them over Redis:
//!
//! - [`store`]: [`RedisStore`], the connection (reopened by itself after an outage), the
//!   key prefix and the node id — one per node, shared by what follows;
//! - [`keys`]: every key and channel, with the layout in one table;
//! - [`registry`]: [`RedisRegistry`] — cards and leases in Redis, changed by atomic
//!   scripts that announce each change; a local cache on every node fed by those
//!   announcements, so routing never waits on Redis; a reaper per node for lapsed leases;
//! - [`idempotency`]: [`RedisIdempotency`] — one key per idempotency key (`SET NX PX`
//!   to lead, the reply kept for the window), duplicates woken through pub/sub;
//! - [`journal`]: [`RedisJournal`] — the trace journal, one capped stream per correlation id;
//! - `follow`: following a change channel through reconnects, used by both.
//!
//! When Redis is unreachable, operations that must write fail with `UNAVAILABLE` and a
//! message naming the store, routing keeps using the cached registry, and everything
//! reconnects and reloads by itself once Redis is back.

pub mod a2a_tasks;
mod follow;
pub mod idempotency;
pub mod journal;
pub mod keys;
pub mod nodes;
pub mod registry;
pub mod store;

pub use a2a_tasks::RedisTaskStore;
pub use idempotency::{IdempotencyOptions, RedisIdempotency};
pub use journal::RedisJournal;
pub use keys::Keys;
pub use nodes::{DEFAULT_NODE_TTL, NodeRoster};
pub use registry::RedisRegistry;
pub use store::{RedisStore, StoreOptions};
