//! Calling an agent through the node: invokes `upper` (see `upper_agent.rs`) with a
//! deadline and prints the reply and the correlation id the node gave the call.
//!
//! ```sh
//! cargo run --example upper_agent &   # or in another terminal
//! cargo run --example call_agent
//! ```

use std::time::Duration;

use agentmesh_sdk::{CallOptions, MeshClient, proto::v1::Envelope};
use serde_json::json;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let node = std::env::var("AGENTMESH_NODE").unwrap_or_else(|_| "127.0.0.1:7700".into());
    let client = MeshClient::connect_lazy(&node)?;
    let request = Envelope::json("upper.request", json!({ "text": "hello, mesh" }));
    // The call, and every call `upper` makes while handling it, ends within 2 s.
    let options = CallOptions {
        timeout: Some(Duration::from_secs(2)),
        ..Default::default()
    };
    let reply = client.invoke_with("upper", request, options).await?;
    println!(
        "{} (correlation id {})",
        reply.json_payload().unwrap_or_default(),
        reply.correlation_id
    );
    Ok(())
}
