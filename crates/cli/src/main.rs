//! `agentmesh`: run a node, list agents, call them.

mod demo;
mod queue_commands;
mod serve_command;
mod table_output;
mod telemetry;
mod trace_command;

use std::time::Duration;

use agentmesh_proto::v1::{AgentFilter, Envelope};
use agentmesh_sdk::{CallOptions, ClientTls, MeshClient};
use anyhow::Context as _;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

// Many small, short-lived allocations cross threads (messages between the queue writer and
// the gRPC tasks), which glibc's malloc handles poorly. jemalloc handles them well, and its
// background threads purge freed pages (after `dirty_decay_ms`, 10 s) even while the node is
// idle, so memory taken by a load spike is given back once the spike is over.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// agentmesh: the communication layer for AI agents.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Output format of client commands.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Output {
    /// Human-readable.
    Text,
    /// proto3 JSON, one document per line, for scripts.
    Json,
}

/// Fan-out completion policy.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Policy {
    /// Every target must succeed.
    All,
    /// `count` successes are enough.
    Quorum,
    /// The first `count` successes; the rest are cancelled.
    First,
    /// Whatever completes before the deadline.
    BestEffort,
}

#[derive(Debug, clap::Args)]
struct NodeArgs {
    /// The node to talk to (`host:port`, `http://…` or `https://…`).
    #[arg(long, env = "AGENTMESH_NODE", default_value = "127.0.0.1:7700")]
    node: String,
    /// PEM file of the CAs to trust for a TLS node (implies TLS; default: the system's roots).
    #[arg(long, env = "AGENTMESH_CA")]
    ca: Option<std::path::PathBuf>,
    /// PEM client certificate for a node that asks for one (mutual TLS; implies TLS).
    #[arg(long, env = "AGENTMESH_CERT", requires = "key")]
    cert: Option<std::path::PathBuf>,
    /// PEM private key of --cert.
    #[arg(long, env = "AGENTMESH_KEY", requires = "cert")]
    key: Option<std::path::PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
    /// Bearer token (API token or JWT) for a node with authentication on.
    #[arg(long, env = "AGENTMESH_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

/// `agentmesh auth ...`
#[derive(Debug, Subcommand)]
enum AuthCommand {
    /// Print the `sha256:<hex>` hash of an API token, for `[[auth.tokens]]` (the token is read
    /// from standard input when not given, so it stays out of the shell history).
    HashToken {
        /// The token.
        token: Option<String>,
    },
}

impl NodeArgs {
    /// A client of the node: over TLS for an `https://` address or when a CA or client
    /// certificate is given; presenting the token if one was given.
    fn client(&self) -> anyhow::Result<MeshClient> {
        let tls = self.node.starts_with("https://") || self.ca.is_some() || self.cert.is_some();
        let client = if tls {
            let mut options = ClientTls::new();
            if let Some(ca) = &self.ca {
                options = options.ca_file(ca)?;
            }
            if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
                options = options.identity_files(cert, key)?;
            }
            MeshClient::connect_lazy_tls(&self.node, &options)?
        } else {
            MeshClient::connect_lazy(&self.node)?
        };
        Ok(match self.token.as_deref().filter(|t| !t.is_empty()) {
            Some(token) => client.with_token(token)?,
            None => client,
        })
    }
}

