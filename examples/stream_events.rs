//! Reading a stream and resuming it after a cut: takes the first two events of the
//! demo `counter` agent, drops the connection, and resumes after the last sequence
//! it saw; the node sends the rest with no gap and no duplicate.
//!
//! ```sh
//! cargo run --release -p agentmesh -- serve --demo-agents
//! cargo run --example stream_events
//! ```

use agentmesh_sdk::{
    MeshClient,
    proto::v1::{Envelope, StreamResponse},
};
use serde_json::json;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let node = std::env::var("AGENTMESH_NODE").unwrap_or_else(|_| "127.0.0.1:7700".into());
    let client = MeshClient::connect_lazy(&node)?;
    let request = Envelope::json("counter.request", json!({ "n": 5 }));
    let mut events = client.stream("counter", request).await?;
    let mut last_seen = None;
    for _ in 0..2 {
        if let Some(event) = events.message().await? {
            print_event(&event);
            last_seen = Some(event);
        }
    }
    drop(events); // the connection is cut mid-stream
    let last_seen = last_seen.ok_or("the stream ended before its first event")?;
    println!("-- cut; resuming after #{}", last_seen.sequence);
    let mut rest = client
        .resume(&last_seen.stream_id, last_seen.sequence)
        .await?;
    while let Some(event) = rest.message().await? {
        print_event(&event);
    }
    Ok(())
}

fn print_event(event: &StreamResponse) {
    let payload = event.envelope.as_ref().and_then(Envelope::json_payload);
    println!(
        "#{} {:?} {}",
        event.sequence,
        event.kind(),
        payload.map_or_else(|| event.message.clone(), |p| p.to_string())
    );
}
