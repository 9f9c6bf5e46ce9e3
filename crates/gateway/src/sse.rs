//! Streams as Server-Sent Events.
//!
//! Every `StreamResponse` becomes one event: `id: <stream_id>:<sequence>`
//! (so `Last-Event-ID` alone says which stream to resume and where),
//! `event:` its kind (`progress`, `partial`, `result`, `error`) and `data:`
//! its proto3 JSON. A gRPC error that ends the stream becomes a last
//! `event: error` whose data is the gateway's error JSON.

use std::{
    convert::Infallible,
    future::Future,
    io::Write,
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use agentmesh_proto::v1::{StreamEventKind, StreamResponse};
use axum::{
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use futures::{FutureExt, StreamExt, stream};
use http_body::Frame;
use tonic::Code;

use crate::{EventStream, error::ApiError, json};

/// The header a reconnecting client sends with the last id it saw.
pub(crate) const LAST_EVENT_ID: &str = "last-event-id";

/// Where to resume a stream: its id and the last sequence the client saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ResumePoint {
    /// The node's stream id.
    pub(crate) stream_id: String,
    /// The last sequence received (0: from the beginning).
    pub(crate) after: u64,
}

/// Parses a `Last-Event-ID` of the form `<stream_id>:<sequence>`.
pub(crate) fn parse_last_event_id(value: &str) -> Result<ResumePoint, ApiError> {
    let invalid = || {
        ApiError::invalid_argument(
            "INVALID_LAST_EVENT_ID",
            format!(
                "Last-Event-ID '{value}' is not an event id of this gateway: expected <stream_id>:<sequence>"
            ),
        )
    };
    let (stream_id, sequence) = value.trim().rsplit_once(':').ok_or_else(invalid)?;
    let after = sequence.parse().map_err(|_| invalid())?;
    if stream_id.is_empty() {
        return Err(invalid());
    }
    Ok(ResumePoint {
        stream_id: stream_id.to_owned(),
        after,
    })
}

/// The SSE event name of a stream event kind.
pub(crate) fn event_name(kind: i32) -> &'static str {
    match StreamEventKind::try_from(kind) {
        Ok(StreamEventKind::Progress) => "progress",
        Ok(StreamEventKind::Result) => "result",
        Ok(StreamEventKind::Error) => "error",
        // UNSPECIFIED is read as PARTIAL (see the proto).
        _ => "partial",
    }
}

/// Appends one stream event in the SSE wire format. The JSON is one line
/// (JSON escapes newlines inside strings), so it is a single `data:` field.
pub(crate) fn write_event(response: &StreamResponse, out: &mut Vec<u8>) {
    let start = out.len();
    let _ = write!(
        out,
        "id: {}:{}\nevent: {}\ndata: ",
        response.stream_id,
        response.sequence,
        event_name(response.kind)
    );
    match json::write_json(response, out) {
        Ok(()) => out.extend_from_slice(b"\n\n"),
        Err(error) => {
            out.truncate(start);
            write_error(&error, out);
        }
    }
}

/// Appends the last event of a stream that failed: its error JSON.
pub(crate) fn write_error(error: &ApiError, out: &mut Vec<u8>) {
    out.extend_from_slice(b"event: error\ndata: ");
    let _ = serde_json::to_writer(&mut *out, &error.to_json());
    out.extend_from_slice(b"\n\n");
}

/// The keep-alive comment.
const KEEP_ALIVE: &[u8] = b":\n\n";

/// Coalesce at most this much into one body frame (it is also what a reader that stopped
/// reading may hold in a frame on top of the connection's write buffer).
const MAX_FRAME: usize = 16 * 1024;

