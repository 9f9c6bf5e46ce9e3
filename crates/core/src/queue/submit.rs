//! `Submit`: a client stream of frames, each with one or more messages, pipelined into the
//! backend in chunks; one outcome per message, in order.

use std::{
    collections::HashMap,
    time::{Duration, SystemTime},
};

use agentmesh_proto::{
    CallContext,
    envelope::code_name,
    v1::{Envelope, Hop, SubmitOutcome, SubmitRequest, SubmitResponse, SubmitStatus},
};
use agentmesh_queue::{MAX_BODY_BYTES, NewMessage, QueueError, SubmitFate};
use bytes::Bytes;
use futures::{Stream, StreamExt, future::BoxFuture, stream::FuturesUnordered};
use prost::Message;
use tonic::{Code, Status};

use crate::journal::hop_of;

use super::{MAX_SUBMIT_MESSAGES, Queues, queue_error_status, timestamp};

/// Messages handed to the backend in one `submit` call at most.
const SUBMIT_CHUNK: usize = 1024;
/// Backend `submit` calls one `Submit` stream keeps in flight at most.
const SUBMIT_PIPELINE: usize = 8;

/// Where one submitted message stands.
enum Slot {
    Ready(SubmitOutcome),
    Pending,
}

impl Queues {
    /// Turns the messages of one `SubmitRequest` (`envelope`, then `envelopes`) into backend
    /// messages for its queue, or the reason each is rejected; `received_at` becomes the
    /// `created_at` of those without one. A frame without any message counts as one, rejected.
    ///
    /// With `hops`, a journal hop is added for each message that is not rejected, in order.
    pub(super) fn prepare(
        call: &CallContext,
        request: SubmitRequest,
        received_at: &prost_types::Timestamp,
        mut hops: Option<&mut Vec<Hop>>,
    ) -> (String, Vec<Result<NewMessage, String>>) {
        let bad_queue = if request.queue.is_empty() {
            Some("queue is required".to_owned())
        } else {
            agentmesh_proto::names::check_name("queue name", &request.queue).err()
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
                    None => Self::prepare_envelope(
                        call,
                        envelope,
                        received_at,
                        &request.queue,
                        hops.as_deref_mut(),
                    ),
                })
                .collect()
        };
        (request.queue, messages)
    }

    /// Stamps one envelope (id, correlation id, `created_at`, trace) and encodes it for storage.
    fn prepare_envelope(
        call: &CallContext,
        mut envelope: Envelope,
        received_at: &prost_types::Timestamp,
        queue: &str,
        hops: Option<&mut Vec<Hop>>,
    ) -> Result<NewMessage, String> {
        // One timestamp for the whole frame; a queued message keeps the caller's chain and
        // trace but not its deadline (it outlives the call), and has not been attempted yet.
        if envelope.created_at.is_none() {
            envelope.created_at = Some(*received_at);
        }
        envelope.fill_identity(call);
        envelope.attempt = 0;
        // Its fields travel as headers to whoever consumes it: the same limits as a call's.
        agentmesh_proto::limits::check_envelope(&envelope).map_err(|refusal| refusal.message)?;
        let size = envelope.encoded_len();
        if size > MAX_BODY_BYTES {
            return Err(format!(
                "envelope is {size} bytes, the limit is {MAX_BODY_BYTES}"
            ));
        }
        if let Some(hops) = hops {
            // Its code is set once the backend has said what became of the message.
            hops.push(hop_of(
                &envelope,
                format!("queue:{queue}"),
                "submit",
                SystemTime::now(),
                Duration::ZERO,
                Ok(()),
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
    pub(super) async fn submit_stream<S>(
        &self,
        call: CallContext,
        mut input: S,
    ) -> Result<SubmitResponse, Status>
    where
        S: Stream<Item = Result<SubmitRequest, Status>> + Unpin + Send,
    {
        type Done = (Vec<u32>, Vec<Hop>, Result<Vec<SubmitFate>, QueueError>);
        let journal_on = self.journal.enabled();
        let mut slots: Vec<Slot> = Vec::new();
        let mut in_flight: FuturesUnordered<BoxFuture<'static, Done>> = FuturesUnordered::new();
        // Per queue: the messages' indices in the call, the messages, their journal hops.
        type Chunk = (Vec<u32>, Vec<NewMessage>, Vec<Hop>);
        let mut chunk: HashMap<String, Chunk> = HashMap::new();
        let mut chunk_len = 0usize;
        let mut ended = false;
        let mut storage_error: Option<QueueError> = None;
        loop {
            // Settle what the backend finished first, then read on while the pipeline has room.
            tokio::select! {
                biased;
                Some((indices, mut hops, fates)) = in_flight.next(), if !in_flight.is_empty() => {
                    if !hops.is_empty() {
                        match &fates {
                            Ok(fates) => {
                                for (hop, fate) in hops.iter_mut().zip(fates) {
                                    stamp_fate(hop, fate);
                                }
                            }
                            Err(error) => {
                                let status = queue_error_status(error.clone());
                                for hop in &mut hops {
                                    hop.code = code_name(status.code()).to_owned();
                                    hop.message = status.message().to_owned();
                                }
                            }
                        }
                        self.journal.record_many(hops);
                    }
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
                                let mut hops = Vec::new();
                                let (queue, messages) = Self::prepare(
                                    &call,
                                    request,
                                    &received_at,
                                    journal_on.then_some(&mut hops),
                                );
                                let mut hops = hops.into_iter();
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
                                            entry.2.extend(hops.next());
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
                    for (queue, (indices, messages, hops)) in chunk.drain() {
                        if messages.is_empty() {
                            continue;
                        }
                        let backend = self.backend.clone();
                        in_flight.push(Box::pin(async move {
                            let fates = backend.submit(&queue, messages).await;
                            (indices, hops, fates)
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
}

/// What became of a submitted message, on its journal hop.
fn stamp_fate(hop: &mut Hop, fate: &SubmitFate) {
    match fate {
        SubmitFate::Accepted { .. } => {}
        SubmitFate::Duplicate { id } => {
            hop.code = code_name(Code::AlreadyExists).to_owned();
            hop.message = format!("a duplicate of {id}: not stored again");
        }
        SubmitFate::Rejected { reason } => {
            hop.code = code_name(Code::InvalidArgument).to_owned();
            hop.message.clone_from(reason);
        }
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

#[cfg(test)]
mod tests {

    use agentmesh_proto::Deadline;

    use super::*;

    fn call() -> CallContext {
        CallContext {
            correlation_id: "corr-1".into(),
            deadline: Deadline::after(Duration::from_secs(1), false),
            traceparent: None,
            idempotency_key: None,
            principal: None,
            credentials: None,
        }
    }
    #[test]
    fn stamps_messages_and_rejects_bad_ones() {
        let now = timestamp(SystemTime::now());
        let (queue, messages) = Queues::prepare(
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
            None,
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
            let (_, mut messages) = Queues::prepare(
                &call(),
                SubmitRequest {
                    queue: queue.into(),
                    envelope: envelope.map(Box::new),
                    envelopes: Vec::new(),
                },
                &now,
                None,
            );
            assert_eq!(messages.len(), 1);
            messages.remove(0).unwrap_err()
        };
        assert!(reject("", Some(Envelope::default())).contains("queue"));
        assert!(reject("bad\nname", Some(Envelope::default())).contains("queue name"));
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
