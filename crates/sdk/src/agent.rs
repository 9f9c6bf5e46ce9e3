//! Writing an agent: the [`Agent`] trait, and [`AgentHost`], which serves an
//! `Agent` as `agentmesh.v1.AgentService`.

use std::{pin::Pin, sync::Arc};

use agentmesh_proto::v1::{
    ConverseRequest, ConverseResponse, Envelope, InvokeRequest, InvokeResponse, StreamEventKind,
    StreamRequest, StreamResponse, agent_service_server::AgentService,
};
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::{client::MeshClient, context::Context};

/// Events a streaming handler sends before its final result.
#[derive(Debug, Clone)]
pub struct StreamSink {
    events: mpsc::Sender<Result<StreamResponse, Status>>,
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
    async fn converse(
        &self,
        ctx: Context,
        conversation: crate::Conversation,
    ) -> Result<(), Status> {
        let _ = (ctx, conversation);
        Err(Status::unimplemented("this agent does not converse"))
    }
}

/// Serves an [`Agent`] as `agentmesh.v1.AgentService`.
#[derive(Debug)]
pub struct AgentHost<A> {
    agent: Arc<A>,
    name: String,
    client: Option<MeshClient>,
}

impl<A> Clone for AgentHost<A> {
    fn clone(&self) -> Self {
        Self {
            agent: Arc::clone(&self.agent),
            name: self.name.clone(),
            client: self.client.clone(),
        }
    }
}

impl<A: Agent> AgentHost<A> {
    /// Hosts `agent` under `name`; handlers get `client` for outgoing calls.
    pub fn new(agent: Arc<A>, name: impl Into<String>, client: Option<MeshClient>) -> Self {
        Self {
            agent,
            name: name.into(),
            client,
        }
    }

    fn context<T>(&self, request: &Request<T>, envelope: &Envelope) -> Context {
        Context::from_metadata(request.metadata(), &envelope.id, self.client.clone())
    }
}

pub(crate) type EventStreamOf<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl<A: Agent> AgentService for AgentHost<A> {
    async fn invoke(
        &self,
        request: Request<InvokeRequest>,
    ) -> Result<Response<InvokeResponse>, Status> {
        let envelope = request.get_ref().envelope.clone().unwrap_or_default();
        let ctx = self.context(&request, &envelope);
        let mut reply = ctx
            .clone()
            .scope(self.agent.invoke(ctx, envelope.clone()))
            .await?;
        reply.answer_to(&envelope, &self.name);
        Ok(Response::new(InvokeResponse {
            envelope: Some(reply),
        }))
    }

    type StreamStream = EventStreamOf<StreamResponse>;

    async fn stream(
        &self,
        request: Request<StreamRequest>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let envelope = request.get_ref().envelope.clone().unwrap_or_default();
        let ctx = self.context(&request, &envelope);
        // A small buffer: a slow reader soon blocks the handler's sends.
        let (tx, rx) = mpsc::channel(8);
        let sink = StreamSink { events: tx.clone() };
        let host = self.clone();
        let cancel = ctx.cancellation();
        tokio::spawn(async move {
            let handler = ctx
                .clone()
                .scope(host.agent.stream(ctx, envelope.clone(), sink));
            let outcome = tokio::select! {
                outcome = handler => outcome,
                _ = tx.closed() => {
                    // The caller went away: dropping the handler cancels it.
                    cancel.cancel();
                    return;
                }
            };
            let last = match outcome {
                Ok(mut result) => {
                    result.answer_to(&envelope, &host.name);
                    Ok(StreamResponse {
                        kind: StreamEventKind::Result as i32,
                        envelope: Some(result),
                        ..Default::default()
                    })
                }
                Err(status) => Err(status),
            };
            let _ = tx.send(last).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type ConverseStream = EventStreamOf<ConverseResponse>;

    async fn converse(
        &self,
        request: Request<Streaming<ConverseRequest>>,
    ) -> Result<Response<Self::ConverseStream>, Status> {
        crate::conversation::host(self.agent.clone(), self.client.clone(), request).await
    }
}
