//! The A2A operations over the mesh: a send is a routed Invoke, a streaming send a routed
//! Stream, a non-blocking send a durable task on the queue, and tasks live in a
//! [`TaskStore`].

use std::{collections::HashMap, sync::Arc, time::Duration};

use agentmesh_core::{
    Mesh,
    access::{Access, Action},
    registry::AgentRegistry,
};
use agentmesh_proto::{
    CallContext,
    metadata::is_valid_correlation_id,
    new_id,
    v1::{Envelope, InvokeRequest, StreamEventKind, StreamRequest, StreamResponse as MeshEvent},
};
use agentmesh_queue::{NewMessage, QueueBackend};
use futures::{StreamExt, stream::BoxStream};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};

use super::{
    A2aConfig,
    mapping::{parts_to_payload, payload_to_parts},
    tasks::{TaskQuery, TaskRecord, TaskStore},
};
use crate::types::*;

/// An A2A error: its kind (which fixes its code on each binding) and a message.
#[derive(Debug, Clone, PartialEq)]
pub struct A2aError {
    pub kind: A2aErrorKind,
    pub message: String,
}

impl A2aError {
    pub fn new(kind: A2aErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    pub(crate) fn params(message: impl Into<String>) -> Self {
        Self::new(A2aErrorKind::InvalidParams, message)
    }

    pub(crate) fn internal(message: impl Into<String>) -> Self {
        Self::new(A2aErrorKind::InternalError, message)
    }

    fn task_not_found(id: &str) -> Self {
        Self::new(
            A2aErrorKind::TaskNotFound,
            format!("no task {id:?} on this agent"),
        )
    }
}

/// One event of an A2A stream and its SSE id (`<taskId>:<sequence>:<index>`: the node's
/// stream sequence it comes from, and its place among the events made of that one).
#[derive(Debug, Clone)]
pub struct TaskEvent {
    pub id: String,
    pub response: StreamResponse,
}

pub type TaskEvents = BoxStream<'static, Result<TaskEvent, A2aError>>;

/// A point in a task's event stream (from `Last-Event-ID`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct EventPoint {
    pub sequence: u64,
    pub index: u32,
}

/// The index of a snapshot: it stands for everything of its sequence.
const SNAPSHOT: u32 = u32::MAX;

/// Parses `<taskId>:<sequence>:<index>`.
pub fn parse_event_id(id: &str) -> Option<(String, EventPoint)> {
    let mut it = id.trim().rsplitn(3, ':');
    let index = it.next()?.parse().ok()?;
    let sequence = it.next()?.parse().ok()?;
    let task = it.next().filter(|t| !t.is_empty())?;
    Some((task.to_owned(), EventPoint { sequence, index }))
}

fn event_id(task: &str, point: EventPoint) -> String {
    format!("{task}:{}:{}", point.sequence, point.index)
}

/// The A2A face of the mesh.
pub struct A2aInbound {
    pub(crate) mesh: Arc<dyn Mesh>,
    pub(crate) registry: Arc<dyn AgentRegistry>,
    pub(crate) queue: Arc<dyn QueueBackend>,
    pub(crate) tasks: Arc<dyn TaskStore>,
    /// Tasks being worked on in this process, to cancel them.
    running: Mutex<HashMap<String, CancellationToken>>,
    /// The node's policy: task operations need `call` on the task's agent, as a send does.
    access: Arc<Access>,
    /// TLS of the webhook client (`https://` push notification URLs).
    pub(crate) http_tls: crate::client::HttpTls,
    pub(crate) config: A2aConfig,
}

impl std::fmt::Debug for A2aInbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("A2aInbound")
            .field("tasks", &self.tasks)
            .field("running", &self.running.lock().len())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Removes a task from the running set when its work ends.
pub(crate) struct Running<'a> {
    inbound: &'a A2aInbound,
    id: String,
    pub(crate) token: CancellationToken,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.inbound.running.lock().remove(&self.id);
    }
}

