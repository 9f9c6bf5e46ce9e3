//! Request/response through the node, against the demo agents: a call with a deadline,
//! a correlation id and an idempotency key of its own, and what errors look like.
//!
//! ```sh
//! cargo run --release -p agentmesh -- serve --demo-agents
//! cargo run --example invoke_echo
//! ```

use std::time::Duration;

use agentmesh_sdk::{CallOptions, MeshClient, proto::v1::Envelope};
use serde_json::json;
use tonic::Code;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let node = std::env::var("AGENTMESH_NODE").unwrap_or_else(|_| "127.0.0.1:7700".into());
    let client = MeshClient::connect_lazy(&node)?;

    // The simplest call: the node generates the correlation id, the deadline is 30 s.
    let hi = Envelope::json("echo.request", json!({ "text": "hi" }));
    let reply = client.invoke("echo", hi).await?;
    println!(
        "{} {}",
        reply.r#type,
        reply.json_payload().unwrap_or_default()
    );

    // A correlation id of our own (it follows every hop), a 2 s deadline (every hop
    // below gets a shorter one) and an idempotency key: within the node's window, a
    // second call with the same key gets the first call's reply without running again.
    let mut request = Envelope::json("echo.request", json!({ "n": 1 }));
    request.correlation_id = format!("order-{}", std::process::id());
    let options = CallOptions {
        timeout: Some(Duration::from_secs(2)),
        idempotency_key: Some(format!("order-{}", std::process::id())),
    };
    let first = client.invoke_with("echo", request, options.clone()).await?;
    let again = Envelope::json("echo.request", json!({ "n": 2 }));
    let second = client.invoke_with("echo", again, options).await?;
    println!(
        "correlation id {}; replayed {}",
        first.correlation_id,
        second.json_payload().unwrap_or_default()
    );

    // Errors are gRPC statuses: NOT_FOUND for an unknown agent, DEADLINE_EXCEEDED
    // (naming the hop) when `slow` takes longer than the 500 ms the call allows.
    let lost = client
        .invoke("nobody", Envelope::json("x", json!({})))
        .await
        .unwrap_err();
    assert_eq!(lost.code(), Code::NotFound);
    println!("{:?}: {}", lost.code(), lost.message());
    let options = CallOptions {
        timeout: Some(Duration::from_millis(500)),
        ..Default::default()
    };
    let late = client
        .invoke_with("slow", Envelope::json("slow.request", json!({})), options)
        .await
        .unwrap_err();
    println!("{:?}: {}", late.code(), late.message());
    Ok(())
}
