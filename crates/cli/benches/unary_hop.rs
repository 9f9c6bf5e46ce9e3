//! Unary hop cost: what one routed `AgentService.Invoke` costs. Four (or five) paths to the same echo
//! agent process (256-byte payload), measured in one run:
//!
//! - direct: client → agent;
//! - proxy: client → a bare tonic pass-through proxy (forwards `Invoke` on one pooled
//!   channel; no routing, no deadlines) → agent;
//! - node: client → `agentmesh serve` → agent;
//! - node, journal off: the same with `--set trace.journal=false`;
//! - node, Redis registry (with `AGENTMESH_TEST_REDIS` set): a node whose registry and queue
//!   are in Redis, its journal off (compared with the journal-off row); routing reads the
//!   registry from its local cache.
//!
//! Each path gets p50/p99 latency at one call in flight (after a warm-up) and req/s at 64 in
//! flight for a fixed time, with the CPU the hop (node or proxy) and the agent spent per 1k
//! calls, read from `/proc/<pid>/stat`. The agent and the proxy are this binary run as child
//! processes (`unary_hop agent …`, `unary_hop proxy …`), so each has a pid of its own. Where
//! `taskset` works, the node, agent and proxy run on core 0 and the client on core 1.
//!
//! ```text
//! cargo bench -p agentmesh --bench unary_hop
//! ```
//!
//! Knobs: `AGENTMESH_BENCH_CALLS` (latency samples per path, default 5000),
//! `AGENTMESH_BENCH_SECS` (seconds per throughput row, default 5), `AGENTMESH_BENCH_QUICK`
//! (set, or `--quick`: 200 calls and 1 s per row, a smoke pass that checks every path works).

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    pin::Pin,
    process::{Child, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use agentmesh_proto::v1::{
    ConverseRequest, ConverseResponse, Envelope, InvokeRequest, InvokeResponse, StreamRequest,
    StreamResponse,
    agent_service_client::AgentServiceClient,
    agent_service_server::{AgentService, AgentServiceServer},
    envelope::Payload,
};
use agentmesh_sdk::{Agent, AgentRuntime, Context};
use futures::Stream;
use tonic::{
    Request, Response, Status, Streaming,
    transport::{Channel, Endpoint, server::TcpIncoming},
};

// The node runs on mimalloc; the proxy and the agent (this binary) do too, so the hops differ
// in what they do, not in their allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const PAYLOAD_BYTES: usize = 256;
const IN_FLIGHT: usize = 64;
const AGENT: &str = "bench-echo";

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Debug, Clone, Copy)]
struct Settings {
    calls: usize,
    warmup: usize,
    secs: Duration,
}

impl Settings {
    fn from_env() -> Self {
        let quick = std::env::var_os("AGENTMESH_BENCH_QUICK").is_some()
            || std::env::args().any(|a| a == "--quick");
        if quick {
            return Self {
                calls: 200,
                warmup: 50,
                secs: Duration::from_secs(1),
            };
        }
        let calls = env_or("AGENTMESH_BENCH_CALLS", 5000).max(1) as usize;
        Self {
            calls,
            warmup: (calls / 5).clamp(100, 2000),
            secs: Duration::from_secs(env_or("AGENTMESH_BENCH_SECS", 5).max(1)),
        }
    }
}

// ---------------------------------------------------------------------------
// Child processes: the agent and the proxy.

/// Answers every call with its input.
struct Echo;

#[tonic::async_trait]
impl Agent for Echo {
    async fn invoke(&self, _ctx: Context, request: Envelope) -> Result<Envelope, Status> {
        Ok(request)
    }
}

