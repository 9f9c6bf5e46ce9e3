//! A2A tasks in Redis, so that any node answers GetTask, ListTasks and CancelTask for a task
//! sent through any other, and a task survives the node that took it.
//!
//! One string per task (its record as JSON), one per `(agent, messageId)` naming the task
//! it created (the deduplication of retried sends), and one sorted set per agent of its
//! task ids scored by last change (ListTasks). Every key lapses `retention` after the
//! task's last change; ids whose task lapsed are dropped from the set when a listing
//! meets them.

use agentmesh_a2a::inbound::tasks::{TaskPage, TaskQuery, TaskRecord, TaskStore, matches, page};
use redis::{AsyncCommands, Script};
use std::time::Duration;

use crate::store::RedisStore;

/// Stores `ARGV[2]` as task `KEYS[2]` unless message `KEYS[1]` already made one; returns
/// `{1, json}` when stored, `{0, json of the earlier task}` when not.
const CREATE: &str = r"
local earlier = redis.call('GET', KEYS[1])
if earlier then
  local task = redis.call('GET', ARGV[5] .. earlier)
  if task then return {0, task} end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[4])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[4])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
redis.call('PEXPIRE', KEYS[3], ARGV[4])
return {1, ARGV[2]}
";

/// Replaces task `KEYS[1]` with `ARGV[1]` if it exists and (with `ARGV[4]` = 1) is not in
/// a terminal state nor further into its stream than `ARGV[6]`; returns 1 when written.
const UPDATE: &str = r"
local current = redis.call('GET', KEYS[1])
if not current then return 0 end
if ARGV[4] == '1' then
  local stored = cjson.decode(current)
  local state = stored['task']['status']['state']
  if state == 'TASK_STATE_COMPLETED' or state == 'TASK_STATE_FAILED'
     or state == 'TASK_STATE_CANCELED' or state == 'TASK_STATE_REJECTED' then
    return 0
  end
  if (stored['last_sequence'] or 0) > tonumber(ARGV[6]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return 1
";

/// A2A tasks kept in Redis.
#[derive(Debug, Clone)]
pub struct RedisTaskStore {
    store: RedisStore,
    retention: Duration,
    create: Script,
    update: Script,
}

impl RedisTaskStore {
    /// Tasks in `store`, each kept `retention` after its last change.
    pub fn new(store: &RedisStore, retention: Duration) -> Self {
        Self {
            store: store.clone(),
            retention,
            create: Script::new(CREATE),
            update: Script::new(UPDATE),
        }
    }

    fn task_prefix(&self, agent: &str) -> String {
        format!("{}:a2a:task:{agent}:", self.store.keys().prefix())
    }

    fn index(&self, agent: &str) -> String {
        format!("{}:a2a:tasks:{agent}", self.store.keys().prefix())
    }

    fn message(&self, agent: &str, message_id: &str) -> String {
        format!(
            "{}:a2a:msg:{agent}:{message_id}",
            self.store.keys().prefix()
        )
    }

    fn ttl_ms(&self) -> u64 {
        self.retention.as_millis().max(1) as u64
    }

    async fn write(&self, record: &TaskRecord, unless_terminal: bool) -> Result<bool, String> {
        let json = serde_json::to_string(record).map_err(|e| e.to_string())?;
        let written: i64 = self
            .update
            .key(format!(
                "{}{}",
                self.task_prefix(&record.agent),
                record.task.id
            ))
            .key(self.index(&record.agent))
            .arg(json)
            .arg(record.updated_ms)
            .arg(self.ttl_ms())
            .arg(if unless_terminal { "1" } else { "0" })
            .arg(&record.task.id)
            .arg(record.last_sequence)
            .invoke_async(&mut self.store.connection())
            .await
            .map_err(|e| self.failed("writing an A2A task", &e))?;
        Ok(written == 1)
    }

    fn failed(&self, what: &str, error: &redis::RedisError) -> String {
        format!("{what} in Redis at {}: {error}", self.store.address())
    }
}

fn parse(json: &str) -> Result<TaskRecord, String> {
    serde_json::from_str(json).map_err(|e| format!("an A2A task in Redis is not readable: {e}"))
}

#[async_trait::async_trait]
impl TaskStore for RedisTaskStore {
    async fn create(&self, record: TaskRecord) -> Result<(TaskRecord, bool), String> {
        let json = serde_json::to_string(&record).map_err(|e| e.to_string())?;
        let prefix = self.task_prefix(&record.agent);
        let (created, stored): (i64, String) = self
            .create
            .key(self.message(&record.agent, &record.message_id))
            .key(format!("{prefix}{}", record.task.id))
            .key(self.index(&record.agent))
            .arg(&record.task.id)
            .arg(json)
            .arg(record.updated_ms)
            .arg(self.ttl_ms())
            .arg(prefix)
            .invoke_async(&mut self.store.connection())
            .await
            .map_err(|e| self.failed("creating an A2A task", &e))?;
        Ok((parse(&stored)?, created == 1))
    }

    async fn update(&self, record: &TaskRecord) -> Result<bool, String> {
        self.write(record, true).await
    }

    async fn put(&self, record: &TaskRecord) -> Result<(), String> {
        self.write(record, false).await.map(|_| ())
    }

    async fn get(&self, agent: &str, task_id: &str) -> Result<Option<TaskRecord>, String> {
        let json: Option<String> = self
            .store
            .connection()
            .get(format!("{}{task_id}", self.task_prefix(agent)))
            .await
            .map_err(|e| self.failed("reading an A2A task", &e))?;
        json.as_deref().map(parse).transpose()
    }

    async fn list(&self, agent: &str, query: &TaskQuery) -> Result<TaskPage, String> {
        let mut connection = self.store.connection();
        let ids: Vec<String> = connection
            .zrevrange(self.index(agent), 0, -1)
            .await
            .map_err(|e| self.failed("listing A2A tasks", &e))?;
        if ids.is_empty() {
            return Ok(page(Vec::new(), query));
        }
        let prefix = self.task_prefix(agent);
        let keys: Vec<String> = ids.iter().map(|id| format!("{prefix}{id}")).collect();
        let found: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut connection)
            .await
            .map_err(|e| self.failed("listing A2A tasks", &e))?;
        let mut records = Vec::with_capacity(found.len());
        let mut lapsed = Vec::new();
        for (id, json) in ids.iter().zip(found) {
            match json {
                Some(json) => records.push(parse(&json)?),
                None => lapsed.push(id.clone()),
            }
        }
        if !lapsed.is_empty() {
            let _: Result<i64, _> = connection.zrem(self.index(agent), lapsed).await;
        }
        // The set orders by last change already; ties (same millisecond) by id, as in memory.
        records.sort_by(|a, b| {
            b.updated_ms
                .cmp(&a.updated_ms)
                .then_with(|| b.task.id.cmp(&a.task.id))
        });
        records.retain(|r| matches(r, query));
        Ok(page(records, query))
    }
}
