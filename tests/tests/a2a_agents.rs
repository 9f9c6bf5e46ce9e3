//! External A2A agents on the mesh: an agent written with the official Python SDK's server
//! side (`examples/python/a2a_agent.py`, a2a-sdk 1.3) runs as a real process, is added to a
//! real node by its card URL (over gRPC, the gateway and grpcurl), and is called through
//! the node with the Rust SDK, grpcurl and the gateway's SSE, over both of its bindings
//! (JSON-RPC and HTTP+JSON). Killed, its breaker opens.

use std::{path::Path, process::Stdio, time::Duration};

use agentmesh_proto::v1::{
    AgentFilter, BreakerState, Envelope, StreamEventKind, StreamResponse, envelope::Payload,
};
use agentmesh_sdk::MeshClient;
use agentmesh_tests::{SseReader, TestNode, http_client, outside_tool, test_config, tls::TestCa};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};
use tonic::Code;
use tonic_types::StatusExt;

const NEEDS_PYTHON: &str = "a Python 3 with a2a-sdk[http-server] 1.3 and uvicorn \
     (python3 -m pip install -r examples/python/requirements.txt)";

/// The longest lease the node of the breaker test grants.
const LEASE_TTL: Duration = Duration::from_secs(1);

fn python() -> String {
    outside_tool("AGENTMESH_TEST_PYTHON", NEEDS_PYTHON)
}

/// `examples/python/a2a_agent.py` as a process.
struct A2aAgent {
    url: String,
    child: Child,
}

impl A2aAgent {
    /// Starts the agent (`prefer`: the binding its card lists first) and waits until it
    /// listens.
    async fn start(python: &str, prefer: &str) -> Self {
        Self::start_with(python, &["--prefer", prefer]).await
    }

    /// Starts the agent with more of its options.
    async fn start_with(python: &str, options: &[&str]) -> Self {
        let mut child = Command::new(python)
            .args(["a2a_agent.py", "--port", "0"])
            .args(options)
            .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/python"))
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|error| panic!("cannot run {python}: {error}"));
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(Duration::from_secs(60), stdout.next_line())
            .await
            .expect("a2a_agent.py listens within a minute")
            .unwrap()
            .expect("a2a_agent.py printed where it listens");
        let listening: Value =
            serde_json::from_str(&line).unwrap_or_else(|_| panic!("a2a_agent.py printed {line:?}"));
        Self {
            url: listening["listening"].as_str().unwrap().to_owned(),
            child,
        }
    }

    async fn kill(mut self) {
        self.child.kill().await.unwrap();
    }
}

fn text(text: &str) -> Envelope {
    Envelope {
        content_type: "text/plain".into(),
        payload: Some(Payload::Binary(text.as_bytes().to_vec())),
        ..Default::default()
    }
}

fn text_of(envelope: &Envelope) -> String {
    match &envelope.payload {
        Some(Payload::Binary(bytes)) => String::from_utf8(bytes.clone()).unwrap(),
        other => panic!("expected a text payload, got {other:?}"),
    }
}

/// The kinds of a stream's events, with the text of their payload or progress note.
async fn collect(
    mut stream: impl futures::Stream<Item = Result<StreamResponse, tonic::Status>> + Unpin,
) -> Vec<(StreamEventKind, String)> {
    let mut events = Vec::new();
    while let Some(event) = stream.next().await {
        let event = event.unwrap();
        let kind = StreamEventKind::try_from(event.kind).unwrap();
        let said = match &event.envelope {
            Some(envelope) => text_of(envelope),
            None => event.message.clone(),
        };
        events.push((kind, said));
    }
    events
}

