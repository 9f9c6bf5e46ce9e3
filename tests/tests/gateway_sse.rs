//! Server-Sent Events from the gateway over real sockets: every event in order and
//! flushed as it is produced, resumption with `Last-Event-ID`, a terminal error as an
//! `error` event, and detached streams read at their own URL.

use std::time::{Duration, Instant};

use agentmesh_gateway::GatewayConfig;
use agentmesh_tests::{
    SseEvent, SseReader, Streamer, TestNode, card, expect_gateway_error, http_client, start_agent,
};
use serde_json::{Value, json};

fn stream_request(n: u64, delay_ms: u64) -> Value {
    json!({ "type": "count.request", "json": { "n": n, "delay_ms": delay_ms } })
}

/// Checks a complete Streamer stream of `n` partials starting at `from`.
fn assert_streamer_events(events: &[SseEvent], n: u64, from: u64) {
    let total = n + 2;
    let sequences: Vec<u64> = events.iter().map(SseEvent::sequence).collect();
    let expected: Vec<u64> = (from..=total).collect();
    assert_eq!(sequences, expected, "no gap, no duplicate, in order");
    let stream_id = events[0].stream_id();
    for event in events {
        let seq = event.sequence();
        let data = event.json();
        assert_eq!(event.stream_id(), stream_id);
        assert_eq!(data["streamId"], stream_id.as_str(), "{data}");
        assert_eq!(data["sequence"], seq.to_string(), "{data}");
        let (name, kind) = match seq {
            1 => ("progress", "STREAM_EVENT_KIND_PROGRESS"),
            s if s == total => ("result", "STREAM_EVENT_KIND_RESULT"),
            _ => ("partial", "STREAM_EVENT_KIND_PARTIAL"),
        };
        assert_eq!(event.event, name, "event name of {seq}");
        assert_eq!(data["kind"], kind, "{data}");
        match name {
            "partial" => assert_eq!(data["envelope"]["json"]["i"], seq - 1, "{data}"),
            "result" => assert_eq!(data["envelope"]["json"]["done"], n, "{data}"),
            _ => assert_eq!(data["message"], "starting", "{data}"),
        }
    }
}

#[tokio::test]
async fn sse_stream_delivers_every_event_in_order() {
    let node = TestNode::start().await;
    let agent = start_agent(&node, card("streamer"), Streamer).await;
    let n = 100;
    let response = http_client()
        .post(format!("{}/v1/agents/streamer/stream", node.http_url()))
        .header("x-correlation-id", "corr-sse")
        .json(&stream_request(n, 0))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-correlation-id"], "corr-sse");
    assert_eq!(response.headers()["cache-control"], "no-cache");
    let events = SseReader::new(response).rest().await;
    assert_eq!(events.len() as u64, n + 2);
    assert_streamer_events(&events, n, 1);
    let result = events.last().unwrap().json();
    assert_eq!(result["envelope"]["correlationId"], "corr-sse", "{result}");

    agent.shutdown().await;
    node.stop().await;
}

#[tokio::test]
async fn sse_events_are_flushed_as_they_are_produced() {
    let node = TestNode::start_with_gateway(GatewayConfig {
        sse_keep_alive: Duration::from_millis(100),
        ..Default::default()
    })
    .await;
    let agent = start_agent(&node, card("streamer"), Streamer).await;
    let started = Instant::now();
    let response = http_client()
        .post(format!("{}/v1/agents/streamer/stream", node.http_url()))
        .json(&stream_request(4, 500))
        .send()
        .await
        .unwrap();
    let mut reader = SseReader::new(response);
    let mut arrivals = Vec::new();
    while let Some(event) = reader.next().await {
        arrivals.push((event.sequence(), started.elapsed()));
    }
    assert_eq!(arrivals.len(), 6, "{arrivals:?}");
    // Partial i is produced at about i * 500 ms: each must arrive then
    // (before the next one is produced), not all at the end.
    for &(sequence, at) in &arrivals[1..5] {
        let produced = Duration::from_millis(500 * (sequence - 1));
        assert!(
            at >= produced - Duration::from_millis(50)
                && at < produced + Duration::from_millis(400),
            "event {sequence} arrived at {at:?}, produced at about {produced:?}: {arrivals:?}"
        );
    }
    assert!(
        reader.comments >= 4,
        "keep-alive comments while the stream is quiet ({} seen)",
        reader.comments
    );
    agent.shutdown().await;
    node.stop().await;
}

