//! The node's configuration file (TOML). Every setting has the default of
//! [`NodeConfig::default`]; the file overrides what it names; `agentmesh
//! serve` flags and `AGENTMESH_*` variables override the file.
//!
//! ```toml
//! [deadlines]
//! default_timeout = "30s"   # edge default when a caller sets none
//! max_timeout = "1h"
//! hop_margin = "50ms"       # each hop's deadline is this much shorter
//!
//! [leases]
//! default_ttl = "10s"
//! min_ttl = "100ms"
//! max_ttl = "5m"
//!
//! [breaker]                 # per agent instance
//! consecutive_failures = 5
//! failure_rate = 0.5        # over `window`, once `min_calls` were made
//! window = "10s"
//! min_calls = 20
//! open_for = "5s"
//! half_open_probes = 1
//!
//! [retry]
//! max_attempts = 3          # 1 disables retries
//! initial_backoff = "25ms"
//! max_backoff = "1s"
//! budget_ratio = 0.2        # retries add at most 20 % load
//! budget_min_per_second = 10
//!
//! [limits]
//! max_in_flight_per_instance = 256
//! max_in_flight = 10000
//! max_message_bytes = 4194304
//!
//! [idempotency]
//! window = "10m"
//! capacity = 100000
//!
//! [streams]
//! replay_window = 256       # events kept per stream for resumption
//! resume_grace = "30s"      # how long a stream waits for its reader to return
//! retention = "60s"
//! max_streams = 10000
//!
//! [gateway]
//! cors_origins = ["*"]
//! max_body_bytes = 4194304
//! ```

use std::{path::Path, time::Duration};

use serde::Deserialize;

use crate::NodeConfig;

/// Why the configuration file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("invalid configuration in {path}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong, with its location.
        message: String,
    },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    deadlines: Deadlines,
    #[serde(default)]
    leases: Leases,
    #[serde(default)]
    breaker: Breaker,
    #[serde(default)]
    retry: Retry,
    #[serde(default)]
    limits: Limits,
    #[serde(default)]
    idempotency: Idempotency,
    #[serde(default)]
    streams: Streams,
    #[serde(default)]
    gateway: Gateway,
}

