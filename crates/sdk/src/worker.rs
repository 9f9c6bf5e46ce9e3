//! Queue workers: run an async handler over the messages of a queue.
//!
//! ```no_run
//! # async fn demo(client: agentmesh_sdk::MeshClient) {
//! use agentmesh_sdk::{Worker, proto::v1::Envelope};
//! let worker = Worker::new(client, "thumbnails")
//!     .prefetch(32)
//!     .concurrency(8)
//!     .start(|_ctx, job: Envelope| async move {
//!         // ... do the work ...
//!         Ok(Some(Envelope::json("thumbnail.done", serde_json::json!({"ok": true}))))
//!     });
//! // later: stop taking messages, finish what is in hand, ack it, then return.
//! let stats = worker.shutdown().await;
//! # let _ = stats;
//! # }
//! ```
//!
//! `Ok(Some(result))` acks with a result (stored by correlation id and sent to `reply_to`),
//! `Ok(None)` acks, `Err(status)` nacks with the status message (redelivered with backoff,
//! dead-lettered after the queue's `max_attempts`). Leases of messages in hand are extended
//! while the handler runs. If the node goes away the worker reconnects with exponential
//! backoff; work in progress carries on and is acked once the node is back.

use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use agentmesh_proto::v1::{
    ConsumeAck, ConsumeAckBatch, ConsumeDrain, ConsumeExtend, ConsumeNack, ConsumeReceipt,
    ConsumeRequest, ConsumeResponse, ConsumeSubscribe, Delivery, Envelope, consume_request::Action,
    consume_response::Event,
};
use agentmesh_resilience::Backoff;
use futures::future::BoxFuture;
use tokio::{
    sync::mpsc,
    task::{Id, JoinHandle, JoinSet},
};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};

use crate::{client::MeshClient, context::Context};

/// Counters of a worker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerStats {
    /// Deliveries received.
    pub delivered: u64,
    /// Messages the handler completed (acked).
    pub succeeded: u64,
    /// Messages the handler failed (nacked).
    pub failed: u64,
    /// Acks, nacks or extends the node refused (e.g. the lease had lapsed).
    pub settle_errors: u64,
    /// Times the worker lost its connection and connected again.
    pub reconnects: u64,
}

#[derive(Debug, Default)]
struct Counters {
    delivered: AtomicU64,
    succeeded: AtomicU64,
    failed: AtomicU64,
    settle_errors: AtomicU64,
    reconnects: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> WorkerStats {
        WorkerStats {
            delivered: self.delivered.load(Ordering::Relaxed),
            succeeded: self.succeeded.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            settle_errors: self.settle_errors.load(Ordering::Relaxed),
            reconnects: self.reconnects.load(Ordering::Relaxed),
        }
    }
}

/// Builder of a queue worker.
#[derive(Debug, Clone)]
pub struct Worker {
    client: MeshClient,
    queue: String,
    prefetch: u32,
    concurrency: usize,
    lease: Duration,
    consumer_id: String,
    drain_timeout: Duration,
    backoff_min: Duration,
    backoff_max: Duration,
}

impl Worker {
    /// A worker on `queue`: prefetch 16, concurrency 16, lease 30 s, drain timeout 30 s.
    pub fn new(client: MeshClient, queue: impl Into<String>) -> Self {
        Self {
            client,
            queue: queue.into(),
            prefetch: 16,
            concurrency: 16,
            lease: Duration::from_secs(30),
            consumer_id: format!("worker-{}", uuid::Uuid::now_v7()),
            drain_timeout: Duration::from_secs(30),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }

    /// Most deliveries held at once (running or waiting for a handler slot).
    pub fn prefetch(mut self, prefetch: u32) -> Self {
        self.prefetch = prefetch.max(1);
        self
    }

    /// Most handlers running at once.
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency.max(1);
        self
    }

