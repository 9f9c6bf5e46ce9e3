//! Failure handling over real sockets, with agents that fail on purpose:
//! circuit breakers, retries and their budget, the timeout cascade, fan-out
//! policies, version-aware routing, overload shedding and idempotent invoke.

mod common;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use agentmesh_node::{NodeConfig, RetryConfig, RouterConfig};
use agentmesh_proto::v1::{
    AgentFilter, BreakerState, Envelope, FanOutPolicy, FanOutRequest, PayloadType, Skill,
    fan_out_result::Outcome,
};
use agentmesh_sdk::{Agent, BreakerConfig, CallOptions, Context, MeshClient};
use common::*;
use serde_json::json;
use tonic::{Code, Status};
use tonic_types::StatusExt;

fn quick_breaker() -> BreakerConfig {
    BreakerConfig {
        consecutive_failures: 3,
        open_for: Duration::from_millis(300),
        ..Default::default()
    }
}

async fn node_with(config: NodeConfig) -> TestNode {
    TestNode::start_with(config, "127.0.0.1:0".parse().unwrap()).await
}

/// A client without its own breakers, to observe the node's.
fn raw_client(node: &TestNode) -> MeshClient {
    node.client().with_breakers(None)
}

/// Counts calls; fails with UNAVAILABLE while `failing` is set, or every
/// other call when `alternate` is (a deterministic 50 % failure rate).
#[derive(Clone, Default)]
struct Controlled {
    calls: Arc<AtomicU32>,
    failing: Arc<AtomicBool>,
    alternate: bool,
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

fn idempotent_card(name: &str) -> agentmesh_proto::v1::AgentCard {
    let mut card = card(name);
    card.skills[0].idempotent = true;
    card
}

#[tokio::test]
async fn dead_agent_opens_the_breaker_then_a_probe_closes_it() {
    let node = node_with(NodeConfig {
        breaker: quick_breaker(),
        router: RouterConfig {
            retry: RetryConfig {
                max_attempts: 1,
                ..Default::default()
            },
            ..Default::default()
        },
        ..test_config()
    })
    .await;
    let agent = Controlled::default();
    let running = start_agent(&node, card("fragile"), agent.clone()).await;
    let client = raw_client(&node);
    let call = || client.invoke("fragile", Envelope::json("x", json!({})));
    call().await.unwrap();

    agent.failing.store(true, Ordering::SeqCst);
    for _ in 0..3 {
        assert_eq!(call().await.unwrap_err().code(), Code::Unavailable);
    }
    let before = agent.calls.load(Ordering::SeqCst);
    let mut latencies = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        let error = call().await.unwrap_err();
        latencies.push(started.elapsed());
        assert_eq!(error.code(), Code::Unavailable);
        assert!(
            error.message().contains("circuit breaker open"),
            "{}",
            error.message()
        );
        let info = error.get_details_error_info().expect("ErrorInfo detail");
        assert_eq!(info.reason, "CIRCUIT_OPEN");
        assert!(
            error.get_details_retry_info().is_some(),
            "says when it will probe"
        );
    }
    assert_eq!(
        agent.calls.load(Ordering::SeqCst),
        before,
        "an open breaker does not call the agent"
    );
    latencies.sort();
    eprintln!(
        "fail-fast round trip through the node: median {:?}",
        latencies[10]
    );
    // Loose on purpose (tests share 2 cores); the open breaker's answer costs
    // one lookup, and the agent is not called (asserted above).
    assert!(
        latencies[10] < Duration::from_millis(100),
        "fails fast: median {:?}",
        latencies[10]
    );
    let listed = client
        .lookup(AgentFilter {
            name: "fragile".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        listed[0].breaker,
        BreakerState::Open as i32,
        "breaker state is visible"
    );
    let metrics = reqwest::get(format!("http://{}/metrics", node.addr()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let instance = &listed[0].card.as_ref().unwrap().instance_id;
    assert!(
        metrics.contains(&format!(
            "agentmesh_breaker_state{{agent=\"fragile\",instance=\"{instance}\"}} 2"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "agentmesh_routed_calls_seconds_count{target=\"fragile\",style=\"unary\",code=\"UNAVAILABLE\"} 3"
        ),
        "{metrics}"
    );

    // The agent recovers: after open_for, one probe goes through and closes it.
    agent.failing.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(350)).await;
    call().await.unwrap();
    call().await.unwrap();
    let listed = client.lookup(AgentFilter::default()).await.unwrap();
    assert_eq!(listed[0].breaker, BreakerState::Closed as i32);
    running.shutdown().await;
    node.stop().await;
}

#[tokio::test]
async fn a_killed_agent_trips_the_breaker() {
    let node = node_with(NodeConfig {
        breaker: quick_breaker(),
        ..test_config()
    })
    .await;
    // An agent served without a node connection, registered by hand, so that
    // stopping it leaves its lease behind, as a crash would.
    let running = agentmesh_sdk::AgentRuntime::new(card("mortal"), Controlled::default())
        .start()
        .await
        .unwrap();
    let client = raw_client(&node);
    client
        .discovery()
        .register(agentmesh_proto::v1::RegisterRequest {
            card: Some(running.card().clone()),
            ttl: Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            }),
        })
        .await
        .unwrap();
    client
        .invoke("mortal", Envelope::json("x", json!({})))
        .await
        .unwrap();
    let address = running.address();
    running.shutdown().await;
    let mut codes = Vec::new();
    for _ in 0..6 {
        codes.push(
            client
                .invoke("mortal", Envelope::json("x", json!({})))
                .await
                .unwrap_err(),
        );
    }
    assert!(
        codes.iter().all(|s| s.code() == Code::Unavailable),
        "{codes:?}"
    );
    assert!(
        codes[0].message().contains("unreachable")
            || codes[0].message().contains(&address.to_string()),
        "{}",
        codes[0].message()
    );
    assert!(
        codes
            .last()
            .unwrap()
            .message()
            .contains("circuit breaker open")
    );
    node.stop().await;
}

#[tokio::test]
async fn retries_get_a_flaky_agent_through_and_prefer_another_instance() {
    let node = node_with(NodeConfig {
        breaker: BreakerConfig {
            consecutive_failures: 1000,
            min_calls: 1000,
            ..Default::default()
        },
        router: RouterConfig {
            retry: RetryConfig {
                max_attempts: 5,
                initial_backoff: Duration::from_millis(1),
                budget_min_per_second: 1000,
                ..Default::default()
            },
            ..Default::default()
        },
        ..test_config()
    })
    .await;
    let flaky = Controlled {
        alternate: true,
        ..Default::default()
    };
    let running = start_agent(&node, card("flaky"), flaky.clone()).await;
    let client = raw_client(&node);
    for i in 0..30 {
        let reply = client
            .invoke_with(
                "flaky",
                Envelope::json("x", json!({ "i": i })),
                CallOptions {
                    idempotency_key: Some(format!("flaky-{i}")),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(reply.json_payload(), Some(json!({ "i": i })));
    }
    assert!(
        flaky.calls.load(Ordering::SeqCst) > 30,
        "some calls needed retries"
    );

    // Without an idempotency key (and not declared idempotent), no retry.
    flaky.failing.store(true, Ordering::SeqCst);
    let before = flaky.calls.load(Ordering::SeqCst);
    let error = client
        .invoke("flaky", Envelope::json("x", json!({})))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::Unavailable);
    assert_eq!(
        flaky.calls.load(Ordering::SeqCst),
        before + 1,
        "unsafe calls are not retried"
    );
    running.shutdown().await;

    // A failing instance and a healthy one: the retry goes to the other.
    let bad = Controlled::default();
    bad.failing.store(true, Ordering::SeqCst);
    let good = Controlled::default();
    let bad_agent = start_agent(&node, idempotent_card("pair"), bad.clone()).await;
    let good_agent = start_agent(&node, idempotent_card("pair"), good.clone()).await;
    for _ in 0..10 {
        client
            .invoke("pair", Envelope::json("x", json!({})))
            .await
            .unwrap();
    }
    assert_eq!(good.calls.load(Ordering::SeqCst), 10);
    assert!(
        bad.calls.load(Ordering::SeqCst) <= 10,
        "each call tries the bad one at most once"
    );
    bad_agent.shutdown().await;
    good_agent.shutdown().await;
    node.stop().await;
}

#[tokio::test]
async fn the_retry_budget_caps_extra_load_in_an_outage() {
    let node = node_with(NodeConfig {
        breaker: BreakerConfig {
            consecutive_failures: 100_000,
            min_calls: 100_000,
            ..Default::default()
        },
        router: RouterConfig {
            retry: RetryConfig {
                max_attempts: 3,
                initial_backoff: Duration::from_millis(1),
                budget_ratio: 0.1,
                budget_min_per_second: 1,
                ..Default::default()
            },
            ..Default::default()
        },
        ..test_config()
    })
    .await;
    let down = Controlled::default();
    down.failing.store(true, Ordering::SeqCst);
    let running = start_agent(&node, idempotent_card("down"), down.clone()).await;
    let client = raw_client(&node);
    const CALLS: u32 = 200;
    for _ in 0..CALLS {
        let _ = client.invoke("down", Envelope::json("x", json!({}))).await;
    }
    let made = down.calls.load(Ordering::SeqCst);
    // Without a budget: up to 3 × 200 = 600 attempts. With 10 %: about 220.
    assert!(made >= CALLS, "{made}");
    assert!(
        made <= CALLS + CALLS / 10 + 15,
        "retries capped by the budget: {made} attempts"
    );
    running.shutdown().await;
    node.stop().await;
}

/// Calls `next` (if set) and records its deadline; a leaf with `stuck` waits forever.
struct Hop {
    next: Option<&'static str>,
    seen: Arc<Mutex<Vec<(String, Duration)>>>,
    cancelled: Arc<AtomicBool>,
}

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

/// Answers `{"who": name}` after `delay`, or fails.
#[derive(Clone)]
struct Member {
    name: &'static str,
    delay: Duration,
    fail: bool,
}

#[tonic::async_trait]
impl Agent for Member {
    async fn invoke(&self, _ctx: Context, _request: Envelope) -> Result<Envelope, Status> {
        tokio::time::sleep(self.delay).await;
        if self.fail {
            return Err(Status::internal(format!("{} is broken", self.name)));
        }
        Ok(Envelope::json("member.reply", json!({ "who": self.name })))
    }
}

#[tokio::test]
async fn fan_out_policies_return_exactly_what_they_promise() {
    let node = TestNode::start().await;
    let mut agents = Vec::new();
    let members = [
        ("m1", 10, false),
        ("m2", 20, false),
        ("m3", 30, false),
        ("dead", 0, true),
        ("slow", 3000, false),
    ];
    for (name, delay, fail) in members {
        let mut card = card(name);
        card.skills[0].id = "vote".into();
        let member = Member {
            name,
            delay: Duration::from_millis(delay),
            fail,
        };
        agents.push(start_agent(&node, card, member).await);
    }
    let client = node.client();
    let targets: Vec<String> = members.iter().map(|m| m.0.to_string()).collect();
    let run = |policy: FanOutPolicy, count: u32, timeout_ms: u64| {
        let client = client.clone();
        let targets = targets.clone();
        async move {
            let started = Instant::now();
            let response = client
                .fan_out_with(
                    FanOutRequest {
                        envelope: Some(Envelope::json("vote", json!({}))),
                        targets,
                        policy: policy as i32,
                        count,
                        ..Default::default()
                    },
                    CallOptions {
                        timeout: Some(Duration::from_millis(timeout_ms)),
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            (response, started.elapsed())
        }
    };
    let outcome = |r: &agentmesh_proto::v1::FanOutResult| match &r.outcome {
        Some(Outcome::Envelope(_)) => "ok".to_string(),
        Some(Outcome::Error(e)) => format!("{:?}", Code::from(e.code)),
        None => "none".into(),
    };

    // ALL: waits for everyone; the dead one makes it unsatisfied.
    let (all, _) = run(FanOutPolicy::All, 0, 5000).await;
    assert_eq!(all.results.len(), 5);
    let outcomes: Vec<String> = all.results.iter().map(outcome).collect();
    assert_eq!(outcomes, ["ok", "ok", "ok", "Internal", "ok"]);
    assert!(!all.satisfied);

    // QUORUM(3): the three fast ones suffice; the slow one is cancelled.
    let (quorum, took) = run(FanOutPolicy::Quorum, 3, 5000).await;
    assert!(quorum.satisfied);
    let outcomes: Vec<String> = quorum.results.iter().map(outcome).collect();
    assert_eq!(outcomes, ["ok", "ok", "ok", "Internal", "Cancelled"]);
    assert!(took < Duration::from_secs(2), "{took:?}");

    // QUORUM(5) cannot be met once one target failed: decided early.
    let (impossible, took) = run(FanOutPolicy::Quorum, 5, 5000).await;
    assert!(!impossible.satisfied);
    assert!(took < Duration::from_secs(2), "{took:?}");

    // FIRST(1): the fastest answer; the others are cancelled.
    let (first, _) = run(FanOutPolicy::First, 1, 5000).await;
    assert!(first.satisfied);
    let oks: Vec<&str> = first
        .results
        .iter()
        .filter(|r| matches!(r.outcome, Some(Outcome::Envelope(_))))
        .map(|r| r.target.as_str())
        .collect();
    assert_eq!(oks, ["m1"]);

    // BEST_EFFORT by deadline: the slow one misses a 1 s deadline, the rest are in.
    let (best, took) = run(FanOutPolicy::BestEffort, 0, 1000).await;
    assert!(best.satisfied);
    let outcomes: Vec<String> = best.results.iter().map(outcome).collect();
    assert_eq!(outcomes, ["ok", "ok", "ok", "Internal", "DeadlineExceeded"]);
    assert!(took < Duration::from_millis(1100), "{took:?}");

    // Every instance of a skill.
    let skill = client
        .fan_out(FanOutRequest {
            envelope: Some(Envelope::json("vote", json!({}))),
            skill: "vote".into(),
            policy: FanOutPolicy::First as i32,
            count: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(skill.results.len(), 5);
    assert!(skill.satisfied);

    // The same over HTTP.
    let response = reqwest::Client::new()
        .post(format!("http://{}/v1/fanout", node.addr()))
        .json(&json!({
            "envelope": {"json": {"q": 1}},
            "targets": ["m1", "dead"],
            "policy": "FAN_OUT_POLICY_ALL",
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(
        body["results"][0]["envelope"]["json"]["who"], "m1",
        "{body}"
    );
    // INTERNAL, or UNAVAILABLE once the dead member's breaker has opened.
    let code = body["results"][1]["error"]["code"].as_i64().unwrap();
    assert!(code == 13 || code == 14, "{body}");
    assert!(
        body.get("satisfied").is_none(),
        "unsatisfied (false is omitted): {body}"
    );
    for agent in agents {
        agent.shutdown().await;
    }
    node.stop().await;
}

/// Replies with the version it is.
struct Versioned(&'static str);

#[tonic::async_trait]
impl Agent for Versioned {
    async fn invoke(&self, _ctx: Context, _request: Envelope) -> Result<Envelope, Status> {
        Ok(Envelope::json(
            "translate.reply",
            json!({ "served_by": self.0 }),
        ))
    }
}

#[tokio::test]
async fn versions_route_only_to_instances_that_accept_them() {
    let node = TestNode::start().await;
    let mut agents = Vec::new();
    for version in ["1", "2"] {
        let mut card = card("translate");
        card.skills = vec![Skill {
            id: "translate".into(),
            accepts: vec![PayloadType {
                r#type: "translate.request".into(),
                versions: vec![version.into()],
            }],
            ..Default::default()
        }];
        agents.push(start_agent(&node, card, Versioned(version)).await);
    }
    let client = node.client();
    for version in ["1", "2"] {
        for _ in 0..10 {
            let mut request = Envelope::json("translate.request", json!({}));
            request.type_version = version.into();
            let reply = client.invoke("translate", request).await.unwrap();
            assert_eq!(reply.json_payload().unwrap()["served_by"], version);
        }
    }
    let mut request = Envelope::json("translate.request", json!({}));
    request.type_version = "3".into();
    let error = client.invoke("translate", request).await.unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition);
    assert!(
        error.message().contains("[1, 2]"),
        "names the versions on offer: {}",
        error.message()
    );
    for agent in agents {
        agent.shutdown().await;
    }
    node.stop().await;
}

/// Holds each call for a while and tracks the peak concurrency it saw.
#[derive(Clone, Default)]
struct Busy {
    current: Arc<AtomicU32>,
    peak: Arc<AtomicU32>,
}

#[tonic::async_trait]
impl Agent for Busy {
    async fn invoke(&self, _ctx: Context, _request: Envelope) -> Result<Envelope, Status> {
        let now = self.current.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.current.fetch_sub(1, Ordering::SeqCst);
        Ok(Envelope::default())
    }
}

#[tokio::test]
async fn overload_is_shed_with_resource_exhausted() {
    let node = node_with(NodeConfig {
        router: RouterConfig {
            max_in_flight_per_instance: 4,
            max_in_flight: 6,
            ..Default::default()
        },
        ..test_config()
    })
    .await;
    let busy = Busy::default();
    let running = start_agent(&node, card("busy"), busy.clone()).await;
    let client = raw_client(&node);
    let calls: Vec<_> = (0..40)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.invoke("busy", Envelope::json("x", json!({}))).await })
        })
        .collect();
    let mut ok = 0;
    let mut shed = 0;
    for call in calls {
        match call.await.unwrap() {
            Ok(_) => ok += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                shed += 1;
            }
        }
    }
    assert!(ok >= 4, "{ok} served");
    assert!(shed >= 30, "{shed} shed instead of queued");
    assert!(
        busy.peak.load(Ordering::SeqCst) <= 4,
        "per-instance limit held"
    );
    running.shutdown().await;
    node.stop().await;
}

#[tokio::test]
async fn duplicate_idempotent_invokes_call_the_agent_once() {
    let node = TestNode::start().await;
    let counter = Controlled::default();
    let running = start_agent(&node, card("once"), counter.clone()).await;
    let client = node.client();
    let options = CallOptions {
        idempotency_key: Some("order-42".into()),
        ..Default::default()
    };
    let concurrent: Vec<_> = (0..5)
        .map(|i| {
            let client = client.clone();
            let options = options.clone();
            tokio::spawn(async move {
                client
                    .invoke_with("once", Envelope::json("x", json!({ "i": i })), options)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut replies = Vec::new();
    for call in concurrent {
        replies.push(call.await.unwrap());
    }
    let later = client
        .invoke_with("once", Envelope::json("x", json!({ "i": 99 })), options)
        .await
        .unwrap();
    replies.push(later);
    assert_eq!(
        counter.calls.load(Ordering::SeqCst),
        1,
        "the agent ran once"
    );
    assert!(
        replies.iter().all(|r| r.id == replies[0].id),
        "every duplicate got the first response"
    );
    // Another key runs again.
    client
        .invoke_with(
            "once",
            Envelope::json("x", json!({})),
            CallOptions {
                idempotency_key: Some("order-43".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(counter.calls.load(Ordering::SeqCst), 2);
    running.shutdown().await;
    node.stop().await;
}
