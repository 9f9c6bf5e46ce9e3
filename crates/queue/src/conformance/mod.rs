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
//!
//! The tests, one public function each, by topic:
//!
//! * `submit`: exactly-once delivery of what was submitted, idempotency keys, invalid input;
//! * `receive`: competing consumers, long polls woken by a submit;
//! * `lease`: lapsed leases, release, abandon, extension, stale receipts;
//! * `ack`: `ack_many`, results stored, awaited and forwarded to `reply_to`;
//! * `retry`: nack delays and backoff, dead-lettering after the last attempt;
//! * `dead_letters`: paging, redrive and purge;
//! * `restart`: what a reopened backend keeps;
//! * `stats`: per-queue counters;
//! * `fixture`: the steps they share (not public).

mod ack;
mod dead_letters;
mod fixture;
mod lease;
mod receive;
mod restart;
mod retry;
mod stats;
mod submit;

pub use ack::{ack_many_settles_each_receipt, ack_result_is_stored_awaited_and_replied};
pub use dead_letters::dead_letters_list_redrive_purge;
pub use lease::{
    abandon_counts_a_failed_attempt_and_dead_letters_at_the_last, extend_keeps_the_lease,
    lease_lapse_redelivers_with_next_attempt, release_hands_back_without_a_failed_attempt,
    stale_receipt_is_lease_lost,
};
pub use receive::{competing_consumers_get_disjoint_messages, long_poll_wakes_on_submit};
pub use restart::{
    restart_keeps_retry_schedule_and_attempts, restart_keeps_unacked_and_forgets_acked,
};
pub use retry::{
    lease_expiry_at_max_attempts_dead_letters, nack_default_backoff_stays_within_cap,
    nack_redelivers_after_delay, poison_is_dead_lettered_while_others_flow,
};
pub use stats::stats_are_sorted_and_counted;
pub use submit::{
    idempotency_duplicates_are_not_enqueued, invalid_arguments_are_rejected,
    submit_receive_ack_exactly_once,
};

use crate::{BackendConfig, QueueBackend, QueueConfig, QueueError};
use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;

/// Opens backends for the suite.
#[async_trait]
pub trait BackendFactory: Send + Sync {
    /// Opens a backend over this factory's storage (the same storage on every call).
    async fn open(&self, config: BackendConfig) -> Result<Arc<dyn QueueBackend>, QueueError>;
}

/// Generates one `#[tokio::test]` per conformance function; `$factory` is evaluated per test and
/// must give a fresh [`BackendFactory`]. The calling crate needs `tokio` with `macros` and
/// `rt-multi-thread`.
///
/// `conformance_suite!(ignore = "reason"; $factory)` marks every test `#[ignore = "reason"]`,
/// for backends that need a service the default test run does not have (run them with
/// `--run-ignored all`).
#[macro_export]
macro_rules! conformance_suite {
    (ignore = $reason:literal; $factory:expr) => {
        $crate::conformance_suite!(@all [#[ignore = $reason]] $factory);
    };
    ($factory:expr) => {
        $crate::conformance_suite!(@all [] $factory);
    };
    (@all $attrs:tt $factory:expr) => {
        $crate::conformance_suite!(@tests $attrs $factory;
            submit_receive_ack_exactly_once,
            idempotency_duplicates_are_not_enqueued,
            competing_consumers_get_disjoint_messages,
            lease_lapse_redelivers_with_next_attempt,
            release_hands_back_without_a_failed_attempt,
            abandon_counts_a_failed_attempt_and_dead_letters_at_the_last,
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
    (@tests $attrs:tt $factory:expr; $($name:ident),* $(,)?) => {
        $( $crate::conformance_suite!(@test $attrs $factory; $name); )*
    };
    (@test [$(#[$attr:meta])*] $factory:expr; $name:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        $(#[$attr])*
        async fn $name() {
            let factory = $factory;
            $crate::conformance::$name(&factory).await;
        }
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
