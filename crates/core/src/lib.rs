//! The agentmesh core: everything the mesh does, with no HTTP, server or gateway in it.
//!
//! The node's gRPC services and the HTTP gateway are thin faces over this crate: each takes
//! the call's [`CallContext`](agentmesh_proto::CallContext) (built once at the edge), calls
//! an operation of [`api::Mesh`] or [`api::QueueApi`], and wraps the answer.
//!
//! - [`access`]: the authorisation policy every operation checks;
//! - [`api`]: the operations both faces call, and [`api::EventStream`];
//! - [`mesh`]: [`MeshCore`], those operations for agents over the router and registry;
//! - [`registry`]: agent instances, their cards, leases, expiry and change events
//!   ([`registry::AgentRegistry`], kept in memory by [`registry::MemoryRegistry`]);
//! - [`router`]: target resolution, breakers, retries, deadlines per hop, streams and
//!   conversations;
//! - [`replay`]: the numbered, resumable window of every server stream
//!   ([`replay::ReplayStore`], kept in memory by [`replay::StreamHub`]);
//! - [`fanout`]: one request to many targets under a completion policy;
//! - [`journal`]: every hop of every envelope by correlation id ([`journal::TraceJournal`],
//!   kept in memory by [`journal::MemoryJournal`]);
//! - [`idempotency`]: replies remembered by idempotency key, single flight
//!   ([`idempotency::IdempotencyStore`], kept in memory by [`idempotency::IdempotencyCache`]);
//! - [`queue`]: the durable queue's operations over an [`agentmesh_queue::QueueBackend`];
//! - [`telemetry`]: a span per hop, child of the caller's W3C `traceparent`, passed on;
//! - [`error`]: [`MeshError`], mapped once to `tonic::Status`.

pub mod access;
pub mod api;
pub mod error;
pub mod fanout;
pub mod idempotency;
pub mod journal;
pub mod mesh;
pub mod queue;
pub mod registry;
pub mod replay;
pub mod router;
pub mod telemetry;

pub use api::{EventStream, Mesh, QueueApi};
pub use error::MeshError;
pub use mesh::MeshCore;
pub use router::{Router, RouterConfig};
