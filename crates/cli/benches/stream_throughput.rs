//! Stream throughput: events per second of one agent's stream read through
//! the node over gRPC (`AgentService.Stream`) and over the HTTP gateway
//! (Server-Sent Events), in the same run, and their ratio.
//!
//! `cargo bench -p agentmesh --bench stream_throughput`
//! (`AGENTMESH_BENCH_EVENTS` events per stream, `AGENTMESH_BENCH_ROUNDS` rounds;
//! `AGENTMESH_BENCH_ONLY=grpc|sse` runs one side, e.g. under a profiler).

use std::time::{Duration, Instant};

use agentmesh_proto::v1::{Envelope, StreamRequest, agent_service_client::AgentServiceClient};
use agentmesh_sdk::{Agent, Context, StreamSink};
use agentmesh_tests::{TestNode, card, start_agent};
use futures::StreamExt;
use serde_json::json;
use tonic::Status;

/// Emits `{"n": N}` small partial results as fast as it can, then a result.
struct Firehose;

#[tonic::async_trait]
impl Agent for Firehose {
    async fn invoke(&self, _ctx: Context, request: Envelope) -> Result<Envelope, Status> {
        Ok(request)
    }

    async fn stream(
        &self,
        _ctx: Context,
        request: Envelope,
        events: StreamSink,
    ) -> Result<Envelope, Status> {
        let n = request.json_payload().unwrap_or_default()["n"]
            .as_u64()
            .unwrap_or(1000);
        for i in 0..n {
            events
                .partial(Envelope::json("tick", json!({ "i": i })))
                .await?;
        }
        Ok(Envelope::json("done", json!({ "n": n })))
    }
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn request(n: u64) -> Envelope {
    Envelope::json("tick.request", json!({ "n": n })).to("firehose")
}

/// Reads one stream over gRPC; returns (events, elapsed).
async fn grpc_round(node: &TestNode, n: u64) -> (u64, Duration) {
    let mut client = AgentServiceClient::new(node.channel().await);
    let started = Instant::now();
    let mut call = tonic::Request::new(StreamRequest {
        envelope: Some(request(n)),
        ..Default::default()
    });
    call.set_timeout(Duration::from_secs(600));
    let mut events = client.stream(call).await.unwrap().into_inner();
    let mut count = 0;
    while let Some(event) = events.next().await {
        event.unwrap();
        count += 1;
    }
    (count, started.elapsed())
}

/// Reads one stream as SSE through the gateway, counting `id:` lines in the
/// raw bytes (what a minimal SSE client does); returns (events, elapsed).
async fn sse_round(http: &reqwest::Client, node: &TestNode, n: u64) -> (u64, Duration) {
    let started = Instant::now();
    let body = agentmesh_proto::json::to_json(&request(n)).unwrap();
    let response = http
        .post(format!("http://{}/v1/agents/firehose/stream", node.addr()))
        .header("x-timeout-ms", "600000")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let mut bytes = response.bytes_stream();
    let mut count = 0;
    // Whether the next byte starts a line, and how much of "id:" matched.
    let mut line_start = true;
    let mut matched = 0;
    while let Some(chunk) = bytes.next().await {
        for &byte in chunk.unwrap().iter() {
            if line_start || matched > 0 {
                if byte == b"id:"[matched] {
                    matched += 1;
                    if matched == 3 {
                        count += 1;
                        matched = 0;
                    }
                } else {
                    matched = 0;
                }
            }
            line_start = byte == b'\n';
        }
    }
    (count, started.elapsed())
}

fn rate(events: u64, elapsed: Duration) -> f64 {
    events as f64 / elapsed.as_secs_f64()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let n = env_or("AGENTMESH_BENCH_EVENTS", 20_000);
        let rounds = env_or("AGENTMESH_BENCH_ROUNDS", 5).max(1);
        let node = TestNode::start().await;
        let agent = start_agent(&node, card("firehose"), Firehose).await;
        let http = reqwest::Client::new();

        // Warm up connections and code paths.
        grpc_round(&node, 1000).await;
        sse_round(&http, &node, 1000).await;

        let only = std::env::var("AGENTMESH_BENCH_ONLY").unwrap_or_default();
        let (mut grpc, mut sse) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            if only != "sse" {
                let (count, elapsed) = grpc_round(&node, n).await;
                assert_eq!(count, n + 1, "gRPC: every event");
                grpc.push(rate(count, elapsed));
            }
            if only != "grpc" {
                let (count, elapsed) = sse_round(&http, &node, n).await;
                assert_eq!(count, n + 1, "SSE: every event");
                sse.push(rate(count, elapsed));
            }
        }
        if grpc.is_empty() || sse.is_empty() {
            let (name, rates) = if grpc.is_empty() {
                ("SSE", sse)
            } else {
                ("gRPC", grpc)
            };
            println!("{name}: median {:.0} events/s", median(rates));
            agent.shutdown().await;
            node.stop().await;
            return;
        }
        let (grpc_rate, sse_rate) = (median(grpc.clone()), median(sse.clone()));
        println!();
        println!(
            "stream throughput: {} events per stream, {rounds} rounds, median",
            n + 1
        );
        println!(
            "{:<28} {:>12} {:>12} {:>12}",
            "path", "events/s", "min", "max"
        );
        for (name, rates, median) in [
            ("gRPC AgentService.Stream", &grpc, grpc_rate),
            ("SSE via HTTP gateway", &sse, sse_rate),
        ] {
            let min = rates.iter().copied().fold(f64::INFINITY, f64::min);
            let max = rates.iter().copied().fold(0.0, f64::max);
            println!("{name:<28} {median:>12.0} {min:>12.0} {max:>12.0}");
        }
        println!(
            "ratio gateway/gRPC: {:.2} (target >= 0.80)",
            sse_rate / grpc_rate
        );

        agent.shutdown().await;
        node.stop().await;
    });
}
