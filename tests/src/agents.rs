//! Agent cards, small agents the tests share, and starting agents against a node.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::Duration,
};

use agentmesh_proto::v1::{AgentCard, Envelope, Skill};
use agentmesh_sdk::{Agent, AgentRuntime, Context, RunningAgent, StreamSink};
use serde_json::json;
use tonic::Status;

use crate::TestNode;

/// A card with one skill named like the agent (`<name>-skill`).
pub fn card(name: &str) -> AgentCard {
    AgentCard {
        name: name.into(),
        version: "1.0.0".into(),
        skills: vec![Skill {
            id: format!("{name}-skill"),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Replies with the request's payload.
#[derive(Debug)]
pub struct Echo;

#[tonic::async_trait]
impl Agent for Echo {
    async fn invoke(&self, _ctx: Context, request: Envelope) -> Result<Envelope, Status> {
        Ok(Envelope {
            r#type: "echo.reply".into(),
            payload: request.payload,
            ..Default::default()
        })
    }
}

/// Counts its calls and answers with the request's payload; fails with UNAVAILABLE
/// while `failing` is set, or every other call when `alternate` is (a deterministic
/// 50 % failure rate). Clones share the counter and the switch.
#[derive(Debug, Clone, Default)]
pub struct Controlled {
    /// Calls so far, failed ones included.
    pub calls: Arc<AtomicU32>,
    /// While set, every call fails.
    pub failing: Arc<AtomicBool>,
    /// Every other call fails, the first one included.
    pub alternate: bool,
}

#[tonic::async_trait]
impl Agent for Controlled {
    async fn invoke(&self, _ctx: Context, request: Envelope) -> Result<Envelope, Status> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        if self.failing.load(Ordering::SeqCst) || (self.alternate && call % 2 == 0) {
            return Err(Status::unavailable("failing on purpose"));
        }
        Ok(Envelope {
            r#type: "ok".into(),
            payload: request.payload,
            ..Default::default()
        })
    }
}

/// Streams `{"n": N, "delay_ms": D, "fail": bool}`: one progress event, N
/// partial results `{"i": i}` (D ms apart), then the result `{"done": N}` —
/// or, with `fail`, an ABORTED error instead of the result. Invoked, it echoes.
#[derive(Debug)]
pub struct Streamer;

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

/// Starts `agent` against `node` and waits for its first registration.
pub async fn start_agent<A: Agent>(node: &TestNode, card: AgentCard, agent: A) -> RunningAgent {
    start_agent_with_ttl(node, card, agent, Duration::from_secs(10)).await
}

/// Starts `agent` with a lease of `ttl` and waits for its first registration.
pub async fn start_agent_with_ttl<A: Agent>(
    node: &TestNode,
    card: AgentCard,
    agent: A,
    ttl: Duration,
) -> RunningAgent {
    let running = AgentRuntime::new(card, agent)
        .node(node.addr())
        .ttl(ttl)
        .start()
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), running.registered(1))
        .await
        .expect("agent registers within 5 s");
    running
}
