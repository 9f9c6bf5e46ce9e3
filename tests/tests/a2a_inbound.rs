//! Every mesh agent as an A2A (Agent2Agent 1.0) agent at `/a2a/{agent}`: the card, the
//! JSON-RPC 2.0 and HTTP+JSON bindings with the spec's error codes, and — with the
//! official Python SDK (`a2a-sdk` 1.3, `examples/python/a2a_client.py`) as the client —
//! send, stream, get, list, cancel, resubscribe after a cut, `messageId` deduplication and
//! a non-blocking task that waits, durable, for an agent that was down.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use agentmesh_proto::v1::{AgentCard, AgentFilter, Envelope, InteractionStyle};
use agentmesh_sdk::{Agent, Context};
use agentmesh_tests::{
    Controlled, Streamer, TestNode, card, eventually, http_client, outside_tool, start_agent,
};
use serde_json::{Value, json};
use tonic::Status;

/// A card that says the agent streams (the A2A card's `capabilities.streaming`).
fn streaming_card(name: &str) -> AgentCard {
    let mut card = card(name);
    card.styles = vec![
        InteractionStyle::Unary as i32,
        InteractionStyle::Stream as i32,
    ];
    card
}

/// Sleeps `{"delay_ms": N}` before answering, counting its calls.
#[derive(Debug, Clone, Default)]
struct Slow {
    calls: Arc<AtomicU32>,
}

#[tonic::async_trait]
impl Agent for Slow {
    async fn invoke(&self, _ctx: Context, request: Envelope) -> Result<Envelope, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let delay = request.json_payload().unwrap_or_default()["delay_ms"]
            .as_u64()
            .unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        Ok(Envelope::json("slow.reply", json!({ "slept_ms": delay })))
    }
}

async fn rpc(node: &TestNode, agent: &str, body: Value) -> Value {
    rpc_raw(node, agent, body.to_string(), &[]).await
}

async fn rpc_raw(node: &TestNode, agent: &str, body: String, headers: &[(&str, &str)]) -> Value {
    let mut request = http_client()
        .post(format!("{}/a2a/{agent}", node.http_url()))
        .header("content-type", "application/json")
        .body(body);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = request.send().await.unwrap();
    // JSON-RPC answers errors in the body, with HTTP 200.
    assert_eq!(response.status().as_u16(), 200);
    response.json().await.unwrap()
}

fn call(method: &str, params: Value) -> Value {
    json!({ "jsonrpc": "2.0", "id": "req-1", "method": method, "params": params })
}

fn send_params(message_id: &str, part: Value) -> Value {
    json!({ "message": { "messageId": message_id, "role": "ROLE_USER", "parts": [part] } })
}

#[track_caller]
fn expect_code(answer: &Value, code: i64, reason: &str) {
    assert_eq!(answer["jsonrpc"], "2.0", "{answer}");
    assert_eq!(answer["error"]["code"], code, "{answer}");
    assert!(answer["error"]["message"].is_string(), "{answer}");
    assert_eq!(answer["error"]["data"][0]["reason"], reason, "{answer}");
    assert!(answer.get("result").is_none(), "{answer}");
}