/// `unary_hop agent NODE_A NODE_B`: one echo agent registered with both nodes. The second
/// runtime only advertises the first one's endpoint, so every path reaches the same server.
async fn serve_agent(nodes: &[String]) {
    let card = agentmesh_tests::card(AGENT);
    let first = AgentRuntime::new(card.clone(), Echo)
        .node(nodes[0].clone())
        .start()
        .await
        .expect("agent starts");
    first.registered(1).await;
    let mut others = Vec::new();
    for node in &nodes[1..] {
        let other = AgentRuntime::new(card.clone(), Echo)
            .node(node.clone())
            .advertise(first.card().endpoint.clone())
            .start()
            .await
            .expect("agent starts");
        other.registered(1).await;
        others.push(other);
    }
    announce(first.address());
    wait_for_parent().await;
}

/// A bare pass-through: `Invoke` forwarded as is on one pooled channel.
struct PassThrough {
    agent: AgentServiceClient<Channel>,
}

type Unsupported<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for PassThrough {
    async fn invoke(
        &self,
        request: Request<InvokeRequest>,
    ) -> Result<Response<InvokeResponse>, Status> {
        let reply = self.agent.clone().invoke(request.into_inner()).await?;
        Ok(Response::new(reply.into_inner()))
    }

    type StreamStream = Unsupported<StreamResponse>;

    async fn stream(
        &self,
        _request: Request<StreamRequest>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        Err(Status::unimplemented(
            "the bench proxy forwards Invoke only",
        ))
    }

    type ConverseStream = Unsupported<ConverseResponse>;

    async fn converse(
        &self,
        _request: Request<Streaming<ConverseRequest>>,
    ) -> Result<Response<Self::ConverseStream>, Status> {
        Err(Status::unimplemented(
            "the bench proxy forwards Invoke only",
        ))
    }
}

/// `unary_hop proxy AGENT`: the pass-through proxy in front of the agent.
async fn serve_proxy(agent: &str) {
    // One connection for every call, with TCP_NODELAY, like the node's pool to agents.
    let channel = Endpoint::from_shared(format!("http://{agent}"))
        .expect("agent address")
        .tcp_nodelay(true)
        .connect()
        .await
        .expect("proxy connects to the agent");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    announce(listener.local_addr().unwrap());
    let service = AgentServiceServer::new(PassThrough {
        agent: AgentServiceClient::new(channel),
    });
    tokio::select! {
        // TCP_NODELAY on the accepted sockets, as the node and the agent runtime set it.
        served = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true))) => {
            served.expect("proxy serves")
        }
        () = wait_for_parent() => {}
    }
}

/// Tells the parent where this child serves: one line on stdout.
fn announce(address: SocketAddr) {
    println!("serving {address}");
}

/// Returns when the parent closes our stdin (it is done, or it died).
async fn wait_for_parent() {
    tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
    })
    .await
    .unwrap();
}

// ---------------------------------------------------------------------------
// The parent: processes, pinning, measurement.

/// A child process, killed when dropped.
struct Process {
    child: Child,
    name: &'static str,
}

