//! Resilience primitives shared by the node's router, the SDK's client and the queue:
//! a [`CircuitBreaker`] per destination, [`Backoff`] with full jitter (and its stateless
//! form [`full_jitter_delay`], which the queue uses to schedule nacked messages), and a
//! [`RetryBudget`] that caps how much extra load retries may add.

mod backoff;
mod breaker;
mod budget;

pub use backoff::{Backoff, full_jitter_delay};
pub use breaker::{BreakerConfig, BreakerOpen, BreakerState, CircuitBreaker};
pub use budget::RetryBudget;

/// Whether a status says the destination (not the request) failed, so it
/// counts against a circuit breaker.
pub fn is_destination_failure(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Internal
            | tonic::Code::DeadlineExceeded
            | tonic::Code::DataLoss
    )
}
