//! Backend-agnostic conformance suite (feature `conformance`).
//!
//! Every function here checks one required behaviour against a fresh backend obtained from a
//! [`BackendFactory`] and panics on failure. Run them all as `#[tokio::test]`s with
//! [`conformance_suite!`](crate::conformance_suite):
//!
//! ```ignore
//! struct MyFactory { /* fresh storage per instance */ }
//! #[async_trait::async_trait]
//! impl agentmesh_queue::conformance::BackendFactory for MyFactory { /* ... */ }
//! agentmesh_queue::conformance_suite!(MyFactory::new());
//! ```
//!
//! The factory must hand out backends over the *same* storage on every `open` call (the restart
//! test drops the first backend and opens a second one), and fresh storage per factory instance.

use crate::{
    BackendConfig, Leased, NackOutcome, NewMessage, QueueBackend, QueueConfig, QueueError,
    QueueStats, Selection, SubmitFate,
};
use async_trait::async_trait;
use bytes::Bytes;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Opens backends for the suite.
#[async_trait]
pub trait BackendFactory: Send + Sync {
    /// Opens a backend over this factory's storage (the same storage on every call).
    async fn open(&self, config: BackendConfig) -> Result<Arc<dyn QueueBackend>, QueueError>;
}

/// Generates one `#[tokio::test]` per conformance function; `$factory` is evaluated per test and
/// must give a fresh [`BackendFactory`]. The calling crate needs `tokio` with `macros` and
/// `rt-multi-thread`.
#[macro_export]
macro_rules! conformance_suite {
    ($factory:expr) => {
        $crate::conformance_suite!(@tests $factory;
            submit_receive_ack_exactly_once,
            idempotency_duplicates_are_not_enqueued,
            competing_consumers_get_disjoint_messages,
            lease_lapse_redelivers_with_next_attempt,
            release_hands_back_without_a_failed_attempt,
            ack_many_settles_each_receipt,
            lease_expiry_at_max_attempts_dead_letters,
            nack_redelivers_after_delay,
            nack_default_backoff_stays_within_cap,
            poison_is_dead_lettered_while_others_flow,
            dead_letters_list_redrive_purge,
            ack_result_is_stored_awaited_and_replied,
            stale_receipt_is_lease_lost,
            extend_keeps_the_lease,
            long_poll_wakes_on_submit,
            restart_keeps_unacked_and_forgets_acked,
            restart_keeps_retry_schedule_and_attempts,
            invalid_arguments_are_rejected,
            stats_are_sorted_and_counted,
        );
    };
    (@tests $factory:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let factory = $factory;
                $crate::conformance::$name(&factory).await;
            }
        )*
    };
}

/// Config used by the suite: small timings so the suite runs quickly.
pub fn test_config() -> BackendConfig {
    BackendConfig::new(QueueConfig {
        max_attempts: 3,
        dedup_window: Duration::from_secs(3600),
        backoff_base: Duration::from_millis(10),
        backoff_max: Duration::from_millis(40),
        result_ttl: Duration::from_secs(3600),
    })
}

const LONG_LEASE: Duration = Duration::from_secs(30);
const NO_WAIT: Duration = Duration::ZERO;

async fn open(factory: &dyn BackendFactory, config: BackendConfig) -> Arc<dyn QueueBackend> {
    factory.open(config).await.expect("backend opens")
}

fn msg(id: &str) -> NewMessage {
    NewMessage::new(id, Bytes::from(format!("body of {id}")))
}

async fn submit_ok(b: &dyn QueueBackend, queue: &str, messages: Vec<NewMessage>) {
    let n = messages.len();
    let fates = b.submit(queue, messages).await.expect("submit");
    assert_eq!(fates.len(), n);
    for f in fates {
        assert!(
            matches!(f, SubmitFate::Accepted { .. }),
            "not accepted: {f:?}"
        );
    }
}

/// Receives until `want` messages arrived or `deadline` passed.
async fn receive_n(
    b: &dyn QueueBackend,
    queue: &str,
    consumer: &str,
    want: usize,
    lease: Duration,
    deadline: Duration,
) -> Vec<Leased> {
    let until = Instant::now() + deadline;
    let mut out = Vec::new();
    while out.len() < want {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let got = b
            .receive(
                queue,
                consumer,
                want - out.len(),
                lease,
                left.min(Duration::from_millis(500)),
            )
            .await
            .expect("receive");
        out.extend(got);
    }
    out
}

async fn stats_of(b: &dyn QueueBackend, queue: &str) -> QueueStats {
    b.stats()
        .await
        .expect("stats")
        .into_iter()
        .find(|s| s.name == queue)
        .unwrap_or_else(|| panic!("no stats for queue {queue}"))
}

async fn assert_empty(b: &dyn QueueBackend, queue: &str) {
    let got = b
        .receive(queue, "checker", 10, LONG_LEASE, Duration::from_millis(100))
        .await
        .expect("receive");
    assert!(got.is_empty(), "expected no ready message, got {got:?}");
}

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

