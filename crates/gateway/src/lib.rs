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

mod mesh;

pub use mesh::{EventStream, Mesh};
mod config;
mod routes;

pub use config::GatewayConfig;
pub use routes::router;
