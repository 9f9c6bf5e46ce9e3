//! Submitting: every message delivered exactly once, idempotency keys, and invalid input.

use super::fixture::{
    LONG_LEASE, NO_WAIT, assert_empty, msg, open, receive_n, stats_of, submit_ok,
};
use super::{BackendFactory, test_config};
use crate::{QueueConfig, QueueError, SubmitFate};
use bytes::Bytes;
use std::collections::HashSet;
use std::time::{Duration, SystemTime};

/// Submit N from several tasks, receive N, ack N: each message exactly once, nothing left.
pub async fn submit_receive_ack_exactly_once(factory: &dyn BackendFactory) {
    let b = open(factory, test_config()).await;
    let q = "exactly-once";
    let mut tasks = Vec::new();
    for t in 0..4 {
        let b = b.clone();
        tasks.push(tokio::spawn(async move {
            for chunk in 0..5 {
                let batch = (0..50)
                    .map(|i| msg(&format!("m-{t}-{chunk}-{i}")))
                    .collect();
                submit_ok(&*b, q, batch).await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("submitter");
    }
    assert_eq!(stats_of(&*b, q).await.depth, 1000);
    let got = receive_n(&*b, q, "c1", 1000, LONG_LEASE, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1000);
    let ids: HashSet<&str> = got.iter().map(|m| m.message_id.as_str()).collect();
    assert_eq!(ids.len(), 1000, "a message was delivered twice");
    for m in &got {
        assert_eq!(m.attempt, 1);
        assert_eq!(m.body, Bytes::from(format!("body of {}", m.message_id)));
        assert!(m.lease_expires_at > SystemTime::now());
    }
    let s = stats_of(&*b, q).await;
    assert_eq!((s.depth, s.in_flight), (0, 1000));
    for m in &got {
        b.ack(&m.receipt, None).await.expect("ack");
    }
    let s = stats_of(&*b, q).await;
    assert_eq!((s.depth, s.in_flight, s.dead_letters), (0, 0, 0));
    assert_eq!(s.oldest_age, None);
    assert_empty(&*b, q).await;
}

/// A second submit with the same idempotency key (within the window) is a `Duplicate`.
pub async fn idempotency_duplicates_are_not_enqueued(factory: &dyn BackendFactory) {
    let mut config = test_config();
    config = config.with_queue(
        "short-window",
        QueueConfig {
            dedup_window: Duration::from_millis(300),
            ..test_config().defaults
        },
    );
    let b = open(factory, config).await;
    let q = "dedup";
    let fates = b
        .submit(
            q,
            vec![
                msg("a").with_idempotency_key("k1"),
                msg("b").with_idempotency_key("k1"),
                msg("c").with_idempotency_key("k2"),
                msg("d"),
            ],
        )
        .await
        .expect("submit");
    assert_eq!(
        fates,
        vec![
            SubmitFate::Accepted { id: "a".into() },
            SubmitFate::Duplicate { id: "a".into() },
            SubmitFate::Accepted { id: "c".into() },
            SubmitFate::Accepted { id: "d".into() },
        ]
    );
    let again = b
        .submit(q, vec![msg("e").with_idempotency_key("k2")])
        .await
        .expect("submit");
    assert_eq!(again, vec![SubmitFate::Duplicate { id: "c".into() }]);
    // Keys are per queue.
    submit_ok(
        &*b,
        "dedup-other",
        vec![msg("f").with_idempotency_key("k1")],
    )
    .await;
    assert_eq!(stats_of(&*b, q).await.depth, 3);
    // The duplicate suppression outlives the ack.
    let got = receive_n(&*b, q, "c", 3, LONG_LEASE, Duration::from_secs(5)).await;
    for m in &got {
        b.ack(&m.receipt, None).await.expect("ack");
    }
    let after_ack = b
        .submit(q, vec![msg("g").with_idempotency_key("k1")])
        .await
        .expect("submit");
    assert_eq!(after_ack, vec![SubmitFate::Duplicate { id: "a".into() }]);
    // After the window the key is free again.
    let w = "short-window";
    submit_ok(&*b, w, vec![msg("w1").with_idempotency_key("k")]).await;
    let dup = b
        .submit(w, vec![msg("w2").with_idempotency_key("k")])
        .await
        .expect("submit");
    assert_eq!(dup, vec![SubmitFate::Duplicate { id: "w1".into() }]);
    tokio::time::sleep(Duration::from_millis(400)).await;
    submit_ok(&*b, w, vec![msg("w3").with_idempotency_key("k")]).await;
    assert_eq!(stats_of(&*b, w).await.depth, 2);
}

/// Bad arguments fail with `InvalidArgument`, bad messages are `Rejected` individually.
pub async fn invalid_arguments_are_rejected(factory: &dyn BackendFactory) {
    let b = open(factory, test_config()).await;
    assert!(matches!(
        b.submit("", vec![msg("a")]).await,
        Err(QueueError::InvalidArgument(_))
    ));
    assert!(matches!(
        b.receive("q", "c", 0, LONG_LEASE, NO_WAIT).await,
        Err(QueueError::InvalidArgument(_))
    ));
    assert!(matches!(
        b.receive("q", "c", 1, Duration::ZERO, NO_WAIT).await,
        Err(QueueError::InvalidArgument(_))
    ));
    let fates = b
        .submit("q", vec![msg(""), msg("ok")])
        .await
        .expect("submit");
    assert!(matches!(fates[0], SubmitFate::Rejected { .. }), "{fates:?}");
    assert_eq!(fates[1], SubmitFate::Accepted { id: "ok".into() });
    assert_eq!(stats_of(&*b, "q").await.depth, 1);
    assert_eq!(
        b.submit("q", Vec::new()).await.expect("empty submit"),
        Vec::new()
    );
}
