//! Streaming: events per second of one agent's `Stream` read to its end, through the bare
//! proxy and through the node over gRPC, and through the node's HTTP gateway as
//! Server-Sent Events; with the CPU the hop spent per 1k events.

use std::time::{Duration, Instant};

use agentmesh_proto::v1::{Envelope, StreamRequest, agent_service_client::AgentServiceClient};
use futures::StreamExt;
use serde_json::json;

use crate::{
    harness::{Settings, channel, cpu_seconds, median, progress},
    report::{Check, Section, Table, Target, number},
    roles::AGENT,
    topology::Topology,
};

fn request(n: u64) -> Envelope {
    Envelope::json("tick.request", json!({ "n": n })).to(AGENT)
}

/// Reads one stream over gRPC; returns the events (partials and the result) it carried.
async fn grpc_round(address: &str, n: u64) -> u64 {
    let mut client = AgentServiceClient::new(channel(address).await);
    let mut call = tonic::Request::new(StreamRequest {
        envelope: Some(request(n)),
        ..Default::default()
    });
    call.set_timeout(Duration::from_secs(600));
    let mut events = client
        .stream(call)
        .await
        .expect("stream starts")
        .into_inner();
    let mut count = 0;
    while let Some(event) = events.next().await {
        event.expect("stream event");
        count += 1;
    }
    count
}

/// Reads one stream as SSE through the gateway, counting `id:` lines in the raw bytes (what
/// a minimal SSE client does).
async fn sse_round(http: &reqwest::Client, address: &str, n: u64) -> u64 {
    let body = agentmesh_proto::json::to_json(&request(n)).unwrap();
    let response = http
        .post(format!("http://{address}/v1/agents/{AGENT}/stream"))
        .header("x-timeout-ms", "600000")
        .json(&body)
        .send()
        .await
        .expect("SSE request");
    assert_eq!(response.status().as_u16(), 200, "SSE stream starts");
    let mut bytes = response.bytes_stream();
    let mut count = 0;
    // Whether the next byte starts a line, and how much of "id:" matched.
    let mut line_start = true;
    let mut matched = 0;
    while let Some(chunk) = bytes.next().await {
        for &byte in chunk.expect("SSE bytes").iter() {
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
    count
}

#[derive(Debug, Clone, Copy)]
enum Path {
    Grpc,
    Sse,
}

/// Events/s (median of the rounds) and the hop's CPU ms per 1k events.
async fn measure(path: Path, address: &str, hop: u32, s: Settings) -> (f64, f64) {
    let http = reqwest::Client::new();
    let round = |n| {
        let http = http.clone();
        async move {
            match path {
                Path::Grpc => grpc_round(address, n).await,
                Path::Sse => sse_round(&http, address, n).await,
            }
        }
    };
    // Warm up connections and code paths.
    round(s.events / 10).await;
    let mut rates = Vec::new();
    let mut cpu = Vec::new();
    for _ in 0..s.rounds {
        let before = cpu_seconds(hop).expect("hop process");
        let started = Instant::now();
        let count = round(s.events).await;
        let elapsed = started.elapsed();
        assert_eq!(count, s.events + 1, "every event and the result arrive");
        rates.push(count as f64 / elapsed.as_secs_f64());
        cpu.push((cpu_seconds(hop).expect("hop process") - before) * 1e6 / count as f64);
    }
    (median(rates), median(cpu))
}

pub(crate) async fn run(mesh: &Topology, s: Settings) -> Section {
    let paths = [
        (
            "gRPC Stream, bare proxy",
            Path::Grpc,
            &mesh.proxy_address,
            mesh.proxy.pid(),
        ),
        (
            "gRPC Stream, node",
            Path::Grpc,
            &mesh.node.address,
            mesh.node.process.pid(),
        ),
        (
            "SSE, node",
            Path::Sse,
            &mesh.node.address,
            mesh.node.process.pid(),
        ),
    ];
    let mut rows = Vec::new();
    for (name, path, address, hop) in paths {
        progress(
            "streaming",
            format!("{name}: {} rounds of {} events", s.rounds, s.events),
        );
        let (rate, cpu) = measure(path, address, hop, s).await;
        progress("streaming", format!("{name}: {rate:.0} events/s"));
        rows.push((name, rate, cpu));
    }
    let mut table = Table::new(&["path", "events/s", "hop CPU ms/1k events"]);
    for (name, rate, cpu) in &rows {
        table.row(vec![(*name).to_owned(), number(*rate), number(*cpu)]);
    }
    let [(_, proxy, _), (_, grpc, _), (_, sse, _)] = [rows[0], rows[1], rows[2]];
    Section {
        title: "Streaming",
        setup: format!(
            "One `AgentService.Stream` of {} small JSON partial results and a result, read to its end; median of {} rounds. SSE is the node's `POST /v1/agents/{{agent}}/stream`, counted by its `id:` lines.",
            s.events, s.rounds
        ),
        tables: vec![table],
        checks: vec![
            Check::ratio(
                "streaming, gRPC through the node",
                grpc,
                "events/s",
                ("bare proxy", proxy),
                Target::RatioAtLeast(0.8),
            ),
            Check::ratio(
                "streaming, SSE through the node",
                sse,
                "events/s",
                ("gRPC through the node", grpc),
                Target::RatioAtLeast(0.8),
            ),
        ],
        notes: Vec::new(),
    }
}
