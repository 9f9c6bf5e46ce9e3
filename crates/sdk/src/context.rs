//! The context of the call an agent is handling. Outgoing calls made while
//! handling it inherit its correlation id and a strictly shorter deadline,
//! without the author passing anything along.

use std::time::{Duration, Instant};

use agentmesh_proto::metadata::{CORRELATION_ID, GRPC_TIMEOUT, TRACEPARENT, parse_grpc_timeout};
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataMap;

use crate::client::MeshClient;

tokio::task_local! {
    static CURRENT: Context;
}

/// What a handler knows about the call it serves.
#[derive(Debug, Clone)]
pub struct Context {
    correlation_id: String,
    message_id: String,
    traceparent: String,
    deadline: Option<Instant>,
    cancelled: CancellationToken,
    client: Option<MeshClient>,
}

impl Context {
    pub(crate) fn from_metadata(
        metadata: &MetadataMap,
        message_id: &str,
        client: Option<MeshClient>,
    ) -> Self {
        let text = |key: &str| {
            metadata
                .get(key)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        let deadline = metadata
            .get(GRPC_TIMEOUT)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout)
            .map(|timeout| Instant::now() + timeout);
        Self {
            correlation_id: text(CORRELATION_ID),
            message_id: message_id.to_owned(),
            traceparent: text(TRACEPARENT),
            deadline,
            cancelled: CancellationToken::new(),
            client,
        }
    }

    /// The correlation id of the call chain.
    pub fn correlation_id(&self) -> &str {
        &self.correlation_id
    }

    /// Id of the message being handled (the causation id of what it sends).
    pub fn message_id(&self) -> &str {
        &self.message_id
    }

    /// The W3C traceparent of the caller, if any.
    pub fn traceparent(&self) -> &str {
        &self.traceparent
    }

    /// The absolute deadline of this call, if the caller set one.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Time left before the deadline (`None` without a deadline).
    pub fn remaining(&self) -> Option<Duration> {
        self.deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// Resolves when the caller has gone away (for streams and conversations).
    pub fn cancelled(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.cancelled.cancelled()
    }

    pub(crate) fn cancellation(&self) -> CancellationToken {
        self.cancelled.clone()
    }

    /// A client for calling other agents through the node; its calls inherit
    /// this context. `None` when the agent was started without a node.
    pub fn client(&self) -> Option<&MeshClient> {
        self.client.as_ref()
    }

    /// The context of the call the current task is handling, if any.
    pub fn current() -> Option<Context> {
        CURRENT.try_with(Clone::clone).ok()
    }

    /// Runs `future` with this context as the current one.
    pub async fn scope<F: Future>(self, future: F) -> F::Output {
        CURRENT.scope(self, future).await
    }
}
