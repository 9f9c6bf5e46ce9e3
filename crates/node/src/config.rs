//! The node's configuration: one struct, with the defaults of DESIGN, deserialized as is
//! from TOML (see [`crate::config_layers`] for the file, `AGENTMESH_*` variables and flags).
//!
//! Every settings struct it holds derives `Deserialize` with `#[serde(default,
//! deny_unknown_fields)]`: a key left out keeps its default, a key that names no setting is an
//! error. Durations are written like `250ms`, `30s`, `5m`.

use std::time::Duration;

use agentmesh_gateway::GatewayConfig;
use agentmesh_resilience::BreakerConfig;
use serde::{Deserialize, Serialize};

use agentmesh_core::{
    journal::JournalConfig, queue::QueueSettings, registry::LeaseConfig, replay::ReplayConfig,
    router::RouterConfig,
};

/// Everything a node can be configured with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Upper bound on any deadline a caller asks for.
    #[serde(with = "humantime_serde")]
    pub max_timeout: Duration,
    /// Largest gRPC message accepted, in bytes.
    pub max_message_bytes: usize,
    /// How long in-flight calls may take to finish after a shutdown signal.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
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
    /// Where shared state lives: in this process (the default) or in Redis, for several nodes.
    pub store: StoreSettings,
    /// The trace journal: every hop by correlation id, bounded by count and age.
    pub trace: JournalConfig,
    /// OpenTelemetry: where the spans of hops are exported (off by default).
    pub telemetry: TelemetryConfig,
    /// Client connections: how many at once, and how long a silent or idle one stays open.
    pub connections: ConnectionSettings,
    /// A2A: every agent served as an A2A agent under `/a2a/{agent}`, and the external A2A
    /// agents listed on the mesh.
    pub a2a: agentmesh_a2a::A2aConfig,
    /// Authentication (API tokens, JWT) and the authorisation policy; off by default.
    pub auth: crate::auth::AuthConfig,
    /// Calls per second per caller (principal, or peer address without authentication).
    pub rate_limit: crate::auth::RateLimitConfig,
    /// TLS on the node's port and on its calls to agents; off by default.
    pub tls: crate::tls::TlsSettings,
}

/// OpenTelemetry export of the node's spans (one per hop, child of the caller's
/// `traceparent`). The W3C `traceparent` is passed on whether or not spans are exported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// OTLP/gRPC endpoint to export spans to, e.g. `http://127.0.0.1:4317`; empty: none.
    /// Batching follows the standard `OTEL_BSP_*` variables (e.g. `OTEL_BSP_SCHEDULE_DELAY`).
    pub otlp_endpoint: String,
    /// The `service.name` of the exported spans.
    pub service_name: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: String::new(),
            service_name: "agentmesh".into(),
        }
    }
}

/// Limits on the connections clients open to the node (gRPC and HTTP alike).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConnectionSettings {
    /// Connections open at once; one more is closed as soon as it is accepted. 0: half the
    /// process's open-file limit (1024 where that limit is unknown).
    pub max_connections: usize,
    /// A new connection must start its first request within this, and an HTTP/1 request head
    /// must arrive whole within it (an idle HTTP/1 keep-alive connection is closed after it).
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A connection with no call in progress for this long is closed (HTTP/2: GOAWAY). Calls
    /// in progress, streams included, keep their connection open however quiet they are.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// How often the node pings an HTTP/2 client that has sent nothing.
    #[serde(with = "humantime_serde")]
    pub http2_keep_alive_interval: Duration,
    /// A client that does not answer a ping within this is gone: its connection is closed.
    #[serde(with = "humantime_serde")]
    pub http2_keep_alive_timeout: Duration,
}

/// Connections allowed when neither the settings nor the open-file limit say.
const FALLBACK_MAX_CONNECTIONS: usize = 1024;

impl Default for ConnectionSettings {
    fn default() -> Self {
        Self {
            max_connections: 0,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            http2_keep_alive_interval: Duration::from_secs(20),
            http2_keep_alive_timeout: Duration::from_secs(20),
        }
    }
}

impl ConnectionSettings {
    /// The connection cap in force: the setting, or half the open-file limit for 0 (the other
    /// half is left to the queue store, connections to agents and Redis).
    pub fn connection_cap(&self) -> usize {
        match self.max_connections {
            0 => crate::process_metrics::ProcessSample::read()
                .and_then(|sample| sample.max_fds)
                .map_or(FALLBACK_MAX_CONNECTIONS, |max_fds| {
                    usize::try_from(max_fds / 2).unwrap_or(usize::MAX).max(16)
                }),
            set => set,
        }
    }
}

