//! Conversations (`AgentService.Converse`) over a WebSocket.
//!
//! The socket is bridged to one conversation: the gateway opens it with the
//! path's agent as target, turns each text message (Envelope JSON) into an
//! envelope frame and each envelope frame back into a text message. The
//! protocol's heartbeats are kept by the gateway on the browser's behalf
//! (it sends them to the agent and drops the agent's), while the browser's
//! own liveness is checked with WebSocket pings.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use agentmesh_proto::v1::{
    ConverseHeartbeat, ConverseOpen, ConverseRequest, ConverseResponse, Envelope, converse_request,
    converse_response,
};
use axum::{
    extract::{
        Path, State,
        ws::{
            CloseFrame, Message, WebSocket, WebSocketUpgrade, rejection::WebSocketUpgradeRejection,
        },
    },
    response::Response,
};
use bytes::Bytes;
use futures::{SinkExt, StreamExt, stream::SplitSink};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::{
    Gateway,
    openapi::{CallHeaders, ErrorBody},
};
use agentmesh_proto::envelope::code_name;

use crate::{EventStream, call::Call, error::ApiError, json};

/// Close code for a conversation that ended normally.
const NORMAL: u16 = 1000;
/// Close code for a peer that stopped answering pings.
const GOING_AWAY: u16 = 1001;
/// Close code for a binary message (only Envelope JSON text is understood).
const UNSUPPORTED: u16 = 1003;
/// Close code for a text message that is not Envelope JSON.
const INVALID_PAYLOAD: u16 = 1007;
/// Failed conversations close with `4000 + gRPC code` (the private-use
/// range), so a client recovers the exact code.
const GRPC_BASE: u16 = 4000;
/// The longest close reason a frame can carry, in bytes.
const MAX_REASON: usize = 123;

/// Converses with an agent over a WebSocket.
#[utoipa::path(
    get,
    path = "/v1/agents/{name}/converse",
    tag = "agents",
    params(("name" = String, Path, description = "Agent name or `skill:<id>`"), CallHeaders),
    responses(
        (status = 101, description = "Switching to the WebSocket: text messages are Envelope JSON both ways; closed with 1000 when the conversation ends, 4000 + gRPC code (reason `CODE: message`) when it fails"),
        (status = 404, description = "No agent registered for the target", body = ErrorBody),
        (status = 400, description = "Not a WebSocket upgrade request", body = ErrorBody),
        (status = 403, description = "A browser page on an origin that is neither this one nor one of the gateway's CORS origins", body = ErrorBody),
    )
)]
pub(crate) async fn converse(
    State(gateway): State<Arc<Gateway>>,
    Path(name): Path<String>,
    call: Call,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let upgrade = upgrade.map_err(|rejection| {
        ApiError::invalid_argument(
            "NOT_A_WEBSOCKET",
            format!(
                "this route converses over a WebSocket: {}",
                rejection.body_text()
            ),
        )
        .with_http_status(rejection.status())
    })?;
    let config = &gateway.config;
    check_origin(&call, &config.cors_origins)?;
    // The conversation is opened before the upgrade, so an unknown agent is
    // a plain 404 rather than a socket that closes at once.
    let (frames, inbound) = mpsc::channel(16);
    let open = ConverseRequest {
        frame: Some(converse_request::Frame::Open(ConverseOpen {
            target: name.clone(),
            heartbeat_interval: prost_types::Duration::try_from(config.converse_heartbeat).ok(),
        })),
    };
    frames
        .try_send(Ok(open))
        .expect("a new channel has room for the first frame");
    let inbound: EventStream<ConverseRequest> = ReceiverStream::new(inbound).boxed();
    let responses = gateway.mesh.converse(call.ctx(), inbound).await?;
    let bridge = Bridge {
        target: name,
        call,
        frames,
        ping_interval: config.ws_ping_interval,
        pong_timeout: config.ws_pong_timeout,
        heartbeat: config.converse_heartbeat,
    };
    Ok(upgrade
        .max_message_size(config.max_body_bytes)
        .max_frame_size(config.max_body_bytes)
        .on_upgrade(move |socket| bridge.run(socket, responses)))
}

/// WebSockets are not subject to CORS, so the gateway applies its CORS
/// origins itself: a browser page may converse only from this origin or a
/// configured one (clients other than browsers send no `Origin`).
fn check_origin(call: &Call, cors_origins: &[String]) -> Result<(), ApiError> {
    let Some(origin) = call.header("origin") else {
        return Ok(());
    };
    let configured = cors_origins.iter().any(|allowed| {
        let allowed = allowed.trim();
        allowed == "*" || allowed.trim_end_matches('/').eq_ignore_ascii_case(origin)
    });
    let same_origin = call.header("host").is_some_and(|host| {
        origin
            .split_once("://")
            .is_some_and(|(_, authority)| authority.eq_ignore_ascii_case(host))
    });
    if configured || same_origin {
        return Ok(());
    }
    Err(ApiError::new(
        tonic::Code::PermissionDenied,
        format!(
            "a WebSocket from origin {origin} is not allowed: add it to the gateway's CORS origins"
        ),
    )
    .with_reason("ORIGIN_NOT_ALLOWED", [("origin", origin.to_owned())]))
}

