//! Dead letters on a real node: a poison message is dead-lettered after its attempts
//! while the others flow, then listed, redriven and purged.

use std::{
    collections::HashSet,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use agentmesh_proto::v1::Envelope;
use agentmesh_sdk::{DeadLetterSelection, Worker};
use agentmesh_tests::{
    eventually,
    queue::{RawConsumer, job, n_of, queue_node, wait_for_queue_stats},
};
use serde_json::json;
use tonic::{Code, Status};

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
    let s = wait_for_queue_stats(&client, "poison", Duration::from_secs(10), |s| {
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
    let s = wait_for_queue_stats(&client, "poison", Duration::from_secs(5), |s| {
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
    wait_for_queue_stats(&client, "poison", Duration::from_secs(5), |s| {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_that_kills_its_consumer_every_time_is_dead_lettered() {
    let node = queue_node().await;
    let client = node.client();
    let response = client.submit("crashes", [job(13)]).await.unwrap();
    let message_id = response.outcomes[0].message_id.clone();
    // max_attempts is 3: each consumer takes the message and dies holding it (its
    // connection drops without an ack or a nack).
    for attempt in 1..=3 {
        let mut doomed = RawConsumer::open(&node, "crashes", 1, Duration::from_secs(60)).await;
        let d = doomed
            .delivery(Duration::from_secs(5))
            .await
            .unwrap_or_else(|| panic!("attempt {attempt} was not delivered at once"));
        assert_eq!(d.attempt, attempt);
        assert_eq!(d.envelope.as_ref().unwrap().attempt, attempt);
        drop(doomed);
    }
    let s = wait_for_queue_stats(&client, "crashes", Duration::from_secs(5), |s| {
        s.dead_letters == 1
    })
    .await;
    assert_eq!((s.depth, s.in_flight), (0, 0));
    let page = client.list_dead_letters("crashes", 0, "").await.unwrap();
    let dead = &page.dead_letters[0];
    assert_eq!(dead.message_id, message_id);
    assert!(dead.last_error.contains("consumer went away"), "{dead:?}");
    let attempts: Vec<u32> = dead.attempts.iter().map(|a| a.attempt).collect();
    assert_eq!(attempts, [1, 2, 3]);
    for a in &dead.attempts {
        assert!(a.error.contains("consumer went away"), "{a:?}");
        assert!(a.consumer_id.starts_with("raw-"), "{a:?}");
    }
    node.stop().await;
}
