//! Throughput of the queue backends, store alone (plain `main`, `harness = false`).
//!
//! `cargo bench -p agentmesh-queue --bench queue_throughput` measures, with 256-byte bodies:
//! durable submit throughput (many tasks, one message per call; and fewer tasks, 64 per call),
//! and submit→receive→ack end to end. For the embedded backend it prints msgs/s and the
//! average number of messages per fsync'd commit (group-commit batch size).
//! With `AGENTMESH_TEST_REDIS=redis://HOST:PORT` set, the same workloads then run on the Redis
//! Streams backend (under a key prefix of their own, deleted afterwards), and a table puts
//! both side by side. The Redis server's persistence settings are printed, not changed: what
//! a Redis submit's acknowledgement is worth depends on them (see `agentmesh_queue::redis`).
//! `-- --engine` instead compares raw append+fdatasync with redb commits (the engine choice).
//! `-- --quick` runs smaller counts.
//! `-- --depth` fills a queue with 400k 1-KiB messages and reports the peak RSS (memory bound).
//!
//! fsync latency on a shared virtual disk varies a lot with other I/O, so every run first
//! measures and prints the current fdatasync latency: compare numbers only against it.

use agentmesh_queue::{
    BackendConfig, EmbeddedBackend, IoStats, NewMessage, QueueBackend, RedisBackend, RedisOptions,
};
use bytes::Bytes;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const BODY: usize = 256;

/// One workload: its name and how it runs.
#[derive(Clone, Copy)]
enum Workload {
    Submit {
        tasks: usize,
        per_call: usize,
        total: usize,
    },
    EndToEnd {
        producers: usize,
        per_call: usize,
        consumers: usize,
        total: usize,
        /// Each receive's messages acked with one `ack_many` (as the node's Consume stream
        /// does for a run of acks) instead of one `ack` each.
        ack_many: bool,
    },
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--engine") {
        engine_probe();
        return;
    }
    if args.iter().any(|a| a == "--depth") {
        depth_probe();
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let scale = if quick { 1 } else { 4 };
    let workloads = [
        (
            "durable submit, 64 tasks x 1 msg/call",
            Workload::Submit {
                tasks: 64,
                per_call: 1,
                total: 25_000 * scale,
            },
        ),
        (
            "durable submit, 256 tasks x 1 msg/call",
            Workload::Submit {
                tasks: 256,
                per_call: 1,
                total: 25_000 * scale,
            },
        ),
        (
            "durable submit, 8 tasks x 64 msgs/call",
            Workload::Submit {
                tasks: 8,
                per_call: 64,
                total: 50_000 * scale,
            },
        ),
        (
            "submit->receive->ack, 16 producers x 16 msgs/call, 4 consumers x 256/receive",
            Workload::EndToEnd {
                producers: 16,
                per_call: 16,
                consumers: 4,
                total: 25_000 * scale,
                ack_many: false,
            },
        ),
        (
            "submit->receive->ack_many, 16 producers x 16 msgs/call, 4 consumers x 256/receive",
            Workload::EndToEnd {
                producers: 16,
                per_call: 16,
                consumers: 4,
                total: 25_000 * scale,
                ack_many: true,
            },
        ),
    ];
    let redis_url = std::env::var("AGENTMESH_TEST_REDIS").ok();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        println!("agentmesh-queue embedded backend, {BODY}-byte bodies, 2 runtime workers");
        println!(
            "fdatasync latency now: {:.0} us (median of 50 4-KiB appends)",
            fsync_latency_us()
        );
        let mut embedded = Vec::new();
        for (name, w) in workloads {
            let (dir, b) = open_embedded();
            let before = b.io_stats();
            let (msgs, elapsed) = run(b.clone(), w).await;
            report(name, msgs, elapsed, before, b.io_stats());
            embedded.push(msgs as f64 / elapsed.as_secs_f64());
            drop(b);
            drop(dir);
        }
        let Some(url) = redis_url else {
            println!(
                "(set AGENTMESH_TEST_REDIS=redis://HOST:PORT to compare with the Redis backend)"
            );
            return;
        };
        println!();
        println!(
            "agentmesh-queue Redis backend at {url}: {}",
            redis_persistence(&url)
        );
        let mut redis = Vec::new();
        for (name, w) in workloads {
            let prefix = format!("agentmesh-bench-{:016x}", rand::random::<u64>());
            let b = RedisBackend::connect(
                &url,
                &prefix,
                BackendConfig::default(),
                RedisOptions::default(),
            )
            .await
            .expect("connect to redis");
            let (msgs, elapsed) = run(Arc::new(b), w).await;
            let rate = msgs as f64 / elapsed.as_secs_f64();
            println!(
                "{name}: {msgs} msgs in {:.2}s = {rate:.0} msgs/s",
                elapsed.as_secs_f64()
            );
            redis.push(rate);
            delete_keys(&url, &prefix);
        }
        println!();
        println!(
            "{:<80} {:>10} {:>10} {:>7}",
            "workload (msgs/s)", "embedded", "redis", "redis/embedded"
        );
        for (((name, _), e), r) in workloads.iter().zip(&embedded).zip(&redis) {
            println!("{name:<80} {e:>10.0} {r:>10.0} {:>7.2}", r / e);
        }
    });
}

