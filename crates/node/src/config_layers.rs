//! Where the node's settings come from. Each source is a [`ConfigLayer`]: a TOML table shaped
//! like [`NodeConfig`]. Layers are merged key by key, later ones winning, and the result goes
//! through the one serde path every settings struct derives, so a setting reachable from the
//! file is reachable from every source. `agentmesh serve` layers them as:
//!
//! 1. the defaults of [`NodeConfig::default`];
//! 2. the TOML file (`--config`); `examples/agentmesh.toml` lists every key with its default;
//! 3. `AGENTMESH_*` environment variables, one per key: the key's path in upper case with
//!    `__` between sections, e.g. `AGENTMESH_ROUTER__RETRY__MAX_ATTEMPTS=5`,
//!    `AGENTMESH_QUEUE__BACKEND__DEFAULTS__MAX_ATTEMPTS=3`, `AGENTMESH_MAX_TIMEOUT=2h`;
//! 4. flags: `--set KEY=VALUE` with a TOML dotted key, e.g. `--set router.retry.max_attempts=5`
//!    or `--set 'queue.backend.overrides."jobs.v1".max_attempts=2'`, and the named shorthands
//!    (`--data-dir`, `--default-timeout-ms`).
//!
//! A value from a variable or `--set` is read as a TOML value (`5`, `0.5`, `true`, `["*"]`,
//! `"quoted"`); anything else (`30s`, `/var/lib/agentmesh`) is taken as a string.
//!
//! Every layer is checked on its own as it is built, so a key that names no setting, or a
//! value of the wrong type, is reported with the file, variable or flag it came from. After
//! merging, a per-queue policy (`queue.backend.overrides.NAME`) takes the keys it leaves out
//! from `queue.backend.defaults`, and [`NodeConfig::validate`] checks the whole.

use std::path::Path;

use toml::{Table, Value};

use crate::NodeConfig;

/// Prefix of the environment variables that set a key.
pub const ENV_PREFIX: &str = "AGENTMESH_";
/// Separates the sections of a key's path in a variable's name.
pub const ENV_SEPARATOR: &str = "__";

/// Why the settings could not be loaded.
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
    /// A source names a key that does not exist, or gives a value of the wrong type.
    #[error("invalid configuration in {origin}: {message}")]
    Invalid {
        /// The file, variable or flag.
        origin: String,
        /// What is wrong, naming the key.
        message: String,
    },
    /// The merged settings cannot work together (e.g. `leases.min_ttl` above `max_ttl`).
    #[error("invalid configuration: {0}")]
    Rejected(String),
}

/// One source of settings: a partial [`NodeConfig`] as a TOML table, and where it came from.
#[derive(Debug, Clone)]
pub struct ConfigLayer {
    origin: String,
    table: Table,
}

