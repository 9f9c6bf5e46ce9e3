//! Gateway settings.

use std::time::Duration;

/// How the gateway behaves.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Largest accepted request body, in bytes (larger: 413).
    pub max_body_bytes: usize,
    /// Origins allowed by CORS (`*` for any); empty disables CORS.
    pub cors_origins: Vec<String>,
    /// Interval of SSE keep-alive comments.
    #[serde(with = "humantime_serde")]
    pub sse_keep_alive: Duration,
    /// Interval of WebSocket pings; a socket that answers none of them for
    /// `ws_pong_timeout` is closed.
    #[serde(with = "humantime_serde")]
    pub ws_ping_interval: Duration,
    /// How long a WebSocket may go without a pong before it is closed.
    #[serde(with = "humantime_serde")]
    pub ws_pong_timeout: Duration,
    /// Heartbeat interval the gateway announces to (and keeps with) the
    /// agent in a conversation, on behalf of the browser, which cannot.
    #[serde(with = "humantime_serde")]
    pub converse_heartbeat: Duration,
    /// How long the gateway remembers a detached stream's first event, so a
    /// reader attaching later gets the stream from its very beginning.
    #[serde(with = "humantime_serde")]
    pub detached_retention: Duration,
    /// Most detached streams remembered at once (oldest forgotten first).
    pub max_detached: usize,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 4 * 1024 * 1024,
            cors_origins: Vec::new(),
            sse_keep_alive: Duration::from_secs(15),
            ws_ping_interval: Duration::from_secs(20),
            ws_pong_timeout: Duration::from_secs(45),
            converse_heartbeat: Duration::from_secs(5),
            detached_retention: Duration::from_secs(10 * 60),
            max_detached: 10_000,
        }
    }
}