    /// Lease of each delivery; extended while the handler runs.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease.max(Duration::from_millis(10));
        self
    }

    /// The name recorded in each message's attempt history.
    pub fn consumer_id(mut self, consumer_id: impl Into<String>) -> Self {
        self.consumer_id = consumer_id.into();
        self
    }

    /// How long [`RunningWorker::shutdown`] waits for handlers in progress.
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// Reconnect backoff: exponential with full jitter, from `min` up to `max`.
    pub fn reconnect_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff_min = min.max(Duration::from_millis(1));
        self.backoff_max = max.max(self.backoff_min);
        self
    }

    /// Starts the worker in the background.
    pub fn start<H, F>(self, handler: H) -> RunningWorker
    where
        H: Fn(Context, Envelope) -> F + Send + Sync + 'static,
        F: Future<Output = Result<Option<Envelope>, Status>> + Send + 'static,
    {
        let stop = CancellationToken::new();
        let counters = Arc::new(Counters::default());
        let handler: Arc<Handler> = Arc::new(move |ctx, envelope| Box::pin(handler(ctx, envelope)));
        let session = Session::new(self, handler, stop.clone(), counters.clone());
        RunningWorker {
            stop,
            counters,
            task: tokio::spawn(session.run()),
        }
    }
}

type Handler =
    dyn Fn(Context, Envelope) -> BoxFuture<'static, Result<Option<Envelope>, Status>> + Send + Sync;

/// A worker running in the background.
#[derive(Debug)]
pub struct RunningWorker {
    stop: CancellationToken,
    counters: Arc<Counters>,
    task: JoinHandle<()>,
}

impl RunningWorker {
    /// Counters so far.
    pub fn stats(&self) -> WorkerStats {
        self.counters.snapshot()
    }

    /// Stops taking messages (the node is told to send no more: `drain`), lets the handlers in
    /// progress finish (up to the drain timeout), acks or nacks their messages, and returns
    /// once the node confirmed it. Messages received but not started are handed back to the
    /// queue at once, so other consumers get them.
    pub async fn shutdown(self) -> WorkerStats {
        self.stop.cancel();
        let _ = self.task.await;
        self.counters.snapshot()
    }
}

/// A delivery in hand.
struct Held {
    expires: Instant,
}

type Outcome = (String, Result<Option<Envelope>, Status>);

/// The worker's state across connections.
struct Session {
    config: Worker,
    handler: Arc<Handler>,
    stop: CancellationToken,
    counters: Arc<Counters>,
    /// Deliveries in hand, by receipt.
    held: HashMap<String, Held>,
    /// Deliveries waiting for a handler slot.
    queued: VecDeque<Delivery>,
    /// Acks of handlers that finished this turn, sent together by `send_acks`.
    acks: Vec<ConsumeAck>,
    running: JoinSet<Outcome>,
    tasks: HashMap<Id, (String, CancellationToken)>,
    /// Acks and nacks not sent yet (the connection was down when they were ready).
    unsent: VecDeque<ConsumeRequest>,
    /// Frames sent and not yet confirmed, by receipt.
    unconfirmed: HashMap<String, u32>,
    tx: Option<mpsc::UnboundedSender<ConsumeRequest>>,
    inbound: Option<Streaming<ConsumeResponse>>,
    connecting: Option<BoxFuture<'static, Result<Streaming<ConsumeResponse>, Status>>>,
    retry_at: Option<tokio::time::Instant>,
    backoff: Backoff,
    connected_once: bool,
}

impl Session {
    fn new(
        config: Worker,
        handler: Arc<Handler>,
        stop: CancellationToken,
        counters: Arc<Counters>,
    ) -> Self {
        let backoff = Backoff::new(config.backoff_min, config.backoff_max);
        Self {
            config,
            handler,
            stop,
            counters,
            held: HashMap::new(),
            queued: VecDeque::new(),
            acks: Vec::new(),
            running: JoinSet::new(),
            tasks: HashMap::new(),
            unsent: VecDeque::new(),
            unconfirmed: HashMap::new(),
            tx: None,
            inbound: None,
            connecting: None,
            retry_at: None,
            backoff,
            connected_once: false,
        }
    }

