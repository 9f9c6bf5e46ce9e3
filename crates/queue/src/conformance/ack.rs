//! Acks: `ack_many`, and results stored by correlation id, awaited and sent to `reply_to`.

use super::fixture::{LONG_LEASE, msg, open, receive_n, stats_of, submit_ok};
use super::{BackendFactory, test_config};
use crate::QueueError;
use bytes::Bytes;
use std::time::{Duration, Instant};

/// `ack_many` answers each receipt as `ack` would, in order, and stores results.
pub async fn ack_many_settles_each_receipt(factory: &dyn BackendFactory) {
    let b = open(factory, test_config()).await;
    let q = "ack-many";
    let m = |id: &str| msg(id).with_correlation_id(format!("corr-{id}"));
    submit_ok(&*b, q, vec![m("a1"), m("a2"), m("a3")]).await;
    let got = receive_n(&*b, q, "c", 3, LONG_LEASE, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 3);
    b.ack(&got[1].receipt, None).await.expect("ack");
    let outcomes = b
        .ack_many(vec![
            (got[0].receipt.clone(), Some(Bytes::from_static(b"r0"))),
            (got[1].receipt.clone(), None),
            ("garbage".into(), None),
            (got[2].receipt.clone(), None),
        ])
        .await
        .expect("ack_many");
    assert_eq!(outcomes.len(), 4);
    assert!(outcomes[0].is_ok(), "{outcomes:?}");
    assert!(
        matches!(outcomes[1], Err(QueueError::LeaseLost(_))),
        "{outcomes:?}"
    );
    assert!(
        matches!(outcomes[2], Err(QueueError::InvalidArgument(_))),
        "{outcomes:?}"
    );
    assert!(outcomes[3].is_ok(), "{outcomes:?}");
    let corr = format!("corr-{}", got[0].message_id);
    assert_eq!(
        b.get_result(&corr).await.expect("get_result"),
        Some(Bytes::from_static(b"r0"))
    );
    assert!(b.ack_many(Vec::new()).await.expect("empty").is_empty());
    let s = stats_of(&*b, q).await;
    assert_eq!((s.depth, s.in_flight), (0, 0));
}

/// An ack's result is stored by correlation id, wakes `wait_result`, and goes to `reply_to`.
pub async fn ack_result_is_stored_awaited_and_replied(factory: &dyn BackendFactory) {
    let b = open(factory, test_config()).await;
    let q = "requests";
    let m = msg("req-1")
        .with_correlation_id("corr-1")
        .with_reply_to("replies");
    submit_ok(&*b, q, vec![m]).await;
    assert_eq!(b.get_result("corr-1").await.expect("get"), None);
    let waiter = {
        let b = b.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let r = b.wait_result("corr-1", Duration::from_secs(10)).await;
            (r, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let got = receive_n(&*b, q, "c", 1, LONG_LEASE, Duration::from_secs(5)).await;
    assert_eq!(got[0].correlation_id, "corr-1");
    b.ack(&got[0].receipt, Some(Bytes::from_static(b"the answer")))
        .await
        .expect("ack");
    let (r, waited) = waiter.await.expect("waiter");
    assert_eq!(
        r.expect("wait_result"),
        Some(Bytes::from_static(b"the answer"))
    );
    assert!(
        waited < Duration::from_secs(5),
        "wait_result did not return promptly"
    );
    assert_eq!(
        b.get_result("corr-1").await.expect("get"),
        Some(Bytes::from_static(b"the answer"))
    );
    // Already there: returns at once.
    assert_eq!(
        b.wait_result("corr-1", Duration::from_secs(5))
            .await
            .expect("wait"),
        Some(Bytes::from_static(b"the answer"))
    );
    let reply = receive_n(
        &*b,
        "replies",
        "requester",
        1,
        LONG_LEASE,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(reply.len(), 1, "reply_to queue did not get the result");
    assert_eq!(reply[0].body, Bytes::from_static(b"the answer"));
    assert_eq!(reply[0].correlation_id, "corr-1");
    b.ack(&reply[0].receipt, None).await.expect("ack");
    // Unknown ids: None, and wait_result times out.
    assert_eq!(b.get_result("corr-none").await.expect("get"), None);
    let started = Instant::now();
    assert_eq!(
        b.wait_result("corr-none", Duration::from_millis(200))
            .await
            .expect("wait"),
        None
    );
    assert!(started.elapsed() >= Duration::from_millis(150));
    // An ack without a result stores nothing.
    submit_ok(&*b, q, vec![msg("req-2").with_correlation_id("corr-2")]).await;
    let got = receive_n(&*b, q, "c", 1, LONG_LEASE, Duration::from_secs(5)).await;
    b.ack(&got[0].receipt, None).await.expect("ack");
    assert_eq!(b.get_result("corr-2").await.expect("get"), None);
}
