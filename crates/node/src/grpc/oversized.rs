//! Oversized unary requests: tonic refuses a request message over the size limit before any
//! service sees it, with OUT_OF_RANGE (a code for positions past an end). This layer relabels
//! that refusal RESOURCE_EXHAUSTED, the code gRPC uses for size limits, keeping its message.
//! (For client streams the faces do the same as they read each frame: `grpc::inbound`.)

use std::task::{Context, Poll};

use futures::future::BoxFuture;
use http::HeaderMap;
use tonic::{Code, Status};
use tower::{Layer, Service};

/// How tonic's refusal of an over-limit message starts; nothing else in the node says it.
const SIZE_LIMIT_REFUSAL: &str = "Error, decoded message length too large";

/// Relabels tonic's OUT_OF_RANGE refusal of an oversized request as RESOURCE_EXHAUSTED.
#[derive(Debug, Clone, Copy, Default)]
pub struct OversizedRequestLayer;

impl<S> Layer<S> for OversizedRequestLayer {
    type Service = OversizedRequest<S>;

    fn layer(&self, inner: S) -> Self::Service {
        OversizedRequest { inner }
    }
}

/// The service [`OversizedRequestLayer`] wraps.
#[derive(Debug, Clone)]
pub struct OversizedRequest<S> {
    inner: S,
}

impl<S, Request, B> Service<Request> for OversizedRequest<S>
where
    S: Service<Request, Response = http::Response<B>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<B>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let response = self.inner.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            relabel_size_refusal(response.headers_mut());
            Ok(response)
        })
    }
}

/// Rewrites a trailers-only response that carries tonic's size refusal.
fn relabel_size_refusal(headers: &mut HeaderMap) {
    if headers.get(Status::GRPC_STATUS).map(|v| v.as_bytes()) != Some(b"11") {
        return;
    }
    let Some(status) = Status::from_header_map(headers) else {
        return;
    };
    if status.code() != Code::OutOfRange || !status.message().starts_with(SIZE_LIMIT_REFUSAL) {
        return;
    }
    let exhausted = Status::resource_exhausted(format!(
        "the request is over the size limit: {}",
        status.message()
    ));
    headers.remove(Status::GRPC_STATUS);
    headers.remove(Status::GRPC_MESSAGE);
    if exhausted.add_header(headers).is_err() {
        // Only a message that cannot be a header value fails; keep the original then.
        let _ = status.add_header(headers);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_of(headers: &HeaderMap) -> Status {
        Status::from_header_map(headers).unwrap()
    }

    #[test]
    fn the_size_refusal_becomes_resource_exhausted_and_other_statuses_stay() {
        let mut headers = HeaderMap::new();
        Status::out_of_range(
            "Error, decoded message length too large: found 9 bytes, the limit is: 4 bytes",
        )
        .add_header(&mut headers)
        .unwrap();
        relabel_size_refusal(&mut headers);
        let relabelled = status_of(&headers);
        assert_eq!(relabelled.code(), Code::ResourceExhausted);
        assert!(relabelled.message().contains("found 9 bytes"));

        let mut headers = HeaderMap::new();
        Status::out_of_range("the reader fell behind the replay window")
            .add_header(&mut headers)
            .unwrap();
        relabel_size_refusal(&mut headers);
        assert_eq!(status_of(&headers).code(), Code::OutOfRange);
    }
}
