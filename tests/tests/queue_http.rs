//! The durable queue over the HTTP gateway: one message or a batch with idempotency
//! keys, bad bodies, queue figures, dead letters listed, redriven and purged, and a
//! result stored under the call's correlation id.

use std::time::Duration;

use agentmesh_proto::v1::Envelope;
use agentmesh_tests::queue::{RawConsumer, queue_node};
use serde_json::{Value, json};

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