    fn subscribe(&self) -> ConsumeRequest {
        ConsumeRequest {
            action: Some(Action::Subscribe(ConsumeSubscribe {
                queue: self.config.queue.clone(),
                prefetch: self.config.prefetch,
                lease: prost_types::Duration::try_from(self.config.lease).ok(),
                consumer_id: self.config.consumer_id.clone(),
                // Whatever one fetch found comes in one frame.
                max_batch: self.config.prefetch,
            })),
        }
    }

    fn connect(&mut self) {
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(self.subscribe());
        let mut client = self.config.client.queues();
        self.connecting = Some(Box::pin(async move {
            Ok(client
                .consume(UnboundedReceiverStream::new(rx))
                .await?
                .into_inner())
        }));
        self.tx = Some(tx);
    }

    fn send(&mut self, frame: ConsumeRequest) {
        let receipts: Vec<String> = match &frame.action {
            Some(Action::Ack(a)) => vec![a.receipt.clone()],
            Some(Action::Acks(batch)) => batch.acks.iter().map(|a| a.receipt.clone()).collect(),
            Some(Action::Nack(n)) => vec![n.receipt.clone()],
            Some(Action::Extend(e)) => vec![e.receipt.clone()],
            _ => Vec::new(),
        };
        match (&self.tx, &self.inbound) {
            (Some(tx), Some(_)) if tx.send(frame.clone()).is_ok() => {
                for receipt in receipts {
                    *self.unconfirmed.entry(receipt).or_default() += 1;
                }
            }
            _ => {
                if !matches!(frame.action, Some(Action::Extend(_))) {
                    self.unsent.push_back(frame);
                }
            }
        }
    }

    /// The connection is gone: forget what the node released, schedule a reconnect.
    fn link_down(&mut self, why: &str) {
        self.tx = None;
        self.inbound = None;
        self.connecting = None;
        self.unconfirmed.clear();
        // The node fails what a consumer held when it went away (one attempt each): those not
        // started yet are someone else's now. Handlers already running finish; their acks go out later.
        for delivery in self.queued.drain(..) {
            self.held.remove(&delivery.receipt);
        }
        let delay = self.backoff.next_delay();
        self.retry_at = Some(tokio::time::Instant::now() + delay);
        tracing::warn!(
            queue = %self.config.queue,
            reason = why,
            retry_in_ms = delay.as_millis() as u64,
            "worker disconnected; reconnecting"
        );
    }

    fn start_handlers(&mut self) {
        while self.running.len() < self.config.concurrency {
            let Some(delivery) = self.queued.pop_front() else {
                break;
            };
            let receipt = delivery.receipt.clone();
            let envelope = delivery.envelope.map(|e| *e).unwrap_or_default();
            let ctx = Context::from_envelope(&envelope, Some(self.config.client.clone()));
            let cancel = ctx.cancellation();
            let handler = self.handler.clone();
            let task_receipt = receipt.clone();
            let handle = self.running.spawn(async move {
                let result = ctx.clone().scope(handler(ctx, envelope)).await;
                (task_receipt, result)
            });
            self.tasks.insert(handle.id(), (receipt, cancel));
        }
    }

    fn finished(&mut self, joined: Result<(Id, Outcome), tokio::task::JoinError>) {
        let (receipt, result) = match joined {
            Ok((id, outcome)) => {
                self.tasks.remove(&id);
                outcome
            }
            Err(error) => {
                let Some((receipt, _)) = self.tasks.remove(&error.id()) else {
                    return;
                };
                let why = if error.is_panic() {
                    "the handler panicked"
                } else {
                    "the handler was cancelled"
                };
                (receipt, Err(Status::internal(why)))
            }
        };
        self.held.remove(&receipt);
        let action = match result {
            Ok(result) => {
                self.counters.succeeded.fetch_add(1, Ordering::Relaxed);
                // Sent with the others that finished in this turn, in one frame.
                self.acks.push(ConsumeAck {
                    receipt,
                    result: result.map(Box::new),
                });
                return;
            }
            Err(status) => {
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                let error = if status.message().is_empty() {
                    format!("{:?}", status.code())
                } else {
                    format!("{:?}: {}", status.code(), status.message())
                };
                Action::Nack(ConsumeNack {
                    receipt,
                    error,
                    delay: None,
                })
            }
        };
        self.send(ConsumeRequest {
            action: Some(action),
        });
    }

