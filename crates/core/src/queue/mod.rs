//! The durable, at-least-once queue's operations (`QueueService`), over a
//! [`QueueBackend`] (the embedded redb store by default), each written once and served by
//! both faces through [`QueueApi`]:
//!
//! - [`submit`]: `Submit` reads the client's stream in chunks and hands each chunk to the
//!   backend while it keeps reading, so a long stream is pipelined and concurrent callers
//!   share fsyncs (the backend group-commits). A message is reported `ACCEPTED` only once
//!   it is durable.
//! - [`consume`]: `Consume` keeps at most `prefetch` deliveries outstanding: it long-polls
//!   the backend for as many messages as there is credit, and settles acks, nacks and
//!   extends concurrently (each answered by a receipt). When the consumer goes away
//!   (closes, crashes, drops its connection), whatever it still holds is failed at once,
//!   one failed attempt each ("consumer went away"), so others get it promptly and a
//!   message that kills its consumers reaches the dead letters. Only a node shutting down
//!   gracefully hands deliveries back without counting an attempt. An `extend` with a zero
//!   lease hands one delivery back without counting one (what a draining worker does with
//!   messages it will not start).
//! - [`results`]: results stored by correlation id, read, waited for or streamed.
//! - [`dead_letters`]: list, redrive and purge.
//! - this file: the store's lifecycle ([`QueueHandle`]), queue statistics, and
//!   [`queue_error_status`], the one place where a [`QueueError`] becomes a gRPC status
//!   (a storage failure is `UNAVAILABLE` for the call, never a crash of the node).

mod consume;
mod dead_letters;
mod results;
mod submit;

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use agentmesh_proto::{
    CallContext, ERROR_DOMAIN,
    v1::{
        AwaitResultRequest, AwaitResultResponse, ConsumeRequest, ConsumeResponse, Envelope,
        GetResultRequest, GetResultResponse, ListDeadLettersRequest, ListDeadLettersResponse,
        ListQueuesRequest, ListQueuesResponse, PurgeDeadLettersRequest, PurgeDeadLettersResponse,
        QueueStats, RedriveDeadLettersRequest, RedriveDeadLettersResponse, SubmitRequest,
        SubmitResponse,
    },
};
use agentmesh_queue::{BackendConfig, EmbeddedBackend, QueueBackend, QueueError};
use bytes::Bytes;
use futures::StreamExt;
use prost::Message;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::access::{Access, Action};
use crate::api::{EventStream, QueueApi};
use crate::journal::{NoJournal, TraceJournal};

pub use consume::ConsumeFrames;

/// Default data directory of the embedded queue store (relative to the working directory).
pub const DEFAULT_DATA_DIR: &str = "./agentmesh-data";
/// Prefetch of a consumer that asks for none.
pub const DEFAULT_PREFETCH: u32 = 16;
/// Largest prefetch a consumer gets.
pub const MAX_PREFETCH: u32 = 4096;
/// Lease of a consumer that asks for none.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// Longest lease a consumer can ask for.
pub const MAX_LEASE: Duration = Duration::from_secs(12 * 3600);
/// Most messages one `Submit` call takes (its response must stay under 4 MiB).
pub const MAX_SUBMIT_MESSAGES: usize = 50_000;

/// `google.rpc.ErrorInfo` reason of a submit refused because the queue's disk is full (HTTP
/// 507 at the gateway).
pub const QUEUE_STORAGE_FULL: &str = "QUEUE_STORAGE_FULL";

/// Settings of the node's queue.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueSettings {
    /// Directory of the embedded store (created if missing). Default `./agentmesh-data`.
    pub data_dir: PathBuf,
    /// Delivery policy: max attempts, dedup window, backoff, result TTL, per-queue overrides.
    pub backend: BackendConfig,
    /// Interval of keep-alive events on `AwaitResult` streams.
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
}

impl Default for QueueSettings {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            backend: BackendConfig::default(),
            keep_alive: Duration::from_secs(5),
        }
    }
}

/// The queue backend a node serves, and whether the node closes it on shutdown.
#[derive(Clone)]
pub struct QueueHandle {
    backend: Arc<dyn QueueBackend>,
    embedded: Option<Arc<EmbeddedBackend>>,
}

impl std::fmt::Debug for QueueHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueHandle")
            .field("embedded", &self.embedded.as_ref().map(|e| e.path()))
            .finish_non_exhaustive()
    }
}

