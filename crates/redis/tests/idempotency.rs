//! Idempotency keys in Redis as two nodes on one Redis see them: a duplicate through
//! either node replays the first reply, concurrent duplicates run the call once, and a
//! failed, dropped or lost lead lets the next duplicate lead.

mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use agentmesh_core::idempotency::{Claim, IdempotencyStore};
use agentmesh_proto::v1::Envelope;
use agentmesh_redis::{IdempotencyOptions, RedisIdempotency, RedisStore};
use support::{Prefix, Proxy, eventually, store, store_at};
use tonic::{Code, Status};

async fn node(store: &RedisStore, options: IdempotencyOptions) -> Arc<RedisIdempotency> {
    Arc::new(
        RedisIdempotency::connect(store, options)
            .await
            .expect("the idempotency store connects"),
    )
}

async fn two_nodes(prefix: &Prefix, options: IdempotencyOptions) -> [Arc<RedisIdempotency>; 2] {
    [
        node(&store(prefix, "a").await, options.clone()).await,
        node(&store(prefix, "b").await, options).await,
    ]
}

fn reply(id: &str) -> Envelope {
    Envelope {
        id: id.into(),
        ..Default::default()
    }
}

/// Claims `key`, expecting the lead.
async fn lead(
    store: &Arc<RedisIdempotency>,
    key: &str,
) -> Box<dyn agentmesh_core::idempotency::Lead> {
    match Arc::clone(store).claim(key.into()).await.unwrap() {
        Claim::Lead(lead) => lead,
        Claim::Replay(reply) => panic!("expected to lead, got a replay of {}", reply.id),
    }
}

/// Claims `key`, expecting a replay.
async fn replay(store: &Arc<RedisIdempotency>, key: &str) -> Envelope {
    match Arc::clone(store).claim(key.into()).await.unwrap() {
        Claim::Replay(reply) => *reply,
        Claim::Lead(_) => panic!("expected a replay, was given the lead"),
    }
}

/// The raw value of `key` in Redis.
fn raw(prefix: &Prefix, key: &str) -> Option<Vec<u8>> {
    prefix.query(redis::cmd("GET").arg(format!("{}:idempotency:{key}", prefix.0)))
}

/// Waits until a duplicate is waiting on `key` (it marked the key `P`).
async fn until_waited_on(prefix: &Prefix, key: &str) {
    assert!(
        eventually(Duration::from_secs(3), || async {
            raw(prefix, key).is_some_and(|value| value.starts_with(b"P "))
        })
        .await,
        "a duplicate waits on {key}"
    );
}

#[tokio::test]
#[ignore = "needs AGENTMESH_TEST_REDIS"]
async fn a_duplicate_through_the_other_node_replays_the_first_reply() {
    let prefix = Prefix::new();
    let options = IdempotencyOptions::default();
    let [a, b] = two_nodes(&prefix, options.clone()).await;
    let first = lead(&a, "echo\u{0}order-1").await;
    let pending = raw(&prefix, "echo\u{0}order-1").unwrap();
    assert!(
        pending.starts_with(b"p ") && pending.ends_with(b" a"),
        "the marker names the leader's node"
    );
    first.complete(&Ok(reply("first")));
    assert_eq!(replay(&b, "echo\u{0}order-1").await.id, "first");
    assert_eq!(replay(&a, "echo\u{0}order-1").await.id, "first");
    // Remembered for the window, and no longer.
    let ttl: i64 =
        prefix.query(redis::cmd("PTTL").arg(format!("{}:idempotency:echo\u{0}order-1", prefix.0)));
    assert!(
        ttl > 0 && ttl <= options.window.as_millis() as i64,
        "PTTL {ttl}"
    );
    // Another key is another call.
    lead(&b, "echo\u{0}order-2")
        .await
        .complete(&Ok(reply("second")));
    assert_eq!(replay(&a, "echo\u{0}order-2").await.id, "second");
}

#[tokio::test]
#[ignore = "needs AGENTMESH_TEST_REDIS"]
async fn concurrent_duplicates_across_nodes_run_the_call_once() {
    let prefix = Prefix::new();
    let nodes = two_nodes(&prefix, IdempotencyOptions::default()).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let mut duplicates = Vec::new();
    for n in 0..8 {
        let node = Arc::clone(&nodes[n % 2]);
        let calls = Arc::clone(&calls);
        duplicates.push(tokio::spawn(async move {
            match node.claim("charge\u{0}42".into()).await.unwrap() {
                Claim::Replay(reply) => *reply,
                Claim::Lead(lead) => {
                    let n = calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    let answer = reply(&format!("charged by call {n}"));
                    lead.complete(&Ok(answer.clone()));
                    answer
                }
            }
        }));
    }
    let mut replies = Vec::new();
    for duplicate in duplicates {
        replies.push(duplicate.await.unwrap().id);
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "one call for eight duplicates"
    );
    assert!(
        replies.iter().all(|id| id == "charged by call 0"),
        "{replies:?}"
    );
}

