//! Per-queue configuration.

use crate::QueueError;
use std::collections::HashMap;
use std::time::Duration;

/// Delivery policy of one queue.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueConfig {
    /// Failed attempts (nacks or lapsed leases) after which a message is dead-lettered.
    pub max_attempts: u32,
    /// How long an idempotency key suppresses duplicates after its first submit.
    #[serde(with = "humantime_serde")]
    pub dedup_window: Duration,
    /// Base of the exponential retry backoff.
    #[serde(with = "humantime_serde")]
    pub backoff_base: Duration,
    /// Cap of the exponential retry backoff.
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// How long an ack's result stays retrievable by correlation id.
    #[serde(with = "humantime_serde")]
    pub result_ttl: Duration,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            dedup_window: Duration::from_secs(24 * 3600),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            result_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

impl QueueConfig {
    /// Checks that the values make sense (`max_attempts >= 1`, `backoff_base <= backoff_max`).
    pub fn validate(&self) -> Result<(), QueueError> {
        if self.max_attempts == 0 {
            return Err(QueueError::InvalidArgument(
                "max_attempts must be at least 1".into(),
            ));
        }
        if self.backoff_base > self.backoff_max {
            return Err(QueueError::InvalidArgument(
                "backoff_base must not exceed backoff_max".into(),
            ));
        }
        Ok(())
    }
}

/// Configuration of a backend: defaults plus per-queue overrides.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackendConfig {
    /// Policy of every queue without an override.
    pub defaults: QueueConfig,
    /// Per-queue overrides, by queue name. Each is a whole policy; the node's configuration
    /// loader fills the keys a file leaves out from `defaults`.
    pub overrides: HashMap<String, QueueConfig>,
}

impl BackendConfig {
    /// A configuration whose every queue uses `defaults`.
    pub fn new(defaults: QueueConfig) -> Self {
        Self {
            defaults,
            overrides: HashMap::new(),
        }
    }

    /// Adds (or replaces) the override for `queue`.
    pub fn with_queue(mut self, queue: impl Into<String>, config: QueueConfig) -> Self {
        self.overrides.insert(queue.into(), config);
        self
    }

    /// The policy in force for `queue`.
    pub fn for_queue(&self, queue: &str) -> &QueueConfig {
        self.overrides.get(queue).unwrap_or(&self.defaults)
    }

    /// Validates the defaults and every override.
    pub fn validate(&self) -> Result<(), QueueError> {
        self.defaults.validate()?;
        for (name, cfg) in &self.overrides {
            cfg.validate().map_err(|e| match e {
                QueueError::InvalidArgument(m) => {
                    QueueError::InvalidArgument(format!("queue {name:?}: {m}"))
                }
                other => other,
            })?;
        }
        Ok(())
    }
}