fn open_embedded() -> (tempfile::TempDir, Arc<EmbeddedBackend>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let b = EmbeddedBackend::open(dir.path(), BackendConfig::default()).expect("open");
    (dir, Arc::new(b))
}

/// The server's `appendonly` and `appendfsync` settings.
fn redis_persistence(url: &str) -> String {
    let client = redis::Client::open(url).expect("redis url");
    let mut con = client.get_connection().expect("connect to redis");
    let mut get = |key: &str| -> String {
        let pair: Vec<String> = redis::cmd("CONFIG")
            .arg("GET")
            .arg(key)
            .query(&mut con)
            .unwrap_or_default();
        pair.get(1).cloned().unwrap_or_else(|| "?".into())
    };
    format!(
        "appendonly {}, appendfsync {} (the server's settings, left as they are)",
        get("appendonly"),
        get("appendfsync")
    )
}

/// Deletes every key under `prefix`.
fn delete_keys(url: &str, prefix: &str) {
    let client = redis::Client::open(url).expect("redis url");
    let mut con = client.get_connection().expect("connect to redis");
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(1000)
            .query(&mut con)
            .expect("SCAN");
        if !keys.is_empty() {
            let _: () = redis::cmd("DEL").arg(&keys).query(&mut con).expect("DEL");
        }
        if next == 0 {
            return;
        }
        cursor = next;
    }
}

fn report(name: &str, msgs: u64, elapsed: Duration, before: IoStats, after: IoStats) {
    let commits = after.submit_commits - before.submit_commits;
    let accepted = after.accepted_messages - before.accepted_messages;
    let syncs = after.durable_commits - before.durable_commits;
    println!(
        "{name}: {msgs} msgs in {:.2}s = {:.0} msgs/s; {syncs} fsync'd commits, avg {:.1} msgs per submit commit",
        elapsed.as_secs_f64(),
        msgs as f64 / elapsed.as_secs_f64(),
        if commits == 0 {
            0.0
        } else {
            accepted as f64 / commits as f64
        },
    );
}

/// Runs `w` on `b`; returns how many messages it moved and how long that took.
async fn run(b: Arc<dyn QueueBackend>, w: Workload) -> (u64, Duration) {
    match w {
        Workload::Submit {
            tasks,
            per_call,
            total,
        } => submit_bench(b, tasks, per_call, total).await,
        Workload::EndToEnd {
            producers,
            per_call,
            consumers,
            total,
            ack_many,
        } => end_to_end_bench(b, producers, per_call, consumers, total, ack_many).await,
    }
}

async fn submit_bench(
    b: Arc<dyn QueueBackend>,
    tasks: usize,
    per_call: usize,
    total: usize,
) -> (u64, Duration) {
    let body = Bytes::from(vec![0x5au8; BODY]);
    let calls_per_task = total / tasks / per_call;
    let started = Instant::now();
    let mut handles = Vec::new();
    for t in 0..tasks {
        let b = b.clone();
        let body = body.clone();
        handles.push(tokio::spawn(async move {
            for c in 0..calls_per_task {
                let batch = (0..per_call)
                    .map(|i| NewMessage::new(format!("{t}-{c}-{i}"), body.clone()))
                    .collect();
                b.submit("bench", batch).await.expect("submit");
            }
        }));
    }
    for h in handles {
        h.await.expect("task");
    }
    (
        (calls_per_task * tasks * per_call) as u64,
        started.elapsed(),
    )
}

async fn end_to_end_bench(
    b: Arc<dyn QueueBackend>,
    producers: usize,
    per_call: usize,
    consumers: usize,
    total: usize,
    ack_many: bool,
) -> (u64, Duration) {
    let body = Bytes::from(vec![0x5au8; BODY]);
    let calls_per_task = total / producers / per_call;
    let total = (calls_per_task * producers * per_call) as u64;
    let acked = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut handles = Vec::new();
    for t in 0..producers {
        let b = b.clone();
        let body = body.clone();
        handles.push(tokio::spawn(async move {
            for c in 0..calls_per_task {
                let batch = (0..per_call)
                    .map(|i| NewMessage::new(format!("{t}-{c}-{i}"), body.clone()))
                    .collect();
                b.submit("e2e", batch).await.expect("submit");
            }
        }));
    }
    for c in 0..consumers {
        let b = b.clone();
        let acked = acked.clone();
        handles.push(tokio::spawn(async move {
            let consumer = format!("consumer-{c}");
            while acked.load(Ordering::Relaxed) < total {
                let got = b
                    .receive(
                        "e2e",
                        &consumer,
                        256,
                        Duration::from_secs(60),
                        Duration::from_millis(100),
                    )
                    .await
                    .expect("receive");
                let n = got.len() as u64;
                if ack_many {
                    let acks = got.into_iter().map(|m| (m.receipt, None)).collect();
                    for r in b.ack_many(acks).await.expect("ack_many") {
                        r.expect("ack");
                    }
                } else {
                    let acks = got.iter().map(|m| b.ack(&m.receipt, None));
                    for r in futures::future::join_all(acks).await {
                        r.expect("ack");
                    }
                }
                acked.fetch_add(n, Ordering::Relaxed);
            }
        }));
    }
    for h in handles {
        h.await.expect("task");
    }
    (total, started.elapsed())
}

