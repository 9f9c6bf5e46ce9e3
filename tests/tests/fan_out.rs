//! Fan-out over real sockets: one request to many agents under each completion
//! policy (all, quorum, first, best effort by deadline), to every instance of a
//! skill, and over HTTP.

use std::time::{Duration, Instant};

use agentmesh_proto::v1::{Envelope, FanOutPolicy, FanOutRequest, fan_out_result::Outcome};
use agentmesh_sdk::{Agent, CallOptions, Context};
use agentmesh_tests::{TestNode, card, start_agent};
use serde_json::json;
use tonic::{Code, Status};

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
