//! Tower layer that gives every call a correlation id: the caller's
//! `x-correlation-id` if valid, otherwise a fresh UUIDv7. The id is put back
//! into the request headers and extensions (so handlers and outgoing calls see
//! it), echoed in the response headers, and recorded on the call's span.

use std::task::{Context, Poll};

use agentmesh_proto::metadata::{CORRELATION_ID, is_valid_correlation_id};
use futures::future::BoxFuture;
use http::{HeaderValue, Request, Response};
use tower::{Layer, Service};
use tracing::Instrument;

/// The correlation id of the call being served (a request extension).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorrelationId(pub String);

/// Adds [`CorrelationId`] handling to a service.
#[derive(Debug, Clone, Copy, Default)]
pub struct CorrelationLayer;

impl<S> Layer<S> for CorrelationLayer {
    type Service = Correlation<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Correlation { inner }
    }
}

/// The service produced by [`CorrelationLayer`].
#[derive(Debug, Clone)]
pub struct Correlation<S> {
    inner: S,
}

impl<S, B, RB> Service<Request<B>> for Correlation<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let id = request
            .headers()
            .get(CORRELATION_ID)
            .and_then(|value| value.to_str().ok())
            .filter(|value| is_valid_correlation_id(value))
            .map(str::to_owned)
            .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        let header = HeaderValue::from_str(&id).expect("validated or generated ids are ASCII");
        request.headers_mut().insert(CORRELATION_ID, header.clone());
        request.extensions_mut().insert(CorrelationId(id.clone()));
        let span = tracing::info_span!("call", correlation_id = %id, path = %request.uri().path());
        let response = self.inner.call(request);
        Box::pin(
            async move {
                let mut response = response.await?;
                response.headers_mut().insert(CORRELATION_ID, header);
                Ok(response)
            }
            .instrument(span),
        )
    }
}
