//! Agents in Python (`examples/python`): the agent, compiled from `proto/` with grpcio-tools,
//! runs as a real process against a real node, registers and heartbeats through
//! `DiscoveryService`, and is called through the node from Rust (the SDK), from the Python
//! client and from grpcurl. Every call must reach it with the caller's correlation id and
//! with a deadline the node shortened: the node's hop margin is 1 s here, so a caller's 5 s
//! arrive as at most 4 s (and a few ms of gRPC's rounding).

use std::{
    path::Path,
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use agentmesh_proto::v1::{
    AgentFilter, ConverseOpen, ConverseRequest, Envelope, StreamEventKind, converse_request,
    converse_response,
};
use agentmesh_sdk::{CallOptions, MeshClient};
use agentmesh_tests::{TestNode, outside_tool, test_config};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, BufReader},
    process::{Child, Command},
};

/// The deadline every caller sends.
const CALLER_TIMEOUT: Duration = Duration::from_secs(5);
/// The node's hop margin: what it takes off each deadline before passing it on.
const HOP_MARGIN: Duration = Duration::from_secs(1);
/// How far above the shortened deadline the agent's `time_remaining()` may read: gRPC
/// sends timeouts in coarse units, and gRPC Core (under Python's grpcio) rounds them up
/// and keeps its clock in milliseconds, so a few ms more than was sent can show.
const CLOCK_SLACK: Duration = Duration::from_millis(50);
/// Partial results asked of each stream.
const STREAM_PARTIALS: u64 = 3;

const NEEDS_PYTHON: &str = "a Python 3 with grpcio and grpcio-tools \
     (python3 -m pip install -r examples/python/requirements.txt)";

fn python() -> String {
    outside_tool("AGENTMESH_TEST_PYTHON", NEEDS_PYTHON)
}

/// `python SCRIPT` in `examples/python`, with the protos compiled once for every test of the
/// run into the target dir rather than the source tree.
fn python_script(python: &str, script: &str) -> Command {
    let mut command = Command::new(python);
    command
        .arg(script)
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/python"))
        .env(
            "AGENTMESH_PYTHON_GENERATED",
            Path::new(env!("CARGO_TARGET_TMPDIR")).join("python-generated"),
        )
        .env("PYTHONUNBUFFERED", "1")
        .kill_on_drop(true);
    command
}

/// A node whose hop margin is large enough that the shortening is unmistakable.
async fn start_node() -> TestNode {
    let mut config = test_config();
    config.router.hop_margin = HOP_MARGIN;
    TestNode::start_with(config).await
}

/// `examples/python/agent.py` as a process, registered with a node.
struct PythonAgent {
    name: String,
    child: Child,
    /// Its log (stderr) so far: what it saw of each call.
    log: Arc<Mutex<String>>,
}

impl PythonAgent {
    /// Starts the agent as `name` against `node` and waits for its "registered" line.
    async fn start(python: &str, node: &TestNode, name: &str) -> Self {
        let mut child = python_script(python, "agent.py")
            .args(["--node", &node.addr(), "--name", name, "--ttl", "2"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|error| panic!("cannot run {python}: {error}"));
        let log = Arc::new(Mutex::new(String::new()));
        let mut stderr = child.stderr.take().unwrap();
        tokio::spawn({
            let log = log.clone();
            async move {
                let mut chunk = [0; 4096];
                while let Ok(read) = stderr.read(&mut chunk).await {
                    if read == 0 {
                        break;
                    }
                    log.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&chunk[..read]));
                }
            }
        });
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let registered = tokio::time::timeout(Duration::from_secs(60), stdout.next_line()).await;
        let line = match registered {
            Ok(Ok(Some(line))) => line,
            _ => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                panic!(
                    "agent.py did not print its registration: {registered:?}\nits log:\n{}",
                    log.lock().unwrap()
                );
            }
        };
        let registered: Value = serde_json::from_str(&line)
            .unwrap_or_else(|_| panic!("agent.py printed {line:?}, not its registration"));
        assert_eq!(registered["registered"], name, "{registered}");
        Self {
            name: name.to_owned(),
            child,
            log,
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Stops the agent with SIGTERM, as a supervisor would, and waits for it to exit.
    async fn terminate(mut self) {
        let pid = self.child.id().expect("the agent is running").to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .unwrap();
        assert!(sent.success(), "kill -TERM {pid}");
        let status = tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .expect("agent.py exits within 10 s of SIGTERM")
            .unwrap();
        assert!(
            status.success(),
            "agent.py exited with {status}:\n{}",
            self.log()
        );
    }
}

