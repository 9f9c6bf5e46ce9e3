//! The durable queue's delivery over gRPC and the SDK on a real node: each message
//! consumed exactly once by competing workers, idempotency keys, bad messages
//! rejected beside good ones, leases handed back when a consumer goes away, nacks
//! with backoff, stale receipts, and batched frames both ways.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use agentmesh_proto::v1::{
    ConsumeAck, ConsumeExtend, ConsumeRequest, ConsumeSubscribe, Envelope, SubmitRequest,
    SubmitStatus, consume_request::Action, consume_response::Event,
};
use agentmesh_sdk::Worker;
use agentmesh_tests::{
    eventually,
    queue::{
        RawConsumer, job, n_of, queue_node, queue_service_client, queue_stats, wait_for_queue_stats,
    },
};
use tokio::sync::mpsc;
use tonic::Code;

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
    assert_eq!(queue_stats(&client, "exactly-once").await.depth, N);

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
    let s = wait_for_queue_stats(&client, "exactly-once", Duration::from_secs(5), |s| {
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
    assert_eq!(queue_stats(&client, "dedup").await.depth, 2);
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
    let mut client = queue_service_client(&node).await;
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
    assert_eq!(queue_stats(&node.client(), "other").await.depth, 3);
    assert!(
        response.outcomes[1].reason.contains("queue"),
        "{response:?}"
    );
    assert!(response.outcomes[2].reason.contains("envelope"));
    assert!(response.outcomes[3].reason.contains("queue name"));
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
    // A consumer that died holding a message failed that attempt.
    assert_eq!(d2.attempt, 2);
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
    // Handing back with a zero lease is not a failed attempt.
    assert_eq!(d3.attempt, 2);
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
    let mut client = queue_service_client(&node).await;
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
    let mut inbound = queue_service_client(&node)
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
    let s = queue_stats(&client, "wide").await;
    assert_eq!((s.depth, s.in_flight), (0, 0));
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
    let s = wait_for_queue_stats(&client, "batched", Duration::from_secs(2), |s| {
        s.in_flight == 0
    })
    .await;
    assert_eq!(s.depth, 0, "{s:?}");
    node.stop().await;
}