/// The SSE response for a stream: `first` (an event already read, if any),
/// then the rest of `events`, with keep-alive comments while it is quiet.
pub(crate) fn response(
    first: Option<StreamResponse>,
    events: EventStream<StreamResponse>,
    keep_alive: Duration,
) -> Response {
    let body = SseBody {
        events: stream::iter(first.map(Ok)).chain(events).boxed(),
        ended: false,
        keep_alive,
        timer: Box::pin(tokio::time::sleep(keep_alive)),
    };
    let mut response = Response::new(axum::body::Body::new(body));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Reverse proxies such as nginx buffer responses unless told not to,
    // which would hold events back until the buffer fills.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// The body of an SSE response.
///
/// Unlike axum's `Sse`, which sends every event as its own HTTP chunk, it
/// puts every event that is ready when polled into one chunk. Nothing waits
/// for more: when no event is ready, what was gathered goes out at once, so
/// events are still flushed as they are produced. But a reader that fell
/// behind catches up in a few large writes instead of one small chunk (and,
/// for the client, one wake-up) per event, which is what kept SSE far below
/// gRPC's throughput.
struct SseBody {
    events: EventStream<StreamResponse>,
    /// The stream has ended (after its last item or an error).
    ended: bool,
    keep_alive: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl http_body::Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        let mut out = Vec::new();
        while out.len() < MAX_FRAME {
            match this.events.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(event))) => {
                    if out.is_empty() {
                        out.reserve(512);
                    }
                    write_event(&event, &mut out);
                }
                Poll::Ready(Some(Err(status))) => {
                    // Nothing follows an error: the node ends the stream
                    // after one, and a client must not see more either.
                    write_error(&ApiError::from(status), &mut out);
                    this.ended = true;
                    break;
                }
                Poll::Ready(None) => {
                    this.ended = true;
                    break;
                }
                Poll::Pending => break,
            }
        }
        if !out.is_empty() {
            let next = tokio::time::Instant::now() + this.keep_alive;
            this.timer.as_mut().reset(next);
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
        }
        if this.ended {
            return Poll::Ready(None);
        }
        ready!(this.timer.as_mut().poll(cx));
        let next = tokio::time::Instant::now() + this.keep_alive;
        this.timer.as_mut().reset(next);
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(KEEP_ALIVE)))))
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }
}

/// What the start of a resumed stream says about it.
pub(crate) enum Resumed {
    /// Events follow.
    Events(EventStream<StreamResponse>),
    /// The stream had already ended successfully after the resume point.
    Finished,
}

/// Looks at a resumed stream without waiting: a stream that already ended
/// successfully right after the resume point has nothing more to say, which
/// the caller answers with 204 (the status that tells a browser EventSource
/// to stop reconnecting).
pub(crate) fn peek_resumed(mut events: EventStream<StreamResponse>) -> Resumed {
    match events.next().now_or_never() {
        Some(None) => Resumed::Finished,
        Some(Some(first)) => Resumed::Events(stream::iter([first]).chain(events).boxed()),
        None => Resumed::Events(events),
    }
}

/// 204: the stream has nothing more to send.
pub(crate) fn finished() -> Response {
    StatusCode::NO_CONTENT.into_response()
}

/// An error for an event stream that ended before it said anything.
pub(crate) fn ended_without_events() -> ApiError {
    ApiError::new(
        Code::Internal,
        "the stream ended before its first event, so it has no id to detach under",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_last_event_ids() {
        assert_eq!(
            parse_last_event_id("0199-abc:17").unwrap(),
            ResumePoint {
                stream_id: "0199-abc".into(),
                after: 17
            }
        );
        assert!(parse_last_event_id("17").is_err());
        assert!(parse_last_event_id(":17").is_err());
        assert!(parse_last_event_id("abc:x").is_err());
    }

    #[test]
    fn names_events_by_kind() {
        assert_eq!(event_name(StreamEventKind::Progress as i32), "progress");
        assert_eq!(event_name(StreamEventKind::Partial as i32), "partial");
        assert_eq!(event_name(StreamEventKind::Unspecified as i32), "partial");
        assert_eq!(event_name(StreamEventKind::Result as i32), "result");
        assert_eq!(event_name(StreamEventKind::Error as i32), "error");
    }
}
