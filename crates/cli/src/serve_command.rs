//! `agentmesh serve`: loads the node's settings (file, `AGENTMESH_*` variables, flags) and
//! runs a node with gRPC and HTTP on one port.

use std::{net::SocketAddr, path::PathBuf};

use agentmesh_node::{ConfigLayer, Node, NodeConfig};
use anyhow::Context as _;
use clap::{ArgMatches, parser::ValueSource};

use crate::demo;

/// The flags of `agentmesh serve`.
#[derive(Debug, clap::Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "AGENTMESH_LISTEN", default_value = "127.0.0.1:7700")]
    listen: SocketAddr,
    /// Also start the built-in demo agents (echo, counter); with authentication on they
    /// register with `AGENTMESH_TOKEN`.
    #[arg(long)]
    demo_agents: bool,
    /// Configuration file (TOML); `AGENTMESH_<SECTION>__<KEY>` variables override it, and
    /// flags override both.
    #[arg(long, env = "AGENTMESH_CONFIG")]
    config: Option<PathBuf>,
    /// Sets any key of the configuration file, e.g. `--set router.retry.max_attempts=5`
    /// (repeatable; a TOML dotted key, the value as in TOML or a bare string).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    settings: Vec<String>,
    /// Edge default timeout in milliseconds, for calls that set none (`router.default_timeout`,
    /// default 30000).
    #[arg(long, env = "AGENTMESH_DEFAULT_TIMEOUT_MS")]
    default_timeout_ms: Option<u64>,
    /// Directory of the durable queue store, created if missing (`queue.data_dir`, default
    /// ./agentmesh-data).
    #[arg(long, env = "AGENTMESH_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Where shared state lives (`store.url`): empty for this process and local disk, or
    /// `redis://HOST:PORT[/DB]` to share registry, queue and results with other nodes.
    #[arg(long, env = "AGENTMESH_STORE")]
    store: Option<String>,
}

impl ServeArgs {
    /// The node's settings: defaults, then the file, then variables, then flags. `matches`
    /// tells whether a named flag was given on the command line or by its variable, which
    /// decides the layer it belongs to.
    pub(crate) fn node_config(
        &self,
        matches: &ArgMatches,
        variables: impl IntoIterator<Item = (String, String)>,
    ) -> anyhow::Result<NodeConfig> {
        let mut file = Vec::new();
        if let Some(path) = &self.config {
            file.push(ConfigLayer::file(path)?);
        }
        let (mut from_variables, mut from_flags) = (Vec::new(), Vec::new());
        let mut named =
            |id: &str, flag: &str, variable: &str, path: &[&str], value: toml::Value| {
                let layer = if matches.value_source(id) == Some(ValueSource::EnvVariable) {
                    ConfigLayer::setting(variable, path, value).map(|l| from_variables.push(l))
                } else {
                    ConfigLayer::setting(flag, path, value).map(|l| from_flags.push(l))
                };
                layer.map_err(anyhow::Error::from)
            };
        if let Some(dir) = &self.data_dir {
            let dir = dir.to_str().context("--data-dir is not valid UTF-8")?;
            named(
                "data_dir",
                "--data-dir",
                "AGENTMESH_DATA_DIR",
                &["queue", "data_dir"],
                dir.into(),
            )?;
        }
        if let Some(url) = &self.store {
            named(
                "store",
                "--store",
                "AGENTMESH_STORE",
                &["store", "url"],
                url.as_str().into(),
            )?;
        }
        if let Some(ms) = self.default_timeout_ms {
            named(
                "default_timeout_ms",
                "--default-timeout-ms",
                "AGENTMESH_DEFAULT_TIMEOUT_MS",
                &["router", "default_timeout"],
                format!("{ms}ms").into(),
            )?;
        }
        from_variables.extend(ConfigLayer::environment(variables)?);
        for setting in &self.settings {
            from_flags.push(ConfigLayer::assignment(setting)?);
        }
        let layers = file.into_iter().chain(from_variables).chain(from_flags);
        Ok(NodeConfig::from_layers(layers)?)
    }

