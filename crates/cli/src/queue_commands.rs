//! Queue commands: `queues`, `submit`, `consume`, `dlq`, `result`.

use std::{process::Stdio, time::Duration};

use agentmesh_proto::v1::{Envelope, SubmitStatus};
use agentmesh_sdk::{DeadLetterSelection, Worker};
use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use tokio::io::AsyncWriteExt;
use tonic::Status;

use crate::{
    NodeArgs, Output, status_error,
    table_output::{plain_table, print_table},
};

/// The queue subcommands (flattened into the top-level command).
#[derive(Debug, Subcommand)]
pub(crate) enum QueueCommand {
    /// List queues: depth, in-flight, dead letters, age of the oldest message.
    Queues {
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Put messages on a queue; prints each message's id once it is durable.
    Submit {
        /// The queue (created on first use).
        queue: String,
        /// JSON payload.
        #[arg(long, default_value = "{}")]
        json: String,
        /// Payload type, e.g. thumbnail.request.
        #[arg(long = "type", default_value = "")]
        payload_type: String,
        /// How many copies to submit (each its own message).
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Idempotency key; with --count N the messages get KEY-0 .. KEY-(N-1).
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Queue that receives each message's result when it is acked.
        #[arg(long)]
        reply_to: Option<String>,
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Consume a queue: print each message, or run a command on it.
    Consume {
        /// The queue.
        queue: String,
        /// Shell command run per message: gets the JSON payload on stdin; its stdout (JSON)
        /// is the result; a non-zero exit nacks the message.
        #[arg(long)]
        exec: Option<String>,
        /// Deliveries held at once.
        #[arg(long, default_value_t = 16)]
        prefetch: u32,
        /// Messages processed at once.
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        /// Lease per delivery in milliseconds (extended while the work runs).
        #[arg(long, default_value_t = 30_000)]
        lease_ms: u64,
        /// Stop after this many messages (default: run until Ctrl-C).
        #[arg(long)]
        max: Option<u64>,
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Dead letters: list, redrive or purge them.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Print the result stored for a correlation id (a submitted message's id).
    Result {
        /// The correlation id.
        correlation_id: String,
        /// Wait until the result arrives.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this many milliseconds.
        #[arg(long)]
        timeout_ms: Option<u64>,
        #[command(flatten)]
        node: NodeArgs,
    },
}

/// `agentmesh dlq ...`.
#[derive(Debug, Subcommand)]
pub(crate) enum DlqCommand {
    /// List a queue's dead letters with their last error.
    List {
        /// The queue.
        queue: String,
        /// Dead letters per page.
        #[arg(long, default_value_t = 100)]
        page_size: u32,
        /// Start at this page token.
        #[arg(long, default_value = "")]
        page_token: String,
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Move dead letters back into their queue with a fresh attempt count.
    Redrive {
        /// The queue.
        queue: String,
        #[command(flatten)]
        select: Select,
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Delete dead letters for good.
    Purge {
        /// The queue.
        queue: String,
        #[command(flatten)]
        select: Select,
        #[command(flatten)]
        node: NodeArgs,
    },
}

/// Which dead letters.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub(crate) struct Select {
    /// Every dead letter of the queue.
    #[arg(long)]
    all: bool,
    /// These message ids (repeatable).
    #[arg(long = "id")]
    ids: Vec<String>,
}

impl Select {
    fn selection(self) -> DeadLetterSelection {
        if self.all {
            DeadLetterSelection::All
        } else {
            DeadLetterSelection::Ids(self.ids)
        }
    }
}

/// Runs a queue subcommand.
pub(crate) async fn run(command: QueueCommand) -> anyhow::Result<()> {
    match command {
        QueueCommand::Queues { node } => queues(node).await,
        QueueCommand::Submit {
            queue,
            json,
            payload_type,
            count,
            idempotency_key,
            reply_to,
            node,
        } => {
            let payload: serde_json::Value =
                serde_json::from_str(&json).context("--json is not valid JSON")?;
            let envelopes = (0..count).map(|i| {
                let mut envelope = Envelope::json(payload_type.clone(), payload.clone());
                if let Some(key) = &idempotency_key {
                    envelope.idempotency_key = if count == 1 {
                        key.clone()
                    } else {
                        format!("{key}-{i}")
                    };
                }
                envelope.reply_to = reply_to.clone().unwrap_or_default();
                envelope
            });
            submit(&queue, envelopes.collect(), node).await
        }
        QueueCommand::Consume {
            queue,
            exec,
            prefetch,
            concurrency,
            lease_ms,
            max,
            node,
        } => consume(queue, exec, prefetch, concurrency, lease_ms, max, node).await,
        QueueCommand::Dlq { command } => dlq(command).await,
        QueueCommand::Result {
            correlation_id,
            wait,
            timeout_ms,
            node,
        } => result(&correlation_id, wait, timeout_ms, node).await,
    }
}

fn age(duration: Option<prost_types::Duration>) -> String {
    match duration.and_then(|d| Duration::try_from(d).ok()) {
        None => "-".into(),
        Some(d) if d < Duration::from_secs(1) => format!("{}ms", d.as_millis()),
        Some(d) if d < Duration::from_secs(120) => format!("{}s", d.as_secs()),
        Some(d) if d < Duration::from_secs(7200) => format!("{}m", d.as_secs() / 60),
        Some(d) => format!("{}h", d.as_secs() / 3600),
    }
}

async fn queues(node: NodeArgs) -> anyhow::Result<()> {
    let client = node.client()?;
    let queues = client.list_queues().await.map_err(status_error)?;
    if node.output == Output::Json {
        for queue in &queues {
            println!("{}", agentmesh_proto::json::to_json(queue)?);
        }
        return Ok(());
    }
    let mut table = plain_table(
        &["QUEUE", "DEPTH", "IN-FLIGHT", "DEAD", "OLDEST"],
        &[1, 2, 3, 4],
    );
    for q in &queues {
        table.add_row(vec![
            q.name.clone(),
            q.depth.to_string(),
            q.in_flight.to_string(),
            q.dead_letters.to_string(),
            age(q.oldest_age),
        ]);
    }
    print_table(&table);
    if queues.is_empty() {
        eprintln!("no queues yet (a queue is created by its first submit)");
    }
    Ok(())
}

async fn submit(queue: &str, envelopes: Vec<Envelope>, node: NodeArgs) -> anyhow::Result<()> {
    let client = node.client()?;
    let response = client
        .submit(queue, envelopes)
        .await
        .map_err(status_error)?;
    if node.output == Output::Json {
        println!("{}", agentmesh_proto::json::to_json(&response)?);
    } else {
        for outcome in &response.outcomes {
            match SubmitStatus::try_from(outcome.status) {
                Ok(SubmitStatus::Accepted) => println!("accepted  {}", outcome.message_id),
                Ok(SubmitStatus::Duplicate) => {
                    println!("duplicate {} (already submitted)", outcome.message_id)
                }
                _ => println!("rejected  #{}: {}", outcome.index, outcome.reason),
            }
        }
        if response.outcomes.len() > 1 {
            println!(
                "{} accepted, {} duplicates, {} rejected",
                response.accepted, response.duplicates, response.rejected
            );
        }
    }
    if response.rejected > 0 {
        bail!("{} message(s) rejected", response.rejected);
    }
    Ok(())
}

fn payload_text(envelope: &Envelope) -> String {
    envelope
        .json_payload()
        .map(|p| p.to_string())
        .unwrap_or_else(|| format!("<{} payload>", envelope.content_type))
}

/// Runs `command` with the payload on stdin; its stdout (JSON) is the result.
async fn exec(command: &str, envelope: &Envelope) -> Result<Option<Envelope>, Status> {
    let input = envelope
        .json_payload()
        .unwrap_or(serde_json::Value::Null)
        .to_string();
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| Status::internal(format!("cannot run {command:?}: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A command that does not read its input is fine.
        let _ = stdin.write_all(input.as_bytes()).await;
    }
    let output = child
        .wait_with_output()
        .await
        .map_err(|e| Status::internal(format!("{command:?} failed: {e}")))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stderr = stderr.trim();
        let mut error = format!("{command:?} exited with {}", output.status);
        if !stderr.is_empty() {
            error.push_str(": ");
            error.push_str(&stderr.chars().take(2000).collect::<String>());
        }
        return Err(Status::unknown(error));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    if stdout.trim().is_empty() {
        return Ok(None);
    }
    let value: serde_json::Value = serde_json::from_str(stdout.trim()).map_err(|e| {
        Status::invalid_argument(format!("the output of {command:?} is not JSON: {e}"))
    })?;
    let result_type = if envelope.r#type.is_empty() {
        String::new()
    } else {
        format!("{}.result", envelope.r#type)
    };
    Ok(Some(Envelope::json(result_type, value)))
}

#[allow(clippy::too_many_arguments)]
async fn consume(
    queue: String,
    command: Option<String>,
    prefetch: u32,
    concurrency: usize,
    lease_ms: u64,
    max: Option<u64>,
    node: NodeArgs,
) -> anyhow::Result<()> {
    let client = node.client()?;
    let output = node.output;
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let command = std::sync::Arc::new(command);
    let worker = Worker::new(client, queue.clone())
        .prefetch(prefetch)
        .concurrency(concurrency)
        .lease(Duration::from_millis(lease_ms))
        .consumer_id(format!("agentmesh-cli-{}", std::process::id()))
        .start(move |_ctx, envelope| {
            let command = command.clone();
            let done = done_tx.clone();
            async move {
                if output == Output::Json {
                    if let Ok(json) = agentmesh_proto::json::to_json(&envelope) {
                        println!("{json}");
                    }
                } else {
                    println!(
                        "[{} attempt {}] {} {}",
                        envelope.id,
                        envelope.attempt,
                        envelope.r#type,
                        payload_text(&envelope)
                    );
                }
                let result = match command.as_deref() {
                    Some(command) => exec(command, &envelope).await,
                    None => Ok(None),
                };
                if let Err(status) = &result {
                    eprintln!("nack {}: {}", envelope.id, status.message());
                }
                let _ = done.send(());
                result
            }
        });
    eprintln!("consuming {queue} (Ctrl-C to stop)");
    let mut seen = 0u64;
    let limit = max.unwrap_or(u64::MAX);
    let signal = crate::shutdown_signal();
    tokio::pin!(signal);
    while seen < limit {
        tokio::select! {
            _ = &mut signal => break,
            got = done_rx.recv() => match got {
                Some(()) => seen += 1,
                None => break,
            },
        }
    }
    eprintln!("stopping: finishing messages in progress");
    let stats = worker.shutdown().await;
    eprintln!(
        "{} delivered, {} done, {} failed",
        stats.delivered, stats.succeeded, stats.failed
    );
    Ok(())
}

async fn dlq(command: DlqCommand) -> anyhow::Result<()> {
    match command {
        DlqCommand::List {
            queue,
            page_size,
            page_token,
            node,
        } => {
            let client = node.client()?;
            let page = client
                .list_dead_letters(&queue, page_size, &page_token)
                .await
                .map_err(status_error)?;
            if node.output == Output::Json {
                println!("{}", agentmesh_proto::json::to_json(&page)?);
                return Ok(());
            }
            let mut table = plain_table(&["MESSAGE", "ATTEMPTS", "DEAD SINCE", "LAST ERROR"], &[1]);
            for dead in &page.dead_letters {
                let since = dead
                    .dead_lettered_at
                    .map(|t| t.to_string())
                    .unwrap_or_default();
                table.add_row(vec![
                    dead.message_id.clone(),
                    dead.attempts.len().to_string(),
                    since,
                    dead.last_error.clone(),
                ]);
            }
            print_table(&table);
            if page.dead_letters.is_empty() {
                eprintln!("no dead letters in {queue}");
            }
            if !page.next_page_token.is_empty() {
                eprintln!("more: --page-token {}", page.next_page_token);
            }
            Ok(())
        }
        DlqCommand::Redrive {
            queue,
            select,
            node,
        } => {
            let client = node.client()?;
            let count = client
                .redrive_dead_letters(&queue, select.selection())
                .await
                .map_err(status_error)?;
            match node.output {
                Output::Json => {
                    println!("{}", serde_json::json!({ "redriven": count.to_string() }))
                }
                Output::Text => println!("redrove {count} dead letter(s) into {queue}"),
            }
            Ok(())
        }
        DlqCommand::Purge {
            queue,
            select,
            node,
        } => {
            let client = node.client()?;
            let count = client
                .purge_dead_letters(&queue, select.selection())
                .await
                .map_err(status_error)?;
            match node.output {
                Output::Json => println!("{}", serde_json::json!({ "purged": count.to_string() })),
                Output::Text => println!("purged {count} dead letter(s) from {queue}"),
            }
            Ok(())
        }
    }
}

async fn result(
    correlation_id: &str,
    wait: bool,
    timeout_ms: Option<u64>,
    node: NodeArgs,
) -> anyhow::Result<()> {
    let client = node.client()?;
    let found = if wait {
        let timeout = timeout_ms.map(Duration::from_millis);
        match client.await_result(correlation_id, timeout).await {
            Ok(result) => Some(result),
            Err(status) if status.code() == tonic::Code::DeadlineExceeded => None,
            Err(status) => return Err(status_error(status)),
        }
    } else {
        client
            .get_result(correlation_id)
            .await
            .map_err(status_error)?
    };
    match found {
        Some(envelope) => crate::print_envelope(&envelope, node.output),
        None => bail!("no result for {correlation_id} yet"),
    }
}