#[tokio::test]
#[ignore = "needs AGENTMESH_TEST_REDIS"]
async fn a_failed_lead_fails_its_waiters_and_lets_the_next_duplicate_lead() {
    let prefix = Prefix::new();
    let [a, b] = two_nodes(&prefix, IdempotencyOptions::default()).await;
    let first = lead(&a, "k").await;
    let waiter = tokio::spawn({
        let b = Arc::clone(&b);
        async move { b.claim("k".into()).await }
    });
    until_waited_on(&prefix, "k").await;
    first.complete(&Err(Status::unavailable("agent down")));
    let failed = tokio::time::timeout(Duration::from_secs(2), waiter)
        .await
        .expect("woken, not polled")
        .unwrap()
        .unwrap_err();
    assert_eq!(
        (failed.code(), failed.message()),
        (Code::Unavailable, "agent down")
    );
    // A failure is not remembered: the retry runs.
    assert!(
        eventually(Duration::from_secs(2), || async {
            raw(&prefix, "k").is_none()
        })
        .await
    );
    let retry = lead(&b, "k").await;
    retry.complete(&Ok(reply("retried")));
    assert_eq!(replay(&a, "k").await.id, "retried");
}

#[tokio::test]
#[ignore = "needs AGENTMESH_TEST_REDIS"]
async fn a_dropped_lead_wakes_a_waiting_duplicate_on_the_other_node_to_lead() {
    let prefix = Prefix::new();
    // A long poll: a waiter that leads quickly was woken by the channel.
    let options = IdempotencyOptions {
        poll: Duration::from_secs(30),
        ..IdempotencyOptions::default()
    };
    let [a, b] = two_nodes(&prefix, options).await;
    let first = lead(&a, "k").await;
    let waiter = tokio::spawn({
        let b = Arc::clone(&b);
        async move { b.claim("k".into()).await }
    });
    until_waited_on(&prefix, "k").await;
    let dropped = Instant::now();
    drop(first); // The leading call was cancelled.
    let claim = tokio::time::timeout(Duration::from_secs(3), waiter)
        .await
        .expect("woken by the release")
        .unwrap()
        .unwrap();
    assert!(matches!(claim, Claim::Lead(_)), "the waiter leads");
    assert!(dropped.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
#[ignore = "needs AGENTMESH_TEST_REDIS"]
async fn a_lead_lost_with_its_node_lapses_after_the_lead_timeout() {
    let prefix = Prefix::new();
    let options = IdempotencyOptions {
        lead_timeout: Duration::from_millis(400),
        poll: Duration::from_millis(100),
        ..IdempotencyOptions::default()
    };
    let [a, b] = two_nodes(&prefix, options).await;
    let orphan = lead(&a, "k").await;
    // Node A dies mid-call: its lead is never settled and nothing renews it.
    std::mem::forget(orphan);
    drop(a);
    let began = Instant::now();
    let claim = tokio::time::timeout(Duration::from_secs(5), Arc::clone(&b).claim("k".into()))
        .await
        .expect("the lead lapses")
        .unwrap();
    assert!(matches!(claim, Claim::Lead(_)));
    assert!(
        began.elapsed() >= Duration::from_millis(200),
        "led after {:?}",
        began.elapsed()
    );
}

#[tokio::test]
#[ignore = "needs AGENTMESH_TEST_REDIS"]
async fn a_call_longer_than_the_lead_timeout_keeps_its_lead() {
    let prefix = Prefix::new();
    let options = IdempotencyOptions {
        lead_timeout: Duration::from_millis(300),
        poll: Duration::from_millis(50),
        ..IdempotencyOptions::default()
    };
    let [a, b] = two_nodes(&prefix, options).await;
    let slow = lead(&a, "k").await;
    let waiter = tokio::spawn({
        let b = Arc::clone(&b);
        async move { b.claim("k".into()).await }
    });
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(
        !waiter.is_finished(),
        "the duplicate still waits: the lead was kept alive"
    );
    slow.complete(&Ok(reply("slow but once")));
    match waiter.await.unwrap().unwrap() {
        Claim::Replay(reply) => assert_eq!(reply.id, "slow but once"),
        Claim::Lead(_) => panic!("the duplicate led while the first call ran"),
    }
}

#[tokio::test]
#[ignore = "needs AGENTMESH_TEST_REDIS"]
async fn a_reply_is_forgotten_after_the_window() {
    let prefix = Prefix::new();
    let options = IdempotencyOptions {
        window: Duration::from_millis(300),
        ..IdempotencyOptions::default()
    };
    let [a, b] = two_nodes(&prefix, options).await;
    lead(&a, "k").await.complete(&Ok(reply("once")));
    assert_eq!(replay(&b, "k").await.id, "once");
    tokio::time::sleep(Duration::from_millis(400)).await;
    lead(&b, "k").await.complete(&Ok(reply("again")));
    assert_eq!(replay(&a, "k").await.id, "again");
}

#[tokio::test]
#[ignore = "needs AGENTMESH_TEST_REDIS"]
async fn claims_fail_as_unavailable_while_redis_is_away() {
    let prefix = Prefix::new();
    let proxy = Proxy::start().await;
    let a = node(
        &store_at(&proxy.url, &prefix, "a").await,
        IdempotencyOptions::default(),
    )
    .await;
    proxy.cut();
    let error = Arc::clone(&a).claim("k".into()).await.unwrap_err();
    assert_eq!(error.code(), Code::Unavailable);
    assert!(
        error.message().contains("Redis at redis://127.0.0.1:"),
        "{}",
        error.message()
    );
    proxy.restore();
    assert!(
        eventually(Duration::from_secs(5), || async {
            Arc::clone(&a).claim("k".into()).await.is_ok()
        })
        .await,
        "claims work again once Redis is back"
    );
}
