//! Deadlines over real sockets: every hop gets a strictly shorter deadline than the
//! one before, so the innermost gives up first and is named in the error; calls made
//! from a handler inherit its correlation id and deadline; a caller that goes away
//! cancels the whole chain below it.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use agentmesh_proto::v1::Envelope;
use agentmesh_sdk::{Agent, CallOptions, Context};
use agentmesh_tests::{TestNode, card, eventually, start_agent};
use serde_json::json;
use tonic::{Code, Status};

/// Records how much time it was given, then sleeps past it.
struct Slow {
    seen: Arc<Mutex<Option<Duration>>>,
}

#[tonic::async_trait]
impl Agent for Slow {
    async fn invoke(&self, ctx: Context, _request: Envelope) -> Result<Envelope, Status> {
        *self.seen.lock().unwrap() = ctx.remaining();
        tokio::time::sleep(Duration::from_secs(5)).await;
        Ok(Envelope::default())
    }
}

#[tokio::test]
async fn slow_agent_hits_the_deadline_and_saw_a_shorter_one() {
    let node = TestNode::start().await;
    let seen = Arc::new(Mutex::new(None));
    let agent = start_agent(&node, card("slow"), Slow { seen: seen.clone() }).await;
    let caller_timeout = Duration::from_millis(600);
    let started = std::time::Instant::now();
    let error = node
        .client()
        .invoke_with(
            "slow",
            Envelope::json("x", json!({})),
            CallOptions {
                timeout: Some(caller_timeout),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::DeadlineExceeded, "{error:?}");
    assert!(
        error.message().contains("slow"),
        "the error names the hop that ran out: {}",
        error.message()
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    let seen = seen.lock().unwrap().expect("the agent saw a deadline");
    assert!(
        seen < caller_timeout - Duration::from_millis(20),
        "agent deadline {seen:?} is strictly shorter than the caller's {caller_timeout:?}"
    );
    agent.shutdown().await;
    node.stop().await;
}

/// Calls `echo` from inside its handler and reports what `echo` saw.
struct Relay;

#[tonic::async_trait]
impl Agent for Relay {
    async fn invoke(&self, ctx: Context, _request: Envelope) -> Result<Envelope, Status> {
        let client = ctx
            .client()
            .expect("agents started with a node get a client");
        let inner = client
            .invoke("probe", Envelope::json("probe", json!({})))
            .await?;
        Ok(Envelope::json(
            "relay.reply",
            json!({
                "outer_remaining_ms": ctx.remaining().unwrap().as_millis() as u64,
                "inner": inner.json_payload(),
            }),
        ))
    }
}

/// Reports the correlation id and remaining time it was called with.
struct Probe;

#[tonic::async_trait]
impl Agent for Probe {
    async fn invoke(&self, ctx: Context, _request: Envelope) -> Result<Envelope, Status> {
        Ok(Envelope::json(
            "probe.reply",
            json!({
                "correlation_id": ctx.correlation_id(),
                "remaining_ms": ctx.remaining().unwrap().as_millis() as u64,
            }),
        ))
    }
}

#[tokio::test]
async fn calls_from_a_handler_inherit_correlation_and_a_shorter_deadline() {
    let node = TestNode::start().await;
    let relay = start_agent(&node, card("relay"), Relay).await;
    let probe = start_agent(&node, card("probe"), Probe).await;
    let mut request = Envelope::json("go", json!({}));
    request.correlation_id = "chain-1".into();
    let reply = node
        .client()
        .invoke_with(
            "relay",
            request,
            CallOptions {
                timeout: Some(Duration::from_secs(5)),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let payload = reply.json_payload().unwrap();
    assert_eq!(payload["inner"]["correlation_id"], "chain-1");
    let outer = payload["outer_remaining_ms"].as_u64().unwrap();
    let inner = payload["inner"]["remaining_ms"].as_u64().unwrap();
    assert!(
        outer < 5000,
        "relay saw less than the caller's 5 s: {outer}"
    );
    assert!(
        inner < outer,
        "probe ({inner} ms) saw less than relay ({outer} ms)"
    );
    relay.shutdown().await;
    probe.shutdown().await;
    node.stop().await;
}

/// Calls `next` (if set) and records its deadline; a leaf with `stuck` waits forever.
struct Hop {
    next: Option<&'static str>,
    seen: Arc<Mutex<Vec<(String, Duration)>>>,
    cancelled: Arc<AtomicBool>,
}

/// Sets a flag when dropped before being disarmed: the handler was cancelled.
struct DropFlag(Arc<AtomicBool>, bool);

impl Drop for DropFlag {
    fn drop(&mut self) {
        if !self.1 {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}

#[tonic::async_trait]
impl Agent for Hop {
    async fn invoke(&self, ctx: Context, _request: Envelope) -> Result<Envelope, Status> {
        let name = match self.next {
            Some(next) => format!("before-{next}"),
            None => "leaf".into(),
        };
        self.seen
            .lock()
            .unwrap()
            .push((name, ctx.remaining().unwrap()));
        let mut flag = DropFlag(self.cancelled.clone(), false);
        let result = match self.next {
            Some(next) => {
                ctx.client()
                    .unwrap()
                    .invoke(next, Envelope::json("x", json!({})))
                    .await
            }
            None => {
                std::future::pending::<()>().await;
                unreachable!()
            }
        };
        flag.1 = true;
        result
    }
}

async fn start_chain(
    node: &TestNode,
) -> (
    Vec<agentmesh_sdk::RunningAgent>,
    Arc<Mutex<Vec<(String, Duration)>>>,
    Arc<AtomicBool>,
) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let leaf_cancelled = Arc::new(AtomicBool::new(false));
    let mut agents = Vec::new();
    for (name, next) in [("a", Some("b")), ("b", Some("c")), ("c", None)] {
        let cancelled = if next.is_none() {
            leaf_cancelled.clone()
        } else {
            Arc::new(AtomicBool::new(false))
        };
        agents.push(
            start_agent(
                node,
                card(name),
                Hop {
                    next,
                    seen: seen.clone(),
                    cancelled,
                },
            )
            .await,
        );
    }
    (agents, seen, leaf_cancelled)
}

#[tokio::test]
async fn three_hop_chain_times_out_innermost_first() {
    let node = TestNode::start().await;
    let (agents, seen, leaf_cancelled) = start_chain(&node).await;
    let started = Instant::now();
    let error = node
        .client()
        .invoke_with(
            "a",
            Envelope::json("x", json!({})),
            CallOptions {
                timeout: Some(Duration::from_secs(2)),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    let elapsed = started.elapsed();
    assert_eq!(error.code(), Code::DeadlineExceeded, "{error:?}");
    assert!(
        error.message().contains("agent 'c'"),
        "the error names the hop that ran out: {}",
        error.message()
    );
    assert!(elapsed < Duration::from_millis(2100), "{elapsed:?}");
    let seen = seen.lock().unwrap().clone();
    let remaining: Vec<Duration> = seen.iter().map(|(_, d)| *d).collect();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(remaining[0] < Duration::from_secs(2));
    assert!(
        remaining[1] < remaining[0],
        "b's deadline is shorter than a's: {seen:?}"
    );
    assert!(
        remaining[2] < remaining[1],
        "c's deadline is shorter than b's: {seen:?}"
    );
    assert!(
        eventually(Duration::from_secs(1), || {
            let flag = leaf_cancelled.clone();
            async move { flag.load(Ordering::SeqCst) }
        })
        .await,
        "the leaf's work was cancelled"
    );
    for agent in agents {
        agent.shutdown().await;
    }
    node.stop().await;
}

#[tokio::test]
async fn a_caller_that_goes_away_cancels_the_whole_chain() {
    let node = TestNode::start().await;
    let (agents, seen, leaf_cancelled) = start_chain(&node).await;
    let client = node.client();
    let call = tokio::spawn(async move {
        client
            .invoke_with(
                "a",
                Envelope::json("x", json!({})),
                CallOptions {
                    timeout: Some(Duration::from_secs(30)),
                    ..Default::default()
                },
            )
            .await
    });
    assert!(
        eventually(Duration::from_secs(3), || {
            let seen = seen.clone();
            async move { seen.lock().unwrap().len() == 3 }
        })
        .await
    );
    call.abort();
    assert!(
        eventually(Duration::from_secs(2), || {
            let flag = leaf_cancelled.clone();
            async move { flag.load(Ordering::SeqCst) }
        })
        .await,
        "the leaf was cancelled once the caller left"
    );
    for agent in agents {
        agent.shutdown().await;
    }
    node.stop().await;
}
