//! The queue store seen from outside: each queue's and the store's figures on
//! `/metrics`, and a failing store, which makes queue calls UNAVAILABLE while the
//! node keeps serving everything else.

use std::{sync::Arc, time::Duration};

use agentmesh_node::QueueHandle;
use agentmesh_proto::v1::{
    ConsumeRequest, ConsumeSubscribe, consume_request::Action,
    queue_service_client::QueueServiceClient,
};
use agentmesh_queue::{
    DeadLetter, Leased, NackOutcome, NewMessage, QueueBackend, QueueError, QueueStats, Selection,
    SubmitFate,
};
use agentmesh_sdk::MeshClient;
use agentmesh_tests::{
    queue::{RawConsumer, job, queue_node},
    test_config,
};
use bytes::Bytes;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_report_each_queue_and_the_store() {
    let node = queue_node().await;
    let client = node.client();
    client.submit("metered", (1..=3).map(job)).await.unwrap();
    let mut consumer = RawConsumer::open(&node, "metered", 1, Duration::from_secs(30)).await;
    let held = consumer.delivery(Duration::from_secs(5)).await.unwrap();
    let metrics = reqwest::get(format!("http://{}/metrics", node.addr()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "agentmesh_queue_store_up 1",
        "agentmesh_queue_depth{queue=\"metered\"} 2",
        "agentmesh_queue_in_flight{queue=\"metered\"} 1",
        "agentmesh_queue_dead_letters{queue=\"metered\"} 0",
        "# TYPE agentmesh_queue_store_fsyncs counter",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no line {line:?} in:\n{metrics}"
        );
    }
    let accepted: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("agentmesh_queue_store_accepted_messages_total "))
        .and_then(|v| v.parse().ok())
        .expect("accepted messages counter");
    assert!(accepted >= 3, "{accepted}");
    let age: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("agentmesh_queue_oldest_age_seconds{queue=\"metered\"} "))
        .and_then(|v| v.parse().ok())
        .expect("oldest age gauge");
    assert!((0.0..60.0).contains(&age), "{age}");
    consumer.ack(&held.receipt, None).await;
    node.stop().await;
}

/// A queue backend on a full disk: every call fails with a storage error.
struct BrokenDisk;

fn disk_full() -> QueueError {
    QueueError::Storage(
        "writing to queue database /data/queue.redb failed: No space left on device".into(),
    )
}

#[tonic::async_trait]
impl QueueBackend for BrokenDisk {
    async fn submit(&self, _: &str, _: Vec<NewMessage>) -> Result<Vec<SubmitFate>, QueueError> {
        Err(disk_full())
    }
    async fn receive(
        &self,
        _: &str,
        _: &str,
        _: usize,
        _: Duration,
        _: Duration,
    ) -> Result<Vec<Leased>, QueueError> {
        Err(disk_full())
    }
    async fn ack(&self, _: &str, _: Option<Bytes>) -> Result<(), QueueError> {
        Err(disk_full())
    }
    async fn nack(&self, _: &str, _: &str, _: Option<Duration>) -> Result<NackOutcome, QueueError> {
        Err(disk_full())
    }
    async fn extend(&self, _: &str, _: Duration) -> Result<std::time::SystemTime, QueueError> {
        Err(disk_full())
    }
    async fn release(&self, _: Vec<String>) -> Result<u64, QueueError> {
        Err(disk_full())
    }
    async fn stats(&self) -> Result<Vec<QueueStats>, QueueError> {
        Err(disk_full())
    }
    async fn list_dead_letters(
        &self,
        _: &str,
        _: usize,
        _: Option<&str>,
    ) -> Result<(Vec<DeadLetter>, Option<String>), QueueError> {
        Err(disk_full())
    }
    async fn redrive(&self, _: &str, _: Selection) -> Result<u64, QueueError> {
        Err(disk_full())
    }
    async fn purge(&self, _: &str, _: Selection) -> Result<u64, QueueError> {
        Err(disk_full())
    }
    async fn get_result(&self, _: &str) -> Result<Option<Bytes>, QueueError> {
        Err(disk_full())
    }
    async fn wait_result(&self, _: &str, _: Duration) -> Result<Option<Bytes>, QueueError> {
        Err(disk_full())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_failures_are_unavailable_and_the_node_keeps_serving() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let node = agentmesh_node::Node::new(test_config())
        .with_queue(QueueHandle::from_backend(Arc::new(BrokenDisk)));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(node.serve(listener, async move {
        let _ = stopped.await;
    }));
    let client = MeshClient::connect_lazy(&address.to_string()).unwrap();
    let status = client.submit("q", [job(1)]).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("No space left"), "{status:?}");
    assert_eq!(
        client.list_queues().await.unwrap_err().code(),
        Code::Unavailable
    );
    let (frames, rx) = mpsc::channel(4);
    frames
        .send(ConsumeRequest {
            action: Some(Action::Subscribe(ConsumeSubscribe {
                queue: "q".into(),
                ..Default::default()
            })),
        })
        .await
        .unwrap();
    let mut consumer = QueueServiceClient::new(client.channel())
        .consume(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let status = consumer.message().await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    drop(frames);
    let http: Value = reqwest::get(format!("http://{address}/v1/queues"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(http["error"]["code"], "UNAVAILABLE");
    // Still serving everything else.
    let mut health = tonic_health::pb::health_client::HealthClient::new(client.channel());
    let serving = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "agentmesh.v1.QueueService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(serving.status, 1, "SERVING");
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}
