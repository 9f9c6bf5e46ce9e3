//! The envelope's rules, written once: what a sender leaves empty and the mesh fills in, how
//! a reply names the request it answers, which fields travel as metadata, and how a failure
//! is written into a message.

use std::time::SystemTime;

use tonic::metadata::{MetadataMap, MetadataValue};

use crate::{
    context::{CallContext, new_id},
    metadata::{CORRELATION_ID, IDEMPOTENCY_KEY, TRACEPARENT},
    v1::{Envelope, ErrorStatus, envelope::Payload},
};

/// Domain of every `google.rpc.ErrorInfo` the mesh reports.
pub const ERROR_DOMAIN: &str = "agentmesh.dev";

impl Envelope {
    /// Fills what the sender left empty from the call it travels in: id, correlation id,
    /// creation time, deadline (the call's, unless the envelope already carries an earlier
    /// one), trace context, idempotency key, and attempt 1.
    pub fn fill_from(&mut self, ctx: &CallContext) {
        self.fill_frame(ctx);
        if self.idempotency_key.is_empty() {
            self.idempotency_key = ctx.idempotency_key.clone().unwrap_or_default();
        }
    }

    /// What [`fill_from`](Self::fill_from) fills except the idempotency key: for the frames of
    /// a conversation, which share its deadline but are distinct messages.
    pub fn fill_frame(&mut self, ctx: &CallContext) {
        self.fill_identity(ctx);
        let deadline = ctx.deadline.as_system_time();
        let earlier = self
            .deadline
            .and_then(|d| SystemTime::try_from(d).ok())
            .is_some_and(|d| d <= deadline);
        if !earlier {
            self.deadline = Some(deadline.into());
        }
        if self.attempt == 0 {
            self.attempt = 1;
        }
    }

    /// Fills only the id, correlation id, creation time and trace context: for messages that
    /// outlive the call (queue messages) or share it with many others (a conversation's
    /// frames must not share its idempotency key, or they would be deduplicated as one).
    pub fn fill_identity(&mut self, ctx: &CallContext) {
        if self.id.is_empty() {
            self.id = new_id();
        }
        if self.correlation_id.is_empty() {
            self.correlation_id = ctx.correlation_id.clone();
        }
        if self.created_at.is_none() {
            self.created_at = Some(SystemTime::now().into());
        }
        if self.content_type.is_empty() {
            self.content_type = self.derived_content_type().to_owned();
        }
        self.fill_trace(ctx);
    }

    /// The MIME type the payload's case implies, for an envelope that names none; empty with
    /// no payload.
    pub fn derived_content_type(&self) -> &'static str {
        match &self.payload {
            Some(Payload::Json(_)) => "application/json",
            Some(Payload::Proto(_)) => "application/x-protobuf",
            Some(Payload::Binary(_)) => "application/octet-stream",
            None => "",
        }
    }

    /// Fills the trace context alone.
    pub fn fill_trace(&mut self, ctx: &CallContext) {
        if self.traceparent.is_empty() {
            if let Some(traceparent) = &ctx.traceparent {
                self.traceparent = traceparent.clone();
            }
        }
    }

    /// Marks this envelope as sent while handling the message `cause_id` of the call `ctx`:
    /// same correlation chain and trace, caused by that message.
    pub fn follow(&mut self, ctx: &CallContext, cause_id: &str) {
        if self.correlation_id.is_empty() {
            self.correlation_id = ctx.correlation_id.clone();
        }
        if self.causation_id.is_empty() {
            self.causation_id = cause_id.to_owned();
        }
        self.fill_trace(ctx);
    }

    /// Makes this envelope the answer to `request`, sent by `source`: a fresh id, the
    /// request's correlation id, caused by the request, stamped now (fields already set stay).
    pub fn answer_to(&mut self, request: &Envelope, source: &str) {
        self.answer(&request.correlation_id, &request.id, source);
    }

    /// [`Envelope::answer_to`] when only the request's correlation id and id are at hand.
    pub fn answer(&mut self, correlation_id: &str, request_id: &str, source: &str) {
        if self.id.is_empty() {
            self.id = new_id();
        }
        if self.correlation_id.is_empty() {
            self.correlation_id = correlation_id.to_owned();
        }
        if self.causation_id.is_empty() {
            self.causation_id = request_id.to_owned();
        }
        if self.source.is_empty() {
            self.source = source.to_owned();
        }
        if self.created_at.is_none() {
            self.created_at = Some(SystemTime::now().into());
        }
    }

    /// The metadata that carries this envelope's tracing fields on a gRPC hop
    /// (`x-correlation-id`, `traceparent`, `idempotency-key`; empty ones are left out).
    pub fn metadata(&self) -> MetadataMap {
        let mut metadata = MetadataMap::new();
        put(&mut metadata, CORRELATION_ID, &self.correlation_id);
        put(&mut metadata, TRACEPARENT, &self.traceparent);
        put(&mut metadata, IDEMPOTENCY_KEY, &self.idempotency_key);
        metadata
    }
}

/// Sets `key` to `value` unless the value is empty or not valid as metadata.
pub(crate) fn put(metadata: &mut MetadataMap, key: &'static str, value: &str) {
    if value.is_empty() {
        return;
    }
    if let Ok(value) = MetadataValue::try_from(value) {
        metadata.insert(key, value);
    }
}