/// Checks the `call` object the agent echoes: the caller's correlation id, and a deadline
/// above zero and at most the caller's less the node's margin.
fn assert_seen(call: &Value, correlation_id: &str, what: &str, agent: &PythonAgent) {
    assert_eq!(
        call["correlation_id"],
        correlation_id,
        "{what}: the Python agent saw x-correlation-id {} instead of {correlation_id:?}; \
         its reply: {call}\nits log:\n{}",
        call["correlation_id"],
        agent.log()
    );
    assert_eq!(
        call["envelope_correlation_id"], correlation_id,
        "{what}: the envelope's correlation id at the Python agent: {call}"
    );
    let limit = (CALLER_TIMEOUT - HOP_MARGIN + CLOCK_SLACK).as_millis() as u64;
    // A JSON number: whole, though it may arrive written as a double.
    let Some(deadline_ms) = call["deadline_ms"].as_f64() else {
        panic!(
            "{what}: the Python agent saw no deadline although the caller sent {} ms: {call}\n\
             its log:\n{}",
            CALLER_TIMEOUT.as_millis(),
            agent.log()
        );
    };
    assert!(
        deadline_ms > 0.0 && deadline_ms <= limit as f64,
        "{what}: the Python agent had {deadline_ms} ms left; the caller sent {} ms and the \
         node takes {} ms off, so it must be in (0, {limit}] ({} ms of slack for gRPC's \
         rounding): {call}",
        CALLER_TIMEOUT.as_millis(),
        HOP_MARGIN.as_millis(),
        CLOCK_SLACK.as_millis()
    );
}

/// Checks a stream's events as (kind, payload) pairs: progress, the partials, the result.
fn assert_stream(events: &[(StreamEventKind, Value)], correlation_id: &str, agent: &PythonAgent) {
    let kinds: Vec<_> = events.iter().map(|(kind, _)| *kind).collect();
    let mut expected = vec![StreamEventKind::Progress];
    expected.extend((0..STREAM_PARTIALS).map(|_| StreamEventKind::Partial));
    expected.push(StreamEventKind::Result);
    assert_eq!(kinds, expected, "stream events: {events:?}");
    assert_seen(&events[0].1, correlation_id, "stream progress", agent);
    let partials: Vec<_> = events[1..=STREAM_PARTIALS as usize]
        .iter()
        .map(|(_, payload)| payload["i"].as_u64())
        .collect();
    let numbered: Vec<_> = (1..=STREAM_PARTIALS).map(Some).collect();
    assert_eq!(partials, numbered, "partials: {events:?}");
    let (_, result) = events.last().unwrap();
    assert_eq!(result["done"], STREAM_PARTIALS, "result: {result}");
    assert_seen(&result["call"], correlation_id, "stream result", agent);
}

/// Checks a conversation's replies: one per message, in order, echoing it.
fn assert_turns(replies: &[Value], sent: &[Value], correlation_id: &str, agent: &PythonAgent) {
    assert_eq!(
        replies.len(),
        sent.len(),
        "one reply per message: {replies:?}"
    );
    for (turn, (reply, message)) in replies.iter().zip(sent).enumerate() {
        assert_eq!(reply["turn"], turn + 1, "{reply}");
        assert_eq!(reply["echo"], *message, "{reply}");
        assert_seen(&reply["call"], correlation_id, "converse", agent);
    }
}