/// How a bridged conversation ended.
enum End {
    /// The agent's side ended normally.
    Finished,
    /// The conversation failed with this status.
    Failed(Status),
    /// The client closed the socket or went away.
    ClientGone,
    /// The client sent something that is not Envelope JSON.
    BadMessage(ApiError),
    /// The client sent a binary message.
    Binary,
    /// The client did not answer pings.
    Silent(Duration),
}

struct Bridge {
    target: String,
    call: Call,
    frames: mpsc::Sender<Result<ConverseRequest, Status>>,
    ping_interval: Duration,
    pong_timeout: Duration,
    heartbeat: Duration,
}

impl Bridge {
    async fn run(self, socket: WebSocket, mut responses: EventStream<ConverseResponse>) {
        let (mut sink, mut stream) = socket.split();
        let heard = Mutex::new(Instant::now());
        let end = {
            let client_to_agent = async {
                while let Some(message) = stream.next().await {
                    let message = match message {
                        Ok(message) => message,
                        Err(_) => return End::ClientGone,
                    };
                    *heard.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
                    match message {
                        Message::Text(text) => {
                            let mut envelope: Envelope =
                                match json::parse(text.as_bytes(), "WebSocket message") {
                                    Ok(envelope) => envelope,
                                    Err(error) => return End::BadMessage(error),
                                };
                            if envelope.target.is_empty() {
                                envelope.target = self.target.clone();
                            }
                            self.call.stamp_trace(&mut envelope);
                            let frame = ConverseRequest {
                                frame: Some(converse_request::Frame::Envelope(envelope)),
                            };
                            // Waits while the agent is slow: backpressure
                            // reaches the browser through TCP.
                            if self.frames.send(Ok(frame)).await.is_err() {
                                // The conversation is over upstream; the
                                // other direction reports how it ended.
                                std::future::pending::<()>().await;
                            }
                        }
                        Message::Binary(_) => return End::Binary,
                        Message::Close(_) => return End::ClientGone,
                        Message::Ping(_) | Message::Pong(_) => {}
                    }
                }
                End::ClientGone
            };
            let agent_to_client = async {
                let mut ping = tokio::time::interval(self.ping_interval);
                ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                ping.tick().await;
                let mut beat = tokio::time::interval(self.heartbeat);
                beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                beat.tick().await;
                loop {
                    tokio::select! {
                        frame = responses.next() => match frame {
                            Some(Ok(ConverseResponse { frame: Some(converse_response::Frame::Envelope(envelope)) })) => {
                                let text = match json::to_vec(&envelope) {
                                    Ok(text) => text,
                                    Err(error) => return End::Failed(Status::internal(error.message().to_owned())),
                                };
                                let text = String::from_utf8(text).unwrap_or_default();
                                if sink.send(Message::Text(text.into())).await.is_err() {
                                    return End::ClientGone;
                                }
                            }
                            // Heartbeats stay between the gateway and the agent.
                            Some(Ok(_)) => {}
                            Some(Err(status)) => return End::Failed(status),
                            None => return End::Finished,
                        },
                        _ = ping.tick() => {
                            let silent = heard.lock().unwrap_or_else(|e| e.into_inner()).elapsed();
                            if silent > self.pong_timeout {
                                return End::Silent(silent);
                            }
                            if sink.send(Message::Ping(Bytes::new())).await.is_err() {
                                return End::ClientGone;
                            }
                        }
                        _ = beat.tick() => {
                            // The agent's side declares a caller dead after
                            // three silent intervals; a quiet browser is not.
                            let beat = ConverseRequest {
                                frame: Some(converse_request::Frame::Heartbeat(ConverseHeartbeat {
                                    sent_at: Some(std::time::SystemTime::now().into()),
                                })),
                            };
                            let _ = self.frames.try_send(Ok(beat));
                        }
                    }
                }
            };
            tokio::select! {
                end = client_to_agent => end,
                end = agent_to_client => end,
            }
        };
        // Dropping the responses (and our frames) ends the conversation
        // upstream, whoever ended it here.
        drop(responses);
        close(&mut sink, end).await;
    }
}

/// Sends the close frame that says how the conversation ended.
async fn close(sink: &mut SplitSink<WebSocket, Message>, end: End) {
    let (code, reason) = match end {
        End::ClientGone => return,
        End::Finished => (NORMAL, "conversation ended".to_owned()),
        End::Failed(status) => (
            GRPC_BASE + status.code() as u16,
            format!("{}: {}", code_name(status.code()), status.message()),
        ),
        End::BadMessage(error) => (INVALID_PAYLOAD, error.message().to_owned()),
        End::Binary => (
            UNSUPPORTED,
            "binary messages are not supported: send Envelope JSON as text".to_owned(),
        ),
        End::Silent(silent) => (GOING_AWAY, format!("no pong for {} ms", silent.as_millis())),
    };
    let frame = CloseFrame {
        code,
        reason: truncate(reason, MAX_REASON).into(),
    };
    // A dead peer may never take the frame; don't wait on it forever.
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        sink.send(Message::Close(Some(frame))),
    )
    .await;
}

/// `text` cut to at most `max` bytes on a character boundary.
fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncates_on_a_char_boundary() {
        let text = "é".repeat(100);
        let cut = truncate(text, MAX_REASON);
        assert!(cut.len() <= MAX_REASON);
        assert!(cut.chars().all(|c| c == 'é'));
    }
}
