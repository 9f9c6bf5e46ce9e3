//! `agentmesh.v1.QueueService`: the durable, at-least-once queue, over a
//! [`QueueBackend`] (the embedded redb store by default).
//!
//! - `Submit` reads the client's stream in chunks and hands each chunk to the
//!   backend while it keeps reading, so a long stream is pipelined and
//!   concurrent callers share fsyncs (the backend group-commits). A message
//!   is reported `ACCEPTED` only once it is durable.
//! - `Consume` keeps at most `prefetch` deliveries outstanding: it long-polls
//!   the backend for as many messages as there is credit, and settles acks,
//!   nacks and extends concurrently (each answered by a `ConsumeReceipt`).
//!   When the consumer goes away, whatever it still holds is released at
//!   once (not counted as a failed attempt), so others get it promptly. An
//!   `extend` with a zero lease releases one delivery the same way (what a
//!   draining worker does with messages it will not start).
//! - The same service answers the HTTP gateway through [`QueueApi`].
//!
//! Every [`QueueError`] becomes a gRPC status in one place,
//! [`queue_error_status`]; a storage failure is `UNAVAILABLE` for the call,
//! never a crash of the node.

use std::{
    collections::HashMap,
    path::PathBuf,
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use agentmesh_gateway::{EventStream, QueueApi};
use agentmesh_proto::v1::{
    AwaitResultRequest, AwaitResultResponse, ConsumeAck, ConsumeExtend, ConsumeNack,
    ConsumeReceipt, ConsumeRequest, ConsumeResponse, ConsumeSubscribe, DeadLetter, Delivery,
    DeliveryAttempt, DeliveryBatch, Envelope, ErrorStatus, GetResultRequest, GetResultResponse,
    ListDeadLettersRequest, ListDeadLettersResponse, ListQueuesRequest, ListQueuesResponse,
    PurgeDeadLettersRequest, PurgeDeadLettersResponse, QueueStats, ReceiptBatch,
    RedriveDeadLettersRequest, RedriveDeadLettersResponse, SubmitOutcome, SubmitRequest,
    SubmitResponse, SubmitStatus, consume_request::Action, consume_response::Event,
    queue_service_server,
};
use agentmesh_queue::{
    BackendConfig, EmbeddedBackend, Leased, MAX_BODY_BYTES, NewMessage, QueueBackend, QueueError,
    Selection, SubmitFate,
};
use bytes::Bytes;
use futures::{Stream, StreamExt, future::BoxFuture, stream::FuturesUnordered};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status, Streaming};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{
    error::ERROR_DOMAIN,
    router::{CallInfo, caller_set_deadline},
};

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

/// Messages handed to the backend in one `submit` call at most.
const SUBMIT_CHUNK: usize = 1024;
/// Backend `submit` calls one `Submit` stream keeps in flight at most.
const SUBMIT_PIPELINE: usize = 8;
/// How long one backend long-poll waits before it is renewed.
const LONG_POLL: Duration = Duration::from_secs(10);
/// Most consumer frames read in one turn of a `Consume` loop.
const MAX_FRAMES_PER_TURN: usize = 1024;
/// How long a `Consume` call waits for its `subscribe` frame.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(30);

/// Settings of the node's queue.
#[derive(Debug, Clone)]
pub struct QueueSettings {
    /// Directory of the embedded store (created if missing). Default `./agentmesh-data`.
    pub data_dir: PathBuf,
    /// Delivery policy: max attempts, dedup window, backoff, result TTL, per-queue overrides.
    pub backend: BackendConfig,
    /// Interval of keep-alive events on `AwaitResult` streams.
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
        QueueError::StorageFull(_) => (
            Code::ResourceExhausted,
            agentmesh_gateway::QUEUE_STORAGE_FULL,
        ),
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

fn error_status(status: &Status) -> ErrorStatus {
    ErrorStatus {
        code: status.code() as i32,
        message: status.message().to_owned(),
    }
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

/// The node's `agentmesh.v1.QueueService` (and the gateway's [`QueueApi`]).
#[derive(Clone)]
pub struct QueueService {
    backend: Arc<dyn QueueBackend>,
    default_timeout: Duration,
    keep_alive: Duration,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for QueueService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueService").finish_non_exhaustive()
    }
}

/// Where one submitted message stands.
enum Slot {
    Ready(SubmitOutcome),
    Pending,
}

impl QueueService {
    /// A service over `backend`. `default_timeout` is the deadline of calls that arrive
    /// without the node's deadline layer; `shutdown` ends open streams.
    pub fn new(
        backend: Arc<dyn QueueBackend>,
        default_timeout: Duration,
        keep_alive: Duration,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            backend,
            default_timeout,
            keep_alive: keep_alive.max(Duration::from_millis(10)),
            shutdown,
        }
    }

    fn call<T>(&self, request: &Request<T>) -> CallInfo {
        CallInfo::of(request, self.default_timeout)
    }