fn kind_of(value: i32) -> StreamEventKind {
    StreamEventKind::try_from(value).unwrap_or(StreamEventKind::Unspecified)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs AGENTMESH_TEST_PYTHON"]
async fn rust_sdk_calls_a_python_agent_through_the_node() {
    let python = python();
    let node = start_node().await;
    let agent = PythonAgent::start(&python, &node, "py-rust").await;
    let client = node.client();

    // Registered with the card it declared, and kept alive past its 2 s lease.
    let instances = lookup(&client, &agent.name).await;
    assert_eq!(instances.len(), 1, "{instances:?}");
    let card = instances[0].card.clone().unwrap();
    assert_eq!(card.metadata["language"], "python", "{card:?}");
    assert_eq!(card.styles.len(), 3, "unary, stream and converse: {card:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        lookup(&client, &agent.name).await.len(),
        1,
        "heartbeats renew the lease:\n{}",
        agent.log()
    );

    let timeout = CallOptions {
        timeout: Some(CALLER_TIMEOUT),
        ..Default::default()
    };
    let mut request = Envelope::json("echo.request", json!({ "text": "from Rust" }));
    request.correlation_id = "rust-invoke".into();
    let reply = client
        .invoke_with(&agent.name, request, timeout.clone())
        .await
        .unwrap_or_else(|status| panic!("invoke: {status:?}\n{}", agent.log()));
    let payload = reply.json_payload().expect("a JSON reply");
    assert_eq!(payload["echo"], json!({ "text": "from Rust" }), "{payload}");
    assert_seen(&payload["call"], "rust-invoke", "invoke", &agent);
    assert_eq!(reply.correlation_id, "rust-invoke");

    let mut request = Envelope::json("echo.request", json!({ "n": STREAM_PARTIALS }));
    request.correlation_id = "rust-stream".into();
    let mut stream = client
        .stream_with(&agent.name, request, timeout)
        .await
        .unwrap_or_else(|status| panic!("stream: {status:?}\n{}", agent.log()));
    let mut events = Vec::new();
    let mut sequences = Vec::new();
    while let Some(event) = stream.message().await.unwrap() {
        sequences.push(event.sequence);
        let payload = event.envelope.and_then(|e| e.json_payload());
        events.push((kind_of(event.kind), payload.unwrap_or_default()));
    }
    assert_eq!(sequences, (1..=STREAM_PARTIALS + 2).collect::<Vec<_>>());
    assert_stream(&events, "rust-stream", &agent);

    // A conversation carries a deadline only when its caller sets one, so this one is
    // opened with the generated client and an explicit timeout.
    let sent = [json!({ "say": 1 }), json!({ "say": 2 })];
    let mut frames = vec![ConverseRequest {
        frame: Some(converse_request::Frame::Open(ConverseOpen {
            target: agent.name.clone(),
            heartbeat_interval: Some(prost_types::Duration {
                seconds: 5,
                nanos: 0,
            }),
        })),
    }];
    frames.extend(sent.iter().map(|message| ConverseRequest {
        frame: Some(converse_request::Frame::Envelope(Envelope::json(
            "echo.turn",
            message.clone(),
        ))),
    }));
    let mut request = tonic::Request::new(tokio_stream::iter(frames));
    request.set_timeout(CALLER_TIMEOUT);
    request
        .metadata_mut()
        .insert("x-correlation-id", "rust-converse".parse().unwrap());
    let mut conversation = client
        .agents()
        .converse(request)
        .await
        .unwrap_or_else(|status| panic!("converse: {status:?}\n{}", agent.log()))
        .into_inner();
    let mut replies = Vec::new();
    while let Some(frame) = conversation.message().await.unwrap() {
        if let Some(converse_response::Frame::Envelope(envelope)) = frame.frame {
            replies.push(envelope.json_payload().unwrap_or_default());
        }
    }
    assert_turns(&replies, &sent, "rust-converse", &agent);

    // What it saw is in its log too.
    let log = agent.log();
    assert!(
        log.contains("invoke correlation_id=rust-invoke deadline_ms="),
        "{log}"
    );

    // SIGTERM: it deregisters before it exits, well before its lease would lapse.
    let name = agent.name.clone();
    agent.terminate().await;
    assert!(
        lookup(&client, &name).await.is_empty(),
        "agent.py deregisters when it stops"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs AGENTMESH_TEST_PYTHON"]
async fn python_client_calls_a_python_agent_and_uses_a_queue() {
    let python = python();
    let node = start_node().await;
    let agent = PythonAgent::start(&python, &node, "py-python").await;
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        python_script(&python, "client.py")
            .args(["--node", &node.addr(), "--target", &agent.name])
            .args(["--correlation-id", "py-client", "--queue", "py-jobs"])
            .args(["--timeout", &CALLER_TIMEOUT.as_secs().to_string()])
            .args(["--n", &STREAM_PARTIALS.to_string()])
            .output(),
    )
    .await
    .expect("client.py finishes within 60 s")
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "client.py failed ({}):\n{stdout}\n{}\nthe agent's log:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr),
        agent.log()
    );
    let steps: Vec<Value> = stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}")))
        .collect();
    let step = |name: &str| -> &Value {
        steps
            .iter()
            .find(|step| step["step"] == name)
            .unwrap_or_else(|| panic!("client.py printed no {name:?} step:\n{stdout}"))
    };

    let invoke = step("invoke");
    assert_eq!(
        invoke["reply"]["echo"],
        json!({ "text": "hello from Python" })
    );
    assert_seen(&invoke["reply"]["call"], "py-client", "invoke", &agent);
    assert_eq!(invoke["correlation_id"], "py-client", "echoed by the node");

    let events: Vec<(StreamEventKind, Value)> = step("stream")["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|event| {
            let kind = format!("STREAM_EVENT_KIND_{}", event["kind"].as_str().unwrap());
            let kind = StreamEventKind::from_str_name(&kind).unwrap();
            (kind, event["payload"].clone())
        })
        .collect();
    assert_stream(&events, "py-client", &agent);

    let converse = step("converse");
    let replies = converse["replies"].as_array().unwrap();
    assert_turns(
        replies,
        &[json!({ "say": 1 }), json!({ "say": 2 })],
        "py-client-converse",
        &agent,
    );

    let submitted = step("submit");
    assert_eq!(submitted["queue"], "py-jobs");
    let consumed = step("consume");
    assert_eq!(consumed["message_id"], submitted["message_id"]);
    assert_eq!(consumed["payload"], json!({ "task": "resize" }));
    let result = step("result");
    assert_eq!(result["correlation_id"], "py-client-queue");
    assert_eq!(result["payload"], json!({ "resized": true }));
    // The result is stored at the node, where any client finds it.
    let stored = node
        .client()
        .get_result("py-client-queue")
        .await
        .unwrap()
        .expect("the result the Python consumer acked with");
    assert_eq!(stored.json_payload(), Some(json!({ "resized": true })));

    agent.terminate().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs AGENTMESH_TEST_PYTHON and AGENTMESH_TEST_GRPCURL"]
