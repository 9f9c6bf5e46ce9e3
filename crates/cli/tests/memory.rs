//! Memory after load: a node's resident memory comes back near its baseline once a burst of
//! unread event streams, calls and submits is over, and an unread event stream costs a
//! bounded amount. Memory, not speed: the bounds are generous (see each test).

use std::{
    io::Write,
    net::TcpStream,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

const BIN: &str = env!("CARGO_BIN_EXE_agentmesh");
const MIB: u64 = 1024 * 1024;

/// A node with the demo agents, killed on drop. Streams nobody reads are cancelled after
/// one second and finished ones dropped one second later (30 s and 1 min by default), so
/// that the test does not wait minutes for memory the node would give back anyway.
struct Node {
    child: Child,
    address: String,
    _data: tempfile::TempDir,
}

impl Node {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let address = format!("127.0.0.1:{port}");
        let data = tempfile::tempdir().unwrap();
        let child = Command::new(BIN)
            .args(["serve", "--demo-agents", "--listen", &address])
            .args([
                "--set",
                "replay.resume_grace=1s",
                "--set",
                "replay.retention=1s",
            ])
            .env("AGENTMESH_DATA_DIR", data.path())
            .env("AGENTMESH_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let node = Self {
            child,
            address,
            _data: data,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let out = Command::new(BIN)
                .arg("agents")
                .env("AGENTMESH_NODE", &node.address)
                .output()
                .unwrap();
            if String::from_utf8_lossy(&out.stdout).contains("counter") {
                return node;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("node with demo agents did not come up");
    }

    /// Resident memory of the node process (VmRSS), in bytes.
    fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .expect("VmRSS in /proc/PID/status");
        kib * 1024
    }

    /// Opens `count` event streams of `counter` and never reads them.
    fn unread_streams(&self, count: usize, body: &str) -> Vec<TcpStream> {
        (0..count)
            .map(|_| {
                let mut socket = TcpStream::connect(&self.address).unwrap();
                write!(
                    socket,
                    "POST /v1/agents/counter/stream HTTP/1.1\r\nHost: node\r\n\
                     Content-Type: application/json\r\nX-Timeout-Ms: 600000\r\n\
                     Content-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .unwrap();
                socket
            })
            .collect()
    }

    /// `calls` invokes of `echo` and as many submits, 16 at a time, each ~1 KB.
    async fn calls_and_submits(&self, calls: usize) {
        let client = reqwest::Client::new();
        let pad = "x".repeat(1000);
        for path in ["/v1/agents/echo/invoke", "/v1/queues/memory/messages"] {
            let url = format!("http://{}{path}", self.address);
            let mut pending = futures::stream::FuturesUnordered::new();
            for i in 0..calls {
                let body = format!(r#"{{"json":{{"i":{i},"pad":"{pad}"}}}}"#);
                pending.push(
                    client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(body)
                        .send(),
                );
                if pending.len() >= 16 {
                    use futures::StreamExt;
                    let response = pending.next().await.unwrap().unwrap();
                    assert!(response.status().is_success(), "{}", response.status());
                }
            }
            use futures::StreamExt;
            while let Some(response) = pending.next().await {
                assert!(response.unwrap().status().is_success());
            }
        }
    }

    /// Waits until resident memory is at most `bound`; the last value seen otherwise.
    fn settles_below(&self, bound: u64, within: Duration) -> Result<u64, u64> {
        let deadline = Instant::now() + within;
        loop {
            let rss = self.rss();
            if rss <= bound {
                return Ok(rss);
            }
            if Instant::now() > deadline {
                return Err(rss);
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Streams that produce as fast as they can (one event a millisecond) into readers that
/// never read: the node holds at most its replay window (`replay.window_bytes`, 64 KiB) and
/// the connection's write buffer (64 KiB) of each; the in-process demo agent also buffers
/// what it sent ahead (its HTTP/2 send buffer, up to ~400 KiB a stream).
const FAST: &str = r#"{"json":{"n":100000,"interval_ms":1}}"#;

/// After 300 unread fast streams, 3000 calls and 3000 submits, and once the streams are
/// closed (and, one second later, cancelled and dropped), the node's resident memory comes
/// back to within 48 MiB of where it was after warming up.
///
/// How the bound was picked: a debug node with the demo agents sits near 55 MB after
/// warm-up and went past 200 MB during this load before the fixes, and stayed there. With
/// them it peaks lower and returns to within a few MB of the baseline; 48 MiB leaves room for
/// allocator caches and the queue's store pages (which stay mapped) without letting memory
/// that is never given back pass. The wait is generous (60 s) since only the value counts.
#[tokio::test(flavor = "multi_thread")]
async fn memory_comes_back_after_a_load_spike() {
    let node = Node::start();
    // Warm up: the first calls, streams and submits allocate for good (connections to the
    // agents, the store, lazily built tables); the baseline is taken after them.
    node.calls_and_submits(200).await;
    let warm = node.unread_streams(20, FAST);
    std::thread::sleep(Duration::from_secs(1));
    drop(warm);
    std::thread::sleep(Duration::from_secs(3));
    let baseline = node.rss();

    let streams = node.unread_streams(300, FAST);
    node.calls_and_submits(3000).await;
    let peak = node.rss();
    drop(streams);

    let bound = baseline + 48 * MIB;
    match node.settles_below(bound, Duration::from_secs(60)) {
        Ok(after) => eprintln!(
            "resident memory: baseline {} MiB, under load {} MiB, after {} MiB",
            baseline / MIB,
            peak / MIB,
            after / MIB
        ),
        Err(after) => panic!(
            "resident memory stayed up after the load: baseline {} MiB, under load {} MiB, \
             still {} MiB after 60 s (bound {} MiB)",
            baseline / MIB,
            peak / MIB,
            after / MIB,
            bound / MIB
        ),
    }
}

/// What an event stream costs while it waits for its next event: 200 streams of `counter`
/// with a 100 s interval, measured as the node's resident memory with them open. It covers
/// the whole stream in this process: the HTTP/1 connection and its SSE body, the replay
/// state, the node's gRPC stream to the agent, and the demo agent's own side of it (the
/// agents run in the node's process). A debug build measured ~63 KiB a stream; the bound
/// (128 KiB) is twice that, to catch a per-stream buffer coming back (hyper's ~400 KiB
/// write buffer, a 64 KiB frame) without tripping on allocator noise. The figure is printed.
#[tokio::test(flavor = "multi_thread")]
async fn a_waiting_event_stream_costs_a_bounded_amount() {
    const IDLE: &str = r#"{"json":{"n":3,"interval_ms":100000}}"#;
    let node = Node::start();
    let warm = node.unread_streams(20, IDLE);
    std::thread::sleep(Duration::from_secs(1));
    drop(warm);
    std::thread::sleep(Duration::from_secs(3));
    let before = node.rss();
    const STREAMS: u64 = 200;
    let streams = node.unread_streams(STREAMS as usize, IDLE);
    std::thread::sleep(Duration::from_secs(3));
    let during = node.rss();
    let each = during.saturating_sub(before) / STREAMS;
    eprintln!(
        "a waiting event stream costs {} KiB ({} MiB before, {} MiB with {STREAMS} streams)",
        each / 1024,
        before / MIB,
        during / MIB
    );
    assert!(
        each <= 128 * 1024,
        "a waiting event stream costs {} KiB",
        each / 1024
    );
    drop(streams);
}
