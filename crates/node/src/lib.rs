//! The agentmesh node: the core's faces and the server that puts them on one port.
//!
//! What the mesh does lives in `agentmesh-core` (registry, router, streams, fan-out,
//! idempotency, the queue's operations). This crate assembles it:
//! - [`auth`] authenticates callers and limits their rate (the policy is
//!   `agentmesh_core::access`);
//! - [`edge`] builds each call's `CallContext` (correlation id, deadline, trace context,
//!   idempotency key) once, for gRPC and HTTP alike;
//! - [`grpc`] holds the gRPC services, each a thin face over the core;
//! - [`stores`] picks where shared state lives (this process, or Redis for several nodes);
//! - [`server`] puts them, health, reflection, the HTTP gateway and `/metrics` on one port,
//!   served by [`connections`] (connection cap, header-read and idle timeouts, HTTP/2 pings);
//! - [`metrics`] renders `/metrics`, with [`process_metrics`] for the process's own CPU,
//!   memory and descriptors;
//! - [`config`] holds the settings and their defaults; [`config_layers`] reads them from a TOML
//!   file, `AGENTMESH_*` variables and `--set` flags, through the same serde path.

pub mod auth;
pub mod config;
pub mod config_layers;
pub mod connections;
pub mod edge;
pub mod grpc;
pub mod metrics;
pub mod process_metrics;
pub mod server;
pub mod stores;

pub use agentmesh_core::{
    MeshError,
    queue::{DEFAULT_DATA_DIR, QueueHandle, QueueSettings},
    registry::LeaseConfig,
    replay::ReplayConfig,
    router::{RetryConfig, RouterConfig},
};
pub use config::{ConnectionSettings, NodeConfig, StoreSettings, TelemetryConfig};
pub use config_layers::{ConfigError, ConfigLayer};
pub use server::Node;
pub use stores::Stores;