#[tokio::test]
async fn json_rpc_errors_carry_the_spec_codes() {
    let node = TestNode::start().await;
    let _echo = start_agent(&node, card("echo"), agentmesh_tests::Echo).await;

    let parse = rpc_raw(&node, "echo", "{not json".into(), &[]).await;
    expect_code(&parse, -32700, "PARSE_ERROR");
    assert_eq!(parse["id"], Value::Null);
    expect_code(
        &rpc(&node, "echo", json!([1, 2])).await,
        -32600,
        "INVALID_REQUEST",
    );
    expect_code(
        &rpc(
            &node,
            "echo",
            json!({"jsonrpc": "1.0", "id": 1, "method": "GetTask"}),
        )
        .await,
        -32600,
        "INVALID_REQUEST",
    );
    let unknown = rpc(&node, "echo", call("message/send", json!({}))).await;
    expect_code(&unknown, -32601, "METHOD_NOT_FOUND");
    assert_eq!(unknown["id"], "req-1");
    expect_code(
        &rpc(
            &node,
            "echo",
            call(
                "SendMessage",
                json!({"message": {"role": "ROLE_USER", "parts": [{"text": "x"}]}}),
            ),
        )
        .await,
        -32602,
        "INVALID_PARAMS",
    );
    expect_code(
        &rpc(
            &node,
            "echo",
            call(
                "SendMessage",
                json!({"message": {"messageId": "m", "parts": []}}),
            ),
        )
        .await,
        -32602,
        "INVALID_PARAMS",
    );
    expect_code(
        &rpc(
            &node,
            "echo",
            call("SendMessage", json!({"message": "not an object"})),
        )
        .await,
        -32602,
        "INVALID_PARAMS",
    );
    expect_code(
        &rpc(&node, "echo", call("ListTasks", json!({"pageSize": 1000}))).await,
        -32602,
        "INVALID_PARAMS",
    );
    expect_code(
        &rpc(
            &node,
            "echo",
            call("GetTask", json!({"id": "no-such-task"})),
        )
        .await,
        -32001,
        "TASK_NOT_FOUND",
    );

    let sent = rpc(
        &node,
        "echo",
        call("SendMessage", send_params("m-1", json!({"text": "hi"}))),
    )
    .await;
    let task = &sent["result"]["task"];
    assert_eq!(task["status"]["state"], "TASK_STATE_COMPLETED", "{sent}");
    assert_eq!(task["artifacts"][0]["parts"][0]["text"], "hi", "{sent}");
    let id = task["id"].as_str().unwrap();
    expect_code(
        &rpc(&node, "echo", call("CancelTask", json!({"id": id}))).await,
        -32002,
        "TASK_NOT_CANCELABLE",
    );
    expect_code(
        &rpc(
            &node,
            "echo",
            call(
                "CreateTaskPushNotificationConfig",
                json!({"taskId": id, "url": "ftp://127.0.0.1/hook"}),
            ),
        )
        .await,
        -32602,
        "INVALID_PARAMS",
    );
    expect_code(
        &rpc(
            &node,
            "echo",
            call(
                "GetTaskPushNotificationConfig",
                json!({"taskId": id, "id": "none"}),
            ),
        )
        .await,
        -32001,
        "TASK_NOT_FOUND",
    );
    expect_code(
        &rpc(&node, "echo", call("SubscribeToTask", json!({"id": id}))).await,
        -32004,
        "UNSUPPORTED_OPERATION",
    );
    let mut continuation = send_params("m-3", json!({"text": "more"}));
    continuation["message"]["taskId"] = json!(id);
    expect_code(
        &rpc(&node, "echo", call("SendMessage", continuation)).await,
        -32004,
        "UNSUPPORTED_OPERATION",
    );
    expect_code(
        &rpc(&node, "echo", call("GetExtendedAgentCard", json!({}))).await,
        -32007,
        "EXTENDED_AGENT_CARD_NOT_CONFIGURED",
    );
    expect_code(
        &rpc_raw(
            &node,
            "echo",
            call("GetTask", json!({"id": id})).to_string(),
            &[("A2A-Version", "0.3")],
        )
        .await,
        -32009,
        "VERSION_NOT_SUPPORTED",
    );
    node.stop().await;
}

