//! A2A (Agent2Agent) protocol 1.0 on agentmesh.
//!
//! [`types`] is the A2A 1.0 data model with the JSON the spec and the official SDKs
//! exchange (the proto3 JSON mapping of `a2a.proto`: camelCase field names, enum values
//! spelled `TASK_STATE_COMPLETED`, `ROLE_USER`, one-of fields as a single member).
//! [`inbound`] serves every agent on the mesh as an A2A agent; [`client`] calls A2A agents;
//! [`outbound`] lists external A2A agents on the mesh and routes mesh calls to them.

pub mod client;
pub mod inbound;
pub mod outbound;
pub mod types;

pub use inbound::{A2aConfig, A2aInbound, MemoryTaskStore};
