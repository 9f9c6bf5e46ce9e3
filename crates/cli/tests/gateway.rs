//! The HTTP gateway over real sockets: a real node, real agents, and real
//! HTTP clients (reqwest for JSON and SSE, tokio-tungstenite for WebSocket,
//! headless Chromium for a cross-origin EventSource).

mod common;

use std::{
    net::SocketAddr,
    pin::Pin,
    time::{Duration, Instant},
};

use agentmesh_gateway::GatewayConfig;
use agentmesh_node::NodeConfig;
use agentmesh_proto::v1::Envelope;
use agentmesh_sdk::{Agent, Context, Conversation, StreamSink};
use bytes::Bytes;
use common::*;
use futures::{SinkExt, Stream, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{self, Message};
use tonic::Status;

// ---------------------------------------------------------------------------
// Agents

/// Streams `{"n": N, "delay_ms": D, "fail": bool}`: one progress event, N
/// partial results `{"i": i}` (D ms apart), then the result `{"done": N}` —
/// or, with `fail`, an ABORTED error instead of the result.
struct Streamer;

#[tonic::async_trait]
impl Agent for Streamer {
    async fn invoke(&self, _ctx: Context, request: Envelope) -> Result<Envelope, Status> {
        Ok(request)
    }

    async fn stream(
        &self,
        _ctx: Context,
        request: Envelope,
        events: StreamSink,
    ) -> Result<Envelope, Status> {
        let payload = request.json_payload().unwrap_or_default();
        let n = payload["n"].as_u64().unwrap_or(10);
        let delay = Duration::from_millis(payload["delay_ms"].as_u64().unwrap_or(0));
        events.progress(0.0, "starting").await?;
        for i in 1..=n {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            events
                .partial(Envelope::json("count.partial", json!({ "i": i })))
                .await?;
        }
        if payload["fail"] == json!(true) {
            return Err(Status::aborted(format!(
                "the streamer failed on purpose after {n} events"
            )));
        }
        Ok(Envelope::json("count.result", json!({ "done": n })))
    }
}

/// Replies to each message `{"n": x}` with `{"n": x, "k": <count>}`; ends on
/// `{"end": true}`, fails with ABORTED on `{"fail": true}`.
struct Chatter;

#[tonic::async_trait]
impl Agent for Chatter {
    async fn invoke(&self, _ctx: Context, request: Envelope) -> Result<Envelope, Status> {
        Ok(request)
    }

    async fn converse(&self, _ctx: Context, mut conversation: Conversation) -> Result<(), Status> {
        let mut k = 0u64;
        while let Some(message) = conversation.recv().await {
            let payload = message.json_payload().unwrap_or_default();
            if payload["fail"] == json!(true) {
                return Err(Status::aborted("the chatter was asked to fail"));
            }
            if payload["end"] == json!(true) {
                return Ok(());
            }
            k += 1;
            conversation
                .send(Envelope::json(
                    "chat.reply",
                    json!({ "n": payload["n"], "k": k }),
                ))
                .await?;
        }
        Ok(())
    }
}

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

// ---------------------------------------------------------------------------
// Fixtures

fn base(node: &TestNode) -> String {
    format!("http://{}", node.addr())
}

async fn node_with(gateway: GatewayConfig) -> TestNode {
    TestNode::start_with(
        NodeConfig {
            gateway,
            ..test_config()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Asserts the gateway's error JSON and returns it.
async fn expect_error(response: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(response.status().as_u16(), status, "HTTP status");
    assert_eq!(
        response.headers()["content-type"],
        "application/json",
        "errors are JSON"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
    assert!(body["error"]["details"].is_array(), "{body}");
    body
}

/// One Server-Sent Event.
#[derive(Debug, Clone)]
struct SseEvent {
    id: Option<String>,
    event: String,
    data: String,
}

impl SseEvent {
    fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap()
    }

    /// The sequence in `id: <stream_id>:<sequence>`.
    fn sequence(&self) -> u64 {
        let id = self.id.as_deref().expect("event has an id");
        id.rsplit_once(':').unwrap().1.parse().unwrap()
    }

    fn stream_id(&self) -> String {
        let id = self.id.as_deref().expect("event has an id");
        id.rsplit_once(':').unwrap().0.to_owned()
    }
}

/// A reader of the SSE wire format over a response body.
struct SseReader {
    body: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    buffer: Vec<u8>,
    comments: usize,
}

impl SseReader {
    fn new(response: reqwest::Response) -> Self {
        assert_eq!(response.status().as_u16(), 200, "SSE answers 200");
        assert_eq!(
            response.headers()["content-type"],
            "text/event-stream",
            "SSE content type"
        );
        Self {
            body: Box::pin(response.bytes_stream()),
            buffer: Vec::new(),
            comments: 0,
        }
    }

    /// The next event (comments are counted, not returned); `None` at the end.
    async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buffer.drain(..end + 2).collect();
                let block = String::from_utf8(block).expect("SSE is UTF-8");
                let mut event = SseEvent {
                    id: None,
                    event: "message".into(),
                    data: String::new(),
                };
                let mut has_data = false;
                for line in block.lines().filter(|l| !l.is_empty()) {
                    if line.starts_with(':') {
                        self.comments += 1;
                        continue;
                    }
                    let (field, value) = line.split_once(':').unwrap_or((line, ""));
                    let value = value.strip_prefix(' ').unwrap_or(value);
                    match field {
                        "id" => event.id = Some(value.to_owned()),
                        "event" => event.event = value.to_owned(),
                        "data" => {
                            if has_data {
                                event.data.push('\n');
                            }
                            event.data.push_str(value);
                            has_data = true;
                        }
                        _ => {}
                    }
                }
                if has_data {
                    return Some(event);
                }
                continue;
            }
            match tokio::time::timeout(Duration::from_secs(20), self.body.next())
                .await
                .expect("the SSE stream stalled")
            {
                Some(Ok(chunk)) => self.buffer.extend_from_slice(&chunk),
                Some(Err(error)) => panic!("SSE body failed: {error}"),
                None => return None,
            }
        }
    }

    async fn rest(mut self) -> Vec<SseEvent> {
        let mut events = Vec::new();
        while let Some(event) = self.next().await {
            events.push(event);
        }
        events
    }
}

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

// ---------------------------------------------------------------------------
// JSON routes

#[tokio::test]
async fn invoke_round_trip_echoes_correlation_id() {
    let node = TestNode::start().await;
    let agent = start_agent(&node, card("echo"), Echo).await;
    let client = http();

    let response = client
        .post(format!("{}/v1/agents/echo/invoke", base(&node)))
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
        .post(format!("{}/v1/agents/skill:echo-skill/invoke", base(&node)))
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
    let client = http();
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    let reply: Value = client
        .post(format!("{}/v1/agents/inspect/invoke", base(&node)))
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
    assert_eq!(seen["traceparent"], traceparent, "{reply}");
    assert_eq!(seen["idempotency_key"], "order-42", "{reply}");
    assert_eq!(seen["target"], "inspect", "the path names the target");

    // The body's own key wins over the header.
    let reply: Value = client
        .post(format!("{}/v1/agents/inspect/invoke", base(&node)))
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
        .post(format!("{}/v1/agents/inspect/invoke", base(&node)))
        .header("x-timeout-ms", "300")
        .json(&json!({ "json": { "sleep_ms": 3000 } }))
        .send()
        .await
        .unwrap();
    let body = expect_error(response, 504, "DEADLINE_EXCEEDED").await;
    assert!(started.elapsed() < Duration::from_secs(2), "{body}");

    agent.shutdown().await;
    node.stop().await;
}

#[tokio::test]
async fn agents_are_listed_filtered_and_looked_up() {
    let node = TestNode::start().await;
    let echo = start_agent(&node, card("echo"), Echo).await;
    let streamer = start_agent(&node, card("streamer"), Streamer).await;
    let client = http();

    let all: Value = client
        .get(format!("{}/v1/agents", base(&node)))
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
        .get(format!("{}/v1/agents?skill=streamer-skill", base(&node)))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(by_skill["agents"].as_array().unwrap().len(), 1);
    assert_eq!(by_skill["agents"][0]["card"]["name"], "streamer");

    let none: Value = client
        .get(format!("{}/v1/agents?tag=nothing-has-it", base(&node)))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(none, json!({ "agents": [] }));

    let one: Value = client
        .get(format!("{}/v1/agents/echo", base(&node)))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(one["agents"][0]["card"]["name"], "echo");
    assert_eq!(one["agents"][0]["card"]["endpoint"], echo.card().endpoint);

    let missing = client
        .get(format!("{}/v1/agents/no-such-agent", base(&node)))
        .send()
        .await
        .unwrap();
    expect_error(missing, 404, "NOT_FOUND").await;

    let bad = client
        .get(format!("{}/v1/agents?colour=blue", base(&node)))
        .send()
        .await
        .unwrap();
    let body = expect_error(bad, 400, "INVALID_ARGUMENT").await;
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
    let client = http();

    for (route, body, mentions) in [
        ("invoke", r#"{"json": {"text": "#, "EOF"),
        ("invoke", r#"{"jsn": {"text": "hi"}}"#, "jsn"),
        ("invoke", r#"{"attempt": "many"}"#, "attempt"),
        ("invoke", r#"[1, 2]"#, "agentmesh.v1.Envelope"),
        ("stream", r#"{"json": "#, "EOF"),
    ] {
        let response = client
            .post(format!("{}/v1/agents/echo/{route}", base(&node)))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let error = expect_error(response, 400, "INVALID_ARGUMENT").await;
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
    let node = node_with(GatewayConfig {
        max_body_bytes: 1024,
        ..Default::default()
    })
    .await;
    let agent = start_agent(&node, card("echo"), Echo).await;
    let client = http();
    let big = json!({ "json": { "text": "x".repeat(4096) } }).to_string();

    // With a Content-Length (refused before reading) ...
    let response = client
        .post(format!("{}/v1/agents/echo/invoke", base(&node)))
        .body(big.clone())
        .send()
        .await
        .unwrap();
    let error = expect_error(response, 413, "RESOURCE_EXHAUSTED").await;
    assert_eq!(error["error"]["details"][0]["reason"], "BODY_TOO_LARGE");

    // ... and chunked, without one (refused while reading).
    let chunks: Vec<Result<String, std::io::Error>> = big
        .as_bytes()
        .chunks(512)
        .map(|c| Ok(String::from_utf8(c.to_vec()).unwrap()))
        .collect();
    let response = client
        .post(format!("{}/v1/agents/echo/stream", base(&node)))
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    expect_error(response, 413, "RESOURCE_EXHAUSTED").await;

    // A body under the limit still works.
    let response = client
        .post(format!("{}/v1/agents/echo/invoke", base(&node)))
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
    let client = http();
    for route in ["invoke", "stream", "stream?detach"] {
        let response = client
            .post(format!("{}/v1/agents/no-such-agent/{route}", base(&node)))
            .json(&json!({ "json": {} }))
            .send()
            .await
            .unwrap();
        assert!(response.headers().contains_key("x-correlation-id"));
        let error = expect_error(response, 404, "NOT_FOUND").await;
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
        .get(format!("{}/v1/streams/no-such-stream/events", base(&node)))
        .send()
        .await
        .unwrap();
    expect_error(response, 404, "NOT_FOUND").await;
    node.stop().await;
}

#[tokio::test]
async fn health_readiness_and_openapi() {
    let node = TestNode::start().await;
    let client = http();
    let healthz = client
        .get(format!("{}/healthz", base(&node)))
        .send()
        .await
        .unwrap();
    assert_eq!(healthz.status().as_u16(), 200);
    let readyz = client
        .get(format!("{}/readyz", base(&node)))
        .send()
        .await
        .unwrap();
    assert_eq!(readyz.status().as_u16(), 200);
    assert_eq!(
        readyz.json::<Value>().await.unwrap(),
        json!({ "status": "ready" })
    );

    let document = openapi(&node).await;
    assert!(
        document["openapi"].as_str().unwrap().starts_with("3."),
        "OpenAPI 3"
    );
    assert_eq!(document["info"]["title"], "agentmesh HTTP gateway");
    let description = document["info"]["description"].as_str().unwrap();
    for header in [
        "X-Timeout-Ms",
        "X-Correlation-Id",
        "traceparent",
        "Idempotency-Key",
        "Last-Event-ID",
    ] {
        assert!(description.contains(header), "documents {header}");
    }
    let paths = document["paths"].as_object().unwrap();
    for (path, method) in [
        ("/v1/agents", "get"),
        ("/v1/agents/{name}", "get"),
        ("/v1/agents/{name}/invoke", "post"),
        ("/v1/agents/{name}/stream", "post"),
        ("/v1/agents/{name}/converse", "get"),
        ("/v1/streams/{id}/events", "get"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/openapi.json", "get"),
    ] {
        let operation = &paths[path][method];
        assert!(operation.is_object(), "{method} {path} is documented");
        assert!(operation["responses"].is_object(), "{method} {path}");
    }
    let invoke_params: Vec<&str> = paths["/v1/agents/{name}/invoke"]["post"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert!(invoke_params.contains(&"X-Timeout-Ms"), "{invoke_params:?}");
    assert!(
        invoke_params.contains(&"Idempotency-Key"),
        "{invoke_params:?}"
    );

    // gRPC still answers next to the gateway.
    let mut health = tonic_health::pb::health_client::HealthClient::new(node.channel().await);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.status, 1, "SERVING");
    node.stop().await;
}

async fn openapi(node: &TestNode) -> Value {
    let response = http()
        .get(format!("{}/openapi.json", base(node)))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    response.json().await.unwrap()
}

/// Validates `/openapi.json` with PyPI's `openapi-spec-validator`, run by the
/// Python in `AGENTMESH_TEST_PYTHON`.
#[tokio::test]
async fn openapi_passes_openapi_spec_validator() {
    let Ok(python) = std::env::var("AGENTMESH_TEST_PYTHON") else {
        eprintln!(
            "SKIPPED openapi_passes_openapi_spec_validator: set AGENTMESH_TEST_PYTHON to a python with openapi-spec-validator"
        );
        return;
    };
    let node = TestNode::start().await;
    let document = openapi(&node).await;
    node.stop().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("openapi.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&document).unwrap()).unwrap();
    let output = tokio::process::Command::new(&python)
        .args(["-m", "openapi_spec_validator"])
        .arg(&path)
        .output()
        .await
        .expect("run the validator");
    assert!(
        output.status.success(),
        "openapi-spec-validator rejects the document:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn cors_preflight_from_an_allowed_origin() {
    let node = node_with(GatewayConfig {
        cors_origins: vec!["http://app.example".into()],
        ..Default::default()
    })
    .await;
    let agent = start_agent(&node, card("echo"), Echo).await;
    let client = http();
    let preflight = |origin: &'static str| {
        client
            .request(
                reqwest::Method::OPTIONS,
                format!("{}/v1/agents/echo/invoke", base(&node)),
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
        .post(format!("{}/v1/agents/echo/invoke", base(&node)))
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
        .get(format!("{}/v1/agents", base(&node)))
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

// ---------------------------------------------------------------------------
// Server-Sent Events

#[tokio::test]
async fn sse_stream_delivers_every_event_in_order() {
    let node = TestNode::start().await;
    let agent = start_agent(&node, card("streamer"), Streamer).await;
    let n = 100;
    let response = http()
        .post(format!("{}/v1/agents/streamer/stream", base(&node)))
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
    let node = node_with(GatewayConfig {
        sse_keep_alive: Duration::from_millis(100),
        ..Default::default()
    })
    .await;
    let agent = start_agent(&node, card("streamer"), Streamer).await;
    let started = Instant::now();
    let response = http()
        .post(format!("{}/v1/agents/streamer/stream", base(&node)))
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
    let client = http();
    let n = 30;
    let url = format!("{}/v1/agents/streamer/stream", base(&node));
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
        .get(format!("{}/v1/streams/{stream_id}/events", base(&node)))
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
    expect_error(response, 400, "INVALID_ARGUMENT").await;
    let response = client
        .post(&url)
        .header("last-event-id", "no-such-stream:3")
        .send()
        .await
        .unwrap();
    expect_error(response, 404, "NOT_FOUND").await;

    agent.shutdown().await;
    node.stop().await;
}

#[tokio::test]
async fn sse_terminal_error_is_an_error_event() {
    let node = TestNode::start().await;
    let agent = start_agent(&node, card("streamer"), Streamer).await;
    let response = http()
        .post(format!("{}/v1/agents/streamer/stream", base(&node)))
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
    let client = http();
    let n = 40;
    for detach in ["detach", "detach=true"] {
        let response = client
            .post(format!(
                "{}/v1/agents/streamer/stream?{detach}",
                base(&node)
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
            .get(format!("{}{events_url}", base(&node)))
            .send()
            .await
            .unwrap();
        let events = SseReader::new(response).rest().await;
        assert_streamer_events(&events, n, 1);
        assert_eq!(events[0].stream_id(), stream_id);

        // What a reconnecting EventSource does: resume after its last id.
        let response = client
            .get(format!("{}{events_url}", base(&node)))
            .header("last-event-id", format!("{stream_id}:20"))
            .send()
            .await
            .unwrap();
        assert_streamer_events(&SseReader::new(response).rest().await, n, 21);
    }
    agent.shutdown().await;
    node.stop().await;
}

// ---------------------------------------------------------------------------
// WebSocket

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn converse(node: &TestNode, agent: &str) -> Socket {
    let url = format!("ws://{}/v1/agents/{agent}/converse", node.addr());
    let (socket, response) = tokio_tungstenite::connect_async(url).await.unwrap();
    assert_eq!(response.status().as_u16(), 101);
    assert!(response.headers().contains_key("x-correlation-id"));
    socket
}

/// The close frame that ends `socket` (code, reason), skipping other messages.
async fn close_frame(socket: &mut Socket) -> (u16, String) {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .expect("the socket closes in time");
        match message {
            Some(Ok(Message::Close(Some(frame)))) => {
                return (u16::from(frame.code), frame.reason.to_string());
            }
            Some(Ok(Message::Close(None))) | None => panic!("closed without a reason"),
            Some(Ok(_)) => continue,
            Some(Err(error)) => panic!("socket failed: {error}"),
        }
    }
}

#[tokio::test]
async fn websocket_round_trips_many_messages() {
    let node = TestNode::start().await;
    let agent = start_agent(&node, card("chat"), Chatter).await;
    let socket = converse(&node, "chat").await;
    let (mut write, mut read) = socket.split();
    let count = 500u64;
    let writer = tokio::spawn(async move {
        for n in 1..=count {
            let message = json!({ "type": "chat.message", "json": { "n": n } }).to_string();
            write.send(Message::text(message)).await.unwrap();
        }
        write
    });
    for k in 1..=count {
        let message = tokio::time::timeout(Duration::from_secs(10), read.next())
            .await
            .expect("a reply in time")
            .unwrap()
            .unwrap();
        let Message::Text(text) = message else {
            panic!("expected a text message, got {message:?}");
        };
        let envelope: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(envelope["json"], json!({ "n": k, "k": k }), "{envelope}");
        assert_eq!(envelope["type"], "chat.reply");
    }
    let mut write = writer.await.unwrap();
    // Ending the conversation normally closes the socket with 1000.
    write
        .send(Message::text(
            json!({ "json": { "end": true } }).to_string(),
        ))
        .await
        .unwrap();
    let mut socket = write.reunite(read).unwrap();
    let (code, reason) = close_frame(&mut socket).await;
    assert_eq!(code, 1000, "{reason}");

    agent.shutdown().await;
    node.stop().await;
}

#[tokio::test]
async fn websocket_closes_with_the_reason_of_a_failure() {
    let node = TestNode::start().await;
    let agent = start_agent(&node, card("chat"), Chatter).await;

    // The agent fails: 4000 + ABORTED (10), reason `ABORTED: ...`.
    let mut socket = converse(&node, "chat").await;
    socket
        .send(Message::text(r#"{"json":{"n":1}}"#))
        .await
        .unwrap();
    socket
        .send(Message::text(r#"{"json":{"fail":true}}"#))
        .await
        .unwrap();
    let (code, reason) = close_frame(&mut socket).await;
    assert_eq!(code, 4010, "{reason}");
    assert!(reason.starts_with("ABORTED: "), "{reason}");
    assert!(reason.contains("asked to fail"), "{reason}");

    // A message that is not Envelope JSON: 1007, naming the problem.
    let mut socket = converse(&node, "chat").await;
    socket
        .send(Message::text(r#"{"json": oops}"#))
        .await
        .unwrap();
    let (code, reason) = close_frame(&mut socket).await;
    assert_eq!(code, 1007, "{reason}");
    assert!(reason.contains("invalid JSON"), "{reason}");

    // An agent that does not converse: 4000 + UNIMPLEMENTED (12).
    let echo = start_agent(&node, card("echo"), Echo).await;
    let mut socket = converse(&node, "echo").await;
    let (code, reason) = close_frame(&mut socket).await;
    assert_eq!(code, 4012, "{reason}");

    echo.shutdown().await;
    agent.shutdown().await;
    node.stop().await;
}

#[tokio::test]
async fn websocket_pings_and_keeps_a_quiet_conversation_alive() {
    // Heartbeats every 100 ms: the agent would declare a silent caller dead
    // after 300 ms, so the gateway must keep them up for the quiet browser.
    let node = node_with(GatewayConfig {
        ws_ping_interval: Duration::from_millis(100),
        converse_heartbeat: Duration::from_millis(100),
        ..Default::default()
    })
    .await;
    let agent = start_agent(&node, card("chat"), Chatter).await;
    let mut socket = converse(&node, "chat").await;
    let quiet_until = Instant::now() + Duration::from_millis(1000);
    let mut pings = 0;
    while Instant::now() < quiet_until {
        match tokio::time::timeout(Duration::from_millis(50), socket.next()).await {
            Ok(Some(Ok(Message::Ping(_)))) => pings += 1,
            Ok(Some(Ok(other))) => panic!("only pings while quiet, got {other:?}"),
            Ok(other) => panic!("the socket ended: {other:?}"),
            Err(_) => {}
        }
    }
    assert!(pings >= 3, "{pings} pings");
    socket
        .send(Message::text(r#"{"json":{"n":7}}"#))
        .await
        .unwrap();
    let reply = loop {
        match socket.next().await.unwrap().unwrap() {
            Message::Text(text) => break serde_json::from_str::<Value>(&text).unwrap(),
            _ => continue,
        }
    };
    assert_eq!(reply["json"], json!({ "n": 7, "k": 1 }));
    socket.close(None).await.unwrap();
    agent.shutdown().await;
    node.stop().await;
}

#[tokio::test]
async fn websocket_from_another_origin_needs_a_cors_origin() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let node = node_with(GatewayConfig {
        cors_origins: vec!["http://app.example".into()],
        ..Default::default()
    })
    .await;
    let agent = start_agent(&node, card("chat"), Chatter).await;
    let url = format!("ws://{}/v1/agents/chat/converse", node.addr());
    let from = |origin: &str| {
        let mut request = url.as_str().into_client_request().unwrap();
        request
            .headers_mut()
            .insert("origin", origin.parse().unwrap());
        tokio_tungstenite::connect_async(request)
    };
    match from("http://evil.example").await {
        Err(tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 403);
            let body: Value = serde_json::from_slice(response.body().as_deref().unwrap()).unwrap();
            assert_eq!(body["error"]["code"], "PERMISSION_DENIED");
        }
        other => panic!("expected a 403, got {other:?}"),
    }
    let (mut socket, _) = from("http://app.example").await.unwrap();
    socket.close(None).await.unwrap();
    let same_origin = format!("http://{}", node.addr());
    let (mut socket, _) = from(&same_origin).await.unwrap();
    socket.close(None).await.unwrap();
    agent.shutdown().await;
    node.stop().await;
}

// ---------------------------------------------------------------------------
// A browser

/// Serves `page` to `GET /` on a port of its own.
async fn serve_page(page: &'static str) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buffer = [0u8; 4096];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buffer[..n]),
                    }
                }
                let (status, body) =
                    if request.starts_with(b"GET /?") || request.starts_with(b"GET / ") {
                        ("200 OK", page)
                    } else {
                        ("404 Not Found", "")
                    };
                let response = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: text/html; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
            });
        }
    });
    address
}

#[tokio::test]
async fn browser_event_source_reads_a_detached_stream_from_another_origin() {
    let (Ok(chromium), Ok(node_modules)) = (
        std::env::var("AGENTMESH_TEST_CHROMIUM"),
        std::env::var("AGENTMESH_TEST_NODE_MODULES"),
    ) else {
        eprintln!(
            "SKIPPED browser_event_source_reads_a_detached_stream_from_another_origin: \
             set AGENTMESH_TEST_CHROMIUM (chromium binary) and AGENTMESH_TEST_NODE_MODULES \
             (a node_modules with playwright-core)"
        );
        return;
    };
    // The page comes from another port, so another origin; only it may call.
    let page_origin = format!(
        "http://{}",
        serve_page(include_str!("gateway_browser.html")).await
    );
    let node = node_with(GatewayConfig {
        cors_origins: vec![page_origin.clone()],
        ..Default::default()
    })
    .await;
    let agent = start_agent(&node, card("streamer"), Streamer).await;
    let n = 25;
    let page_url = format!("{page_origin}/?gateway={}&n={n}", base(&node));

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/gateway_browser.js");
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("node")
            .arg(script)
            .arg(&page_url)
            .env("NODE_PATH", &node_modules)
            .env("AGENTMESH_TEST_CHROMIUM", &chromium)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the browser finishes within a minute")
    .expect("run node");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "browser run failed:\n{stdout}\n{stderr}"
    );
    let result: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("bad output ({e}):\n{stdout}\n{stderr}"));
    assert_eq!(result["outcome"], "result", "{result}\n{stderr}");
    assert_eq!(result["status"], 202, "{result}");
    assert_eq!(
        result["correlation"], "browser-1",
        "the exposed correlation id is readable cross-origin: {result}"
    );
    let events = result["events"].as_array().unwrap();
    assert_eq!(events.len() as u64, n + 2, "{result}");
    let stream_id = result["detached"]["stream_id"].as_str().unwrap();
    for (i, event) in events.iter().enumerate() {
        let sequence = i as u64 + 1;
        assert_eq!(
            event["id"],
            format!("{stream_id}:{sequence}"),
            "lastEventId of event {sequence}: {result}"
        );
        assert_eq!(event["data"]["sequence"], sequence.to_string());
    }
    assert_eq!(events[0]["event"], "progress");
    assert_eq!(events[1]["event"], "partial");
    assert_eq!(events[n as usize + 1]["event"], "result");
    assert_eq!(
        events[n as usize + 1]["data"]["envelope"]["json"]["done"],
        n
    );

    agent.shutdown().await;
    node.stop().await;
}