/// Finishes a streaming task whose client went away: the task goes on (an A2A task
/// outlives its connection), read to its end from the replay window by the node.
struct Finisher {
    inbound: Arc<A2aInbound>,
    agent: String,
    id: String,
    done: bool,
}

impl Drop for Finisher {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let inbound = Arc::clone(&self.inbound);
        let (agent, id) = (self.agent.clone(), self.id.clone());
        tokio::spawn(async move {
            let policy = agentmesh_proto::DeadlinePolicy {
                default_timeout: inbound.config.task_timeout,
                ..Default::default()
            };
            let ctx = CallContext::new(&policy);
            match inbound.subscribe(&agent, ctx, &id, None).await {
                Ok(mut events) => while events.next().await.is_some() {},
                Err(error) => {
                    tracing::debug!(task = %id, %error.message, "A2A task not followed after its client left")
                }
            }
        });
    }
}

impl A2aInbound {
    pub fn new(
        mesh: Arc<dyn Mesh>,
        registry: Arc<dyn AgentRegistry>,
        queue: Arc<dyn QueueBackend>,
        tasks: Arc<dyn TaskStore>,
        config: A2aConfig,
    ) -> Self {
        Self {
            mesh,
            registry,
            queue,
            tasks,
            running: Mutex::new(HashMap::new()),
            access: Arc::new(Access::open()),
            http_tls: crate::client::HttpTls::default(),
            config,
        }
    }

    /// Enforces the node's policy on task operations.
    pub fn with_access(mut self, access: Arc<Access>) -> Self {
        self.access = access;
        self
    }

    /// Delivers push notifications to `https://` webhooks with `tls`.
    pub fn with_http_tls(mut self, tls: crate::client::HttpTls) -> Self {
        self.http_tls = tls;
        self
    }

    /// Whether the caller may use `agent`'s tasks: the `call` permission a send needs,
    /// checked before the task is looked up (a denied caller learns nothing of it).
    pub fn authorize(&self, ctx: &CallContext, agent: &str) -> Result<(), A2aError> {
        self.access
            .check(ctx, Action::Call, agent)
            .map_err(|e| A2aError::new(A2aErrorKind::PermissionDenied, e.to_string()))
    }

