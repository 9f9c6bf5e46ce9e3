//! The durable queue as the tests drive it: a node with quick retry timings, a raw
//! `Consume` stream that keeps deliveries and receipts apart, and the queue figures
//! tests wait for.

use std::time::{Duration, Instant};

use agentmesh_node::NodeConfig;
use agentmesh_proto::v1::{
    ConsumeAck, ConsumeNack, ConsumeReceipt, ConsumeRequest, ConsumeResponse, ConsumeSubscribe,
    Delivery, Envelope, QueueStats, consume_request::Action, consume_response::Event,
    queue_service_client::QueueServiceClient,
};
use agentmesh_queue::{BackendConfig, QueueConfig};
use agentmesh_sdk::MeshClient;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Streaming, transport::Channel};

use crate::{TestNode, test_config};

/// Small retry timings (3 attempts, 50–200 ms backoff) so failures and redeliveries
/// happen within a test.
pub fn queue_config() -> NodeConfig {
    let mut config = test_config();
    config.queue.backend = BackendConfig::new(QueueConfig {
        max_attempts: 3,
        dedup_window: Duration::from_secs(3600),
        backoff_base: Duration::from_millis(50),
        backoff_max: Duration::from_millis(200),
        result_ttl: Duration::from_secs(3600),
    });
    config.queue.keep_alive = Duration::from_millis(200);
    config
}

/// A node with [`queue_config`] on an ephemeral port.
pub async fn queue_node() -> TestNode {
    TestNode::start_with(queue_config()).await
}

/// A message `{"n": n}` of type `job`.
pub fn job(n: u64) -> Envelope {
    Envelope::json("job", json!({ "n": n }))
}

/// The `n` of a [`job`] (`u64::MAX` if there is none).
pub fn n_of(envelope: &Envelope) -> u64 {
    envelope.json_payload().unwrap_or_default()["n"]
        .as_u64()
        .unwrap_or(u64::MAX)
}

/// The generated `QueueService` client, connected to `node`.
pub async fn queue_service_client(node: &TestNode) -> QueueServiceClient<Channel> {
    QueueServiceClient::new(node.channel().await)
}

/// A raw `Consume` stream.
#[derive(Debug)]
pub struct RawConsumer {
    tx: mpsc::Sender<ConsumeRequest>,
    /// The node's frames, for a test that reads them itself.
    pub inbound: Streaming<ConsumeResponse>,
    /// Receipt frames read while waiting for deliveries (and the other way round).
    receipts: Vec<ConsumeReceipt>,
    deliveries: Vec<Delivery>,
}

impl RawConsumer {
    /// Subscribes to `queue` with `prefetch` credit and leases of `lease`.
    pub async fn open(node: &TestNode, queue: &str, prefetch: u32, lease: Duration) -> Self {
        Self::open_batched(node, queue, prefetch, lease, 0).await
    }

    /// A consumer that takes deliveries in frames of up to `max_batch`.
    pub async fn open_batched(
        node: &TestNode,
        queue: &str,
        prefetch: u32,
        lease: Duration,
        max_batch: u32,
    ) -> Self {
        let (tx, rx) = mpsc::channel(256);
        tx.send(ConsumeRequest {
            action: Some(Action::Subscribe(ConsumeSubscribe {
                queue: queue.into(),
                prefetch,
                lease: prost_types::Duration::try_from(lease).ok(),
                consumer_id: format!("raw-{}", uuid::Uuid::now_v7()),
                max_batch,
            })),
        })
        .await
        .unwrap();
        let inbound = queue_service_client(node)
            .await
            .consume(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Self {
            tx,
            inbound,
            receipts: Vec::new(),
            deliveries: Vec::new(),
        }
    }

    async fn read(&mut self, within: Duration) -> bool {
        match tokio::time::timeout(within, self.inbound.message()).await {
            Ok(Ok(Some(response))) => {
                match response.event {
                    Some(Event::Delivery(d)) => self.deliveries.push(d),
                    Some(Event::Deliveries(batch)) => self.deliveries.extend(batch.deliveries),
                    Some(Event::Receipt(r)) => self.receipts.push(r),
                    Some(Event::Receipts(batch)) => self.receipts.extend(batch.receipts),
                    None => {}
                }
                true
            }
            _ => false,
        }
    }

    /// The next delivery, or `None` if none comes `within`.
    pub async fn delivery(&mut self, within: Duration) -> Option<Delivery> {
        let until = Instant::now() + within;
        while self.deliveries.is_empty() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() || !self.read(left).await {
                return None;
            }
        }
        Some(self.deliveries.remove(0))
    }

    /// The node's receipt for `receipt`; panics if none comes within 5 s.
    pub async fn receipt(&mut self, receipt: &str) -> ConsumeReceipt {
        loop {
            if let Some(i) = self.receipts.iter().position(|r| r.receipt == receipt) {
                return self.receipts.remove(i);
            }
            assert!(
                self.read(Duration::from_secs(5)).await,
                "no receipt for {receipt}"
            );
        }
    }

    /// Sends `action` on the stream.
    pub async fn send(&self, action: Action) {
        self.tx
            .send(ConsumeRequest {
                action: Some(action),
            })
            .await
            .unwrap();
    }

    /// Acks `receipt` (with `result`, if any) and returns the node's receipt for it.
    pub async fn ack(&mut self, receipt: &str, result: Option<Envelope>) -> ConsumeReceipt {
        self.send(Action::Ack(ConsumeAck {
            receipt: receipt.into(),
            result: result.map(Box::new),
        }))
        .await;
        self.receipt(receipt).await
    }

    /// Nacks `receipt` (redelivery after `delay`, or the queue's backoff) and asserts the
    /// node confirmed it.
    pub async fn nack(&mut self, receipt: &str, error: &str, delay: Option<Duration>) {
        self.send(Action::Nack(ConsumeNack {
            receipt: receipt.into(),
            error: error.into(),
            delay: delay.and_then(|d| prost_types::Duration::try_from(d).ok()),
        }))
        .await;
        let confirmed = self.receipt(receipt).await;
        assert!(confirmed.error.is_none(), "{confirmed:?}");
    }
}

/// The figures of `queue` (depth, in flight, dead letters …); panics if there is no such queue.
pub async fn queue_stats(client: &MeshClient, queue: &str) -> QueueStats {
    client
        .list_queues()
        .await
        .unwrap()
        .into_iter()
        .find(|q| q.name == queue)
        .unwrap_or_else(|| panic!("no queue {queue}"))
}

/// Polls the figures of `queue` until `check` holds; panics if that takes longer than `within`.
pub async fn wait_for_queue_stats(
    client: &MeshClient,
    queue: &str,
    within: Duration,
    check: impl Fn(&QueueStats) -> bool,
) -> QueueStats {
    let until = Instant::now() + within;
    loop {
        let s = queue_stats(client, queue).await;
        if check(&s) {
            return s;
        }
        assert!(
            Instant::now() < until,
            "queue {queue} never got there: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