impl Process {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether server processes go on core 0 and the client on core 1.
#[derive(Debug, Clone, Copy)]
struct Pinning(bool);

impl Pinning {
    /// Pins this process (the client) to core 1 when `taskset` can place work on both cores;
    /// runs before the client's runtime exists, so all its threads inherit the mask.
    fn set_up() -> Self {
        let works = |core: &str| {
            Command::new("taskset")
                .args(["-c", core, "true"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !(works("0") && works("1")) {
            return Self(false);
        }
        let pinned = Command::new("taskset")
            .args(["-a", "-p", "-c", "1", &std::process::id().to_string()])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        Self(pinned)
    }

    /// A command for `program`, on core 0 when pinning.
    fn server(self, program: &str) -> Command {
        if self.0 {
            let mut command = Command::new("taskset");
            command.args(["-c", "0", program]);
            command
        } else {
            Command::new(program)
        }
    }
}

fn spawn(name: &'static str, mut command: Command, stdout: Stdio) -> Process {
    let child = command
        .stdin(Stdio::piped())
        .stdout(stdout)
        .spawn()
        .unwrap_or_else(|e| panic!("{name} starts: {e}"));
    Process { child, name }
}

/// Reads the `serving ADDR` line a child prints once it is ready.
fn served_address(process: &mut Process) -> String {
    let stdout: ChildStdout = process.child.stdout.take().expect("child stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read the child's address");
    line.strip_prefix("serving ")
        .unwrap_or_else(|| panic!("{} did not start: {line:?}", process.name))
        .trim()
        .to_owned()
}

fn free_address() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("127.0.0.1:{port}")
}

fn start_node(
    pinning: Pinning,
    name: &'static str,
    data: &std::path::Path,
    extra: &[&str],
) -> (Process, String) {
    let address = free_address();
    let mut command = pinning.server(env!("CARGO_BIN_EXE_agentmesh"));
    command
        .args(["serve", "--listen", &address, "--data-dir"])
        .arg(data)
        .args(extra)
        .env("AGENTMESH_LOG", "warn");
    (spawn(name, command, Stdio::null()), address)
}

fn start_child(pinning: Pinning, name: &'static str, args: &[&str]) -> (Process, String) {
    let exe = std::env::current_exe().expect("own path");
    let mut command = pinning.server(exe.to_str().expect("utf-8 path"));
    command.args(args);
    let mut process = spawn(name, command, Stdio::piped());
    let address = served_address(&mut process);
    (process, address)
}

async fn channel(address: &str) -> Channel {
    Endpoint::from_shared(format!("http://{address}"))
        .unwrap()
        .tcp_nodelay(true)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect to {address}: {e}"))
}

fn request() -> InvokeRequest {
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

/// Waits until a call through `address` reaches the agent (the node serving, the agent
/// registered).
async fn wait_ready(address: &str) {
    let started = Instant::now();
    let request = request();
    loop {
        if let Ok(channel) = Endpoint::from_shared(format!("http://{address}"))
            .unwrap()
            .connect()
            .await
        {
            if AgentServiceClient::new(channel)
                .invoke(request.clone())
                .await
                .is_ok()
            {
                return;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{address} did not route to the agent within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// CPU seconds (user + system) a process has used, from `/proc/<pid>/stat` (in `USER_HZ`,
/// 100 per second on Linux).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split(' ').collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
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

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn print_table(rows: &[(&str, Row)]) {
    let direct = rows[0].1;
    let cpu = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"));
    println!(
        "{:<20} {:>8} {:>8} {:>8} {:>9} {:>8} {:>8} {:>8}",
        "path", "p50 µs", "x direct", "p99 µs", "req/s@64", "x direct", "hop CPU", "agt CPU"
    );
    for (name, row) in rows {
        println!(
            "{name:<20} {:>8.0} {:>8.2} {:>8.0} {:>9.0} {:>8.2} {:>8} {:>8}",
            micros(row.p50),
            micros(row.p50) / micros(direct.p50),
            micros(row.p99),
            row.rate,
            row.rate / direct.rate,
            cpu(row.hop_cpu),
            cpu(row.agent_cpu),
        );
    }
    println!(
        "(CPU: ms per 1k calls at 64 in flight, of the node or proxy process and of the agent)"
    );
}

fn main() {
    let mut args = std::env::args().skip(1);
    let role = args.next().unwrap_or_default();
    let rest: Vec<String> = args.collect();
    if role == "agent" || role == "proxy" {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        match role.as_str() {
            "agent" => runtime.block_on(serve_agent(&rest)),
            _ => runtime.block_on(serve_proxy(&rest[0])),
        }
        return;
    }

    let s = Settings::from_env();
    let pinning = Pinning::set_up();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let data = tempfile::tempdir().expect("temp dir");
        let (node, node_address) = start_node(pinning, "node", &data.path().join("on"), &[]);
        let (quiet, quiet_address) = start_node(
            pinning,
            "node (journal off)",
            &data.path().join("off"),
            &["--set", "trace.journal=false"],
        );
        // With a Redis, one more node keeps its registry there (cached locally, fed by the
        // change channel): routing should cost what it costs with the in-memory registry.
        let redis_url = std::env::var("AGENTMESH_TEST_REDIS").ok();
        let prefix = format!("bench-unary-{}", std::process::id());
        let shared = redis_url.as_ref().map(|url| {
            let prefix_setting = format!("store.key_prefix={prefix}");
            start_node(
                pinning,
                "node (registry on Redis)",
                &data.path().join("redis"),
                // Its journal off, so the row compares registries alone with the journal-off one.
                &["--store", url, "--set", &prefix_setting, "--set", "trace.journal=false"],
            )
        });
        let mut agent_args = vec!["agent", node_address.as_str(), quiet_address.as_str()];
        if let Some((_, address)) = &shared {
            agent_args.push(address.as_str());
        }
        let (agent, agent_address) = start_child(pinning, "agent", &agent_args);
        let (proxy, proxy_address) =
            start_child(pinning, "proxy", &["proxy", agent_address.as_str()]);
        for address in [&node_address, &quiet_address, &proxy_address] {
            wait_ready(address).await;
        }
        if let Some((_, address)) = &shared {
            wait_ready(address).await;
        }

        println!(
            "unary hop: {PAYLOAD_BYTES}-byte echo, latency over {} calls at 1 in flight \
             (after {} warm-up), throughput over {} s at {IN_FLIGHT} in flight; {}",
            s.calls,
            s.warmup,
            s.secs.as_secs(),
            if pinning.0 {
                "node, proxy and agent on core 0, client on core 1"
            } else {
                "NOT PINNED (taskset missing or refused): all processes share every core"
            }
        );
        let mut paths = vec![
            ("direct", &agent_address, None),
            ("proxy (tonic)", &proxy_address, Some(proxy.pid())),
            ("node", &node_address, Some(node.pid())),
            ("node, journal off", &quiet_address, Some(quiet.pid())),
        ];
        if let Some((process, address)) = &shared {
            paths.push(("node, Redis registry", address, Some(process.pid())));
        }
        let mut rows = Vec::new();
        for (name, address, hop) in paths {
            rows.push((name, measure(address, hop, agent.pid(), s).await));
        }
        print_table(&rows);

        let [direct, proxy_row, node_row, quiet_row] = [rows[0].1, rows[1].1, rows[2].1, rows[3].1];
        let added = |row: Row| micros(row.p50) - micros(direct.p50);
        println!(
            "node added p50 / proxy added p50: {:.0} µs / {:.0} µs = {:.2} (target <= 1.2)",
            added(node_row),
            added(proxy_row),
            added(node_row) / added(proxy_row)
        );
        println!(
            "node req/s / proxy req/s: {:.2} (target >= 0.9)",
            node_row.rate / proxy_row.rate
        );
        println!(
            "journal on / off: p50 {:.2}, req/s {:.2}",
            micros(node_row.p50) / micros(quiet_row.p50),
            node_row.rate / quiet_row.rate
        );
        if let Some(shared_row) = rows.get(4).map(|r| r.1) {
            println!(
                "Redis registry / in-memory registry (both without the journal): p50 {:.2}, req/s {:.2} (target: no more cost)",
                micros(shared_row.p50) / micros(quiet_row.p50),
                shared_row.rate / quiet_row.rate
            );
        }
        drop((proxy, agent, quiet, node, shared));
        if let Some(url) = redis_url {
            // The shared node's keys (its agent's card, the roster, the journal).
            if let Ok(mut con) = redis::Client::open(url.as_str()).and_then(|c| c.get_connection()) {
                let keys: Vec<String> = redis::cmd("KEYS")
                    .arg(format!("{prefix}:*"))
                    .query(&mut con)
                    .unwrap_or_default();
                for key in keys {
                    let _: Result<(), _> = redis::cmd("DEL").arg(key).query(&mut con);
                }
            }
        }
    });
}