    fn received(&mut self, response: ConsumeResponse, stopping: bool) {
        match response.event {
            Some(Event::Delivery(delivery)) => self.delivered(delivery, stopping),
            Some(Event::Deliveries(batch)) => {
                for delivery in batch.deliveries {
                    self.delivered(delivery, stopping);
                }
            }
            Some(Event::Receipt(receipt)) => self.confirmed(receipt),
            Some(Event::Receipts(batch)) => {
                for receipt in batch.receipts {
                    self.confirmed(receipt);
                }
            }
            None => {}
        }
    }

    fn delivered(&mut self, delivery: Delivery, stopping: bool) {
        self.counters.delivered.fetch_add(1, Ordering::Relaxed);
        let expires = delivery
            .lease_expires_at
            .and_then(|t| SystemTime::try_from(t).ok())
            .and_then(|t| t.duration_since(SystemTime::now()).ok())
            .map_or_else(
                || Instant::now() + self.config.lease,
                |left| Instant::now() + left,
            );
        self.held.insert(delivery.receipt.clone(), Held { expires });
        self.queued.push_back(delivery);
        // While draining, something the node sent before it saw the drain goes back at once,
        // to other consumers.
        if stopping {
            self.hand_back_queued();
        }
    }

    fn confirmed(&mut self, receipt: ConsumeReceipt) {
        if let Some(count) = self.unconfirmed.get_mut(&receipt.receipt) {
            *count -= 1;
            if *count == 0 {
                self.unconfirmed.remove(&receipt.receipt);
            }
        }
        if let Some(error) = receipt.error {
            self.counters.settle_errors.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                queue = %self.config.queue,
                receipt = %receipt.receipt,
                code = error.code,
                error = %error.message,
                "the node refused an ack, nack or extend"
            );
        }
    }

    /// Sends the acks collected this turn: one `ack` frame, or one `acks` frame for several.
    fn send_acks(&mut self) {
        let action = match self.acks.len() {
            0 => return,
            1 => Action::Ack(self.acks.remove(0)),
            _ => Action::Acks(ConsumeAckBatch {
                acks: std::mem::take(&mut self.acks),
            }),
        };
        self.send(ConsumeRequest {
            action: Some(action),
        });
    }

    /// Asks the node to stop deliveries on this stream (not confirmed by a receipt).
    fn send_drain(&mut self) {
        if let (Some(tx), Some(_)) = (&self.tx, &self.inbound) {
            let _ = tx.send(ConsumeRequest {
                action: Some(Action::Drain(ConsumeDrain {})),
            });
        }
    }

    /// Hands the deliveries not started back to the queue at once (an extend with a zero
    /// lease), so other consumers get them while the handlers in progress finish.
    fn hand_back_queued(&mut self) {
        for delivery in std::mem::take(&mut self.queued) {
            self.held.remove(&delivery.receipt);
            if self.inbound.is_some() {
                self.send(ConsumeRequest {
                    action: Some(Action::Extend(ConsumeExtend {
                        receipt: delivery.receipt,
                        lease: Some(prost_types::Duration::default()),
                    })),
                });
            }
        }
    }

    /// Extends leases that are past half their life.
    fn extend_leases(&mut self) {
        if self.inbound.is_none() {
            return;
        }
        let now = Instant::now();
        let lease = self.config.lease;
        let due: Vec<String> = self
            .held
            .iter()
            .filter(|(_, h)| h.expires.saturating_duration_since(now) < lease / 2)
            .map(|(r, _)| r.clone())
            .collect();
        for receipt in due {
            if let Some(held) = self.held.get_mut(&receipt) {
                held.expires = now + lease;
            }
            self.send(ConsumeRequest {
                action: Some(Action::Extend(ConsumeExtend {
                    receipt,
                    lease: prost_types::Duration::try_from(lease).ok(),
                })),
            });
        }
    }

    async fn run(mut self) {
        let tick = (self.config.lease / 6).clamp(Duration::from_millis(5), Duration::from_secs(5));
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stopping = false;
        let mut drain_deadline: Option<tokio::time::Instant> = None;
        loop {
            if !stopping {
                self.start_handlers();
            }
            if stopping {
                let settled = self.running.is_empty()
                    && self.unsent.is_empty()
                    && self.unconfirmed.is_empty();
                let expired = drain_deadline.is_some_and(|d| tokio::time::Instant::now() >= d);
                if settled || expired {
                    break;
                }
            }
            let link_idle = self.tx.is_none() && self.connecting.is_none();
            if link_idle
                && self
                    .retry_at
                    .is_none_or(|at| tokio::time::Instant::now() >= at)
                && !(stopping && self.running.is_empty() && self.unsent.is_empty())
            {
                self.retry_at = None;
                self.connect();
            }
            // The retry timer only matters while a reconnect would be attempted; once passed
            // and not acted on it must not stay armed, or the loop would spin on it.
            let retry_at = self
                .retry_at
                .filter(|at| self.tx.is_none() && *at > tokio::time::Instant::now());
            tokio::select! {
                _ = self.stop.cancelled(), if !stopping => {
                    stopping = true;
                    drain_deadline = Some(tokio::time::Instant::now() + self.config.drain_timeout);
                    self.send_drain();
                    self.hand_back_queued();
                }
                _ = sleep_until(drain_deadline) => {}
                Some(joined) = self.running.join_next_with_id(), if !self.running.is_empty() => {
                    self.finished(joined);
                    while let Some(joined) = self.running.try_join_next_with_id() {
                        self.finished(joined);
                    }
                    self.send_acks();
                }
                connected = poll_some(&mut self.connecting) => {
                    self.connecting = None;
                    match connected {
                        Ok(inbound) => {
                            if self.connected_once {
                                self.counters.reconnects.fetch_add(1, Ordering::Relaxed);
                                tracing::info!(queue = %self.config.queue, "worker reconnected");
                            }
                            self.connected_once = true;
                            self.inbound = Some(inbound);
                            self.backoff.reset();
                            if stopping {
                                self.send_drain();
                            }
                            for frame in std::mem::take(&mut self.unsent) {
                                self.send(frame);
                            }
                        }
                        Err(status) => self.link_down(status.message()),
                    }
                }
                message = next_message(&mut self.inbound) => match message {
                    Ok(Some(response)) => self.received(response, stopping),
                    Ok(None) => self.link_down("the node ended the stream"),
                    Err(status) => self.link_down(status.message()),
                },
                _ = sleep_until(retry_at) => {}
                // Only while messages are held: an idle worker does not wake.
                _ = ticker.tick(), if !self.held.is_empty() => self.extend_leases(),
            }
        }
        // Out of time: cancel what still runs; when we close, the node counts a failed attempt
        // for each message still held and hands it to another consumer.
        for (_, (_, cancel)) in self.tasks.drain() {
            cancel.cancel();
        }
        self.running.abort_all();
        // Half-close and read to the end, so the node has released what we did not settle.
        self.tx = None;
        if let Some(mut inbound) = self.inbound.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                while let Ok(Some(response)) = inbound.message().await {
                    self.received(response, true);
                }
            })
            .await;
        }
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Awaits the future in `slot`, or never resolves if there is none.
async fn poll_some<F: Future + Unpin>(slot: &mut Option<F>) -> F::Output {
    match slot.as_mut() {
        Some(future) => future.await,
        None => std::future::pending().await,
    }
}

/// The next message of the stream in `slot`, or never if there is none.
async fn next_message(
    slot: &mut Option<Streaming<ConsumeResponse>>,
) -> Result<Option<ConsumeResponse>, Status> {
    match slot.as_mut() {
        Some(inbound) => inbound.message().await,
        None => std::future::pending().await,
    }
}