impl QueueHandle {
    /// Opens (or creates) the embedded store in `settings.data_dir`, off the async threads.
    ///
    /// Fails with a message naming the path when the directory cannot be created or written,
    /// or the database cannot be opened (e.g. it is locked by another node).
    pub async fn open(settings: &QueueSettings) -> Result<Self, QueueError> {
        let dir = settings.data_dir.clone();
        let config = settings.backend.clone();
        let shown = dir.display().to_string();
        let backend = tokio::task::spawn_blocking(move || EmbeddedBackend::open(&dir, config))
            .await
            .map_err(|e| {
                QueueError::Storage(format!("opening the queue store in {shown} failed: {e}"))
            })??;
        let embedded = Arc::new(backend);
        Ok(Self {
            backend: embedded.clone(),
            embedded: Some(embedded),
        })
    }

    /// Wraps any backend; [`QueueHandle::close`] leaves it open.
    pub fn from_backend(backend: Arc<dyn QueueBackend>) -> Self {
        Self {
            backend,
            embedded: None,
        }
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn QueueBackend> {
        &self.backend
    }

    /// Write counters of the embedded store, if this handle opened one.
    pub fn io_stats(&self) -> Option<agentmesh_queue::IoStats> {
        self.embedded.as_ref().map(|e| e.io_stats())
    }

    /// Flushes and closes an embedded store opened by [`QueueHandle::open`] (releasing its
    /// directory); does nothing for a backend given with [`QueueHandle::from_backend`].
    pub async fn close(&self) {
        if let Some(embedded) = self.embedded.clone() {
            let _ = tokio::task::spawn_blocking(move || embedded.close()).await;
        }
    }
}

/// The status for a queue error: the one place where backend failures become gRPC codes.
pub fn queue_error_status(error: QueueError) -> Status {
    let (code, reason) = match &error {
        QueueError::NotFound(_) => (Code::NotFound, "NOT_FOUND"),
        QueueError::LeaseLost(_) => (Code::FailedPrecondition, "LEASE_LOST"),
        QueueError::InvalidArgument(_) => (Code::InvalidArgument, "INVALID_ARGUMENT"),
        QueueError::Storage(_) => (Code::Unavailable, "QUEUE_STORAGE_UNAVAILABLE"),
        QueueError::StorageFull(_) => (Code::ResourceExhausted, QUEUE_STORAGE_FULL),
        QueueError::Closed => (Code::Unavailable, "QUEUE_CLOSED"),
    };
    let message = match error {
        QueueError::NotFound(m) | QueueError::LeaseLost(m) | QueueError::InvalidArgument(m) => m,
        QueueError::Storage(m) => format!("queue storage unavailable: {m}"),
        QueueError::StorageFull(m) => {
            format!(
                "queue storage is full; the messages were not acknowledged (free disk space and send them again): {m}"
            )
        }
        QueueError::Closed => "the queue is closed (the node is shutting down)".to_owned(),
    };
    Status::with_error_details(
        code,
        message,
        ErrorDetails::with_error_info(reason, ERROR_DOMAIN, HashMap::new()),
    )
}

fn timestamp(time: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(time)
}

fn duration(what: &str, d: Option<prost_types::Duration>) -> Result<Option<Duration>, Status> {
    d.map(|d| {
        Duration::try_from(d)
            .map_err(|_| Status::invalid_argument(format!("{what} must not be negative")))
    })
    .transpose()
}

/// The stored envelope of a message; a body that does not decode (written by something else)
/// comes back as a binary payload rather than being lost.
fn decode_envelope(body: &Bytes, message_id: &str) -> Envelope {
    Envelope::decode(body.clone()).unwrap_or_else(|_| Envelope {
        id: message_id.to_owned(),
        content_type: "application/octet-stream".into(),
        payload: Some(agentmesh_proto::v1::envelope::Payload::Binary(
            body.to_vec(),
        )),
        ..Default::default()
    })
}

/// The queue's operations over one backend; both faces call them through [`QueueApi`].
#[derive(Clone)]
pub struct Queues {
    backend: Arc<dyn QueueBackend>,
    keep_alive: Duration,
    shutdown: CancellationToken,
    journal: Arc<dyn TraceJournal>,
    access: Arc<Access>,
}

impl std::fmt::Debug for Queues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queues").finish_non_exhaustive()
    }
}

impl Queues {
    /// The operations over `backend`; `keep_alive` paces `AwaitResult`'s empty events, and
    /// `shutdown` ends open streams.
    pub fn new(
        backend: Arc<dyn QueueBackend>,
        keep_alive: Duration,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            backend,
            keep_alive: keep_alive.max(Duration::from_millis(10)),
            shutdown,
            journal: Arc::new(NoJournal),
            access: Arc::new(Access::open()),
        }
    }

    /// The same operations enforcing `access` (submit, consume, dead letters, results).
    pub fn with_access(mut self, access: Arc<Access>) -> Self {
        self.access = access;
        self
    }

    /// The same operations recording submits and deliveries in `journal`.
    pub fn with_journal(mut self, journal: Arc<dyn TraceJournal>) -> Self {
        self.journal = journal;
        self
    }
}

