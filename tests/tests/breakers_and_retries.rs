//! Breakers and retries over real sockets, with agents that fail on purpose: a
//! breaker opens on failures, fails fast, shows on lookups and `/metrics`, and a probe
//! closes it again; retries get idempotent calls through, preferring another
//! instance; the retry budget caps the extra load in an outage.

use std::{
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use agentmesh_node::{NodeConfig, RetryConfig, RouterConfig};
use agentmesh_proto::v1::{AgentFilter, BreakerState, Envelope};
use agentmesh_sdk::{BreakerConfig, CallOptions};
use agentmesh_tests::{Controlled, TestNode, card, start_agent, test_config};
use serde_json::json;
use tonic::Code;
use tonic_types::StatusExt;

fn quick_breaker() -> BreakerConfig {
    BreakerConfig {
        consecutive_failures: 3,
        open_for: Duration::from_millis(300),
        ..Default::default()
    }
}

fn idempotent_card(name: &str) -> agentmesh_proto::v1::AgentCard {
    let mut card = card(name);
    card.skills[0].idempotent = true;
    card
}

#[tokio::test]
async fn dead_agent_opens_the_breaker_then_a_probe_closes_it() {
    let node = TestNode::start_with(NodeConfig {
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
    let client = node.client_without_breakers();
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
    let node = TestNode::start_with(NodeConfig {
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
    let client = node.client_without_breakers();
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
    let node = TestNode::start_with(NodeConfig {
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
    let client = node.client_without_breakers();
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
    let node = TestNode::start_with(NodeConfig {
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
    let client = node.client_without_breakers();
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
