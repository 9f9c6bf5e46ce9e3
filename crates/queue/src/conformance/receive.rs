//! Receiving: competing consumers, and long polls that wake on a submit.

use super::fixture::{LONG_LEASE, msg, open, stats_of, submit_ok};
use super::{BackendFactory, test_config};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Several consumers receiving concurrently get disjoint sets covering every message.
pub async fn competing_consumers_get_disjoint_messages(factory: &dyn BackendFactory) {
    let b = open(factory, test_config()).await;
    let q = "competing";
    let total = 600;
    for chunk in 0..6 {
        submit_ok(
            &*b,
            q,
            (0..100).map(|i| msg(&format!("m{chunk}-{i}"))).collect(),
        )
        .await;
    }
    let mut tasks = Vec::new();
    for c in 0..4 {
        let b = b.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let got = b
                    .receive(
                        q,
                        &format!("consumer-{c}"),
                        16,
                        LONG_LEASE,
                        Duration::from_millis(200),
                    )
                    .await
                    .expect("receive");
                if got.is_empty() {
                    return mine;
                }
                tokio::task::yield_now().await;
                mine.extend(got);
            }
        }));
    }
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut all = Vec::new();
    for (c, t) in tasks.into_iter().enumerate() {
        for m in t.await.expect("consumer") {
            if let Some(other) = seen.insert(m.message_id.clone(), c) {
                panic!("{} delivered to consumers {other} and {c}", m.message_id);
            }
            all.push(m);
        }
    }
    assert_eq!(seen.len(), total);
    for m in &all {
        b.ack(&m.receipt, None).await.expect("ack");
    }
    assert_eq!(stats_of(&*b, q).await.in_flight, 0);
}

/// A waiting receive returns as soon as a message is submitted.
pub async fn long_poll_wakes_on_submit(factory: &dyn BackendFactory) {
    let b = open(factory, test_config()).await;
    let q = "long-poll";
    let rx = {
        let b = b.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let got = b
                .receive(q, "c", 10, LONG_LEASE, Duration::from_secs(10))
                .await
                .expect("receive");
            (got, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    submit_ok(&*b, q, vec![msg("late")]).await;
    let (got, waited) = rx.await.expect("receiver");
    assert_eq!(got.len(), 1);
    assert!(
        waited < Duration::from_secs(3),
        "long poll did not wake: {waited:?}"
    );
    b.ack(&got[0].receipt, None).await.expect("ack");
    // An empty wait returns after about `wait`.
    let started = Instant::now();
    let none = b
        .receive(q, "c", 10, LONG_LEASE, Duration::from_millis(200))
        .await
        .expect("receive");
    assert!(none.is_empty());
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(150) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
}
