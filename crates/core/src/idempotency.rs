//! Idempotent invoke: a repeated unary call with the same idempotency key
//! (and target) within the window returns the first call's response without
//! invoking the agent again. Concurrent duplicates wait for the first.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use agentmesh_proto::v1::Envelope;
use parking_lot::Mutex;
use tokio::sync::watch;
use tonic::Status;

type Outcome = Option<Result<Envelope, Status>>;

#[derive(Debug)]
enum Slot {
    Pending(watch::Receiver<Outcome>),
    Done(Box<Envelope>, Instant),
}

#[derive(Debug, Default)]
struct Entries {
    slots: HashMap<String, Slot>,
    /// Completion order, for expiry and the capacity bound.
    order: VecDeque<(Instant, String)>,
}

/// Responses remembered by idempotency key.
#[derive(Debug)]
pub struct IdempotencyCache {
    entries: Mutex<Entries>,
    window: Duration,
    capacity: usize,
}

/// Where replies are remembered by idempotency key: in this process ([`IdempotencyCache`])
/// or in a store several nodes share, so a duplicate through any node gets the first reply.
#[tonic::async_trait]
pub trait IdempotencyStore: Send + Sync + std::fmt::Debug + 'static {
    /// The remembered reply for `key`, or the lead: the caller makes the call and completes
    /// the lead with its outcome. Concurrent duplicates wait for the leader; if the leader
    /// goes away without completing, one of them leads instead.
    async fn claim(self: Arc<Self>, key: String) -> Result<Claim, Status>;
}

/// Held by the call that actually invokes the agent; dropping it unfinished lets a waiting
/// duplicate lead.
pub trait Lead: Send + std::fmt::Debug {
    /// Records the outcome: a success is remembered for the window; a failure is not, so a
    /// retry with the same key runs again.
    fn complete(self: Box<Self>, outcome: &Result<Envelope, Status>);
}

/// What a call with an idempotency key should do.
#[derive(Debug)]
pub enum Claim {
    /// An earlier call already answered: reply with this.
    Replay(Box<Envelope>),
    /// This call goes to the agent; complete the guard with its outcome.
    Lead(Box<dyn Lead>),
}

/// The in-process [`Lead`].
#[derive(Debug)]
struct LeadGuard {
    cache: Arc<IdempotencyCache>,
    key: String,
    sender: Option<watch::Sender<Outcome>>,
}

impl Lead for LeadGuard {
    fn complete(mut self: Box<Self>, outcome: &Result<Envelope, Status>) {
        let sender = self.sender.take().expect("completed once");
        self.cache.finish(&self.key, outcome.as_ref().ok().cloned());
        let _ = sender.send(Some(outcome.clone()));
    }
}

impl Drop for LeadGuard {
    fn drop(&mut self) {
        // The leading call was cancelled: forget it so a waiter can lead.
        if self.sender.take().is_some() {
            self.cache.finish(&self.key, None);
        }
    }
}

impl IdempotencyCache {
    /// A cache remembering successes for `window`, at most `capacity` of them.
    pub fn new(window: Duration, capacity: usize) -> Self {
        Self {
            entries: Mutex::default(),
            window,
            capacity,
        }
    }
}

#[tonic::async_trait]
impl IdempotencyStore for IdempotencyCache {
    async fn claim(self: Arc<Self>, key: String) -> Result<Claim, Status> {
        loop {
            let mut waiting = {
                let mut entries = self.entries.lock();
                self.expire(&mut entries);
                match entries.slots.get(&key) {
                    Some(Slot::Done(envelope, _)) => return Ok(Claim::Replay(envelope.clone())),
                    Some(Slot::Pending(receiver)) => receiver.clone(),
                    None => {
                        let (sender, receiver) = watch::channel(None);
                        entries.slots.insert(key.clone(), Slot::Pending(receiver));
                        return Ok(Claim::Lead(Box::new(LeadGuard {
                            cache: Arc::clone(&self),
                            key,
                            sender: Some(sender),
                        })));
                    }
                }
            };
            // Wait for the first call; if it was cancelled, try to lead.
            match waiting.wait_for(Option::is_some).await {
                Ok(outcome) => match outcome.clone() {
                    Some(Ok(envelope)) => return Ok(Claim::Replay(Box::new(envelope))),
                    Some(Err(status)) => return Err(status),
                    None => continue,
                },
                Err(_) => continue,
            }
        }
    }
}

impl IdempotencyCache {
    fn finish(&self, key: &str, success: Option<Envelope>) {
        let mut entries = self.entries.lock();
        match success {
            Some(envelope) => {
                let now = Instant::now();
                entries
                    .slots
                    .insert(key.to_owned(), Slot::Done(Box::new(envelope), now));
                entries.order.push_back((now, key.to_owned()));
                self.expire(&mut entries);
            }
            None => {
                entries.slots.remove(key);
            }
        }
    }

    fn expire(&self, entries: &mut Entries) {
        let now = Instant::now();
        while let Some((at, key)) = entries.order.front() {
            let expired = now.duration_since(*at) > self.window;
            if !expired && entries.order.len() <= self.capacity {
                break;
            }
            if let Some(Slot::Done(_, done_at)) = entries.slots.get(key) {
                if done_at == at {
                    entries.slots.remove(key);
                }
            }
            entries.order.pop_front();
        }
    }
}
