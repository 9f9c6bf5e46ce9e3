//! The node's configuration: one struct, with the defaults of DESIGN.

use std::time::Duration;

use agentmesh_gateway::GatewayConfig;
use agentmesh_resilience::BreakerConfig;

use agentmesh_core::{
    queue::QueueSettings, registry::LeaseConfig, replay::ReplayConfig, router::RouterConfig,
};

/// Everything a node can be configured with.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Routing: edge default timeout (30 s), hop margin, connect timeout.
    pub router: RouterConfig,
    /// Registry leases: default, minimum and maximum TTL.
    pub leases: LeaseConfig,
    /// Circuit breaker of every agent instance.
    pub breaker: BreakerConfig,
    /// Resumable streams: replay window, resume grace, retention.
    pub replay: ReplayConfig,
    /// HTTP gateway: body limit, CORS, SSE keep-alive.
    pub gateway: GatewayConfig,
    /// Durable queue: data directory and delivery policy.
    pub queue: QueueSettings,
    /// Upper bound on any deadline a caller asks for.
    pub max_timeout: Duration,
    /// Largest gRPC message accepted, in bytes.
    pub max_message_bytes: usize,
    /// How long in-flight calls may take to finish after a shutdown signal.
    pub shutdown_grace: Duration,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            router: RouterConfig::default(),
            leases: LeaseConfig::default(),
            breaker: BreakerConfig::default(),
            replay: ReplayConfig::default(),
            gateway: GatewayConfig::default(),
            queue: Default::default(),
            max_timeout: Duration::from_secs(3600),
            max_message_bytes: 4 * 1024 * 1024,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}