/// Where the registry, the queue, results, idempotency keys and the node directory live.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreSettings {
    /// Empty: everything in this process, the queue on local disk (`queue.data_dir`).
    /// `redis://HOST:PORT[/DB]`: shared with every node pointed at the same Redis.
    pub url: String,
    /// Put before every Redis key, so several meshes can share one Redis.
    pub key_prefix: String,
    /// This node's id among the nodes of a mesh (empty: a fresh one at every start).
    pub node_id: String,
    /// The gRPC address other nodes reach this one at, e.g. `http://10.0.0.5:7700` (empty:
    /// `http://` and the listening address).
    pub advertise: String,
    /// Replicas that must have a submit before it is acknowledged on Redis (`WAIT`); 0 takes
    /// Redis's own durability as configured (AOF `everysec` or `always`).
    pub redis_wait_replicas: u32,
    /// How long a submit waits for those replicas before it fails.
    #[serde(with = "humantime_serde")]
    pub redis_wait_timeout: Duration,
    /// How long this node stays on the mesh's list of nodes after its last renewal (renewed
    /// at a third of it): a crashed node's streams are known lost once it has passed.
    #[serde(with = "humantime_serde")]
    pub node_ttl: Duration,
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            url: String::new(),
            key_prefix: "agentmesh".into(),
            node_id: String::new(),
            advertise: String::new(),
            redis_wait_replicas: 0,
            redis_wait_timeout: Duration::from_secs(1),
            node_ttl: agentmesh_redis::DEFAULT_NODE_TTL,
        }
    }
}

impl StoreSettings {
    /// Whether state is shared through Redis.
    pub fn is_redis(&self) -> bool {
        !self.url.is_empty()
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            max_timeout: Duration::from_secs(3600),
            max_message_bytes: 4 * 1024 * 1024,
            shutdown_grace: Duration::from_secs(10),
            router: RouterConfig::default(),
            leases: LeaseConfig::default(),
            breaker: BreakerConfig::default(),
            replay: ReplayConfig::default(),
            gateway: GatewayConfig::default(),
            queue: Default::default(),
            store: StoreSettings::default(),
            trace: JournalConfig::default(),
            telemetry: TelemetryConfig::default(),
            a2a: agentmesh_a2a::A2aConfig::default(),
            connections: ConnectionSettings::default(),
            auth: Default::default(),
            rate_limit: Default::default(),
            tls: crate::tls::TlsSettings::default(),
        }
    }
}

impl NodeConfig {
    /// Rejects settings that cannot work together, naming the keys at fault.
    pub fn validate(&self) -> Result<(), String> {
        self.auth.validate(!self.tls.client_ca.is_empty())?;
        self.rate_limit.validate()?;
        let retry = &self.router.retry;
        if retry.max_attempts == 0 {
            return Err("router.retry.max_attempts must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&self.breaker.failure_rate) {
            return Err("breaker.failure_rate must be between 0 and 1".into());
        }
        if self.breaker.consecutive_failures == 0 || self.breaker.half_open_probes == 0 {
            return Err(
                "breaker.consecutive_failures and breaker.half_open_probes must be at least 1"
                    .into(),
            );
        }
        let store = &self.store;
        if store.is_redis()
            && !(store.url.starts_with("redis://") || store.url.starts_with("rediss://"))
        {
            return Err(format!(
                "store.url must be empty (embedded) or redis://HOST:PORT[/DB], not {:?}",
                store.url
            ));
        }
        if store.key_prefix.is_empty() || store.key_prefix.contains(char::is_whitespace) {
            return Err("store.key_prefix must be non-empty, without spaces".into());
        }
        let connections = &self.connections;
        if [
            connections.header_read_timeout,
            connections.idle_timeout,
            connections.http2_keep_alive_interval,
            connections.http2_keep_alive_timeout,
        ]
        .iter()
        .any(Duration::is_zero)
        {
            return Err("connections.header_read_timeout, idle_timeout, http2_keep_alive_interval and http2_keep_alive_timeout must be positive".into());
        }
        self.tls.validate()?;
        if self.leases.min_ttl > self.leases.max_ttl {
            return Err("leases.min_ttl must not exceed leases.max_ttl".into());
        }
        if self.replay.window == 0
            || self.router.max_in_flight == 0
            || self.router.max_long_lived == 0
        {
            return Err(
                "replay.window, router.max_in_flight and router.max_long_lived must be positive"
                    .into(),
            );
        }
        // The store checks its policy when it opens; checking here names the key at load time.
        let backend = &self.queue.backend;
        let policies = std::iter::once(("queue.backend.defaults".to_owned(), &backend.defaults))
            .chain(
                backend
                    .overrides
                    .iter()
                    .map(|(queue, policy)| (format!("queue.backend.overrides.{queue:?}"), policy)),
            );
        for (key, policy) in policies {
            policy.validate().map_err(|error| match error {
                agentmesh_queue::QueueError::InvalidArgument(message) => {
                    format!("{key}: {message}")
                }
                other => format!("{key}: {other}"),
            })?;
        }
        Ok(())
    }
}