    /// Turns the messages of one `SubmitRequest` (`envelope`, then `envelopes`) into backend
    /// messages for its queue, or the reason each is rejected; `received_at` becomes the
    /// `created_at` of those without one. A frame without any message counts as one, rejected.
    fn prepare(
        call: &CallInfo,
        request: SubmitRequest,
        received_at: &prost_types::Timestamp,
    ) -> (String, Vec<Result<NewMessage, String>>) {
        let bad_queue = if request.queue.is_empty() {
            Some("queue is required".to_owned())
        } else {
            agentmesh_queue::validate_queue_name(&request.queue)
                .map_err(|e| match e {
                    QueueError::InvalidArgument(m) => m,
                    other => other.to_string(),
                })
                .err()
        };
        let envelopes: Vec<Envelope> = request
            .envelope
            .map(|e| *e)
            .into_iter()
            .chain(request.envelopes)
            .collect();
        let messages = if envelopes.is_empty() {
            vec![Err("envelope is required".to_owned())]
        } else {
            envelopes
                .into_iter()
                .map(|envelope| match &bad_queue {
                    Some(reason) => Err(reason.clone()),
                    None => Self::prepare_envelope(call, envelope, received_at),
                })
                .collect()
        };
        (request.queue, messages)
    }

    /// Stamps one envelope (id, correlation id, `created_at`) and encodes it for storage.
    fn prepare_envelope(
        call: &CallInfo,
        mut envelope: Envelope,
        received_at: &prost_types::Timestamp,
    ) -> Result<NewMessage, String> {
        if envelope.id.is_empty() {
            envelope.id = uuid::Uuid::now_v7().to_string();
        }
        if envelope.correlation_id.is_empty() {
            envelope.correlation_id = call.correlation_id.clone();
        }
        if envelope.created_at.is_none() {
            envelope.created_at = Some(*received_at);
        }
        envelope.attempt = 0;
        let size = envelope.encoded_len();
        if size > MAX_BODY_BYTES {
            return Err(format!(
                "envelope is {size} bytes, the limit is {MAX_BODY_BYTES}"
            ));
        }
        let message = NewMessage {
            id: envelope.id.clone(),
            idempotency_key: (!envelope.idempotency_key.is_empty())
                .then(|| envelope.idempotency_key.clone()),
            correlation_id: envelope.correlation_id.clone(),
            reply_to: (!envelope.reply_to.is_empty()).then(|| envelope.reply_to.clone()),
            body: Bytes::from(envelope.encode_to_vec()),
        };
        Ok(message)
    }

    /// Reads `input` to its end, submitting chunks to the backend as they fill while it
    /// keeps reading; one outcome per message, in order.
    async fn submit_stream<S>(&self, call: CallInfo, mut input: S) -> Result<SubmitResponse, Status>
    where
        S: Stream<Item = Result<SubmitRequest, Status>> + Unpin + Send,
    {
        type Done = (Vec<u32>, Result<Vec<SubmitFate>, QueueError>);
        let mut slots: Vec<Slot> = Vec::new();
        let mut in_flight: FuturesUnordered<BoxFuture<'static, Done>> = FuturesUnordered::new();
        let mut chunk: HashMap<String, (Vec<u32>, Vec<NewMessage>)> = HashMap::new();
        let mut chunk_len = 0usize;
        let mut ended = false;
        let mut storage_error: Option<QueueError> = None;
        loop {
            // Settle what the backend finished first, then read on while the pipeline has room.
            tokio::select! {
                biased;
                Some((indices, fates)) = in_flight.next(), if !in_flight.is_empty() => {
                    match fates {
                        Ok(fates) => {
                            for (index, fate) in indices.into_iter().zip(fates) {
                                slots[index as usize] = Slot::Ready(outcome(index, fate));
                            }
                        }
                        // Other chunks may be stored already: say which messages were not.
                        Err(error) => {
                            let reason = queue_error_status(error.clone()).message().to_owned();
                            for index in indices {
                                slots[index as usize] = Slot::Ready(SubmitOutcome {
                                    index,
                                    status: SubmitStatus::Rejected as i32,
                                    message_id: String::new(),
                                    reason: reason.clone(),
                                });
                            }
                            storage_error.get_or_insert(error);
                        }
                    }
                }
                item = input.next(), if !ended && in_flight.len() < SUBMIT_PIPELINE => {
                    let mut item = item;
                    let received_at = timestamp(SystemTime::now());
                    loop {
                        match item {
                            None => {
                                ended = true;
                                break;
                            }
                            Some(Err(status)) => return Err(status),
                            Some(Ok(request)) => {
                                let (queue, messages) =
                                    Self::prepare(&call, request, &received_at);
                                if slots.len() + messages.len() > MAX_SUBMIT_MESSAGES {
                                    return Err(Status::resource_exhausted(format!(
                                        "a Submit call takes at most {MAX_SUBMIT_MESSAGES} messages; \
                                         send the rest in another call"
                                    )));
                                }
                                let entry = chunk.entry(queue).or_default();
                                for message in messages {
                                    let index = slots.len() as u32;
                                    match message {
                                        Ok(message) => {
                                            slots.push(Slot::Pending);
                                            entry.0.push(index);
                                            entry.1.push(message);
                                            chunk_len += 1;
                                        }
                                        Err(reason) => slots.push(Slot::Ready(SubmitOutcome {
                                            index,
                                            status: SubmitStatus::Rejected as i32,
                                            message_id: String::new(),
                                            reason,
                                        })),
                                    }
                                }
                            }
                        }
                        if chunk_len >= SUBMIT_CHUNK {
                            break;
                        }
                        // Take whatever else has already arrived, without waiting.
                        match futures::FutureExt::now_or_never(input.next()) {
                            Some(next) => item = next,
                            None => break,
                        }
                    }
                    for (queue, (indices, messages)) in chunk.drain() {
                        if messages.is_empty() {
                            continue;
                        }
                        let backend = self.backend.clone();
                        in_flight.push(Box::pin(async move {
                            let fates = backend.submit(&queue, messages).await;
                            (indices, fates)
                        }));
                    }
                    chunk_len = 0;
                }
                else => break,
            }
        }
        let mut response = SubmitResponse {
            outcomes: Vec::with_capacity(slots.len()),
            ..Default::default()
        };
        for (index, slot) in slots.into_iter().enumerate() {
            let outcome = match slot {
                Slot::Ready(outcome) => outcome,
                Slot::Pending => {
                    return Err(Status::internal(format!(
                        "message {index} of the Submit stream got no outcome"
                    )));
                }
            };
            match SubmitStatus::try_from(outcome.status) {
                Ok(SubmitStatus::Accepted) => response.accepted += 1,
                Ok(SubmitStatus::Duplicate) => response.duplicates += 1,
                _ => response.rejected += 1,
            }
            response.outcomes.push(outcome);
        }
        // Nothing stored: the storage error is the answer (with its code); otherwise the
        // outcomes tell which messages were stored and which may be sent again.
        match storage_error {
            Some(error) if response.accepted == 0 && response.duplicates == 0 => {
                Err(queue_error_status(error))
            }
            _ => Ok(response),
        }
    }

