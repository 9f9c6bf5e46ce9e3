//! The HTTP gateway's JSON routes over real sockets: invoke with correlation,
//! tracing and timeout headers, agent listing and lookup, errors as JSON (invalid
//! JSON, oversized bodies, unknown agents), and CORS for pages on other origins.

use std::time::{Duration, Instant};

use agentmesh_gateway::GatewayConfig;
use agentmesh_proto::v1::Envelope;
use agentmesh_sdk::{Agent, Context};
use agentmesh_tests::{
    Echo, Streamer, TestNode, card, expect_gateway_error, http_client, start_agent,
};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite;
use tonic::Status;

/// Replies with what reached it: the envelope's tracing fields and the
/// call's correlation id.
struct Inspect;

#[tonic::async_trait]
impl Agent for Inspect {
    async fn invoke(&self, ctx: Context, request: Envelope) -> Result<Envelope, Status> {
        if let Some(ms) = request.json_payload().and_then(|p| p["sleep_ms"].as_u64()) {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        Ok(Envelope::json(
            "inspect.reply",
            json!({
                "correlation_id": ctx.correlation_id(),
                "envelope_correlation_id": request.correlation_id,
                "traceparent": request.traceparent,
                "idempotency_key": request.idempotency_key,
                "target": request.target,
            }),
        ))
    }
}

#[tokio::test]
async fn invoke_round_trip_echoes_correlation_id() {
    let node = TestNode::start().await;
    let agent = start_agent(&node, card("echo"), Echo).await;
    let client = http_client();

    let response = client
        .post(format!("{}/v1/agents/echo/invoke", node.http_url()))
        .header("x-correlation-id", "corr-gateway-1")
        .json(&json!({ "type": "echo.request", "json": { "text": "hi" } }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(response.headers()["x-correlation-id"], "corr-gateway-1");
    assert_eq!(response.headers()["content-type"], "application/json");
    let reply: Value = response.json().await.unwrap();
    assert_eq!(reply["json"], json!({ "text": "hi" }), "{reply}");
    assert_eq!(reply["correlationId"], "corr-gateway-1", "{reply}");
    assert_eq!(reply["source"], "echo", "{reply}");
    assert_eq!(reply["type"], "echo.reply", "{reply}");
    assert!(reply["causationId"].as_str().is_some_and(|c| !c.is_empty()));
    assert!(reply["id"].as_str().is_some_and(|c| !c.is_empty()));

    // Without one, the node generates an id, echoes it, and the reply carries it.
    let response = client
        .post(format!(
            "{}/v1/agents/skill:echo-skill/invoke",
            node.http_url()
        ))
        .body(r#"{"json":{"n":1}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let generated = response.headers()["x-correlation-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(!generated.is_empty());
    let reply: Value = response.json().await.unwrap();
    assert_eq!(reply["correlationId"], generated.as_str());
    assert_eq!(reply["json"], json!({ "n": 1 }));

    agent.shutdown().await;
    node.stop().await;
}

#[tokio::test]
async fn tracing_headers_and_timeout_reach_the_mesh() {
    let node = TestNode::start().await;
    let agent = start_agent(&node, card("inspect"), Inspect).await;
    let client = http_client();
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    let reply: Value = client
        .post(format!("{}/v1/agents/inspect/invoke", node.http_url()))
        .header("x-correlation-id", "corr-inspect")
        .header("traceparent", traceparent)
        .header("idempotency-key", "order-42")
        .json(&json!({ "json": {} }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let seen = &reply["json"];
    assert_eq!(seen["correlation_id"], "corr-inspect", "{reply}");
    assert_eq!(seen["envelope_correlation_id"], "corr-inspect", "{reply}");
    // The agent sees the node's hop span: the caller's trace, a span of its own.
    let seen_traceparent = seen["traceparent"].as_str().unwrap();
    assert_eq!(
        seen_traceparent[..36],
        traceparent[..36],
        "same trace: {reply}"
    );
    assert_ne!(seen_traceparent, traceparent, "a child span: {reply}");
    assert_eq!(seen_traceparent.len(), traceparent.len(), "{reply}");
    assert_eq!(seen["idempotency_key"], "order-42", "{reply}");
    assert_eq!(seen["target"], "inspect", "the path names the target");

    // The body's own key wins over the header.
    let reply: Value = client
        .post(format!("{}/v1/agents/inspect/invoke", node.http_url()))
        .header("idempotency-key", "from-header")
        .json(&json!({ "idempotencyKey": "from-body", "json": {} }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(reply["json"]["idempotency_key"], "from-body");

    // X-Timeout-Ms bounds the call: 504 DEADLINE_EXCEEDED.
    let started = Instant::now();
    let response = client
        .post(format!("{}/v1/agents/inspect/invoke", node.http_url()))
        .header("x-timeout-ms", "300")
        .json(&json!({ "json": { "sleep_ms": 3000 } }))
        .send()
        .await
        .unwrap();
    let body = expect_gateway_error(response, 504, "DEADLINE_EXCEEDED").await;
    assert!(started.elapsed() < Duration::from_secs(2), "{body}");

    agent.shutdown().await;
    node.stop().await;
}

#[tokio::test]
async fn agents_are_listed_filtered_and_looked_up() {
    let node = TestNode::start().await;
    let echo = start_agent(&node, card("echo"), Echo).await;
    let streamer = start_agent(&node, card("streamer"), Streamer).await;
    let client = http_client();

    let all: Value = client
        .get(format!("{}/v1/agents", node.http_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = all["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["card"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["echo", "streamer"], "{all}");
    assert!(all["agents"][0]["lease"]["expiresAt"].is_string(), "{all}");

    let by_skill: Value = client
        .get(format!(
            "{}/v1/agents?skill=streamer-skill",
            node.http_url()
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(by_skill["agents"].as_array().unwrap().len(), 1);
    assert_eq!(by_skill["agents"][0]["card"]["name"], "streamer");

    let none: Value = client
        .get(format!("{}/v1/agents?tag=nothing-has-it", node.http_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(none, json!({ "agents": [] }));

    let one: Value = client
        .get(format!("{}/v1/agents/echo", node.http_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(one["agents"][0]["card"]["name"], "echo");
    assert_eq!(one["agents"][0]["card"]["endpoint"], echo.card().endpoint);

    let missing = client
        .get(format!("{}/v1/agents/no-such-agent", node.http_url()))
        .send()
        .await
        .unwrap();
    expect_gateway_error(missing, 404, "NOT_FOUND").await;

    let bad = client
        .get(format!("{}/v1/agents?colour=blue", node.http_url()))
        .send()
        .await
        .unwrap();
    let body = expect_gateway_error(bad, 400, "INVALID_ARGUMENT").await;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("colour"),
        "{body}"
    );

    echo.shutdown().await;
    streamer.shutdown().await;
    node.stop().await;
}

#[tokio::test]
async fn invalid_json_is_400_with_a_clear_message() {
    let node = TestNode::start().await;
    let agent = start_agent(&node, card("echo"), Echo).await;
    let client = http_client();

    for (route, body, mentions) in [
        ("invoke", r#"{"json": {"text": "#, "EOF"),
        ("invoke", r#"{"jsn": {"text": "hi"}}"#, "jsn"),
        ("invoke", r#"{"attempt": "many"}"#, "attempt"),
        ("invoke", r#"[1, 2]"#, "agentmesh.v1.Envelope"),
        ("stream", r#"{"json": "#, "EOF"),
    ] {
        let response = client
            .post(format!("{}/v1/agents/echo/{route}", node.http_url()))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let error = expect_gateway_error(response, 400, "INVALID_ARGUMENT").await;
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains("invalid JSON"), "{message}");
        assert!(message.contains("agentmesh.v1.Envelope"), "{message}");
        assert!(message.contains(mentions), "{body}: {message}");
        assert_eq!(error["error"]["details"][0]["reason"], "INVALID_JSON");
        assert_eq!(error["error"]["details"][0]["domain"], "agentmesh.dev");
    }

    agent.shutdown().await;
    node.stop().await;
}

#[tokio::test]
async fn body_over_the_limit_is_413_json() {
    let node = TestNode::start_with_gateway(GatewayConfig {
        max_body_bytes: 1024,
        ..Default::default()
    })
    .await;
    let agent = start_agent(&node, card("echo"), Echo).await;
    let client = http_client();
    let big = json!({ "json": { "text": "x".repeat(4096) } }).to_string();

    // With a Content-Length (refused before reading) ...
    let response = client
        .post(format!("{}/v1/agents/echo/invoke", node.http_url()))
        .body(big.clone())
        .send()
        .await
        .unwrap();
    let error = expect_gateway_error(response, 413, "RESOURCE_EXHAUSTED").await;
    assert_eq!(error["error"]["details"][0]["reason"], "BODY_TOO_LARGE");

    // ... and chunked, without one (refused while reading).
    let chunks: Vec<Result<String, std::io::Error>> = big
        .as_bytes()
        .chunks(512)
        .map(|c| Ok(String::from_utf8(c.to_vec()).unwrap()))
        .collect();
    let response = client
        .post(format!("{}/v1/agents/echo/stream", node.http_url()))
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    expect_gateway_error(response, 413, "RESOURCE_EXHAUSTED").await;

    // A body under the limit still works.
    let response = client
        .post(format!("{}/v1/agents/echo/invoke", node.http_url()))
        .json(&json!({ "json": { "text": "small" } }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);

    agent.shutdown().await;
    node.stop().await;
}

#[tokio::test]
async fn unknown_agent_is_404_json() {
    let node = TestNode::start().await;
    let client = http_client();
    for route in ["invoke", "stream", "stream?detach"] {
        let response = client
            .post(format!(
                "{}/v1/agents/no-such-agent/{route}",
                node.http_url()
            ))
            .json(&json!({ "json": {} }))
            .send()
            .await
            .unwrap();
        assert!(response.headers().contains_key("x-correlation-id"));
        let error = expect_gateway_error(response, 404, "NOT_FOUND").await;
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains("no-such-agent"), "{message}");
        let info = &error["error"]["details"][0];
        assert_eq!(info["@type"], "type.googleapis.com/google.rpc.ErrorInfo");
        assert_eq!(info["reason"], "AGENT_NOT_FOUND");
        assert_eq!(info["metadata"]["target"], "no-such-agent");
    }

    // A WebSocket to an unknown agent is refused before the upgrade.
    let url = format!("ws://{}/v1/agents/no-such-agent/converse", node.addr());
    match tokio_tungstenite::connect_async(url).await {
        Err(tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 404);
            let body: Value = serde_json::from_slice(response.body().as_deref().unwrap()).unwrap();
            assert_eq!(body["error"]["code"], "NOT_FOUND");
        }
        other => panic!("expected a 404, got {other:?}"),
    }

    // An unknown stream.
    let response = client
        .get(format!(
            "{}/v1/streams/no-such-stream/events",
            node.http_url()
        ))
        .send()
        .await
        .unwrap();
    expect_gateway_error(response, 404, "NOT_FOUND").await;
    node.stop().await;
}

#[tokio::test]
async fn cors_preflight_from_an_allowed_origin() {
    let node = TestNode::start_with_gateway(GatewayConfig {
        cors_origins: vec!["http://app.example".into()],
        ..Default::default()
    })
    .await;
    let agent = start_agent(&node, card("echo"), Echo).await;
    let client = http_client();
    let preflight = |origin: &'static str| {
        client
            .request(
                reqwest::Method::OPTIONS,
                format!("{}/v1/agents/echo/invoke", node.http_url()),
            )
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "content-type,x-correlation-id,x-timeout-ms",
            )
            .send()
    };

    let allowed = preflight("http://app.example").await.unwrap();
    assert!(allowed.status().is_success(), "{}", allowed.status());
    let headers = allowed.headers();
    assert_eq!(headers["access-control-allow-origin"], "http://app.example");
    let methods = headers["access-control-allow-methods"].to_str().unwrap();
    assert!(methods.contains("POST"), "{methods}");
    let allowed_headers = headers["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    for header in ["content-type", "x-correlation-id", "x-timeout-ms"] {
        assert!(allowed_headers.contains(header), "{allowed_headers}");
    }

    let refused = preflight("http://evil.example").await.unwrap();
    assert!(
        !refused
            .headers()
            .contains_key("access-control-allow-origin"),
        "other origins are not allowed"
    );

    // The actual request carries the CORS headers and exposes the correlation id.
    let response = client
        .post(format!("{}/v1/agents/echo/invoke", node.http_url()))
        .header("origin", "http://app.example")
        .json(&json!({ "json": {} }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        "http://app.example"
    );
    let exposed = response.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap();
    assert!(exposed.contains("x-correlation-id"), "{exposed}");

    agent.shutdown().await;
    node.stop().await;

    // Without configured origins there is no CORS at all.
    let node = TestNode::start().await;
    let response = client
        .get(format!("{}/v1/agents", node.http_url()))
        .header("origin", "http://app.example")
        .send()
        .await
        .unwrap();
    assert!(
        !response
            .headers()
            .contains_key("access-control-allow-origin")
    );
    node.stop().await;
}
