//! Shared steps of the conformance tests: opening a backend, submitting, receiving until
//! enough arrived, reading one queue's stats.

use super::BackendFactory;
use crate::{BackendConfig, Leased, NewMessage, QueueBackend, QueueStats, SubmitFate};
use bytes::Bytes;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A lease that never lapses during a test.
pub(super) const LONG_LEASE: Duration = Duration::from_secs(30);
/// A receive that answers at once.
pub(super) const NO_WAIT: Duration = Duration::ZERO;

/// A backend from `factory`; a failure to open fails the test.
pub(super) async fn open(
    factory: &dyn BackendFactory,
    config: BackendConfig,
) -> Arc<dyn QueueBackend> {
    factory.open(config).await.expect("backend opens")
}

/// A message whose body names its id, so a delivery can be checked against it.
pub(super) fn msg(id: &str) -> NewMessage {
    NewMessage::new(id, Bytes::from(format!("body of {id}")))
}

/// Submits `messages`; every one must be accepted.
pub(super) async fn submit_ok(b: &dyn QueueBackend, queue: &str, messages: Vec<NewMessage>) {
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
pub(super) async fn receive_n(
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

/// The stats of `queue`, which must exist.
pub(super) async fn stats_of(b: &dyn QueueBackend, queue: &str) -> QueueStats {
    b.stats()
        .await
        .expect("stats")
        .into_iter()
        .find(|s| s.name == queue)
        .unwrap_or_else(|| panic!("no stats for queue {queue}"))
}

/// Asserts that nothing of `queue` is ready (waiting briefly for a stray delivery).
pub(super) async fn assert_empty(b: &dyn QueueBackend, queue: &str) {
    let got = b
        .receive(queue, "checker", 10, LONG_LEASE, Duration::from_millis(100))
        .await
        .expect("receive");
    assert!(got.is_empty(), "expected no ready message, got {got:?}");
}
