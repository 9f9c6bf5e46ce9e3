//! The core's error type, mapped once to `tonic::Status` (with google.rpc
//! details) so every face reports failures the same way.

use agentmesh_proto::ERROR_DOMAIN;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// Everything that can go wrong in the mesh's core.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// The request is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// A lease id is unknown (expired, deregistered, or the node restarted).
    #[error("lease {0} not found: it expired or the node restarted; register again")]
    LeaseNotFound(String),
    /// No live instance matches the target.
    #[error("no agent registered for target '{target}'")]
    AgentNotFound {
        /// The requested target.
        target: String,
    },
    /// Instances match the target but none accepts the payload's version.
    #[error(
        "no instance of '{target}' accepts {payload_type} version '{version}'; versions on offer: [{}]",
        offered.join(", ")
    )]
    NoCompatibleVersion {
        /// The requested target.
        target: String,
        /// The envelope's payload type.
        payload_type: String,
        /// The envelope's type version.
        version: String,
        /// Versions that matching instances accept.
        offered: Vec<String>,
    },
    /// The call's deadline ran out (at this hop or further down).
    #[error("{0}")]
    DeadlineExceeded(String),
    /// Every usable instance's circuit breaker is open.
    #[error(
        "circuit breaker open for {target}: failing fast; next probe in {} ms",
        retry_after.as_millis()
    )]
    BreakerOpen {
        /// The target or hop whose breaker is open.
        target: String,
        /// When the breaker will let a probe through.
        retry_after: std::time::Duration,
    },
    /// The agent could not be reached.
    #[error("{0}")]
    Unavailable(String),
    /// A stream id is unknown or its retention has passed.
    #[error("stream {0} is unknown or has expired; start a new stream")]
    StreamNotFound(String),
    /// A resume position is outside the replay window.
    #[error("{0}")]
    OutOfRange(String),
    /// The node is shutting down or overloaded.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The trace journal holds no hop of a correlation id.
    #[error("no hops recorded for correlation id {0} (never seen, or aged out of the journal)")]
    TraceNotFound(String),
    /// The operation needs something this node has turned off.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The caller's principal may not do this (see [`crate::access`]).
    #[error("permission denied: {principal} may not {action} '{resource}'")]
    PermissionDenied {
        /// The caller's principal id.
        principal: String,
        /// The action refused (`call`, `submit`, ...).
        action: &'static str,
        /// What it was refused on (agent, queue, correlation id).
        resource: String,
    },
    /// Another node's answer, passed on unchanged (a forwarded stream resume).
    #[error("{}", .0.message())]
    Forwarded(Status),
}

impl MeshError {
    fn code(&self) -> Code {
        match self {
            MeshError::InvalidArgument(_) => Code::InvalidArgument,
            MeshError::LeaseNotFound(_)
            | MeshError::AgentNotFound { .. }
            | MeshError::StreamNotFound(_)
            | MeshError::TraceNotFound(_) => Code::NotFound,
            MeshError::OutOfRange(_) => Code::OutOfRange,
            MeshError::NoCompatibleVersion { .. } | MeshError::FailedPrecondition(_) => {
                Code::FailedPrecondition
            }
            MeshError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            MeshError::Unavailable(_) | MeshError::BreakerOpen { .. } => Code::Unavailable,
            MeshError::ResourceExhausted(_) => Code::ResourceExhausted,
            MeshError::PermissionDenied { .. } => Code::PermissionDenied,
            MeshError::Forwarded(status) => status.code(),
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            MeshError::InvalidArgument(_) => "INVALID_ARGUMENT",
            MeshError::LeaseNotFound(_) => "LEASE_NOT_FOUND",
            MeshError::AgentNotFound { .. } => "AGENT_NOT_FOUND",
            MeshError::StreamNotFound(_) => "STREAM_NOT_FOUND",
            MeshError::OutOfRange(_) => "OUT_OF_REPLAY_WINDOW",
            MeshError::NoCompatibleVersion { .. } => "NO_COMPATIBLE_VERSION",
            MeshError::DeadlineExceeded(_) => "DEADLINE_EXCEEDED",
            MeshError::Unavailable(_) => "AGENT_UNAVAILABLE",
            MeshError::BreakerOpen { .. } => "CIRCUIT_OPEN",
            MeshError::ResourceExhausted(_) => "RESOURCE_EXHAUSTED",
            MeshError::TraceNotFound(_) => "TRACE_NOT_FOUND",
            MeshError::FailedPrecondition(_) => "FAILED_PRECONDITION",
            MeshError::PermissionDenied { .. } => "PERMISSION_DENIED",
            MeshError::Forwarded(_) => "FORWARDED",
        }
    }
}

impl From<MeshError> for Status {
    fn from(error: MeshError) -> Status {
        if let MeshError::Forwarded(status) = error {
            return status;
        }
        let mut metadata = std::collections::HashMap::new();
        match &error {
            MeshError::AgentNotFound { target } => {
                metadata.insert("target".to_owned(), target.clone());
            }
            MeshError::NoCompatibleVersion {
                target,
                payload_type,
                version,
                offered,
            } => {
                metadata.insert("target".to_owned(), target.clone());
                metadata.insert("type".to_owned(), payload_type.clone());
                metadata.insert("version".to_owned(), version.clone());
                metadata.insert("offered_versions".to_owned(), offered.join(","));
            }
            MeshError::BreakerOpen {
                target,
                retry_after,
            } => {
                metadata.insert("target".to_owned(), target.clone());
                metadata.insert(
                    "probe_in_ms".to_owned(),
                    retry_after.as_millis().to_string(),
                );
            }
            MeshError::PermissionDenied {
                action, resource, ..
            } => {
                metadata.insert("action".to_owned(), (*action).to_owned());
                metadata.insert("resource".to_owned(), resource.clone());
            }
            _ => {}
        }
        let mut details = ErrorDetails::with_error_info(error.reason(), ERROR_DOMAIN, metadata);
        if let MeshError::BreakerOpen { retry_after, .. } = &error {
            details.set_retry_info(Some(*retry_after));
        }
        Status::with_error_details(error.code(), error.to_string(), details)
    }
}
