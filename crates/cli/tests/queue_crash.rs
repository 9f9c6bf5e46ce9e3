//! The durable queue at the process level: the real `agentmesh` binary is
//! killed with SIGKILL in the middle of a submit storm and restarted on the
//! same data directory; every message whose submit was acknowledged must be
//! delivered afterwards. Also: a data directory that cannot be used stops
//! `serve` with a clear error, and a full disk fails submits with a clear error
//! while the node keeps serving, and is used again once space is freed.

use std::{
    collections::{HashMap, HashSet},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use agentmesh_proto::v1::{
    ConsumeAck, ConsumeRequest, ConsumeSubscribe, Envelope, SubmitStatus, consume_request::Action,
    consume_response::Event, queue_service_client::QueueServiceClient,
};
use agentmesh_sdk::MeshClient;
use agentmesh_tests::{NodeProcess, free_port};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const BIN: &str = env!("CARGO_BIN_EXE_agentmesh");

/// `agentmesh serve` on a fresh port over `data_dir`.
async fn start_node(data_dir: &std::path::Path) -> NodeProcess {
    NodeProcess::start(BIN, data_dir, &[]).await
}

/// Submits batches from several tasks until the node dies; returns every acknowledged id.
async fn storm(client: MeshClient, tasks: usize, batch: usize) -> Arc<Mutex<HashSet<String>>> {
    let accepted = Arc::new(Mutex::new(HashSet::new()));
    for t in 0..tasks {
        let client = client.clone();
        let accepted = accepted.clone();
        tokio::spawn(async move {
            let body = "x".repeat(200);
            for round in 0u64.. {
                let envelopes = (0..batch).map(|i| {
                    Envelope::json(
                        "storm",
                        serde_json::json!({ "t": t, "r": round, "i": i, "pad": body }),
                    )
                });
                match client.submit("storm", envelopes).await {
                    Ok(response) => {
                        let mut set = accepted.lock().unwrap();
                        for outcome in response.outcomes {
                            assert_eq!(outcome.status, SubmitStatus::Accepted as i32);
                            set.insert(outcome.message_id);
                        }
                    }
                    Err(_) => return,
                }
            }
        });
    }
    accepted
}

/// Opens a `Consume` stream on `queue` (60 s leases): the sender for acks and the deliveries.
async fn subscribe(
    client: &MeshClient,
    queue: &str,
    prefetch: u32,
    consumer: &str,
) -> (
    mpsc::Sender<ConsumeRequest>,
    tonic::Streaming<agentmesh_proto::v1::ConsumeResponse>,
) {
    let (tx, rx) = mpsc::channel(4096);
    tx.send(ConsumeRequest {
        action: Some(Action::Subscribe(ConsumeSubscribe {
            queue: queue.into(),
            prefetch,
            lease: prost_types::Duration::try_from(Duration::from_secs(60)).ok(),
            consumer_id: consumer.into(),
            max_batch: 0,
        })),
    })
    .await
    .unwrap();
    let inbound = QueueServiceClient::new(client.channel())
        .consume(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, inbound)
}

/// Consumes `queue` until it stays empty for `idle`; returns how often each id came.
async fn drain(client: &MeshClient, queue: &str, idle: Duration) -> HashMap<String, u32> {
    let (tx, mut inbound) = subscribe(client, queue, 512, "drain").await;
    let mut seen: HashMap<String, u32> = HashMap::new();
    while let Ok(Ok(Some(response))) = tokio::time::timeout(idle, inbound.message()).await {
        if let Some(Event::Delivery(d)) = response.event {
            *seen.entry(d.envelope.unwrap().id).or_default() += 1;
            tx.send(ConsumeRequest {
                action: Some(Action::Ack(ConsumeAck {
                    receipt: d.receipt,
                    result: None,
                })),
            })
            .await
            .unwrap();
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_storm_loses_no_acknowledged_message() {
    let data = tempfile::tempdir().unwrap();
    let mut node = start_node(data.path()).await;
    let accepted = storm(node.client(), 8, 64).await;
    // Kill once the storm is well under way.
    let until = Instant::now() + Duration::from_secs(20);
    while accepted.lock().unwrap().len() < 5_000 {
        assert!(Instant::now() < until, "the storm did not get going");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    node.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let acked: HashSet<String> = accepted.lock().unwrap().clone();

    let node = start_node(data.path()).await;
    let seen = drain(&node.client(), "storm", Duration::from_secs(3)).await;
    let lost: Vec<&String> = acked.iter().filter(|id| !seen.contains_key(*id)).collect();
    let duplicates: u32 = seen.values().map(|c| c - 1).sum();
    let unacknowledged = seen.keys().filter(|id| !acked.contains(*id)).count();
    println!(
        "crash test: {} submits acknowledged before SIGKILL, {} delivered after restart, \
         {} lost, {} duplicate deliveries, {} durable but unacknowledged (in flight at the kill)",
        acked.len(),
        seen.len(),
        lost.len(),
        duplicates,
        unacknowledged
    );
    assert!(
        lost.is_empty(),
        "{} acknowledged messages were lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    let s = node.client().list_queues().await.unwrap();
    let storm = s.iter().find(|q| q.name == "storm").unwrap();
    assert_eq!((storm.depth, storm.in_flight), (0, 0), "{storm:?}");
}

fn serve_fails_with(data_dir: &std::path::Path) -> String {
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .env("AGENTMESH_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "serve started on {data_dir:?}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

#[test]
fn serve_exits_with_a_clear_error_on_an_unusable_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    // A regular file where the directory should be.
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let stderr = serve_fails_with(&file);
    assert!(stderr.contains(&file.display().to_string()), "{stderr}");
    assert!(stderr.contains("queue store"), "{stderr}");
    // A directory below a file.
    let below = file.join("data");
    let stderr = serve_fails_with(&below);
    assert!(stderr.contains(&below.display().to_string()), "{stderr}");
    // A data directory another node has open.
    let held = dir.path().join("held");
    let node = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--data-dir",
        ])
        .arg(&held)
        .env("AGENTMESH_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut node = scopeguard(node);
    let until = Instant::now() + Duration::from_secs(10);
    while !held.join(agentmesh_queue::DATABASE_FILE).exists() {
        assert!(Instant::now() < until);
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    let stderr = serve_fails_with(&held);
    assert!(stderr.contains(&held.display().to_string()), "{stderr}");
    let _ = node.0.kill();
}

/// Kills the child on drop.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn scopeguard(child: Child) -> Guard {
    Guard(child)
}

/// `AGENTMESH_TEST_UNSHARE` names util-linux `unshare`, which runs the node on a small tmpfs
/// in a user and mount namespace of its own, so the disk really fills up (no privileges
/// needed beyond user namespaces).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs AGENTMESH_TEST_UNSHARE"]
async fn full_disk_fails_submits_clearly_and_freed_space_is_used_again() {
    let unshare = agentmesh_tests::outside_tool(
        "AGENTMESH_TEST_UNSHARE",
        "util-linux `unshare`, able to create user and mount namespaces",
    );
    let mount = tempfile::tempdir().unwrap();
    let address = format!("127.0.0.1:{}", free_port());
    // A 4 MiB tmpfs, 1 MiB of it taken by a ballast file, and the node's data dir on it.
    let script = r#"mount -t tmpfs -o size=4m tmpfs "$0" && head -c 1048576 /dev/zero > "$0/ballast" && exec "$1" serve --listen "$2" --data-dir "$0/queue""#;
    let child = Command::new(unshare)
        .args(["--user", "--map-root-user", "--mount", "sh", "-c", script])
        .arg(mount.path())
        .arg(BIN)
        .arg(&address)
        .env("AGENTMESH_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let node = NodeProcess::adopt(child, address).await;
    // `unshare` and `sh` exec, so the child is the node; its mounts show under /proc/<pid>/root.
    let ballast = std::path::PathBuf::from(format!("/proc/{}/root", node.child.id()))
        .join(mount.path().strip_prefix("/").unwrap())
        .join("ballast");
    assert!(ballast.exists(), "no ballast at {}", ballast.display());

    let client = node.client();
    let pad = "x".repeat(1000);
    let mut accepted = HashSet::new();
    let full = loop {
        let envelopes =
            (0..100).map(|i| Envelope::json("fill", serde_json::json!({ "i": i, "pad": pad })));
        match client.submit("fill", envelopes).await {
            Ok(response) => {
                for o in response.outcomes {
                    if o.status == SubmitStatus::Accepted as i32 {
                        accepted.insert(o.message_id);
                    } else {
                        // Part of the call was stored: the rest is rejected with the reason.
                        assert!(o.reason.contains("full"), "{o:?}");
                    }
                }
            }
            Err(status) => break status,
        }
        assert!(accepted.len() < 20_000, "the 4 MiB disk never filled up");
    };
    assert_eq!(full.code(), tonic::Code::ResourceExhausted, "{full:?}");
    assert!(
        full.message().contains("full") && full.message().contains("No space left"),
        "{full:?}"
    );
    let info = tonic_types::StatusExt::get_error_details(&full)
        .error_info()
        .cloned()
        .expect("ErrorInfo");
    assert_eq!(info.reason, "QUEUE_STORAGE_FULL");
    // Over HTTP: 507 Insufficient Storage, with the same reason. (Space a failed commit had
    // taken is free again after it, so a small message may still fit: send until one fails.)
    let http = reqwest::Client::new();
    let big_pad = "y".repeat(20_000);
    let mut tries = 0;
    let body: serde_json::Value = loop {
        let response = http
            .post(format!("http://{}/v1/queues/fill/messages", node.address))
            .json(&serde_json::json!({ "json": { "pad": big_pad } }))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body: serde_json::Value = response.json().await.unwrap();
        if status == 507 {
            break body;
        }
        assert_eq!(status, 201, "{body}");
        for o in body["outcomes"].as_array().unwrap() {
            if o["status"] == "SUBMIT_STATUS_ACCEPTED" {
                accepted.insert(o["messageId"].as_str().unwrap().to_owned());
            }
        }
        tries += 1;
        assert!(tries < 200, "HTTP submits never hit the full disk");
    };
    assert_eq!(body["error"]["code"], "RESOURCE_EXHAUSTED", "{body}");
    assert_eq!(
        body["error"]["details"][0]["reason"], "QUEUE_STORAGE_FULL",
        "{body}"
    );
    // The node keeps serving, and everything accepted is there (a commit that failed may have
    // stored a message it did not acknowledge: at least once, never less).
    let queues = client.list_queues().await.unwrap();
    let fill = queues.iter().find(|q| q.name == "fill").unwrap();
    assert!(
        fill.depth >= accepted.len() as u64,
        "{fill:?} < {}",
        accepted.len()
    );

    // Freed space is used again, without a restart.
    std::fs::remove_file(&ballast).unwrap();
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        let envelope = Envelope::json("fill", serde_json::json!({ "after": "space freed" }));
        match client.submit("fill", [envelope]).await {
            Ok(response) if response.accepted == 1 => {
                accepted.insert(response.outcomes[0].message_id.clone());
                break;
            }
            other => {
                assert!(Instant::now() < until, "still failing: {other:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let seen = drain(&client, "fill", Duration::from_secs(2)).await;
    let missing = accepted.iter().filter(|id| !seen.contains_key(*id)).count();
    assert_eq!(
        missing,
        0,
        "{missing} of {} accepted messages were not delivered",
        accepted.len()
    );
}

/// The unlabelled samples of one scrape of the node's `/metrics`.
async fn scrape(address: &str) -> HashMap<String, f64> {
    let body = reqwest::get(format!("http://{address}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.split_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// Consumes `count` messages of `queue`, acks each, and waits until every ack is confirmed.
async fn consume_and_ack(client: &MeshClient, queue: &str, count: usize) {
    let (tx, mut inbound) = subscribe(client, queue, 64, "acker").await;
    let (mut delivered, mut confirmed) = (0, 0);
    while confirmed < count {
        let frame = tokio::time::timeout(Duration::from_secs(10), inbound.message())
            .await
            .expect("consume stalled")
            .unwrap()
            .expect("stream ended");
        match frame.event {
            Some(Event::Delivery(d)) => {
                delivered += 1;
                tx.send(ConsumeRequest {
                    action: Some(Action::Ack(ConsumeAck {
                        receipt: d.receipt,
                        result: None,
                    })),
                })
                .await
                .unwrap();
            }
            Some(Event::Receipt(r)) => {
                assert!(r.error.is_none(), "ack failed: {r:?}");
                confirmed += 1;
            }
            other => panic!("unexpected frame {other:?}"),
        }
    }
    assert_eq!(delivered, count);
}

/// After submit → consume → ack the node goes quiet: the store's writer begins no
/// transaction and wakes on no timer while nothing happens, the process uses next to no CPU,
/// and the acks were made durable by the flush interval (a SIGKILL then loses none of them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_node_stays_idle_and_flushes_acks_durably() {
    let data = tempfile::tempdir().unwrap();
    let mut node = start_node(data.path()).await;
    let client = node.client();
    let count = 200;
    let envelopes = (0..count).map(|i| Envelope::json("idle", serde_json::json!({ "i": i })));
    client.submit("idle", envelopes).await.unwrap();
    // A duplicate submit (same idempotency key twice) takes the same un-fsync'd path as an ack.
    for _ in 0..2 {
        let mut dup = Envelope::json("idle", serde_json::json!({ "dup": true }));
        dup.idempotency_key = "k1".into();
        client.submit("idle", [dup]).await.unwrap();
    }
    consume_and_ack(&client, "idle", count + 1).await;

    // Well past the 100 ms ack flush interval: the one flush has happened.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let before = scrape(&node.address).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = scrape(&node.address).await;
    let delta = |name: &str| after[name] - before[name];
    assert_eq!(
        delta("agentmesh_queue_store_timer_wakeups_total"),
        0.0,
        "the idle writer woke on a timer"
    );
    // The second scrape reads the queue stats once (one transaction); nothing else runs.
    let transactions = delta("agentmesh_queue_store_transactions_total");
    assert!(
        transactions <= 1.0,
        "the idle writer began {transactions} transactions"
    );
    let cpu = delta("process_cpu_seconds_total");
    assert!(cpu < 0.15, "the idle node used {cpu} s of CPU in 1.5 s");

    node.kill();
    let node = start_node(data.path()).await;
    let again = drain(&node.client(), "idle", Duration::from_millis(1500)).await;
    assert!(
        again.is_empty(),
        "{} acked messages were delivered again after SIGKILL",
        again.len()
    );
}
