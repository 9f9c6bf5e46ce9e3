//! The HTTP gateway: HTTP/JSON, Server-Sent Events and WebSocket onto the
//! same services the node serves over gRPC, on the same port.
//!
//! The gateway is a face over the core, like the node's gRPC services: each
//! route takes the call's `CallContext` (set by the node's edge layer), calls
//! the core's [`Mesh`] or [`QueueApi`], and writes the answer, so a call
//! through the gateway behaves exactly like the same call over gRPC. JSON
//! bodies are the proto3 canonical JSON mapping of the same messages.
//!
//! - [`routes`](router) assembles one module per resource (agents, streams,
//!   conversations, health) and generates `/openapi.json` from them;
//! - `call` turns an HTTP request into a mesh call, `json` maps bodies
//!   (`fastjson` writes the hot messages without reflection), `sse` maps
//!   streams to events, and [`ApiError`] maps every failure to
//!   `{"error":{...}}` with the HTTP status of its gRPC code.

mod call;
mod config;
mod error;
mod fastjson;
mod json;
mod queues;
mod routes;
mod sse;

#[doc(hidden)]
pub mod fuzzing;

pub use agentmesh_core::{EventStream, Mesh, QueueApi};
pub use config::GatewayConfig;
pub use error::{ApiError, http_status};
pub use queues::queue_routes;
pub use routes::{openapi_document, router, router_with_queues};
