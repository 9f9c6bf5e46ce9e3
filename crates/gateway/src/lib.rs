//! The HTTP gateway: HTTP/JSON, Server-Sent Events and WebSocket onto the
//! same services the node serves over gRPC, on the same port.
//!
//! The gateway does not depend on the node: it talks to it through the
//! [`Mesh`] trait, which the node implements over its router and registry.
//! Requests become `tonic::Request`s carrying the HTTP request's headers as
//! metadata and its extensions (correlation id and deadline, set by the
//! node's layers), so a call through the gateway behaves exactly like the
//! same call over gRPC. JSON bodies are the proto3 canonical JSON mapping of
//! the same messages.
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
mod mesh;
mod queues;
mod routes;
mod sse;

pub use config::GatewayConfig;
pub use error::{ApiError, QUEUE_STORAGE_FULL, code_name, http_status};
pub use mesh::{EventStream, Mesh};
pub use queues::{QueueApi, queue_routes};
pub use routes::{openapi_document, router, router_with_queues};
