//! Resilience primitives shared by the node's router, the SDK's client and the queue:
//! a [`CircuitBreaker`] per destination, [`Backoff`] with full jitter (and its stateless
//! form [`full_jitter_delay`], which the queue uses to schedule nacked messages), and a
//! [`RetryBudget`] that caps how much extra load retries may add; and which failures count
//! against a destination ([`counts_against_destination`]): never one the caller caused.

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

/// What tonic says when a peer answered a call with a bare HTTP status instead of a gRPC one.
const MAPPED_FROM_HTTP: &str = "grpc-status header missing, mapped from HTTP status code ";

/// The HTTP status with which a destination's transport refused the request itself, before
/// any handler saw it: 400 (malformed), 413 (body too large), 414 (path too long) or 431
/// (headers too large). These are the caller's failures, not the destination's.
pub fn request_rejection(status: &tonic::Status) -> Option<u16> {
    let code: u16 = status
        .message()
        .strip_prefix(MAPPED_FROM_HTTP)?
        .parse()
        .ok()?;
    matches!(code, 400 | 413 | 414 | 431).then_some(code)
}

/// Whether a failed call counts against its destination's circuit breaker: a destination
/// failure ([`is_destination_failure`]) that is not a refusal of the request itself
/// ([`request_rejection`]), so no caller can open a breaker with requests the destination
/// cannot accept.
pub fn counts_against_destination(status: &tonic::Status) -> bool {
    is_destination_failure(status.code()) && request_rejection(status).is_none()
}

#[cfg(test)]
mod tests {
    use tonic::{Code, Status};

    use super::*;

    #[test]
    fn refusals_of_the_request_do_not_count_against_the_destination() {
        for http in [400, 413, 414, 431] {
            let status = Status::new(Code::Unknown, format!("{MAPPED_FROM_HTTP}{http}"));
            assert_eq!(request_rejection(&status), Some(http));
            assert!(!counts_against_destination(&status), "{http}");
        }
        for status in [
            Status::new(Code::Unknown, format!("{MAPPED_FROM_HTTP}500")),
            Status::unavailable("connection refused"),
            Status::internal("handler panicked"),
        ] {
            assert!(counts_against_destination(&status), "{status:?}");
        }
        assert!(!counts_against_destination(&Status::invalid_argument(
            "bad"
        )));
    }
}
