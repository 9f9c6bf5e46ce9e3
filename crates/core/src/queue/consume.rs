//! `Consume`: one consumer's session. Deliveries go out as credit allows (long-polling the
//! backend), acks, nacks and extends are settled concurrently, each answered by a receipt,
//! and whatever the consumer still holds when it goes away is handed back at once: as a failed
//! attempt (a crashed consumer must not let a poison message loop forever), or, when the node is
//! shutting down, without counting one.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use agentmesh_proto::CallContext;
use agentmesh_proto::v1::{
    ConsumeAck, ConsumeExtend, ConsumeNack, ConsumeReceipt, ConsumeRequest, ConsumeResponse,
    ConsumeSubscribe, Delivery, DeliveryBatch, Envelope, ErrorStatus, ReceiptBatch,
    consume_request::Action, consume_response::Event,
};
use agentmesh_queue::{Leased, QueueBackend, QueueError};
use bytes::Bytes;
use futures::{StreamExt, future::BoxFuture, stream::FuturesUnordered};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};

use super::{
    DEFAULT_LEASE, DEFAULT_PREFETCH, MAX_LEASE, MAX_PREFETCH, Queues, duration, queue_error_status,
    timestamp,
};
use crate::api::EventStream;
use crate::journal::{TraceJournal, hop_of};

/// How long one backend long-poll waits before it is renewed.
const LONG_POLL: Duration = Duration::from_secs(10);
/// Most consumer frames read in one turn of a `Consume` loop.
const MAX_FRAMES_PER_TURN: usize = 1024;
/// The failed attempt recorded for each delivery a consumer held when it went away.
const CONSUMER_GONE: &str = "consumer went away while holding the message";
/// How long a `Consume` call waits for its `subscribe` frame.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(30);

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
    journal: Arc<dyn TraceJournal>,
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
        let mut hops = Vec::new();
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
            if self.journal.enabled() {
                let mut hop = hop_of(
                    &envelope,
                    self.consumer_id.to_string(),
                    "deliver",
                    wall_now,
                    Duration::ZERO,
                    Ok(()),
                );
                hop.from = format!("queue:{}", self.queue);
                hops.push(hop);
            }
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
        if !hops.is_empty() {
            self.journal.record_many(hops);
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
                    // The result answers the message it was delivered as.
                    match self.held.get(&receipt) {
                        Some(held) => result.answer(&held.correlation_id, &held.message_id, ""),
                        None => result.answer("", "", ""),
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
            error: settled.result.err().as_ref().map(ErrorStatus::from),
        }
    }

    /// Forgets deliveries whose lease lapsed (the backend hands them to someone else).
    fn expire(&mut self) {
        let now = Instant::now();
        self.held.retain(|_, held| held.expires > now);
    }

    /// Serves the consumer until it goes away, the node shuts down or the backend fails.
    async fn run(mut self, mut inbound: EventStream<ConsumeRequest>, shutdown: CancellationToken) {
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
                            // A frame that could not be read (malformed, too large) ends the
                            // call with its status; the consumer counts as gone.
                            Some(Err(status)) => {
                                failure = Some(status);
                                ended = true;
                                break;
                            }
                            // The consumer half-closed.
                            None => {
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
            // A node shutting down hands deliveries back as they were. A consumer that went
            // away holding them (crashed, dropped its connection) fails their attempt, so a
            // message that kills every consumer it reaches still ends up a dead letter.
            let handed_back = if shutdown.is_cancelled() {
                self.backend.release(receipts).await
            } else {
                self.backend.abandon(receipts, CONSUMER_GONE).await
            };
            match handed_back {
                Ok(handed_back) => tracing::debug!(
                    queue = %self.queue,
                    consumer = %self.consumer_id,
                    held = count,
                    handed_back,
                    node_shutdown = shutdown.is_cancelled(),
                    "consumer gone; handed back its deliveries"
                ),
                Err(error) => tracing::warn!(
                    queue = %self.queue,
                    %error,
                    "could not hand back a departed consumer's deliveries; they return when their leases lapse"
                ),
            }
        }
        if let Some(status) = failure {
            let _ = self.out.send(vec![Err(status)]).await;
        }
    }
}

impl Queues {
    /// Opens a consumer session: reads the `subscribe` frame, then serves the consumer on a
    /// task of its own until it goes away or the node shuts down.
    pub(super) async fn open_consumer(
        &self,
        call: &CallContext,
        mut inbound: EventStream<ConsumeRequest>,
    ) -> Result<ConsumeFrames, Status> {
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
        agentmesh_proto::names::check_name("queue name", &queue)
            .map_err(Status::invalid_argument)?;
        self.access
            .check(call, crate::access::Action::Consume, &queue)?;
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
            journal: self.journal.clone(),
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
        Ok(ReceiverStream::new(rx).flat_map(futures::stream::iter))
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