    /// Runs the node until Ctrl-C or SIGTERM.
    pub(crate) async fn run(self, matches: &ArgMatches) -> anyhow::Result<()> {
        let config = self.node_config(matches, std::env::vars())?;
        // The demo agents register over plaintext and would wait for the node forever.
        anyhow::ensure!(
            !(self.demo_agents && config.tls.enabled()),
            "--demo-agents needs a plaintext node (tls.cert is set)"
        );
        let _telemetry = crate::telemetry::init(&config.telemetry)
            .context("cannot set up span export (telemetry.otlp_endpoint)")?;
        raise_open_file_limit();
        let mut stores = agentmesh_node::Stores::open(&config)
            .await
            .context("cannot open the shared store (store.url)")?;
        let queue = match stores.queue.take() {
            Some(shared) => shared,
            None => agentmesh_node::QueueHandle::open(&config.queue)
                .await
                .with_context(|| {
                    format!(
                        "cannot open the queue store in {}",
                        config.queue.data_dir.display()
                    )
                })?,
        };
        let listen = self.listen;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        let address = listener.local_addr()?;
        let node = Node::with_stores(config, stores).with_queue(queue.clone());
        let server = tokio::spawn(node.serve(listener, crate::shutdown_signal()));
        let demos = if self.demo_agents {
            // With authentication on, the demo agents need a principal allowed to register.
            let token = std::env::var("AGENTMESH_TOKEN")
                .ok()
                .filter(|t| !t.is_empty());
            let demos = demo::start(&address.to_string(), token.as_deref()).await?;
            for agent in &demos {
                agent.registered(1).await;
            }
            tracing::info!(count = demos.len(), "demo agents registered");
            demos
        } else {
            Vec::new()
        };
        let result = server.await.context("node task failed")?;
        for agent in demos {
            agent.shutdown().await;
        }
        queue.close().await;
        result.context("node failed")
    }
}

/// Raises the open-file soft limit to the hard limit: every client connection takes a
/// descriptor, and the default soft limit (often 1024) would cap a node far below what the
/// system allows. The connection cap (`connections.max_connections` = 0) follows the new limit.
fn raise_open_file_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if let Err(error) = setrlimit(Resource::Nofile, raised) {
            tracing::debug!(%error, "cannot raise the open-file limit");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use clap::{CommandFactory, FromArgMatches};

    use crate::{Cli, Command};

    fn config(
        args: &[&str],
        variables: &[(&str, &str)],
    ) -> anyhow::Result<agentmesh_node::NodeConfig> {
        let matches = Cli::command().try_get_matches_from(args)?;
        let Command::Serve(serve) = Cli::from_arg_matches(&matches)?.command else {
            panic!("not serve");
        };
        let variables = variables
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()));
        serve.node_config(matches.subcommand_matches("serve").unwrap(), variables)
    }

    #[test]
    fn flags_override_variables_which_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agentmesh.toml");
        std::fs::write(
            &file,
            "[router]\ndefault_timeout = \"10s\"\nhop_margin = \"7ms\"\n\
             [router.retry]\nmax_attempts = 2\n[queue]\ndata_dir = \"/from/file\"\n",
        )
        .unwrap();
        let file = file.to_str().unwrap();

        let from_file = config(&["agentmesh", "serve", "--config", file], &[]).unwrap();
        assert_eq!(from_file.router.default_timeout, Duration::from_secs(10));
        assert_eq!(from_file.queue.data_dir, std::path::Path::new("/from/file"));

        let variables = [
            ("AGENTMESH_ROUTER__RETRY__MAX_ATTEMPTS", "4"),
            ("AGENTMESH_ROUTER__DEFAULT_TIMEOUT", "20s"),
        ];
        let layered = config(
            &[
                "agentmesh",
                "serve",
                "--config",
                file,
                "--default-timeout-ms",
                "1500",
                "--set",
                "router.retry.max_attempts=6",
                "--data-dir",
                "/from/flag",
            ],
            &variables,
        )
        .unwrap();
        assert_eq!(layered.router.default_timeout, Duration::from_millis(1500));
        assert_eq!(layered.router.retry.max_attempts, 6);
        assert_eq!(layered.queue.data_dir, std::path::Path::new("/from/flag"));
        assert_eq!(layered.router.hop_margin, Duration::from_millis(7));

        let variables_only = config(&["agentmesh", "serve", "--config", file], &variables).unwrap();
        assert_eq!(variables_only.router.retry.max_attempts, 4);
        assert_eq!(
            variables_only.router.default_timeout,
            Duration::from_secs(20)
        );
    }

    #[test]
    fn an_unknown_key_names_itself_and_its_flag() {
        let error = config(&["agentmesh", "serve", "--set", "router.retries=2"], &[])
            .unwrap_err()
            .to_string();
        assert!(error.contains("--set router.retries=2"), "{error}");
        assert!(error.contains("unknown field `retries`"), "{error}");
    }
}
