//! Memory and idle: what `agentmesh serve` holds and spends while nothing happens.
//!
//! - cold start: process spawn to `grpc.health.v1.Health/Check` answering SERVING (median of
//!   several starts);
//! - idle RSS: a node started without demo agents (`serve --listen ADDR --data-dir DIR`,
//!   embedded store), a few seconds after it serves;
//! - per idle SSE subscriber: HTTP/1.1 clients holding `POST /v1/agents/{agent}/stream` open
//!   through the node to an agent in another process whose stream emits nothing;
//!   (node RSS with N open − node RSS before) / N, at two sizes;
//! - per open `AgentService.Converse`: the same for gRPC bidi conversations with the agent;
//! - idle CPU after load: node CPU over an idle window after a burst of calls, streams,
//!   conversations and submits, scaled to 10 s.
//!
//! The agent is this binary run as a child process (`mesh idle-agent NODE…`), so the node
//! holds only its own side of every stream. RSS is `VmRSS` of `/proc/<pid>/status`; CPU is
//! the sum of the node's threads' run time in `/proc/<pid>/task/*/schedstat` (nanoseconds;
//! `/proc/<pid>/stat`'s ticks are 10 ms, as coarse as the target), with the ticks noted too.

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use agentmesh_proto::v1::{
    ConverseOpen, ConverseRequest, ConverseResponse, Envelope,
    agent_service_client::AgentServiceClient, converse_request,
};
use agentmesh_sdk::{Agent, Context, Conversation, StreamSink};

use crate::{
    harness::{
        Pinning, Process, Settings, cpu_seconds, progress, rss_bytes, start_child, start_node,
    },
    report::{Check, Section, Table, number},
    roles::serve_registered,
};
use futures::StreamExt;
use tonic::{
    Request, Status, Streaming,
    transport::{Channel, Endpoint},
};

const AGENT: &str = "bench-idle";
/// The payload type that makes the agent's stream wait (emit nothing) until cancelled.
const WAIT: &str = "bench.wait";
const KIB: f64 = 1024.0;
const MIB: f64 = 1024.0 * 1024.0;
/// Conversations per client connection (the node's HTTP/2 connections take 200 at most).
const STREAMS_PER_CONNECTION: usize = 100;
/// Limits lifted on the measured nodes, so that 10k streams are not refused.
const LIMITS: &[&str] = &[
    "--set",
    "connections.max_connections=40000",
    "--set",
    "router.max_long_lived=40000",
    "--set",
    "router.max_long_lived_per_instance=40000",
    "--set",
    "replay.max_streams=40000",
];

// ---------------------------------------------------------------------------
// The child process: an agent whose streams and conversations wait.

/// Echoes calls; a stream of type [`WAIT`] emits nothing until the caller goes away, any
/// other stream one progress event and the result; a conversation reads until the peer ends.
#[derive(Debug, Clone)]
struct Idle;

#[tonic::async_trait]
impl Agent for Idle {
    async fn invoke(&self, _ctx: Context, request: Envelope) -> Result<Envelope, Status> {
        Ok(request)
    }

    async fn stream(
        &self,
        ctx: Context,
        request: Envelope,
        events: StreamSink,
    ) -> Result<Envelope, Status> {
        if request.r#type == WAIT {
            ctx.cancelled().await;
            return Err(Status::cancelled("the caller went away"));
        }
        events.progress(0.5, "half way").await?;
        Ok(request)
    }

    async fn converse(&self, _ctx: Context, mut conversation: Conversation) -> Result<(), Status> {
        while conversation.recv().await.is_some() {}
        Ok(())
    }
}

/// `mesh idle-agent NODE…`: the waiting agent, registered with every node.
pub(crate) async fn serve_agent(nodes: &[String]) {
    serve_registered(AGENT, Idle, nodes).await;
}

// ---------------------------------------------------------------------------
// Processes and what /proc says about them.

/// Raises this process's open-file soft limit to its hard limit (children inherit it): 10k
/// client sockets here, 10k on the node. Returns the soft limit in force.
fn raise_open_file_limit() -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: limit.maximum,
                maximum: limit.maximum,
            },
        );
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// `agentmesh serve --listen ADDR --data-dir DIR` plus `extra`, unpinned.
fn spawn_node(data: &std::path::Path, extra: &[&str]) -> (Process, String) {
    start_node(Pinning(false), "node", data, extra)
}

/// The agent child, registered with every node of `nodes`.
fn spawn_agent(nodes: &[&str]) -> Process {
    let mut args = vec!["idle-agent"];
    args.extend_from_slice(nodes);
    start_child(Pinning(false), "idle agent", &args).0
}

