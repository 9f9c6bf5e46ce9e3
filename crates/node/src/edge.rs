//! The edge: one tower layer that builds each call's [`CallContext`] from its headers, for
//! gRPC and HTTP alike (they carry the same names), stores it in the request's extensions
//! for every face to read, echoes the correlation id in the response, and records it on
//! the call's span. A call whose forwarded headers break the limits of
//! [`agentmesh_proto::limits`] is refused here, before anything reaches an agent: gRPC with
//! INVALID_ARGUMENT, HTTP with 400 (431 for an over-long header) and the gateway's JSON error.

use std::task::{Context, Poll};

use agentmesh_gateway::ApiError;
use agentmesh_proto::{
    CallContext, DeadlinePolicy,
    limits::{Refusal, check_call_headers},
    metadata::CORRELATION_ID,
};
use futures::future::BoxFuture;
use http::{HeaderValue, Request, Response, StatusCode, header::CONTENT_TYPE};
use tower::{Layer, Service};
use tracing::Instrument;

/// Adds a [`CallContext`] to every request.
#[derive(Debug, Clone, Copy, Default)]
pub struct CallContextLayer {
    policy: DeadlinePolicy,
}

impl CallContextLayer {
    /// A layer that turns callers' timeouts into deadlines under `policy`.
    pub fn new(policy: DeadlinePolicy) -> Self {
        Self { policy }
    }
}

impl<S> Layer<S> for CallContextLayer {
    type Service = CallContextService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallContextService {
            inner,
            policy: self.policy,
        }
    }
}

/// The service produced by [`CallContextLayer`].
#[derive(Debug, Clone)]
pub struct CallContextService<S> {
    inner: S,
    policy: DeadlinePolicy,
}

impl<S, B, RB> Service<Request<B>> for CallContextService<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Future: Send + 'static,
    RB: Default + From<String> + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let headers = request.headers();
        if let Err(refusal) =
            check_call_headers(|name| headers.get(name).map(HeaderValue::as_bytes))
        {
            let response = refuse(&request, refusal);
            return Box::pin(async move { Ok(response) });
        }
        let ctx = CallContext::from_headers(request.headers(), &self.policy);
        let header = HeaderValue::from_str(&ctx.correlation_id)
            .expect("validated or generated ids are visible ASCII");
        // A debug span: at the default level no per-call span is built (its fields would be
        // formatted on every call); the events an operator sees at info and warn carry their
        // correlation id themselves.
        let span = tracing::debug_span!("call", correlation_id = %ctx.correlation_id, path = %request.uri().path());
        request.extensions_mut().insert(ctx);
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

/// The answer to a call refused at the edge, in the caller's protocol.
fn refuse<B, RB: Default + From<String>>(request: &Request<B>, refusal: Refusal) -> Response<RB> {
    let grpc = request
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    tracing::debug!(path = %request.uri().path(), %refusal, "call refused at the edge");
    if grpc {
        return tonic::Status::invalid_argument(refusal.message).into_http();
    }
    let status = if refusal.oversized {
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    } else {
        StatusCode::BAD_REQUEST
    };
    let error = ApiError::invalid_argument("INVALID_HEADER", refusal.message);
    let mut response = Response::new(RB::from(error.to_json().to_string()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
mod tests {
    use std::{convert::Infallible, time::Duration};

    use agentmesh_proto::metadata::{GRPC_TIMEOUT, TIMEOUT_MS};
    use tower::{ServiceBuilder, ServiceExt, service_fn};

    use super::*;

    /// Runs one request through the layer; returns the context the inner service saw and
    /// the response's correlation header.
    async fn through(headers: &[(&'static str, &str)]) -> (CallContext, String) {
        let response = respond(headers).await;
        let echoed = response.headers()[CORRELATION_ID]
            .to_str()
            .unwrap()
            .to_owned();
        (
            response.extensions().get::<CallContext>().cloned().unwrap(),
            echoed,
        )
    }

    /// Runs one request through the layer; the inner service answers with the context it saw
    /// in the response's extensions.
    async fn respond(headers: &[(&'static str, &str)]) -> Response<String> {
        let service = ServiceBuilder::new()
            .layer(CallContextLayer::new(DeadlinePolicy {
                default_timeout: Duration::from_secs(30),
                max_timeout: Duration::from_secs(60),
            }))
            .service(service_fn(|request: Request<()>| async move {
                let ctx = request.extensions().get::<CallContext>().cloned().unwrap();
                let mut response = Response::new(String::new());
                response.extensions_mut().insert(ctx);
                Ok::<_, Infallible>(response)
            }));
        let mut request = Request::new(());
        for (name, value) in headers {
            request
                .headers_mut()
                .insert(*name, HeaderValue::from_str(value).unwrap());
        }
        service.oneshot(request).await.unwrap()
    }

    #[tokio::test]
    async fn keeps_a_valid_correlation_id_and_echoes_it() {
        let (ctx, echoed) = through(&[(CORRELATION_ID, "chain-42")]).await;
        assert_eq!(ctx.correlation_id, "chain-42");
        assert_eq!(echoed, "chain-42");
    }

    #[tokio::test]
    async fn replaces_a_missing_or_invalid_correlation_id() {
        let (ctx, echoed) = through(&[]).await;
        assert_eq!(ctx.correlation_id.len(), 36);
        assert_eq!(echoed, ctx.correlation_id);
        let (ctx, _) = through(&[(CORRELATION_ID, "not valid")]).await;
        assert_eq!(ctx.correlation_id.len(), 36, "a malformed id is replaced");
    }

    #[tokio::test]
    async fn refuses_over_long_or_malformed_forwarded_headers() {
        let long = "k".repeat(20_000);
        for (name, value, status) in [
            ("idempotency-key", long.as_str(), 431),
            (CORRELATION_ID, long.as_str(), 431),
            ("traceparent", long.as_str(), 431),
            ("traceparent", "00-abc-def-01", 400),
        ] {
            let response = respond(&[(name, value)]).await;
            assert_eq!(response.status().as_u16(), status, "{name}");
            assert!(response.body().contains("INVALID_ARGUMENT"), "{name}");
            assert!(
                response.extensions().get::<CallContext>().is_none(),
                "not forwarded"
            );
            // gRPC callers get the status in the caller's protocol.
            let response = respond(&[(name, value), ("content-type", "application/grpc")]).await;
            let status = tonic::Status::from_header_map(response.headers()).unwrap();
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{name}");
        }
    }

    #[tokio::test]
    async fn deadline_from_grpc_timeout_or_x_timeout_ms_else_the_default() {
        let (ctx, _) = through(&[(GRPC_TIMEOUT, "200m")]).await;
        assert!(ctx.deadline.explicit);
        assert!(ctx.deadline.remaining() <= Duration::from_millis(200));
        let (ctx, _) = through(&[(TIMEOUT_MS, "1500")]).await;
        assert!(ctx.deadline.explicit);
        assert!(ctx.deadline.remaining() <= Duration::from_millis(1500));
        let (ctx, _) = through(&[]).await;
        assert!(!ctx.deadline.explicit);
        assert!(ctx.deadline.remaining() > Duration::from_secs(29));
        let (ctx, _) = through(&[(GRPC_TIMEOUT, "2H")]).await;
        assert!(
            ctx.deadline.remaining() <= Duration::from_secs(60),
            "capped at the maximum"
        );
    }
}