/// What the agent streams for "hi there": progress, one partial per word, the result.
fn assert_echo_stream(events: &[(StreamEventKind, String)]) {
    let partials: Vec<&str> = events
        .iter()
        .filter(|(kind, _)| *kind == StreamEventKind::Partial)
        .map(|(_, said)| said.as_str())
        .collect();
    assert_eq!(partials, ["hi", "there"], "{events:?}");
    assert!(
        events
            .iter()
            .any(|(kind, said)| *kind == StreamEventKind::Progress && said == "working"),
        "{events:?}"
    );
    assert_eq!(
        events.last(),
        Some(&(StreamEventKind::Result, "echo: hi there".to_owned())),
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs AGENTMESH_TEST_PYTHON"]
async fn the_rust_sdk_calls_an_a2a_agent_added_by_card_url() {
    let python = python();
    let agent = A2aAgent::start(&python, "jsonrpc").await;
    let node = TestNode::start_with(test_config()).await;
    let client = node.client();

    let card = client.add_a2a_agent(&agent.url, "py-a2a").await.unwrap();
    assert_eq!(card.name, "py-a2a");
    assert_eq!(card.metadata["a2a.binding"], "JSONRPC");
    let listed = client
        .lookup(AgentFilter {
            skill: "echo".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(listed.len(), 1, "listed with its skills: {listed:?}");
    assert_eq!(listed[0].card.as_ref().unwrap().name, "py-a2a");

    // Invoke → SendMessage: the completed task's status message is the reply.
    let reply = client.invoke("py-a2a", text("hi there")).await.unwrap();
    assert_eq!(text_of(&reply), "echo: hi there");
    assert!(reply.headers.contains_key("a2a-task-id"), "{reply:?}");
    // The trace journal records the hop like any other.
    let traced = Envelope {
        correlation_id: "a2a-traced".into(),
        ..text("traced")
    };
    client.invoke("py-a2a", traced).await.unwrap();
    let hops = client.trace("a2a-traced").await.unwrap();
    assert!(
        hops.iter()
            .any(|hop| hop.to.starts_with("py-a2a/a2a-") && hop.code == "OK"),
        "{hops:?}"
    );
    // By skill too, like any mesh agent.
    let reply = client.invoke("skill:echo", text("again")).await.unwrap();
    assert_eq!(text_of(&reply), "echo: again");

    // Stream → SendStreamingMessage.
    let stream = client.stream("py-a2a", text("hi there")).await.unwrap();
    assert_echo_stream(&collect(stream).await);

    // A failed task is the agent's failure.
    let failed = client.invoke("py-a2a", text("fail")).await.unwrap_err();
    assert_eq!(failed.code(), Code::Internal, "{failed:?}");
    assert!(failed.message().contains("asked to fail"), "{failed:?}");

    // Adding an address with no A2A agent says so.
    let missing = client
        .add_a2a_agent("http://127.0.0.1:1", "")
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::Unavailable, "{missing:?}");
    let bad = client.add_a2a_agent("not a url", "").await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");

    agent.kill().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs AGENTMESH_TEST_PYTHON"]
async fn a_task_answered_unfinished_is_followed_to_its_end() {
    let python = python();
    let node = TestNode::start_with(test_config()).await;
    let client = node.client();
    // The agent answers each blocking SendMessage with its task still SUBMITTED.
    for prefer in ["jsonrpc", "rest"] {
        let agent = A2aAgent::start_with(
            &python,
            &["--prefer", prefer, "--answer-early", "--work-ms", "300"],
        )
        .await;
        let name = format!("early-{prefer}");
        client.add_a2a_agent(&agent.url, &name).await.unwrap();

        let reply = client.invoke(&name, text("hi there")).await.unwrap();
        assert_eq!(text_of(&reply), "echo: hi there", "{prefer}");
        assert!(reply.headers.contains_key("a2a-task-id"), "{reply:?}");
        // Its failure, once it comes, is the agent's failure as for a finished answer.
        let failed = client.invoke(&name, text("fail")).await.unwrap_err();
        assert_eq!(failed.code(), Code::Internal, "{failed:?}");
        assert!(failed.message().contains("asked to fail"), "{failed:?}");
        agent.kill().await;
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs AGENTMESH_TEST_PYTHON"]
async fn an_https_a2a_agent_is_reached_with_the_agents_ca() {
    let python = python();
    let ca = TestCa::new("a2a agents CA");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = ca.server(11).write(dir.path(), "agent");
    let ca_file = ca.write(dir.path(), "ca");
    let agent = A2aAgent::start_with(
        &python,
        &[
            "--ssl-certfile",
            cert.to_str().unwrap(),
            "--ssl-keyfile",
            key.to_str().unwrap(),
        ],
    )
    .await;
    assert!(agent.url.starts_with("https://"), "{}", agent.url);

    // Trusting the CA of [tls.agents]: the card, calls and streams go over https.
    let mut config = test_config();
    config.tls.agents.ca = ca_file.display().to_string();
    let node = TestNode::start_with(config).await;
    let client = node.client();
    let card = client.add_a2a_agent(&agent.url, "py-https").await.unwrap();
    assert!(card.endpoint.starts_with("https://"), "{card:?}");
    let reply = client.invoke("py-https", text("hi there")).await.unwrap();
    assert_eq!(text_of(&reply), "echo: hi there");
    let stream = client.stream("py-https", text("hi there")).await.unwrap();
    assert_echo_stream(&collect(stream).await);
    node.stop().await;

    // Without it the system's roots do not know the agent's certificate.
    let node = TestNode::start_with(test_config()).await;
    let refused = node
        .client()
        .add_a2a_agent(&agent.url, "py-https")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("certificate"), "{refused:?}");
    agent.kill().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs AGENTMESH_TEST_PYTHON"]
async fn the_gateway_adds_an_a2a_agent_and_streams_it_over_sse() {
    let python = python();
    // HTTP+JSON first in its card: the node calls that binding.
    let agent = A2aAgent::start(&python, "rest").await;
    let node = TestNode::start_with(test_config()).await;
    let http = http_client();

    let added = http
        .post(format!("{}/v1/a2a-agents", node.http_url()))
        .json(&json!({ "url": agent.url, "name": "py-rest" }))
        .send()
        .await
        .unwrap();
    assert_eq!(added.status(), 200);
    let added: Value = added.json().await.unwrap();
    assert_eq!(added["card"]["name"], "py-rest", "{added}");
    assert_eq!(
        added["card"]["metadata"]["a2a.binding"], "HTTP+JSON",
        "{added}"
    );

    let invoked: Value = http
        .post(format!("{}/v1/agents/py-rest/invoke", node.http_url()))
        .json(&json!({ "json": { "word": "x" } }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // The agent echoes the data part as JSON text.
    assert_eq!(
        invoked["contentType"], "text/plain; charset=utf-8",
        "{invoked}"
    );

    let response = http
        .post(format!("{}/v1/agents/py-rest/stream", node.http_url()))
        .json(&json!({ "binary": "aGkgdGhlcmU=", "contentType": "text/plain" }))
        .send()
        .await
        .unwrap();
    let events = SseReader::new(response).rest().await;
    let events: Vec<(StreamEventKind, String)> = events
        .iter()
        .filter(|event| event.event != "end")
        .map(|event| {
            let data = event.json();
            let kind = StreamEventKind::from_str_name(data["kind"].as_str().unwrap_or_default())
                .unwrap_or(StreamEventKind::Unspecified);
            let said = match data["envelope"]["binary"].as_str() {
                Some(b64) => {
                    use base64::Engine;
                    String::from_utf8(
                        base64::engine::general_purpose::STANDARD
                            .decode(b64)
                            .unwrap(),
                    )
                    .unwrap()
                }
                None => data["message"].as_str().unwrap_or_default().to_owned(),
            };
            (kind, said)
        })
        .collect();
    assert_echo_stream(&events);

    agent.kill().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs AGENTMESH_TEST_PYTHON and AGENTMESH_TEST_GRPCURL"]
async fn grpcurl_adds_and_calls_an_a2a_agent() {
    let python = python();
    let grpcurl = outside_tool("AGENTMESH_TEST_GRPCURL", "a grpcurl binary");
    let agent = A2aAgent::start(&python, "jsonrpc").await;
    let node = TestNode::start_with(test_config()).await;
    let run = async |method: &str, data: Value| -> Vec<Value> {
        let output = Command::new(&grpcurl)
            .args(["-plaintext", "-max-time", "10", "-d"])
            .arg(data.to_string())
            .arg(node.addr())
            .arg(method)
            .kill_on_drop(true)
            .output()
            .await
            .unwrap();
        assert!(
            output.status.success(),
            "grpcurl {method}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::Deserializer::from_slice(&output.stdout)
            .into_iter::<Value>()
            .collect::<Result<Vec<_>, _>>()
            .unwrap()
    };

    let added = run(
        "agentmesh.v1.DiscoveryService/AddA2aAgent",
        json!({ "url": agent.url, "name": "py-grpcurl" }),
    )
    .await;
    assert_eq!(added[0]["card"]["name"], "py-grpcurl", "{added:?}");

    // "hi there" as bytes: base64 in proto3 JSON.
    let envelope =
        json!({ "target": "py-grpcurl", "contentType": "text/plain", "binary": "aGkgdGhlcmU=" });
    let invoked = run(
        "agentmesh.v1.AgentService/Invoke",
        json!({ "envelope": envelope }),
    )
    .await;
    // "echo: hi there"
    assert_eq!(
        invoked[0]["envelope"]["binary"], "ZWNobzogaGkgdGhlcmU=",
        "{invoked:?}"
    );
    let streamed = run(
        "agentmesh.v1.AgentService/Stream",
        json!({ "envelope": envelope }),
    )
    .await;
    let last = streamed.last().unwrap();
    assert_eq!(last["kind"], "STREAM_EVENT_KIND_RESULT", "{streamed:?}");
    assert_eq!(last["envelope"]["binary"], "ZWNobzogaGkgdGhlcmU=");
    assert_eq!(
        streamed
            .iter()
            .filter(|e| e["kind"] == "STREAM_EVENT_KIND_PARTIAL")
            .count(),
        2,
        "{streamed:?}"
    );

    agent.kill().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs AGENTMESH_TEST_PYTHON"]
async fn a_killed_a2a_agent_opens_its_breaker() {
    let python = python();
    let agent = A2aAgent::start(&python, "jsonrpc").await;
    let mut config = test_config();
    config.breaker.consecutive_failures = 3;
    config.breaker.open_for = Duration::from_secs(60);
    // Short leases and refreshes: the node must renew the listing, and keep it when the
    // card can no longer be fetched.
    config.leases.max_ttl = LEASE_TTL;
    config.a2a.card_refresh = Duration::from_millis(200);
    let node = TestNode::start_with(config).await;
    let client: MeshClient = node.client_without_breakers();
    client.add_a2a_agent(&agent.url, "doomed").await.unwrap();
    assert_eq!(
        text_of(&client.invoke("doomed", text("alive")).await.unwrap()),
        "echo: alive"
    );

    agent.kill().await;
    // Unreachable: UNAVAILABLE, each counted against the agent, until the breaker opens.
    let mut codes = Vec::new();
    let mut open = None;
    for _ in 0..10 {
        let error = client.invoke("doomed", text("anyone?")).await.unwrap_err();
        let reason = error.get_details_error_info().map(|info| info.reason);
        if reason.as_deref() == Some("CIRCUIT_OPEN") {
            open = Some(error);
            break;
        }
        assert_eq!(error.code(), Code::Unavailable, "{error:?}");
        assert!(error.message().contains("unreachable"), "{error:?}");
        codes.push(error.code());
    }
    let open = open.expect("the breaker opened");
    assert_eq!(open.code(), Code::Unavailable);
    assert!(open.message().contains("circuit breaker open"), "{open:?}");
    assert!(
        codes.len() <= 3,
        "opened after the threshold of consecutive failures: {codes:?}"
    );
    // Several lease TTLs and failed refreshes later, it is still listed with its breaker
    // open (a failed refresh keeps the last card and does not list it anew).
    tokio::time::sleep(LEASE_TTL * 3).await;
    let listed = client
        .lookup(AgentFilter {
            name: "doomed".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].breaker, BreakerState::Open as i32);

    node.stop().await;
}