#[derive(Debug, Subcommand)]
enum AgentsAction {
    /// Add an external A2A (Agent2Agent) agent by its card URL: the node fetches its card,
    /// lists it with its skills and routes calls to it over A2A.
    AddA2a {
        /// The agent's base URL (its card is at /.well-known/agent-card.json below it) or
        /// its card's URL.
        url: String,
        /// The name it is called by on the mesh (default: from its card).
        #[arg(long, default_value = "")]
        name: String,
        #[command(flatten)]
        node: NodeArgs,
    },
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a node: gRPC and HTTP on one port.
    Serve(serve_command::ServeArgs),
    #[command(flatten)]
    Queue(queue_commands::QueueCommand),
    /// Authentication helpers.
    #[command(subcommand)]
    Auth(AuthCommand),
    /// List registered agents (`agents add-a2a URL` adds an external A2A agent).
    Agents {
        #[command(subcommand)]
        action: Option<AgentsAction>,
        #[command(flatten)]
        node: NodeArgs,
        /// Only agents offering this skill.
        #[arg(long)]
        skill: Option<String>,
    },
    /// Invoke an agent (by name or skill:<id>) and print its reply.
    Call {
        /// Agent name or skill:<id>.
        target: String,
        /// JSON payload.
        #[arg(long, default_value = "{}")]
        json: String,
        /// Payload type, e.g. translate.request.
        #[arg(long = "type", default_value = "")]
        payload_type: String,
        /// Payload type version.
        #[arg(long, default_value = "")]
        type_version: String,
        /// Timeout in milliseconds.
        #[arg(long, default_value_t = 30_000)]
        timeout_ms: u64,
        /// Idempotency key.
        #[arg(long)]
        idempotency_key: Option<String>,
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Send one request to many agents and print every target's outcome.
    #[command(name = "fanout")]
    FanOut {
        /// Targets (agent names or skill:<id>), comma-separated.
        #[arg(long, value_delimiter = ',')]
        targets: Vec<String>,
        /// Or: every instance offering this skill.
        #[arg(long)]
        skill: Option<String>,
        /// Completion policy.
        #[arg(long, value_enum, default_value_t = Policy::All)]
        policy: Policy,
        /// n for quorum, k for first.
        #[arg(long, default_value_t = 0)]
        count: u32,
        /// JSON payload.
        #[arg(long, default_value = "{}")]
        json: String,
        /// Timeout in milliseconds.
        #[arg(long, default_value_t = 30_000)]
        timeout_ms: u64,
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Show the hops the node's trace journal recorded under a correlation id, as a
    /// waterfall (`--follow`: as they happen).
    Trace(trace_command::TraceArgs),
    /// Stream from an agent and print events as they arrive.
    Stream {
        /// Agent name or skill:<id>.
        target: String,
        /// JSON payload.
        #[arg(long, default_value = "{}")]
        json: String,
        /// Payload type.
        #[arg(long = "type", default_value = "")]
        payload_type: String,
        /// Timeout of the whole stream in milliseconds.
        #[arg(long, default_value_t = 300_000)]
        timeout_ms: u64,
        /// Resume this stream id instead of starting a new stream.
        #[arg(long)]
        resume: Option<String>,
        /// With --resume: the last sequence already seen.
        #[arg(long, default_value_t = 0)]
        after: u64,
        #[command(flatten)]
        node: NodeArgs,
    },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    // The matches say whether a flag came from the command line or its variable, which
    // decides the precedence of `serve`'s named flags.
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|error| error.exit());
    // `serve` sets up its output once its settings (span export among them) are loaded.
    if !matches!(cli.command, Command::Serve(_)) {
        telemetry::init_logs();
    }
    match cli.command {
        Command::Serve(serve) => {
            let serve_matches = matches
                .subcommand_matches("serve")
                .expect("the serve subcommand was parsed");
            serve.run(serve_matches).await
        }
        Command::Queue(command) => queue_commands::run(command).await,
        Command::Agents {
            action: Some(AgentsAction::AddA2a { url, name, node }),
            ..
        } => add_a2a(node, &url, &name).await,
        Command::Agents {
            action: None,
            node,
            skill,
        } => agents(node, skill).await,
        Command::Auth(AuthCommand::HashToken { token }) => {
            let token = match token {
                Some(token) => token,
                None => {
                    let mut line = String::new();
                    std::io::stdin()
                        .read_line(&mut line)
                        .context("reading the token from standard input")?;
                    line
                }
            };
            let token = token.trim();
            anyhow::ensure!(!token.is_empty(), "the token is empty");
            println!("{}", agentmesh_node::auth::hash_token(token));
            Ok(())
        }
        Command::Trace(args) => trace_command::run(args).await,
        Command::FanOut {
            targets,
            skill,
            policy,
            count,
            json,
            timeout_ms,
            node,
        } => {
            use agentmesh_proto::v1::{FanOutPolicy, FanOutRequest, fan_out_result::Outcome};
            let payload: serde_json::Value =
                serde_json::from_str(&json).context("--json is not valid JSON")?;
            let policy = match policy {
                Policy::All => FanOutPolicy::All,
                Policy::Quorum => FanOutPolicy::Quorum,
                Policy::First => FanOutPolicy::First,
                Policy::BestEffort => FanOutPolicy::BestEffort,
            };
            let request = FanOutRequest {
                envelope: Some(Envelope::json("", payload)),
                targets,
                skill: skill.unwrap_or_default(),
                policy: policy as i32,
                count,
            };
            let client = node.client()?;
            let options = CallOptions {
                timeout: Some(Duration::from_millis(timeout_ms)),
                idempotency_key: None,
            };
            let response = client
                .fan_out_with(request, options)
                .await
                .map_err(status_error)?;
            if node.output == Output::Json {
                println!("{}", agentmesh_proto::json::to_json(&response)?);
                return Ok(());
            }
            let mut table =
                table_output::plain_table(&["TARGET", "LATENCY", "OUTCOME", "DETAIL"], &[1]);
            for result in &response.results {
                let latency = result
                    .latency
                    .and_then(|d| Duration::try_from(d).ok())
                    .unwrap_or_default();
                let (outcome, detail) = match &result.outcome {
                    Some(Outcome::Envelope(reply)) => (
                        "ok".to_owned(),
                        reply
                            .json_payload()
                            .map(|p| p.to_string())
                            .unwrap_or_default(),
                    ),
                    Some(Outcome::Error(error)) => (
                        format!("{:?}", tonic::Code::from(error.code)),
                        error.message.clone(),
                    ),
                    None => ("-".to_owned(), String::new()),
                };
                table.add_row(vec![
                    result.target.clone(),
                    format!("{} ms", latency.as_millis()),
                    outcome,
                    detail,
                ]);
            }
            table_output::print_table(&table);
            println!(
                "policy {}",
                if response.satisfied {
                    "satisfied"
                } else {
                    "NOT satisfied"
                }
            );
            Ok(())
        }
        Command::Stream {
            target,
            json,
            payload_type,
            timeout_ms,
            resume,
            after,
            node,
        } => {
            let client = node.client()?;
            let events = match resume {
                Some(stream_id) => client.resume(&stream_id, after).await,
                None => {
                    let payload: serde_json::Value =
                        serde_json::from_str(&json).context("--json is not valid JSON")?;
                    let options = CallOptions {
                        timeout: Some(Duration::from_millis(timeout_ms)),
                        idempotency_key: None,
                    };
                    client
                        .stream_with(&target, Envelope::json(payload_type, payload), options)
                        .await
                }
            }
            .map_err(status_error)?;
            print_stream(events, node.output).await
        }
        Command::Call {
            target,
            json,
            payload_type,
            type_version,
            timeout_ms,
            idempotency_key,
            node,
        } => {
            let payload: serde_json::Value =
                serde_json::from_str(&json).context("--json is not valid JSON")?;
            let mut envelope = Envelope::json(payload_type, payload);
            envelope.type_version = type_version;
            let client = node.client()?;
            let options = CallOptions {
                timeout: Some(Duration::from_millis(timeout_ms)),
                idempotency_key,
            };
            let reply = client
                .invoke_with(&target, envelope, options)
                .await
                .map_err(status_error)?;
            print_envelope(&reply, node.output)
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler installs");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn add_a2a(node: NodeArgs, url: &str, name: &str) -> anyhow::Result<()> {
    let client = MeshClient::connect_lazy(&node.node)?;
    let card = client
        .add_a2a_agent(url, name)
        .await
        .map_err(status_error)?;
    if node.output == Output::Json {
        println!("{}", agentmesh_proto::json::to_json(&card)?);
        return Ok(());
    }
    let skills: Vec<&str> = card.skills.iter().map(|s| s.id.as_str()).collect();
    println!(
        "added A2A agent {} at {} (skills: {})",
        card.name,
        card.endpoint,
        if skills.is_empty() {
            "none".to_owned()
        } else {
            skills.join(", ")
        }
    );
    Ok(())
}

async fn agents(node: NodeArgs, skill: Option<String>) -> anyhow::Result<()> {
    let client = node.client()?;
    let instances = client
        .lookup(AgentFilter {
            skill: skill.unwrap_or_default(),
            ..Default::default()
        })
        .await
        .map_err(status_error)?;
    if node.output == Output::Json {
        for instance in &instances {
            println!("{}", agentmesh_proto::json::to_json(instance)?);
        }
        return Ok(());
    }
    let mut table = table_output::plain_table(
        &[
            "NAME",
            "INSTANCE",
            "ENDPOINT",
            "SKILLS",
            "IN-FLIGHT",
            "BREAKER",
        ],
        &[4],
    );
    for instance in &instances {
        let card = instance.card.clone().unwrap_or_default();
        let skills: Vec<&str> = card.skills.iter().map(|s| s.id.as_str()).collect();
        let breaker = match agentmesh_proto::v1::BreakerState::try_from(instance.breaker) {
            Ok(agentmesh_proto::v1::BreakerState::Open) => "open",
            Ok(agentmesh_proto::v1::BreakerState::HalfOpen) => "half-open",
            _ => "closed",
        };
        table.add_row(vec![
            card.name,
            card.instance_id,
            card.endpoint,
            skills.join(","),
            instance.in_flight.to_string(),
            breaker.to_owned(),
        ]);
    }
    table_output::print_table(&table);
    if instances.is_empty() {
        eprintln!("no agents registered");
    }
    Ok(())
}

async fn print_stream(
    mut events: tonic::Streaming<agentmesh_proto::v1::StreamResponse>,
    output: Output,
) -> anyhow::Result<()> {
    use agentmesh_proto::v1::StreamEventKind;
    while let Some(event) = events.message().await.map_err(status_error)? {
        if output == Output::Json {
            println!("{}", agentmesh_proto::json::to_json(&event)?);
            continue;
        }
        let payload = event
            .envelope
            .as_ref()
            .map(|e| {
                e.json_payload()
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| format!("<{} payload>", e.content_type))
            })
            .unwrap_or_default();
        let line = match StreamEventKind::try_from(event.kind).unwrap_or_default() {
            StreamEventKind::Progress => format!(
                "progress {:>3.0}% {}",
                event.progress * 100.0,
                event.message
            ),
            StreamEventKind::Result => format!("result   {payload}"),
            StreamEventKind::Error => format!(
                "error    {}",
                event.error.map(|e| e.message).unwrap_or_default()
            ),
            _ => format!("partial  {payload}"),
        };
        println!("[{}:{}] {line}", event.stream_id, event.sequence);
    }
    Ok(())
}

fn print_envelope(envelope: &Envelope, output: Output) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", agentmesh_proto::json::to_json(envelope)?),
        Output::Text => match envelope.json_payload() {
            Some(payload) => println!("{}", serde_json::to_string_pretty(&payload)?),
            None => println!(
                "{}",
                serde_json::to_string_pretty(&agentmesh_proto::json::to_json(envelope)?)?
            ),
        },
    }
    Ok(())
}

fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", status.code(), status.message())
}
