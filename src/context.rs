//! The context of one call, built once at the edge (from gRPC metadata or HTTP headers, which
//! carry the same names) or, on an agent, from the envelope it handles; every handler, the
//! router, fan-out, the queue and the SDK read this one value instead of re-deriving it.

use std::time::{Duration, Instant, SystemTime};

use crate::{
    metadata::{
        CORRELATION_ID, GRPC_TIMEOUT, IDEMPOTENCY_KEY, TIMEOUT_MS, TRACEPARENT,
        is_valid_correlation_id, parse_grpc_timeout, parse_timeout_ms,
    },
    v1::Envelope,
};

/// When a call must be done by, and whether its caller asked for that or the edge default
/// applies (conversations run without a deadline unless the caller set one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    /// The absolute deadline.
    pub at: Instant,
    /// Whether the caller set it (`grpc-timeout`, `x-timeout-ms`, an envelope deadline).
    pub explicit: bool,
}

impl Deadline {
    /// A deadline `timeout` from now.
    pub fn after(timeout: Duration, explicit: bool) -> Self {
        let now = Instant::now();
        // A timeout too long for the clock is as good as none: a century away.
        let at = now
            .checked_add(timeout)
            .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400));
        Self { at, explicit }
    }

    /// Time left (zero once it passed).
    pub fn remaining(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    /// The budget for the next hop: what remains minus `margin`, so the callee always gives
    /// up before the caller does; `None` when nothing would be left.
    pub fn for_next_hop(&self, margin: Duration) -> Option<Duration> {
        self.remaining()
            .checked_sub(margin)
            .filter(|budget| !budget.is_zero())
    }

    /// The same instant on the wall clock, for an envelope's `deadline` field.
    pub fn as_system_time(&self) -> SystemTime {
        SystemTime::now() + self.remaining()
    }
}

/// Who is calling, once authentication has established it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Principal {
    /// The authenticated identity (a token subject or certificate name).
    pub id: String,
    /// Groups or roles the credentials grant (from the token's entry in the configuration, or
    /// a JWT's `groups` / `roles` claims); policies may name them as `group:<name>`.
    pub groups: Vec<String>,
}

impl Principal {
    /// A principal without groups.
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            groups: Vec::new(),
        }
    }
}

/// The bearer token a caller authenticated with. Passed on only to other nodes of the mesh
/// (a stream resumed through one node and served by another), never to agents; its `Debug`
/// never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials(String);

impl Credentials {
    /// Wraps a bearer token.
    pub fn bearer(token: impl Into<String>) -> Self {
        Self(token.into())
    }

    /// The token.
    pub fn token(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credentials(..)")
    }
}

/// How the edge turns a caller's timeout into a deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeadlinePolicy {
    /// Timeout when the caller set none.
    pub default_timeout: Duration,
    /// Longest timeout honoured; longer ones are cut to it.
    pub max_timeout: Duration,
}

impl Default for DeadlinePolicy {
    fn default() -> Self {
        Self {
            default_timeout: Duration::from_secs(30),
            max_timeout: Duration::from_secs(3600),
        }
    }
}

/// Everything the mesh knows about the call being served (a request extension at the node,
/// a task-local on an agent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallContext {
    /// Correlation id of the whole call chain.
    pub correlation_id: String,
    /// The call's deadline.
    pub deadline: Deadline,
    /// W3C traceparent, if the caller sent one.
    pub traceparent: Option<String>,
    /// Idempotency key sent as metadata or header, if any.
    pub idempotency_key: Option<String>,
    /// The authenticated caller, when authentication is on.
    pub principal: Option<Principal>,
    /// The credentials it authenticated with (see [`Credentials`]).
    pub credentials: Option<Credentials>,
}

impl CallContext {
    /// A context for a call that starts here: a fresh correlation id and the default deadline.
    pub fn new(policy: &DeadlinePolicy) -> Self {
        Self {
            correlation_id: new_id(),
            deadline: Deadline::after(policy.default_timeout, false),
            traceparent: None,
            idempotency_key: None,
            principal: None,
            credentials: None,
        }
    }

    /// Reads a call's context from its headers (gRPC metadata and HTTP headers use the same
    /// names): a valid `x-correlation-id` or a fresh one, the deadline from `grpc-timeout` or
    /// `x-timeout-ms` (else the policy's default, and never beyond its maximum),
    /// `traceparent` and `idempotency-key`.
    pub fn from_headers(headers: &http::HeaderMap, policy: &DeadlinePolicy) -> Self {
        Self::read(
            |name| headers.get(name).and_then(|v| v.to_str().ok()),
            policy,
        )
    }

    /// [`CallContext::from_headers`] over tonic metadata.
    pub fn from_metadata(metadata: &tonic::metadata::MetadataMap, policy: &DeadlinePolicy) -> Self {
        Self::read(
            |name| metadata.get(name).and_then(|v| v.to_str().ok()),
            policy,
        )
    }

