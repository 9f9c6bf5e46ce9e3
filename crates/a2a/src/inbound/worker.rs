//! Completes non-blocking tasks: the node consumes each registered agent's A2A queue and
//! invokes the agent through the router. A task sent while its agent was down waits,
//! durable, in the queue until the agent registers; a failed call is retried with backoff
//! (the queue's nack) until the queue dead-letters it, which fails the task.

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
    time::Duration,
};

use agentmesh_proto::{
    CallContext, Principal,
    v1::{AgentFilter, Envelope, InvokeRequest},
};
use agentmesh_queue::{Leased, NackOutcome};
use serde_json::Value;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};

use super::{
    service::{A2aInbound, finish, status},
    tasks::TaskRecord,
};
use crate::types::TaskState;

const LEASE: Duration = Duration::from_secs(60);
/// How long one receive waits for a task before it is asked again.
pub(crate) const RECEIVE_WAIT: Duration = Duration::from_secs(30);
/// Longest pause after failed receives.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(5);

impl A2aInbound {
    /// Starts the worker; it stops when `shutdown` is cancelled.
    pub fn spawn_worker(self: &Arc<Self>, shutdown: CancellationToken) {
        let this = Arc::clone(self);
        tokio::spawn(async move { this.work(shutdown).await });
    }

    /// Keeps one waiting reader per registered agent's queue, started and stopped as the
    /// registry changes: an idle node has nothing to poll.
    async fn work(self: Arc<Self>, shutdown: CancellationToken) {
        let consumer = format!("a2a-{}", agentmesh_proto::new_id());
        let permits = Arc::new(Semaphore::new(self.config.worker_concurrency.max(1)));
        let mut changes = self.registry.subscribe();
        let mut readers: HashMap<String, CancellationToken> = HashMap::new();
        loop {
            let agents = self.registered_agents().await;
            readers.retain(|agent, stop| {
                let registered = agents.contains(agent);
                if !registered {
                    stop.cancel();
                }
                registered
            });
            for agent in agents {
                if readers.contains_key(&agent) {
                    continue;
                }
                let stop = shutdown.child_token();
                let this = Arc::clone(&self);
                let reader = this.read_queue(
                    agent.clone(),
                    consumer.clone(),
                    Arc::clone(&permits),
                    stop.clone(),
                );
                tokio::spawn(reader);
                readers.insert(agent, stop);
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                change = changes.recv() => {
                    // Lagged: some changes were missed; the lookup above catches up.
                    if let Err(tokio::sync::broadcast::error::RecvError::Closed) = change {
                        break;
                    }
                }
            }
        }
    }

