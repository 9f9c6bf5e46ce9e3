//! Queue: the durable queue end to end. Producers submit 256-byte messages in batches while
//! consumers receive and ack them; the rate is messages acknowledged by consumers per second,
//! from the first submit to the last ack. The same workload runs against agentmesh (a real
//! `agentmesh serve` process over gRPC, on its embedded store and on Redis), Redis Streams
//! (XADD pipelines, XREADGROUP, batched XACK) and NATS JetStream (file storage, batched
//! publish with async acks, pull consumers, explicit acks). Both Redis runs use AOF with
//! `appendfsync everysec`. Each run reports the CPU it cost the server processes per 1k
//! messages, and the node's CPU over idle seconds after its run.
//!
//! Knobs: `AGENTMESH_BENCH_MESSAGES`, `AGENTMESH_BENCH_PRODUCERS` (4), `AGENTMESH_BENCH_BATCH`
//! (500 per submit), `AGENTMESH_BENCH_CONSUMERS` (4), `AGENTMESH_BENCH_PREFETCH` (1024),
//! `AGENTMESH_BENCH_QUEUE_ROUNDS` (1; the best round counts), `AGENTMESH_BENCH_QUEUE_ONLY`
//! (agentmesh|agentmesh-redis|redis|nats), `AGENTMESH_BENCH_SPLIT` (set: also time agentmesh's
//! submit and consume halves on their own first).

use std::{
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use agentmesh_proto::v1::{
    ConsumeAck, ConsumeAckBatch, ConsumeRequest, ConsumeSubscribe, Envelope,
    consume_request::Action, consume_response::Event, envelope::Payload,
    queue_service_client::QueueServiceClient,
};
use agentmesh_sdk::MeshClient;

use crate::{
    harness::{Pinning, Settings, cpu_seconds, progress, start_node},
    report::{Check, Section, Table, Target, number},
};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

const BODY_BYTES: usize = 256;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Debug, Clone, Copy)]
struct Workload {
    messages: u64,
    producers: u64,
    batch: u64,
    consumers: u64,
    prefetch: u64,
    max_batch: u64,
}

impl Workload {
    fn new(messages: u64) -> Self {
        Self {
            messages,
            producers: env_or("AGENTMESH_BENCH_PRODUCERS", 4).max(1),
            batch: env_or("AGENTMESH_BENCH_BATCH", 500).max(1),
            consumers: env_or("AGENTMESH_BENCH_CONSUMERS", 4).max(1),
            prefetch: env_or("AGENTMESH_BENCH_PREFETCH", 1024).max(1),
            // Like XREADGROUP COUNT + one XACK: a fetch's deliveries in one frame, acked in one.
            max_batch: env_or("AGENTMESH_BENCH_MAX_BATCH", 1024).max(1),
        }
    }

    /// How many messages producer `p` sends.
    fn share(&self, p: u64) -> u64 {
        self.messages / self.producers + u64::from(p < self.messages % self.producers)
    }
}

/// What one run measured.
#[derive(Debug, Clone, Copy)]
struct Measured {
    /// Messages per second, first submit to last ack.
    end_to_end: f64,
    /// Messages per second the producers got acknowledged (while consumers ran).
    submit: f64,
    /// CPU ms per 1k messages of the node (agentmesh runs) or of redis-server (Redis runs).
    server_cpu: Option<f64>,
    /// CPU ms per 1k messages of redis-server under a node on Redis.
    store_cpu: Option<f64>,
    /// The node's CPU seconds over the idle seconds after its run.
    idle_cpu: Option<f64>,
}

fn body() -> Vec<u8> {
    (0..BODY_BYTES).map(|i| b'a' + (i % 26) as u8).collect()
}

