//! What every section shares: the run's settings, child processes (the node, and this binary
//! run again as an agent or a proxy), core pinning, and readings from `/proc`.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Child, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use tonic::transport::{Channel, Endpoint};

/// How long and how hard a run is.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    /// A smoke pass: every path once, small counts, short rows.
    pub(crate) quick: bool,
    /// Latency samples per unary path.
    pub(crate) calls: usize,
    /// Calls before the samples.
    pub(crate) warmup: usize,
    /// Length of each throughput row.
    pub(crate) secs: Duration,
    /// Events per stream in the streaming rows.
    pub(crate) events: u64,
    /// Rounds of each streaming row (the median counts).
    pub(crate) rounds: usize,
    /// Messages through each queue system.
    pub(crate) messages: u64,
    /// Open streams in the memory rows: (small, large).
    pub(crate) subscribers: (usize, usize),
    /// Seconds the idle CPU is read over.
    pub(crate) idle_secs: u64,
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

impl Settings {
    /// Full figures unless `quick`; `AGENTMESH_BENCH_*` variables override single knobs.
    pub(crate) fn new(quick: bool) -> Self {
        let base = if quick {
            Self {
                quick,
                calls: 200,
                warmup: 50,
                secs: Duration::from_secs(1),
                events: 2_000,
                rounds: 1,
                messages: 4_000,
                subscribers: (50, 200),
                idle_secs: 2,
            }
        } else {
            Self {
                quick,
                calls: 5_000,
                warmup: 1_000,
                secs: Duration::from_secs(5),
                events: 20_000,
                rounds: 5,
                messages: 200_000,
                subscribers: (1_000, 10_000),
                idle_secs: 10,
            }
        };
        Self {
            calls: env_or("AGENTMESH_BENCH_CALLS", base.calls as u64).max(1) as usize,
            secs: Duration::from_secs(env_or("AGENTMESH_BENCH_SECS", base.secs.as_secs()).max(1)),
            events: env_or("AGENTMESH_BENCH_EVENTS", base.events).max(1),
            rounds: env_or("AGENTMESH_BENCH_ROUNDS", base.rounds as u64).max(1) as usize,
            messages: env_or("AGENTMESH_BENCH_MESSAGES", base.messages).max(1),
            ..base
        }
    }
}

/// One line of progress on stderr, so a long run shows where it is.
pub(crate) fn progress(section: &str, message: impl std::fmt::Display) {
    eprintln!("[{section}] {message}");
}

/// A child process, killed when dropped.
#[derive(Debug)]
pub(crate) struct Process {
    child: Child,
}

impl Process {
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether server processes go on core 0 and the client (this process) on core 1.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pinning(pub bool);

impl Pinning {
    /// Pins this process to core 1 when `taskset` can place work on both cores; runs before
    /// any runtime exists, so all the client's threads inherit the mask.
    pub(crate) fn set_up() -> Self {
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

    /// Lets this process run on every core again (for servers that are not pinned).
    pub(crate) fn release(self) {
        if self.0 {
            // Every online core (this process's own mask names only the one it is pinned to).
            let online = std::fs::read_to_string("/sys/devices/system/cpu/online")
                .map_or_else(|_| "0-1".to_owned(), |list| list.trim().to_owned());
            let _ = Command::new("taskset")
                .args(["-a", "-p", "-c", &online, &std::process::id().to_string()])
                .stdout(Stdio::null())
                .status();
        }
    }

    /// A command for `program`, on core 0 when pinning.
    pub(crate) fn server(self, program: &str) -> Command {
        if self.0 {
            let mut command = Command::new("taskset");
            command.args(["-c", "0", program]);
            command
        } else {
            Command::new(program)
        }
    }

    pub(crate) fn describe(self) -> &'static str {
        if self.0 {
            "node, proxy and agents on core 0, the client on core 1"
        } else {
            "NOT PINNED (taskset missing or refused): every process shares every core"
        }
    }
}

/// Starts `command` with a piped stdin: a child run from this binary exits when it closes.
pub(crate) fn spawn(name: &str, mut command: Command, stdout: Stdio) -> Process {
    let child = command
        .stdin(Stdio::piped())
        .stdout(stdout)
        .spawn()
        .unwrap_or_else(|e| panic!("{name} starts: {e}"));
    Process { child }
}

pub(crate) fn free_address() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("127.0.0.1:{port}")
}

/// The `agentmesh` binary this bench was built with.
pub(crate) const NODE_BIN: &str = env!("CARGO_BIN_EXE_agentmesh");

/// `agentmesh serve` on a free port with its store in `data`, at its default log level (as
/// shipped); returns it with its address.
pub(crate) fn start_node(
    pinning: Pinning,
    name: &str,
    data: &Path,
    extra: &[&str],
) -> (Process, String) {
    let address = free_address();
    let mut command = pinning.server(NODE_BIN);
    command
        .args(["serve", "--listen", &address, "--data-dir"])
        .arg(data)
        .args(extra);
    (spawn(name, command, Stdio::null()), address)
}

/// This binary run as `role` (an agent or a proxy); returns it once it prints where it serves.
pub(crate) fn start_child(pinning: Pinning, name: &str, args: &[&str]) -> (Process, String) {
    let exe = std::env::current_exe().expect("own path");
    let mut command = pinning.server(exe.to_str().expect("utf-8 path"));
    command.args(args);
    let mut process = spawn(name, command, Stdio::piped());
    let stdout: ChildStdout = process.child.stdout.take().expect("child stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read the child's address");
    let address = line
        .strip_prefix("serving ")
        .unwrap_or_else(|| panic!("{name} did not start: {line:?}"))
        .trim()
        .to_owned();
    (process, address)
}

/// Tells the parent where this child serves: one line on stdout.
pub(crate) fn announce(address: SocketAddr) {
    println!("serving {address}");
}

/// Returns when the parent closes our stdin (it is done, or it died).
pub(crate) async fn wait_for_parent() {
    tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
    })
    .await
    .unwrap();
}

pub(crate) async fn channel(address: &str) -> Channel {
    Endpoint::from_shared(format!("http://{address}"))
        .unwrap()
        .tcp_nodelay(true)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect to {address}: {e}"))
}

/// Polls `ready` every 20 ms until it holds; panics after `limit`.
pub(crate) async fn wait_until<F, Fut>(what: &str, limit: Duration, mut ready: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !ready().await {
        assert!(started.elapsed() < limit, "{what} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// CPU seconds (user + system) a process has used, from `/proc/<pid>/stat` (in `USER_HZ`,
/// 100 per second on Linux).
pub(crate) fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split(' ').collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// Resident memory (VmRSS) of a process, in bytes.
pub(crate) fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

pub(crate) fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

pub(crate) fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
