//! Leases: lapsing, release, extension, and receipts that are no longer valid.

use super::fixture::{LONG_LEASE, NO_WAIT, msg, open, receive_n, stats_of, submit_ok};
use super::{BackendFactory, test_config};
use crate::{NackOutcome, QueueConfig, QueueError};
use std::time::{Duration, Instant};

/// A lapsed lease makes the message ready again with attempt 2; its history says so.
pub async fn lease_lapse_redelivers_with_next_attempt(factory: &dyn BackendFactory) {
    let b = open(factory, test_config()).await;
    let q = "lapse";
    submit_ok(&*b, q, vec![msg("x")]).await;
    let first = b
        .receive(q, "slow", 1, Duration::from_millis(600), NO_WAIT)
        .await
        .expect("receive");
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].attempt, 1);
    // Not ready while the lease is live.
    let none = b
        .receive(q, "fast", 1, LONG_LEASE, Duration::from_millis(100))
        .await
        .expect("receive");
    assert!(none.is_empty(), "leased message was handed out twice");
    let started = Instant::now();
    let second = receive_n(&*b, q, "fast", 1, LONG_LEASE, Duration::from_secs(5)).await;
    assert_eq!(
        second.len(),
        1,
        "message not redelivered after its lease lapsed"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(second[0].message_id, "x");
    assert_eq!(second[0].attempt, 2);
    assert_ne!(second[0].receipt, first[0].receipt);
    assert!(matches!(
        b.ack(&first[0].receipt, None).await,
        Err(QueueError::LeaseLost(_))
    ));
    // Fail it for good to read its history.
    let mut receipt = second[0].receipt.clone();
    loop {
        match b
            .nack(&receipt, "boom", Some(Duration::ZERO))
            .await
            .expect("nack")
        {
            NackOutcome::DeadLettered => break,
            NackOutcome::Retry { .. } => {
                let again = receive_n(&*b, q, "fast", 1, LONG_LEASE, Duration::from_secs(5)).await;
                receipt = again[0].receipt.clone();
            }
        }
    }
    let (dead, _) = b.list_dead_letters(q, 10, None).await.expect("list");
    assert_eq!(dead.len(), 1);
    let h = &dead[0].attempts;
    assert_eq!(h.len(), 3);
    assert_eq!(h[0].attempt, 1);
    assert_eq!(h[0].consumer_id, "slow");
    assert_eq!(h[0].error, "lease expired");
    assert_eq!(h[1].consumer_id, "fast");
    assert_eq!(h[2].attempt, 3);
    assert_eq!(dead[0].last_error, "boom");
}

