//! Restarts: what a reopened backend keeps (messages, results, dedup keys, the retry schedule).

use super::fixture::{
    LONG_LEASE, NO_WAIT, assert_empty, msg, open, receive_n, stats_of, submit_ok,
};
use super::{BackendFactory, test_config};
use crate::SubmitFate;
use bytes::Bytes;
use std::time::Duration;

/// After drop + reopen, un-acked (including leased) and dead messages remain; acked ones don't.
pub async fn restart_keeps_unacked_and_forgets_acked(factory: &dyn BackendFactory) {
    let q = "restart";
    let mut expected: Vec<String> = (0..10).map(|i| format!("r{i}")).collect();
    {
        let b = open(factory, test_config()).await;
        submit_ok(&*b, q, expected.iter().map(|id| msg(id)).collect()).await;
        let got = receive_n(&*b, q, "c", 5, LONG_LEASE, Duration::from_secs(5)).await;
        assert_eq!(got.len(), 5);
        for m in &got[..3] {
            b.ack(&m.receipt, None).await.expect("ack");
            expected.retain(|id| *id != m.message_id);
        }
        // got[3] and got[4] stay leased across the restart.
        let rq = "restart-results";
        submit_ok(
            &*b,
            rq,
            vec![msg("r-result").with_correlation_id("restart-corr")],
        )
        .await;
        let r = receive_n(&*b, rq, "c", 1, LONG_LEASE, Duration::from_secs(5)).await;
        b.ack(&r[0].receipt, Some(Bytes::from_static(b"kept")))
            .await
            .expect("ack");
    }
    let b = open(factory, test_config()).await;
    let s = stats_of(&*b, q).await;
    assert_eq!((s.depth, s.in_flight), (7, 0), "{s:?}");
    let got = receive_n(&*b, q, "c", 7, LONG_LEASE, Duration::from_secs(5)).await;
    let mut ids: Vec<String> = got.iter().map(|m| m.message_id.clone()).collect();
    ids.sort();
    expected.sort();
    assert_eq!(ids, expected);
    assert_eq!(stats_of(&*b, "restart-results").await.depth, 0);
    assert_eq!(
        b.get_result("restart-corr").await.expect("get"),
        Some(Bytes::from_static(b"kept"))
    );
    for m in got {
        b.ack(&m.receipt, None).await.expect("ack");
    }
    assert_empty(&*b, q).await;
    // Idempotency keys survive a restart too.
    submit_ok(&*b, q, vec![msg("k").with_idempotency_key("restart-key")]).await;
    drop(b);
    let b = open(factory, test_config()).await;
    let fates = b
        .submit(q, vec![msg("k2").with_idempotency_key("restart-key")])
        .await
        .expect("submit");
    assert_eq!(fates, vec![SubmitFate::Duplicate { id: "k".into() }]);
}

/// After a restart, a nacked message still waits for its retry time, keeps its attempt count,
/// and is handed out once: not by both the retry schedule and the pass over recovered messages.
pub async fn restart_keeps_retry_schedule_and_attempts(factory: &dyn BackendFactory) {
    let q = "restart-retry";
    let ids = ["first", "soon", "later", "lapsed"];
    {
        let b = open(factory, test_config()).await;
        submit_ok(&*b, q, ids.iter().map(|id| msg(id)).collect()).await;
        let got = receive_n(&*b, q, "c", 4, LONG_LEASE, Duration::from_secs(5)).await;
        assert_eq!(got.len(), 4);
        let by_id = |id: &str| {
            got.iter()
                .find(|m| m.message_id == id)
                .map(|m| m.receipt.clone())
                .expect("delivered")
        };
        // "first" stays leased across the restart; "lapsed" fails at once (no delay).
        for (id, delay) in [
            ("soon", Duration::from_millis(300)),
            ("later", Duration::from_secs(60)),
            ("lapsed", Duration::ZERO),
        ] {
            b.nack(&by_id(id), "failed before restart", Some(delay))
                .await
                .expect("nack");
        }
    }
    let b = open(factory, test_config()).await;
    let s = stats_of(&*b, q).await;
    assert_eq!((s.depth, s.in_flight), (4, 0), "{s:?}");
    // Once "soon" is due, everything but "later" is ready: taken one receive of one first,
    // then the rest (a store may hand out due retries and recovered messages in any order).
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut got = b
        .receive(q, "c", 1, LONG_LEASE, NO_WAIT)
        .await
        .expect("receive");
    assert_eq!(got.len(), 1);
    got.extend(
        b.receive(q, "c", 10, LONG_LEASE, NO_WAIT)
            .await
            .expect("receive"),
    );
    let mut ready: Vec<(String, u32)> = got
        .iter()
        .map(|m| (m.message_id.clone(), m.attempt))
        .collect();
    ready.sort();
    let expected = [("first", 1), ("lapsed", 2), ("soon", 2)];
    let expected: Vec<(String, u32)> = expected.iter().map(|&(i, a)| (i.into(), a)).collect();
    assert_eq!(ready, expected);
    let none = b
        .receive(q, "c", 10, LONG_LEASE, Duration::from_millis(200))
        .await
        .expect("receive");
    assert!(none.is_empty(), "delivered twice or too early: {none:?}");
    for m in &got {
        b.ack(&m.receipt, None).await.expect("ack");
    }
    let s = stats_of(&*b, q).await;
    assert_eq!(
        (s.depth, s.in_flight),
        (1, 0),
        "\"later\" still waits: {s:?}"
    );
}
