//! An agent: `upper` answers `{"text": …}` with the text in upper case. It registers
//! with the node, serves until Ctrl-C, then deregisters.
//!
//! ```sh
//! cargo run --release -p agentmesh -- serve   # a node on 127.0.0.1:7700
//! cargo run --example upper_agent             # AGENTMESH_NODE=host:port for another node
//! ```

use agentmesh_sdk::{
    Agent, AgentRuntime, Context,
    proto::v1::{AgentCard, Envelope},
};
use serde_json::json;
use tonic::Status;

struct Upper;

#[tonic::async_trait]
impl Agent for Upper {
    async fn invoke(&self, _ctx: Context, request: Envelope) -> Result<Envelope, Status> {
        let payload = request.json_payload().unwrap_or_default();
        let text = payload["text"].as_str().unwrap_or("").to_uppercase();
        // Calls made here through ctx.client() inherit the correlation id and deadline.
        Ok(Envelope::json("upper.reply", json!({ "text": text })))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let node = std::env::var("AGENTMESH_NODE").unwrap_or_else(|_| "127.0.0.1:7700".into());
    let card = AgentCard {
        name: "upper".into(),
        ..Default::default()
    };
    let agent = AgentRuntime::new(card, Upper).node(&node).start().await?;
    // It serves, registers, heartbeats and re-registers after a node restart on its
    // own; this waits for the first registration.
    agent.registered(1).await;
    println!("upper is registered with {node}; Ctrl-C stops it");
    tokio::signal::ctrl_c().await?;
    agent.shutdown().await; // deregisters
    Ok(())
}
