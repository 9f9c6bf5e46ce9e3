//! The agentmesh node.
//!
//! A request reads through the crate in one direction:
//! - [`server`] puts every service on one port behind two tower layers,
//!   [`correlation`] (the `x-correlation-id` of the call) and [`deadline`]
//!   (the call's absolute deadline, 30 s by default);
//! - [`discovery`] is the gRPC face of the [`registry`] of agent instances,
//!   their cards and leases;
//! - [`router`] is the node's own `AgentService`: it resolves an envelope's
//!   target to the least-loaded live instance and forwards the call with a
//!   strictly shorter deadline; streams go through [`replay`], which
//!   numbers their events and lets callers resume;
//! - [`mesh`] gives the HTTP gateway in-process access to the same services;
//! - [`queue_service`] is the durable queue (`QueueService`) over the
//!   embedded store, and its HTTP face;
//! - [`error`] maps every failure to a gRPC status once;
//! - [`metrics`] renders `/metrics`, with [`process_metrics`] for the process's
//!   own CPU, memory and descriptors;
//! - [`config`] holds the settings and their defaults.

pub mod config;
pub mod config_file;
pub mod correlation;
pub mod deadline;
pub mod discovery;
pub mod error;
pub mod fanout;
pub mod idempotency;
pub mod mesh;
pub mod metrics;
pub mod process_metrics;
pub mod queue_service;
pub mod registry;
pub mod replay;
pub mod router;
pub mod server;

pub use config::NodeConfig;
pub use error::NodeError;
pub use server::Node;
