//! The benchmark harness: what every hop of agentmesh costs, each figure beside a baseline
//! measured in the same run.
//!
//! ```text
//! AGENTMESH_TEST_REDIS=redis://127.0.0.1:6379 AGENTMESH_TEST_NATS=127.0.0.1:4222 \
//!   cargo bench -p agentmesh --bench mesh
//! ```
//!
//! Sections (`--only unary,streaming,queue,memory` runs some of them):
//! - `unary` (`unary.rs`): `Invoke` direct, through a bare tonic proxy, through the node;
//! - `streaming` (`streaming.rs`): `Stream` through the proxy and the node, SSE against gRPC;
//! - `queue` (`queue.rs`): the durable queue end to end against Redis Streams and NATS
//!   JetStream, and the node on Redis;
//! - `memory` (`memory.rs`): idle RSS, RSS per waiting SSE stream and `Converse`, idle CPU
//!   after load, cold start.
//!
//! The node is the `agentmesh` binary of the same build; the agent and the proxy are this
//! binary run again as child processes (`mesh agent …`, `mesh proxy …`), so each hop has a
//! pid whose CPU and memory can be read. Where `taskset` works, servers run on core 0 and
//! the client on core 1 for the unary and streaming sections.
//!
//! `--quick` (or `AGENTMESH_BENCH_QUICK`) is a smoke pass over every path with small counts;
//! CI runs it on the debug build (`cargo test -p agentmesh --bench mesh -- --quick`). A full
//! run of every section writes `docs/BENCHMARKS.md` (`--no-write` keeps it as it is).

mod harness;
mod memory;
mod queue;
mod report;
mod roles;
mod streaming;
mod topology;
mod unary;

use std::{fmt::Write as _, path::PathBuf, process::Command};

use harness::{Pinning, Settings};
use report::Section;

// The node runs on jemalloc; the client side, the proxy and the agent (this binary) on
// mimalloc, so the hops differ in what they do rather than in a slow default allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SECTIONS: [&str; 4] = ["unary", "streaming", "queue", "memory"];

#[derive(Debug)]
struct Options {
    quick: bool,
    only: Vec<String>,
    write: bool,
}

impl Options {
    fn parse(args: &[String]) -> Self {
        let mut options = Self {
            quick: std::env::var_os("AGENTMESH_BENCH_QUICK").is_some(),
            only: SECTIONS.iter().map(|s| (*s).to_owned()).collect(),
            write: true,
        };
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--quick" => options.quick = true,
                "--no-write" => options.write = false,
                "--only" => {
                    let list = args.next().expect("--only takes a list of sections");
                    options.only = list.split(',').map(str::to_owned).collect();
                    for section in &options.only {
                        assert!(
                            SECTIONS.contains(&section.as_str()),
                            "unknown section {section:?}: the sections are {SECTIONS:?}"
                        );
                    }
                }
                // What `cargo bench` and `cargo test` pass to every bench binary.
                "--bench" | "--test" => {}
                other => panic!("unknown argument {other:?} (--quick, --only LIST, --no-write)"),
            }
        }
        options
    }

    fn wants(&self, section: &str) -> bool {
        self.only.iter().any(|s| s == section)
    }

    /// Only a full run of every section is worth keeping in the docs.
    fn writes_report(&self) -> bool {
        self.write && !self.quick && SECTIONS.iter().all(|s| self.wants(s))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("agent") => return child(roles::serve_agent(&args[1..])),
        Some("proxy") => return child(roles::serve_proxy(&args[1])),
        Some("idle-agent") => return child(memory::serve_agent(&args[1..])),
        _ => {}
    }
    let options = Options::parse(&args);
    let settings = Settings::new(options.quick);
    // Before the runtime starts, so every thread of the client inherits the mask.
    let pinning = Pinning::set_up();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let sections = runtime.block_on(run(&options, settings, pinning));

    let mut out = String::new();
    for section in &sections {
        out.push_str(&section.markdown());
    }
    let _ = write!(
        out,
        "## Targets\n\n{}",
        report::targets(&sections).markdown()
    );
    println!("\n{out}");
    if options.writes_report() {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/BENCHMARKS.md");
        let before = std::fs::read_to_string(&path).unwrap_or_default();
        let results = results(&out, settings, pinning);
        std::fs::write(&path, replace_results(&before, &results))
            .expect("write docs/BENCHMARKS.md");
        eprintln!("wrote the results in {}", path.display());
    }
}

