//! The durable queue: submits three jobs to `squares`, runs a `Worker` that answers
//! each with a result, waits for every result by the job's id, and shuts the worker
//! down (it drains: work in progress finishes and is acked first).
//!
//! ```sh
//! cargo run --release -p agentmesh -- serve
//! cargo run --example queue_worker
//! ```

use std::time::Duration;

use agentmesh_sdk::{Context, MeshClient, Worker, proto::v1::Envelope};
use serde_json::json;
use tonic::Status;

/// The worker's handler: `Ok(Some(result))` acks the job and stores the result;
/// `Err(status)` nacks it, and the job comes back after a backoff (a dead letter
/// after the queue's `max_attempts`).
async fn square(_ctx: Context, job: Envelope) -> Result<Option<Envelope>, Status> {
    let n = job.json_payload().unwrap_or_default()["n"]
        .as_u64()
        .ok_or_else(|| Status::invalid_argument("a job is {\"n\": <number>}"))?;
    let result = json!({ "n": n, "square": n * n });
    Ok(Some(Envelope::json("square.result", result)))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let node = std::env::var("AGENTMESH_NODE").unwrap_or_else(|_| "127.0.0.1:7700".into());
    let client = MeshClient::connect_lazy(&node)?;
    let jobs = (1..=3).map(|n| Envelope::json("square", json!({ "n": n })));
    // Returns once every job is on disk.
    let submitted = client.submit("squares", jobs).await?;

    let worker = Worker::new(client.clone(), "squares")
        .concurrency(4)
        .start(square);
    for outcome in &submitted.outcomes {
        // A job that starts a chain is correlated by its own id: its result is stored under it.
        let result = client
            .await_result(&outcome.message_id, Some(Duration::from_secs(10)))
            .await?;
        let payload = result.json_payload().unwrap_or_default();
        println!("{} -> {payload}", outcome.message_id);
    }
    let stats = worker.shutdown().await;
    println!("the worker handled {} jobs", stats.succeeded);
    Ok(())
}
