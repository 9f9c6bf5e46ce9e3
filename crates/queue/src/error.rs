//! The error type shared by every backend.

/// Errors of queue operations, shaped for a clean mapping onto gRPC status codes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// The named queue, message or result does not exist (gRPC `NOT_FOUND`).
    #[error("not found: {0}")]
    NotFound(String),
    /// The receipt's lease lapsed or was already settled (gRPC `FAILED_PRECONDITION`).
    #[error("lease lost: {0}")]
    LeaseLost(String),
    /// The request is malformed (gRPC `INVALID_ARGUMENT`).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The storage failed; the message names the path and the failed operation
    /// (gRPC `UNAVAILABLE` or `INTERNAL`).
    #[error("storage error: {0}")]
    Storage(String),
    /// The storage is out of space (disk or quota full); the batch was not acknowledged (a
    /// failed commit may still have stored part of it, so resend with idempotency keys). Reads, and
    /// writes once space is freed, keep working (gRPC `RESOURCE_EXHAUSTED`).
    #[error("storage full: {0}")]
    StorageFull(String),
    /// The backend has been shut down (gRPC `UNAVAILABLE`).
    #[error("queue backend is closed")]
    Closed,
}
