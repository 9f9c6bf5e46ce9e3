//! The context of the call an agent is handling. Outgoing calls made while
//! handling it inherit its correlation id and a strictly shorter deadline,
//! without the author passing anything along.

use std::time::{Duration, Instant};

use agentmesh_proto::{CallContext, DeadlinePolicy, v1::Envelope};
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataMap;

use crate::{
    call_scope::{self, CallScope},
    client::MeshClient,
};

tokio::task_local! {
    static CURRENT: Context;
}

/// How an agent reads its callers' timeouts: any length is honoured (the node caps what it
/// forwards); without one the call has no deadline.
const AGENT_DEADLINES: DeadlinePolicy = DeadlinePolicy {
    default_timeout: Duration::from_secs(30),
    max_timeout: Duration::MAX,
};

/// What a handler knows about the call it serves.
#[derive(Debug, Clone)]
pub struct Context {
    call: CallContext,
    message_id: String,
    cancelled: CancellationToken,
    client: Option<MeshClient>,
}

impl Context {
    /// The context of a call that arrived with `metadata`, carrying the message `message_id`.
    pub(crate) fn from_metadata(
        metadata: &MetadataMap,
        message_id: &str,
        client: Option<MeshClient>,
    ) -> Self {
        Self::new(
            CallContext::from_metadata(metadata, &AGENT_DEADLINES)
                .with_forwarded_principal(metadata),
            message_id,
            client,
        )
    }

    /// The context of handling a queued `envelope`: its chain, trace and deadline, if any.
    pub(crate) fn from_envelope(envelope: &Envelope, client: Option<MeshClient>) -> Self {
        Self::new(
            CallContext::from_envelope(envelope, AGENT_DEADLINES.default_timeout),
            &envelope.id,
            client,
        )
    }

    fn new(call: CallContext, message_id: &str, client: Option<MeshClient>) -> Self {
        Self {
            call,
            message_id: message_id.to_owned(),
            cancelled: CancellationToken::new(),
            client,
        }
    }

    /// The call's context as the mesh sees it (correlation id, deadline, trace context).
    pub fn call(&self) -> &CallContext {
        &self.call
    }

    /// The caller's principal id, when the node authenticated the call (the node stamps it
    /// as `x-agentmesh-principal`, replacing anything the caller sent in that header).
    pub fn principal(&self) -> Option<&str> {
        self.call.principal.as_ref().map(|p| p.id.as_str())
    }

    /// The correlation id of the call chain.
    pub fn correlation_id(&self) -> &str {
        &self.call.correlation_id
    }

    /// Id of the message being handled (the causation id of what it sends).
    pub fn message_id(&self) -> &str {
        &self.message_id
    }

    /// The W3C traceparent of the caller, if any.
    pub fn traceparent(&self) -> &str {
        self.call.traceparent.as_deref().unwrap_or_default()
    }

    /// The absolute deadline of this call, if the caller set one.
    pub fn deadline(&self) -> Option<Instant> {
        self.call.deadline.explicit.then_some(self.call.deadline.at)
    }

    /// Time left before the deadline (`None` without a deadline).
    pub fn remaining(&self) -> Option<Duration> {
        self.deadline()
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
        let inherited = CallScope {
            call: self.call.clone(),
            message_id: self.message_id.clone(),
        };
        CURRENT
            .scope(self, call_scope::enter(inherited, future))
            .await
    }
}
