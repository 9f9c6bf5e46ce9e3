//! Statistics: per-queue counters and ordering.

use super::fixture::{LONG_LEASE, msg, open, receive_n, stats_of, submit_ok};
use super::{BackendFactory, test_config};
use std::time::Duration;

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
