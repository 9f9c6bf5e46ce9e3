//! Several `agentmesh serve` processes sharing one Redis (`--store redis://…`) behave as one
//! mesh: an agent registered through node A is called through B and C, `Watch` on C sees a
//! registration made through A, a message submitted through A is consumed through B, and a
//! stream opened through A and cut is resumed through B with no gap and no duplicate; a
//! duplicate idempotent invoke through B replays A's reply; a result stored through B is
//! awaited through C; a node killed mid-storm loses nothing acknowledged; a Redis restart
//! is ridden out; nodes serving mutual TLS forward resumes to each other over TLS.

use std::{
    process::{Child, Command, Stdio},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use agentmesh_proto::v1::{
    AgentFilter, ConsumeAck, ConsumeRequest, ConsumeSubscribe, DeregisterRequest, Envelope,
    HeartbeatRequest, RegisterRequest, StreamEventKind, WatchEventKind, WatchRequest,
    consume_request::Action, consume_response::Event,
};
use agentmesh_sdk::{AgentRuntime, CallOptions, MeshClient, RunningAgent};
use agentmesh_tests::{
    Controlled, Echo, NodeProcess, Streamer, card, eventually, free_port, outside_tool,
};
use futures::StreamExt;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const BIN: &str = env!("CARGO_BIN_EXE_agentmesh");

/// The Redis these tests share, and a key prefix of this test's own, deleted on drop.
struct SharedRedis {
    url: String,
    prefix: String,
}

impl SharedRedis {
    fn new() -> Self {
        let url = outside_tool(
            "AGENTMESH_TEST_REDIS",
            "a Redis URL, e.g. redis://127.0.0.1:6379",
        );
        let prefix = format!("mesh-test-{}", uuid::Uuid::now_v7().simple());
        Self { url, prefix }
    }
}

impl Drop for SharedRedis {
    fn drop(&mut self) {
        let Ok(client) = redis::Client::open(self.url.as_str()) else {
            return;
        };
        let Ok(mut connection) = client.get_connection() else {
            return;
        };
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", self.prefix))
            .query(&mut connection)
            .unwrap_or_default();
        for key in keys {
            let _: Result<(), _> = redis::cmd("DEL").arg(key).query(&mut connection);
        }
    }
}

/// One `agentmesh serve` on the shared Redis, with a data directory of its own.
struct MeshNode {
    process: NodeProcess,
    address: String,
    _data: tempfile::TempDir,
}

impl MeshNode {
    async fn start(redis: &SharedRedis, id: &str) -> Self {
        Self::start_with(redis, id, &[]).await
    }

    /// A node with more `--set KEY=VALUE` settings.
    async fn start_with(redis: &SharedRedis, id: &str, settings: &[&str]) -> Self {
        let data = tempfile::tempdir().unwrap();
        let mut shared = vec![
            "--store".to_owned(),
            redis.url.clone(),
            "--set".to_owned(),
            format!("store.key_prefix={}", redis.prefix),
            "--set".to_owned(),
            format!("store.node_id={id}"),
        ];
        for setting in settings {
            shared.extend(["--set".to_owned(), (*setting).to_owned()]);
        }
        let process = NodeProcess::start(BIN, data.path(), &shared).await;
        Self {
            address: process.address.clone(),
            process,
            _data: data,
        }
    }

    fn client(&self) -> MeshClient {
        self.process.client()
    }
}

async fn start_agent<A: agentmesh_sdk::Agent>(
    node: &MeshNode,
    name: &str,
    agent: A,
) -> RunningAgent {
    let running = AgentRuntime::new(card(name), agent)
        .node(node.address.clone())
        .ttl(Duration::from_secs(10))
        .start()
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), running.registered(1))
        .await
        .expect("agent registers within 5 s");
    running
}

/// Opens a `Consume` stream on `queue` through `node`: the sender for acks, and the frames.
async fn subscribe(
    node: &MeshNode,
    queue: &str,
    prefetch: u32,
    lease: Duration,
    consumer: &str,
) -> (
    mpsc::Sender<ConsumeRequest>,
    tonic::Streaming<agentmesh_proto::v1::ConsumeResponse>,
) {
    let (tx, rx) = mpsc::channel(4096);
    tx.send(ConsumeRequest {
        action: Some(Action::Subscribe(ConsumeSubscribe {
            queue: queue.into(),
            prefetch,
            lease: prost_types::Duration::try_from(lease).ok(),
            consumer_id: consumer.into(),
            max_batch: 0,
        })),
    })
    .await
    .unwrap();
    let frames = node
        .client()
        .queues()
        .consume(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, frames)
}

