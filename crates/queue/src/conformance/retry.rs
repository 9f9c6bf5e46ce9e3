//! Retries: nack delays and backoff, and dead-lettering after the last attempt.

use super::fixture::{LONG_LEASE, assert_empty, msg, open, receive_n, stats_of, submit_ok};
use super::{BackendFactory, test_config};
use crate::{NackOutcome, QueueConfig};
use bytes::Bytes;
use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime};

/// A nack with a delay makes the message ready again only after that delay.
pub async fn nack_redelivers_after_delay(factory: &dyn BackendFactory) {
    let b = open(factory, test_config()).await;
    let q = "nack-delay";
    submit_ok(&*b, q, vec![msg("n")]).await;
    let got = receive_n(&*b, q, "c", 1, LONG_LEASE, Duration::from_secs(5)).await;
    let nacked_at = SystemTime::now();
    let outcome = b
        .nack(
            &got[0].receipt,
            "try later",
            Some(Duration::from_millis(400)),
        )
        .await
        .expect("nack");
    let NackOutcome::Retry { at } = outcome else {
        panic!("expected a retry, got {outcome:?}");
    };
    let wait = at.duration_since(nacked_at).unwrap_or_default();
    assert!(
        wait >= Duration::from_millis(350) && wait <= Duration::from_millis(1000),
        "{wait:?}"
    );
    let s = stats_of(&*b, q).await;
    assert_eq!(
        (s.depth, s.in_flight),
        (1, 0),
        "a delayed message counts in depth"
    );
    let early = b
        .receive(q, "c", 1, LONG_LEASE, Duration::from_millis(150))
        .await
        .expect("receive");
    assert!(early.is_empty(), "redelivered before the delay");
    let again = receive_n(&*b, q, "c", 1, LONG_LEASE, Duration::from_secs(5)).await;
    assert_eq!(again.len(), 1);
    assert!(SystemTime::now() >= at - Duration::from_millis(5));
    assert_eq!(again[0].attempt, 2);
    b.ack(&again[0].receipt, None).await.expect("ack");
}

/// Without a delay, a nack backs off within the configured cap.
pub async fn nack_default_backoff_stays_within_cap(factory: &dyn BackendFactory) {
    let config = test_config().with_queue(
        "backoff",
        QueueConfig {
            max_attempts: 10,
            backoff_base: Duration::from_millis(20),
            backoff_max: Duration::from_millis(60),
            ..test_config().defaults
        },
    );
    let b = open(factory, config).await;
    let q = "backoff";
    submit_ok(&*b, q, vec![msg("b")]).await;
    for attempt in 1..=5 {
        let got = receive_n(&*b, q, "c", 1, LONG_LEASE, Duration::from_secs(5)).await;
        assert_eq!(got[0].attempt, attempt);
        let before = SystemTime::now();
        let NackOutcome::Retry { at } = b.nack(&got[0].receipt, "e", None).await.expect("nack")
        else {
            panic!("dead-lettered too early");
        };
        let delay = at.duration_since(before).unwrap_or_default();
        assert!(
            delay <= Duration::from_millis(100),
            "attempt {attempt}: {delay:?}"
        );
    }
}

/// A lease lapsing on the last attempt dead-letters the message.
pub async fn lease_expiry_at_max_attempts_dead_letters(factory: &dyn BackendFactory) {
    let config = test_config().with_queue(
        "lapse-dl",
        QueueConfig {
            max_attempts: 2,
            ..test_config().defaults
        },
    );
    let b = open(factory, config).await;
    let q = "lapse-dl";
    submit_ok(&*b, q, vec![msg("y")]).await;
    let short = Duration::from_millis(150);
    let first = receive_n(&*b, q, "c", 1, short, Duration::from_secs(5)).await;
    assert_eq!(first[0].attempt, 1);
    let second = receive_n(&*b, q, "c", 1, short, Duration::from_secs(5)).await;
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].attempt, 2);
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let s = stats_of(&*b, q).await;
        if s.dead_letters == 1 {
            assert_eq!((s.depth, s.in_flight), (0, 0));
            break;
        }
        assert!(
            Instant::now() < until,
            "not dead-lettered after lease expiry: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (dead, _) = b.list_dead_letters(q, 10, None).await.expect("list");
    assert_eq!(dead[0].last_error, "lease expired");
    assert_eq!(dead[0].attempts.len(), 2);
}

/// A message that always fails is dead-lettered after `max_attempts`; the rest flow meanwhile.
pub async fn poison_is_dead_lettered_while_others_flow(factory: &dyn BackendFactory) {
    let b = open(factory, test_config()).await;
    let q = "poison";
    let mut batch = vec![msg("poison")];
    batch.extend((0..50).map(|i| msg(&format!("ok-{i}"))));
    submit_ok(&*b, q, batch).await;
    let mut acked = HashSet::new();
    let mut poison_attempts = Vec::new();
    let mut outcome = None;
    let until = Instant::now() + Duration::from_secs(10);
    while (acked.len() < 50 || outcome.is_none()) && Instant::now() < until {
        let got = b
            .receive(q, "worker", 8, LONG_LEASE, Duration::from_millis(200))
            .await
            .expect("receive");
        for m in got {
            if m.message_id == "poison" {
                poison_attempts.push(m.attempt);
                let o = b
                    .nack(
                        &m.receipt,
                        &format!("cannot parse (attempt {})", m.attempt),
                        None,
                    )
                    .await
                    .expect("nack");
                if o == NackOutcome::DeadLettered {
                    outcome = Some(o);
                }
            } else {
                b.ack(&m.receipt, None).await.expect("ack");
                acked.insert(m.message_id);
            }
        }
    }
    assert_eq!(acked.len(), 50);
    assert_eq!(outcome, Some(NackOutcome::DeadLettered));
    assert_eq!(poison_attempts, vec![1, 2, 3]);
    let s = stats_of(&*b, q).await;
    assert_eq!((s.depth, s.in_flight, s.dead_letters), (0, 0, 1));
    let (dead, next) = b.list_dead_letters(q, 10, None).await.expect("list");
    assert_eq!(next, None);
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert_eq!(d.message_id, "poison");
    assert_eq!(d.body, Bytes::from("body of poison"));
    assert_eq!(d.last_error, "cannot parse (attempt 3)");
    let attempts: Vec<u32> = d.attempts.iter().map(|a| a.attempt).collect();
    assert_eq!(attempts, vec![1, 2, 3]);
    assert!(d.attempts.iter().all(|a| a.consumer_id == "worker"));
    assert_eq!(d.attempts[0].error, "cannot parse (attempt 1)");
    assert!(d.attempts[0].delivered_at <= d.attempts[2].delivered_at);
    assert!(d.dead_lettered_at >= d.enqueued_at);
    assert_empty(&*b, q).await;
}