    async fn list_queues_inner(&self) -> Result<ListQueuesResponse, Status> {
        let stats = self.backend.stats().await.map_err(queue_error_status)?;
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

    async fn list_dead_letters_inner(
        &self,
        request: ListDeadLettersRequest,
    ) -> Result<ListDeadLettersResponse, Status> {
        let page_size = match request.page_size {
            0 => 100,
            n => n as usize,
        };
        let after = (!request.page_token.is_empty()).then_some(request.page_token.as_str());
        let (dead, next) = self
            .backend
            .list_dead_letters(&request.queue, page_size, after)
            .await
            .map_err(queue_error_status)?;
        Ok(ListDeadLettersResponse {
            dead_letters: dead
                .into_iter()
                .map(|d| DeadLetter {
                    envelope: Some(decode_envelope(&d.body, &d.message_id)),
                    message_id: d.message_id,
                    queue: request.queue.clone(),
                    last_error: d.last_error,
                    attempts: d
                        .attempts
                        .into_iter()
                        .map(|a| DeliveryAttempt {
                            attempt: a.attempt,
                            delivered_at: Some(timestamp(a.delivered_at)),
                            consumer_id: a.consumer_id,
                            error: a.error,
                        })
                        .collect(),
                    dead_lettered_at: Some(timestamp(d.dead_lettered_at)),
                })
                .collect(),
            next_page_token: next.unwrap_or_default(),
        })
    }

    fn selection(ids: Vec<String>, all: bool) -> Result<Selection, Status> {
        if all {
            Ok(Selection::All)
        } else if ids.is_empty() {
            Err(Status::invalid_argument(
                "say which dead letters: set all, or list message_ids",
            ))
        } else {
            Ok(Selection::Ids(ids))
        }
    }

    async fn redrive_inner(
        &self,
        request: RedriveDeadLettersRequest,
    ) -> Result<RedriveDeadLettersResponse, Status> {
        let selection = Self::selection(request.message_ids, request.all)?;
        let redriven = self
            .backend
            .redrive(&request.queue, selection)
            .await
            .map_err(queue_error_status)?;
        Ok(RedriveDeadLettersResponse { redriven })
    }

    async fn purge_inner(
        &self,
        request: PurgeDeadLettersRequest,
    ) -> Result<PurgeDeadLettersResponse, Status> {
        let selection = Self::selection(request.message_ids, request.all)?;
        let purged = self
            .backend
            .purge(&request.queue, selection)
            .await
            .map_err(queue_error_status)?;
        Ok(PurgeDeadLettersResponse { purged })
    }

    async fn get_result_inner(
        &self,
        call: CallInfo,
        request: GetResultRequest,
    ) -> Result<GetResultResponse, Status> {
        let correlation_id = request.correlation_id;
        if correlation_id.is_empty() {
            return Err(Status::invalid_argument("correlation_id is required"));
        }
        let found = if request.wait {
            // Answer just before the caller's deadline, so it gets NOT_FOUND, not a timeout.
            let remaining = call.deadline.remaining();
            let budget = remaining.saturating_sub((remaining / 20).min(Duration::from_millis(50)));
            tokio::select! {
                found = self.backend.wait_result(&correlation_id, budget) => found,
                _ = self.shutdown.cancelled() => Err(QueueError::Closed),
            }
        } else {
            self.backend.get_result(&correlation_id).await
        }
        .map_err(queue_error_status)?;
        match found {
            Some(body) => Ok(GetResultResponse {
                result: Some(decode_result(&body)?),
            }),
            None => Err(Status::with_error_details(
                Code::NotFound,
                format!("no result for correlation id {correlation_id} (yet)"),
                ErrorDetails::with_error_info(
                    "RESULT_NOT_FOUND",
                    ERROR_DOMAIN,
                    [("correlation_id".to_owned(), correlation_id.clone())],
                ),
            )),
        }
    }

    fn await_result_inner(
        &self,
        call: CallInfo,
        explicit_deadline: bool,
        request: AwaitResultRequest,
    ) -> Result<mpsc::Receiver<Result<AwaitResultResponse, Status>>, Status> {
        let correlation_id = request.correlation_id;
        if correlation_id.is_empty() {
            return Err(Status::invalid_argument("correlation_id is required"));
        }
        let (tx, rx) = mpsc::channel(2);
        let backend = self.backend.clone();
        let shutdown = self.shutdown.clone();
        let keep_alive = self.keep_alive;
        let deadline = explicit_deadline.then_some(call.deadline);
        tokio::spawn(async move {
            loop {
                let wait = match deadline {
                    Some(d) if d.remaining().is_zero() => {
                        let _ = tx
                            .send(Err(Status::deadline_exceeded(format!(
                                "no result for correlation id {correlation_id} before the deadline"
                            ))))
                            .await;
                        return;
                    }
                    Some(d) => keep_alive.min(d.remaining()),
                    None => keep_alive,
                };
                let found = tokio::select! {
                    found = backend.wait_result(&correlation_id, wait) => found,
                    _ = tx.closed() => return,
                    _ = shutdown.cancelled() => Err(QueueError::Closed),
                };
                let event = match found {
                    Ok(Some(body)) => match decode_result(&body) {
                        Ok(result) => {
                            let _ = tx
                                .send(Ok(AwaitResultResponse {
                                    result: Some(result),
                                }))
                                .await;
                            return;
                        }
                        Err(status) => Err(status),
                    },
                    Ok(None) => Ok(AwaitResultResponse { result: None }),
                    Err(e) => Err(queue_error_status(e)),
                };
                let last = event.is_err();
                if tx.send(event).await.is_err() || last {
                    return;
                }
            }
        });
        Ok(rx)
    }
}

fn outcome(index: u32, fate: SubmitFate) -> SubmitOutcome {
    let (status, message_id, reason) = match fate {
        SubmitFate::Accepted { id } => (SubmitStatus::Accepted, id, String::new()),
        SubmitFate::Duplicate { id } => (SubmitStatus::Duplicate, id, String::new()),
        SubmitFate::Rejected { reason } => (SubmitStatus::Rejected, String::new(), reason),
    };
    SubmitOutcome {
        index,
        status: status as i32,
        message_id,
        reason,
    }
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

fn decode_result(body: &Bytes) -> Result<Envelope, Status> {
    Envelope::decode(body.clone())
        .map_err(|e| Status::data_loss(format!("the stored result is not an Envelope: {e}")))
}

/// The frames of one `Consume` call, as the consumer task queues them.
pub type ConsumeFrames = futures::stream::FlatMap<
    ReceiverStream<Vec<Result<ConsumeResponse, Status>>>,
    futures::stream::Iter<std::vec::IntoIter<Result<ConsumeResponse, Status>>>,
    fn(
        Vec<Result<ConsumeResponse, Status>>,
    ) -> futures::stream::Iter<std::vec::IntoIter<Result<ConsumeResponse, Status>>>,
>;

/// A delivery the consumer holds.
struct Held {
    expires: Instant,
    message_id: String,
    correlation_id: String,
}

/// How an ack, nack or extend ended.
struct Settled {
    receipt: String,
    /// `Some(new expiry)` for an extend that worked; `None` when the delivery is done.
    extended: Option<Instant>,
    result: Result<(), Status>,
}

/// Frames for the consumer, a run at a time (one channel operation per run, not per frame).
type Outbox = mpsc::Sender<Vec<Result<ConsumeResponse, Status>>>;
type Receiving = Pin<Box<dyn Future<Output = Result<Vec<Leased>, QueueError>> + Send>>;

/// One `Consume` call.
struct Consumer {
    backend: Arc<dyn QueueBackend>,
    queue: Arc<str>,
    consumer_id: Arc<str>,
    prefetch: usize,
    lease: Duration,
    held: HashMap<String, Held>,
    out: Outbox,
    /// Most deliveries per frame (1: one `delivery` frame each).
    max_batch: usize,
    /// The consumer sent `drain`: nothing more is handed out.
    draining: bool,
}

impl Consumer {
    fn receive(&self, max: usize) -> Receiving {
        let (backend, queue, consumer) = (
            self.backend.clone(),
            self.queue.clone(),
            self.consumer_id.clone(),
        );
        let lease = self.lease;
        Box::pin(async move {
            backend
                .receive(&queue, &consumer, max, lease, LONG_POLL)
                .await
        })
    }

    /// Hands leased messages to the consumer; false once it is gone.
    async fn deliver(&mut self, leased: Vec<Leased>) -> bool {
        let now = Instant::now();
        let wall_now = SystemTime::now();
        // One receive hands out leases with one expiry: convert it once.
        let mut expiry: Option<(SystemTime, Instant, prost_types::Timestamp)> = None;
        let mut deliveries = Vec::with_capacity(leased.len());
        for m in leased {
            let mut envelope = match Envelope::decode(m.body.clone()) {
                Ok(envelope) => envelope,
                Err(e) => {
                    // Not ours to deliver: fail it so it ends up a dead letter someone can see.
                    let error = format!("the stored message is not an Envelope: {e}");
                    let _ = self.backend.nack(&m.receipt, &error, None).await;
                    continue;
                }
            };
            envelope.attempt = m.attempt;
            let (expires, expires_at) = match &expiry {
                Some((at, expires, stamp)) if *at == m.lease_expires_at => (*expires, *stamp),
                _ => {
                    let expires = now
                        + m.lease_expires_at
                            .duration_since(wall_now)
                            .unwrap_or(self.lease);
                    let stamp = timestamp(m.lease_expires_at);
                    expiry = Some((m.lease_expires_at, expires, stamp));
                    (expires, stamp)
                }
            };
            self.held.insert(
                m.receipt.clone(),
                Held {
                    expires,
                    message_id: m.message_id,
                    correlation_id: m.correlation_id,
                },
            );
            deliveries.push(Delivery {
                receipt: m.receipt,
                queue: self.queue.to_string(),
                envelope: Some(Box::new(envelope)),
                attempt: m.attempt,
                lease_expires_at: Some(expires_at),
            });
        }
        if deliveries.is_empty() {
            return true;
        }
        let frames: Vec<_> = if self.max_batch > 1 {
            let mut frames = Vec::with_capacity(deliveries.len().div_ceil(self.max_batch));
            let mut rest = deliveries.into_iter().peekable();
            while rest.peek().is_some() {
                let deliveries = rest.by_ref().take(self.max_batch).collect();
                frames.push(Ok(ConsumeResponse {
                    event: Some(Event::Deliveries(DeliveryBatch { deliveries })),
                }));
            }
            frames
        } else {
            deliveries
                .into_iter()
                .map(|d| {
                    Ok(ConsumeResponse {
                        event: Some(Event::Delivery(d)),
                    })
                })
                .collect()
        };
        self.out.send(frames).await.is_ok()
    }

    /// Starts settling a run of acks with one backend call; the future reports each.
    fn settle_acks(&self, acks: Vec<ConsumeAck>) -> BoxFuture<'static, Vec<Settled>> {
        let backend = self.backend.clone();
        let acks: Vec<(String, Option<Bytes>)> = acks
            .into_iter()
            .map(|ConsumeAck { receipt, result }| {
                let body = result.map(|mut result| {
                    if let Some(held) = self.held.get(&receipt) {
                        if result.correlation_id.is_empty() {
                            result.correlation_id = held.correlation_id.clone();
                        }
                        if result.causation_id.is_empty() {
                            result.causation_id = held.message_id.clone();
                        }
                    }
                    if result.id.is_empty() {
                        result.id = uuid::Uuid::now_v7().to_string();
                    }
                    if result.created_at.is_none() {
                        result.created_at = Some(timestamp(SystemTime::now()));
                    }
                    Bytes::from(result.encode_to_vec())
                });
                (receipt, body)
            })
            .collect();
        Box::pin(async move {
            let receipts: Vec<String> = acks.iter().map(|(r, _)| r.clone()).collect();
            match backend.ack_many(acks).await {
                Ok(outcomes) => receipts
                    .into_iter()
                    .zip(outcomes)
                    .map(|(receipt, outcome)| Settled {
                        receipt,
                        extended: None,
                        result: outcome.map_err(queue_error_status),
                    })
                    .collect(),
                Err(error) => {
                    let status = queue_error_status(error);
                    receipts
                        .into_iter()
                        .map(|receipt| Settled {
                            receipt,
                            extended: None,
                            result: Err(status.clone()),
                        })
                        .collect()
                }
            }
        })
    }

    /// Starts settling one nack or extend; the returned future reports how it went.
    fn settle(&self, action: Action) -> Result<BoxFuture<'static, Vec<Settled>>, Status> {
        let backend = self.backend.clone();
        Ok(match action {
            Action::Subscribe(_) => {
                return Err(Status::invalid_argument(
                    "subscribe may only be the first frame of a Consume call",
                ));
            }
            Action::Drain(_) => return Ok(Box::pin(async { Vec::new() })),
            Action::Ack(ack) => return Ok(self.settle_acks(vec![ack])),
            Action::Acks(batch) => return Ok(self.settle_acks(batch.acks)),
            Action::Nack(ConsumeNack {
                receipt,
                error,
                delay,
            }) => {
                let delay = duration("nack delay", delay);
                Box::pin(async move {
                    let result = match delay {
                        Err(status) => Err(status),
                        Ok(delay) => backend
                            .nack(&receipt, &error, delay)
                            .await
                            .map(drop)
                            .map_err(queue_error_status),
                    };
                    vec![Settled {
                        receipt,
                        extended: None,
                        result,
                    }]
                })
            }
            Action::Extend(ConsumeExtend { receipt, lease }) => {
                let lease =
                    duration("lease", lease).map(|l| l.unwrap_or(self.lease).min(MAX_LEASE));
                Box::pin(async move {
                    let (extended, result) = match lease {
                        Err(status) => (None, Err(status)),
                        // A zero lease ends the lease now: the message is handed back at once,
                        // without counting a failed attempt.
                        Ok(lease) if lease.is_zero() => {
                            let result = match backend.release(vec![receipt.clone()]).await {
                                Ok(0) => Err(queue_error_status(QueueError::LeaseLost(format!(
                                    "receipt {receipt} is no longer valid: its lease lapsed or it was already settled"
                                )))),
                                Ok(_) => Ok(()),
                                Err(e) => Err(queue_error_status(e)),
                            };
                            (None, result)
                        }
                        Ok(lease) => match backend.extend(&receipt, lease).await {
                            Ok(expiry) => {
                                let left =
                                    expiry.duration_since(SystemTime::now()).unwrap_or_default();
                                (Some(Instant::now() + left), Ok(()))
                            }
                            Err(e) => (None, Err(queue_error_status(e))),
                        },
                    };
                    vec![Settled {
                        receipt,
                        extended,
                        result,
                    }]
                })
            }
        })
    }