/// Median latency of appending 4 KiB and calling fdatasync, in microseconds.
fn fsync_latency_us() -> f64 {
    use std::io::Write;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut f = std::fs::File::create(dir.path().join("probe")).expect("file");
    let page = vec![1u8; 4096];
    let mut samples: Vec<f64> = (0..50)
        .map(|_| {
            let t = Instant::now();
            f.write_all(&page).expect("write");
            f.sync_data().expect("fdatasync");
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Fills a queue far beyond the cache size and reports peak memory: it must not grow with depth.
fn depth_probe() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let (dir, b) = open_embedded();
        let body = Bytes::from(vec![0x33u8; 1024]);
        let total = 400_000usize;
        let started = Instant::now();
        let mut handles = Vec::new();
        for t in 0..8 {
            let b = b.clone();
            let body = body.clone();
            handles.push(tokio::spawn(async move {
                for c in 0..total / 8 / 250 {
                    let batch = (0..250)
                        .map(|i| NewMessage::new(format!("{t}-{c}-{i}"), body.clone()))
                        .collect();
                    b.submit("deep", batch).await.expect("submit");
                }
            }));
        }
        for h in handles {
            h.await.expect("task");
        }
        let stats = b.stats().await.expect("stats");
        let file = std::fs::metadata(b.path()).map(|m| m.len()).unwrap_or(0);
        println!(
            "depth probe: {} messages of 1 KiB queued in {:.1}s; file {} MiB; RSS now {} MiB, peak {} MiB",
            stats[0].depth,
            started.elapsed().as_secs_f64(),
            file / (1 << 20),
            rss_kib("VmRSS:") / 1024,
            rss_kib("VmHWM:") / 1024,
        );
        drop(b);
        drop(dir);
    });
}

/// Raw append+fdatasync versus redb commits, batch sizes 1..1024, ~300-byte records.
fn engine_probe() {
    use redb::{Database, Durability, TableDefinition};
    use std::io::Write;
    const T: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("m");
    let dir = tempfile::tempdir().expect("temp dir");
    let record = vec![7u8; 300];
    println!("engine probe: ~300-byte records, one sync per batch");
    for batch in [1usize, 64, 256, 1024] {
        let n = 200_000usize.min(batch * 2000);
        let mut f = std::fs::File::create(dir.path().join(format!("raw{batch}"))).expect("file");
        let mut buf = Vec::new();
        let started = Instant::now();
        for _ in 0..n / batch {
            buf.clear();
            for _ in 0..batch {
                buf.extend_from_slice(&record);
            }
            f.write_all(&buf).expect("write");
            f.sync_data().expect("fdatasync");
        }
        let e = started.elapsed();
        println!(
            "raw append+fdatasync, batch {batch:>4}: {:>9.0} rec/s ({:.0} us per sync)",
            n as f64 / e.as_secs_f64(),
            e.as_secs_f64() * 1e6 / (n / batch) as f64
        );
    }
    for batch in [1usize, 64, 256, 1024] {
        let n = 200_000usize.min(batch * 2000);
        let db = Database::create(dir.path().join(format!("redb{batch}"))).expect("redb");
        let mut seq = 0u64;
        let started = Instant::now();
        for _ in 0..n / batch {
            let tx = db.begin_write().expect("txn");
            {
                let mut t = tx.open_table(T).expect("table");
                for _ in 0..batch {
                    seq += 1;
                    t.insert((1, seq), record.as_slice()).expect("insert");
                }
            }
            tx.commit().expect("commit");
        }
        let e = started.elapsed();
        println!(
            "redb Immediate commit, batch {batch:>4}: {:>9.0} rec/s ({:.0} us per commit)",
            n as f64 / e.as_secs_f64(),
            e.as_secs_f64() * 1e6 / (n / batch) as f64
        );
        let started = Instant::now();
        let mut s = 0u64;
        while s < seq {
            let mut tx = db.begin_write().expect("txn");
            tx.set_durability(Durability::None).expect("durability");
            {
                let mut t = tx.open_table(T).expect("table");
                for _ in 0..batch {
                    s += 1;
                    t.remove((1, s)).expect("remove");
                }
            }
            tx.commit().expect("commit");
        }
        let e = started.elapsed();
        println!(
            "redb None-durability delete (ack path), batch {batch:>4}: {:>9.0} rec/s",
            n as f64 / e.as_secs_f64()
        );
    }
}
