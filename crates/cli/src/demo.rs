//! Built-in demo agents that `agentmesh serve --demo-agents` registers, so a
//! newcomer can try every interaction style at once.

use std::time::Duration;

use agentmesh_proto::v1::{AgentCard, InteractionStyle, Skill};
use agentmesh_sdk::{Agent, AgentRuntime, Context, Conversation, RunningAgent, StreamSink};
use serde_json::json;
use tonic::Status;

use agentmesh_proto::v1::Envelope;

/// `echo`: replies with the request's payload.
#[derive(Debug)]
pub(crate) struct Echo;

#[tonic::async_trait]
impl Agent for Echo {
    async fn invoke(&self, _ctx: Context, request: Envelope) -> Result<Envelope, Status> {
        Ok(Envelope {
            r#type: "echo.reply".into(),
            content_type: request.content_type,
            payload: request.payload,
            ..Default::default()
        })
    }

    async fn converse(&self, _ctx: Context, mut conversation: Conversation) -> Result<(), Status> {
        while let Some(message) = conversation.recv().await {
            conversation
                .send(Envelope {
                    r#type: "echo.reply".into(),
                    content_type: message.content_type,
                    payload: message.payload,
                    ..Default::default()
                })
                .await?;
        }
        Ok(())
    }
}

/// `counter`: streams `{"count": i}` for i in 1..=n with progress, one every
/// `interval_ms` (default 200), then `{"total": n}` as the result.
#[derive(Debug)]
pub(crate) struct Counter;

#[tonic::async_trait]
impl Agent for Counter {
    async fn invoke(&self, _ctx: Context, request: Envelope) -> Result<Envelope, Status> {
        let n = count_of(&request)?;
        Ok(Envelope::json("counter.result", json!({ "total": n })))
    }

    async fn stream(
        &self,
        _ctx: Context,
        request: Envelope,
        events: StreamSink,
    ) -> Result<Envelope, Status> {
        let n = count_of(&request)?;
        let interval = request
            .json_payload()
            .and_then(|p| p.get("interval_ms").and_then(|v| v.as_u64()))
            .unwrap_or(200);
        for i in 1..=n {
            tokio::time::sleep(Duration::from_millis(interval)).await;
            events
                .partial(Envelope::json("counter.tick", json!({ "count": i })))
                .await?;
            events
                .progress(i as f32 / n as f32, format!("{i} of {n}"))
                .await?;
        }
        Ok(Envelope::json("counter.result", json!({ "total": n })))
    }
}

/// `flaky`: fails with UNAVAILABLE about half the time (`fail_rate` in the
/// payload overrides it); declared idempotent, so the node retries it.
#[derive(Debug)]
pub(crate) struct Flaky;

#[tonic::async_trait]
impl Agent for Flaky {
    async fn invoke(&self, _ctx: Context, request: Envelope) -> Result<Envelope, Status> {
        let rate = request
            .json_payload()
            .and_then(|p| p.get("fail_rate").and_then(|v| v.as_f64()))
            .unwrap_or(0.5);
        if rand::random::<f64>() < rate {
            return Err(Status::unavailable("flaky: failed on purpose"));
        }
        Ok(Envelope {
            r#type: "flaky.reply".into(),
            payload: request.payload,
            ..Default::default()
        })
    }
}

/// `slow`: answers after `delay_ms` (default 2000), unless its deadline runs
/// out first; shows the timeout cascade.
#[derive(Debug)]
pub(crate) struct Slow;

#[tonic::async_trait]
impl Agent for Slow {
    async fn invoke(&self, ctx: Context, request: Envelope) -> Result<Envelope, Status> {
        let delay = request
            .json_payload()
            .and_then(|p| p.get("delay_ms").and_then(|v| v.as_u64()))
            .unwrap_or(2000);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        Ok(Envelope::json(
            "slow.reply",
            json!({ "slept_ms": delay, "deadline_left_ms": ctx.remaining().map(|d| d.as_millis() as u64) }),
        ))
    }
}

fn count_of(request: &Envelope) -> Result<u64, Status> {
    let n = request
        .json_payload()
        .and_then(|p| p.get("n").and_then(|v| v.as_u64()))
        .unwrap_or(5);
    if n > 100_000 {
        return Err(Status::invalid_argument("n must be at most 100000"));
    }
    Ok(n)
}

fn card(name: &str, description: &str, skill: &str, styles: &[InteractionStyle]) -> AgentCard {
    AgentCard {
        name: name.into(),
        version: env!("CARGO_PKG_VERSION").into(),
        description: description.into(),
        skills: vec![Skill {
            id: skill.into(),
            description: description.into(),
            tags: vec!["demo".into()],
            accepts: Vec::new(),
            produces: Vec::new(),
            idempotent: true,
        }],
        styles: styles.iter().map(|s| *s as i32).collect(),
        ..Default::default()
    }
}

fn with_token<A: Agent>(runtime: AgentRuntime<A>, token: Option<&str>) -> AgentRuntime<A> {
    match token {
        Some(token) => runtime.token(token),
        None => runtime,
    }
}

/// Starts every demo agent against the node at `node`; with authentication on, they register
/// with `token` (`AGENTMESH_TOKEN`).
pub(crate) async fn start(node: &str, token: Option<&str>) -> anyhow::Result<Vec<RunningAgent>> {
    use InteractionStyle::{Converse, Stream, Unary};
    let agents = vec![
        with_token(
            AgentRuntime::new(
                card(
                    "echo",
                    "Replies with what it is sent",
                    "echo",
                    &[Unary, Converse],
                ),
                Echo,
            )
            .node(node),
            token,
        )
        .start()
        .await?,
        with_token(
            AgentRuntime::new(
                card(
                    "counter",
                    "Counts to n, streaming each number with progress",
                    "count",
                    &[Unary, Stream],
                ),
                Counter,
            )
            .node(node),
            token,
        )
        .start()
        .await?,
        with_token(
            AgentRuntime::new(
                card(
                    "flaky",
                    "Fails half the time with UNAVAILABLE; retried by the node",
                    "flaky",
                    &[Unary],
                ),
                Flaky,
            )
            .node(node),
            token,
        )
        .start()
        .await?,
        with_token(
            AgentRuntime::new(
                card(
                    "slow",
                    "Answers after delay_ms (default 2 s)",
                    "slow",
                    &[Unary],
                ),
                Slow,
            )
            .node(node),
            token,
        )
        .start()
        .await?,
    ];
    Ok(agents)
}
