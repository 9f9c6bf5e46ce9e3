//! Resilience primitives shared by the node's router and the SDK's client:
//! a [`CircuitBreaker`] per destination, [`Backoff`] with full jitter, and a
//! [`RetryBudget`] that caps how much extra load retries may add.

mod backoff;
mod breaker;
mod budget;

pub use backoff::Backoff;
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
