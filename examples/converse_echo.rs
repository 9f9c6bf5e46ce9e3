//! A conversation: both sides send whenever they like over one `Converse` call. Talks
//! to the demo `echo` agent, which answers each message, then half-closes.
//!
//! ```sh
//! cargo run --release -p agentmesh -- serve --demo-agents
//! cargo run --example converse_echo
//! ```

use std::time::Duration;

use agentmesh_sdk::{MeshClient, proto::v1::Envelope};
use futures::StreamExt;
use serde_json::json;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let node = std::env::var("AGENTMESH_NODE").unwrap_or_else(|_| "127.0.0.1:7700".into());
    let client = MeshClient::connect_lazy(&node)?;
    // Each side sends a heartbeat after 1 s of quiet; a peer silent for 3 s ends the
    // conversation with UNAVAILABLE.
    let (to_echo, mut from_echo) = client.converse("echo", Duration::from_secs(1)).await?;
    for say in ["hello", "how are you?", "bye"] {
        to_echo
            .send(Envelope::json("chat.message", json!({ "say": say })))
            .await?;
        let reply = from_echo
            .next()
            .await
            .ok_or("echo ended the conversation early")??;
        println!("echo: {}", reply.json_payload().unwrap_or_default());
    }
    // Dropping the sender half-closes our side; echo then ends the conversation cleanly.
    drop(to_echo);
    while let Some(message) = from_echo.next().await {
        message?;
    }
    println!("conversation over");
    Ok(())
}
