//! Conversations (`AgentService.Converse`): both sides send at any time; each
//! sends a heartbeat when it has been quiet for an interval, and a peer that
//! is silent for three intervals is considered dead.

use std::time::{Duration, Instant, SystemTime};

use agentmesh_proto::v1::{
    ConverseHeartbeat, ConverseRequest, ConverseResponse, Envelope, converse_request,
    converse_response,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Status};

use crate::client::MeshClient;

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

pub(crate) fn heartbeat() -> ConverseHeartbeat {
    ConverseHeartbeat {
        sent_at: Some(SystemTime::now().into()),
    }
}

/// Our side's sender in a conversation opened with [`MeshClient::converse`].
pub type ConversationSender = mpsc::Sender<Envelope>;

/// The peer's messages in a conversation opened with [`MeshClient::converse`].
pub type ConversationStream = ReceiverStream<Result<Envelope, Status>>;

impl MeshClient {
    /// Opens a conversation with `target`: a sender for our messages and a
    /// stream of the peer's. Heartbeats go both ways by themselves; a peer
    /// silent for three intervals ends the stream with UNAVAILABLE. Dropping
    /// every sender half-closes our side.
    pub async fn converse(
        &self,
        target: &str,
        heartbeat: Duration,
    ) -> Result<(ConversationSender, ConversationStream), Status> {
        open(self, target, heartbeat).await
    }
}

/// Opens a conversation through the node (the client side).
async fn open(
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
