//! The router's transport to external A2A agents: `Invoke` → `SendMessage`, `Stream` →
//! `SendStreamingMessage`, and A2A and HTTP failures → the gRPC codes the mesh uses.

use std::time::Duration;

use tokio::time::Instant;

use agentmesh_core::{EventStream, registry::Instance, router::ForeignTransport};
use agentmesh_proto::{
    metadata::{GRPC_TIMEOUT, TIMEOUT_MS, parse_grpc_timeout},
    v1::{
        AgentCard, Envelope, ErrorStatus, InvokeRequest, StreamEventKind, StreamRequest,
        StreamResponse as MeshEvent,
    },
};
use futures::StreamExt;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use tonic::{Code, Request, Status, metadata::KeyAndValueRef};

use super::mapping::{message_of, payload_of};
use crate::{
    client::{A2aClient, Binding, ClientError, Interface},
    types::{
        A2aErrorKind, Message, Part, SendMessageConfiguration, SendMessageRequest,
        SendMessageResponse, StreamResponse, Task, TaskState, TaskStatus,
    },
};

/// Card metadata of an external A2A agent: the binding the node calls it over (its
/// `endpoint` is that interface's URL).
pub const BINDING_KEY: &str = "a2a.binding";
/// Card metadata: where the agent's A2A card is fetched from.
pub const CARD_URL_KEY: &str = "a2a.card_url";
/// Card metadata: the tenant sent with every request, when the card names one.
pub const TENANT_KEY: &str = "a2a.tenant";

/// The first and the longest pause between `GetTask`s following an unfinished task.
const FIRST_POLL: Duration = Duration::from_millis(25);
const LAST_POLL: Duration = Duration::from_millis(500);

/// Calls external A2A agents for the router.
#[derive(Debug, Clone)]
pub struct A2aTransport {
    client: A2aClient,
}

impl A2aTransport {
    /// A transport sending through `client`.
    pub fn new(client: A2aClient) -> Self {
        Self { client }
    }
}

#[tonic::async_trait]
impl ForeignTransport for A2aTransport {
    fn handles(&self, card: &AgentCard) -> bool {
        card.metadata.contains_key(BINDING_KEY)
    }

    async fn invoke(
        &self,
        instance: &Instance,
        request: Request<InvokeRequest>,
    ) -> Result<Envelope, Status> {
        let (interface, hop) = interface_of(&instance.card)?;
        let (metadata, _, request) = request.into_parts();
        let (headers, timeout) = headers_of(&metadata);
        let envelope = request.envelope.unwrap_or_default();
        let send = send_request(&envelope)?;
        let deadline = Instant::now() + timeout;
        let answer = self
            .client
            .send_message(&interface, &send, headers.clone(), timeout)
            .await
            .map_err(|e| status_of(e, &hop))?;
        let mut task = match answer {
            SendMessageResponse::Message(message) => return reply_of(&message.parts, &hop),
            SendMessageResponse::Task(task) => task,
        };
        // An agent may answer before its task is done: follow it to its end, within the
        // call's deadline.
        let mut pause = FIRST_POLL;
        while !ends_call(task.status.state) {
            if task.id.is_empty() {
                return Err(invalid(&hop, "an unfinished task without an id"));
            }
            tokio::time::sleep(pause.min(deadline.saturating_duration_since(Instant::now()))).await;
            pause = (pause * 2).min(LAST_POLL);
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                // task_reply says the deadline passed with the task unfinished.
                break;
            }
            task = self
                .client
                .get_task(&interface, &task.id, headers.clone(), left)
                .await
                .map_err(|e| status_of(e, &hop))?;
        }
        task_reply(&task, &[], &hop)
    }

    async fn stream(
        &self,
        instance: &Instance,
        request: Request<StreamRequest>,
    ) -> Result<EventStream<MeshEvent>, Status> {
        let (interface, hop) = interface_of(&instance.card)?;
        let (metadata, _, request) = request.into_parts();
        let (headers, timeout) = headers_of(&metadata);
        let envelope = request.envelope.unwrap_or_default();
        let send = send_request(&envelope)?;
        let mut events = self
            .client
            .send_streaming_message(&interface, &send, headers, timeout)
            .await
            .map_err(|e| status_of(e, &hop))?;
        let mapped = async_stream::stream! {
            // Every artifact part so far: the result when the final status carries none.
            let mut artifacts: Vec<Part> = Vec::new();
            while let Some(event) = events.next().await {
                let (status, task_id) = match event {
                    Err(error) => {
                        yield Err(status_of(error, &hop));
                        return;
                    }
                    Ok(StreamResponse::Message(message)) => {
                        yield reply_of(&message.parts, &hop).map(result);
                        return;
                    }
                    Ok(StreamResponse::ArtifactUpdate(update)) => {
                        artifacts.extend(update.artifact.parts.iter().cloned());
                        yield payload_of(&update.artifact.parts)
                            .map(|envelope| MeshEvent {
                                kind: StreamEventKind::Partial as i32,
                                envelope: Some(envelope),
                                ..Default::default()
                            })
                            .map_err(|e| invalid(&hop, &e));
                        continue;
                    }
                    Ok(StreamResponse::StatusUpdate(update)) => (update.status, update.task_id),
                    Ok(StreamResponse::Task(task)) => {
                        for artifact in &task.artifacts {
                            artifacts.extend(artifact.parts.iter().cloned());
                        }
                        (task.status, task.id)
                    }
                };
                if !ends_call(status.state) {
                    yield Ok(MeshEvent {
                        kind: StreamEventKind::Progress as i32,
                        message: progress_note(&status),
                        ..Default::default()
                    });
                    continue;
                }
                let task = Task { id: task_id, status, ..Default::default() };
                yield Ok(match task_reply(&task, &artifacts, &hop) {
                    Ok(envelope) => result(envelope),
                    Err(failure) => MeshEvent {
                        kind: StreamEventKind::Error as i32,
                        error: Some(ErrorStatus {
                            code: failure.code() as i32,
                            message: failure.message().to_owned(),
                        }),
                        ..Default::default()
                    },
                });
                return;
            }
            yield Err(Status::unavailable(format!(
                "{hop} ended the stream before the task finished"
            )));
        };
        Ok(mapped.boxed())
    }
}

