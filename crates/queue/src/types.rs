//! Values passed through the [`QueueBackend`](crate::QueueBackend) API.

use crate::{MAX_BODY_BYTES, validate_queue_name};
use bytes::Bytes;
use std::time::{Duration, SystemTime};

/// A message to enqueue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    /// Caller-chosen message id (non-empty), reported back in fates and deliveries.
    pub id: String,
    /// Key that suppresses duplicates within the queue's dedup window.
    pub idempotency_key: Option<String>,
    /// Correlation id under which an ack's result is stored.
    pub correlation_id: String,
    /// Queue that receives the ack's result, if any.
    pub reply_to: Option<String>,
    /// The opaque body (an encoded envelope).
    pub body: Bytes,
}

impl NewMessage {
    /// A message with just an id and a body (the correlation id defaults to the id).
    pub fn new(id: impl Into<String>, body: impl Into<Bytes>) -> Self {
        let id = id.into();
        Self {
            correlation_id: id.clone(),
            id,
            idempotency_key: None,
            reply_to: None,
            body: body.into(),
        }
    }

    /// Sets the idempotency key.
    pub fn with_idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Sets the correlation id.
    pub fn with_correlation_id(mut self, correlation_id: impl Into<String>) -> Self {
        self.correlation_id = correlation_id.into();
        self
    }

    /// Sets the reply-to queue.
    pub fn with_reply_to(mut self, queue: impl Into<String>) -> Self {
        self.reply_to = Some(queue.into());
        self
    }

    /// Why this message cannot be enqueued, if it cannot (every backend rejects the same).
    pub(crate) fn reject_reason(&self) -> Option<String> {
        if self.id.is_empty() {
            return Some("message id is empty".into());
        }
        if self.id.len() > 1024 {
            return Some("message id is longer than 1024 bytes".into());
        }
        if self.body.len() > MAX_BODY_BYTES {
            return Some(format!(
                "body is {} bytes, the limit is {MAX_BODY_BYTES}",
                self.body.len()
            ));
        }
        if self
            .idempotency_key
            .as_ref()
            .is_some_and(|k| k.len() > 1024)
        {
            return Some("idempotency key is longer than 1024 bytes".into());
        }
        if self.correlation_id.len() > 1024 {
            return Some("correlation id is longer than 1024 bytes".into());
        }
        if let Some(r) = &self.reply_to {
            if let Err(e) = validate_queue_name(r) {
                return Some(format!("reply_to: {e}"));
            }
        }
        None
    }
}

/// What happened to one submitted message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitFate {
    /// Enqueued and durable.
    Accepted {
        /// The message's id.
        id: String,
    },
    /// Not enqueued: its idempotency key was already used within the dedup window.
    Duplicate {
        /// Id of the earlier message that used the key.
        id: String,
    },
    /// Not enqueued: the message is invalid (empty id, oversized body, ...).
    Rejected {
        /// Why it was rejected.
        reason: String,
    },
}

/// A message handed out under a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leased {
    /// Opaque handle for ack / nack / extend of this delivery.
    pub receipt: String,
    /// The message's id.
    pub message_id: String,
    /// The message's correlation id.
    pub correlation_id: String,
    /// The opaque body.
    pub body: Bytes,
    /// Attempt number of this delivery, from 1.
    pub attempt: u32,
    /// When the lease lapses unless extended.
    pub lease_expires_at: SystemTime,
    /// When the message was first enqueued.
    pub enqueued_at: SystemTime,
}

/// Outcome of a nack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NackOutcome {
    /// The message will be ready again at `at`.
    Retry {
        /// When the message becomes ready again.
        at: SystemTime,
    },
    /// The message used its last attempt and is now a dead letter.
    DeadLettered,
}

/// One failed delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptRecord {
    /// Attempt number, from 1.
    pub attempt: u32,
    /// When the message was handed out.
    pub delivered_at: SystemTime,
    /// Consumer that held the lease.
    pub consumer_id: String,
    /// The nack's error, or "lease expired".
    pub error: String,
}

/// A message that exhausted its attempts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The message's id.
    pub message_id: String,
    /// The message's correlation id.
    pub correlation_id: String,
    /// The message's reply-to queue.
    pub reply_to: Option<String>,
    /// The opaque body.
    pub body: Bytes,
    /// When the message was first enqueued.
    pub enqueued_at: SystemTime,
    /// When it was dead-lettered.
    pub dead_lettered_at: SystemTime,
    /// The error of the last attempt.
    pub last_error: String,
    /// Every failed attempt, oldest first.
    pub attempts: Vec<AttemptRecord>,
}

/// Which dead letters a redrive or purge applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Every dead letter of the queue.
    All,
    /// The dead letters with these message ids.
    Ids(Vec<String>),
}

/// Counters of one queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueStats {
    /// Queue name.
    pub name: String,
    /// Messages waiting: ready now plus delayed (retry backoff).
    pub depth: u64,
    /// Messages currently leased.
    pub in_flight: u64,
    /// Messages in the dead-letter set.
    pub dead_letters: u64,
    /// Age of the oldest message not yet acked nor dead-lettered (ready, delayed or leased).
    pub oldest_age: Option<Duration>,
}
