//! An HTTP request as a mesh call: its headers become gRPC metadata and its
//! extensions (the correlation id and deadline the node's layers put there)
//! travel along, so a call through the gateway is routed, stamped and timed
//! out exactly like the same call over gRPC.

use agentmesh_proto::{
    metadata::{IDEMPOTENCY_KEY, TRACEPARENT},
    v1::Envelope,
};
use axum::{
    extract::FromRequestParts,
    http::{Extensions, HeaderMap, request::Parts},
};
use tonic::metadata::MetadataMap;

/// The caller's context, taken from an HTTP request.
#[derive(Debug, Clone)]
pub(crate) struct Call {
    headers: HeaderMap,
    extensions: Extensions,
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

    /// A `tonic::Request` carrying `message` with this call's metadata and
    /// extensions.
    pub(crate) fn request<T>(&self, message: T) -> tonic::Request<T> {
        tonic::Request::from_parts(
            MetadataMap::from_headers(self.headers.clone()),
            self.extensions.clone(),
            message,
        )
    }

    /// Fills the envelope's idempotency key and trace context from the
    /// `Idempotency-Key` and `traceparent` headers when the body left them
    /// empty: HTTP clients set them as headers, the mesh reads the envelope.
    pub(crate) fn stamp(&self, envelope: &mut Envelope) {
        if envelope.idempotency_key.is_empty() {
            if let Some(key) = self.header(IDEMPOTENCY_KEY) {
                envelope.idempotency_key = key.to_owned();
            }
        }
        self.stamp_trace(envelope);
    }

    /// Fills only the trace context: for the messages of a conversation,
    /// which share the handshake's headers but must not share its
    /// idempotency key (they would be deduplicated as one).
    pub(crate) fn stamp_trace(&self, envelope: &mut Envelope) {
        if envelope.traceparent.is_empty() {
            if let Some(traceparent) = self.header(TRACEPARENT) {
                envelope.traceparent = traceparent.to_owned();
            }
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Call {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(Self {
            headers: parts.headers.clone(),
            extensions: parts.extensions.clone(),
        })
    }
}
