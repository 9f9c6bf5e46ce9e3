//! Streams through the node over real sockets: ordering, cancellation when the
//! caller leaves, an agent's error mid-stream, resumption after a cut, end-to-end
//! backpressure, and a stream retried on another instance when it cannot open.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use agentmesh_node::{NodeConfig, ReplayConfig};
use agentmesh_proto::v1::{Envelope, StreamEventKind, StreamResponse};
use agentmesh_sdk::{Agent, Context, StreamSink};
use agentmesh_tests::{TestNode, card, eventually, start_agent, test_config};
use serde_json::json;
use tonic::{Code, Status};

/// Streams `{"i": i}` for i in 1..=n, `delay_ms` apart; fails at `fail_at`.
struct Numbers {
    cancelled: Arc<AtomicBool>,
    emitted: Arc<AtomicU64>,
}

impl Numbers {
    fn new() -> Self {
        Self {
            cancelled: Arc::default(),
            emitted: Arc::default(),
        }
    }
}

/// Sets a flag when dropped before being disarmed: the handler was cancelled.
struct CancelProbe(Arc<AtomicBool>, bool);

impl Drop for CancelProbe {
    fn drop(&mut self) {
        if !self.1 {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}

#[tonic::async_trait]
impl Agent for Numbers {
    async fn invoke(&self, _ctx: Context, _request: Envelope) -> Result<Envelope, Status> {
        Err(Status::unimplemented("stream only"))
    }

    async fn stream(
        &self,
        _ctx: Context,
        request: Envelope,
        events: StreamSink,
    ) -> Result<Envelope, Status> {
        let mut probe = CancelProbe(self.cancelled.clone(), false);
        let payload = request.json_payload().unwrap_or_default();
        let n = payload["n"].as_u64().unwrap_or(10);
        let delay = payload["delay_ms"].as_u64().unwrap_or(0);
        let fail_at = payload["fail_at"].as_u64();
        for i in 1..=n {
            if Some(i) == fail_at {
                probe.1 = true;
                return Err(Status::failed_precondition(format!(
                    "failed on purpose at {i}"
                )));
            }
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            events
                .partial(Envelope::json("number", json!({ "i": i })))
                .await?;
            self.emitted.fetch_add(1, Ordering::SeqCst);
        }
        probe.1 = true;
        Ok(Envelope::json("numbers.done", json!({ "n": n })))
    }
}

fn config_with_grace(grace: Duration) -> NodeConfig {
    NodeConfig {
        replay: ReplayConfig {
            resume_grace: grace,
            window: 64,
            ..Default::default()
        },
        ..test_config()
    }
}

async fn node_with_numbers(
    config: NodeConfig,
) -> (
    TestNode,
    agentmesh_sdk::RunningAgent,
    Arc<AtomicBool>,
    Arc<AtomicU64>,
) {
    let node = TestNode::start_with(config).await;
    let numbers = Numbers::new();
    let (cancelled, emitted) = (numbers.cancelled.clone(), numbers.emitted.clone());
    let agent = start_agent(&node, card("numbers"), numbers).await;
    (node, agent, cancelled, emitted)
}

fn number_of(event: &StreamResponse) -> Option<u64> {
    event.envelope.as_ref()?.json_payload()?["i"].as_u64()
}

#[tokio::test]
async fn stream_of_n_events_arrives_in_order() {
    let (node, agent, _, _) = node_with_numbers(test_config()).await;
    let mut events = node
        .client()
        .stream("numbers", Envelope::json("go", json!({"n": 200})))
        .await
        .unwrap();
    let mut seen = Vec::new();
    while let Some(event) = events.message().await.unwrap() {
        seen.push(event);
    }
    assert_eq!(seen.len(), 201, "200 partials and the result");
    let stream_id = &seen[0].stream_id;
    assert!(!stream_id.is_empty());
    for (index, event) in seen.iter().enumerate() {
        assert_eq!(&event.stream_id, stream_id);
        assert_eq!(event.sequence, index as u64 + 1, "sequences have no gap");
    }
    let numbers: Vec<u64> = seen.iter().filter_map(number_of).collect();
    assert_eq!(numbers, (1..=200).collect::<Vec<_>>());
    let last = seen.last().unwrap();
    assert_eq!(last.kind, StreamEventKind::Result as i32);
    assert_eq!(
        last.envelope.as_ref().unwrap().json_payload(),
        Some(json!({"n": 200}))
    );
    agent.shutdown().await;
    node.stop().await;
}

#[tokio::test]
async fn caller_going_away_cancels_the_agents_stream() {
    let (node, agent, cancelled, _) =
        node_with_numbers(config_with_grace(Duration::from_millis(100))).await;
    let mut events = node
        .client()
        .stream(
            "numbers",
            Envelope::json("go", json!({"n": 1000, "delay_ms": 10})),
        )
        .await
        .unwrap();
    for _ in 0..3 {
        events.message().await.unwrap().unwrap();
    }
    drop(events);
    assert!(
        eventually(Duration::from_secs(3), || {
            let cancelled = cancelled.clone();
            async move { cancelled.load(Ordering::SeqCst) }
        })
        .await,
        "the agent's handler is cancelled once no reader resumes"
    );
    agent.shutdown().await;
    node.stop().await;
}

#[tokio::test]
async fn agent_error_mid_stream_reaches_the_caller() {
    let (node, agent, _, _) = node_with_numbers(test_config()).await;
    let mut events = node
        .client()
        .stream(
            "numbers",
            Envelope::json("go", json!({"n": 10, "fail_at": 4})),
        )
        .await
        .unwrap();
    let mut received = 0;
    let status = loop {
        match events.message().await {
            Ok(Some(_)) => received += 1,
            Ok(None) => panic!("the stream ended without the agent's error"),
            Err(status) => break status,
        }
    };
    assert_eq!(received, 3);
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("failed on purpose at 4"),
        "{}",
        status.message()
    );
    agent.shutdown().await;
    node.stop().await;
}

#[tokio::test]
async fn resume_after_a_cut_yields_exactly_the_missing_events() {
    let (node, agent, _, _) = node_with_numbers(config_with_grace(Duration::from_secs(5))).await;
    let client = node.client();
    let mut events = client
        .stream(
            "numbers",
            Envelope::json("go", json!({"n": 100, "delay_ms": 2})),
        )
        .await
        .unwrap();
    let mut seen = Vec::new();
    for _ in 0..7 {
        seen.push(events.message().await.unwrap().unwrap());
    }
    drop(events); // the connection is cut mid-stream
    tokio::time::sleep(Duration::from_millis(100)).await;
    let last = seen.last().unwrap().clone();
    let mut rest = client.resume(&last.stream_id, last.sequence).await.unwrap();
    while let Some(event) = rest.message().await.unwrap() {
        seen.push(event);
    }
    let sequences: Vec<u64> = seen.iter().map(|e| e.sequence).collect();
    assert_eq!(
        sequences,
        (1..=101).collect::<Vec<_>>(),
        "no gap, no duplicate"
    );
    let numbers: Vec<u64> = seen.iter().filter_map(number_of).collect();
    assert_eq!(numbers, (1..=100).collect::<Vec<_>>());

    // Resuming a finished stream from the middle replays what is in the window.
    let mut again = client.resume(&last.stream_id, 98).await.unwrap();
    let mut tail = Vec::new();
    while let Some(event) = again.message().await.unwrap() {
        tail.push(event.sequence);
    }
    assert_eq!(tail, vec![99, 100, 101]);

    // Out of the 64-event window, or unknown: clear errors.
    let error = client.resume(&last.stream_id, 1).await.unwrap_err();
    assert_eq!(error.code(), Code::OutOfRange, "{error:?}");
    let error = client.resume("no-such-stream", 0).await.unwrap_err();
    assert_eq!(error.code(), Code::NotFound, "{error:?}");
    agent.shutdown().await;
    node.stop().await;
}

#[tokio::test]
async fn a_slow_reader_slows_the_agent() {
    let (node, agent, _, emitted) =
        node_with_numbers(config_with_grace(Duration::from_secs(5))).await;
    let mut events = node
        .client()
        .stream("numbers", Envelope::json("go", json!({"n": 10_000_000})))
        .await
        .unwrap();
    events.message().await.unwrap().unwrap();
    // Nobody reads: the agent must stall once the bounded buffers along the
    // way (replay window, channels, HTTP/2 flow-control windows) are full.
    let mut previous = u64::MAX;
    let mut later = 0;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        later = emitted.load(Ordering::SeqCst);
        if later == previous {
            break;
        }
        previous = later;
    }
    assert_eq!(
        previous, later,
        "the agent stopped producing while nobody read"
    );
    assert!(
        later < 200_000,
        "bounded buffering: {later} events produced"
    );
    // Reading again lets it go on.
    for _ in 0..1000 {
        events.message().await.unwrap().unwrap();
    }
    assert!(
        eventually(Duration::from_secs(2), || {
            let emitted = emitted.clone();
            async move { emitted.load(Ordering::SeqCst) > later }
        })
        .await
    );
    drop(events);
    agent.shutdown().await;
    node.stop().await;
}