    pub(crate) fn run(&self, id: &str) -> Running<'_> {
        let token = CancellationToken::new();
        self.running.lock().insert(id.to_owned(), token.clone());
        Running {
            inbound: self,
            id: id.to_owned(),
            token,
        }
    }

    /// The queue a non-blocking task to `agent` waits in.
    pub fn queue_of(&self, agent: &str) -> String {
        format!("{}{agent}", self.config.queue_prefix)
    }

    /// The envelope `type` for a message: its `type` metadata, else the first type the
    /// agent declares it accepts, else `a2a.message`.
    fn type_for(&self, agent: &str, message: &Message) -> (String, String) {
        let meta = |k: &str| {
            message
                .metadata
                .as_ref()
                .and_then(|m| m.get(k))
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        if let Some(t) = meta("type") {
            return (t, meta("typeVersion").unwrap_or_default());
        }
        let declared = self.registry.resolve(agent).into_iter().find_map(|i| {
            i.card
                .skills
                .iter()
                .flat_map(|s| s.accepts.iter())
                .next()
                .map(|p| {
                    (
                        p.r#type.clone(),
                        p.versions.first().cloned().unwrap_or_default(),
                    )
                })
        });
        declared.unwrap_or_else(|| ("a2a.message".to_owned(), String::new()))
    }

    /// Checks a send and builds its task record and envelope.
    fn prepare(
        &self,
        agent: &str,
        ctx: &mut CallContext,
        request: &SendMessageRequest,
        state: TaskState,
    ) -> Result<(TaskRecord, Envelope), A2aError> {
        let message = &request.message;
        if message.message_id.trim().is_empty() {
            return Err(A2aError::params("message.messageId is required"));
        }
        if let Some(context) = message.context_id.as_deref().filter(|c| !c.is_empty()) {
            if !is_valid_correlation_id(context) {
                return Err(A2aError::params(format!(
                    "contextId {context:?} is not a valid correlation id (1 to 128 visible ASCII characters)"
                )));
            }
            ctx.correlation_id = context.to_owned();
        }
        let task_id = new_id();
        let context_id = ctx.correlation_id.clone();
        let (r#type, type_version) = self.type_for(agent, message);
        let mut envelope = Envelope {
            r#type,
            type_version,
            target: agent.to_owned(),
            source: "a2a".to_owned(),
            // The message id is the idempotency key: a retried send reaches the agent once.
            idempotency_key: format!("a2a:{agent}:{}", message.message_id),
            causation_id: message.task_id.clone().unwrap_or_default(),
            headers: [
                ("a2a-message-id".to_owned(), message.message_id.clone()),
                ("a2a-task-id".to_owned(), task_id.clone()),
                ("a2a-context-id".to_owned(), context_id.clone()),
            ]
            .into(),
            ..Default::default()
        };
        parts_to_payload(&message.parts, &mut envelope).map_err(A2aError::params)?;
        envelope.fill_from(ctx);
        let mut first = message.clone();
        first.task_id = Some(task_id.clone());
        first.context_id = Some(context_id.clone());
        let mut record = TaskRecord {
            agent: agent.to_owned(),
            message_id: message.message_id.clone(),
            task: Task {
                id: task_id,
                context_id,
                status: status(state, None),
                history: vec![first],
                ..Default::default()
            },
            stream_id: None,
            last_sequence: 0,
            updated_ms: 0,
            push_configs: Vec::new(),
        };
        if let Some(config) = request
            .configuration
            .as_ref()
            .and_then(|c| c.task_push_notification_config.clone())
        {
            let id = record.task.id.clone();
            record
                .push_configs
                .push(Self::admit_push_config(&id, config)?);
        }
        record.touch();
        Ok((record, envelope))
    }

    /// A message that names a task continues it; tasks on the mesh take one message.
    async fn refuse_continuation(&self, agent: &str, message: &Message) -> Result<(), A2aError> {
        let Some(task_id) = message.task_id.as_deref().filter(|t| !t.is_empty()) else {
            return Ok(());
        };
        match self.load(agent, task_id).await {
            Err(e) => Err(e),
            Ok(record) => Err(A2aError::new(
                A2aErrorKind::UnsupportedOperation,
                format!(
                    "task {task_id} is {}; a task on the mesh takes one message: send a new message without taskId (the same contextId keeps the conversation together)",
                    record.state().as_str()
                ),
            )),
        }
    }

    pub(crate) async fn load(&self, agent: &str, task_id: &str) -> Result<TaskRecord, A2aError> {
        self.tasks
            .get(agent, task_id)
            .await
            .map_err(A2aError::internal)?
            .ok_or_else(|| A2aError::task_not_found(task_id))
    }

    async fn save(&self, record: &TaskRecord) -> Result<bool, A2aError> {
        self.tasks.update(record).await.map_err(A2aError::internal)
    }

    /// `SendMessage`.
    pub async fn send(
        &self,
        agent: &str,
        mut ctx: CallContext,
        request: SendMessageRequest,
    ) -> Result<SendMessageResponse, A2aError> {
        self.refuse_continuation(agent, &request.message).await?;
        let config = request.configuration.clone().unwrap_or_default();
        let history = config.history_length;
        if config.non_blocking() {
            let (record, envelope) =
                self.prepare(agent, &mut ctx, &request, TaskState::Submitted)?;
            let (record, created) = self
                .tasks
                .create(record)
                .await
                .map_err(A2aError::internal)?;
            if created {
                self.enqueue(&record, envelope, &ctx).await?;
            }
            return Ok(SendMessageResponse::Task(view(record.task, history, true)));
        }
        let (record, envelope) = self.prepare(agent, &mut ctx, &request, TaskState::Working)?;
        let (mut record, created) = self
            .tasks
            .create(record)
            .await
            .map_err(A2aError::internal)?;
        if !created {
            // A retried send: the first one's task, once it is done.
            let record = self.settled(agent, &record.task.id, &ctx).await?;
            return Ok(SendMessageResponse::Task(view(record.task, history, true)));
        }
        let running = self.run(&record.task.id);
        let outcome = tokio::select! {
            outcome = self.mesh.invoke(ctx, InvokeRequest { envelope: Some(envelope) }) => {
                outcome.map(|r| r.envelope.unwrap_or_default())
            }
            () = running.token.cancelled() => Err(Status::cancelled("the task was canceled")),
        };
        drop(running);
        finish(&mut record, outcome);
        if self.save(&record).await? {
            self.notify(&record).await;
        } else {
            record = self.load(agent, &record.task.id).await?;
        }
        Ok(SendMessageResponse::Task(view(record.task, history, true)))
    }

    /// Waits until a task is in a terminal state, or the call's deadline.
    async fn settled(
        &self,
        agent: &str,
        task_id: &str,
        ctx: &CallContext,
    ) -> Result<TaskRecord, A2aError> {
        loop {
            let record = self.load(agent, task_id).await?;
            if record.state().is_terminal() || ctx.deadline.remaining().is_zero() {
                return Ok(record);
            }
            tokio::time::sleep(Duration::from_millis(50).min(ctx.deadline.remaining())).await;
        }
    }

    /// Puts a non-blocking task on its agent's durable queue.
    async fn enqueue(
        &self,
        record: &TaskRecord,
        mut envelope: Envelope,
        ctx: &CallContext,
    ) -> Result<(), A2aError> {
        // The task may wait for its agent far longer than the send's deadline.
        envelope.deadline = None;
        let body = json!({
            "agent": record.agent,
            "taskId": record.task.id,
            "envelope": agentmesh_proto::json::to_json(&envelope)
                .map_err(|e| A2aError::internal(e.to_string()))?,
            // The task runs with its sender's identity: the node's policy applies to it.
            "principal": ctx.principal.as_ref().map(|p| json!({ "id": p.id, "groups": p.groups })),
        });
        let fates = self
            .queue
            .submit(
                &self.queue_of(&record.agent),
                vec![NewMessage {
                    id: record.task.id.clone(),
                    idempotency_key: Some(envelope.idempotency_key.clone()),
                    correlation_id: record.task.context_id.clone(),
                    reply_to: None,
                    body: serde_json::to_vec(&body).unwrap_or_default().into(),
                }],
            )
            .await
            .map_err(|e| A2aError::internal(format!("could not queue the task: {e}")))?;
        tracing::debug!(task = %record.task.id, ?fates, "A2A task queued");
        Ok(())
    }

    /// `SendStreamingMessage`.
    pub async fn send_streaming(
        self: &Arc<Self>,
        agent: &str,
        mut ctx: CallContext,
        request: SendMessageRequest,
    ) -> Result<TaskEvents, A2aError> {
        self.refuse_continuation(agent, &request.message).await?;
        let (record, envelope) = self.prepare(agent, &mut ctx, &request, TaskState::Working)?;
        let (record, created) = self
            .tasks
            .create(record)
            .await
            .map_err(A2aError::internal)?;
        if !created {
            // A retried send: follow the first one's task.
            return self.subscribe(agent, ctx, &record.task.id, None).await;
        }
        let events = self
            .mesh
            .stream(
                ctx,
                StreamRequest {
                    envelope: Some(envelope),
                    ..Default::default()
                },
            )
            .await;
        let snapshot = record.task.clone();
        Ok(self.drive(record, events, Some(snapshot), None))
    }

    /// `SubscribeToTask`: the task as it is now, then every later event. With `after` (from
    /// `Last-Event-ID`), exactly the events after that one instead.
    pub async fn subscribe(
        self: &Arc<Self>,
        agent: &str,
        ctx: CallContext,
        task_id: &str,
        after: Option<EventPoint>,
    ) -> Result<TaskEvents, A2aError> {
        let record = self.load(agent, task_id).await?;
        if record.state().is_terminal() && after.is_none() {
            return Err(A2aError::new(
                A2aErrorKind::UnsupportedOperation,
                format!(
                    "task {task_id} is {}: there is nothing to subscribe to; GetTask reads it",
                    record.state().as_str()
                ),
            ));
        }
        let Some(stream_id) = record.stream_id.clone() else {
            return Ok(self.poll(record, after.is_none()));
        };
        let (resume_after, snapshot, skip) = match after {
            None => (record.last_sequence, Some(record.task.clone()), None),
            Some(point) if point.index == SNAPSHOT => (point.sequence, None, None),
            // Part of that sequence's events were delivered: have it again, skip those.
            Some(point) => (point.sequence.saturating_sub(1), None, Some(point)),
        };
        let events = self
            .mesh
            .stream(
                ctx,
                StreamRequest {
                    resume_stream_id: stream_id,
                    resume_after_sequence: resume_after,
                    ..Default::default()
                },
            )
            .await
            .map_err(|status| {
                A2aError::new(
                    A2aErrorKind::UnsupportedOperation,
                    format!("task {task_id} cannot be resumed: {}", status.message()),
                )
            })?;
        Ok(self.drive(record, Ok(events), snapshot, skip))
    }

    /// Reads a routed stream into task events, keeping the task's record up to date
    /// before each event goes out (so a resubscribe's snapshot covers what was sent).
    fn drive(
        self: &Arc<Self>,
        mut record: TaskRecord,
        events: Result<agentmesh_core::EventStream<MeshEvent>, Status>,
        snapshot: Option<Task>,
        skip: Option<EventPoint>,
    ) -> TaskEvents {
        let this = Arc::clone(self);
        let id = record.task.id.clone();
        Box::pin(async_stream::stream! {
            if let Some(task) = snapshot {
                let point = EventPoint { sequence: record.last_sequence, index: SNAPSHOT };
                yield Ok(TaskEvent { id: event_id(&id, point), response: StreamResponse::Task(task) });
            }
            let mut events = match events {
                Ok(events) => events,
                Err(status) => {
                    finish(&mut record, Err(status));
                    let _ = this.save(&record).await;
                    let point = EventPoint { sequence: record.last_sequence + 1, index: 0 };
                    yield Ok(TaskEvent { id: event_id(&id, point), response: status_event(&record) });
                    return;
                }
            };
            let running = this.run(&id);
            let mut state_before = record.state();
            let mut finisher = Finisher { inbound: Arc::clone(&this), agent: record.agent.clone(), id: id.clone(), done: false };
            loop {
                let next = tokio::select! {
                    next = events.next() => next,
                    () = running.token.cancelled() => {
                        // CancelTask already stored the canceled state.
                        if let Ok(stored) = this.load(&record.agent, &id).await {
                            record = stored;
                        }
                        let point = EventPoint { sequence: record.last_sequence + 1, index: 0 };
                        yield Ok(TaskEvent { id: event_id(&id, point), response: status_event(&record) });
                        break;
                    }
                };
                let (sequence, out) = match next {
                    Some(Ok(event)) => {
                        // Another reader of the stream (a resubscribe, or the node finishing
                        // the task for a client that left) may be ahead: apply each event once.
                        if let Ok(stored) = this.load(&record.agent, &id).await {
                            if stored.stream_id.is_some() && stored.last_sequence >= event.sequence {
                                let mut scratch = record.clone();
                                let out = apply(&mut scratch, &event);
                                let count = out.len() as u32;
                                record = stored;
                                for (index, response) in out.into_iter().enumerate() {
                                    let point = EventPoint { sequence: event.sequence, index: index as u32 };
                                    if skip.is_none_or(|s| point > s) {
                                        yield Ok(TaskEvent { id: event_id(&id, point), response });
                                    }
                                }
                                if scratch.state().is_terminal() {
                                    finisher.done = true;
                                    break;
                                }
                                if record.state().is_terminal() && record.last_sequence <= event.sequence {
                                    // It ended here another way (canceled): say so and stop.
                                    let point = EventPoint { sequence: event.sequence, index: count };
                                    yield Ok(TaskEvent { id: event_id(&id, point), response: status_event(&record) });
                                    finisher.done = true;
                                    break;
                                }
                                continue;
                            }
                            record = stored;
                        }
                        if record.stream_id.is_none() {
                            record.stream_id = Some(event.stream_id.clone());
                        }
                        state_before = record.state();
                        let out = apply(&mut record, &event);
                        (event.sequence, out)
                    }
                    Some(Err(status)) => {
                        finish(&mut record, Err(status));
                        (record.last_sequence + 1, vec![status_event(&record)])
                    }
                    None => {
                        if record.state().is_terminal() {
                            break;
                        }
                        finish(&mut record, Err(Status::unavailable("the stream ended without a result")));
                        (record.last_sequence + 1, vec![status_event(&record)])
                    }
                };
                record.last_sequence = record.last_sequence.max(sequence);
                record.touch();
                // Whether this event ends the task (the stored record may be ahead of it).
                let ended = record.state().is_terminal();
                match this.save(&record).await {
                    Ok(true) => {
                        if record.state() != state_before {
                            this.notify(&record).await;
                        }
                    }
                    Ok(false) => {
                        let stored = this.load(&record.agent, &id).await;
                        match stored {
                            // Another reader of the stream got ahead and recorded this event.
                            Ok(stored) if stored.last_sequence > record.last_sequence => record = stored,
                            // Canceled meanwhile: say so and stop.
                            Ok(stored) if stored.state().is_terminal() => {
                                record = stored;
                                let point = EventPoint { sequence, index: 0 };
                                yield Ok(TaskEvent { id: event_id(&id, point), response: status_event(&record) });
                                break;
                            }
                            Ok(stored) => record = stored,
                            Err(e) => {
                                yield Err(e);
                                break;
                            }
                        }
                    }
                    Err(e) => {
                        yield Err(e);
                        break;
                    }
                }
                for (index, response) in out.into_iter().enumerate() {
                    let point = EventPoint { sequence, index: index as u32 };
                    if skip.is_some_and(|s| point <= s) {
                        continue;
                    }
                    yield Ok(TaskEvent { id: event_id(&id, point), response });
                }
                if ended {
                    break;
                }
            }
            finisher.done = true;
        })
    }

    /// Follows a queued task by reading its record until it is done.
    fn poll(self: &Arc<Self>, record: TaskRecord, snapshot: bool) -> TaskEvents {
        let this = Arc::clone(self);
        Box::pin(async_stream::stream! {
            let id = record.task.id.clone();
            let mut seen = record.clone();
            let mut n = 0u64;
            if snapshot {
                yield Ok(TaskEvent { id: event_id(&id, EventPoint { sequence: 0, index: SNAPSHOT }), response: StreamResponse::Task(record.task.clone()) });
            }
            while !seen.state().is_terminal() {
                tokio::time::sleep(this.config.poll_interval).await;
                let now = match this.load(&seen.agent, &id).await {
                    Ok(now) => now,
                    Err(e) => { yield Err(e); break; }
                };
                let mut out = Vec::new();
                for artifact in now.task.artifacts.iter().skip(seen.task.artifacts.len()) {
                    out.push(StreamResponse::ArtifactUpdate(TaskArtifactUpdateEvent {
                        task_id: id.clone(),
                        context_id: now.task.context_id.clone(),
                        artifact: artifact.clone(),
                        last_chunk: true,
                        ..Default::default()
                    }));
                }
                if now.task.status != seen.task.status {
                    out.push(status_event(&now));
                }
                for response in out {
                    n += 1;
                    yield Ok(TaskEvent { id: event_id(&id, EventPoint { sequence: 0, index: n as u32 }), response });
                }
                seen = now;
            }
        })
    }

    /// `GetTask`.
    pub async fn get_task(&self, agent: &str, request: GetTaskRequest) -> Result<Task, A2aError> {
        if request.history_length.is_some_and(|n| n < 0) {
            return Err(A2aError::params("historyLength must not be negative"));
        }
        let record = self.load(agent, &request.id).await?;
        Ok(view(record.task, request.history_length, true))
    }

    /// `ListTasks`.
    pub async fn list_tasks(
        &self,
        agent: &str,
        request: ListTasksRequest,
    ) -> Result<ListTasksResponse, A2aError> {
        let limit = match request.page_size {
            None | Some(0) => 50,
            Some(n) if (1..=100).contains(&n) => n as usize,
            Some(n) => {
                return Err(A2aError::params(format!(
                    "pageSize {n} is out of range: 1 to 100"
                )));
            }
        };
        if request.history_length.is_some_and(|n| n < 0) {
            return Err(A2aError::params("historyLength must not be negative"));
        }
        let offset = match request.page_token.as_deref().filter(|t| !t.is_empty()) {
            None => 0,
            Some(token) => token.parse().map_err(|_| {
                A2aError::params(format!("pageToken {token:?} is not one this agent gave"))
            })?,
        };
        let updated_after_ms = match request.status_timestamp_after.as_deref() {
            None => None,
            Some(t) => Some(parse_time_ms(t).ok_or_else(|| {
                A2aError::params(format!(
                    "statusTimestampAfter {t:?} is not an RFC 3339 time"
                ))
            })?),
        };
        let query = TaskQuery {
            context_id: request.context_id.filter(|c| !c.is_empty()),
            state: request.status.filter(|s| *s != TaskState::Unspecified),
            updated_after_ms,
            offset,
            limit,
        };
        let page = self
            .tasks
            .list(agent, &query)
            .await
            .map_err(A2aError::internal)?;
        let artifacts = request.include_artifacts.unwrap_or(false);
        Ok(ListTasksResponse {
            tasks: page
                .tasks
                .into_iter()
                .map(|r| view(r.task, request.history_length, artifacts))
                .collect(),
            next_page_token: page.next.map(|n| n.to_string()).unwrap_or_default(),
            page_size: limit as i32,
            total_size: page.total as i32,
        })
    }

    /// `CancelTask`.
    pub async fn cancel_task(
        &self,
        agent: &str,
        request: CancelTaskRequest,
    ) -> Result<Task, A2aError> {
        let mut record = self.load(agent, &request.id).await?;
        if record.state().is_terminal() {
            return Err(A2aError::new(
                A2aErrorKind::TaskNotCancelable,
                format!("task {} is already {}", request.id, record.state().as_str()),
            ));
        }
        record.task.status = status(
            TaskState::Canceled,
            Some(agent_message(&record, "canceled by the client")),
        );
        record.touch();
        self.tasks.put(&record).await.map_err(A2aError::internal)?;
        if let Some(token) = self.running.lock().get(&request.id) {
            token.cancel();
        }
        self.notify(&record).await;
        Ok(view(record.task, None, true))
    }
}

/// A status at this moment.
pub(crate) fn status(state: TaskState, message: Option<Message>) -> TaskStatus {
    TaskStatus {
        state,
        message,
        timestamp: Some(now_rfc3339()),
    }
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

fn parse_time_ms(text: &str) -> Option<u64> {
    let at = humantime::parse_rfc3339_weak(text.trim()).ok()?;
    Some(at.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis() as u64)
}

/// A message from the agent about `record`'s task.
pub(crate) fn agent_message(record: &TaskRecord, text: &str) -> Message {
    Message {
        message_id: new_id(),
        context_id: Some(record.task.context_id.clone()),
        task_id: Some(record.task.id.clone()),
        role: Role::Agent,
        parts: vec![Part::text(text)],
        ..Default::default()
    }
}

/// The task with at most `history` messages of history, with or without artifacts.
fn view(mut task: Task, history: Option<i32>, artifacts: bool) -> Task {
    if let Some(n) = history {
        let n = n.max(0) as usize;
        let len = task.history.len();
        task.history.drain(..len.saturating_sub(n));
    }
    if !artifacts {
        task.artifacts.clear();
    }
    task
}

/// Records the end of a unary call (or a stream that failed) on the task.
pub(crate) fn finish(record: &mut TaskRecord, outcome: Result<Envelope, Status>) {
    match outcome {
        Ok(reply) => {
            record.task.artifacts.push(result_artifact(&reply));
            record.task.status = status(TaskState::Completed, None);
        }
        Err(status_) => {
            let state = if status_.code() == Code::Cancelled {
                TaskState::Canceled
            } else {
                TaskState::Failed
            };
            let mut message = agent_message(record, status_.message());
            message.metadata =
                json!({ "code": agentmesh_proto::envelope::code_name(status_.code()) })
                    .as_object()
                    .cloned();
            record.task.status = status(state, Some(message));
        }
    }
    record.touch();
}

fn result_artifact(reply: &Envelope) -> Artifact {
    Artifact {
        artifact_id: "result".to_owned(),
        name: Some("result".to_owned()),
        parts: payload_to_parts(reply),
        metadata: (!reply.r#type.is_empty())
            .then(|| json!({ "type": reply.r#type }).as_object().cloned())
            .flatten(),
        ..Default::default()
    }
}

fn status_event(record: &TaskRecord) -> StreamResponse {
    StreamResponse::StatusUpdate(TaskStatusUpdateEvent {
        task_id: record.task.id.clone(),
        context_id: record.task.context_id.clone(),
        status: record.task.status.clone(),
        metadata: None,
    })
}

/// Applies one event of the routed stream to the task; returns the A2A events it makes.
fn apply(record: &mut TaskRecord, event: &MeshEvent) -> Vec<StreamResponse> {
    let artifact_event = |record: &TaskRecord, artifact: Artifact, append: bool, last: bool| {
        StreamResponse::ArtifactUpdate(TaskArtifactUpdateEvent {
            task_id: record.task.id.clone(),
            context_id: record.task.context_id.clone(),
            artifact,
            append,
            last_chunk: last,
            metadata: None,
        })
    };
    match event.kind() {
        StreamEventKind::Progress => {
            let mut message = agent_message(record, &event.message);
            message.metadata = json!({ "progress": event.progress }).as_object().cloned();
            record.task.status = status(TaskState::Working, Some(message));
            vec![status_event(record)]
        }
        StreamEventKind::Unspecified | StreamEventKind::Partial => {
            let parts = payload_to_parts(event.envelope.as_ref().unwrap_or(&Envelope::default()));
            let chunk = Artifact {
                artifact_id: "partial".to_owned(),
                name: Some("partial".to_owned()),
                parts: parts.clone(),
                ..Default::default()
            };
            let append = match record
                .task
                .artifacts
                .iter_mut()
                .find(|a| a.artifact_id == "partial")
            {
                Some(existing) => {
                    existing.parts.extend(parts);
                    true
                }
                None => {
                    record.task.artifacts.push(chunk.clone());
                    false
                }
            };
            vec![artifact_event(record, chunk, append, false)]
        }
        StreamEventKind::Result => {
            let reply = event.envelope.clone().unwrap_or_default();
            let artifact = result_artifact(&reply);
            finish(record, Ok(reply));
            vec![
                artifact_event(record, artifact, false, true),
                status_event(record),
            ]
        }
        StreamEventKind::Error => {
            let error = event.error.clone().unwrap_or_default();
            finish(
                record,
                Err(Status::new(Code::from(error.code), error.message)),
            );
            vec![status_event(record)]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_round_trip() {
        let id = event_id(
            "0193-abc",
            EventPoint {
                sequence: 7,
                index: 1,
            },
        );
        assert_eq!(
            parse_event_id(&id),
            Some((
                "0193-abc".to_owned(),
                EventPoint {
                    sequence: 7,
                    index: 1
                }
            ))
        );
        assert_eq!(parse_event_id("nope"), None);
        assert_eq!(parse_event_id(":1:2"), None);
    }

    #[test]
    fn a_snapshot_comes_after_every_event_of_its_sequence() {
        let snap = EventPoint {
            sequence: 3,
            index: SNAPSHOT,
        };
        assert!(
            EventPoint {
                sequence: 3,
                index: 1
            } < snap
        );
        assert!(
            snap < EventPoint {
                sequence: 4,
                index: 0
            }
        );
    }
}
