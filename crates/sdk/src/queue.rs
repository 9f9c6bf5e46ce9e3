//! The durable queue from the client side: submit, results, dead letters.

use std::time::Duration;

use agentmesh_proto::v1::{
    AwaitResultRequest, Envelope, GetResultRequest, ListDeadLettersRequest,
    ListDeadLettersResponse, ListQueuesRequest, PurgeDeadLettersRequest, QueueStats,
    RedriveDeadLettersRequest, SubmitOutcome, SubmitRequest, SubmitResponse,
    queue_service_client::QueueServiceClient,
};
use tonic::{Code, Request, Status, metadata::MetadataMap};

use crate::{call_scope, client::MeshClient};

/// Messages sent per `Submit` call by [`MeshClient::submit`] (the node takes at most 50 000).
pub const SUBMIT_CALL_MESSAGES: usize = 10_000;

/// Messages per `SubmitRequest` frame sent by [`MeshClient::submit`].
const SUBMIT_FRAME_MESSAGES: usize = 64;

/// Which dead letters a redrive or purge applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadLetterSelection {
    /// Every dead letter of the queue.
    All,
    /// The dead letters with these message ids.
    Ids(Vec<String>),
}

impl DeadLetterSelection {
    fn split(self) -> (Vec<String>, bool) {
        match self {
            DeadLetterSelection::All => (Vec::new(), true),
            DeadLetterSelection::Ids(ids) => (ids, false),
        }
    }
}

/// Metadata carrying the current handler's correlation id and trace context, if any.
fn context_metadata() -> MetadataMap {
    call_scope::current()
        .map(|scope| scope.call.trace_metadata())
        .unwrap_or_default()
}

fn request<T>(message: T, timeout: Option<Duration>) -> Request<T> {
    let mut request = Request::from_parts(context_metadata(), Default::default(), message);
    if let Some(timeout) = timeout {
        request.set_timeout(timeout);
    }
    request
}