    /// Applies settled frames to the held set; returns the receipt frames for the consumer:
    /// one per frame, or one for them all when they answer an `acks` frame.
    fn receipt_frames(
        &mut self,
        settled: Vec<Settled>,
        batched: bool,
    ) -> Vec<Result<ConsumeResponse, Status>> {
        let receipts = settled.into_iter().map(|s| self.settled(s));
        if batched {
            vec![Ok(ConsumeResponse {
                event: Some(Event::Receipts(ReceiptBatch {
                    receipts: receipts.collect(),
                })),
            })]
        } else {
            receipts
                .map(|r| {
                    Ok(ConsumeResponse {
                        event: Some(Event::Receipt(r)),
                    })
                })
                .collect()
        }
    }

    /// Applies a settled frame to the held set; returns its receipt.
    fn settled(&mut self, settled: Settled) -> ConsumeReceipt {
        match (&settled.result, settled.extended) {
            (Ok(()), Some(expires)) => {
                if let Some(held) = self.held.get_mut(&settled.receipt) {
                    held.expires = expires;
                }
            }
            // Done, or the lease is gone: either way the delivery no longer counts.
            (Ok(()), None) => {
                self.held.remove(&settled.receipt);
            }
            (Err(status), _) if status.code() == Code::FailedPrecondition => {
                self.held.remove(&settled.receipt);
            }
            (Err(_), _) => {}
        }
        ConsumeReceipt {
            receipt: settled.receipt,
            error: settled.result.err().as_ref().map(error_status),
        }
    }

