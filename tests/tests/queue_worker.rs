//! The SDK's `Worker` on a real node: a draining shutdown finishes the work in hand
//! and takes nothing new, messages not started go back at once, leases are extended
//! during long work, and the worker reconnects when the node comes back.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use agentmesh_proto::v1::Envelope;
use agentmesh_sdk::Worker;
use agentmesh_tests::{
    TestNode, eventually,
    queue::{RawConsumer, job, n_of, queue_config, queue_node, queue_stats, wait_for_queue_stats},
};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worker_drains_in_flight_work_on_shutdown() {
    let node = queue_node().await;
    let client = node.client();
    client.submit("drain", (1..=4).map(job)).await.unwrap();
    let started = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let worker = {
        let (started, finished) = (started.clone(), finished.clone());
        Worker::new(client.clone(), "drain")
            .prefetch(4)
            .concurrency(4)
            .start(move |_ctx, envelope| {
                let (started, finished) = (started.clone(), finished.clone());
                async move {
                    started.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(600)).await;
                    finished.fetch_add(1, Ordering::SeqCst);
                    Ok(Some(Envelope::json(
                        "done",
                        json!({ "n": n_of(&envelope) }),
                    )))
                }
            })
    };
    assert!(
        eventually(Duration::from_secs(5), || async {
            started.load(Ordering::SeqCst) == 4
        })
        .await
    );
    assert_eq!(finished.load(Ordering::SeqCst), 0);
    let stats_ = worker.shutdown().await;
    // Everything that was in hand finished and was acked before shutdown returned.
    assert_eq!(finished.load(Ordering::SeqCst), 4);
    assert_eq!(stats_.succeeded, 4);
    assert_eq!(stats_.settle_errors, 0);
    let s = queue_stats(&client, "drain").await;
    assert_eq!((s.depth, s.in_flight), (0, 0), "{s:?}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_draining_worker_takes_no_new_messages() {
    let node = queue_node().await;
    let client = node.client();
    client.submit("late", (1..=2).map(job)).await.unwrap();
    let started = Arc::new(AtomicUsize::new(0));
    let worker = {
        let started = started.clone();
        // Room for more than it is working on: without a drain, the node would keep
        // handing this worker new messages while it finishes.
        Worker::new(client.clone(), "late")
            .prefetch(16)
            .concurrency(2)
            .start(move |_ctx, _envelope| {
                let started = started.clone();
                async move {
                    started.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                    Ok(None)
                }
            })
    };
    assert!(
        eventually(Duration::from_secs(5), || async {
            started.load(Ordering::SeqCst) == 2
        })
        .await
    );
    let draining = tokio::spawn(worker.shutdown());
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Another consumer is waiting too; what arrives now is its, while the worker drains.
    let mut other = RawConsumer::open(&node, "late", 16, Duration::from_secs(30)).await;
    client.submit("late", (3..=5).map(job)).await.unwrap();
    let mut got = Vec::new();
    while got.len() < 3 {
        let d = other
            .delivery(Duration::from_millis(700))
            .await
            .expect("a message submitted during the drain went to the draining worker");
        assert_eq!(d.attempt, 1);
        got.push(n_of(d.envelope.as_ref().unwrap()));
    }
    got.sort();
    assert_eq!(got, [3, 4, 5]);
    assert!(
        !draining.is_finished(),
        "the drain was over before the check"
    );
    let stats_ = draining.await.unwrap();
    assert_eq!((stats_.succeeded, stats_.settle_errors), (2, 0));
    assert_eq!(
        stats_.delivered, 2,
        "the draining worker was handed new messages"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worker_hands_back_unstarted_messages_and_extends_long_work() {
    let node = queue_node().await;
    let client = node.client();
    client.submit("slow", (1..=5).map(job)).await.unwrap();
    let finished = Arc::new(AtomicUsize::new(0));
    let worker = {
        let finished = finished.clone();
        // A 1 s lease and 2.2 s of work: only extensions keep the message ours.
        Worker::new(client.clone(), "slow")
            .prefetch(5)
            .concurrency(1)
            .lease(Duration::from_secs(1))
            .start(move |_ctx, _envelope| {
                let finished = finished.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(2200)).await;
                    finished.fetch_add(1, Ordering::SeqCst);
                    Ok(None)
                }
            })
    };
    assert!(
        eventually(Duration::from_secs(3), || async {
            queue_stats(&client, "slow").await.in_flight == 5
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let stats_ = worker.shutdown().await;
    let finished = finished.load(Ordering::SeqCst);
    assert!((1..=2).contains(&finished), "{finished}");
    assert_eq!(stats_.settle_errors, 0, "a lease lapsed during long work");
    // What was not started went back at once, without a failed attempt.
    let s = wait_for_queue_stats(&client, "slow", Duration::from_secs(2), |s| {
        s.in_flight == 0
    })
    .await;
    assert_eq!(s.depth, 5 - finished as u64);
    let mut consumer = RawConsumer::open(&node, "slow", 10, Duration::from_secs(30)).await;
    let d = consumer.delivery(Duration::from_secs(2)).await.unwrap();
    assert_eq!(d.attempt, 1);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worker_reconnects_when_the_node_comes_back() {
    let data = tempfile::tempdir().unwrap();
    let mut config = queue_config();
    config.queue.data_dir = data.path().to_owned();
    let node = TestNode::start_with(config.clone()).await;
    let address = node.address;
    let client = node.client();
    client.submit("resilient", [job(1)]).await.unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let worker = {
        let seen = seen.clone();
        Worker::new(client.clone(), "resilient")
            .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(300))
            .start(move |_ctx, envelope| {
                let seen = seen.clone();
                async move {
                    seen.lock().unwrap().push(n_of(&envelope));
                    Ok(None)
                }
            })
    };
    assert!(
        eventually(Duration::from_secs(5), || async {
            seen.lock().unwrap().len() == 1
        })
        .await
    );
    node.stop().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Same address, same data: the queue (and the worker) carry on.
    let node = TestNode::start_at(config, address).await;
    client.submit("resilient", [job(2)]).await.unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            seen.lock().unwrap().len() == 2
        })
        .await,
        "the worker did not come back"
    );
    let stats_ = worker.shutdown().await;
    assert!(stats_.reconnects >= 1, "{stats_:?}");
    assert_eq!(*seen.lock().unwrap(), vec![1, 2]);
    node.stop().await;
}