impl ConfigLayer {
    /// The TOML file at `path`.
    pub fn file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::toml(path.display().to_string(), &text)
    }

    /// A TOML document; `origin` names it in errors.
    pub fn toml(origin: impl Into<String>, text: &str) -> Result<Self, ConfigError> {
        let origin = origin.into();
        // Deserializing the text itself, not the parsed table, gives errors a line and column.
        if let Err(error) = toml::from_str::<NodeConfig>(text) {
            return Err(invalid(&origin, error.to_string()));
        }
        let table = toml::from_str(text).map_err(|e| invalid(&origin, e.to_string()))?;
        Ok(Self { origin, table })
    }

    /// A `--set KEY=VALUE` flag: `KEY` is a TOML dotted key, `VALUE` as described in the
    /// module documentation.
    pub fn assignment(text: &str) -> Result<Self, ConfigError> {
        let origin = format!("--set {text}");
        let Some((key, value)) = text.split_once('=') else {
            return Err(invalid(&origin, "expected KEY=VALUE".into()));
        };
        // Parsing `KEY = 0` as TOML resolves dotted and quoted keys into a path.
        let parsed: Table = toml::from_str(&format!("{} = 0", key.trim()))
            .map_err(|_| invalid(&origin, format!("{:?} is not a key", key.trim())))?;
        let mut path = Vec::new();
        let mut section = &parsed;
        while let Some((name, entry)) = section.iter().next() {
            path.push(name.as_str());
            match entry {
                Value::Table(inner) => section = inner,
                _ => break,
            }
        }
        Self::setting(origin, &path, parse_value(value.trim()))
    }

    /// One layer per `AGENTMESH_*` variable that names a key, in name order. A variable whose
    /// first section is not a key of [`NodeConfig`] (`AGENTMESH_LISTEN`, `AGENTMESH_LOG`, …)
    /// belongs to something else and is skipped, unless its name contains `__`, which only a
    /// key path has: then it is a misspelt key and an error.
    pub fn environment(
        variables: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Vec<Self>, ConfigError> {
        let sections = top_level_keys();
        let mut variables: Vec<_> = variables
            .into_iter()
            .filter(|(name, _)| name.starts_with(ENV_PREFIX))
            .collect();
        variables.sort();
        let mut layers = Vec::new();
        for (name, value) in variables {
            let path: Vec<String> = name[ENV_PREFIX.len()..]
                .split(ENV_SEPARATOR)
                .map(str::to_lowercase)
                .collect();
            if !sections.contains(&path[0]) {
                if path.len() > 1 {
                    return Err(invalid(
                        &name,
                        format!(
                            "{:?} is not a section; sections are {}",
                            path[0],
                            sections.join(", ")
                        ),
                    ));
                }
                continue;
            }
            let path: Vec<&str> = path.iter().map(String::as_str).collect();
            layers.push(Self::setting(name.clone(), &path, parse_value(&value))?);
        }
        Ok(layers)
    }

    /// One key set to `value`; `origin` names it in errors (a named flag, say).
    pub fn setting(
        origin: impl Into<String>,
        path: &[&str],
        value: Value,
    ) -> Result<Self, ConfigError> {
        let (leaf, sections) = path.split_last().expect("a key has at least one section");
        let mut table = Table::new();
        table.insert((*leaf).to_owned(), value);
        for section in sections.iter().rev() {
            let mut outer = Table::new();
            outer.insert((*section).to_owned(), Value::Table(table));
            table = outer;
        }
        Self::checked(origin.into(), table)
    }

    /// The file, variable or flag this layer came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Accepts `table` only if it deserializes on its own, so an error names its origin.
    fn checked(origin: String, table: Table) -> Result<Self, ConfigError> {
        deserialize(table.clone()).map_err(|message| invalid(&origin, message))?;
        Ok(Self { origin, table })
    }
}

impl NodeConfig {
    /// The defaults, overridden by each layer in turn, then validated.
    pub fn from_layers(
        layers: impl IntoIterator<Item = ConfigLayer>,
    ) -> Result<NodeConfig, ConfigError> {
        let mut merged = Table::new();
        for layer in layers {
            merge(&mut merged, layer.table);
        }
        inherit_queue_defaults(&mut merged);
        // Each layer deserialized on its own, so their merge does too.
        let config = deserialize(merged).map_err(ConfigError::Rejected)?;
        config.validate().map_err(ConfigError::Rejected)?;
        Ok(config)
    }

    /// The defaults, overridden by the TOML file at `path`.
    pub fn from_file(path: &Path) -> Result<NodeConfig, ConfigError> {
        NodeConfig::from_layers([ConfigLayer::file(path)?])
    }

    /// The defaults, overridden by a TOML document.
    pub fn from_toml(text: &str) -> Result<NodeConfig, ConfigError> {
        NodeConfig::from_layers([ConfigLayer::toml("TOML", text)?])
    }
}

fn invalid(origin: &str, message: String) -> ConfigError {
    ConfigError::Invalid {
        origin: origin.to_owned(),
        message,
    }
}

/// Deserializes a table into the settings; errors name the key (`... in `router.retry``).
fn deserialize(table: Table) -> Result<NodeConfig, String> {
    table
        .try_into()
        .map_err(|error: toml::de::Error| error.to_string().trim().replace('\n', " "))
}

/// The names of [`NodeConfig`]'s own keys: its sections and top-level settings.
fn top_level_keys() -> Vec<String> {
    let defaults = Table::try_from(NodeConfig::default()).expect("the defaults serialize");
    defaults.keys().cloned().collect()
}

/// A value as TOML reads it, or else the text as a string.
fn parse_value(text: &str) -> Value {
    toml::from_str::<Table>(&format!("value = {text}"))
        .ok()
        .filter(|table| table.len() == 1)
        .and_then(|mut table| table.remove("value"))
        .unwrap_or_else(|| Value::String(text.to_owned()))
}

