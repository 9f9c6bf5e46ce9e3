//! Throughput of the embedded backend (plain `main`, `harness = false`).
//!
//! `cargo bench -p agentmesh-queue --bench queue_throughput` measures, with 256-byte bodies:
//! durable submit throughput (many tasks, one message per call; and fewer tasks, 64 per call),
//! and submit→receive→ack end to end. It prints msgs/s and the average number of messages per
//! fsync'd commit (group-commit batch size).
//! `-- --engine` instead compares raw append+fdatasync with redb commits (the engine choice).
//! `-- --quick` runs smaller counts.
//! `-- --depth` fills a queue with 400k 1-KiB messages and reports the peak RSS (memory bound).
//!
//! fsync latency on a shared virtual disk varies a lot with other I/O, so every run first
//! measures and prints the current fdatasync latency: compare numbers only against it.

use agentmesh_queue::{BackendConfig, EmbeddedBackend, IoStats, NewMessage, QueueBackend};
use bytes::Bytes;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const BODY: usize = 256;

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
        submit_bench(
            "durable submit, 64 tasks x 1 msg/call",
            64,
            1,
            25_000 * scale,
        )
        .await;
        submit_bench(
            "durable submit, 256 tasks x 1 msg/call",
            256,
            1,
            25_000 * scale,
        )
        .await;
        submit_bench(
            "durable submit, 8 tasks x 64 msgs/call",
            8,
            64,
            50_000 * scale,
        )
        .await;
        end_to_end_bench(
            "submit->receive->ack, 16 producers x 16 msgs/call, 4 consumers x 256/receive",
            16,
            16,
            4,
            25_000 * scale,
        )
        .await;
    });
}

fn open() -> (tempfile::TempDir, Arc<EmbeddedBackend>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let b = EmbeddedBackend::open(dir.path(), BackendConfig::default()).expect("open");
    (dir, Arc::new(b))
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

async fn submit_bench(name: &str, tasks: usize, per_call: usize, total: usize) {
    let (_dir, b) = open();
    let body = Bytes::from(vec![0x5au8; BODY]);
    let calls_per_task = total / tasks / per_call;
    let before = b.io_stats();
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
    let elapsed = started.elapsed();
    report(
        name,
        (calls_per_task * tasks * per_call) as u64,
        elapsed,
        before,
        b.io_stats(),
    );
}

async fn end_to_end_bench(
    name: &str,
    producers: usize,
    per_call: usize,
    consumers: usize,
    total: usize,
) {
    let (_dir, b) = open();
    let body = Bytes::from(vec![0x5au8; BODY]);
    let calls_per_task = total / producers / per_call;
    let total = (calls_per_task * producers * per_call) as u64;
    let acked = Arc::new(AtomicU64::new(0));
    let before = b.io_stats();
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
                let acks = got.iter().map(|m| b.ack(&m.receipt, None));
                for r in futures::future::join_all(acks).await {
                    r.expect("ack");
                }
                acked.fetch_add(n, Ordering::Relaxed);
            }
        }));
    }
    for h in handles {
        h.await.expect("task");
    }
    let elapsed = started.elapsed();
    report(name, total, elapsed, before, b.io_stats());
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
        let (dir, b) = open();
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
