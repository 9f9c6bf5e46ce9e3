//! [`AgentHost`]: an [`Agent`] served as `agentmesh.v1.AgentService`. Each call gets its
//! [`Context`] (from the call's metadata) and its reply is stamped as the answer to the
//! request; streams and conversations run the handler on a task of its own, cancelled when
//! the caller goes away.

use std::{
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant},
};

use agentmesh_proto::v1::{
    ConverseRequest, ConverseResponse, Envelope, InvokeRequest, InvokeResponse, StreamEventKind,
    StreamRequest, StreamResponse, agent_service_server::AgentService, converse_request,
    converse_response,
};
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::{
    agent::{Agent, StreamSink},
    client::MeshClient,
    context::Context,
    conversation::{Conversation, DEFAULT_HEARTBEAT, MISSED_HEARTBEATS, heartbeat},
};

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
            .with_peer_certificates(request.peer_certs())
    }
}

type EventStreamOf<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

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
        converse(self.agent.clone(), self.client.clone(), request).await
    }
}

/// Serves one `Converse` call with `agent`.
async fn converse<A: Agent>(
    agent: Arc<A>,
    client: Option<MeshClient>,
    request: Request<Streaming<ConverseRequest>>,
) -> Result<Response<EventStreamOf<ConverseResponse>>, Status> {
    let ctx = Context::from_metadata(request.metadata(), "", client)
        .with_peer_certificates(request.peer_certs());
    let mut incoming = request.into_inner();
    let (inbound_tx, inbound_rx) = mpsc::channel(16);
    let (outbound_tx, mut outbound_rx) = mpsc::channel(16);
    let (frames, frames_rx) = mpsc::channel(16);
    let cancel = ctx.cancellation();
    let handler = tokio::spawn({
        let ctx = ctx.clone();
        ctx.clone().scope(async move {
            agent
                .converse(ctx, Conversation::new(inbound_rx, outbound_tx))
                .await
        })
    });
    tokio::spawn(async move {
        let abort = handler.abort_handle();
        let mut interval = DEFAULT_HEARTBEAT;
        let mut last_heard = Instant::now();
        let mut last_sent = Instant::now();
        let mut inbound = Some(inbound_tx);
        let send = |frame: converse_response::Frame| {
            let frames = frames.clone();
            async move {
                frames
                    .send(Ok(ConverseResponse { frame: Some(frame) }))
                    .await
                    .is_ok()
            }
        };
        loop {
            let silence_limit = last_heard + interval * MISSED_HEARTBEATS;
            let next_beat = last_sent + interval;
            tokio::select! {
                frame = incoming.message(), if inbound.is_some() => match frame {
                    Ok(Some(request)) => {
                        last_heard = Instant::now();
                        match request.frame {
                            Some(converse_request::Frame::Open(open)) => {
                                if let Some(d) = open.heartbeat_interval.and_then(|d| Duration::try_from(d).ok()) {
                                    interval = d.max(Duration::from_millis(10));
                                }
                            }
                            Some(converse_request::Frame::Envelope(envelope)) => {
                                let sender = inbound.as_ref().expect("guarded by the select");
                                if sender.send(envelope).await.is_err() {
                                    // The handler stopped reading; keep the call open for its replies.
                                    inbound = None;
                                }
                            }
                            Some(converse_request::Frame::Heartbeat(_)) | None => {}
                        }
                    }
                    // The peer half-closed: the handler sees the end of its inbound stream.
                    Ok(None) => inbound = None,
                    Err(_) => {
                        cancel.cancel();
                        abort.abort();
                        return;
                    }
                },
                _ = tokio::time::sleep_until(silence_limit.into()), if inbound.is_some() => {
                    let _ = frames.send(Err(Status::unavailable(format!(
                        "peer silent for {} ms ({MISSED_HEARTBEATS} heartbeat intervals)",
                        (interval * MISSED_HEARTBEATS).as_millis()
                    )))).await;
                    cancel.cancel();
                    abort.abort();
                    return;
                }
                _ = tokio::time::sleep_until(next_beat.into()) => {
                    last_sent = Instant::now();
                    if !send(converse_response::Frame::Heartbeat(heartbeat())).await {
                        cancel.cancel();
                        abort.abort();
                        return;
                    }
                }
                outgoing = outbound_rx.recv() => match outgoing {
                    Some(envelope) => {
                        last_sent = Instant::now();
                        if !send(converse_response::Frame::Envelope(envelope)).await {
                            cancel.cancel();
                            abort.abort();
                            return;
                        }
                    }
                    // Every sender is gone: the handler has finished.
                    None => {
                        let outcome = handler.await;
                        let error = match outcome {
                            Ok(Ok(())) => None,
                            Ok(Err(status)) => Some(status),
                            Err(join) => Some(Status::internal(format!("conversation handler failed: {join}"))),
                        };
                        if let Some(status) = error {
                            let _ = frames.send(Err(status)).await;
                        }
                        return;
                    }
                },
            }
        }
    });
    Ok(Response::new(Box::pin(ReceiverStream::new(frames_rx))))
}