fn result(envelope: Envelope) -> MeshEvent {
    MeshEvent {
        kind: StreamEventKind::Result as i32,
        envelope: Some(envelope),
        ..Default::default()
    }
}

/// The interface a card registered from an A2A card names, and the hop's name for messages.
fn interface_of(card: &AgentCard) -> Result<(Interface, String), Status> {
    let hop = format!("A2A agent '{}' at {}", card.name, card.endpoint);
    let binding = card
        .metadata
        .get(BINDING_KEY)
        .and_then(|b| Binding::parse(b))
        .ok_or_else(|| {
            Status::failed_precondition(format!(
                "{hop}: card metadata {BINDING_KEY} names no binding this node speaks"
            ))
        })?;
    Ok((
        Interface {
            url: card.endpoint.clone(),
            binding,
            tenant: card.metadata.get(TENANT_KEY).cloned(),
        },
        hop,
    ))
}

/// The HTTP headers of the hop, from its gRPC metadata (tracing and correlation fields),
/// and its timeout, also sent as `X-Timeout-Ms` so the agent knows the budget it has.
fn headers_of(metadata: &tonic::metadata::MetadataMap) -> (HeaderMap, Duration) {
    let timeout = metadata
        .get(GRPC_TIMEOUT)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
        .unwrap_or(Duration::from_secs(30));
    let mut headers = HeaderMap::new();
    for entry in metadata.iter() {
        if let KeyAndValueRef::Ascii(key, value) = entry {
            let key = key.as_str();
            if key.starts_with("grpc-") {
                continue;
            }
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(key.as_bytes()),
                HeaderValue::from_bytes(value.as_encoded_bytes()),
            ) {
                headers.insert(name, value);
            }
        }
    }
    if let Ok(value) = HeaderValue::from_str(&timeout.as_millis().max(1).to_string()) {
        headers.insert(TIMEOUT_MS, value);
    }
    (headers, timeout)
}

