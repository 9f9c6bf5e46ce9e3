//! Where A2A tasks are kept: their A2A form plus what the node needs to resume them (the
//! mesh stream behind a streaming task and how far into it the task's state reaches).

use std::{
    collections::HashMap,
    time::{SystemTime, UNIX_EPOCH},
};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::types::{Task, TaskPushNotificationConfig, TaskState};

/// A task as the node keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    /// The mesh agent the task was sent to.
    pub agent: String,
    /// The `messageId` of the message that created it (the idempotency key).
    pub message_id: String,
    /// The task in its A2A form.
    pub task: Task,
    /// The node's stream behind a streaming task, for `SubscribeToTask`.
    #[serde(default)]
    pub stream_id: Option<String>,
    /// The last event of that stream applied to `task`.
    #[serde(default)]
    pub last_sequence: u64,
    /// Milliseconds since the Unix epoch of the last change (ListTasks sorts by it).
    pub updated_ms: u64,
    /// Webhooks told of the task's changes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub push_configs: Vec<TaskPushNotificationConfig>,
}

impl TaskRecord {
    pub fn state(&self) -> TaskState {
        self.task.status.state
    }

    /// Marks the record changed now.
    pub fn touch(&mut self) {
        self.updated_ms = now_ms();
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// A page of `ListTasks`.
#[derive(Debug, Clone, Default)]
pub struct TaskPage {
    pub tasks: Vec<TaskRecord>,
    pub total: usize,
    /// Offset of the next page, if there is one.
    pub next: Option<usize>,
}

/// What `ListTasks` filters on.
#[derive(Debug, Clone, Default)]
pub struct TaskQuery {
    pub context_id: Option<String>,
    pub state: Option<TaskState>,
    pub updated_after_ms: Option<u64>,
    pub offset: usize,
    pub limit: usize,
}

/// Storage of A2A tasks, per agent.
#[async_trait::async_trait]
pub trait TaskStore: Send + Sync + std::fmt::Debug + 'static {
    /// Stores `record` unless a task created by the same message to the same agent exists;
    /// returns the stored record and whether it is the new one.
    async fn create(&self, record: TaskRecord) -> Result<(TaskRecord, bool), String>;

    /// Replaces a task, unless the stored one is already in a terminal state (a task that
    /// was canceled stays canceled) or is further into the task's stream (another reader
    /// of it got ahead). Returns whether it was written.
    async fn update(&self, record: &TaskRecord) -> Result<bool, String>;

    /// Replaces a task whatever its state.
    async fn put(&self, record: &TaskRecord) -> Result<(), String>;

    async fn get(&self, agent: &str, task_id: &str) -> Result<Option<TaskRecord>, String>;

    /// The agent's tasks that match, most recently changed first.
    async fn list(&self, agent: &str, query: &TaskQuery) -> Result<TaskPage, String>;
}

/// Tasks in this process, the most recent `capacity` kept.
#[derive(Debug)]
pub struct MemoryTaskStore {
    inner: Mutex<Inner>,
    capacity: usize,
}

#[derive(Debug, Default)]
struct Inner {
    /// (agent, task id) → record.
    tasks: HashMap<(String, String), TaskRecord>,
    /// (agent, message id) → task id.
    by_message: HashMap<(String, String), String>,
    /// Creation order, for the capacity bound.
    order: std::collections::VecDeque<(String, String)>,
}

impl MemoryTaskStore {
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            capacity: capacity.max(1),
        }
    }
}

impl Default for MemoryTaskStore {
    fn default() -> Self {
        Self::new(100_000)
    }
}

#[async_trait::async_trait]
impl TaskStore for MemoryTaskStore {
    async fn create(&self, record: TaskRecord) -> Result<(TaskRecord, bool), String> {
        let mut inner = self.inner.lock();
        let message_key = (record.agent.clone(), record.message_id.clone());
        if let Some(existing) = inner
            .by_message
            .get(&message_key)
            .and_then(|id| inner.tasks.get(&(record.agent.clone(), id.clone())))
        {
            return Ok((existing.clone(), false));
        }
        let key = (record.agent.clone(), record.task.id.clone());
        inner.by_message.insert(message_key, record.task.id.clone());
        inner.tasks.insert(key.clone(), record.clone());
        inner.order.push_back(key);
        while inner.order.len() > self.capacity {
            if let Some(old) = inner.order.pop_front() {
                if let Some(gone) = inner.tasks.remove(&old) {
                    inner.by_message.remove(&(gone.agent, gone.message_id));
                }
            }
        }
        Ok((record, true))
    }

    async fn update(&self, record: &TaskRecord) -> Result<bool, String> {
        let mut inner = self.inner.lock();
        let key = (record.agent.clone(), record.task.id.clone());
        match inner.tasks.get_mut(&key) {
            Some(stored)
                if stored.state().is_terminal() || stored.last_sequence > record.last_sequence =>
            {
                Ok(false)
            }
            Some(stored) => {
                *stored = record.clone();
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn put(&self, record: &TaskRecord) -> Result<(), String> {
        let mut inner = self.inner.lock();
        let key = (record.agent.clone(), record.task.id.clone());
        if let Some(stored) = inner.tasks.get_mut(&key) {
            *stored = record.clone();
        }
        Ok(())
    }

    async fn get(&self, agent: &str, task_id: &str) -> Result<Option<TaskRecord>, String> {
        Ok(self
            .inner
            .lock()
            .tasks
            .get(&(agent.to_owned(), task_id.to_owned()))
            .cloned())
    }

    async fn list(&self, agent: &str, query: &TaskQuery) -> Result<TaskPage, String> {
        let inner = self.inner.lock();
        let mut matching: Vec<&TaskRecord> = inner
            .tasks
            .values()
            .filter(|r| r.agent == agent && matches(r, query))
            .collect();
        matching.sort_by(|a, b| {
            b.updated_ms
                .cmp(&a.updated_ms)
                .then_with(|| b.task.id.cmp(&a.task.id))
        });
        Ok(page(matching.into_iter().cloned().collect(), query))
    }
}

/// Whether a record passes the query's filters.
pub fn matches(record: &TaskRecord, query: &TaskQuery) -> bool {
    query
        .context_id
        .as_deref()
        .is_none_or(|c| record.task.context_id == c)
        && query.state.is_none_or(|s| record.state() == s)
        && query.updated_after_ms.is_none_or(|t| record.updated_ms > t)
}

/// The page `query` asks for out of `sorted` matching records.
pub fn page(sorted: Vec<TaskRecord>, query: &TaskQuery) -> TaskPage {
    let total = sorted.len();
    let tasks: Vec<TaskRecord> = sorted
        .into_iter()
        .skip(query.offset)
        .take(query.limit)
        .collect();
    let end = query.offset + tasks.len();
    TaskPage {
        tasks,
        total,
        next: (end < total).then_some(end),
    }
}
