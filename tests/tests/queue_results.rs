//! Results of queued work on a real node: stored by correlation id when a consumer
//! acks with one, awaited over gRPC (`GetResult`, `AwaitResult`) and HTTP (long poll,
//! SSE), and also sent to the message's `reply_to` queue.

use std::time::{Duration, Instant};

use agentmesh_proto::v1::{AwaitResultRequest, Envelope, GetResultRequest};
use agentmesh_sdk::Worker;
use agentmesh_tests::queue::{RawConsumer, job, n_of, queue_node, queue_service_client};
use futures::StreamExt;
use serde_json::{Value, json};
use tonic::Code;

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
    let mut grpc = queue_service_client(&node).await;
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