/// Waits until `done` reaches `target`; returns the elapsed time.
async fn until_done(done: &AtomicU64, target: u64, started: Instant) -> Duration {
    let limit = Duration::from_secs(600);
    while done.load(Ordering::Relaxed) < target {
        assert!(
            started.elapsed() < limit,
            "the run did not finish in 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    started.elapsed()
}

// ---------------------------------------------------------------------------
// agentmesh

/// Deletes the keys a run left under `prefix`.
pub(crate) async fn delete_keys(url: &str, prefix: &str) {
    let Ok(client) = redis::Client::open(url) else {
        return;
    };
    let Ok(mut con) = client.get_multiplexed_async_connection().await else {
        return;
    };
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut con)
        .await
        .unwrap_or_default();
    for chunk in keys.chunks(512) {
        let _: Result<(), _> = redis::cmd("DEL").arg(chunk).query_async(&mut con).await;
    }
}

/// agentmesh end to end: a real node on its embedded store, or with `store` (a Redis URL)
/// on Redis under a key prefix of this run's own.
async fn agentmesh(w: Workload, store: Option<&str>, idle_secs: u64) -> Measured {
    let data = tempfile::tempdir().expect("temp dir");
    let prefix = format!("bench-{}", uuid::Uuid::now_v7().simple());
    let mut shared = Vec::new();
    let mut aof = None;
    if let Some(url) = store {
        let mut admin = redis::Client::open(url)
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to redis");
        let saved = aof_everysec(&mut admin).await;
        aof = Some((admin, saved));
        shared.extend(["--store".to_owned(), url.to_owned()]);
        shared.extend(["--set".to_owned(), format!("store.key_prefix={prefix}")]);
    }
    let shared: Vec<&str> = shared.iter().map(String::as_str).collect();
    let (node, address) = start_node(Pinning(false), "node", data.path(), &shared);
    let probe = MeshClient::connect_lazy(&address).unwrap();
    let up = Instant::now();
    while probe.list_queues().await.is_err() {
        assert!(up.elapsed() < Duration::from_secs(20), "node did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let acked = Arc::new(AtomicU64::new(0));
    if std::env::var_os("AGENTMESH_BENCH_SPLIT").is_some() {
        // Diagnostics: the two halves on their own.
        let started = Instant::now();
        agentmesh_producers(&address, w).await;
        let submitted = started.elapsed();
        let started = Instant::now();
        let consumers = agentmesh_consumers(&address, w, &acked).await;
        let consumed = until_done(&acked, w.messages, started).await;
        for c in consumers {
            c.abort();
        }
        progress(
            "queue",
            format!(
                "agentmesh split: submit alone {:.0} msgs/s, consume+ack alone {:.0} msgs/s",
                w.messages as f64 / submitted.as_secs_f64(),
                w.messages as f64 / consumed.as_secs_f64()
            ),
        );
        acked.store(0, Ordering::Relaxed);
    }
    // Consumers first, then the producers; the clock runs from the first submit.
    let consumers = agentmesh_consumers(&address, w, &acked).await;
    let node_cpu = cpu_seconds(node.pid());
    let store_cpu = store
        .and_then(|_| server_pid("redis-server"))
        .map(|pid| (pid, cpu_seconds(pid)));
    let started = Instant::now();
    agentmesh_producers(&address, w).await;
    let submitted = started.elapsed();
    let elapsed = until_done(&acked, w.messages, started).await;
    let per_1k = |before: Option<f64>, pid: u32| {
        let used = cpu_seconds(pid)? - before?;
        Some(used * 1e3 / w.messages as f64 * 1e3)
    };
    let server_cpu = per_1k(node_cpu, node.pid());
    let store_cpu = store_cpu.and_then(|(pid, before)| per_1k(before, pid));
    for c in consumers {
        c.abort();
    }
    let idle_cpu = idle_cpu_after_load(node.pid(), idle_secs).await;
    if let Some(url) = store {
        drop(node);
        delete_keys(url, &prefix).await;
    }
    if let Some((mut admin, saved)) = aof {
        aof_restore(&mut admin, saved).await;
    }
    Measured {
        end_to_end: w.messages as f64 / elapsed.as_secs_f64(),
        submit: w.messages as f64 / submitted.as_secs_f64(),
        server_cpu,
        store_cpu,
        idle_cpu,
    }
}

/// The pid of the local server process called `name` (its CPU is reported; loopback only).
fn server_pid(name: &str) -> Option<u32> {
    let out = Command::new("pgrep").args(["-x", name]).output().ok()?;
    String::from_utf8(out.stdout)
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// The CPU seconds the node uses over `secs` idle seconds after the load run (its clients
/// gone): an idle node must not spin.
async fn idle_cpu_after_load(pid: u32, secs: u64) -> Option<f64> {
    if secs == 0 {
        return None;
    }
    // Let the consumers' streams close and the last acks flush.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = cpu_seconds(pid)?;
    tokio::time::sleep(Duration::from_secs(secs)).await;
    Some(cpu_seconds(pid)? - before)
}

const AGENTMESH_QUEUE: &str = "bench";

/// Consumers, each on its own connection, with prefetch, acks pipelined on the stream.
async fn agentmesh_consumers(
    address: &str,
    w: Workload,
    acked: &Arc<AtomicU64>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut consumers = Vec::new();
    for c in 0..w.consumers {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .unwrap()
            .tcp_nodelay(true)
            .connect()
            .await
            .unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(ConsumeRequest {
            action: Some(Action::Subscribe(ConsumeSubscribe {
                queue: AGENTMESH_QUEUE.into(),
                prefetch: w.prefetch as u32,
                lease: prost_types::Duration::try_from(Duration::from_secs(60)).ok(),
                consumer_id: format!("bench-{c}"),
                max_batch: w.max_batch as u32,
            })),
        })
        .unwrap();
        let mut inbound = QueueServiceClient::new(channel)
            .consume(UnboundedReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let acked = acked.clone();
        consumers.push(tokio::spawn(async move {
            while let Ok(Some(response)) = inbound.message().await {
                match response.event {
                    Some(Event::Delivery(d)) => {
                        let _ = tx.send(ConsumeRequest {
                            action: Some(Action::Ack(ConsumeAck {
                                receipt: d.receipt,
                                result: None,
                            })),
                        });
                    }
                    Some(Event::Deliveries(batch)) => {
                        let acks = batch
                            .deliveries
                            .into_iter()
                            .map(|d| ConsumeAck {
                                receipt: d.receipt,
                                result: None,
                            })
                            .collect();
                        let _ = tx.send(ConsumeRequest {
                            action: Some(Action::Acks(ConsumeAckBatch { acks })),
                        });
                    }
                    Some(Event::Receipt(r)) => {
                        assert!(r.error.is_none(), "ack refused: {r:?}");
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(Event::Receipts(batch)) => {
                        for r in &batch.receipts {
                            assert!(r.error.is_none(), "ack refused: {r:?}");
                        }
                        acked.fetch_add(batch.receipts.len() as u64, Ordering::Relaxed);
                    }
                    None => {}
                }
            }
        }));
    }
    consumers
}

/// Producers submitting batches; returns when every message was acknowledged.
async fn agentmesh_producers(address: &str, w: Workload) {
    let body = body();
    let mut producers = Vec::new();
    for p in 0..w.producers {
        let client = MeshClient::connect_lazy(address).unwrap();
        let body = body.clone();
        let share = w.share(p);
        producers.push(tokio::spawn(async move {
            let mut sent = 0;
            while sent < share {
                let n = w.batch.min(share - sent);
                let envelopes = (0..n).map(|_| Envelope {
                    r#type: "bench".into(),
                    payload: Some(Payload::Binary(body.clone())),
                    ..Default::default()
                });
                let response = client
                    .submit(AGENTMESH_QUEUE, envelopes)
                    .await
                    .expect("submit");
                assert_eq!(u64::from(response.accepted), n);
                sent += n;
            }
        }));
    }
    for p in producers {
        p.await.unwrap();
    }
}

// ---------------------------------------------------------------------------
// Redis Streams

async fn redis_config(con: &mut redis::aio::MultiplexedConnection, key: &str) -> String {
    let pair: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg(key)
        .query_async(con)
        .await
        .expect("CONFIG GET");
    pair.get(1).cloned().unwrap_or_default()
}

async fn redis_set(con: &mut redis::aio::MultiplexedConnection, key: &str, value: &str) {
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg(key)
        .arg(value)
        .query_async(con)
        .await
        .expect("CONFIG SET");
}

async fn aof_rewrite_done(con: &mut redis::aio::MultiplexedConnection) {
    for _ in 0..600 {
        let info: String = redis::cmd("INFO")
            .arg("persistence")
            .query_async(con)
            .await
            .expect("INFO");
        if info.contains("aof_rewrite_in_progress:0") && !info.contains("aof_rewrite_scheduled:1") {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Turns on AOF with `appendfsync everysec` (what both Redis runs are measured with) and returns
/// the settings to restore.
async fn aof_everysec(admin: &mut redis::aio::MultiplexedConnection) -> (String, String) {
    let saved = (
        redis_config(admin, "appendonly").await,
        redis_config(admin, "appendfsync").await,
    );
    redis_set(admin, "appendonly", "yes").await;
    redis_set(admin, "appendfsync", "everysec").await;
    aof_rewrite_done(admin).await;
    saved
}

async fn aof_restore(admin: &mut redis::aio::MultiplexedConnection, saved: (String, String)) {
    redis_set(admin, "appendfsync", &saved.1).await;
    redis_set(admin, "appendonly", &saved.0).await;
}

async fn redis_streams(url: &str, w: Workload) -> Measured {
    let client = redis::Client::open(url).expect("redis url");
    let mut admin = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis");
    let saved = aof_everysec(&mut admin).await;
    let key = "agentmesh:bench:stream";
    let group = "workers";
    let () = redis::cmd("DEL")
        .arg(key)
        .query_async(&mut admin)
        .await
        .unwrap();
    let () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(key)
        .arg(group)
        .arg("$")
        .arg("MKSTREAM")
        .query_async(&mut admin)
        .await
        .unwrap();

    let acked = Arc::new(AtomicU64::new(0));
    let mut consumers = Vec::new();
    for c in 0..w.consumers {
        // Its own connection: XREADGROUP BLOCK would hold up a shared one.
        let mut con = client.get_multiplexed_async_connection().await.unwrap();
        let acked = acked.clone();
        let target = w.messages;
        let count = w.prefetch;
        consumers.push(tokio::spawn(async move {
            let name = format!("c{c}");
            while acked.load(Ordering::Relaxed) < target {
                let reply: Option<redis::streams::StreamReadReply> = redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(group)
                    .arg(&name)
                    .arg("COUNT")
                    .arg(count)
                    .arg("BLOCK")
                    .arg(100)
                    .arg("STREAMS")
                    .arg(key)
                    .arg(">")
                    .query_async(&mut con)
                    .await
                    .expect("XREADGROUP");
                let Some(reply) = reply else { continue };
                let ids: Vec<String> = reply
                    .keys
                    .into_iter()
                    .flat_map(|k| k.ids.into_iter().map(|id| id.id))
                    .collect();
                if ids.is_empty() {
                    continue;
                }
                let n: u64 = redis::cmd("XACK")
                    .arg(key)
                    .arg(group)
                    .arg(&ids)
                    .query_async(&mut con)
                    .await
                    .expect("XACK");
                acked.fetch_add(n, Ordering::Relaxed);
            }
        }));
    }
    let body = body();
    let redis_cpu = server_pid("redis-server").map(|pid| (pid, cpu_seconds(pid)));
    let started = Instant::now();
    let mut producers = Vec::new();
    for p in 0..w.producers {
        let mut con = client.get_multiplexed_async_connection().await.unwrap();
        let body = body.clone();
        let share = w.share(p);
        producers.push(tokio::spawn(async move {
            let mut sent = 0;
            while sent < share {
                let n = w.batch.min(share - sent);
                let mut pipe = redis::pipe();
                for _ in 0..n {
                    pipe.cmd("XADD")
                        .arg(key)
                        .arg("*")
                        .arg("d")
                        .arg(&body)
                        .ignore();
                }
                let () = pipe.query_async(&mut con).await.expect("XADD pipeline");
                sent += n;
            }
        }));
    }
    for p in producers {
        p.await.unwrap();
    }
    let submitted = started.elapsed();
    let elapsed = until_done(&acked, w.messages, started).await;
    let server_cpu = redis_cpu
        .and_then(|(pid, before)| Some((cpu_seconds(pid)? - before?) * 1e6 / w.messages as f64));
    for c in consumers {
        let _ = c.await;
    }
    let () = redis::cmd("DEL")
        .arg(key)
        .query_async(&mut admin)
        .await
        .unwrap();
    aof_restore(&mut admin, saved).await;
    Measured {
        end_to_end: w.messages as f64 / elapsed.as_secs_f64(),
        submit: w.messages as f64 / submitted.as_secs_f64(),
        server_cpu,
        store_cpu: None,
        idle_cpu: None,
    }
}

// ---------------------------------------------------------------------------
// NATS JetStream

async fn nats_jetstream(address: &str, w: Workload) -> Measured {
    use async_nats::jetstream::{self, consumer, stream};
    let client = async_nats::connect(address).await.expect("connect to nats");
    let js = jetstream::new(client);
    let name = "AGENTMESH_BENCH";
    let subject = "agentmesh.bench";
    let _ = js.delete_stream(name).await;
    let stream = js
        .create_stream(stream::Config {
            name: name.into(),
            subjects: vec![subject.into()],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::WorkQueue,
            ..Default::default()
        })
        .await
        .expect("create stream");
    stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some("workers".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            max_ack_pending: (w.prefetch * w.consumers) as i64,
            ..Default::default()
        })
        .await
        .expect("create consumer");

    let acked = Arc::new(AtomicU64::new(0));
    let mut consumers = Vec::new();
    for _ in 0..w.consumers {
        let client = async_nats::connect(address).await.unwrap();
        let js = jetstream::new(client);
        let consumer: consumer::PullConsumer = js
            .get_stream(name)
            .await
            .unwrap()
            .get_consumer("workers")
            .await
            .unwrap();
        let acked = acked.clone();
        let prefetch = w.prefetch as usize;
        consumers.push(tokio::spawn(async move {
            let mut messages = consumer
                .stream()
                .max_messages_per_batch(prefetch)
                .messages()
                .await
                .expect("pull consumer");
            while let Some(message) = messages.next().await {
                let message = message.expect("message");
                message.ack().await.expect("ack");
                acked.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let body = bytes::Bytes::from(body());
    let nats_cpu = server_pid("nats-server").map(|pid| (pid, cpu_seconds(pid)));
    let started = Instant::now();
    let mut producers = Vec::new();
    for p in 0..w.producers {
        let js = js.clone();
        let body = body.clone();
        let share = w.share(p);
        producers.push(tokio::spawn(async move {
            let mut sent = 0;
            while sent < share {
                let n = w.batch.min(share - sent);
                let mut acks = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    acks.push(js.publish(subject, body.clone()).await.expect("publish"));
                }
                for ack in futures::future::join_all(
                    acks.into_iter().map(std::future::IntoFuture::into_future),
                )
                .await
                {
                    ack.expect("publish ack");
                }
                sent += n;
            }
        }));
    }
    for p in producers {
        p.await.unwrap();
    }
    let submitted = started.elapsed();
    let elapsed = until_done(&acked, w.messages, started).await;
    for c in consumers {
        c.abort();
    }
    let server_cpu = nats_cpu
        .and_then(|(pid, before)| Some((cpu_seconds(pid)? - before?) * 1e6 / w.messages as f64));
    let _ = js.delete_stream(name).await;
    Measured {
        end_to_end: w.messages as f64 / elapsed.as_secs_f64(),
        submit: w.messages as f64 / submitted.as_secs_f64(),
        server_cpu,
        store_cpu: None,
        idle_cpu: None,
    }
}

// ---------------------------------------------------------------------------

fn best(runs: &[Measured]) -> Option<Measured> {
    runs.iter()
        .copied()
        .max_by(|a, b| a.end_to_end.total_cmp(&b.end_to_end))
}

/// Flushes what the previous system left to write back (`sync`) and lets the disk go quiet,
/// so no system's run pays for another's writes: the three share one disk.
fn settle_disk() {
    let _ = Command::new("sync").status();
    std::thread::sleep(Duration::from_millis(500));
}

/// Every system, `AGENTMESH_BENCH_QUEUE_ROUNDS` times (the best round counts), then the
/// ratios the targets ask for.
pub(crate) async fn run(s: Settings) -> Section {
    let w = Workload::new(s.messages);
    let rounds = env_or("AGENTMESH_BENCH_QUEUE_ROUNDS", 1).max(1);
    let only = std::env::var("AGENTMESH_BENCH_QUEUE_ONLY").unwrap_or_default();
    let wants = |name: &str| only.is_empty() || only == name;
    let redis_url = std::env::var("AGENTMESH_TEST_REDIS").ok();
    let nats_address = std::env::var("AGENTMESH_TEST_NATS").ok();
    let mut notes = Vec::new();
    if redis_url.is_none() {
        notes.push(
            "AGENTMESH_TEST_REDIS is not set: no Redis Streams and no node on Redis.".to_owned(),
        );
    }
    if nats_address.is_none() {
        notes.push("AGENTMESH_TEST_NATS is not set: no NATS JetStream.".to_owned());
    }
    let systems: [(&str, &str, Option<&String>); 4] = [
        ("agentmesh", "agentmesh, embedded store", None),
        ("agentmesh-redis", "agentmesh on Redis", redis_url.as_ref()),
        ("redis", "Redis Streams", redis_url.as_ref()),
        ("nats", "NATS JetStream", nats_address.as_ref()),
    ];
    let mut results: Vec<(&str, &str, Vec<Measured>)> = Vec::new();
    for (key, name, _) in systems {
        results.push((key, name, Vec::new()));
    }
    for round in 0..rounds {
        for (i, (key, name, address)) in systems.iter().enumerate() {
            let needs_address = *key != "agentmesh";
            if !wants(key) || (needs_address && address.is_none()) {
                continue;
            }
            progress(
                "queue",
                format!("{name}: {} messages, round {}", w.messages, round + 1),
            );
            settle_disk();
            let m = match *key {
                "agentmesh" => agentmesh(w, None, s.idle_secs).await,
                "agentmesh-redis" => agentmesh(w, address.map(String::as_str), s.idle_secs).await,
                "redis" => redis_streams(address.unwrap(), w).await,
                _ => nats_jetstream(address.unwrap(), w).await,
            };
            progress(
                "queue",
                format!("{name}: {:.0} msgs/s end to end", m.end_to_end),
            );
            results[i].2.push(m);
        }
    }

    let mut table = Table::new(&[
        "system",
        "msgs/s end to end",
        "submits acked msgs/s",
        "server CPU ms/1k",
        "redis-server CPU ms/1k",
        "node idle CPU s after",
    ]);
    let opt = |v: Option<f64>| v.map_or_else(|| "–".to_owned(), number);
    let bests: Vec<Option<Measured>> = results.iter().map(|(_, _, runs)| best(runs)).collect();
    for ((_, name, _), m) in results.iter().zip(&bests) {
        if let Some(m) = m {
            table.row(vec![
                (*name).to_owned(),
                number(m.end_to_end),
                number(m.submit),
                opt(m.server_cpu),
                opt(m.store_cpu),
                opt(m.idle_cpu),
            ]);
        }
    }
    let [embedded, on_redis, redis, nats] = [bests[0], bests[1], bests[2], bests[3]];
    let mut checks = Vec::new();
    if let Some(ours) = embedded {
        for (name, theirs) in [
            ("Redis Streams (AOF everysec)", redis),
            ("NATS JetStream", nats),
        ] {
            if let Some(theirs) = theirs {
                checks.push(Check::ratio(
                    "queue end to end, embedded store (fsync'd acks)",
                    ours.end_to_end,
                    "msgs/s",
                    (name, theirs.end_to_end),
                    Target::RatioAtLeast(1.0),
                ));
            }
        }
    }
    if let (Some(ours), Some(theirs)) = (on_redis, redis) {
        checks.push(Check::ratio(
            "queue end to end, node on Redis",
            ours.end_to_end,
            "msgs/s",
            ("Redis Streams", theirs.end_to_end),
            Target::RatioAtLeast(0.8),
        ));
    }
    Section {
        title: "Durable queue",
        setup: format!(
            "{} messages of {BODY_BYTES} bytes: {} producers submitting batches of {}, {} consumers with prefetch {} (agentmesh: up to {} deliveries per frame), acks batched; best of {rounds}. The embedded store acknowledges a submit once it is fsync'd; both Redis runs use AOF with `appendfsync everysec`; NATS JetStream uses file storage. Server CPU is the node's, redis-server's or nats-server's, per 1k messages; the last column is the node's CPU over {} idle seconds after its run.",
            w.messages, w.producers, w.batch, w.consumers, w.prefetch, w.max_batch, s.idle_secs
        ),
        tables: vec![table],
        checks,
        notes,
    }
}