    /// Forgets deliveries whose lease lapsed (the backend hands them to someone else).
    fn expire(&mut self) {
        let now = Instant::now();
        self.held.retain(|_, held| held.expires > now);
    }

    /// Serves the consumer until it goes away, the node shuts down or the backend fails.
    async fn run(mut self, mut inbound: Streaming<ConsumeRequest>, shutdown: CancellationToken) {
        let mut receiving: Option<Receiving> = None;
        // Each settles some frames; `true` when they answer one `acks` frame.
        let mut settling: FuturesUnordered<BoxFuture<'static, (Vec<Settled>, bool)>> =
            FuturesUnordered::new();
        let single =
            |f: BoxFuture<'static, Vec<Settled>>| -> BoxFuture<'static, (Vec<Settled>, bool)> {
                Box::pin(futures::FutureExt::map(f, |settled| (settled, false)))
            };
        // Ask the backend for more only once a good share of the prefetch is free, so each
        // long-poll fetches a batch rather than a message or two.
        let low_water = (self.prefetch / 4).max(1);
        let tick = (self.lease / 4).clamp(Duration::from_millis(20), Duration::from_secs(1));
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failure: Option<Status> = None;
        loop {
            let credit = self.prefetch.saturating_sub(self.held.len());
            if !self.draining
                && receiving.is_none()
                && credit > 0
                && (credit >= low_water || self.held.is_empty())
            {
                receiving = Some(self.receive(credit));
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some((settled, batched)) = settling.next(), if !settling.is_empty() => {
                    let receipts = self.receipt_frames(settled, batched);
                    if self.out.send(receipts).await.is_err() {
                        break;
                    }
                }
                frame = inbound.next() => {
                    // Take every frame that is already here: consecutive acks go to the
                    // backend as one call.
                    let mut frame = frame;
                    let mut acks = Vec::new();
                    let mut ended = false;
                    for taken in 1..=MAX_FRAMES_PER_TURN {
                        match frame {
                            Some(Ok(ConsumeRequest { action: Some(Action::Ack(ack)) })) => {
                                acks.push(ack);
                            }
                            Some(Ok(ConsumeRequest { action: Some(Action::Acks(batch)) })) => {
                                if !acks.is_empty() {
                                    settling.push(single(self.settle_acks(std::mem::take(&mut acks))));
                                }
                                let future = self.settle_acks(batch.acks);
                                settling.push(Box::pin(futures::FutureExt::map(future, |settled| (settled, true))));
                            }
                            Some(Ok(ConsumeRequest { action: Some(Action::Drain(_)) })) => {
                                // A fetch still pending puts back what it gets by itself.
                                self.draining = true;
                                receiving = None;
                            }
                            Some(Ok(ConsumeRequest { action: Some(action) })) => {
                                if !acks.is_empty() {
                                    settling.push(single(self.settle_acks(std::mem::take(&mut acks))));
                                }
                                match self.settle(action) {
                                    Ok(future) => settling.push(single(future)),
                                    Err(status) => {
                                        failure = Some(status);
                                        ended = true;
                                        break;
                                    }
                                }
                            }
                            // An empty frame (an action this node does not know): ignore it.
                            Some(Ok(ConsumeRequest { action: None })) => {}
                            // The consumer half-closed or went away.
                            Some(Err(_)) | None => {
                                ended = true;
                                break;
                            }
                        }
                        if taken == MAX_FRAMES_PER_TURN {
                            break;
                        }
                        match futures::FutureExt::now_or_never(inbound.next()) {
                            Some(next) => frame = next,
                            None => break,
                        }
                    }
                    if !acks.is_empty() {
                        settling.push(single(self.settle_acks(acks)));
                    }
                    if ended {
                        break;
                    }
                }
                leased = async {
                    match receiving.as_mut() {
                        Some(future) => future.await,
                        None => std::future::pending().await,
                    }
                } => {
                    receiving = None;
                    match leased {
                        Ok(leased) => {
                            if !self.deliver(leased).await {
                                break;
                            }
                        }
                        Err(error) => {
                            failure = Some(queue_error_status(error));
                            break;
                        }
                    }
                }
                // Only while something is held: an idle consumer costs the node no wake-ups.
                _ = ticker.tick(), if !self.held.is_empty() => self.expire(),
                _ = self.out.closed() => break,
            }
        }
        // A long-poll answered after this point puts its messages back by itself.
        drop(receiving);
        // Let acks already sent finish before releasing, so nothing acked is handed out again.
        let drain = async {
            while let Some((settled, batched)) = settling.next().await {
                let receipts = self.receipt_frames(settled, batched);
                let _ = self.out.try_send(receipts);
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
        if !self.held.is_empty() {
            let receipts: Vec<String> = self.held.drain().map(|(r, _)| r).collect();
            let count = receipts.len();
            match self.backend.release(receipts).await {
                Ok(released) => tracing::debug!(
                    queue = %self.queue,
                    consumer = %self.consumer_id,
                    held = count,
                    released,
                    "consumer gone; released its deliveries"
                ),
                Err(error) => tracing::warn!(
                    queue = %self.queue,
                    %error,
                    "could not release a departed consumer's deliveries; they return when their leases lapse"
                ),
            }
        }
        if let Some(status) = failure {
            let _ = self.out.send(vec![Err(status)]).await;
        }
    }
}

#[tonic::async_trait]
impl queue_service_server::QueueService for QueueService {
    async fn submit(
        &self,
        request: Request<Streaming<SubmitRequest>>,
    ) -> Result<Response<SubmitResponse>, Status> {
        let call = self.call(&request);
        let response = self.submit_stream(call, request.into_inner()).await?;
        Ok(Response::new(response))
    }

    type ConsumeStream = ConsumeFrames;

    async fn consume(
        &self,
        request: Request<Streaming<ConsumeRequest>>,
    ) -> Result<Response<Self::ConsumeStream>, Status> {
        let mut inbound = request.into_inner();
        let first = match tokio::time::timeout(SUBSCRIBE_TIMEOUT, inbound.next()).await {
            Err(_) => {
                return Err(Status::deadline_exceeded(
                    "no subscribe frame within 30 s of opening Consume",
                ));
            }
            Ok(None) => {
                return Err(Status::invalid_argument(
                    "the Consume call ended before its subscribe frame",
                ));
            }
            Ok(Some(frame)) => frame?,
        };
        let Some(Action::Subscribe(ConsumeSubscribe {
            queue,
            prefetch,
            lease,
            consumer_id,
            max_batch,
        })) = first.action
        else {
            return Err(Status::invalid_argument(
                "the first frame of Consume must be subscribe",
            ));
        };
        agentmesh_queue::validate_queue_name(&queue).map_err(queue_error_status)?;
        let prefetch = match prefetch {
            0 => DEFAULT_PREFETCH,
            n => n.min(MAX_PREFETCH),
        } as usize;
        let lease = duration("lease", lease)?
            .filter(|l| !l.is_zero())
            .unwrap_or(DEFAULT_LEASE)
            .clamp(Duration::from_millis(1), MAX_LEASE);
        let consumer_id = if consumer_id.is_empty() {
            format!("consumer-{}", uuid::Uuid::now_v7())
        } else {
            consumer_id
        };
        // Runs of frames: a receive's deliveries, or the receipts of one settle call.
        let (out, rx) = mpsc::channel(64);
        let consumer = Consumer {
            backend: self.backend.clone(),
            queue: queue.into(),
            consumer_id: consumer_id.into(),
            prefetch,
            lease,
            held: HashMap::with_capacity(prefetch),
            out,
            // A batch never holds more than the prefetch allows out at once.
            max_batch: (max_batch as usize).clamp(1, prefetch),
            draining: false,
        };
        tokio::spawn(consumer.run(inbound, self.shutdown.clone()));
        Ok(Response::new(
            ReceiverStream::new(rx).flat_map(futures::stream::iter),
        ))
    }

    async fn list_queues(
        &self,
        _request: Request<ListQueuesRequest>,
    ) -> Result<Response<ListQueuesResponse>, Status> {
        self.list_queues_inner().await.map(Response::new)
    }

    async fn list_dead_letters(
        &self,
        request: Request<ListDeadLettersRequest>,
    ) -> Result<Response<ListDeadLettersResponse>, Status> {
        self.list_dead_letters_inner(request.into_inner())
            .await
            .map(Response::new)
    }

    async fn redrive_dead_letters(
        &self,
        request: Request<RedriveDeadLettersRequest>,
    ) -> Result<Response<RedriveDeadLettersResponse>, Status> {
        self.redrive_inner(request.into_inner())
            .await
            .map(Response::new)
    }

    async fn purge_dead_letters(
        &self,
        request: Request<PurgeDeadLettersRequest>,
    ) -> Result<Response<PurgeDeadLettersResponse>, Status> {
        self.purge_inner(request.into_inner())
            .await
            .map(Response::new)
    }

    async fn get_result(
        &self,
        request: Request<GetResultRequest>,
    ) -> Result<Response<GetResultResponse>, Status> {
        let call = self.call(&request);
        self.get_result_inner(call, request.into_inner())
            .await
            .map(Response::new)
    }

    type AwaitResultStream = ReceiverStream<Result<AwaitResultResponse, Status>>;

    async fn await_result(
        &self,
        request: Request<AwaitResultRequest>,
    ) -> Result<Response<Self::AwaitResultStream>, Status> {
        let call = self.call(&request);
        let explicit = caller_set_deadline(request.metadata());
        let rx = self.await_result_inner(call, explicit, request.into_inner())?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[tonic::async_trait]
impl QueueApi for QueueService {
    async fn submit(&self, request: Request<Vec<SubmitRequest>>) -> Result<SubmitResponse, Status> {
        let call = self.call(&request);
        let items = futures::stream::iter(request.into_inner().into_iter().map(Ok));
        self.submit_stream(call, items).await
    }

    async fn list_queues(
        &self,
        _request: Request<ListQueuesRequest>,
    ) -> Result<ListQueuesResponse, Status> {
        self.list_queues_inner().await
    }

    async fn list_dead_letters(
        &self,
        request: Request<ListDeadLettersRequest>,
    ) -> Result<ListDeadLettersResponse, Status> {
        self.list_dead_letters_inner(request.into_inner()).await
    }

    async fn redrive_dead_letters(
        &self,
        request: Request<RedriveDeadLettersRequest>,
    ) -> Result<RedriveDeadLettersResponse, Status> {
        self.redrive_inner(request.into_inner()).await
    }

    async fn purge_dead_letters(
        &self,
        request: Request<PurgeDeadLettersRequest>,
    ) -> Result<PurgeDeadLettersResponse, Status> {
        self.purge_inner(request.into_inner()).await
    }

    async fn get_result(
        &self,
        request: Request<GetResultRequest>,
    ) -> Result<GetResultResponse, Status> {
        let call = self.call(&request);
        self.get_result_inner(call, request.into_inner()).await
    }

    async fn await_result(
        &self,
        request: Request<AwaitResultRequest>,
    ) -> Result<EventStream<AwaitResultResponse>, Status> {
        let call = self.call(&request);
        let explicit = caller_set_deadline(request.metadata());
        let rx = self.await_result_inner(call, explicit, request.into_inner())?;
        Ok(ReceiverStream::new(rx).boxed())
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

    fn call() -> CallInfo {
        CallInfo {
            correlation_id: "corr-1".into(),
            deadline: crate::deadline::Deadline(Instant::now() + Duration::from_secs(1)),
            traceparent: None,
            idempotency_key: None,
        }
    }

    #[test]
    fn stamps_messages_and_rejects_bad_ones() {
        let now = timestamp(SystemTime::now());
        let (queue, messages) = QueueService::prepare(
            &call(),
            SubmitRequest {
                queue: "jobs".into(),
                envelope: Some(Box::new(Envelope {
                    idempotency_key: "k".into(),
                    reply_to: "replies".into(),
                    attempt: 7,
                    r#type: "t".into(),
                    ..Default::default()
                })),
                envelopes: vec![Envelope::default(), Envelope::default()],
            },
            &now,
        );
        assert_eq!(queue, "jobs");
        // `envelope` first, then `envelopes`, each stamped on its own.
        assert_eq!(messages.len(), 3);
        let messages: Vec<NewMessage> = messages.into_iter().map(Result::unwrap).collect();
        let message = &messages[0];
        assert_eq!(message.correlation_id, "corr-1");
        assert_eq!(message.idempotency_key.as_deref(), Some("k"));
        assert_eq!(message.reply_to.as_deref(), Some("replies"));
        let envelope = Envelope::decode(message.body.clone()).unwrap();
        assert_eq!(envelope.id, message.id);
        assert!(uuid::Uuid::parse_str(&envelope.id).is_ok());
        assert_eq!(envelope.correlation_id, "corr-1");
        assert!(envelope.created_at.is_some());
        assert_eq!(envelope.attempt, 0);
        assert!(messages[1].id != messages[0].id && messages[2].id != messages[1].id);
        assert_eq!(messages[2].idempotency_key, None);

        let reject = |queue: &str, envelope: Option<Envelope>| {
            let (_, mut messages) = QueueService::prepare(
                &call(),
                SubmitRequest {
                    queue: queue.into(),
                    envelope: envelope.map(Box::new),
                    envelopes: Vec::new(),
                },
                &now,
            );
            assert_eq!(messages.len(), 1);
            messages.remove(0).unwrap_err()
        };
        assert!(reject("", Some(Envelope::default())).contains("queue"));
        assert!(reject("bad\nname", Some(Envelope::default())).contains("control"));
        assert!(reject("q", None).contains("envelope"));
        let huge = Envelope {
            payload: Some(agentmesh_proto::v1::envelope::Payload::Binary(vec![
                0;
                MAX_BODY_BYTES
                    + 1
            ])),
            ..Default::default()
        };
        assert!(reject("q", Some(huge)).contains("limit"));
    }
}
#[cfg(test)]
mod frame_size {
    use agentmesh_proto::v1::{ConsumeRequest, ConsumeResponse, SubmitRequest};

    /// Queue frames move by value through every stream layer, once per message: their
    /// envelopes are boxed (see `build.rs`), which keeps each frame small.
    #[test]
    fn queue_frames_stay_small() {
        for (name, size) in [
            ("SubmitRequest", size_of::<SubmitRequest>()),
            ("ConsumeRequest", size_of::<ConsumeRequest>()),
            ("ConsumeResponse", size_of::<ConsumeResponse>()),
        ] {
            assert!(size <= 160, "{name} is {size} bytes");
        }
    }
}
