//! Push notifications: webhooks a client registers on a task, told of every change of the
//! task's state. Each notification is a message on the durable queue [`PUSH_QUEUE`] before
//! it is sent, and the node's push worker POSTs it (a `StreamResponse`, the task's
//! `statusUpdate`) to the webhook with the authentication the config names
//! (`Authorization: <scheme> <credentials>`) and its token (`X-A2A-Notification-Token`);
//! a failed delivery is retried with the queue's backoff until it is dead-lettered: at
//! least once, so receivers deduplicate.

use std::{sync::Arc, time::Duration};

use agentmesh_queue::{Leased, NewMessage};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::{
    service::A2aError,
    service::A2aInbound,
    tasks::TaskRecord,
    worker::{MAX_BACKOFF, RECEIVE_WAIT},
};
use crate::types::*;

/// The durable queue of notifications waiting to be delivered.
pub const PUSH_QUEUE: &str = "a2a.push";
/// Header carrying the config's token to the webhook.
pub const TOKEN_HEADER: &str = "X-A2A-Notification-Token";
const LEASE: Duration = Duration::from_secs(60);

impl A2aInbound {
    /// Checks a config from a client and completes it for `task_id`.
    pub(crate) fn admit_push_config(
        task_id: &str,
        mut config: TaskPushNotificationConfig,
    ) -> Result<TaskPushNotificationConfig, A2aError> {
        let url = config.url.trim();
        // Refuse at once what the webhook client could never deliver to.
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(A2aError::params(format!(
                "push notification url {url:?} must be an http:// or https:// URL"
            )));
        }
        if config.id.is_empty() {
            config.id = agentmesh_proto::new_id();
        }
        config.task_id = task_id.to_owned();
        config.tenant = None;
        Ok(config)
    }

    /// `CreateTaskPushNotificationConfig`.
    pub async fn create_push_config(
        &self,
        agent: &str,
        config: TaskPushNotificationConfig,
    ) -> Result<TaskPushNotificationConfig, A2aError> {
        let mut record = self.load(agent, &config.task_id).await?;
        let config = Self::admit_push_config(&record.task.id, config)?;
        record.push_configs.retain(|c| c.id != config.id);
        record.push_configs.push(config.clone());
        self.tasks.put(&record).await.map_err(A2aError::internal)?;
        Ok(config)
    }

    /// `GetTaskPushNotificationConfig`.
    pub async fn get_push_config(
        &self,
        agent: &str,
        request: GetTaskPushNotificationConfigRequest,
    ) -> Result<TaskPushNotificationConfig, A2aError> {
        let record = self.load(agent, &request.task_id).await?;
        record
            .push_configs
            .into_iter()
            .find(|c| c.id == request.id)
            .ok_or_else(|| {
                A2aError::new(
                    A2aErrorKind::TaskNotFound,
                    format!(
                        "task {} has no push notification config {:?}",
                        request.task_id, request.id
                    ),
                )
            })
    }

    /// `ListTaskPushNotificationConfigs`.
    pub async fn list_push_configs(
        &self,
        agent: &str,
        request: ListTaskPushNotificationConfigsRequest,
    ) -> Result<ListTaskPushNotificationConfigsResponse, A2aError> {
        let record = self.load(agent, &request.task_id).await?;
        Ok(ListTaskPushNotificationConfigsResponse {
            configs: record.push_configs,
            next_page_token: String::new(),
        })
    }

    /// `DeleteTaskPushNotificationConfig`.
    pub async fn delete_push_config(
        &self,
        agent: &str,
        request: DeleteTaskPushNotificationConfigRequest,
    ) -> Result<(), A2aError> {
        let mut record = self.load(agent, &request.task_id).await?;
        let before = record.push_configs.len();
        record.push_configs.retain(|c| c.id != request.id);
        if record.push_configs.len() == before {
            return Err(A2aError::new(
                A2aErrorKind::TaskNotFound,
                format!(
                    "task {} has no push notification config {:?}",
                    request.task_id, request.id
                ),
            ));
        }
        self.tasks.put(&record).await.map_err(A2aError::internal)
    }

    /// Queues a notification of the task's current status to each of its webhooks.
    pub(crate) async fn notify(&self, record: &TaskRecord) {
        if record.push_configs.is_empty() {
            return;
        }
        let event = StreamResponse::StatusUpdate(TaskStatusUpdateEvent {
            task_id: record.task.id.clone(),
            context_id: record.task.context_id.clone(),
            status: record.task.status.clone(),
            metadata: None,
        });
        let messages = record
            .push_configs
            .iter()
            .map(|config| {
                let body = json!({ "config": config, "event": event });
                NewMessage {
                    id: agentmesh_proto::new_id(),
                    idempotency_key: Some(format!(
                        "{}:{}:{}:{}",
                        record.task.id,
                        config.id,
                        record.state().as_str(),
                        record.updated_ms
                    )),
                    correlation_id: record.task.context_id.clone(),
                    reply_to: None,
                    body: serde_json::to_vec(&body).unwrap_or_default().into(),
                }
            })
            .collect();
        if let Err(error) = self.queue.submit(PUSH_QUEUE, messages).await {
            tracing::warn!(task = %record.task.id, %error, "A2A push notification not queued");
        }
    }

    /// Starts the push worker; it stops when `shutdown` is cancelled.
    pub fn spawn_push_worker(self: &Arc<Self>, shutdown: CancellationToken) {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let consumer = format!("a2a-push-{}", agentmesh_proto::new_id());
            let builder = reqwest::Client::builder().timeout(Duration::from_secs(10));
            let http = match this
                .http_tls
                .apply(builder)
                .and_then(|b| b.build().map_err(|e| e.to_string()))
            {
                Ok(http) => http,
                Err(error) => {
                    tracing::error!(%error, "A2A push notifications are off: no webhook client");
                    return;
                }
            };
            let mut backoff = this.config.poll_interval;
            loop {
                // The receive waits for a notification to be queued: no polling when idle.
                let received = tokio::select! {
                    () = shutdown.cancelled() => break,
                    received = this.queue.receive(PUSH_QUEUE, &consumer, 16, LEASE, RECEIVE_WAIT) => received,
                };
                let leased = match received {
                    Ok(leased) => {
                        backoff = this.config.poll_interval;
                        leased
                    }
                    Err(error) => {
                        tracing::debug!(%error, "A2A push queue not read");
                        tokio::select! {
                            () = shutdown.cancelled() => break,
                            () = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        continue;
                    }
                };
                let deliveries = leased.into_iter().map(|m| this.deliver(&http, m));
                futures::future::join_all(deliveries).await;
            }
        });
    }

    async fn deliver(&self, http: &reqwest::Client, message: Leased) {
        let outcome = async {
            let body: Value = serde_json::from_slice(&message.body)
                .map_err(|e| format!("not a push notification: {e}"))?;
            let config: TaskPushNotificationConfig =
                serde_json::from_value(body["config"].clone()).map_err(|e| e.to_string())?;
            let mut request = http.post(&config.url).json(&body["event"]);
            if let Some(auth) = &config.authentication {
                let value = match &auth.credentials {
                    Some(credentials) => format!("{} {credentials}", auth.scheme),
                    None => auth.scheme.clone(),
                };
                request = request.header("authorization", value);
            }
            if let Some(token) = &config.token {
                request = request.header(TOKEN_HEADER, token);
            }
            let response = request.send().await.map_err(|e| e.to_string())?;
            if response.status().is_success() {
                Ok(())
            } else {
                Err(format!("the webhook answered {}", response.status()))
            }
        }
        .await;
        let settled = match outcome {
            Ok(()) => self.queue.ack(&message.receipt, None).await,
            Err(error) => self
                .queue
                .nack(&message.receipt, &error, None)
                .await
                .map(|_| ()),
        };
        if let Err(error) = settled {
            tracing::warn!(%error, "A2A push notification not settled");
        }
    }
}