fn rss(pid: u32) -> u64 {
    rss_bytes(pid).expect("the node is running")
}

/// CPU used by `pid` so far: (seconds from the threads' schedstat, in ns; seconds from
/// `/proc/<pid>/stat`'s user + system ticks). Threads that have exited count only in the
/// second.
fn cpu(pid: u32) -> (f64, f64) {
    let mut nanos = 0u64;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            if let Ok(stat) = std::fs::read_to_string(task.path().join("schedstat")) {
                nanos += stat
                    .split_whitespace()
                    .next()
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    let ticks = cpu_seconds(pid).expect("the node is running");
    (nanos as f64 / 1e9, ticks)
}

/// Waits until the node's health service answers SERVING; panics after 30 s.
async fn wait_serving(address: &str) {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let started = Instant::now();
    let endpoint = Endpoint::from_shared(format!("http://{address}")).unwrap();
    loop {
        if let Ok(channel) = endpoint.connect().await {
            let mut health = HealthClient::new(channel);
            loop {
                match health.check(HealthCheckRequest::default()).await {
                    Ok(reply) if reply.get_ref().status == ServingStatus::Serving as i32 => {
                        return;
                    }
                    Ok(_) => tokio::time::sleep(Duration::from_millis(1)).await,
                    Err(_) => break,
                }
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{address} did not serve within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Waits until a call through `address` reaches the agent.
async fn wait_routed(address: &str) {
    let started = Instant::now();
    let client = reqwest::Client::new();
    loop {
        let reply = client
            .post(format!("http://{address}/v1/agents/{AGENT}/invoke"))
            .body(r#"{"json":{}}"#)
            .send()
            .await;
        if reply.is_ok_and(|r| r.status().is_success()) {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{address} did not route to the agent within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------
// The measurements. Each returns plain numbers.

/// Median time from spawning a node to its health service answering SERVING, over `runs`
/// starts, each with a fresh data directory.
async fn cold_start(runs: usize) -> Duration {
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let data = tempfile::tempdir().unwrap();
        let started = Instant::now();
        let (node, address) = spawn_node(data.path(), &[]);
        wait_serving(&address).await;
        times.push(started.elapsed());
        drop(node);
    }
    times.sort();
    times[times.len() / 2]
}

/// Resident memory of a node without demo agents, `settle` after it answers SERVING.
async fn idle_rss(settle: Duration) -> u64 {
    let data = tempfile::tempdir().unwrap();
    let (node, address) = spawn_node(data.path(), &[]);
    wait_serving(&address).await;
    std::thread::sleep(settle);
    rss(node.pid())
}

/// Opens one SSE subscriber to the waiting stream; its response head is read by
/// [`read_head`].
fn subscribe(address: &str) -> TcpStream {
    const BODY: &str = r#"{"type":"bench.wait","json":{}}"#;
    let mut socket = TcpStream::connect(address).expect("connect to the node");
    write!(
        socket,
        "POST /v1/agents/{AGENT}/stream HTTP/1.1\r\nHost: node\r\n\
         Content-Type: application/json\r\nX-Timeout-Ms: 3600000\r\n\
         Content-Length: {}\r\n\r\n{BODY}",
        BODY.len()
    )
    .expect("send the request");
    socket
}

/// Reads a subscriber's response head: the stream is open through the node to the agent.
fn read_head(socket: &mut TcpStream) {
    socket
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = socket.read(&mut byte).expect("read the response head");
        assert_eq!(
            n,
            1,
            "the node closed a subscriber: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "subscriber refused: {}",
        String::from_utf8_lossy(&head)
    );
}

/// Opens subscribers until `sockets` holds `count`, in batches (so the accept queue keeps up).
fn subscribe_up_to(address: &str, sockets: &mut Vec<TcpStream>, count: usize) {
    while sockets.len() < count {
        let batch = (count - sockets.len()).min(250);
        let mut opened: Vec<TcpStream> = (0..batch).map(|_| subscribe(address)).collect();
        for socket in &mut opened {
            read_head(socket);
        }
        sockets.append(&mut opened);
    }
}

/// Node RSS per idle SSE subscriber, in bytes, at each of `sizes` open (ascending).
fn sse_cost(address: &str, pid: u32, sizes: &[usize], settle: Duration) -> Vec<(usize, f64)> {
    // Warm-up: the first streams allocate for good (the agent's channel, lazily built tables).
    let mut warm = Vec::new();
    subscribe_up_to(address, &mut warm, 50);
    drop(warm);
    std::thread::sleep(settle * 2);
    let before = rss(pid);
    let mut sockets = Vec::new();
    let mut costs = Vec::new();
    for &size in sizes {
        subscribe_up_to(address, &mut sockets, size);
        std::thread::sleep(settle);
        costs.push((size, rss(pid).saturating_sub(before) as f64 / size as f64));
    }
    costs
}

/// A conversation that has sent its `open` (with an hour between heartbeats) and nothing
/// since; the node has opened it with the agent once this returns.
async fn converse(client: &mut AgentServiceClient<Channel>) -> Streaming<ConverseResponse> {
    let open = ConverseRequest {
        frame: Some(converse_request::Frame::Open(ConverseOpen {
            target: AGENT.into(),
            heartbeat_interval: Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
        })),
    };
    let frames = futures::stream::once(async move { open }).chain(futures::stream::pending());
    client
        .converse(Request::new(frames))
        .await
        .unwrap_or_else(|status| panic!("converse refused: {status}"))
        .into_inner()
}

/// Node RSS per open conversation, in bytes, at each of `sizes` open (ascending).
async fn converse_cost(
    address: &str,
    pid: u32,
    sizes: &[usize],
    settle: Duration,
) -> Vec<(usize, f64)> {
    let endpoint = Endpoint::from_shared(format!("http://{address}"))
        .unwrap()
        .tcp_nodelay(true);
    let mut clients: Vec<AgentServiceClient<Channel>> = Vec::new();
    let mut open = Vec::new();
    let mut open_up_to = async |open: &mut Vec<Streaming<ConverseResponse>>, count: usize| {
        let needed = count.div_ceil(STREAMS_PER_CONNECTION);
        while clients.len() < needed {
            let channel = endpoint.connect().await.expect("connect to the node");
            clients.push(AgentServiceClient::new(channel));
        }
        let batch: Vec<_> = (open.len()..count)
            .map(|i| clients[i / STREAMS_PER_CONNECTION].clone())
            .collect();
        let mut opened: Vec<_> = futures::stream::iter(batch)
            .map(|mut client| async move { converse(&mut client).await })
            .buffer_unordered(64)
            .collect()
            .await;
        open.append(&mut opened);
    };
    open_up_to(&mut open, 50).await;
    open.clear();
    tokio::time::sleep(settle * 2).await;
    let before = rss(pid);
    let mut costs = Vec::new();
    for &size in sizes {
        open_up_to(&mut open, size).await;
        tokio::time::sleep(settle).await;
        costs.push((size, rss(pid).saturating_sub(before) as f64 / size as f64));
    }
    costs
}

/// Node CPU (schedstat seconds, stat seconds) over `idle` of nothing, after a burst of
/// calls, finished streams, conversations and submits, and a short pause for it to end.
async fn idle_cpu_after_load(address: &str, pid: u32, idle: Duration) -> (f64, f64) {
    let http = reqwest::Client::new();
    let pad = "x".repeat(200);
    let base = format!("http://{address}");
    for (path, count) in [
        (format!("/v1/agents/{AGENT}/invoke"), 2000),
        (format!("/v1/agents/{AGENT}/stream"), 200),
        ("/v1/queues/bench-idle/messages".to_owned(), 2000),
    ] {
        let url = format!("{base}{path}");
        futures::stream::iter(0..count)
            .map(|i| {
                let request = http
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(format!(r#"{{"json":{{"i":{i},"pad":"{pad}"}}}}"#));
                async move {
                    let reply = request.send().await.expect("burst call");
                    assert!(reply.status().is_success(), "{}", reply.status());
                    reply.bytes().await.expect("burst reply body");
                }
            })
            .buffer_unordered(16)
            .collect::<()>()
            .await;
    }
    let channel = Endpoint::from_shared(base)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = AgentServiceClient::new(channel);
    let mut conversations = Vec::new();
    for _ in 0..50 {
        conversations.push(converse(&mut client).await);
    }
    drop(conversations);
    drop(client);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (ns_before, ticks_before) = cpu(pid);
    tokio::time::sleep(idle).await;
    let (ns_after, ticks_after) = cpu(pid);
    // A thread that exits within the window (an idle blocking-pool thread) takes its run time
    // out of the schedstat sum; the ticks, printed beside it, keep it.
    ((ns_after - ns_before).max(0.0), ticks_after - ticks_before)
}

// ---------------------------------------------------------------------------

/// Every memory and idle figure, each on a fresh node so that baselines stay clean.
pub(crate) async fn run(s: Settings) -> Section {
    let (small, large) = s.subscribers;
    let sizes = [small, large];
    let (starts, settle) = if s.quick {
        (3, Duration::from_millis(500))
    } else {
        (9, Duration::from_secs(3))
    };
    let idle = Duration::from_secs(s.idle_secs);
    let open_files = raise_open_file_limit();

    progress("memory", format!("cold start, median of {starts}"));
    let cold = cold_start(starts).await;
    progress("memory", "idle RSS");
    let idle_rss = idle_rss(settle).await;

    // One node per measurement; one agent process registered with all three.
    let data = tempfile::tempdir().unwrap();
    let (sse_node, sse_address) = spawn_node(&data.path().join("sse"), LIMITS);
    let (converse_node, converse_address) = spawn_node(&data.path().join("converse"), LIMITS);
    let (cpu_node, cpu_address) = spawn_node(&data.path().join("cpu"), &[]);
    for address in [&sse_address, &converse_address, &cpu_address] {
        wait_serving(address).await;
    }
    let agent = spawn_agent(&[&sse_address, &converse_address, &cpu_address]);
    for address in [&sse_address, &converse_address, &cpu_address] {
        wait_routed(address).await;
    }

    progress(
        "memory",
        format!("idle SSE subscribers: {small}, then {large}"),
    );
    let sse = {
        let (address, pid) = (sse_address.clone(), sse_node.pid());
        tokio::task::spawn_blocking(move || sse_cost(&address, pid, &sizes, settle))
            .await
            .unwrap()
    };
    drop(sse_node);
    progress(
        "memory",
        format!("open conversations: {small}, then {large}"),
    );
    let conversations = converse_cost(&converse_address, converse_node.pid(), &sizes, settle).await;
    drop(converse_node);
    progress(
        "memory",
        format!("a burst of load, then {} idle seconds", idle.as_secs()),
    );
    let (cpu_seconds, cpu_ticks) = idle_cpu_after_load(&cpu_address, cpu_node.pid(), idle).await;
    drop((cpu_node, agent));
    let per_10s = 10.0 / idle.as_secs_f64();

    let mut table = Table::new(&["figure", "value"]);
    table.row(vec![
        format!("cold start to SERVING (median of {starts})"),
        format!("{} ms", number(cold.as_secs_f64() * 1e3)),
    ]);
    table.row(vec![
        "idle RSS, no demo agents".to_owned(),
        format!("{} MiB", number(idle_rss as f64 / MIB)),
    ]);
    for (size, cost) in &sse {
        table.row(vec![
            format!("RSS per idle SSE subscriber, {size} open"),
            format!("{} KiB", number(cost / KIB)),
        ]);
    }
    for (size, cost) in &conversations {
        table.row(vec![
            format!("RSS per open Converse, {size} open"),
            format!("{} KiB", number(cost / KIB)),
        ]);
    }
    table.row(vec![
        "idle CPU after load, per 10 s (schedstat)".to_owned(),
        format!("{} s", number(cpu_seconds * per_10s)),
    ]);
    table.row(vec![
        "idle CPU after load, per 10 s (/proc stat ticks)".to_owned(),
        format!("{} s", number(cpu_ticks * per_10s)),
    ]);

    let mut checks = vec![
        Check::absolute(
            "cold start to SERVING",
            cold.as_secs_f64() * 1e3,
            "ms",
            100.0,
        ),
        Check::absolute(
            "idle RSS, no demo agents",
            idle_rss as f64 / MIB,
            "MiB",
            20.0,
        ),
    ];
    if let Some((size, cost)) = sse.last() {
        checks.push(Check::absolute(
            format!("RSS per idle SSE subscriber, {size} open"),
            cost / KIB,
            "KiB",
            10.0,
        ));
    }
    checks.push(Check::absolute(
        "idle CPU after load, per 10 s",
        cpu_seconds * per_10s,
        "s",
        0.01,
    ));
    Section {
        title: "Memory and idle",
        setup: format!(
            "Nodes without demo agents, embedded store, unpinned; open-file limit {open_files}. Cold start: spawn to `grpc.health.v1.Health/Check` answering SERVING. Idle RSS: {} s after SERVING. Subscribers: HTTP/1.1 clients holding `POST /v1/agents/{{agent}}/stream` open through the node to an agent in another process whose stream emits nothing; conversations: `AgentService.Converse` streams (100 per HTTP/2 connection) that sent their `open`; cost = (node RSS with N open − before) / N. Idle CPU: the node's CPU over {} idle seconds after a burst of calls, streams, conversations and submits, scaled to 10 s.",
            settle.as_secs_f64(),
            idle.as_secs()
        ),
        tables: vec![table],
        checks,
        notes: Vec::new(),
    }
}