/// The canonical name of a gRPC code, as in google.rpc.Code (`NOT_FOUND`).
pub fn code_name(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::Ok => "OK",
        tonic::Code::Cancelled => "CANCELLED",
        tonic::Code::Unknown => "UNKNOWN",
        tonic::Code::InvalidArgument => "INVALID_ARGUMENT",
        tonic::Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        tonic::Code::NotFound => "NOT_FOUND",
        tonic::Code::AlreadyExists => "ALREADY_EXISTS",
        tonic::Code::PermissionDenied => "PERMISSION_DENIED",
        tonic::Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        tonic::Code::FailedPrecondition => "FAILED_PRECONDITION",
        tonic::Code::Aborted => "ABORTED",
        tonic::Code::OutOfRange => "OUT_OF_RANGE",
        tonic::Code::Unimplemented => "UNIMPLEMENTED",
        tonic::Code::Internal => "INTERNAL",
        tonic::Code::Unavailable => "UNAVAILABLE",
        tonic::Code::DataLoss => "DATA_LOSS",
        tonic::Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

impl From<&tonic::Status> for ErrorStatus {
    fn from(status: &tonic::Status) -> Self {
        Self {
            code: status.code() as i32,
            message: status.message().to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::context::{Deadline, DeadlinePolicy};

    fn ctx() -> CallContext {
        CallContext {
            correlation_id: "corr".into(),
            deadline: Deadline::after(Duration::from_secs(5), true),
            traceparent: Some("00-t-s-01".into()),
            idempotency_key: Some("key".into()),
            principal: None,
            credentials: None,
        }
    }

    #[test]
    fn fill_from_fills_only_what_is_empty() {
        let mut envelope = Envelope::default();
        envelope.fill_from(&ctx());
        assert_eq!(envelope.id.len(), 36);
        assert_eq!(envelope.correlation_id, "corr");
        assert_eq!(envelope.traceparent, "00-t-s-01");
        assert_eq!(envelope.idempotency_key, "key");
        assert_eq!(envelope.attempt, 1);
        assert!(envelope.created_at.is_some() && envelope.deadline.is_some());

        let earlier: prost_types::Timestamp = (SystemTime::now() + Duration::from_secs(1)).into();
        let mut own = Envelope {
            id: "mine".into(),
            correlation_id: "other".into(),
            deadline: Some(earlier),
            attempt: 3,
            ..Default::default()
        };
        own.fill_from(&ctx());
        assert_eq!(
            (own.id.as_str(), own.correlation_id.as_str(), own.attempt),
            ("mine", "other", 3)
        );
        assert_eq!(own.deadline, Some(earlier), "an earlier deadline stays");
    }

    #[test]
    fn frames_share_the_deadline_but_not_the_idempotency_key() {
        let mut frame = Envelope::default();
        frame.fill_frame(&ctx());
        assert!(frame.idempotency_key.is_empty());
        assert!(frame.deadline.is_some());
        assert_eq!(frame.attempt, 1);
    }

    #[test]
    fn content_type_is_derived_from_the_payload_when_empty() {
        let mut json = Envelope {
            payload: Some(Payload::Json(prost_types::Value::default())),
            ..Default::default()
        };
        json.fill_identity(&ctx());
        assert_eq!(json.content_type, "application/json");
        let mut named = Envelope {
            content_type: "text/plain".into(),
            payload: Some(Payload::Binary(b"hi".to_vec())),
            ..Default::default()
        };
        named.fill_identity(&ctx());
        assert_eq!(named.content_type, "text/plain", "a named type stays");
        let mut empty = Envelope::default();
        empty.fill_identity(&ctx());
        assert!(empty.content_type.is_empty());
    }

    #[test]
    fn identity_leaves_the_idempotency_key_alone() {
        let mut frame = Envelope::default();
        frame.fill_identity(&ctx());
        assert!(frame.idempotency_key.is_empty());
        assert_eq!(frame.traceparent, "00-t-s-01");
        assert_eq!(frame.attempt, 0);
    }

    #[test]
    fn answers_and_follow_ups_keep_the_chain() {
        let request = Envelope {
            id: "req".into(),
            correlation_id: "corr".into(),
            ..Default::default()
        };
        let mut reply = Envelope::default();
        reply.answer_to(&request, "echo");
        assert_eq!(
            (reply.correlation_id.as_str(), reply.causation_id.as_str()),
            ("corr", "req")
        );
        assert_eq!(reply.source, "echo");
        assert!(!reply.id.is_empty() && reply.created_at.is_some());

        let mut next = Envelope::default();
        next.follow(&CallContext::new(&DeadlinePolicy::default()), "req");
        assert_eq!(next.causation_id, "req");
        assert!(!next.correlation_id.is_empty());
    }

    #[test]
    fn metadata_carries_the_tracing_fields() {
        let envelope = Envelope {
            correlation_id: "corr".into(),
            traceparent: "tp".into(),
            ..Default::default()
        };
        let metadata = envelope.metadata();
        assert_eq!(metadata.get(CORRELATION_ID).unwrap(), "corr");
        assert_eq!(metadata.get(TRACEPARENT).unwrap(), "tp");
        assert!(metadata.get(IDEMPOTENCY_KEY).is_none());
    }

    #[test]
    fn error_status_from_a_status() {
        let status = tonic::Status::not_found("no such agent");
        let error = ErrorStatus::from(&status);
        assert_eq!(error.code, tonic::Code::NotFound as i32);
        assert_eq!(error.message, "no such agent");
    }
}
