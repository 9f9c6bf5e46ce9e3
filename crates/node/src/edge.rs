//! The edge: one tower layer that builds each call's [`CallContext`] from its headers, for
//! gRPC and HTTP alike (they carry the same names), stores it in the request's extensions
//! for every face to read, echoes the correlation id in the response, and records it on
//! the call's span.

use std::task::{Context, Poll};

use agentmesh_proto::{CallContext, DeadlinePolicy, metadata::CORRELATION_ID};
use futures::future::BoxFuture;
use http::{HeaderValue, Request, Response};
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
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let ctx = CallContext::from_headers(request.headers(), &self.policy);
        let header = HeaderValue::from_str(&ctx.correlation_id)
            .expect("validated or generated ids are visible ASCII");
        let span = tracing::info_span!("call", correlation_id = %ctx.correlation_id, path = %request.uri().path());
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

#[cfg(test)]
mod tests {
    use std::{convert::Infallible, time::Duration};

    use agentmesh_proto::metadata::{GRPC_TIMEOUT, TIMEOUT_MS};
    use tower::{ServiceBuilder, ServiceExt, service_fn};

    use super::*;

    /// Runs one request through the layer; returns the context the inner service saw and
    /// the response's correlation header.
    async fn through(headers: &[(&'static str, &str)]) -> (CallContext, String) {
        let service = ServiceBuilder::new()
            .layer(CallContextLayer::new(DeadlinePolicy {
                default_timeout: Duration::from_secs(30),
                max_timeout: Duration::from_secs(60),
            }))
            .service(service_fn(|request: Request<()>| async move {
                let ctx = request.extensions().get::<CallContext>().cloned().unwrap();
                Ok::<_, Infallible>(Response::new(ctx))
            }));
        let mut request = Request::new(());
        for (name, value) in headers {
            request
                .headers_mut()
                .insert(*name, HeaderValue::from_str(value).unwrap());
        }
        let response = service.oneshot(request).await.unwrap();
        let echoed = response.headers()[CORRELATION_ID]
            .to_str()
            .unwrap()
            .to_owned();
        (response.into_body(), echoed)
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
        let (ctx, _) = through(&[(CORRELATION_ID, &"x".repeat(200))]).await;
        assert_eq!(ctx.correlation_id.len(), 36, "over 128 bytes is replaced");
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
