//! The durable queue end to end over real sockets: `QueueService` over gRPC,
//! the SDK's `Worker`, the HTTP routes, and the `agentmesh` queue commands.

mod common;

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use agentmesh_node::{NodeConfig, QueueHandle};
use agentmesh_proto::v1::{
    AwaitResultRequest, ConsumeAck, ConsumeExtend, ConsumeNack, ConsumeReceipt, ConsumeRequest,
    ConsumeResponse, ConsumeSubscribe, Delivery, Envelope, GetResultRequest, SubmitRequest,
    SubmitStatus, consume_request::Action, consume_response::Event,
    queue_service_client::QueueServiceClient,
};
use agentmesh_queue::{
    BackendConfig, DeadLetter, Leased, NackOutcome, NewMessage, QueueBackend, QueueConfig,
    QueueError, QueueStats, Selection, SubmitFate,
};
use agentmesh_sdk::{DeadLetterSelection, MeshClient, Worker};
use bytes::Bytes;
use common::*;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, Streaming, transport::Channel};

// ---------------------------------------------------------------------------
// Fixtures

/// Small retry timings so failures and redeliveries happen within a test.
fn queue_config() -> NodeConfig {
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

async fn queue_node() -> TestNode {
    TestNode::start_with(queue_config(), "127.0.0.1:0".parse().unwrap()).await
}

fn job(n: u64) -> Envelope {
    Envelope::json("job", json!({ "n": n }))
}

fn n_of(envelope: &Envelope) -> u64 {
    envelope.json_payload().unwrap_or_default()["n"]
        .as_u64()
        .unwrap_or(u64::MAX)
}

async fn queues(node: &TestNode) -> QueueServiceClient<Channel> {
    QueueServiceClient::new(node.channel().await)
}

/// A raw `Consume` stream.
struct RawConsumer {
    tx: mpsc::Sender<ConsumeRequest>,
    inbound: Streaming<ConsumeResponse>,
    /// Receipt frames read while waiting for deliveries (and the other way round).
    receipts: Vec<ConsumeReceipt>,
    deliveries: Vec<Delivery>,
}

impl RawConsumer {
    async fn open(node: &TestNode, queue: &str, prefetch: u32, lease: Duration) -> Self {
        Self::open_batched(node, queue, prefetch, lease, 0).await
    }

    /// A consumer that takes deliveries in frames of up to `max_batch`.
    async fn open_batched(
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
        let inbound = queues(node)
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

    async fn delivery(&mut self, within: Duration) -> Option<Delivery> {
        let until = Instant::now() + within;
        while self.deliveries.is_empty() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() || !self.read(left).await {
                return None;
            }
        }
        Some(self.deliveries.remove(0))
    }

    async fn receipt(&mut self, receipt: &str) -> ConsumeReceipt {
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

    async fn send(&self, action: Action) {
        self.tx
            .send(ConsumeRequest {
                action: Some(action),
            })
            .await
            .unwrap();
    }

    async fn ack(&mut self, receipt: &str, result: Option<Envelope>) -> ConsumeReceipt {
        self.send(Action::Ack(ConsumeAck {
            receipt: receipt.into(),
            result: result.map(Box::new),
        }))
        .await;
        self.receipt(receipt).await
    }

    async fn nack(&mut self, receipt: &str, error: &str, delay: Option<Duration>) {
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

async fn stats(client: &MeshClient, queue: &str) -> agentmesh_proto::v1::QueueStats {
    client
        .list_queues()
        .await
        .unwrap()
        .into_iter()
        .find(|q| q.name == queue)
        .unwrap_or_else(|| panic!("no queue {queue}"))
}

async fn wait_for_stats(
    client: &MeshClient,
    queue: &str,
    within: Duration,
    check: impl Fn(&agentmesh_proto::v1::QueueStats) -> bool,
) -> agentmesh_proto::v1::QueueStats {
    let until = Instant::now() + within;
    loop {
        let s = stats(client, queue).await;
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

// ---------------------------------------------------------------------------
// gRPC and the SDK

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn submit_n_consume_n_each_exactly_once() {
    let node = queue_node().await;
    let client = node.client();
    const N: u64 = 600;
    // Several concurrent submitters, in batches.
    let mut submitters = Vec::new();
    for t in 0..3u64 {
        let client = client.clone();
        submitters.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for batch in 0..4u64 {
                let envelopes: Vec<Envelope> =
                    (0..50).map(|i| job(t * 200 + batch * 50 + i)).collect();
                let response = client.submit("exactly-once", envelopes).await.unwrap();
                assert_eq!(response.accepted, 50, "{response:?}");
                for (i, outcome) in response.outcomes.iter().enumerate() {
                    assert_eq!(outcome.index as usize, i);
                    assert_eq!(outcome.status, SubmitStatus::Accepted as i32);
                    ids.push(outcome.message_id.clone());
                }
            }
            ids
        }));
    }
    let mut submitted = HashSet::new();
    for s in submitters {
        submitted.extend(s.await.unwrap());
    }
    assert_eq!(submitted.len(), N as usize);
    assert_eq!(stats(&client, "exactly-once").await.depth, N);

    // Two competing workers.
    let seen = Arc::new(std::sync::Mutex::new(HashMap::<String, u32>::new()));
    let done = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..2)
        .map(|w| {
            let seen = seen.clone();
            let done = done.clone();
            Worker::new(client.clone(), "exactly-once")
                .prefetch(32)
                .concurrency(8)
                .consumer_id(format!("w{w}"))
                .start(move |_ctx, envelope| {
                    let seen = seen.clone();
                    let done = done.clone();
                    async move {
                        assert_eq!(envelope.attempt, 1);
                        *seen.lock().unwrap().entry(envelope.id.clone()).or_default() += 1;
                        done.fetch_add(1, Ordering::SeqCst);
                        Ok(None)
                    }
                })
        })
        .collect();
    assert!(
        eventually(Duration::from_secs(20), || async {
            done.load(Ordering::SeqCst) >= N as usize
        })
        .await,
        "only {} of {N} consumed",
        done.load(Ordering::SeqCst)
    );
    let mut delivered = 0;
    for worker in workers {
        delivered += worker.shutdown().await.succeeded;
    }
    assert_eq!(delivered, N);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), N as usize);
    assert!(
        seen.values().all(|&c| c == 1),
        "a message was consumed twice"
    );
    assert_eq!(seen.keys().cloned().collect::<HashSet<_>>(), submitted);
    let s = wait_for_stats(&client, "exactly-once", Duration::from_secs(5), |s| {
        s.in_flight == 0
    })
    .await;
    assert_eq!((s.depth, s.in_flight, s.dead_letters), (0, 0, 0));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_idempotency_key_is_not_enqueued_twice() {
    let node = queue_node().await;
    let client = node.client();
    let keyed = |n| Envelope {
        idempotency_key: "order-42".into(),
        ..job(n)
    };
    let first = client.submit("dedup", [keyed(1)]).await.unwrap();
    assert_eq!(first.accepted, 1);
    let second = client.submit("dedup", [keyed(2), job(3)]).await.unwrap();
    assert_eq!((second.accepted, second.duplicates), (1, 1));
    assert_eq!(second.outcomes[0].status, SubmitStatus::Duplicate as i32);
    assert_eq!(
        second.outcomes[0].message_id, first.outcomes[0].message_id,
        "a duplicate names the earlier message"
    );
    assert_eq!(stats(&client, "dedup").await.depth, 2);
    let mut consumer = RawConsumer::open(&node, "dedup", 10, Duration::from_secs(30)).await;
    let mut got = Vec::new();
    while let Some(d) = consumer.delivery(Duration::from_millis(500)).await {
        got.push(n_of(d.envelope.as_ref().unwrap()));
    }
    got.sort();
    assert_eq!(got, vec![1, 3]);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_rejects_bad_messages_and_keeps_the_rest() {
    let node = queue_node().await;
    let mut client = queues(&node).await;
    let requests = vec![
        SubmitRequest {
            queue: "good".into(),
            envelope: Some(Box::new(job(1))),
            envelopes: Vec::new(),
        },
        SubmitRequest {
            queue: "".into(),
            envelope: Some(Box::new(job(2))),
            envelopes: Vec::new(),
        },
        SubmitRequest {
            queue: "good".into(),
            envelope: None,
            envelopes: Vec::new(),
        },
        SubmitRequest {
            queue: "bad\u{7}name".into(),
            envelope: Some(Box::new(job(3))),
            envelopes: Vec::new(),
        },
        SubmitRequest {
            queue: "other".into(),
            envelope: Some(Box::new(job(4))),
            // More messages in the same frame: each gets its own outcome, in order.
            envelopes: vec![job(5), job(6)],
        },
    ];
    let mut request = tonic::Request::new(futures::stream::iter(requests));
    request
        .metadata_mut()
        .insert("x-correlation-id", "call-corr".parse().unwrap());
    let response = client.submit(request).await.unwrap().into_inner();
    assert_eq!(
        (response.accepted, response.duplicates, response.rejected),
        (4, 0, 3)
    );
    let statuses: Vec<i32> = response.outcomes.iter().map(|o| o.status).collect();
    let (a, r) = (SubmitStatus::Accepted as i32, SubmitStatus::Rejected as i32);
    assert_eq!(statuses, vec![a, r, r, r, a, a, a]);
    let indices: Vec<u32> = response.outcomes.iter().map(|o| o.index).collect();
    assert_eq!(indices, (0..7).collect::<Vec<_>>());
    assert_eq!(stats(&node.client(), "other").await.depth, 3);
    assert!(
        response.outcomes[1].reason.contains("queue"),
        "{response:?}"
    );
    assert!(response.outcomes[2].reason.contains("envelope"));
    assert!(response.outcomes[3].reason.contains("control"));
    // The envelope was stamped: id, correlation id from the call, created_at.
    let mut consumer = RawConsumer::open(&node, "good", 1, Duration::from_secs(30)).await;
    let d = consumer.delivery(Duration::from_secs(5)).await.unwrap();
    let envelope = d.envelope.unwrap();
    assert_eq!(envelope.id, response.outcomes[0].message_id);
    assert_eq!(envelope.correlation_id, "call-corr");
    assert!(envelope.created_at.is_some());
    assert_eq!((envelope.attempt, d.attempt), (1, 1));
    assert_eq!(d.queue, "good");
    assert!(d.lease_expires_at.is_some());
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_killed_mid_lease_is_redelivered_to_another_at_once() {
    let node = queue_node().await;
    let client = node.client();
    client.submit("handoff", [job(7)]).await.unwrap();
    // A long lease: only an immediate release can make this quick.
    let mut first = RawConsumer::open(&node, "handoff", 4, Duration::from_secs(60)).await;
    let d1 = first.delivery(Duration::from_secs(5)).await.unwrap();
    assert_eq!(d1.attempt, 1);
    let mut second = RawConsumer::open(&node, "handoff", 4, Duration::from_secs(60)).await;
    assert!(
        second.delivery(Duration::from_millis(300)).await.is_none(),
        "a leased message went to a second consumer"
    );
    let dropped = Instant::now();
    drop(first);
    let d2 = second
        .delivery(Duration::from_secs(5))
        .await
        .expect("redelivered after the first consumer went away");
    assert!(
        dropped.elapsed() < Duration::from_secs(3),
        "redelivery took {:?}",
        dropped.elapsed()
    );
    assert_eq!(n_of(d2.envelope.as_ref().unwrap()), 7);
    assert_ne!(d2.receipt, d1.receipt);
    // Handing back is not a failed attempt.
    assert_eq!(d2.attempt, 1);
    // An extend with a zero lease hands one delivery back the same way.
    second
        .send(Action::Extend(ConsumeExtend {
            receipt: d2.receipt.clone(),
            lease: Some(prost_types::Duration::default()),
        }))
        .await;
    assert!(second.receipt(&d2.receipt).await.error.is_none());
    let d3 = second
        .delivery(Duration::from_secs(5))
        .await
        .expect("handed back and delivered again");
    assert_eq!(d3.attempt, 1);
    assert_ne!(d3.receipt, d2.receipt);
    let confirmed = second.ack(&d3.receipt, None).await;
    assert!(confirmed.error.is_none());
    // Releasing a settled delivery is a lost lease.
    second
        .send(Action::Extend(ConsumeExtend {
            receipt: d3.receipt.clone(),
            lease: Some(prost_types::Duration::default()),
        }))
        .await;
    let stale = second.receipt(&d3.receipt).await;
    assert_eq!(
        stale.error.map(|e| e.code),
        Some(Code::FailedPrecondition as i32)
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_redelivers_after_the_backoff_and_stale_receipts_fail() {
    let node = queue_node().await;
    let client = node.client();
    client.submit("retry", [job(1)]).await.unwrap();
    let mut consumer = RawConsumer::open(&node, "retry", 4, Duration::from_secs(30)).await;
    let d1 = consumer.delivery(Duration::from_secs(5)).await.unwrap();
    let nacked = Instant::now();
    consumer
        .nack(
            &d1.receipt,
            "try again later",
            Some(Duration::from_millis(400)),
        )
        .await;
    let d2 = consumer.delivery(Duration::from_secs(5)).await.unwrap();
    assert!(
        nacked.elapsed() >= Duration::from_millis(380),
        "redelivered after {:?}",
        nacked.elapsed()
    );
    assert_eq!(d2.attempt, 2);
    assert_eq!(d2.envelope.as_ref().unwrap().attempt, 2);
    // The first receipt is stale now: FAILED_PRECONDITION in its ConsumeReceipt.
    let stale = consumer.ack(&d1.receipt, None).await;
    assert_eq!(
        stale.error.as_ref().map(|e| e.code),
        Some(Code::FailedPrecondition as i32),
        "{stale:?}"
    );
    // Nack without a delay: the queue's backoff (50..200 ms here).
    consumer.nack(&d2.receipt, "again", None).await;
    let d3 = consumer.delivery(Duration::from_secs(5)).await.unwrap();
    assert_eq!(d3.attempt, 3);
    assert!(consumer.ack(&d3.receipt, None).await.error.is_none());
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_must_start_with_a_valid_subscribe() {
    let node = queue_node().await;
    let mut client = queues(&node).await;
    let ack_first = futures::stream::iter([ConsumeRequest {
        action: Some(Action::Ack(ConsumeAck::default())),
    }]);
    let status = client.consume(ack_first).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let bad_queue = futures::stream::iter([ConsumeRequest {
        action: Some(Action::Subscribe(ConsumeSubscribe {
            queue: String::new(),
            ..Default::default()
        })),
    }]);
    let status = client.consume(bad_queue).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_message_is_dead_lettered_while_others_flow_then_redriven() {
    let node = queue_node().await;
    let client = node.client();
    let poison = Envelope::json("job", json!({ "n": 0, "poison": true }));
    let response = client.submit("poison", [poison]).await.unwrap();
    let poison_id = response.outcomes[0].message_id.clone();
    client.submit("poison", (1..=30).map(job)).await.unwrap();
    let healthy = Arc::new(std::sync::Mutex::new(HashSet::new()));
    let cure = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let worker = {
        let healthy = healthy.clone();
        let cure = cure.clone();
        Worker::new(client.clone(), "poison")
            .prefetch(8)
            .concurrency(4)
            .start(move |_ctx, envelope| {
                let healthy = healthy.clone();
                let cure = cure.clone();
                async move {
                    let payload = envelope.json_payload().unwrap_or_default();
                    if payload["poison"] == json!(true) && !cure.load(Ordering::SeqCst) {
                        return Err(Status::invalid_argument("cannot digest this"));
                    }
                    healthy.lock().unwrap().insert(n_of(&envelope));
                    Ok(None)
                }
            })
    };
    let s = wait_for_stats(&client, "poison", Duration::from_secs(10), |s| {
        s.dead_letters == 1
    })
    .await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            healthy.lock().unwrap().len() == 30
        })
        .await,
        "healthy messages stopped flowing"
    );
    let _ = s;
    let page = client.list_dead_letters("poison", 0, "").await.unwrap();
    assert_eq!(page.dead_letters.len(), 1);
    let dead = &page.dead_letters[0];
    assert_eq!(dead.message_id, poison_id);
    assert_eq!(dead.queue, "poison");
    assert_eq!(dead.attempts.len(), 3);
    assert!(dead.last_error.contains("cannot digest this"), "{dead:?}");
    assert!(dead.envelope.as_ref().unwrap().json_payload().unwrap()["poison"] == json!(true));
    assert!(dead.dead_lettered_at.is_some());
    // Redrive brings it back, fresh; now the worker copes with it.
    cure.store(true, Ordering::SeqCst);
    let redriven = client
        .redrive_dead_letters("poison", DeadLetterSelection::Ids(vec![poison_id.clone()]))
        .await
        .unwrap();
    assert_eq!(redriven, 1);
    assert!(
        eventually(Duration::from_secs(10), || async {
            healthy.lock().unwrap().contains(&0)
        })
        .await,
        "the redriven message was not consumed"
    );
    let s = wait_for_stats(&client, "poison", Duration::from_secs(5), |s| {
        s.in_flight == 0 && s.depth == 0
    })
    .await;
    assert_eq!(s.dead_letters, 0);
    worker.shutdown().await;
    // Purge: a fresh dead letter, then gone for good.
    client
        .submit(
            "poison",
            [Envelope::json("job", json!({"n": 99, "poison": true}))],
        )
        .await
        .unwrap();
    let mut consumer = RawConsumer::open(&node, "poison", 1, Duration::from_secs(30)).await;
    for _ in 0..3 {
        let d = consumer.delivery(Duration::from_secs(5)).await.unwrap();
        consumer.nack(&d.receipt, "no", Some(Duration::ZERO)).await;
    }
    wait_for_stats(&client, "poison", Duration::from_secs(5), |s| {
        s.dead_letters == 1
    })
    .await;
    assert_eq!(
        client
            .purge_dead_letters("poison", DeadLetterSelection::All)
            .await
            .unwrap(),
        1
    );
    assert!(
        client
            .list_dead_letters("poison", 0, "")
            .await
            .unwrap()
            .dead_letters
            .is_empty()
    );
    let unknown = client
        .list_dead_letters("never-used", 0, "")
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    let nothing = client
        .redrive_dead_letters("poison", DeadLetterSelection::Ids(vec![]))
        .await
        .unwrap_err();
    assert_eq!(nothing.code(), Code::InvalidArgument);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn results_are_awaited_by_correlation_id_over_grpc_and_http() {
    let node = queue_node().await;
    let client = node.client();
    let response = client
        .submit(
            "work",
            [
                Envelope {
                    reply_to: "replies".into(),
                    ..job(1)
                },
                job(2),
                job(3),
            ],
        )
        .await
        .unwrap();
    let ids: Vec<String> = response
        .outcomes
        .iter()
        .map(|o| o.message_id.clone())
        .collect();
    // Nothing yet: NOT_FOUND / 404.
    assert_eq!(client.get_result(&ids[0]).await.unwrap(), None);
    let mut grpc = queues(&node).await;
    let status = grpc
        .get_result(GetResultRequest {
            correlation_id: ids[0].clone(),
            wait: false,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let http = reqwest::Client::new();
    let base = format!("http://{}", node.addr());
    let missing = http
        .get(format!("{base}/v1/results/{}", ids[2]))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let body: Value = missing.json().await.unwrap();
    assert_eq!(body["error"]["code"], "NOT_FOUND");

    // Waiters of every kind, started before the work is done.
    let waiting_get = {
        let mut grpc = grpc.clone();
        let id = ids[0].clone();
        tokio::spawn(async move {
            let mut request = tonic::Request::new(GetResultRequest {
                correlation_id: id,
                wait: true,
            });
            request.set_timeout(Duration::from_secs(10));
            grpc.get_result(request).await
        })
    };
    let awaiting = {
        let mut grpc = grpc.clone();
        let id = ids[1].clone();
        tokio::spawn(async move {
            let mut events = grpc
                .await_result(AwaitResultRequest { correlation_id: id })
                .await
                .unwrap()
                .into_inner();
            let mut keep_alives = 0;
            while let Some(event) = events.message().await.unwrap() {
                match event.result {
                    Some(result) => {
                        assert!(
                            events.message().await.unwrap().is_none(),
                            "ends after the result"
                        );
                        return (keep_alives, result);
                    }
                    None => keep_alives += 1,
                }
            }
            panic!("AwaitResult ended without a result");
        })
    };
    let long_poll = {
        let http = http.clone();
        let url = format!("{base}/v1/results/{}?wait=true", ids[2]);
        tokio::spawn(async move {
            let response = http
                .get(url)
                .header("x-timeout-ms", "10000")
                .send()
                .await
                .unwrap();
            (
                response.status().as_u16(),
                response.json::<Value>().await.unwrap(),
            )
        })
    };
    let sse = {
        let http = http.clone();
        let url = format!("{base}/v1/results/{}/events", ids[0]);
        tokio::spawn(async move {
            let response = http.get(url).send().await.unwrap();
            assert_eq!(response.status(), 200);
            let mut body = response.bytes_stream();
            let mut text = String::new();
            while let Some(chunk) = body.next().await {
                text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
            }
            text
        })
    };
    // Let the waiters wait (and AwaitResult send keep-alives) before the work happens.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let worker = Worker::new(client.clone(), "work").start(|ctx, envelope| async move {
        let n = n_of(&envelope);
        assert_eq!(ctx.correlation_id(), envelope.correlation_id);
        Ok(Some(Envelope::json(
            "job.done",
            json!({ "n": n, "squared": n * n }),
        )))
    });

    let got = waiting_get
        .await
        .unwrap()
        .unwrap()
        .into_inner()
        .result
        .unwrap();
    assert_eq!(got.json_payload().unwrap()["n"], 1);
    assert_eq!(got.correlation_id, ids[0]);
    assert_eq!(
        got.causation_id, ids[0],
        "the result is caused by the message"
    );
    let (keep_alives, result) = awaiting.await.unwrap();
    assert!(keep_alives >= 1, "no keep-alive while waiting");
    assert_eq!(result.json_payload().unwrap()["squared"], 4);
    let (status, body) = long_poll.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"]["json"]["squared"], 9);
    let events = sse.await.unwrap();
    assert!(events.contains("event: result"), "{events}");
    assert!(events.contains(&format!("id: {}", ids[0])), "{events}");
    assert!(events.contains("\"squared\":1"), "{events}");
    // Plain gets now find it, over both faces.
    assert!(client.get_result(&ids[1]).await.unwrap().is_some());
    let found: Value = http
        .get(format!("{base}/v1/results/{}", ids[1]))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(found["result"]["json"]["n"], 2);
    // The message with reply_to also put its result into `replies`.
    let mut replies = RawConsumer::open(&node, "replies", 1, Duration::from_secs(30)).await;
    let reply = replies.delivery(Duration::from_secs(5)).await.unwrap();
    assert_eq!(reply.envelope.as_ref().unwrap().correlation_id, ids[0]);
    assert_eq!(
        reply.envelope.unwrap().json_payload().unwrap()["squared"],
        1
    );
    // A wait that times out is NOT_FOUND, answered before the caller's deadline.
    let mut request = tonic::Request::new(GetResultRequest {
        correlation_id: "nobody".into(),
        wait: true,
    });
    request.set_timeout(Duration::from_millis(400));
    let started = Instant::now();
    let status = grpc.get_result(request).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(started.elapsed() >= Duration::from_millis(300));
    worker.shutdown().await;
    node.stop().await;
}

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
    let s = stats(&client, "drain").await;
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
            stats(&client, "slow").await.in_flight == 5
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let stats_ = worker.shutdown().await;
    let finished = finished.load(Ordering::SeqCst);
    assert!((1..=2).contains(&finished), "{finished}");
    assert_eq!(stats_.settle_errors, 0, "a lease lapsed during long work");
    // What was not started went back at once, without a failed attempt.
    let s = wait_for_stats(&client, "slow", Duration::from_secs(2), |s| {
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
    let node = TestNode::start_with(config.clone(), "127.0.0.1:0".parse().unwrap()).await;
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
    let node = TestNode::start_with(config, address).await;
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

// ---------------------------------------------------------------------------
// A failing store: UNAVAILABLE, and the node keeps serving.

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

// ---------------------------------------------------------------------------
// HTTP

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_routes_round_trip() {
    let node = queue_node().await;
    let base = format!("http://{}", node.addr());
    let http = reqwest::Client::new();
    // One envelope: 201 with the SubmitResponse; the correlation id is the call's.
    let response = http
        .post(format!("{base}/v1/queues/http-jobs/messages"))
        .header("idempotency-key", "once")
        .header("x-correlation-id", "http-corr-1")
        .json(&json!({"type": "job", "json": {"n": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(response.headers()["x-correlation-id"], "http-corr-1");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["accepted"], 1);
    assert_eq!(body["outcomes"][0]["status"], "SUBMIT_STATUS_ACCEPTED");
    let first_id = body["outcomes"][0]["messageId"]
        .as_str()
        .unwrap()
        .to_owned();
    // The same Idempotency-Key header again: 200, DUPLICATE of the first.
    let again: Value = {
        let response = http
            .post(format!("{base}/v1/queues/http-jobs/messages"))
            .header("idempotency-key", "once")
            .json(&json!({"type": "job", "json": {"n": 1}}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    };
    assert_eq!(again["duplicates"], 1);
    assert_eq!(again["outcomes"][0]["messageId"], first_id);
    // A batch.
    let batch: Value = http
        .post(format!("{base}/v1/queues/http-jobs/messages"))
        .json(&json!({"messages": [
            {"type": "job", "json": {"n": 2}},
            {"type": "job", "json": {"n": 3}, "idempotencyKey": "once"},
        ]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(batch["accepted"], 1);
    assert_eq!(batch["duplicates"], 1);
    assert_eq!(batch["outcomes"][1]["index"], 1);
    // Bad bodies: 400 with the gateway's error JSON.
    for bad in [&b"{"[..], br#"{"messages": 3}"#, br#"{"tpye": "job"}"#] {
        let response = http
            .post(format!("{base}/v1/queues/http-jobs/messages"))
            .header("content-type", "application/json")
            .body(bad.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400);
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["code"], "INVALID_ARGUMENT", "{error}");
    }
    let rejected = http
        .post(format!("{base}/v1/queues/bad%07name/messages"))
        .json(&json!({"type": "job"}))
        .send()
        .await
        .unwrap();
    assert_eq!(rejected.status(), 400);
    // Queue stats.
    let listed: Value = http
        .get(format!("{base}/v1/queues"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let jobs = listed["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == "http-jobs")
        .unwrap()
        .clone();
    assert_eq!(jobs["depth"], "2", "{listed}");
    // Dead letters: make one, list, redrive, purge.
    let mut consumer = RawConsumer::open(&node, "http-jobs", 1, Duration::from_secs(30)).await;
    let first = consumer.delivery(Duration::from_secs(5)).await.unwrap();
    let dead_id = first.envelope.as_ref().unwrap().id.clone();
    consumer
        .nack(&first.receipt, "bad", Some(Duration::ZERO))
        .await;
    for _ in 0..2 {
        let d = loop {
            let d = consumer.delivery(Duration::from_secs(5)).await.unwrap();
            if d.envelope.as_ref().unwrap().id == dead_id {
                break d;
            }
            consumer.ack(&d.receipt, None).await;
        };
        consumer
            .nack(&d.receipt, "still bad", Some(Duration::ZERO))
            .await;
    }
    drop(consumer);
    let dead: Value = http
        .get(format!(
            "{base}/v1/queues/http-jobs/dead-letters?pageSize=10"
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(dead["deadLetters"][0]["messageId"], dead_id, "{dead}");
    assert_eq!(dead["deadLetters"][0]["lastError"], "still bad");
    assert_eq!(
        dead["deadLetters"][0]["attempts"].as_array().unwrap().len(),
        3
    );
    let redriven = http
        .post(format!("{base}/v1/queues/http-jobs/dead-letters/redrive"))
        .json(&json!({"messageIds": [dead_id]}))
        .send()
        .await
        .unwrap();
    assert_eq!(redriven.status(), 200);
    assert_eq!(redriven.json::<Value>().await.unwrap()["redriven"], "1");
    let purge_nothing = http
        .post(format!("{base}/v1/queues/http-jobs/dead-letters/purge"))
        .json(&json!({"all": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(purge_nothing.status(), 200);
    let purged: Value = purge_nothing.json().await.unwrap();
    assert!(
        purged.get("purged").is_none() || purged["purged"] == "0",
        "{purged}"
    );
    let unselected = http
        .post(format!("{base}/v1/queues/http-jobs/dead-letters/purge"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(unselected.status(), 400);
    let unknown = http
        .get(format!("{base}/v1/queues/nope/dead-letters"))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    assert_eq!(
        unknown.json::<Value>().await.unwrap()["error"]["code"],
        "NOT_FOUND"
    );
    // The HTTP-submitted message's result is stored under the call's correlation id.
    let mut consumer = RawConsumer::open(&node, "http-jobs", 10, Duration::from_secs(30)).await;
    while let Some(d) = consumer.delivery(Duration::from_millis(500)).await {
        let result = Envelope::json("job.done", json!({"from": d.envelope.as_ref().unwrap().id}));
        assert!(consumer.ack(&d.receipt, Some(result)).await.error.is_none());
    }
    let result: Value = http
        .get(format!("{base}/v1/results/http-corr-1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(result["result"]["json"]["from"], first_id, "{result}");
    node.stop().await;
}

// ---------------------------------------------------------------------------
// The `agentmesh` commands

const BIN: &str = env!("CARGO_BIN_EXE_agentmesh");

async fn cli(node: &TestNode, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(BIN)
        .args(args)
        .env("AGENTMESH_NODE", node.addr())
        .env("AGENTMESH_LOG", "warn")
        .output()
        .await
        .unwrap()
}

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_submit_consume_exec_result_and_dlq() {
    let node = queue_node().await;
    let out = cli(
        &node,
        &[
            "submit",
            "cli-jobs",
            "--json",
            r#"{"x": 20}"#,
            "--type",
            "add",
            "--count",
            "2",
        ],
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out);
    let ids: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("accepted  "))
        .map(str::to_owned)
        .collect();
    assert_eq!(ids.len(), 2, "{text}");
    assert!(text.contains("2 accepted"), "{text}");
    // A poison message: the command fails on it.
    let out = cli(
        &node,
        &[
            "submit",
            "cli-jobs",
            "--json",
            r#"{"x": "boom"}"#,
            "--output",
            "json",
        ],
    )
    .await;
    let response: Value = serde_json::from_slice(&out.stdout).unwrap();
    let poison_id = response["outcomes"][0]["messageId"]
        .as_str()
        .unwrap()
        .to_owned();

    let queues_text = stdout(&cli(&node, &["queues"]).await);
    assert!(queues_text.contains("cli-jobs"), "{queues_text}");
    let line = queues_text
        .lines()
        .find(|l| l.starts_with("cli-jobs"))
        .unwrap();
    assert_eq!(line.split_whitespace().nth(1), Some("3"), "{queues_text}");

    // `consume --exec`: the payload on stdin, stdout is the result; failures nack.
    let script = r#"input=$(cat); case "$input" in *boom*) echo "cannot add boom" >&2; exit 3;; esac; echo "{\"y\": 21, \"in\": $input}""#;
    let out = cli(
        &node,
        &[
            "consume",
            "cli-jobs",
            "--exec",
            script,
            "--max",
            "5",
            "--lease-ms",
            "5000",
        ],
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    for id in &ids {
        let out = cli(&node, &["result", id, "--output", "json"]).await;
        assert!(out.status.success(), "{out:?}");
        let result: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(result["json"]["y"].as_f64(), Some(21.0), "{result}");
        // The command got the payload on stdin.
        assert_eq!(result["json"]["in"]["x"].as_f64(), Some(20.0), "{result}");
        assert_eq!(result["type"], "add.result");
    }
    let missing = cli(&node, &["result", &poison_id]).await;
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no result"));
    // Three failed attempts: a dead letter with the command's error.
    let client = node.client();
    wait_for_stats(&client, "cli-jobs", Duration::from_secs(10), |s| {
        s.dead_letters == 1
    })
    .await;
    let listed = stdout(&cli(&node, &["dlq", "list", "cli-jobs"]).await);
    assert!(listed.contains(&poison_id), "{listed}");
    assert!(listed.contains("exited with"), "{listed}");
    let out = cli(&node, &["dlq", "redrive", "cli-jobs", "--id", &poison_id]).await;
    assert!(stdout(&out).contains("redrove 1"), "{out:?}");
    // `consume` without --exec prints and acks; `result --wait` gets nothing for it.
    let out = cli(
        &node,
        &["consume", "cli-jobs", "--max", "1", "--output", "json"],
    )
    .await;
    let printed: Value = serde_json::from_str(stdout(&out).lines().next().unwrap()).unwrap();
    assert_eq!(printed["id"], poison_id);
    assert_eq!(printed["attempt"], 1);
    let out = cli(&node, &["dlq", "purge", "cli-jobs", "--all"]).await;
    assert!(stdout(&out).contains("purged 0"), "{out:?}");
    let s = stats(&client, "cli-jobs").await;
    assert_eq!((s.depth, s.in_flight, s.dead_letters), (0, 0, 0));
    let waited = cli(
        &node,
        &["result", "nobody", "--wait", "--timeout-ms", "300"],
    )
    .await;
    assert!(!waited.status.success());
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_prefetch_gets_a_receipt_for_every_ack() {
    let node = queue_node().await;
    let client = node.client();
    const N: usize = 5000;
    for chunk in 0..10 {
        client
            .submit("wide", (0..N as u64 / 10).map(|i| job(chunk * 1000 + i)))
            .await
            .unwrap();
    }
    // More acks in flight than the node reads in one turn (1024).
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(ConsumeRequest {
        action: Some(Action::Subscribe(ConsumeSubscribe {
            queue: "wide".into(),
            prefetch: 3000,
            ..Default::default()
        })),
    })
    .unwrap();
    let mut inbound = queues(&node)
        .await
        .consume(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let (mut delivered, mut confirmed) = (HashSet::new(), 0);
    while confirmed < N {
        let response = tokio::time::timeout(Duration::from_secs(10), inbound.message())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "stalled: {} delivered, {confirmed} confirmed",
                    delivered.len()
                )
            })
            .unwrap()
            .unwrap();
        match response.event {
            Some(Event::Delivery(d)) => {
                assert!(delivered.insert(d.envelope.unwrap().id), "delivered twice");
                tx.send(ConsumeRequest {
                    action: Some(Action::Ack(ConsumeAck {
                        receipt: d.receipt,
                        result: None,
                    })),
                })
                .unwrap();
            }
            Some(Event::Receipt(r)) => {
                assert!(r.error.is_none(), "{r:?}");
                confirmed += 1;
            }
            Some(other) => panic!("a batch frame without max_batch: {other:?}"),
            None => {}
        }
    }
    assert_eq!(delivered.len(), N);
    let s = stats(&client, "wide").await;
    assert_eq!((s.depth, s.in_flight), (0, 0));
    node.stop().await;
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batched_consumer_gets_deliveries_and_receipts_a_frame_at_a_time() {
    let node = queue_node().await;
    let client = node.client();
    client.submit("batched", (1..=10).map(job)).await.unwrap();
    let mut consumer =
        RawConsumer::open_batched(&node, "batched", 16, Duration::from_secs(30), 4).await;
    // Frames of at most 4 deliveries.
    let mut deliveries = Vec::new();
    while deliveries.len() < 10 {
        let response = tokio::time::timeout(Duration::from_secs(5), consumer.inbound.message())
            .await
            .expect("deliveries")
            .unwrap()
            .unwrap();
        match response.event {
            Some(Event::Deliveries(batch)) => {
                assert!((1..=4).contains(&batch.deliveries.len()), "{batch:?}");
                deliveries.extend(batch.deliveries);
            }
            other => panic!("expected a deliveries frame, got {other:?}"),
        }
    }
    let mut ns: Vec<u64> = deliveries
        .iter()
        .map(|d| n_of(d.envelope.as_ref().unwrap()))
        .collect();
    ns.sort();
    assert_eq!(ns, (1..=10).collect::<Vec<_>>());
    // One `acks` frame, one `receipts` frame back, in the same order; a stale receipt fails
    // on its own.
    let mut acks: Vec<ConsumeAck> = deliveries
        .iter()
        .map(|d| ConsumeAck {
            receipt: d.receipt.clone(),
            result: None,
        })
        .collect();
    acks.insert(
        3,
        ConsumeAck {
            receipt: "1.999999.1".into(),
            result: None,
        },
    );
    let expected: Vec<String> = acks.iter().map(|a| a.receipt.clone()).collect();
    consumer
        .send(Action::Acks(agentmesh_proto::v1::ConsumeAckBatch { acks }))
        .await;
    let response = tokio::time::timeout(Duration::from_secs(5), consumer.inbound.message())
        .await
        .expect("receipts")
        .unwrap()
        .unwrap();
    let Some(Event::Receipts(batch)) = response.event else {
        panic!("expected a receipts frame, got {response:?}");
    };
    let got: Vec<String> = batch.receipts.iter().map(|r| r.receipt.clone()).collect();
    assert_eq!(got, expected);
    for (i, r) in batch.receipts.iter().enumerate() {
        assert_eq!(r.error.is_some(), i == 3, "{r:?}");
    }
    let s = wait_for_stats(&client, "batched", Duration::from_secs(2), |s| {
        s.in_flight == 0
    })
    .await;
    assert_eq!(s.depth, 0, "{s:?}");
    node.stop().await;
}