#[tokio::test]
async fn a_stream_that_cannot_open_is_retried_on_another_instance() {
    let node = TestNode::start().await;
    let mut idempotent = card("numbers");
    idempotent.skills[0].idempotent = true;
    let agent = start_agent(&node, idempotent.clone(), Numbers::new()).await;
    // A second instance whose endpoint refuses connections.
    let mut dead = idempotent;
    dead.instance_id = "dead-instance".into();
    dead.endpoint = "http://127.0.0.1:1".into();
    node.client()
        .discovery()
        .register(agentmesh_proto::v1::RegisterRequest {
            card: Some(dead),
            ttl: None,
        })
        .await
        .unwrap();
    for _ in 0..6 {
        let mut events = node
            .client()
            .stream("numbers", Envelope::json("go", json!({"n": 3})))
            .await
            .expect("the stream opens on the live instance");
        let mut count = 0;
        while events.message().await.unwrap().is_some() {
            count += 1;
        }
        assert_eq!(count, 4);
    }
    agent.shutdown().await;
    node.stop().await;
}

/// The node holds at most `replay.max_streams` streams: one more is refused with
/// RESOURCE_EXHAUSTED (not counted against the agent), and once the open ones have finished
/// and their retention is over, new streams start again.
#[tokio::test]
async fn streams_past_the_limit_are_refused_until_finished_ones_make_room() {
    let config = NodeConfig {
        replay: ReplayConfig {
            max_streams: 2,
            resume_grace: Duration::from_millis(50),
            retention: Duration::from_millis(100),
            ..Default::default()
        },
        ..test_config()
    };
    let (node, agent, _, _) = node_with_numbers(config).await;
    let client = node.client();
    let slow = || Envelope::json("go", json!({"n": 1000, "delay_ms": 20}));
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut events = client.stream("numbers", slow()).await.unwrap();
        events.message().await.unwrap().expect("a first event");
        open.push(events);
    }
    let refused = client
        .stream("numbers", slow())
        .await
        .expect_err("a third stream is over the limit");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused}");
    assert!(
        refused.message().contains("too many open streams"),
        "{refused}"
    );

    // The callers leave: past the grace the agent's streams are cancelled, past the
    // retention the node forgets them.
    drop(open);
    let client = &client;
    let room = eventually(Duration::from_secs(10), move || async move {
        match client
            .stream("numbers", Envelope::json("go", json!({"n": 3})))
            .await
        {
            Ok(mut events) => {
                let mut count = 0;
                while events.message().await.unwrap().is_some() {
                    count += 1;
                }
                count == 4
            }
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status}");
                false
            }
        }
    })
    .await;
    assert!(room, "finished streams made room for new ones within 10 s");
    agent.shutdown().await;
    node.stop().await;
}
