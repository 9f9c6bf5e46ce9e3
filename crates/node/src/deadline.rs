//! Deadlines: a tower layer that fixes each call's absolute deadline at the
//! edge, and [`Deadline`], which hands every outgoing call a strictly shorter
//! budget so that in a chain A → B → C the deepest call gives up first.

use std::{
    task::{Context, Poll},
    time::{Duration, Instant},
};

use agentmesh_proto::metadata::{GRPC_TIMEOUT, TIMEOUT_MS, parse_grpc_timeout};
use http::Request;
use tower::{Layer, Service};

use crate::error::NodeError;

/// The absolute deadline of the call being served (a request extension).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline(pub Instant);

impl Deadline {
    /// Time left until the deadline (zero once it passed).
    pub fn remaining(&self) -> Duration {
        self.0.saturating_duration_since(Instant::now())
    }

    /// The timeout to give the next hop: what remains minus `margin`, so the
    /// callee always gives up before we do. Fails if nothing would be left.
    pub fn for_next_hop(&self, margin: Duration, hop: &str) -> Result<Duration, NodeError> {
        let remaining = self.remaining();
        match remaining.checked_sub(margin) {
            Some(budget) if !budget.is_zero() => Ok(budget),
            _ => Err(NodeError::DeadlineExceeded(format!(
                "deadline exceeded before calling {hop}: {} ms left, {} ms needed as hop margin",
                remaining.as_millis(),
                margin.as_millis()
            ))),
        }
    }
}

/// Reads `grpc-timeout` (or `x-timeout-ms` from HTTP clients) and stores the
/// call's [`Deadline`], using a default when the caller set none.
#[derive(Debug, Clone, Copy)]
pub struct DeadlineLayer {
    default_timeout: Duration,
    max_timeout: Duration,
}

impl DeadlineLayer {
    /// A layer with the given edge default and upper bound.
    pub fn new(default_timeout: Duration, max_timeout: Duration) -> Self {
        Self {
            default_timeout,
            max_timeout,
        }
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = DeadlineService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        DeadlineService {
            inner,
            layer: *self,
        }
    }
}

/// The service produced by [`DeadlineLayer`].
#[derive(Debug, Clone)]
pub struct DeadlineService<S> {
    inner: S,
    layer: DeadlineLayer,
}

impl<S, B> Service<Request<B>> for DeadlineService<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let headers = request.headers();
        let timeout = headers
            .get(GRPC_TIMEOUT)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout)
            .or_else(|| {
                headers
                    .get(TIMEOUT_MS)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse().ok())
                    .map(Duration::from_millis)
            })
            .unwrap_or(self.layer.default_timeout)
            .min(self.layer.max_timeout);
        request
            .extensions_mut()
            .insert(Deadline(Instant::now() + timeout));
        self.inner.call(request)
    }
}