async fn kill_all(b: &dyn QueueBackend, q: &str, n: usize) {
    let got = receive_n(b, q, "killer", n, LONG_LEASE, Duration::from_secs(5)).await;
    assert_eq!(got.len(), n);
    for m in got {
        let o = b.nack(&m.receipt, "fatal", None).await.expect("nack");
        assert_eq!(o, NackOutcome::DeadLettered);
    }
}

/// Dead letters page, redrive (fresh attempt count) and purge, by id or all.
pub async fn dead_letters_list_redrive_purge(factory: &dyn BackendFactory) {
    let config = test_config().with_queue(
        "dlq",
        QueueConfig {
            max_attempts: 1,
            ..test_config().defaults
        },
    );
    let b = open(factory, config).await;
    let q = "dlq";
    submit_ok(&*b, q, (0..5).map(|i| msg(&format!("d{i}"))).collect()).await;
    kill_all(&*b, q, 5).await;
    assert_eq!(stats_of(&*b, q).await.dead_letters, 5);

    let mut ids = Vec::new();
    let mut token: Option<String> = None;
    let mut pages = 0;
    loop {
        let (page, next) = b
            .list_dead_letters(q, 2, token.as_deref())
            .await
            .expect("list");
        pages += 1;
        assert!(page.len() <= 2);
        for d in &page {
            assert_eq!(d.last_error, "fatal");
            assert_eq!(d.attempts.len(), 1);
            ids.push(d.message_id.clone());
        }
        match next {
            Some(t) => token = Some(t),
            None => break,
        }
        assert!(pages < 10, "paging does not end");
    }
    assert_eq!(pages, 3);
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(sorted, vec!["d0", "d1", "d2", "d3", "d4"]);

    let n = b
        .redrive(
            q,
            Selection::Ids(vec!["d1".into(), "d3".into(), "nope".into()]),
        )
        .await
        .expect("redrive");
    assert_eq!(n, 2);
    let s = stats_of(&*b, q).await;
    assert_eq!((s.depth, s.dead_letters), (2, 3));
    let back = receive_n(&*b, q, "c", 2, LONG_LEASE, Duration::from_secs(5)).await;
    let mut back_ids: Vec<&str> = back.iter().map(|m| m.message_id.as_str()).collect();
    back_ids.sort();
    assert_eq!(back_ids, vec!["d1", "d3"]);
    assert!(
        back.iter().all(|m| m.attempt == 1),
        "redrive must reset attempts"
    );
    assert_eq!(
        back[0].body,
        Bytes::from(format!("body of {}", back[0].message_id))
    );
    for m in back {
        b.ack(&m.receipt, None).await.expect("ack");
    }

    assert_eq!(
        b.purge(q, Selection::Ids(vec!["d0".into()]))
            .await
            .expect("purge"),
        1
    );
    assert_eq!(stats_of(&*b, q).await.dead_letters, 2);
    assert_eq!(b.redrive(q, Selection::All).await.expect("redrive"), 2);
    kill_all(&*b, q, 2).await;
    assert_eq!(b.purge(q, Selection::All).await.expect("purge"), 2);
    let s = stats_of(&*b, q).await;
    assert_eq!((s.depth, s.in_flight, s.dead_letters), (0, 0, 0));
    let (page, next) = b.list_dead_letters(q, 10, None).await.expect("list");
    assert!(page.is_empty() && next.is_none());
    assert!(matches!(
        b.list_dead_letters("never-used", 10, None).await,
        Err(QueueError::NotFound(_))
    ));
    assert!(matches!(
        b.redrive("never-used", Selection::All).await,
        Err(QueueError::NotFound(_))
    ));
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

/// `stats` lists every queue sorted by name, with depth, in-flight, dead letters and age.
pub async fn stats_are_sorted_and_counted(factory: &dyn BackendFactory) {
    let b = open(factory, test_config()).await;
    submit_ok(&*b, "zeta", vec![msg("z1"), msg("z2"), msg("z3")]).await;
    submit_ok(&*b, "alpha", vec![msg("a1")]).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let got = receive_n(&*b, "zeta", "c", 1, LONG_LEASE, Duration::from_secs(5)).await;
    let stats = b.stats().await.expect("stats");
    let names: Vec<&str> = stats.iter().map(|s| s.name.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
    let z = stats_of(&*b, "zeta").await;
    assert_eq!((z.depth, z.in_flight, z.dead_letters), (2, 1, 0));
    let age = z.oldest_age.expect("oldest age");
    assert!(
        age >= Duration::from_millis(40) && age < Duration::from_secs(30),
        "{age:?}"
    );
    b.ack(&got[0].receipt, None).await.expect("ack");
    let a = stats_of(&*b, "alpha").await;
    assert_eq!((a.depth, a.in_flight), (1, 0));
}