#[tokio::test]
async fn http_json_errors_use_the_spec_statuses() {
    let node = TestNode::start().await;
    let _echo = start_agent(&node, streaming_card("echo"), agentmesh_tests::Echo).await;
    let base = format!("{}/a2a/echo", node.http_url());
    let client = http_client();

    let card: Value = client
        .get(format!("{base}/.well-known/agent-card.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(card["name"], "echo");
    assert_eq!(card["capabilities"]["streaming"], true);
    assert_eq!(card["capabilities"]["pushNotifications"], true);
    assert_eq!(card["skills"][0]["id"], "echo-skill");
    let bindings: Vec<&str> = card["supportedInterfaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            assert_eq!(i["url"], base.as_str());
            assert_eq!(i["protocolVersion"], "1.0");
            i["protocolBinding"].as_str().unwrap()
        })
        .collect();
    assert_eq!(bindings, ["JSONRPC", "HTTP+JSON"]);

    let missing = client
        .get(format!(
            "{}/a2a/nobody/.well-known/agent-card.json",
            node.http_url()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status().as_u16(), 404);

    let expect = |status: u16, reason: &'static str| {
        move |response: reqwest::Response| async move {
            assert_eq!(response.status().as_u16(), status);
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["error"]["code"], status, "{body}");
            assert_eq!(body["error"]["details"][0]["reason"], reason, "{body}");
            assert_eq!(
                body["error"]["details"][0]["@type"],
                "type.googleapis.com/google.rpc.ErrorInfo"
            );
        }
    };
    expect(404, "TASK_NOT_FOUND")(
        client
            .get(format!("{base}/tasks/nope"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    expect(400, "PARSE_ERROR")(
        client
            .post(format!("{base}/message:send"))
            .body("{")
            .send()
            .await
            .unwrap(),
    )
    .await;
    expect(400, "INVALID_PARAMS")(
        client
            .post(format!("{base}/message:send"))
            .json(&json!({"message": {"parts": [{"text": "x"}]}}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    expect(400, "INVALID_PARAMS")(
        client
            .get(format!("{base}/tasks?pageSize=500"))
            .send()
            .await
            .unwrap(),
    )
    .await;

    let sent: Value = client
        .post(format!("{base}/message:send"))
        .json(&send_params("rest-1", json!({"data": {"x": 1}})))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        sent["task"]["status"]["state"], "TASK_STATE_COMPLETED",
        "{sent}"
    );
    assert_eq!(
        sent["task"]["artifacts"][0]["parts"][0]["data"],
        json!({"x": 1})
    );
    let id = sent["task"]["id"].as_str().unwrap();
    let got: Value = client
        .get(format!("{base}/tasks/{id}?historyLength=0"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["id"], id);
    assert!(got.get("history").is_none(), "{got}");
    expect(400, "TASK_NOT_CANCELABLE")(
        client
            .post(format!("{base}/tasks/{id}:cancel"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    expect(400, "INVALID_PARAMS")(
        client
            .post(format!("{base}/tasks/{id}/pushNotificationConfigs"))
            .json(&json!({"url": "not a url"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    node.stop().await;
}

#[tokio::test]
async fn a_send_is_a_routed_call_with_the_callers_deadline_and_a_trace() {
    let node = TestNode::start().await;
    let slow = Slow::default();
    let _slow = start_agent(&node, card("slow"), slow.clone()).await;

    // The context id is the correlation id: the trace journal has the call under it.
    let mut params = send_params("traced-1", json!({"data": {"delay_ms": 0}}));
    params["message"]["contextId"] = json!("a2a-context-1");
    let sent = rpc(&node, "slow", call("SendMessage", params)).await;
    assert_eq!(
        sent["result"]["task"]["contextId"], "a2a-context-1",
        "{sent}"
    );
    let trace: Value = http_client()
        .get(format!("{}/v1/traces/a2a-context-1", node.http_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(trace["hops"].as_u64() >= Some(1), "{trace}");
    assert_eq!(trace["roots"][0]["from"], "a2a", "{trace}");
    assert_eq!(trace["roots"][0]["code"], "OK", "{trace}");

    // The caller's timeout header is the call's deadline.
    let late = rpc_raw(
        &node,
        "slow",
        call(
            "SendMessage",
            send_params("late-1", json!({"data": {"delay_ms": 5000}})),
        )
        .to_string(),
        &[("x-timeout-ms", "300")],
    )
    .await;
    let status = &late["result"]["task"]["status"];
    assert_eq!(status["state"], "TASK_STATE_FAILED", "{late}");
    assert_eq!(
        status["message"]["metadata"]["code"], "DEADLINE_EXCEEDED",
        "{late}"
    );
    node.stop().await;
}

#[tokio::test]
async fn a_streaming_task_goes_on_after_its_client_leaves() {
    let node = TestNode::start().await;
    let _streamer = start_agent(&node, streaming_card("streamer"), Streamer).await;
    let mut response = http_client()
        .post(format!("{}/a2a/streamer", node.http_url()))
        .json(&call(
            "SendStreamingMessage",
            send_params("leaves-1", json!({"data": {"n": 10, "delay_ms": 50}})),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    // Read up to the first event (the task), then hang up.
    let mut text = String::new();
    while !text.contains("\n\n") {
        let chunk = response.chunk().await.unwrap().expect("an event");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    drop(response);
    let data = text
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .expect("a data line");
    let first: Value = serde_json::from_str(data).unwrap();
    let id = first["result"]["task"]["id"].as_str().unwrap().to_owned();

    // Nobody resubscribes: the node still takes the task to its end, each event once.
    let mut task = Value::Null;
    for _ in 0..1000 {
        task = rpc(&node, "streamer", call("GetTask", json!({"id": id}))).await["result"].clone();
        if task["status"]["state"] == "TASK_STATE_COMPLETED" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(task["status"]["state"], "TASK_STATE_COMPLETED", "{task}");
    let partial = task["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["artifactId"] == "partial")
        .unwrap();
    assert_eq!(
        numbers(&partial["parts"]),
        (1..=10).collect::<Vec<_>>(),
        "{task}"
    );
    node.stop().await;
}

/// A webhook on a real socket: answers 503 to its first request, 200 after, and hands
/// each request (head and body) to the test.
async fn webhook() -> (
    String,
    tokio::sync::mpsc::UnboundedReceiver<(String, Value)>,
) {
    webhook_over(None).await
}

/// The same webhook, over TLS with `server`'s certificate when given (an `https://` URL).
async fn webhook_over(
    server: Option<&agentmesh_tests::tls::Issued>,
) -> (
    String,
    tokio::sync::mpsc::UnboundedReceiver<(String, Value)>,
) {
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let acceptor = server.map(|issued| {
        let certs = vec![CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap()];
        let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap();
        let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(Arc::new(
            tokio_rustls::rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let scheme = if acceptor.is_some() { "https" } else { "http" };
    let url = format!("{scheme}://{}/hook", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut served = 0;
        while let Ok((tcp, _)) = listener.accept().await {
            let mut socket: Box<dyn Socket> = match &acceptor {
                None => Box::new(tcp),
                Some(acceptor) => match acceptor.accept(tcp).await {
                    Ok(tls) => Box::new(tls),
                    Err(_) => continue,
                },
            };
            let mut buffer = Vec::new();
            let mut chunk = [0u8; 4096];
            // The head, then as many body bytes as it announces.
            let (head, body) = loop {
                let n = socket.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    break (String::new(), Vec::new());
                }
                buffer.extend_from_slice(&chunk[..n]);
                let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") else {
                    continue;
                };
                let head = String::from_utf8_lossy(&buffer[..end]).to_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if buffer.len() >= end + 4 + length {
                    break (head, buffer[end + 4..end + 4 + length].to_vec());
                }
            };
            served += 1;
            let status = if served == 1 {
                "503 Service Unavailable"
            } else {
                "200 OK"
            };
            let _ = socket
                .write_all(
                    format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .await;
            let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let _ = tx.send((head, body));
        }
    });
    (url, rx)
}

trait Socket: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Socket for T {}

#[tokio::test]
async fn push_notifications_reach_the_webhook_at_least_once_with_its_credentials() {
    let node = TestNode::start().await;
    let (url, received) = webhook().await;
    push_notifications_reach(&node, url, received).await;
    node.stop().await;
}

#[tokio::test]
async fn push_notifications_reach_an_https_webhook_trusting_the_agents_ca() {
    let ca = agentmesh_tests::tls::TestCa::new("webhooks CA");
    let dir = tempfile::tempdir().unwrap();
    let mut config = agentmesh_tests::test_config();
    config.tls.agents.ca = ca.write(dir.path(), "ca").display().to_string();
    let node = TestNode::start_with(config).await;
    let (url, received) = webhook_over(Some(&ca.server(5))).await;
    push_notifications_reach(&node, url, received).await;
    node.stop().await;
}

/// A task's notifications reach the webhook at `url`: refused once, then delivered again.
async fn push_notifications_reach(
    node: &TestNode,
    url: String,
    mut received: tokio::sync::mpsc::UnboundedReceiver<(String, Value)>,
) {
    let slow = Slow::default();
    let _slow = start_agent(node, card("slow"), slow.clone()).await;

    let mut params = send_params("pushed-1", json!({"data": {"delay_ms": 0}}));
    params["configuration"] = json!({
        "returnImmediately": true,
        "taskPushNotificationConfig": {
            "url": url,
            "token": "task-token",
            "authentication": {"scheme": "Bearer", "credentials": "s3cret"}
        }
    });
    let sent = rpc(node, "slow", call("SendMessage", params)).await;
    let id = sent["result"]["task"]["id"].as_str().unwrap().to_owned();
    let listed = rpc(
        node,
        "slow",
        call("ListTaskPushNotificationConfigs", json!({"taskId": id})),
    )
    .await;
    assert_eq!(
        listed["result"]["configs"][0]["url"],
        url.as_str(),
        "{listed}"
    );

    // The first delivery is refused (503): the notification is delivered again.
    let mut states = Vec::new();
    let mut refused = 0;
    while !states.contains(&"TASK_STATE_COMPLETED".to_owned()) {
        let (head, body) = tokio::time::timeout(Duration::from_secs(30), received.recv())
            .await
            .expect("a notification within 30 s")
            .unwrap();
        assert!(head.starts_with("post /hook"), "{head}");
        assert!(head.contains("authorization: bearer s3cret"), "{head}");
        assert!(
            head.contains("x-a2a-notification-token: task-token"),
            "{head}"
        );
        let update = &body["statusUpdate"];
        assert_eq!(update["taskId"], id.as_str(), "{body}");
        if refused == 0 {
            refused += 1;
            continue;
        }
        states.push(update["status"]["state"].as_str().unwrap().to_owned());
    }
    assert!(
        states.ends_with(&["TASK_STATE_COMPLETED".to_owned()]),
        "{states:?}"
    );
}

// ---- the official Python SDK as the client ----

const NEEDS_PYTHON: &str = "a Python 3 with a2a-sdk 1.3 (python3 -m pip install a2a-sdk==1.3.0)";

/// Runs `examples/python/a2a_client.py ARGS` and returns the JSON it prints.
async fn sdk(args: &[&str]) -> Value {
    let python = outside_tool("AGENTMESH_TEST_PYTHON", NEEDS_PYTHON);
    let output = tokio::process::Command::new(python)
        .arg("a2a_client.py")
        .args(args)
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/python"))
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "a2a_client.py {args:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "a2a_client.py {args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

fn url(node: &TestNode, agent: &str) -> String {
    format!("{}/a2a/{agent}", node.http_url())
}

const BINDINGS: [&str; 2] = ["JSONRPC", "HTTP+JSON"];

/// The kind of a StreamResponse (`task`, `statusUpdate`, …) and its body.
fn kind(event: &Value) -> (&str, &Value) {
    let (k, v) = event.as_object().unwrap().iter().next().unwrap();
    (k.as_str(), v)
}

/// The `i` of each `{"i": i}` data part.
fn numbers(parts: &Value) -> Vec<u64> {
    parts
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["data"]["i"].as_f64())
        .map(|i| i as u64)
        .collect()
}

#[tokio::test]
#[ignore = "needs AGENTMESH_TEST_PYTHON"]
async fn python_sdk_resolves_the_card_sends_streams_gets_and_lists() {
    let node = TestNode::start().await;
    let _echo = start_agent(&node, card("echo"), agentmesh_tests::Echo).await;
    let _streamer = start_agent(&node, streaming_card("streamer"), Streamer).await;

    let card = sdk(&["card", &url(&node, "streamer")]).await;
    assert_eq!(card["name"], "streamer");
    assert_eq!(card["capabilities"]["streaming"], true);

    for binding in BINDINGS {
        let sent = sdk(&[
            "send",
            &url(&node, "echo"),
            "--binding",
            binding,
            "--text",
            "hello",
        ])
        .await;
        let task = &sent["responses"][0]["task"];
        assert_eq!(
            task["status"]["state"], "TASK_STATE_COMPLETED",
            "{binding}: {sent}"
        );
        assert_eq!(
            task["artifacts"][0]["parts"][0]["text"], "hello",
            "{binding}: {sent}"
        );

        let streamed = sdk(&[
            "stream",
            &url(&node, "streamer"),
            "--binding",
            binding,
            "--data",
            r#"{"n": 5}"#,
        ])
        .await;
        let events = streamed["events"].as_array().unwrap();
        assert_eq!(kind(&events[0]).0, "task", "{binding}: {streamed}");
        let partials: Vec<u64> = events
            .iter()
            .map(kind)
            .filter(|(k, v)| *k == "artifactUpdate" && v["artifact"]["artifactId"] == "partial")
            .flat_map(|(_, v)| numbers(&v["artifact"]["parts"]))
            .collect();
        assert_eq!(partials, [1, 2, 3, 4, 5], "{binding}: {streamed}");
        let (last_kind, last) = kind(events.last().unwrap());
        assert_eq!(last_kind, "statusUpdate");
        assert_eq!(last["status"]["state"], "TASK_STATE_COMPLETED");
        let result = events
            .iter()
            .map(kind)
            .find(|(k, v)| *k == "artifactUpdate" && v["artifact"]["artifactId"] == "result")
            .expect("the result as an artifact");
        assert_eq!(result.1["artifact"]["parts"][0]["data"]["done"], 5.0);

        let task_id = streamed["taskId"].as_str().unwrap();
        let got = sdk(&[
            "get",
            &url(&node, "streamer"),
            "--binding",
            binding,
            "--task",
            task_id,
        ])
        .await;
        assert_eq!(got["status"]["state"], "TASK_STATE_COMPLETED", "{got}");
        assert_eq!(numbers(&got["artifacts"][0]["parts"]), [1, 2, 3, 4, 5]);

        let context = got["contextId"].as_str().unwrap();
        let listed = sdk(&[
            "list",
            &url(&node, "streamer"),
            "--binding",
            binding,
            "--context-id",
            context,
        ])
        .await;
        let tasks = &listed["pages"][0]["tasks"];
        assert_eq!(tasks.as_array().unwrap().len(), 1, "{listed}");
        assert_eq!(tasks[0]["id"], task_id);
    }
    // Paging: three tasks of one context, one per page.
    for n in 0..3 {
        sdk(&[
            "send",
            &url(&node, "echo"),
            "--context-id",
            "paged",
            "--text",
            &n.to_string(),
        ])
        .await;
    }
    let listed = sdk(&[
        "list",
        &url(&node, "echo"),
        "--context-id",
        "paged",
        "--page-size",
        "1",
    ])
    .await;
    let pages = listed["pages"].as_array().unwrap();
    assert_eq!(pages.len(), 3, "{listed}");
    assert!(
        pages
            .iter()
            .all(|p| p["totalSize"] == 3 && p["tasks"].as_array().unwrap().len() == 1)
    );
    node.stop().await;
}

#[tokio::test]
#[ignore = "needs AGENTMESH_TEST_PYTHON"]
async fn python_sdk_resubscribes_after_a_cut_and_sees_every_event_once() {
    let node = TestNode::start().await;
    let _streamer = start_agent(&node, streaming_card("streamer"), Streamer).await;
    for binding in BINDINGS {
        let out = sdk(&[
            "stream",
            &url(&node, "streamer"),
            "--binding",
            binding,
            "--data",
            r#"{"n": 20, "delay_ms": 50}"#,
            "--cut-after",
            "4",
        ])
        .await;
        let before: Vec<u64> = out["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(kind)
            .filter(|(k, _)| *k == "artifactUpdate")
            .flat_map(|(_, v)| numbers(&v["artifact"]["parts"]))
            .collect();
        let resumed = out["resumed"].as_array().unwrap();
        // SubscribeToTask starts with the task as it is: what the first connection saw.
        let (first_kind, snapshot) = kind(&resumed[0]);
        assert_eq!(first_kind, "task", "{binding}: {out}");
        let mut seen = snapshot["artifacts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["artifactId"] == "partial")
            .flat_map(|a| numbers(&a["parts"]))
            .collect::<Vec<_>>();
        assert!(seen.starts_with(&before), "{binding}: {out}");
        // Then every later event, once.
        for (k, v) in resumed[1..].iter().map(kind) {
            if k == "artifactUpdate" && v["artifact"]["artifactId"] == "partial" {
                seen.extend(numbers(&v["artifact"]["parts"]));
            }
        }
        assert_eq!(seen, (1..=20).collect::<Vec<_>>(), "{binding}: {out}");
        let completed = resumed
            .iter()
            .map(kind)
            .filter(|(k, v)| *k == "statusUpdate" && v["status"]["state"] == "TASK_STATE_COMPLETED")
            .count();
        assert_eq!(completed, 1, "{binding}: {out}");
    }
    node.stop().await;
}

#[tokio::test]
#[ignore = "needs AGENTMESH_TEST_PYTHON"]
async fn python_sdk_retried_message_id_is_processed_once() {
    let node = TestNode::start().await;
    let agent = Controlled::default();
    let _agent = start_agent(&node, card("counted"), agent.clone()).await;
    for (i, binding) in BINDINGS.into_iter().enumerate() {
        let message_id = format!("retried-{i}");
        let out = sdk(&[
            "send-twice",
            &url(&node, "counted"),
            "--binding",
            binding,
            "--message-id",
            &message_id,
        ])
        .await;
        let first = &out["first"][0]["task"];
        let second = &out["second"][0]["task"];
        assert_eq!(first["status"]["state"], "TASK_STATE_COMPLETED", "{out}");
        assert_eq!(
            first["id"], second["id"],
            "one task for one messageId: {out}"
        );
        assert_eq!(first["artifacts"], second["artifacts"]);
        assert_eq!(
            agent.calls.load(Ordering::SeqCst),
            i as u32 + 1,
            "{binding}"
        );
    }
    node.stop().await;
}

#[tokio::test]
#[ignore = "needs AGENTMESH_TEST_PYTHON"]
async fn python_sdk_non_blocking_task_completes_once_its_agent_registers() {
    let node = TestNode::start().await;
    // The client resolved the agent's card while it was up, then the agent went down.
    let agent = Controlled::default();
    let late = start_agent(&node, card("late"), agent.clone()).await;
    let resolved: Value = http_client()
        .get(format!(
            "{}/.well-known/agent-card.json",
            url(&node, "late")
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let card_file = dir.path().join("late.json");
    std::fs::write(&card_file, resolved.to_string()).unwrap();
    let card_file = card_file.to_str().unwrap();
    late.shutdown().await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            node.client()
                .lookup(AgentFilter {
                    name: "late".into(),
                    ..Default::default()
                })
                .await
                .is_ok_and(|i| i.is_empty())
        })
        .await
    );

    // The task waits on the durable queue for its agent.
    let sent = sdk(&[
        "send",
        &url(&node, "late"),
        "--card",
        card_file,
        "--no-wait",
        "--text",
        "while you were out",
    ])
    .await;
    let task = &sent["responses"][0]["task"];
    assert_eq!(task["status"]["state"], "TASK_STATE_SUBMITTED", "{sent}");
    let id = task["id"].as_str().unwrap().to_owned();
    let got = sdk(&[
        "get",
        &url(&node, "late"),
        "--card",
        card_file,
        "--task",
        &id,
    ])
    .await;
    assert_eq!(got["status"]["state"], "TASK_STATE_SUBMITTED", "{got}");
    assert_eq!(agent.calls.load(Ordering::SeqCst), 0);

    // Back up: the node's worker hands it the task.
    let _late = start_agent(&node, card("late"), agent.clone()).await;
    let done = sdk(&[
        "wait",
        &url(&node, "late"),
        "--card",
        card_file,
        "--task",
        &id,
    ])
    .await;
    assert_eq!(done["status"]["state"], "TASK_STATE_COMPLETED", "{done}");
    assert_eq!(
        done["artifacts"][0]["parts"][0]["text"],
        "while you were out"
    );
    assert_eq!(agent.calls.load(Ordering::SeqCst), 1);
    node.stop().await;
}

#[tokio::test]
#[ignore = "needs AGENTMESH_TEST_PYTHON"]
async fn python_sdk_cancels_a_running_task() {
    let node = TestNode::start().await;
    let slow = Slow::default();
    let _slow = start_agent(&node, card("slow"), slow.clone()).await;
    let sent = sdk(&[
        "send",
        &url(&node, "slow"),
        "--no-wait",
        "--data",
        r#"{"delay_ms": 60000}"#,
    ])
    .await;
    let id = sent["responses"][0]["task"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Wait until the node's worker has handed it to the agent.
    assert!(
        eventually(Duration::from_secs(10), || async {
            slow.calls.load(Ordering::SeqCst) == 1
        })
        .await
    );
    let out = sdk(&["cancel", &url(&node, "slow"), "--task", &id]).await;
    assert_eq!(
        out["canceled"]["status"]["state"], "TASK_STATE_CANCELED",
        "{out}"
    );
    assert_eq!(out["again"], "TaskNotCancelableError", "{out}");
    let got = sdk(&["get", &url(&node, "slow"), "--task", &id]).await;
    assert_eq!(got["status"]["state"], "TASK_STATE_CANCELED", "{got}");
    node.stop().await;
}

// ---- tasks shared through Redis ----

/// A node whose state (tasks included) is in the Redis of `AGENTMESH_TEST_REDIS`, under
/// `prefix`.
async fn redis_node(
    prefix: &str,
    id: &str,
) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let url = outside_tool(
        "AGENTMESH_TEST_REDIS",
        "a Redis URL, e.g. redis://127.0.0.1:6379",
    );
    let mut config = agentmesh_tests::test_config();
    config.store.url = url;
    config.store.key_prefix = prefix.to_owned();
    config.store.node_id = id.to_owned();
    let stores = agentmesh_node::Stores::open(&config).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(
        agentmesh_node::Node::with_stores(config, stores).serve(listener, async move {
            let _ = stopped.await;
        }),
    );
    (address, stop)
}

async fn rpc_at(address: std::net::SocketAddr, agent: &str, body: Value) -> Value {
    http_client()
        .post(format!("http://{address}/a2a/{agent}"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Deletes the test's keys when it ends.
struct RedisKeys(String);

impl Drop for RedisKeys {
    fn drop(&mut self) {
        let Ok(url) = std::env::var("AGENTMESH_TEST_REDIS") else {
            return;
        };
        let Ok(mut connection) = redis::Client::open(url).and_then(|c| c.get_connection()) else {
            return;
        };
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", self.0))
            .query(&mut connection)
            .unwrap_or_default();
        for key in keys {
            let _: Result<(), _> = redis::cmd("DEL").arg(key).query(&mut connection);
        }
    }
}

#[tokio::test]
#[ignore = "needs AGENTMESH_TEST_REDIS"]
async fn tasks_on_redis_are_the_same_through_every_node() {
    let prefix = format!("a2a-test-{}", uuid::Uuid::now_v7().simple());
    let _keys = RedisKeys(prefix.clone());
    let (a, _stop_a) = redis_node(&prefix, "node-a").await;
    let (b, _stop_b) = redis_node(&prefix, "node-b").await;
    let agent = Controlled::default();
    let _agent = agentmesh_sdk::AgentRuntime::new(card("counted"), agent.clone())
        .node(format!("http://{a}"))
        .start()
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            let got = rpc_at(
                b,
                "counted",
                call("SendMessage", send_params("probe", json!({"text": "x"}))),
            )
            .await;
            got["result"]["task"]["status"]["state"] == "TASK_STATE_COMPLETED"
        })
        .await,
        "the agent is reachable through node b"
    );
    let calls = agent.calls.load(Ordering::SeqCst);

    // Sent through a, read, listed and retried through b.
    let mut params = send_params("shared-1", json!({"text": "once"}));
    params["message"]["contextId"] = json!("shared-context");
    let sent = rpc_at(a, "counted", call("SendMessage", params.clone())).await;
    let id = sent["result"]["task"]["id"].as_str().unwrap().to_owned();
    let got = rpc_at(b, "counted", call("GetTask", json!({"id": id}))).await;
    assert_eq!(
        got["result"]["status"]["state"], "TASK_STATE_COMPLETED",
        "{got}"
    );
    assert_eq!(got["result"]["artifacts"][0]["parts"][0]["text"], "once");
    let listed = rpc_at(
        b,
        "counted",
        call("ListTasks", json!({"contextId": "shared-context"})),
    )
    .await;
    assert_eq!(listed["result"]["totalSize"], 1, "{listed}");
    assert_eq!(listed["result"]["tasks"][0]["id"], id.as_str());
    let again = rpc_at(b, "counted", call("SendMessage", params)).await;
    assert_eq!(again["result"]["task"]["id"], id.as_str(), "{again}");
    assert_eq!(
        agent.calls.load(Ordering::SeqCst),
        calls + 1,
        "processed once"
    );
    expect_code(
        &rpc_at(b, "counted", call("CancelTask", json!({"id": id}))).await,
        -32002,
        "TASK_NOT_CANCELABLE",
    );

    // A non-blocking task through b, for an agent not there yet, done once it registers at a.
    let mut params = send_params("later-1", json!({"text": "queued"}));
    params["configuration"] = json!({"returnImmediately": true});
    let sent = rpc_at(b, "later", call("SendMessage", params)).await;
    assert_eq!(
        sent["result"]["task"]["status"]["state"], "TASK_STATE_SUBMITTED",
        "{sent}"
    );
    let id = sent["result"]["task"]["id"].as_str().unwrap().to_owned();
    let later = Controlled::default();
    let _later = agentmesh_sdk::AgentRuntime::new(card("later"), later.clone())
        .node(format!("http://{a}"))
        .start()
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(20), || async {
            let got = rpc_at(a, "later", call("GetTask", json!({"id": id}))).await;
            got["result"]["status"]["state"] == "TASK_STATE_COMPLETED"
        })
        .await
    );
    assert_eq!(later.calls.load(Ordering::SeqCst), 1);
}