#[tokio::test]
async fn sse_resumes_from_last_event_id_after_a_cut() {
    let node = TestNode::start().await;
    let agent = start_agent(&node, card("streamer"), Streamer).await;
    let client = http_client();
    let n = 30;
    let url = format!("{}/v1/agents/streamer/stream", node.http_url());
    let response = client
        .post(&url)
        .json(&stream_request(n, 20))
        .send()
        .await
        .unwrap();
    let mut reader = SseReader::new(response);
    let mut first = Vec::new();
    for _ in 0..10 {
        first.push(reader.next().await.unwrap());
    }
    // Cut the connection mid-stream.
    drop(reader);
    let last_id = first.last().unwrap().id.clone().unwrap();
    assert!(last_id.ends_with(":10"), "{last_id}");

    let response = client
        .post(&url)
        .header("last-event-id", &last_id)
        .send()
        .await
        .unwrap();
    let rest = SseReader::new(response).rest().await;
    let mut all = first.clone();
    all.extend(rest.iter().cloned());
    assert_eq!(rest.first().unwrap().sequence(), 11, "no gap");
    assert_streamer_events(&all, n, 1);

    // The same through the stream's own URL, from the middle.
    let stream_id = first[0].stream_id();
    let response = client
        .get(format!("{}/v1/streams/{stream_id}/events", node.http_url()))
        .header("last-event-id", format!("{stream_id}:25"))
        .send()
        .await
        .unwrap();
    let tail = SseReader::new(response).rest().await;
    assert_streamer_events(&tail, n, 26);

    // After the last event there is nothing more: 204 stops an EventSource.
    let response = client
        .post(&url)
        .header("last-event-id", format!("{stream_id}:{}", n + 2))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 204);

    // A malformed id is a 400, an unknown stream a 404.
    let response = client
        .post(&url)
        .header("last-event-id", "not-an-id")
        .send()
        .await
        .unwrap();
    expect_gateway_error(response, 400, "INVALID_ARGUMENT").await;
    let response = client
        .post(&url)
        .header("last-event-id", "no-such-stream:3")
        .send()
        .await
        .unwrap();
    expect_gateway_error(response, 404, "NOT_FOUND").await;

    agent.shutdown().await;
    node.stop().await;
}

#[tokio::test]
async fn sse_terminal_error_is_an_error_event() {
    let node = TestNode::start().await;
    let agent = start_agent(&node, card("streamer"), Streamer).await;
    let response = http_client()
        .post(format!("{}/v1/agents/streamer/stream", node.http_url()))
        .json(&json!({ "json": { "n": 3, "fail": true } }))
        .send()
        .await
        .unwrap();
    let events = SseReader::new(response).rest().await;
    let names: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(
        names,
        ["progress", "partial", "partial", "partial", "error"]
    );
    let error = events.last().unwrap().json();
    assert_eq!(error["error"]["code"], "ABORTED", "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("on purpose"),
        "{error}"
    );
    agent.shutdown().await;
    node.stop().await;
}

#[tokio::test]
async fn detached_stream_is_read_at_its_events_url() {
    let node = TestNode::start().await;
    let agent = start_agent(&node, card("streamer"), Streamer).await;
    let client = http_client();
    let n = 40;
    for detach in ["detach", "detach=true"] {
        let response = client
            .post(format!(
                "{}/v1/agents/streamer/stream?{detach}",
                node.http_url()
            ))
            .json(&stream_request(n, 2))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 202);
        let location = response.headers()["location"].to_str().unwrap().to_owned();
        let detached: Value = response.json().await.unwrap();
        let stream_id = detached["stream_id"].as_str().unwrap().to_owned();
        let events_url = detached["events_url"].as_str().unwrap().to_owned();
        assert_eq!(events_url, format!("/v1/streams/{stream_id}/events"));
        assert_eq!(location, events_url);

        // Nobody reads for a while: the node keeps the events.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let response = client
            .get(format!("{}{events_url}", node.http_url()))
            .send()
            .await
            .unwrap();
        let events = SseReader::new(response).rest().await;
        assert_streamer_events(&events, n, 1);
        assert_eq!(events[0].stream_id(), stream_id);

        // What a reconnecting EventSource does: resume after its last id.
        let response = client
            .get(format!("{}{events_url}", node.http_url()))
            .header("last-event-id", format!("{stream_id}:20"))
            .send()
            .await
            .unwrap();
        assert_streamer_events(&SseReader::new(response).rest().await, n, 21);
    }
    agent.shutdown().await;
    node.stop().await;
}
