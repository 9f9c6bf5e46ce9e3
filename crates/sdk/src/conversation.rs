//! Conversations (`AgentService.Converse`): both sides send at any time; each
//! sends a heartbeat when it has been quiet for an interval, and a peer that
//! is silent for three intervals is considered dead.

use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use agentmesh_proto::v1::{
    ConverseHeartbeat, ConverseRequest, ConverseResponse, Envelope, converse_request,
    converse_response,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::{Agent, agent::EventStreamOf, client::MeshClient, context::Context};

/// Heartbeat interval when the caller asks for none.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);

/// How many silent intervals make a peer dead.
pub const MISSED_HEARTBEATS: u32 = 3;

/// One side's view of a conversation: the peer's messages in, ours out.
#[derive(Debug)]
pub struct Conversation {
    inbound: mpsc::Receiver<Envelope>,
    outbound: mpsc::Sender<Envelope>,
}

impl Conversation {
    pub(crate) fn new(inbound: mpsc::Receiver<Envelope>, outbound: mpsc::Sender<Envelope>) -> Self {
        Self { inbound, outbound }
    }

    /// The peer's next message; `None` once the peer has finished sending.
    pub async fn recv(&mut self) -> Option<Envelope> {
        self.inbound.recv().await
    }

    /// Sends a message to the peer; waits while the peer is slow.
    pub async fn send(&self, envelope: Envelope) -> Result<(), Status> {
        self.outbound
            .send(envelope)
            .await
            .map_err(|_| Status::cancelled("the conversation has ended"))
    }

    /// A sender that can be moved to another task.
    pub fn sender(&self) -> mpsc::Sender<Envelope> {
        self.outbound.clone()
    }
}

fn heartbeat() -> ConverseHeartbeat {
    ConverseHeartbeat {
        sent_at: Some(SystemTime::now().into()),
    }
}

/// Serves one `Converse` call with `agent`.
pub(crate) async fn host<A: Agent>(
    agent: Arc<A>,
    client: Option<MeshClient>,
    request: Request<Streaming<ConverseRequest>>,
) -> Result<Response<EventStreamOf<ConverseResponse>>, Status> {
    let ctx = Context::from_metadata(request.metadata(), "", client);
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

/// Our side's sender in a conversation opened with [`MeshClient::converse`].
pub type ConversationSender = mpsc::Sender<Envelope>;

/// The peer's messages in a conversation opened with [`MeshClient::converse`].
pub type ConversationStream = ReceiverStream<Result<Envelope, Status>>;

/// Opens a conversation through the node (the client side).
pub(crate) async fn open(
    client: &MeshClient,
    target: &str,
    interval: Duration,
) -> Result<(ConversationSender, ConversationStream), Status> {
    let interval = interval.max(Duration::from_millis(10));
    let (outbound, mut outbound_rx) = mpsc::channel::<Envelope>(16);
    let (frames, frames_rx) = mpsc::channel::<ConverseRequest>(16);
    let open = ConverseRequest {
        frame: Some(converse_request::Frame::Open(
            agentmesh_proto::v1::ConverseOpen {
                target: target.to_owned(),
                heartbeat_interval: prost_types::Duration::try_from(interval).ok(),
            },
        )),
    };
    // Stamp correlation and the deadline-free metadata like any other call.
    let (request, _) = client.prepare(
        target,
        Envelope::default(),
        &crate::CallOptions::default(),
        |_| (),
    )?;
    let (mut metadata, _, ()) = request.into_parts();
    metadata.remove(agentmesh_proto::metadata::GRPC_TIMEOUT);
    let correlation_id = metadata
        .get(agentmesh_proto::metadata::CORRELATION_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    frames
        .send(open)
        .await
        .map_err(|_| Status::internal("conversation writer closed"))?;
    // Writer: our envelopes, or a heartbeat when we have been quiet.
    tokio::spawn(async move {
        loop {
            let frame = tokio::select! {
                envelope = outbound_rx.recv() => match envelope {
                    Some(mut envelope) => {
                        if envelope.correlation_id.is_empty() {
                            envelope.correlation_id = correlation_id.clone();
                        }
                        converse_request::Frame::Envelope(envelope)
                    }
                    None => return, // half-close
                },
                _ = tokio::time::sleep(interval) => converse_request::Frame::Heartbeat(ConverseHeartbeat {
                    sent_at: Some(SystemTime::now().into()),
                }),
            };
            if frames
                .send(ConverseRequest { frame: Some(frame) })
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let request = Request::from_parts(metadata, Default::default(), ReceiverStream::new(frames_rx));
    let mut incoming = client.agents().converse(request).await?.into_inner();
    let (inbound, inbound_rx) = mpsc::channel(16);
    // Reader: the peer's envelopes; heartbeats only prove it is alive.
    tokio::spawn(async move {
        let mut last_heard = Instant::now();
        loop {
            let limit = last_heard + interval * MISSED_HEARTBEATS;
            let frame = tokio::select! {
                frame = incoming.message() => frame,
                _ = tokio::time::sleep_until(limit.into()) => {
                    let _ = inbound.send(Err(Status::unavailable(format!(
                        "peer silent for {} ms ({MISSED_HEARTBEATS} heartbeat intervals)",
                        (interval * MISSED_HEARTBEATS).as_millis()
                    )))).await;
                    return;
                }
                _ = inbound.closed() => return,
            };
            match frame {
                Ok(Some(ConverseResponse {
                    frame: Some(converse_response::Frame::Envelope(envelope)),
                })) => {
                    last_heard = Instant::now();
                    if inbound.send(Ok(envelope)).await.is_err() {
                        return;
                    }
                }
                Ok(Some(_)) => last_heard = Instant::now(),
                Ok(None) => return,
                Err(status) => {
                    let _ = inbound.send(Err(status)).await;
                    return;
                }
            }
        }
    });
    Ok((outbound, ReceiverStream::new(inbound_rx)))
}