impl MeshClient {
    /// The generated `QueueService` client.
    pub fn queues(&self) -> QueueServiceClient<crate::client::NodeChannel> {
        QueueServiceClient::new(self.node_channel())
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024)
    }

    /// Submits `envelopes` to `queue`; returns once each is durable (or known to be a
    /// duplicate or rejected), with one outcome per envelope, in order.
    ///
    /// Envelopes without an id get a UUIDv7. A message that starts a chain (no correlation
    /// id, and not sent from inside a handler) is correlated by its own id, so its result can
    /// be fetched with [`MeshClient::get_result`] under the `message_id` of its outcome.
    /// Inside a handler, messages inherit the handled call's correlation id and are caused by
    /// it. Large batches are split into several `Submit` calls.
    pub async fn submit(
        &self,
        queue: &str,
        envelopes: impl IntoIterator<Item = Envelope>,
    ) -> Result<SubmitResponse, Status> {
        let scope = call_scope::current();
        let envelopes: Vec<Envelope> = envelopes
            .into_iter()
            .map(|mut envelope| {
                if envelope.id.is_empty() {
                    envelope.id = agentmesh_proto::new_id();
                }
                if let Some(scope) = &scope {
                    envelope.follow(&scope.call, &scope.message_id);
                }
                if envelope.correlation_id.is_empty() {
                    envelope.correlation_id = envelope.id.clone();
                }
                envelope
            })
            .collect();
        let mut total = SubmitResponse::default();
        let mut client = self.queues();
        let mut offset = 0u32;
        let mut envelopes = envelopes.into_iter().peekable();
        while envelopes.peek().is_some() {
            let call: Vec<Envelope> = envelopes.by_ref().take(SUBMIT_CALL_MESSAGES).collect();
            let sent = call.len() as u32;
            // Several messages a frame: less per-frame work on both ends.
            let mut call = call.into_iter().peekable();
            let mut frames = Vec::new();
            while call.peek().is_some() {
                frames.push(SubmitRequest {
                    queue: queue.to_owned(),
                    envelope: None,
                    envelopes: call.by_ref().take(SUBMIT_FRAME_MESSAGES).collect(),
                });
            }
            let response = client
                .submit(request(futures::stream::iter(frames), None))
                .await?
                .into_inner();
            total.accepted += response.accepted;
            total.duplicates += response.duplicates;
            total.rejected += response.rejected;
            total
                .outcomes
                .extend(response.outcomes.into_iter().map(|o| SubmitOutcome {
                    index: o.index + offset,
                    ..o
                }));
            offset += sent;
        }
        Ok(total)
    }

    /// The result stored for `correlation_id`, or `None` if there is none (yet).
    pub async fn get_result(&self, correlation_id: &str) -> Result<Option<Envelope>, Status> {
        self.fetch_result(correlation_id, false, None).await
    }

    /// Waits up to `timeout` for the result of `correlation_id` (one long-poll);
    /// `None` if it did not arrive in time.
    pub async fn wait_result(
        &self,
        correlation_id: &str,
        timeout: Duration,
    ) -> Result<Option<Envelope>, Status> {
        self.fetch_result(correlation_id, true, Some(timeout)).await
    }

    async fn fetch_result(
        &self,
        correlation_id: &str,
        wait: bool,
        timeout: Option<Duration>,
    ) -> Result<Option<Envelope>, Status> {
        let message = GetResultRequest {
            correlation_id: correlation_id.to_owned(),
            wait,
        };
        match self.queues().get_result(request(message, timeout)).await {
            Ok(response) => Ok(response.into_inner().result),
            Err(status) if status.code() == Code::NotFound => Ok(None),
            Err(status) if wait && status.code() == Code::DeadlineExceeded => Ok(None),
            Err(status) => Err(status),
        }
    }

    /// Waits (with `AwaitResult`, which keeps the connection alive) until the result of
    /// `correlation_id` lands, and returns it; `timeout` bounds the wait (`None`: no bound).
    pub async fn await_result(
        &self,
        correlation_id: &str,
        timeout: Option<Duration>,
    ) -> Result<Envelope, Status> {
        let message = AwaitResultRequest {
            correlation_id: correlation_id.to_owned(),
        };
        let mut events = self
            .queues()
            .await_result(request(message, timeout))
            .await?
            .into_inner();
        while let Some(event) = events.message().await? {
            if let Some(result) = event.result {
                return Ok(result);
            }
        }
        Err(Status::unavailable(format!(
            "the node ended AwaitResult for {correlation_id} without a result"
        )))
    }

    /// Depth, in-flight count, dead letters and oldest age of every queue.
    pub async fn list_queues(&self) -> Result<Vec<QueueStats>, Status> {
        Ok(self
            .queues()
            .list_queues(request(ListQueuesRequest {}, None))
            .await?
            .into_inner()
            .queues)
    }

    /// One page of `queue`'s dead letters (`page_size` 0: the node's default of 100).
    pub async fn list_dead_letters(
        &self,
        queue: &str,
        page_size: u32,
        page_token: &str,
    ) -> Result<ListDeadLettersResponse, Status> {
        let message = ListDeadLettersRequest {
            queue: queue.to_owned(),
            page_size,
            page_token: page_token.to_owned(),
        };
        Ok(self
            .queues()
            .list_dead_letters(request(message, None))
            .await?
            .into_inner())
    }

    /// Moves the selected dead letters back into `queue`; returns how many moved.
    pub async fn redrive_dead_letters(
        &self,
        queue: &str,
        selection: DeadLetterSelection,
    ) -> Result<u64, Status> {
        let (message_ids, all) = selection.split();
        let message = RedriveDeadLettersRequest {
            queue: queue.to_owned(),
            message_ids,
            all,
        };
        Ok(self
            .queues()
            .redrive_dead_letters(request(message, None))
            .await?
            .into_inner()
            .redriven)
    }

    /// Deletes the selected dead letters of `queue`; returns how many were deleted.
    pub async fn purge_dead_letters(
        &self,
        queue: &str,
        selection: DeadLetterSelection,
    ) -> Result<u64, Status> {
        let (message_ids, all) = selection.split();
        let message = PurgeDeadLettersRequest {
            queue: queue.to_owned(),
            message_ids,
            all,
        };
        Ok(self
            .queues()
            .purge_dead_letters(request(message, None))
            .await?
            .into_inner()
            .purged)
    }
}