/// Puts `layer` over `base`: tables merge key by key, any other value replaces.
fn merge(base: &mut Table, layer: Table) {
    for (key, value) in layer {
        match (base.get_mut(&key), value) {
            (Some(Value::Table(below)), Value::Table(above)) => merge(below, above),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// Fills each `queue.backend.overrides.NAME` with the keys of `queue.backend.defaults` it
/// leaves out: an override that sets only `result_ttl` keeps the configured `max_attempts`,
/// not the built-in one.
fn inherit_queue_defaults(merged: &mut Table) {
    let Some(Value::Table(backend)) = merged
        .get_mut("queue")
        .and_then(|queue| queue.as_table_mut())
        .and_then(|queue| queue.get_mut("backend"))
    else {
        return;
    };
    let Some(Value::Table(defaults)) = backend.get("defaults").cloned() else {
        return;
    };
    let Some(Value::Table(overrides)) = backend.get_mut("overrides") else {
        return;
    };
    for (_, policy) in overrides.iter_mut() {
        if let Value::Table(policy) = policy {
            for (key, value) in &defaults {
                policy.entry(key.clone()).or_insert_with(|| value.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// The documented example, shipped next to the README.
    const EXAMPLE: &str = include_str!("../../../examples/agentmesh.toml");

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect()
    }

    /// Every key under `table` that holds a value or an empty table, as a path.
    fn leaf_paths(table: &Table, prefix: &[String], paths: &mut Vec<Vec<String>>) {
        for (key, value) in table {
            let mut path = prefix.to_vec();
            path.push(key.clone());
            match value {
                Value::Table(inner) if !inner.is_empty() => leaf_paths(inner, &path, paths),
                _ => paths.push(path),
            }
        }
    }

    fn lookup<'a>(table: &'a Table, path: &[String]) -> Option<&'a Value> {
        let (first, rest) = path.split_first()?;
        let value = table.get(first)?;
        match (rest.is_empty(), value) {
            (true, value) => Some(value),
            (false, Value::Table(inner)) => lookup(inner, rest),
            (false, _) => None,
        }
    }

    #[test]
    fn the_example_names_every_setting_with_its_default() {
        let example: Table = toml::from_str(EXAMPLE).unwrap();
        let defaults = Table::try_from(NodeConfig::default()).unwrap();
        let mut settings = Vec::new();
        leaf_paths(&defaults, &[], &mut settings);
        let missing: Vec<String> = settings
            .iter()
            .filter(|path| lookup(&example, path).is_none())
            .map(|path| path.join("."))
            .collect();
        assert!(missing.is_empty(), "the example lacks {missing:?}");

        // Apart from its per-queue example, the file spells out the defaults.
        let mut config = NodeConfig::from_toml(EXAMPLE).unwrap();
        let thumbnails = config.queue.backend.overrides.remove("thumbnails").unwrap();
        assert!(config.queue.backend.overrides.is_empty());
        assert_eq!(config, NodeConfig::default());
        assert_eq!(thumbnails.max_attempts, 3);
        assert_eq!(thumbnails.result_ttl, Duration::from_secs(3600));
        // What the override leaves out comes from the defaults.
        assert_eq!(
            thumbnails.dedup_window,
            config.queue.backend.defaults.dedup_window
        );
    }

    #[test]
    fn every_section_is_read_into_the_real_structs() {
        let config = NodeConfig::from_toml(
            r#"
            max_timeout = "2h"
            [router]
            default_timeout = "5s"
            [router.retry]
            max_attempts = 5
            [breaker]
            open_for = "250ms"
            [leases]
            max_ttl = "1m"
            [replay]
            window = 64
            [gateway]
            cors_origins = ["https://app.example"]
            [queue]
            data_dir = "/var/lib/agentmesh"
            [queue.backend.defaults]
            max_attempts = 7
            backoff_base = "10ms"
            "#,
        )
        .unwrap();
        assert_eq!(config.max_timeout, Duration::from_secs(7200));
        assert_eq!(config.router.default_timeout, Duration::from_secs(5));
        assert_eq!(config.router.retry.max_attempts, 5);
        assert_eq!(config.breaker.open_for, Duration::from_millis(250));
        assert_eq!(config.leases.max_ttl, Duration::from_secs(60));
        assert_eq!(config.replay.window, 64);
        assert_eq!(config.gateway.cors_origins, ["https://app.example"]);
        assert_eq!(config.queue.data_dir, Path::new("/var/lib/agentmesh"));
        assert_eq!(config.queue.backend.defaults.max_attempts, 7);
        assert_eq!(
            config.queue.backend.defaults.backoff_base,
            Duration::from_millis(10)
        );
        // Keys left out keep their defaults.
        assert_eq!(config.router.hop_margin, Duration::from_millis(50));
    }

    #[test]
    fn mistakes_are_reported_with_the_key_and_where_it_came_from() {
        let typo = NodeConfig::from_toml("[router.retry]\nmax_atempts = 5\n")
            .unwrap_err()
            .to_string();
        assert!(typo.contains("unknown field `max_atempts`"), "{typo}");
        assert!(typo.contains("line 2"), "{typo}");
        let section = NodeConfig::from_toml("[deadlines]\nmax_timeout = \"1h\"\n")
            .unwrap_err()
            .to_string();
        assert!(section.contains("unknown field `deadlines`"), "{section}");
        let bad = NodeConfig::from_toml("[breaker]\nopen_for = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(bad.contains("expected a duration"), "{bad}");

        let flag = ConfigLayer::assignment("router.retry.max_atempts=5")
            .unwrap_err()
            .to_string();
        assert!(flag.contains("--set router.retry.max_atempts=5"), "{flag}");
        assert!(flag.contains("unknown field `max_atempts`"), "{flag}");
        assert!(flag.contains("in `router.retry`"), "{flag}");
        let variable = ConfigLayer::environment(env(&[("AGENTMESH_ROUTER__DEFALT_TIMEOUT", "1s")]))
            .unwrap_err()
            .to_string();
        assert!(
            variable.contains("AGENTMESH_ROUTER__DEFALT_TIMEOUT"),
            "{variable}"
        );
        assert!(
            variable.contains("unknown field `defalt_timeout`"),
            "{variable}"
        );
        let section = ConfigLayer::environment(env(&[("AGENTMESH_ROUTR__HOP_MARGIN", "1ms")]))
            .unwrap_err()
            .to_string();
        assert!(section.contains("\"routr\" is not a section"), "{section}");
        let typed = ConfigLayer::assignment("router.max_in_flight=many")
            .unwrap_err()
            .to_string();
        assert!(typed.contains("router.max_in_flight"), "{typed}");
    }

    #[test]
    fn settings_that_cannot_work_together_are_rejected() {
        let zero = NodeConfig::from_toml("[router.retry]\nmax_attempts = 0\n").unwrap_err();
        assert!(
            zero.to_string().contains("router.retry.max_attempts"),
            "{zero}"
        );
        let ttl = NodeConfig::from_toml("[leases]\nmin_ttl = \"10m\"\n").unwrap_err();
        assert!(ttl.to_string().contains("leases.min_ttl"), "{ttl}");
        let queue = NodeConfig::from_toml(
            "[queue.backend.overrides.jobs]\nbackoff_base = \"10m\"\nbackoff_max = \"1s\"\n",
        )
        .unwrap_err();
        assert!(
            queue
                .to_string()
                .contains("queue.backend.overrides.\"jobs\": backoff_base"),
            "{queue}"
        );
    }

    #[test]
    fn variables_override_the_file_and_flags_override_both() {
        let file = ConfigLayer::toml(
            "agentmesh.toml",
            "shutdown_grace = \"3s\"\n[router]\ndefault_timeout = \"10s\"\nhop_margin = \"5ms\"\n\
             [router.retry]\nmax_attempts = 2\n[queue.backend.defaults]\nmax_attempts = 9\n",
        )
        .unwrap();
        let variables = ConfigLayer::environment(env(&[
            ("AGENTMESH_ROUTER__DEFAULT_TIMEOUT", "20s"),
            ("AGENTMESH_ROUTER__RETRY__MAX_ATTEMPTS", "4"),
            ("AGENTMESH_QUEUE__BACKEND__DEFAULTS__MAX_ATTEMPTS", "6"),
            ("AGENTMESH_GATEWAY__CORS_ORIGINS", r#"["*"]"#),
            ("AGENTMESH_MAX_TIMEOUT", "2h"),
            // Not settings: other uses of the prefix are left alone.
            ("AGENTMESH_LISTEN", "127.0.0.1:1"),
            ("AGENTMESH_LOG", "debug"),
            ("PATH", "/bin"),
        ]))
        .unwrap();
        assert_eq!(variables.len(), 5);
        let flags = [
            ConfigLayer::assignment("router.default_timeout=30s").unwrap(),
            ConfigLayer::setting("--data-dir", &["queue", "data_dir"], "/tmp/q".into()).unwrap(),
        ];
        let config =
            NodeConfig::from_layers(std::iter::once(file).chain(variables).chain(flags)).unwrap();
        // The flag beats the variable, which beats the file.
        assert_eq!(config.router.default_timeout, Duration::from_secs(30));
        // The variable beats the file.
        assert_eq!(config.router.retry.max_attempts, 4);
        assert_eq!(config.queue.backend.defaults.max_attempts, 6);
        assert_eq!(config.gateway.cors_origins, ["*"]);
        assert_eq!(config.max_timeout, Duration::from_secs(7200));
        // The file beats the defaults where nothing else spoke.
        assert_eq!(config.router.hop_margin, Duration::from_millis(5));
        assert_eq!(config.shutdown_grace, Duration::from_secs(3));
        assert_eq!(config.queue.data_dir, Path::new("/tmp/q"));
    }

    #[test]
    fn set_values_are_toml_or_else_strings() {
        let config = NodeConfig::from_layers([
            ConfigLayer::assignment("breaker.failure_rate=0.25").unwrap(),
            ConfigLayer::assignment("breaker.window = 1m").unwrap(),
            ConfigLayer::assignment(r#"queue.data_dir="/data/with = sign""#).unwrap(),
            ConfigLayer::assignment(r#"queue.backend.overrides."jobs.v1".max_attempts=2"#).unwrap(),
        ])
        .unwrap();
        assert_eq!(config.breaker.failure_rate, 0.25);
        assert_eq!(config.breaker.window, Duration::from_secs(60));
        assert_eq!(config.queue.data_dir, Path::new("/data/with = sign"));
        assert_eq!(config.queue.backend.for_queue("jobs.v1").max_attempts, 2);
        assert!(ConfigLayer::assignment("router.hop_margin").is_err());
    }

    #[test]
    fn a_per_queue_policy_keeps_the_configured_defaults_it_leaves_out() {
        let config = NodeConfig::from_toml(
            "[queue.backend.defaults]\nmax_attempts = 8\nbackoff_base = \"2s\"\n\
             [queue.backend.overrides.thumbnails]\nmax_attempts = 2\n",
        )
        .unwrap();
        let backend = &config.queue.backend;
        let thumbnails = backend.for_queue("thumbnails");
        assert_eq!(thumbnails.max_attempts, 2);
        assert_eq!(thumbnails.backoff_base, Duration::from_secs(2));
        assert_eq!(backend.for_queue("other").max_attempts, 8);
    }

    #[tokio::test]
    async fn the_queue_policy_from_the_file_reaches_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = NodeConfig::from_toml(
            "[queue.backend.defaults]\nmax_attempts = 2\n\
             [queue.backend.overrides.fragile]\nmax_attempts = 1\n",
        )
        .unwrap();
        config.queue.data_dir = dir.path().to_owned();
        let queue = crate::QueueHandle::open(&config.queue).await.unwrap();
        let store = queue.backend();
        // Nacks a message of `name` until it is dead-lettered; returns how many it took.
        let nacks_until_dead = |name: &'static str| async move {
            let message = agentmesh_queue::NewMessage {
                id: format!("{name}-1"),
                idempotency_key: None,
                correlation_id: format!("{name}-1"),
                reply_to: None,
                body: bytes::Bytes::from_static(b"{}"),
            };
            store.submit(name, vec![message]).await.unwrap();
            for nacks in 1..=10 {
                let wait = Duration::from_secs(5);
                let leased = store.receive(name, "test", 1, wait, wait).await.unwrap();
                let receipt = &leased[0].receipt;
                // No delay: the retry is ready at once, whatever the backoff.
                let outcome = store.nack(receipt, "failed", Some(Duration::ZERO)).await;
                if outcome.unwrap() == agentmesh_queue::NackOutcome::DeadLettered {
                    return nacks;
                }
            }
            panic!("{name}: still not dead-lettered after 10 nacks");
        };
        assert_eq!(nacks_until_dead("fragile").await, 1);
        assert_eq!(nacks_until_dead("sturdy").await, 2);
        queue.close().await;
    }
}
