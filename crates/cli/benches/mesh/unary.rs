//! Unary: what one routed `AgentService.Invoke` costs. Direct to the agent, through the
//! bare proxy, and through the node with its trace journal on and off (and, with a Redis,
//! a node whose registry is there): p50/p99 at one call in flight, then req/s at 64 in
//! flight with the CPU the hop (node or proxy) and the agent spent per 1k calls.

use std::time::{Duration, Instant};

use agentmesh_proto::v1::{
    Envelope, InvokeRequest, agent_service_client::AgentServiceClient, envelope::Payload,
};
use tonic::transport::Channel;

use crate::{
    harness::{Settings, channel, cpu_seconds, micros, progress},
    report::{Check, Section, Table, Target, number},
    roles::AGENT,
    topology::Topology,
};

const PAYLOAD_BYTES: usize = 256;
const IN_FLIGHT: usize = 64;

pub(crate) fn request() -> InvokeRequest {
    InvokeRequest {
        envelope: Some(
            Envelope {
                r#type: "bench.echo".into(),
                payload: Some(Payload::Binary(vec![b'x'; PAYLOAD_BYTES])),
                ..Default::default()
            }
            .to(AGENT),
        ),
    }
}

async fn call(client: &mut AgentServiceClient<Channel>, request: &InvokeRequest) {
    let reply = client
        .invoke(request.clone())
        .await
        .unwrap_or_else(|status| panic!("invoke failed: {status}"))
        .into_inner();
    let payload = reply.envelope.and_then(|e| e.payload);
    assert!(
        matches!(&payload, Some(Payload::Binary(b)) if b.len() == PAYLOAD_BYTES),
        "the echo came back with the payload"
    );
}

/// What one path measured.
#[derive(Debug, Clone, Copy)]
struct Row {
    p50: Duration,
    p99: Duration,
    rate: f64,
    /// CPU ms per 1k calls of the node or proxy (none for the direct path).
    hop_cpu: Option<f64>,
    /// CPU ms per 1k calls of the agent.
    agent_cpu: Option<f64>,
}

/// Latency at one call in flight, then throughput at `IN_FLIGHT`.
async fn measure(address: &str, hop: Option<u32>, agent: u32, s: Settings) -> Row {
    let channel = channel(address).await;
    let mut client = AgentServiceClient::new(channel.clone());
    let request = request();
    for _ in 0..s.warmup {
        call(&mut client, &request).await;
    }
    let mut samples = Vec::with_capacity(s.calls);
    for _ in 0..s.calls {
        let started = Instant::now();
        call(&mut client, &request).await;
        samples.push(started.elapsed());
    }
    samples.sort();
    let percentile = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];

    let cpu = |pid: Option<u32>| pid.and_then(cpu_seconds);
    let (hop_before, agent_before) = (cpu(hop), cpu(Some(agent)));
    let started = Instant::now();
    let until = started + s.secs;
    let workers: Vec<_> = (0..IN_FLIGHT)
        .map(|_| {
            let mut client = AgentServiceClient::new(channel.clone());
            let request = request.clone();
            tokio::spawn(async move {
                let mut done = 0u64;
                while Instant::now() < until {
                    call(&mut client, &request).await;
                    done += 1;
                }
                done
            })
        })
        .collect();
    let mut calls = 0;
    for worker in workers {
        calls += worker.await.expect("a throughput worker panicked");
    }
    let elapsed = started.elapsed();
    let per_1k = |before: Option<f64>, pid: Option<u32>| {
        Some((cpu(pid)? - before?) * 1e3 / calls as f64 * 1e3)
    };
    Row {
        p50: percentile(0.50),
        p99: percentile(0.99),
        rate: calls as f64 / elapsed.as_secs_f64(),
        hop_cpu: per_1k(hop_before, hop),
        agent_cpu: per_1k(agent_before, Some(agent)),
    }
}

pub(crate) async fn run(mesh: &Topology, s: Settings) -> Section {
    let mut paths = vec![
        ("direct", &mesh.agent_address, None),
        ("proxy (tonic)", &mesh.proxy_address, Some(mesh.proxy.pid())),
        ("node", &mesh.node.address, Some(mesh.node.process.pid())),
        (
            "node, journal off",
            &mesh.quiet.address,
            Some(mesh.quiet.process.pid()),
        ),
    ];
    if let Some(shared) = &mesh.shared {
        paths.push((
            "node, registry on Redis",
            &shared.address,
            Some(shared.process.pid()),
        ));
    }
    let mut rows = Vec::new();
    for (name, address, hop) in paths {
        progress(
            "unary",
            format!(
                "{name}: {} calls, then {} s at {IN_FLIGHT} in flight",
                s.calls,
                s.secs.as_secs()
            ),
        );
        let row = measure(address, hop, mesh.agent.pid(), s).await;
        progress(
            "unary",
            format!(
                "{name}: p50 {:.0} µs, {:.0} req/s",
                micros(row.p50),
                row.rate
            ),
        );
        rows.push((name, row));
    }

    let direct = rows[0].1;
    let proxy = rows[1].1;
    let added = |row: Row| micros(row.p50) - micros(direct.p50);
    let cpu = |v: Option<f64>| v.map_or_else(|| "–".to_owned(), number);
    let mut table = Table::new(&[
        "path",
        "p50 µs",
        "added p50 µs",
        "p99 µs",
        "req/s @64",
        "hop CPU ms/1k",
        "agent CPU ms/1k",
    ]);
    for (name, row) in &rows {
        table.row(vec![
            (*name).to_owned(),
            number(micros(row.p50)),
            if *name == "direct" {
                "–".to_owned()
            } else {
                number(added(*row))
            },
            number(micros(row.p99)),
            number(row.rate),
            cpu(row.hop_cpu),
            cpu(row.agent_cpu),
        ]);
    }

    let mut checks = Vec::new();
    for (name, row) in &rows[2..4] {
        checks.push(Check::ratio(
            format!("unary, {name}: added p50"),
            added(*row),
            "µs",
            ("bare proxy", added(proxy)),
            Target::RatioAtMost(1.2),
        ));
        checks.push(Check::ratio(
            format!("unary, {name}: req/s at {IN_FLIGHT} in flight"),
            row.rate,
            "req/s",
            ("bare proxy", proxy.rate),
            Target::RatioAtLeast(0.9),
        ));
    }
    let mut notes = Vec::new();
    if let Some((_, shared)) = rows.get(4) {
        let quiet = rows[3].1;
        notes.push(format!(
            "Registry on Redis against the in-memory registry (both without the journal): p50 {:.2}×, req/s {:.2}×.",
            micros(shared.p50) / micros(quiet.p50),
            shared.rate / quiet.rate
        ));
    } else {
        notes.push(
            "AGENTMESH_TEST_REDIS is not set: no row for a node whose registry is in Redis."
                .to_owned(),
        );
    }
    Section {
        title: "Unary",
        setup: format!(
            "`AgentService.Invoke` of a {PAYLOAD_BYTES}-byte echo to one agent process. Latency over {} calls at 1 in flight (after {} warm-up), throughput over {} s at {IN_FLIGHT} in flight. \"Added\" is the path's p50 less the direct p50; CPU is milliseconds per 1k calls of the hop process (node or proxy) and of the agent, at {IN_FLIGHT} in flight.",
            s.calls,
            s.warmup,
            s.secs.as_secs()
        ),
        tables: vec![table],
        checks,
        notes,
    }
}
