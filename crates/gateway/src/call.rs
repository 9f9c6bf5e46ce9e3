//! An HTTP request as a mesh call: the [`CallContext`] the node's edge layer built from its
//! headers (or, when the gateway runs without that layer, one built here the same way), and
//! the headers themselves for the few routes that read more of them.

use agentmesh_proto::{CallContext, DeadlinePolicy, v1::Envelope};

use crate::error::ApiError;
use axum::{
    extract::FromRequestParts,
    http::{HeaderMap, request::Parts},
};

/// The caller's context, taken from an HTTP request.
#[derive(Debug, Clone)]
pub(crate) struct Call {
    headers: HeaderMap,
    ctx: CallContext,
}

impl Call {
    /// A header as text, if present and valid.
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
    }

    /// The call's context, for the core.
    pub(crate) fn ctx(&self) -> CallContext {
        self.ctx.clone()
    }

    /// Fills the envelope's idempotency key and trace context from the
    /// `Idempotency-Key` and `traceparent` headers when the body left them
    /// empty: HTTP clients set them as headers, the mesh reads the envelope.
    pub(crate) fn stamp(&self, envelope: &mut Envelope) {
        if envelope.idempotency_key.is_empty() {
            if let Some(key) = &self.ctx.idempotency_key {
                envelope.idempotency_key = key.clone();
            }
        }
        envelope.fill_trace(&self.ctx);
    }

    /// Fills only the trace context: for the messages of a conversation,
    /// which share the handshake's headers but must not share its
    /// idempotency key (they would be deduplicated as one).
    pub(crate) fn stamp_trace(&self, envelope: &mut Envelope) {
        envelope.fill_trace(&self.ctx);
    }
}

/// Refuses an `X-Timeout-Ms` that is not a whole number of milliseconds from 1 up, rather than
/// quietly running the call on the default deadline.
fn check_timeout_header(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(value) = headers.get(agentmesh_proto::metadata::TIMEOUT_MS) else {
        return Ok(());
    };
    let text = value.to_str().unwrap_or_default().trim();
    match agentmesh_proto::metadata::parse_timeout_ms(text) {
        Some(_) => Ok(()),
        None => Err(ApiError::invalid_argument(
            "INVALID_TIMEOUT",
            format!(
                "X-Timeout-Ms {} is not a whole number of milliseconds from 1 up",
                agentmesh_proto::names::quoted(text)
            ),
        )),
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Call {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        check_timeout_header(&parts.headers)?;
        let ctx = parts
            .extensions
            .get::<CallContext>()
            .cloned()
            .unwrap_or_else(|| {
                CallContext::from_headers(&parts.headers, &DeadlinePolicy::default())
            });
        Ok(Self {
            headers: parts.headers.clone(),
            ctx,
        })
    }
}