async fn grpcurl_calls_a_python_agent_through_the_node() {
    let python = python();
    let grpcurl = outside_tool("AGENTMESH_TEST_GRPCURL", "a grpcurl binary");
    let node = start_node().await;
    let agent = PythonAgent::start(&python, &node, "py-grpcurl").await;
    let grpcurl = |method, correlation_id, data| {
        run_grpcurl(&grpcurl, &node, &agent, method, correlation_id, data)
    };

    let target = &agent.name;
    let invoke = grpcurl(
        "Invoke",
        "grpcurl-invoke",
        json!({ "envelope": { "target": target, "json": { "text": "from grpcurl" } } }).to_string(),
    )
    .await;
    let reply = &invoke[0]["envelope"]["json"];
    assert_eq!(
        reply["echo"],
        json!({ "text": "from grpcurl" }),
        "{invoke:?}"
    );
    assert_seen(&reply["call"], "grpcurl-invoke", "invoke", &agent);

    let stream = grpcurl(
        "Stream",
        "grpcurl-stream",
        json!({ "envelope": { "target": target, "json": { "n": STREAM_PARTIALS } } }).to_string(),
    )
    .await;
    let events: Vec<(StreamEventKind, Value)> = stream
        .iter()
        .map(|event| {
            let kind = event["kind"].as_str().unwrap_or_default();
            let kind = StreamEventKind::from_str_name(kind).unwrap_or(StreamEventKind::Unspecified);
            (kind, event["envelope"]["json"].clone())
        })
        .collect();
    assert_stream(&events, "grpcurl-stream", &agent);

    // grpcurl sends every frame, then half-closes; the agent answers each and ends.
    let sent = [json!({ "say": "a" }), json!({ "say": "b" })];
    let mut frames = json!({ "open": { "target": target } }).to_string();
    for message in &sent {
        frames.push_str(&json!({ "envelope": { "json": message } }).to_string());
    }
    let converse = grpcurl("Converse", "grpcurl-converse", frames).await;
    let replies: Vec<Value> = converse
        .iter()
        .filter(|frame| frame.get("envelope").is_some())
        .map(|frame| frame["envelope"]["json"].clone())
        .collect();
    assert_turns(&replies, &sent, "grpcurl-converse", &agent);

    agent.terminate().await;
    node.stop().await;
}

/// Calls `method` of the node's AgentService with grpcurl, a 5 s deadline and a correlation
/// id; returns the response messages.
async fn run_grpcurl(
    grpcurl: &str,
    node: &TestNode,
    agent: &PythonAgent,
    method: &str,
    correlation_id: &str,
    data: String,
) -> Vec<Value> {
    let output = Command::new(grpcurl)
        .args(["-plaintext", "-max-time"])
        .arg(CALLER_TIMEOUT.as_secs().to_string())
        .args(["-H", &format!("x-correlation-id: {correlation_id}")])
        .args(["-d", &data])
        .arg(node.addr())
        .arg(format!("agentmesh.v1.AgentService/{method}"))
        .kill_on_drop(true)
        .output()
        .await
        .unwrap_or_else(|error| panic!("cannot run {grpcurl}: {error}"));
    assert!(
        output.status.success(),
        "grpcurl {method}: {}\nthe agent's log:\n{}",
        String::from_utf8_lossy(&output.stderr),
        agent.log()
    );
    // grpcurl prints one JSON object per response message.
    serde_json::Deserializer::from_slice(&output.stdout)
        .into_iter::<Value>()
        .collect::<Result<Vec<_>, _>>()
        .unwrap_or_else(|error| {
            panic!(
                "grpcurl {method} printed no JSON ({error}):\n{}",
                String::from_utf8_lossy(&output.stdout)
            )
        })
}

async fn lookup(client: &MeshClient, name: &str) -> Vec<agentmesh_proto::v1::AgentInstance> {
    client
        .lookup(AgentFilter {
            name: name.into(),
            ..Default::default()
        })
        .await
        .unwrap()
}