fn child(serve: impl std::future::Future<Output = ()>) {
    tokio::runtime::Runtime::new()
        .expect("tokio runtime")
        .block_on(serve);
}

async fn run(options: &Options, settings: Settings, pinning: Pinning) -> Vec<Section> {
    let mut sections = Vec::new();
    if options.wants("unary") || options.wants("streaming") {
        let mesh = topology::Topology::start(pinning).await;
        if options.wants("unary") {
            sections.push(unary::run(&mesh, settings).await);
        }
        if options.wants("streaming") {
            sections.push(streaming::run(&mesh, settings).await);
        }
        mesh.stop().await;
    }
    // The queue's servers (Redis, NATS) are not pinned, so neither is anything from here on.
    pinning.release();
    if options.wants("queue") {
        sections.push(queue::run(settings).await);
    }
    if options.wants("memory") {
        sections.push(memory::run(settings).await);
    }
    sections
}

/// Where the generated part of `docs/BENCHMARKS.md` starts and ends: the text around it (how
/// to read the figures, what the profiles show) is written by hand and kept.
const BEGIN: &str = "<!-- results: written by `cargo bench -p agentmesh --bench mesh` -->";
const END: &str = "<!-- end of results -->";

fn replace_results(document: &str, results: &str) -> String {
    let block = format!("{BEGIN}\n\n{results}\n{END}");
    match (document.find(BEGIN), document.find(END)) {
        (Some(begin), Some(end)) if begin < end => {
            format!(
                "{}{block}{}",
                &document[..begin],
                &document[end + END.len()..]
            )
        }
        _ => format!("# Benchmarks\n\n{block}\n"),
    }
}

/// The generated part: the machine, the versions and the command, then the results.
fn results(results: &str, s: Settings, pinning: Pinning) -> String {
    let version = |program: &str, arg: &str| {
        Command::new(program)
            .arg(arg)
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|o| o.lines().next().map(str::to_owned))
            .unwrap_or_else(|| "not found".to_owned())
    };
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or_else(
            || "unknown".to_owned(),
            |kib| format!("{:.0} GiB", kib as f64 / 1048576.0),
        );
    // Counted from the machine, not this process's affinity mask.
    let cores = std::fs::read_to_string("/proc/cpuinfo").map_or(0, |info| {
        info.lines().filter(|l| l.starts_with("processor")).count()
    });
    let today = version("date", "-u");
    format!(
        "```text\n\
         AGENTMESH_TEST_REDIS=redis://127.0.0.1:6379 AGENTMESH_TEST_NATS=127.0.0.1:4222 \\\n  \
         cargo bench -p agentmesh --bench mesh\n\
         ```\n\n\
         - Run: {today}\n\
         - Machine: {cpu}, {cores} cores, {memory}, {kernel}\n\
         - Placement: {placement}\n\
         - agentmesh {agentmesh} at {commit} ({profile} build), {rustc}\n\
         - Peers: {redis}; {nats}\n\
         - Settings: {calls} latency samples and {secs} s throughput rows per unary path, \
         {events} events × {rounds} rounds per stream, {messages} queue messages\n\n\
         {results}",
        kernel = version("uname", "-sr"),
        placement = pinning.describe(),
        agentmesh = env!("CARGO_PKG_VERSION"),
        commit = commit(),
        profile = if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        rustc = version("rustc", "--version"),
        redis = version("redis-server", "--version"),
        nats = version("nats-server", "--version"),
        calls = s.calls,
        secs = s.secs.as_secs(),
        events = s.events,
        rounds = s.rounds,
        messages = s.messages,
    )
}

/// The commit the run measured, marked when the tree had changes.
fn commit() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(env!("CARGO_MANIFEST_DIR"))
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let Some(head) = git(&["rev-parse", "--short", "HEAD"]) else {
        return "an unknown commit".to_owned();
    };
    match git(&["status", "--porcelain", "--untracked-files=no"]) {
        Some(changes) if !changes.is_empty() => format!("{head} with local changes"),
        _ => head,
    }
}