/// With authentication on, the registry in Redis records who registered each instance: a lease
/// registered through one node by one principal cannot be renewed, replaced or deregistered by
/// another principal through another node.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs AGENTMESH_TEST_REDIS"]
async fn leases_on_redis_belong_to_their_principal() {
    let redis = SharedRedis::new();
    let tokens = format!(
        r#"auth.tokens=[{{hash="{}", principal="agent-a"}}, {{hash="{}", principal="agent-b"}}]"#,
        agentmesh_node::auth::hash_token("agent-a-token"),
        agentmesh_node::auth::hash_token("agent-b-token"),
    );
    let settings = [
        "auth.enabled=true",
        tokens.as_str(),
        r#"auth.policy=[{principals=["agent-*"], actions=["register", "discover", "call"]}]"#,
    ];
    let a = MeshNode::start_with(&redis, "node-a", &settings).await;
    let b = MeshNode::start_with(&redis, "node-b", &settings).await;
    let echo = AgentRuntime::new(card("echo"), Echo)
        .node(a.address.clone())
        .token("agent-a-token")
        .start()
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), echo.registered(1))
        .await
        .expect("agent-a registers through A");
    let registration = echo.registration();
    let lease_id = registration.lease_id.clone().unwrap();

    let intruder = b.client().with_token("agent-b-token").unwrap();
    let owner = b.client().with_token("agent-a-token").unwrap();
    // B's copy of the registry catches up with A's registration.
    let until = Instant::now() + Duration::from_secs(5);
    while owner
        .lookup(AgentFilter::default())
        .await
        .unwrap()
        .is_empty()
    {
        assert!(Instant::now() < until, "node B sees the registration");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut discovery = intruder.discovery();
    let status = discovery
        .heartbeat(HeartbeatRequest {
            lease_id: lease_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    let status = discovery
        .deregister(DeregisterRequest {
            lease_id: lease_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    let mut taken = card("echo");
    taken.instance_id = registration.instance_id.clone();
    taken.endpoint = "http://127.0.0.1:1".into();
    let status = discovery
        .register(RegisterRequest {
            card: Some(taken),
            ttl: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    // The owner renews through B, and the agent still answers.
    owner
        .discovery()
        .heartbeat(HeartbeatRequest { lease_id })
        .await
        .expect("the owner renews through another node");
    owner
        .invoke("echo", Envelope::json("t", json!({})))
        .await
        .unwrap();

    // A stream opened through A and resumed through B: B forwards the caller's credentials
    // to A, which authenticates and serves the resume.
    let streamer = AgentRuntime::new(card("streamer"), Streamer)
        .node(a.address.clone())
        .token("agent-a-token")
        .start()
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), streamer.registered(1))
        .await
        .expect("the streamer registers");
    let through_a = a.client().with_token("agent-a-token").unwrap();
    let mut events = through_a
        .stream("streamer", Envelope::json("count", json!({ "n": 4 })))
        .await
        .unwrap();
    let first = events.message().await.unwrap().unwrap();
    drop(events);
    let mut rest = owner
        .resume(&first.stream_id, first.sequence)
        .await
        .expect("resume through B is forwarded to A with the caller's token");
    let mut ended = false;
    while let Some(event) = rest.message().await.unwrap() {
        ended |= event.kind == StreamEventKind::Result as i32;
    }
    assert!(ended, "the resumed stream reaches its result");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs AGENTMESH_TEST_REDIS"]
async fn three_nodes_on_one_redis_are_one_mesh() {
    let redis = SharedRedis::new();
    let a = MeshNode::start(&redis, "node-a").await;
    let b = MeshNode::start(&redis, "node-b").await;
    let c = MeshNode::start(&redis, "node-c").await;

    // Watch through C before anything registers through A.
    let mut watch = c
        .client()
        .discovery()
        .watch(WatchRequest {
            filter: Some(AgentFilter {
                name: "echo".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    let _echo = start_agent(&a, "echo", Echo).await;
    let seen = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(event) = watch.next().await {
            let event = event.unwrap();
            if event.kind == WatchEventKind::Added as i32 {
                return event;
            }
        }
        panic!("watch ended");
    })
    .await
    .expect("Watch on C sees the registration made through A");
    assert_eq!(seen.instance.unwrap().card.unwrap().name, "echo");

    // Registered through A, called through B and C.
    for node in [&b, &c] {
        let reply = node
            .client()
            .invoke("echo", Envelope::json("t", json!({ "via": node.address })))
            .await
            .unwrap();
        assert_eq!(reply.json_payload().unwrap()["via"], json!(node.address));
    }

    // A duplicate idempotent invoke through B returns the reply A got; the agent runs once.
    let counted = Controlled::default();
    let calls = Arc::clone(&counted.calls);
    let _counted = start_agent(&a, "counted", counted).await;
    let keyed = || CallOptions {
        idempotency_key: Some("once-only".into()),
        ..Default::default()
    };
    let first = a
        .client()
        .invoke_with("counted", Envelope::json("t", json!({ "n": 1 })), keyed())
        .await
        .unwrap();
    let again = b
        .client()
        .invoke_with("counted", Envelope::json("t", json!({ "n": 1 })), keyed())
        .await
        .unwrap();
    assert_eq!(again.id, first.id, "the duplicate replays the first reply");
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the agent ran once");

    // Submitted through A, consumed through B.
    let submitted = a
        .client()
        .submit(
            "shared-jobs",
            (0..5).map(|i| Envelope::json("job", json!({ "i": i }))),
        )
        .await
        .unwrap();
    assert_eq!(submitted.accepted, 5);
    let (tx, mut deliveries) =
        subscribe(&b, "shared-jobs", 16, Duration::from_secs(30), "on-b").await;
    let (mut got, mut acked) = (Vec::new(), 0);
    let mut correlation = std::collections::HashMap::new();
    while acked < 5 {
        let frame = tokio::time::timeout(Duration::from_secs(10), deliveries.message())
            .await
            .expect("deliveries through B")
            .unwrap()
            .unwrap();
        match frame.event {
            Some(Event::Delivery(d)) => {
                let envelope = d.envelope.unwrap();
                let i = envelope.json_payload().unwrap()["i"].as_u64().unwrap();
                got.push(i);
                correlation.insert(i, envelope.correlation_id.clone());
                tx.send(ConsumeRequest {
                    action: Some(Action::Ack(ConsumeAck {
                        receipt: d.receipt,
                        result: Some(Box::new(Envelope::json("done", json!({ "i": i })))),
                    })),
                })
                .await
                .unwrap();
            }
            Some(Event::Receipt(r)) => {
                assert!(r.error.is_none(), "{r:?}");
                acked += 1;
            }
            other => panic!("unexpected frame {other:?}"),
        }
    }
    got.sort();
    assert_eq!(got, vec![0, 1, 2, 3, 4]);
    let stats = c.client().list_queues().await.unwrap();
    let shared = stats.iter().find(|q| q.name == "shared-jobs").unwrap();
    assert_eq!((shared.depth, shared.in_flight), (0, 0), "{shared:?}");
    // The result B's consumer stored is read through C.
    let result = c
        .client()
        .await_result(&correlation[&3], Some(Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!(result.json_payload().unwrap()["i"], json!(3));

    // A stream opened through A, cut after three events, resumed through B.
    let _streamer = start_agent(&a, "streamer", Streamer).await;
    let mut events = a
        .client()
        .stream("streamer", Envelope::json("count", json!({ "n": 8 })))
        .await
        .unwrap();
    let mut first = Vec::new();
    while first.len() < 3 {
        first.push(events.message().await.unwrap().unwrap());
    }
    drop(events);
    let last = first.last().unwrap();
    assert!(
        last.stream_id.starts_with("node-a~"),
        "stream ids name their node: {}",
        last.stream_id
    );
    let mut rest = b
        .client()
        .resume(&last.stream_id, last.sequence)
        .await
        .expect("resume through B is forwarded to A");
    let mut sequences: Vec<u64> = first.iter().map(|e| e.sequence).collect();
    let mut ended = false;
    while let Some(event) = rest.message().await.unwrap() {
        sequences.push(event.sequence);
        if event.kind == StreamEventKind::Result as i32 {
            ended = true;
        }
    }
    assert!(ended, "the resumed stream reaches its result");
    let expected: Vec<u64> = (1..=sequences.len() as u64).collect();
    assert_eq!(sequences, expected, "no gap and no duplicate");
}

/// The trace journal lives in Redis: hops carried by node A and node B under one
/// correlation id read back as one chain through node C, each naming its node; and
/// `agentmesh trace` draws it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs AGENTMESH_TEST_REDIS"]
async fn one_chain_across_nodes_is_one_trace() {
    let redis = SharedRedis::new();
    let a = MeshNode::start(&redis, "node-a").await;
    let b = MeshNode::start(&redis, "node-b").await;
    let c = MeshNode::start(&redis, "node-c").await;
    let _echo = start_agent(&a, "echo", Echo).await;
    let chain = format!("chain-{}", uuid::Uuid::now_v7());
    let sent = Envelope {
        correlation_id: chain.clone(),
        ..Envelope::json("t", json!({}))
    };
    a.client().invoke("echo", sent.clone()).await.unwrap();
    b.client().submit("jobs", [sent]).await.unwrap();

    let through_c = c.client();
    let mut hops = Vec::new();
    for _ in 0..100 {
        hops = through_c.trace(&chain).await.unwrap_or_default();
        if hops.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        hops.len(),
        2,
        "both hops reach the shared journal: {hops:?}"
    );
    let by_style = |style: &str| hops.iter().find(|h| h.style == style).unwrap();
    assert_eq!(by_style("unary").node, "node-a");
    assert_eq!(by_style("submit").node, "node-b");

    let drawn = std::process::Command::new(BIN)
        .args(["trace", &chain, "--node", &c.address])
        .output()
        .unwrap();
    assert!(drawn.status.success(), "{drawn:?}");
    let text = String::from_utf8(drawn.stdout).unwrap();
    assert!(
        text.starts_with(&format!("trace {chain}: 2 hops")),
        "{text}"
    );
    assert!(
        text.contains("unary") && text.contains("[node-a]"),
        "{text}"
    );
    assert!(
        text.contains("submit") && text.contains("queue:jobs"),
        "{text}"
    );
}

/// A node stays on the mesh's list while it serves (renewing its entry) and drops off it once
/// its entry's time to live has passed after it was killed, so forwarding never waits on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs AGENTMESH_TEST_REDIS"]
async fn a_killed_node_drops_off_the_list_of_nodes() {
    let redis = SharedRedis::new();
    let mut a = MeshNode::start_with(&redis, "node-a", &["store.node_ttl=600ms"]).await;
    let b = MeshNode::start_with(&redis, "node-b", &["store.node_ttl=600ms"]).await;
    let mut con = redis::Client::open(redis.url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let entry = |id: &str| format!("{}:node:{id}", redis.prefix);
    let address_of = |key: String| {
        let mut con = con.clone();
        async move {
            redis::cmd("GET")
                .arg(key)
                .query_async::<Option<String>>(&mut con)
                .await
                .unwrap()
        }
    };
    // Longer than the time to live: the serving nodes renewed their entries.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        address_of(entry("node-a")).await.as_deref(),
        Some(format!("http://{}", a.address).as_str())
    );
    assert!(address_of(entry("node-b")).await.is_some());

    a.process.kill();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        address_of(entry("node-a")).await,
        None,
        "the killed node is off the list"
    );
    assert!(
        address_of(entry("node-b")).await.is_some(),
        "the live one stays"
    );
    let ttl: i64 = redis::cmd("PTTL")
        .arg(entry("node-b"))
        .query_async(&mut con)
        .await
        .unwrap();
    assert!(
        (1..=600).contains(&ttl),
        "the entry is a lease: {ttl} ms left"
    );
    drop(b);
}

/// Node A is killed (SIGKILL) while producers submit through A and B and a consumer drains
/// through C: every acknowledged message is processed at least once, messages A had leased
/// go to the consumer on C once their lease lapses, and nothing is left waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs AGENTMESH_TEST_REDIS"]
async fn losing_a_node_loses_no_acknowledged_message() {
    use std::{
        collections::{HashMap, HashSet},
        sync::{Arc, Mutex},
    };

    let redis = SharedRedis::new();
    let mut a = MeshNode::start(&redis, "node-a").await;
    let b = MeshNode::start(&redis, "node-b").await;
    let c = MeshNode::start(&redis, "node-c").await;
    let queue = "storm";

    // A consumer on A holds some messages (short leases) when A dies.
    let (_a_tx, _held_on_a) = subscribe(&a, queue, 32, Duration::from_secs(1), "on-a").await;

    // Producers through A and B record what was acknowledged.
    let acknowledged = Arc::new(Mutex::new(HashSet::new()));
    let mut producers = Vec::new();
    for (name, client) in [("a", a.client()), ("b", b.client())] {
        let acknowledged = Arc::clone(&acknowledged);
        producers.push(tokio::spawn(async move {
            for round in 0..200 {
                let batch = (0..10).map(|i| {
                    Envelope::json("job", json!({ "from": name, "round": round, "i": i }))
                });
                match client.submit(queue, batch).await {
                    Ok(response) => {
                        let mut set = acknowledged.lock().unwrap();
                        for outcome in response.outcomes {
                            set.insert(outcome.message_id);
                        }
                    }
                    // A is gone: its producer stops; B's keeps going.
                    Err(_) => return,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.process.kill();
    for producer in producers {
        producer.await.unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(
        acknowledged.len() >= 100,
        "the storm got going: {}",
        acknowledged.len()
    );

    // Drain through C until the queue stays empty.
    let (tx, mut inbound) = subscribe(&c, queue, 512, Duration::from_secs(30), "on-c").await;
    let mut seen: HashMap<String, u32> = HashMap::new();
    while let Ok(Ok(Some(frame))) =
        tokio::time::timeout(Duration::from_secs(4), inbound.message()).await
    {
        if let Some(Event::Delivery(d)) = frame.event {
            *seen.entry(d.envelope.unwrap().id).or_default() += 1;
            tx.send(ConsumeRequest {
                action: Some(Action::Ack(ConsumeAck {
                    receipt: d.receipt,
                    result: None,
                })),
            })
            .await
            .unwrap();
        }
    }
    let lost: Vec<&String> = acknowledged
        .iter()
        .filter(|id| !seen.contains_key(*id))
        .collect();
    let duplicates: u32 = seen.values().map(|n| n - 1).sum();
    println!(
        "node lost mid-storm: {} acknowledged, {} delivered through C, {} lost, {} duplicates",
        acknowledged.len(),
        seen.len(),
        lost.len(),
        duplicates
    );
    assert!(lost.is_empty(), "{} acknowledged messages lost", lost.len());
    let stats = b.client().list_queues().await.unwrap();
    let storm = stats.iter().find(|q| q.name == queue).unwrap();
    assert_eq!((storm.depth, storm.in_flight), (0, 0), "{storm:?}");
}

/// A Redis of this test's own (another process on a free port), so it can be stopped and
/// started again without disturbing anything else that uses the machine's Redis.
struct OwnRedis {
    server: String,
    port: u16,
    child: Option<Child>,
}

impl OwnRedis {
    fn start() -> Self {
        let server = outside_tool(
            "AGENTMESH_TEST_REDIS_SERVER",
            "a redis-server binary (a test starts and stops a Redis of its own)",
        );
        let mut redis = Self {
            server,
            port: free_port(),
            child: None,
        };
        redis.up();
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn up(&mut self) {
        let child = Command::new(&self.server)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let until = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < until, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn down(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.down();
    }
}

/// Redis goes away and comes back (empty: it kept nothing). Meanwhile the nodes keep
/// serving: routing works from their caches, what needs Redis fails with UNAVAILABLE naming
/// the store, and no process dies. Afterwards they reconnect by themselves, the agent is
/// registered again (its heartbeat finds its lease gone), and the queue works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs AGENTMESH_TEST_REDIS_SERVER"]
async fn nodes_ride_out_a_redis_restart() {
    let mut own = OwnRedis::start();
    let redis = SharedRedis {
        url: own.url(),
        prefix: "restart".into(),
    };
    let mut a = MeshNode::start(&redis, "node-a").await;
    let mut b = MeshNode::start(&redis, "node-b").await;
    let _echo = start_agent(&a, "echo", Echo).await;
    let call = |node: &MeshNode| {
        let client = node.client();
        async move { client.invoke("echo", Envelope::json("t", json!({}))).await }
    };
    // B learns of the registration through Redis's change channel, a moment after A.
    let b_routes = eventually(Duration::from_secs(10), || async { call(&b).await.is_ok() }).await;
    assert!(b_routes, "echo through B before the restart");

    own.down();
    // Routing needs no Redis: B still reaches the agent from its cache.
    call(&b).await.expect("echo through B while Redis is down");
    let refused = a
        .client()
        .submit("jobs", [Envelope::json("job", json!({}))])
        .await
        .expect_err("a submit cannot be stored while Redis is down");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(!refused.message().is_empty(), "{refused:?}");
    for node in [&mut a, &mut b] {
        assert!(
            node.process.child.try_wait().unwrap().is_none(),
            "a node exited while Redis was down"
        );
    }

    own.up();
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let submitted = a
            .client()
            .submit("jobs", [Envelope::json("job", json!({}))])
            .await;
        let called = call(&b).await;
        if submitted.is_ok_and(|r| r.accepted == 1) && called.is_ok() {
            break;
        }
        assert!(
            Instant::now() < until,
            "the mesh did not recover after Redis came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A node process serving TLS with client certificates required, killed on drop.
struct TlsMeshNode {
    child: Child,
    address: String,
    client: MeshClient,
    _data: tempfile::TempDir,
}

impl TlsMeshNode {
    /// Starts a node on the shared Redis with `settings`, and waits until `tls` reaches it.
    async fn start(
        redis: &SharedRedis,
        id: &str,
        settings: &[String],
        tls: &agentmesh_sdk::ClientTls,
    ) -> Self {
        let data = tempfile::tempdir().unwrap();
        let address = format!("127.0.0.1:{}", free_port());
        let mut command = Command::new(BIN);
        command
            .args(["serve", "--listen", &address, "--data-dir"])
            .arg(data.path())
            .args(["--store", &redis.url, "--set"])
            .arg(format!("store.key_prefix={}", redis.prefix))
            .arg("--set")
            .arg(format!("store.node_id={id}"));
        for setting in settings {
            command.arg("--set").arg(setting);
        }
        let child = command
            .env("AGENTMESH_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let client = MeshClient::connect_lazy_tls(&format!("https://{address}"), tls).unwrap();
        let node = Self {
            child,
            address,
            client,
            _data: data,
        };
        let until = Instant::now() + Duration::from_secs(20);
        while node.client.list_queues().await.is_err() {
            assert!(Instant::now() < until, "node {id} did not come up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        node
    }
}

impl Drop for TlsMeshNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Nodes serving mutual TLS on one Redis: a stream opened through A and cut is resumed
/// through B, which forwards the resume to A's `https://` address with `[tls.agents]`'s CA
/// and client certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs AGENTMESH_TEST_REDIS"]
async fn nodes_serving_tls_forward_resumes_to_each_other() {
    let redis = SharedRedis::new();
    let ca = agentmesh_tests::tls::TestCa::new("mesh CA");
    let dir = tempfile::tempdir().unwrap();
    let ca_file = ca.write(dir.path(), "ca").display().to_string();
    let (cert, key) = ca.server(1).write(dir.path(), "node");
    let (client_cert, client_key) = ca.client("agentmesh-node").write(dir.path(), "node-client");
    let settings = [
        format!("tls.cert={}", cert.display()),
        format!("tls.key={}", key.display()),
        format!("tls.client_ca={ca_file}"),
        format!("tls.agents.ca={ca_file}"),
        format!("tls.agents.cert={}", client_cert.display()),
        format!("tls.agents.key={}", client_key.display()),
    ];
    let caller = ca.client("caller");
    let tls = ca
        .client_tls()
        .identity_pem(caller.cert_pem.clone(), caller.key_pem.clone());
    let a = TlsMeshNode::start(&redis, "node-a", &settings, &tls).await;
    let b = TlsMeshNode::start(&redis, "node-b", &settings, &tls).await;
    let streamer = AgentRuntime::new(card("streamer"), Streamer)
        .node(format!("https://{}", a.address))
        .node_tls(tls.clone())
        .start()
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), streamer.registered(1))
        .await
        .expect("the agent registers with the TLS node");

    let mut events = a
        .client
        .stream("streamer", Envelope::json("count", json!({ "n": 8 })))
        .await
        .unwrap();
    let mut first = Vec::new();
    while first.len() < 3 {
        first.push(events.message().await.unwrap().unwrap());
    }
    drop(events);
    let last = first.last().unwrap();
    let mut rest = b
        .client
        .resume(&last.stream_id, last.sequence)
        .await
        .expect("resume through B is forwarded to A over TLS");
    let mut sequences: Vec<u64> = first.iter().map(|e| e.sequence).collect();
    while let Some(event) = rest.message().await.unwrap() {
        sequences.push(event.sequence);
    }
    let expected: Vec<u64> = (1..=sequences.len() as u64).collect();
    assert_eq!(sequences, expected, "no gap and no duplicate");
    assert_eq!(sequences.len(), 10, "progress, 8 partials, result");
    streamer.shutdown().await;
}