#[tonic::async_trait]
impl QueueApi for Queues {
    async fn submit(
        &self,
        ctx: CallContext,
        frames: EventStream<SubmitRequest>,
    ) -> Result<SubmitResponse, Status> {
        // Every frame names its queue: one the caller may not submit to ends the call.
        let frames = if self.access.enforced() {
            let access = Arc::clone(&self.access);
            let call = ctx.clone();
            frames
                .map(move |frame| {
                    let frame = frame?;
                    access.check(&call, Action::Submit, &frame.queue)?;
                    Ok(frame)
                })
                .boxed()
        } else {
            frames
        };
        self.submit_stream(ctx, frames).await
    }

    async fn consume(
        &self,
        ctx: CallContext,
        inbound: EventStream<ConsumeRequest>,
    ) -> Result<EventStream<ConsumeResponse>, Status> {
        Ok(self.open_consumer(&ctx, inbound).await?.boxed())
    }

    async fn list_queues(
        &self,
        ctx: CallContext,
        _request: ListQueuesRequest,
    ) -> Result<ListQueuesResponse, Status> {
        let mut stats = self.backend.stats().await.map_err(queue_error_status)?;
        // A caller sees the queues it may submit to or consume.
        if self.access.enforced() {
            let who = ctx.principal.as_ref();
            stats.retain(|s| {
                self.access.allows(who, Action::Submit, &s.name)
                    || self.access.allows(who, Action::Consume, &s.name)
            });
        }
        Ok(ListQueuesResponse {
            queues: stats
                .into_iter()
                .map(|s| QueueStats {
                    name: s.name,
                    depth: s.depth,
                    in_flight: s.in_flight,
                    dead_letters: s.dead_letters,
                    oldest_age: s
                        .oldest_age
                        .and_then(|a| prost_types::Duration::try_from(a).ok()),
                })
                .collect(),
        })
    }

    async fn list_dead_letters(
        &self,
        ctx: CallContext,
        request: ListDeadLettersRequest,
    ) -> Result<ListDeadLettersResponse, Status> {
        self.access.check(&ctx, Action::Consume, &request.queue)?;
        self.list_dead(request).await
    }

    async fn redrive_dead_letters(
        &self,
        ctx: CallContext,
        request: RedriveDeadLettersRequest,
    ) -> Result<RedriveDeadLettersResponse, Status> {
        self.access.check(&ctx, Action::Redrive, &request.queue)?;
        self.redrive(request).await
    }

    async fn purge_dead_letters(
        &self,
        ctx: CallContext,
        request: PurgeDeadLettersRequest,
    ) -> Result<PurgeDeadLettersResponse, Status> {
        self.access.check(&ctx, Action::Purge, &request.queue)?;
        self.purge(request).await
    }

    async fn get_result(
        &self,
        ctx: CallContext,
        request: GetResultRequest,
    ) -> Result<GetResultResponse, Status> {
        self.access
            .check(&ctx, Action::ReadResults, &request.correlation_id)?;
        self.result(ctx, request).await
    }

    async fn await_result(
        &self,
        ctx: CallContext,
        request: AwaitResultRequest,
    ) -> Result<EventStream<AwaitResultResponse>, Status> {
        self.access
            .check(&ctx, Action::ReadResults, &request.correlation_id)?;
        let rx = self.result_events(ctx, request)?;
        Ok(tokio_stream::wrappers::ReceiverStream::new(rx).boxed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_every_queue_error_once() {
        let cases = [
            (QueueError::NotFound("q".into()), Code::NotFound),
            (QueueError::LeaseLost("r".into()), Code::FailedPrecondition),
            (
                QueueError::InvalidArgument("x".into()),
                Code::InvalidArgument,
            ),
            (
                QueueError::Storage("read-only file system at /d".into()),
                Code::Unavailable,
            ),
            (
                QueueError::StorageFull("no space at /d".into()),
                Code::ResourceExhausted,
            ),
            (QueueError::Closed, Code::Unavailable),
        ];
        for (error, code) in cases {
            let status = queue_error_status(error);
            assert_eq!(status.code(), code);
        }
        let status = queue_error_status(QueueError::StorageFull("no space at /d".into()));
        assert!(status.message().contains("no space at /d"), "{status:?}");
    }
}