/// `release` makes leased messages ready at once, with the same attempt number; stale receipts
/// are ignored.
pub async fn release_hands_back_without_a_failed_attempt(factory: &dyn BackendFactory) {
    let config = test_config().with_queue(
        "release",
        QueueConfig {
            max_attempts: 1,
            ..test_config().defaults
        },
    );
    let b = open(factory, config).await;
    let q = "release";
    submit_ok(&*b, q, vec![msg("r1"), msg("r2")]).await;
    let first = receive_n(&*b, q, "gone", 2, LONG_LEASE, Duration::from_secs(5)).await;
    assert_eq!(first.len(), 2);
    assert_eq!(stats_of(&*b, q).await.in_flight, 2);
    // A waiting consumer gets the messages as soon as they are released.
    let waiter = {
        let b = b.clone();
        tokio::spawn(async move {
            receive_n(&*b, q, "next", 2, LONG_LEASE, Duration::from_secs(5)).await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let receipts: Vec<String> = first.iter().map(|m| m.receipt.clone()).collect();
    let started = Instant::now();
    assert_eq!(b.release(receipts.clone()).await.expect("release"), 2);
    let second = waiter.await.expect("waiter");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "released messages were not handed out promptly"
    );
    assert_eq!(second.len(), 2);
    for m in &second {
        // With max_attempts 1 a failed attempt would have dead-lettered it instead.
        assert_eq!(m.attempt, 1, "a release counted as a failed attempt");
    }
    // The old receipts are stale now: releasing them again does nothing, acking them fails.
    assert_eq!(b.release(receipts).await.expect("release"), 0);
    assert_eq!(
        b.release(vec!["not a receipt".into()])
            .await
            .expect("release"),
        0
    );
    assert!(matches!(
        b.ack(&first[0].receipt, None).await,
        Err(QueueError::LeaseLost(_))
    ));
    for m in &second {
        b.ack(&m.receipt, None).await.expect("ack");
    }
    let s = stats_of(&*b, q).await;
    assert_eq!((s.depth, s.in_flight, s.dead_letters), (0, 0, 0));
}

/// Settled or lapsed receipts fail with `LeaseLost`; garbage receipts are invalid.
pub async fn stale_receipt_is_lease_lost(factory: &dyn BackendFactory) {
    let b = open(factory, test_config()).await;
    let q = "stale";
    submit_ok(&*b, q, vec![msg("s1"), msg("s2")]).await;
    let got = receive_n(&*b, q, "c", 2, LONG_LEASE, Duration::from_secs(5)).await;
    b.ack(&got[0].receipt, None).await.expect("ack");
    assert!(matches!(
        b.ack(&got[0].receipt, None).await,
        Err(QueueError::LeaseLost(_))
    ));
    assert!(matches!(
        b.nack(&got[0].receipt, "e", None).await,
        Err(QueueError::LeaseLost(_))
    ));
    assert!(matches!(
        b.extend(&got[0].receipt, LONG_LEASE).await,
        Err(QueueError::LeaseLost(_))
    ));
    b.nack(&got[1].receipt, "e", Some(Duration::ZERO))
        .await
        .expect("nack");
    assert!(matches!(
        b.ack(&got[1].receipt, None).await,
        Err(QueueError::LeaseLost(_))
    ));
    let again = receive_n(&*b, q, "c", 1, LONG_LEASE, Duration::from_secs(5)).await;
    b.ack(&again[0].receipt, None)
        .await
        .expect("ack with the fresh receipt");
    let bad = b.ack("not-a-receipt", None).await;
    assert!(
        matches!(
            bad,
            Err(QueueError::InvalidArgument(_)) | Err(QueueError::LeaseLost(_))
        ),
        "{bad:?}"
    );
}

/// Extending a lease keeps the message from being redelivered past the original lease.
pub async fn extend_keeps_the_lease(factory: &dyn BackendFactory) {
    let b = open(factory, test_config()).await;
    let q = "extend";
    submit_ok(&*b, q, vec![msg("e")]).await;
    let got = b
        .receive(
            q,
            "c",
            1,
            Duration::from_millis(500),
            Duration::from_secs(5),
        )
        .await
        .expect("receive");
    let new_expiry = b
        .extend(&got[0].receipt, Duration::from_secs(10))
        .await
        .expect("extend");
    assert!(new_expiry > got[0].lease_expires_at);
    let other = b
        .receive(q, "other", 1, LONG_LEASE, Duration::from_millis(900))
        .await
        .expect("receive");
    assert!(other.is_empty(), "extended lease was not honoured");
    b.ack(&got[0].receipt, None)
        .await
        .expect("ack after extend");
}

/// A consumer that goes away holding a message fails that attempt: the next delivery, at once,
/// carries the next attempt number, and after `max_attempts` such deaths the message is a dead
/// letter whose history names each one.
pub async fn abandon_counts_a_failed_attempt_and_dead_letters_at_the_last(
    factory: &dyn BackendFactory,
) {
    let config = test_config().with_queue(
        "abandon",
        QueueConfig {
            max_attempts: 3,
            // Far longer than the test: only an immediate redelivery is seen.
            backoff_base: Duration::from_secs(60),
            backoff_max: Duration::from_secs(60),
            ..test_config().defaults
        },
    );
    let b = open(factory, config).await;
    let q = "abandon";
    submit_ok(&*b, q, vec![msg("crash")]).await;
    for attempt in 1..=3 {
        let consumer = format!("doomed-{attempt}");
        let got = receive_n(&*b, q, &consumer, 1, LONG_LEASE, Duration::from_secs(5)).await;
        assert_eq!(got[0].attempt, attempt);
        let receipts = vec![got[0].receipt.clone()];
        assert_eq!(
            b.abandon(receipts.clone(), "consumer went away")
                .await
                .expect("abandon"),
            1
        );
        // Abandoning twice, or garbage, does nothing.
        assert_eq!(
            b.abandon(receipts, "consumer went away")
                .await
                .expect("abandon"),
            0
        );
    }
    assert_eq!(
        b.abandon(vec!["not a receipt".into()], "consumer went away")
            .await
            .expect("abandon"),
        0
    );
    let s = stats_of(&*b, q).await;
    assert_eq!((s.depth, s.in_flight, s.dead_letters), (0, 0, 1), "{s:?}");
    let (dead, _) = b.list_dead_letters(q, 10, None).await.expect("list");
    assert_eq!(dead[0].last_error, "consumer went away");
    let history: Vec<(u32, &str, &str)> = dead[0]
        .attempts
        .iter()
        .map(|a| (a.attempt, a.consumer_id.as_str(), a.error.as_str()))
        .collect();
    assert_eq!(
        history,
        [
            (1, "doomed-1", "consumer went away"),
            (2, "doomed-2", "consumer went away"),
            (3, "doomed-3", "consumer went away"),
        ]
    );
}