    fn read<'a>(header: impl Fn(&str) -> Option<&'a str>, policy: &DeadlinePolicy) -> Self {
        let text = |name: &str| {
            header(name)
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
        };
        let asked = header(GRPC_TIMEOUT)
            .and_then(parse_grpc_timeout)
            .or_else(|| header(TIMEOUT_MS).and_then(parse_timeout_ms));
        let timeout = asked
            .unwrap_or(policy.default_timeout)
            .min(policy.max_timeout);
        Self {
            correlation_id: text(CORRELATION_ID)
                .filter(|id| is_valid_correlation_id(id))
                .unwrap_or_else(new_id),
            deadline: Deadline::after(timeout, asked.is_some()),
            traceparent: text(TRACEPARENT),
            idempotency_key: text(IDEMPOTENCY_KEY),
            principal: None,
            credentials: None,
        }
    }

    /// The context an agent handles `envelope` in: its correlation id, trace context,
    /// idempotency key and deadline (`default_timeout` from now when it carries none).
    pub fn from_envelope(envelope: &Envelope, default_timeout: Duration) -> Self {
        let deadline = envelope
            .deadline
            .and_then(|d| SystemTime::try_from(d).ok())
            .map(|at| {
                let left = at.duration_since(SystemTime::now()).unwrap_or_default();
                Deadline::after(left, true)
            })
            .unwrap_or_else(|| Deadline::after(default_timeout, false));
        let some = |v: &str| (!v.is_empty()).then(|| v.to_owned());
        Self {
            correlation_id: some(&envelope.correlation_id).unwrap_or_else(new_id),
            deadline,
            traceparent: some(&envelope.traceparent),
            idempotency_key: some(&envelope.idempotency_key),
            principal: None,
            credentials: None,
        }
    }

    /// The metadata that carries this call's chain to a call made while serving it
    /// (`x-correlation-id` and `traceparent`).
    pub fn trace_metadata(&self) -> tonic::metadata::MetadataMap {
        let mut metadata = tonic::metadata::MetadataMap::new();
        crate::envelope::put(&mut metadata, CORRELATION_ID, &self.correlation_id);
        if let Some(traceparent) = &self.traceparent {
            crate::envelope::put(&mut metadata, TRACEPARENT, traceparent);
        }
        metadata
    }

    /// The principal the node stamped on a call it routed here (`x-agentmesh-principal`), for
    /// an agent's handlers. Only the node sets that header on calls it forwards, overwriting
    /// whatever its caller sent; an agent reachable other than through the node should not
    /// trust it.
    pub fn with_forwarded_principal(mut self, metadata: &tonic::metadata::MetadataMap) -> Self {
        self.principal = metadata
            .get(crate::metadata::PRINCIPAL)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
            .map(Principal::new);
        self
    }

    /// The context the edge layer stored in a request's extensions.
    pub fn of<T>(request: &tonic::Request<T>) -> Option<&CallContext> {
        request.extensions().get::<CallContext>()
    }
}

/// A fresh, time-ordered id (UUIDv7) for messages and correlation chains.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, HeaderValue};

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn reads_every_field_from_headers() {
        let ctx = CallContext::from_headers(
            &headers(&[
                (CORRELATION_ID, "corr-1"),
                (GRPC_TIMEOUT, "250m"),
                (TRACEPARENT, "00-abc-def-01"),
                (IDEMPOTENCY_KEY, "k1"),
            ]),
            &DeadlinePolicy::default(),
        );
        assert_eq!(ctx.correlation_id, "corr-1");
        assert!(ctx.deadline.explicit);
        assert!(ctx.deadline.remaining() <= Duration::from_millis(250));
        assert!(ctx.deadline.remaining() > Duration::from_millis(200));
        assert_eq!(ctx.traceparent.as_deref(), Some("00-abc-def-01"));
        assert_eq!(ctx.idempotency_key.as_deref(), Some("k1"));
    }

    #[test]
    fn defaults_apply_when_headers_are_missing_or_invalid() {
        let policy = DeadlinePolicy {
            default_timeout: Duration::from_secs(5),
            max_timeout: Duration::from_secs(10),
        };
        let ctx = CallContext::from_headers(&headers(&[(CORRELATION_ID, "bad id")]), &policy);
        assert_ne!(ctx.correlation_id, "bad id");
        assert_eq!(ctx.correlation_id.len(), 36, "a UUID");
        assert!(!ctx.deadline.explicit);
        assert!(ctx.deadline.remaining() > Duration::from_secs(4));
        // x-timeout-ms works for HTTP callers, and the maximum caps it.
        let ctx = CallContext::from_headers(&headers(&[(TIMEOUT_MS, "60000")]), &policy);
        assert!(ctx.deadline.explicit);
        assert!(ctx.deadline.remaining() <= Duration::from_secs(10));
    }

    #[test]
    fn next_hop_budget_is_strictly_shorter() {
        let deadline = Deadline::after(Duration::from_millis(100), true);
        let budget = deadline.for_next_hop(Duration::from_millis(50)).unwrap();
        assert!(budget <= Duration::from_millis(50));
        assert_eq!(deadline.for_next_hop(Duration::from_millis(200)), None);
    }

    #[test]
    fn envelope_context_keeps_the_chain() {
        let envelope = Envelope {
            correlation_id: "c".into(),
            traceparent: "t".into(),
            deadline: Some((SystemTime::now() + Duration::from_secs(2)).into()),
            ..Default::default()
        };
        let ctx = CallContext::from_envelope(&envelope, Duration::from_secs(30));
        assert_eq!(ctx.correlation_id, "c");
        assert_eq!(ctx.traceparent.as_deref(), Some("t"));
        assert!(ctx.deadline.explicit);
        assert!(ctx.deadline.remaining() <= Duration::from_secs(2));
        let bare = CallContext::from_envelope(&Envelope::default(), Duration::from_secs(30));
        assert!(!bare.deadline.explicit);
        assert!(!bare.correlation_id.is_empty());
    }
}