/// A duration written like `250ms`, `30s`, `5m`.
#[derive(Debug, Clone, Copy)]
struct Span(Duration);

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(&text)
            .map(Span)
            .map_err(|e| serde::de::Error::custom(format!("{text:?} is not a duration: {e}")))
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Deadlines {
    default_timeout: Option<Span>,
    max_timeout: Option<Span>,
    hop_margin: Option<Span>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Leases {
    default_ttl: Option<Span>,
    min_ttl: Option<Span>,
    max_ttl: Option<Span>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Breaker {
    consecutive_failures: Option<u32>,
    failure_rate: Option<f64>,
    window: Option<Span>,
    min_calls: Option<u32>,
    open_for: Option<Span>,
    half_open_probes: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Retry {
    max_attempts: Option<u32>,
    initial_backoff: Option<Span>,
    max_backoff: Option<Span>,
    budget_ratio: Option<f64>,
    budget_min_per_second: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Limits {
    max_in_flight_per_instance: Option<u32>,
    max_in_flight: Option<usize>,
    max_message_bytes: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Idempotency {
    window: Option<Span>,
    capacity: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Streams {
    replay_window: Option<usize>,
    resume_grace: Option<Span>,
    retention: Option<Span>,
    max_streams: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Gateway {
    cors_origins: Option<Vec<String>>,
    max_body_bytes: Option<usize>,
}

fn set<T>(target: &mut T, value: Option<T>) {
    if let Some(value) = value {
        *target = value;
    }
}

fn set_span(target: &mut Duration, value: Option<Span>) {
    set(target, value.map(|s| s.0));
}

impl NodeConfig {
    /// The defaults, overridden by the TOML file at `path`.
    pub fn from_file(path: &Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        NodeConfig::from_toml(&text).map_err(|message| ConfigError::Invalid {
            path: path.display().to_string(),
            message,
        })
    }

    /// The defaults, overridden by a TOML document.
    pub fn from_toml(text: &str) -> Result<NodeConfig, String> {
        let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut config = NodeConfig::default();
        let router = &mut config.router;
        set_span(&mut router.default_timeout, file.deadlines.default_timeout);
        set_span(&mut config.max_timeout, file.deadlines.max_timeout);
        set_span(&mut router.hop_margin, file.deadlines.hop_margin);
        set_span(&mut config.leases.default_ttl, file.leases.default_ttl);
        set_span(&mut config.leases.min_ttl, file.leases.min_ttl);
        set_span(&mut config.leases.max_ttl, file.leases.max_ttl);
        let breaker = &mut config.breaker;
        set(
            &mut breaker.consecutive_failures,
            file.breaker.consecutive_failures,
        );
        set(&mut breaker.failure_rate, file.breaker.failure_rate);
        set_span(&mut breaker.window, file.breaker.window);
        set(&mut breaker.min_calls, file.breaker.min_calls);
        set_span(&mut breaker.open_for, file.breaker.open_for);
        set(&mut breaker.half_open_probes, file.breaker.half_open_probes);
        let retry = &mut router.retry;
        set(&mut retry.max_attempts, file.retry.max_attempts);
        set_span(&mut retry.initial_backoff, file.retry.initial_backoff);
        set_span(&mut retry.max_backoff, file.retry.max_backoff);
        set(&mut retry.budget_ratio, file.retry.budget_ratio);
        set(
            &mut retry.budget_min_per_second,
            file.retry.budget_min_per_second,
        );
        set(
            &mut router.max_in_flight_per_instance,
            file.limits.max_in_flight_per_instance,
        );
        set(&mut router.max_in_flight, file.limits.max_in_flight);
        set(&mut config.max_message_bytes, file.limits.max_message_bytes);
        set_span(&mut router.idempotency_window, file.idempotency.window);
        set(&mut router.idempotency_capacity, file.idempotency.capacity);
        set(&mut config.replay.window, file.streams.replay_window);
        set_span(&mut config.replay.resume_grace, file.streams.resume_grace);
        set_span(&mut config.replay.retention, file.streams.retention);
        set(&mut config.replay.max_streams, file.streams.max_streams);
        set(&mut config.gateway.cors_origins, file.gateway.cors_origins);
        set(
            &mut config.gateway.max_body_bytes,
            file.gateway.max_body_bytes,
        );
        config.validate()?;
        Ok(config)
    }

    /// Rejects settings that cannot work.
    pub fn validate(&self) -> Result<(), String> {
        let retry = &self.router.retry;
        if retry.max_attempts == 0 {
            return Err("retry.max_attempts must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&self.breaker.failure_rate) {
            return Err("breaker.failure_rate must be between 0 and 1".into());
        }
        if self.breaker.consecutive_failures == 0 || self.breaker.half_open_probes == 0 {
            return Err(
                "breaker.consecutive_failures and half_open_probes must be at least 1".into(),
            );
        }
        if self.leases.min_ttl > self.leases.max_ttl {
            return Err("leases.min_ttl must not exceed leases.max_ttl".into());
        }
        if self.replay.window == 0 || self.router.max_in_flight == 0 {
            return Err("streams.replay_window and limits.max_in_flight must be positive".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_parses_and_overrides() {
        let docs: String = include_str!("config_file.rs")
            .lines()
            .skip_while(|l| !l.starts_with("//! ```toml"))
            .skip(1)
            .take_while(|l| !l.starts_with("//! ```"))
            .map(|l| l.trim_start_matches("//!").trim_start().to_owned() + "\n")
            .collect();
        let config = NodeConfig::from_toml(&docs).unwrap();
        assert_eq!(config.router.default_timeout, Duration::from_secs(30));
        assert_eq!(config.gateway.cors_origins, vec!["*".to_string()]);

        let custom =
            NodeConfig::from_toml("[retry]\nmax_attempts = 5\n[breaker]\nopen_for = \"250ms\"\n")
                .unwrap();
        assert_eq!(custom.router.retry.max_attempts, 5);
        assert_eq!(custom.breaker.open_for, Duration::from_millis(250));
    }

    #[test]
    fn mistakes_are_reported_clearly() {
        let typo = NodeConfig::from_toml("[retry]\nmax_atempts = 5\n").unwrap_err();
        assert!(typo.contains("max_atempts"), "{typo}");
        let bad = NodeConfig::from_toml("[breaker]\nopen_for = \"soon\"\n").unwrap_err();
        assert!(bad.contains("not a duration"), "{bad}");
        let zero = NodeConfig::from_toml("[retry]\nmax_attempts = 0\n").unwrap_err();
        assert!(zero.contains("max_attempts"), "{zero}");
    }
}
