//! Writing an agent: the [`Agent`] trait (what an agent does) and [`StreamSink`] (how a
//! streaming handler sends events); [`AgentHost`](crate::AgentHost) serves it.

use agentmesh_proto::v1::{Envelope, StreamEventKind, StreamResponse};
use tokio::sync::mpsc;
use tonic::Status;

use crate::{context::Context, conversation::Conversation};

/// Events a streaming handler sends before its final result.
#[derive(Debug, Clone)]
pub struct StreamSink {
    pub(crate) events: mpsc::Sender<Result<StreamResponse, Status>>,
}

impl StreamSink {
    /// Reports progress (`fraction` from 0 to 1). Waits while the caller is
    /// slow (backpressure); fails once the caller has gone away.
    pub async fn progress(&self, fraction: f32, message: impl Into<String>) -> Result<(), Status> {
        self.send(StreamResponse {
            kind: StreamEventKind::Progress as i32,
            progress: fraction,
            message: message.into(),
            ..Default::default()
        })
        .await
    }

    /// Sends a partial result.
    pub async fn partial(&self, envelope: Envelope) -> Result<(), Status> {
        self.send(StreamResponse {
            kind: StreamEventKind::Partial as i32,
            envelope: Some(envelope),
            ..Default::default()
        })
        .await
    }

    async fn send(&self, event: StreamResponse) -> Result<(), Status> {
        self.events
            .send(Ok(event))
            .await
            .map_err(|_| Status::cancelled("the caller went away"))
    }
}

/// An agent: what it does with each interaction style. Only `invoke` is
/// required; `stream` defaults to invoking and sending the reply as the
/// result, `converse` to UNIMPLEMENTED.
#[tonic::async_trait]
pub trait Agent: Send + Sync + 'static {
    /// Handles a request/response call.
    async fn invoke(&self, ctx: Context, request: Envelope) -> Result<Envelope, Status>;

    /// Handles a streaming call: send progress and partial results through
    /// `events`, return the final result.
    async fn stream(
        &self,
        ctx: Context,
        request: Envelope,
        events: StreamSink,
    ) -> Result<Envelope, Status> {
        let _ = events;
        self.invoke(ctx, request).await
    }

    /// Handles a conversation: read the peer's messages from
    /// `conversation`, send any number back.
    async fn converse(&self, ctx: Context, conversation: Conversation) -> Result<(), Status> {
        let _ = (ctx, conversation);
        Err(Status::unimplemented("this agent does not converse"))
    }
}