/// A blocking `SendMessage` of the envelope. Its `messageId` is the envelope's idempotency
/// key when it has one (so a retried attempt is the same message to the agent), else its id.
fn send_request(envelope: &Envelope) -> Result<SendMessageRequest, Status> {
    let message: Message = message_of(envelope).map_err(Status::invalid_argument)?;
    Ok(SendMessageRequest {
        message,
        configuration: Some(SendMessageConfiguration {
            return_immediately: false,
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// Whether a task in `state` ends the mesh call: terminal, or waiting for input or
/// authorization that a mesh call cannot give.
fn ends_call(state: TaskState) -> bool {
    state.is_terminal() || matches!(state, TaskState::InputRequired | TaskState::AuthRequired)
}

fn reply_of(parts: &[Part], hop: &str) -> Result<Envelope, Status> {
    if parts.is_empty() {
        return Ok(Envelope {
            payload: Some(agentmesh_proto::v1::envelope::Payload::Json(
                agentmesh_proto::json_to_value(serde_json::Value::Null),
            )),
            content_type: "application/json".into(),
            ..Default::default()
        });
    }
    payload_of(parts).map_err(|e| invalid(hop, &e))
}

fn invalid(hop: &str, problem: &str) -> Status {
    Status::internal(format!(
        "{hop} answered with an invalid A2A response: {problem}"
    ))
}

/// The reply a task stands for: its result when it completed (the status message's parts,
/// else its artifacts' parts), else the failure its state means.
fn task_reply(task: &Task, streamed: &[Part], hop: &str) -> Result<Envelope, Status> {
    let note = status_text(&task.status);
    let because = if note.is_empty() {
        String::new()
    } else {
        format!(": {note}")
    };
    let id = &task.id;
    match task.status.state {
        TaskState::Completed => {
            let mut reply = match &task.status.message {
                Some(message) if !message.parts.is_empty() => reply_of(&message.parts, hop)?,
                _ => {
                    let mut parts: Vec<Part> = streamed.to_vec();
                    for artifact in &task.artifacts {
                        parts.extend(artifact.parts.iter().cloned());
                    }
                    reply_of(&parts, hop)?
                }
            };
            if !id.is_empty() {
                reply.headers.insert("a2a-task-id".into(), id.clone());
            }
            if !task.context_id.is_empty() {
                reply
                    .headers
                    .insert("a2a-context-id".into(), task.context_id.clone());
            }
            Ok(reply)
        }
        TaskState::Failed => Err(Status::internal(format!("{hop} failed task {id}{because}"))),
        TaskState::Rejected => Err(Status::failed_precondition(format!(
            "{hop} rejected task {id}{because}"
        ))),
        TaskState::Canceled => Err(Status::aborted(format!(
            "{hop} canceled task {id}{because}"
        ))),
        TaskState::InputRequired => Err(Status::failed_precondition(format!(
            "{hop} needs more input for task {id}, which a mesh call cannot give{because}"
        ))),
        TaskState::AuthRequired => Err(Status::permission_denied(format!(
            "{hop} needs authorization for task {id}{because}"
        ))),
        TaskState::Submitted | TaskState::Working => Err(Status::deadline_exceeded(format!(
            "{hop} did not finish task {id} within the call's deadline; it was {}",
            task.status.state.as_str()
        ))),
        TaskState::Unspecified => Err(invalid(hop, &format!("task {id} has no state"))),
    }
}

/// The text parts of a status message, joined.
fn status_text(status: &TaskStatus) -> String {
    status
        .message
        .iter()
        .flat_map(|m| m.parts.iter())
        .filter_map(|p| p.text.as_deref())
        .collect::<Vec<_>>()
        .join(" ")
}

fn progress_note(status: &TaskStatus) -> String {
    let text = status_text(status);
    if text.is_empty() {
        status.state.as_str().to_owned()
    } else {
        text
    }
}

/// What the caller sees of an A2A agent's failure. The codes follow what the failure says
/// about the agent: it is unreachable, overloaded or broken (UNAVAILABLE, INTERNAL: these
/// count against its breaker), or the request is at fault (INVALID_ARGUMENT and the like:
/// they do not).
pub fn status_of(error: ClientError, hop: &str) -> Status {
    match error {
        ClientError::Unreachable(why) => {
            Status::unavailable(format!("{hop} is unreachable: {why}"))
        }
        ClientError::TimedOut(budget) => Status::deadline_exceeded(format!(
            "deadline exceeded waiting for {hop}: no answer within its {} ms budget",
            budget.as_millis()
        )),
        ClientError::Http {
            status,
            message,
            retry_after,
        } => {
            let said = if message.is_empty() {
                String::new()
            } else {
                format!(": {message}")
            };
            let code = match status {
                400 | 413 | 414 | 431 | 415 | 422 => {
                    return Status::invalid_argument(format!(
                        "{hop} refused the request (HTTP {status}){said}; the request must change, the agent is not at fault"
                    ));
                }
                401 => Code::Unauthenticated,
                403 => Code::PermissionDenied,
                404 | 405 | 501 => Code::Unimplemented,
                408 => Code::DeadlineExceeded,
                409 => Code::Aborted,
                429 => Code::ResourceExhausted,
                502..=504 => Code::Unavailable,
                500..=599 => Code::Internal,
                _ => Code::FailedPrecondition,
            };
            let mut answer = Status::new(code, format!("{hop} answered HTTP {status}{said}"));
            if let Some(after) = retry_after
                && let Ok(value) = after.as_millis().to_string().parse()
            {
                // The router's retry loop honours it like a gRPC server's pushback.
                answer
                    .metadata_mut()
                    .insert("grpc-retry-pushback-ms", value);
            }
            answer
        }
        ClientError::A2a { code, message } => {
            let kind = A2aErrorKind::from_code(code);
            let name = kind.map_or("unknown error", A2aErrorKind::reason);
            let text = format!("{hop} answered A2A error {code} ({name}): {message}");
            let code = match kind {
                Some(
                    A2aErrorKind::ParseError
                    | A2aErrorKind::InvalidRequest
                    | A2aErrorKind::InvalidParams
                    | A2aErrorKind::ContentTypeNotSupported,
                ) => Code::InvalidArgument,
                Some(A2aErrorKind::MethodNotFound | A2aErrorKind::UnsupportedOperation) => {
                    Code::Unimplemented
                }
                Some(A2aErrorKind::TaskNotFound) => Code::NotFound,
                Some(A2aErrorKind::InternalError | A2aErrorKind::InvalidAgentResponse) => {
                    Code::Internal
                }
                Some(_) => Code::FailedPrecondition,
                None => Code::Unknown,
            };
            Status::new(code, text)
        }
        ClientError::Invalid(problem) => invalid(hop, &problem),
    }
}

#[cfg(test)]
mod tests {
    use agentmesh_resilience::counts_against_destination;

    use super::*;

    #[test]
    fn a_refusal_of_the_request_does_not_count_against_the_agent() {
        let http = |status| ClientError::Http {
            status,
            message: String::new(),
            retry_after: None,
        };
        for refused in [400, 413, 422] {
            let status = status_of(http(refused), "a");
            assert_eq!(status.code(), Code::InvalidArgument);
            assert!(!counts_against_destination(&status));
        }
        let params = ClientError::A2a {
            code: -32602,
            message: "bad".into(),
        };
        assert!(!counts_against_destination(&status_of(params, "a")));
        for failing in [500, 502, 503] {
            assert!(counts_against_destination(&status_of(http(failing), "a")));
        }
        let down = ClientError::Unreachable("connection refused".into());
        assert_eq!(status_of(down, "a").code(), Code::Unavailable);
    }

    #[test]
    fn the_hop_budget_and_tracing_fields_become_headers() {
        let mut request = Request::new(());
        request.set_timeout(Duration::from_millis(1500));
        request
            .metadata_mut()
            .insert("traceparent", "00-abc-def-01".parse().unwrap());
        let (headers, timeout) = headers_of(request.metadata());
        assert_eq!(timeout, Duration::from_millis(1500));
        assert_eq!(headers[TIMEOUT_MS], "1500");
        assert_eq!(headers["traceparent"], "00-abc-def-01");
        assert!(!headers.contains_key(GRPC_TIMEOUT));
    }

    #[test]
    fn retry_after_becomes_pushback() {
        let status = status_of(
            ClientError::Http {
                status: 503,
                message: "busy".into(),
                retry_after: Some(Duration::from_secs(2)),
            },
            "a",
        );
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(
            status.metadata().get("grpc-retry-pushback-ms").unwrap(),
            "2000"
        );
    }

    #[test]
    fn a_task_maps_to_a_reply_or_a_failure() {
        let done = Task {
            id: "t".into(),
            status: TaskStatus {
                state: TaskState::Completed,
                ..Default::default()
            },
            artifacts: vec![crate::types::Artifact {
                parts: vec![Part::text("hi")],
                ..Default::default()
            }],
            ..Default::default()
        };
        let reply = task_reply(&done, &[], "a").unwrap();
        assert_eq!(reply.headers["a2a-task-id"], "t");
        let failed = Task {
            status: TaskStatus {
                state: TaskState::Failed,
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(
            task_reply(&failed, &[], "a").unwrap_err().code(),
            Code::Internal
        );
    }
}