    /// Works on `agent`'s queued tasks, one per permit, until `stop`: each receive waits for
    /// a task (the queue wakes it on submit), so an empty queue costs no wake-ups.
    async fn read_queue(
        self: Arc<Self>,
        agent: String,
        consumer: String,
        permits: Arc<Semaphore>,
        stop: CancellationToken,
    ) {
        let queue = self.queue_of(&agent);
        let mut backoff = self.config.poll_interval;
        loop {
            let permit = tokio::select! {
                () = stop.cancelled() => return,
                permit = Arc::clone(&permits).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
            };
            // Dropping a receive before it answers puts its messages back.
            let received = tokio::select! {
                () = stop.cancelled() => return,
                received = self.queue.receive(&queue, &consumer, 1, LEASE, RECEIVE_WAIT) => received,
            };
            match received {
                Ok(leased) => {
                    backoff = self.config.poll_interval;
                    // At most one (max 1); none when the wait ran out.
                    if let Some(message) = leased.into_iter().next() {
                        let this = Arc::clone(&self);
                        tokio::spawn(async move {
                            this.complete(message).await;
                            drop(permit);
                        });
                    }
                }
                Err(error) => {
                    tracing::debug!(%agent, %error, "A2A queue not read");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Every agent registered on the mesh (the node's own view: no caller's policy applies).
    async fn registered_agents(&self) -> BTreeSet<String> {
        self.registry
            .lookup(&AgentFilter::default())
            .into_iter()
            .filter_map(|i| i.card.map(|c| c.name))
            .collect()
    }

    /// Runs one queued task and settles its delivery.
    async fn complete(&self, message: Leased) {
        let parsed: Option<(String, String, Envelope, Option<Principal>)> = (|| {
            let body: Value = serde_json::from_slice(&message.body).ok()?;
            let agent = body.get("agent")?.as_str()?.to_owned();
            let task = body.get("taskId")?.as_str()?.to_owned();
            let envelope =
                agentmesh_proto::json::from_json_value(body.get("envelope")?.clone()).ok()?;
            let principal = body.get("principal").and_then(|p| {
                Some(Principal {
                    id: p.get("id")?.as_str()?.to_owned(),
                    groups: p
                        .get("groups")
                        .and_then(Value::as_array)
                        .map(|g| {
                            g.iter()
                                .filter_map(|v| v.as_str().map(str::to_owned))
                                .collect()
                        })
                        .unwrap_or_default(),
                })
            });
            Some((agent, task, envelope, principal))
        })();
        let Some((agent, task_id, envelope, principal)) = parsed else {
            let _ = self
                .queue
                .nack(&message.receipt, "not an A2A task", Some(Duration::ZERO))
                .await;
            return;
        };
        let mut record: TaskRecord = match self.tasks.get(&agent, &task_id).await {
            Ok(Some(record)) if !record.state().is_terminal() => record,
            // Canceled (or forgotten) before its turn: nothing to do.
            Ok(_) => {
                let _ = self.queue.ack(&message.receipt, None).await;
                return;
            }
            Err(error) => {
                let _ = self.queue.nack(&message.receipt, &error, None).await;
                return;
            }
        };
        if record.state() != TaskState::Working {
            record.task.status = status(TaskState::Working, None);
            record.touch();
            if !matches!(self.tasks.update(&record).await, Ok(true)) {
                let _ = self.queue.ack(&message.receipt, None).await;
                return;
            }
            self.notify(&record).await;
        }
        let mut ctx = CallContext::from_envelope(&envelope, self.config.task_timeout);
        ctx.principal = principal;
        let mut envelope = envelope;
        envelope.deadline = Some(ctx.deadline.as_system_time().into());
        envelope.attempt = message.attempt.max(1);
        let running = self.run(&task_id);
        let outcome = tokio::select! {
            outcome = self.mesh.invoke(ctx, InvokeRequest { envelope: Some(envelope) }) => {
                outcome.map(|r| r.envelope.unwrap_or_default())
            }
            // CancelTask stored the canceled state; the call is dropped.
            () = running.token.cancelled() => Err(Status::cancelled("the task was canceled")),
        };
        drop(running);
        match outcome {
            Err(error) if retriable(&error) => {
                match self
                    .queue
                    .nack(&message.receipt, error.message(), None)
                    .await
                {
                    Ok(NackOutcome::DeadLettered) => {
                        finish(&mut record, Err(error));
                        if let Ok(true) = self.tasks.update(&record).await {
                            self.notify(&record).await;
                        }
                    }
                    Ok(_) => {
                        // Back to waiting for its next attempt.
                        record.task.status = status(TaskState::Submitted, None);
                        record.touch();
                        let _ = self.tasks.update(&record).await;
                    }
                    Err(e) => tracing::warn!(task = %task_id, error = %e, "A2A task not nacked"),
                }
            }
            outcome => {
                finish(&mut record, outcome);
                if let Ok(true) = self.tasks.update(&record).await {
                    self.notify(&record).await;
                }
                let _ = self.queue.ack(&message.receipt, None).await;
            }
        }
    }
}

/// Failures worth another attempt: the agent is away, busy or slow.
fn retriable(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::NotFound | Code::DeadlineExceeded | Code::ResourceExhausted
    )
}
