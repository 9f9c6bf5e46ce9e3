//! Streaming calls (`AgentService.Stream`) as Server-Sent Events, resumable
//! with `Last-Event-ID`, and detached streams for browsers.
//!
//! A browser's EventSource can only GET, so a stream is started with
//! `POST ...?detach` and read at its `events_url`. Starting it opens the
//! stream on the node and reads its first event, which carries the node's
//! stream id; the gateway then lets go of it. The node keeps numbering and
//! buffering events (its replay window, which also bounds how far the agent
//! runs ahead) and cancels the stream if no reader attaches within its
//! resume grace. The GET attaches through the node's resume, exactly like a
//! reconnect: after `Last-Event-ID` if the browser sent one, otherwise
//! after the first event, which the gateway kept, and serves first.
//! Keeping it matters: reading it counted as delivered for the node, which
//! may then let it slide out of its window before anyone attaches.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use agentmesh_proto::v1::{Envelope, StreamRequest, StreamResponse};
use axum::{
    extract::{Path, Query, State},
    http::{HeaderValue, StatusCode, header},
    response::Response,
};
use futures::StreamExt;
use serde::Deserialize;
use tonic::Code;
use utoipa::IntoParams;

use super::{
    Gateway,
    openapi::{self, CallHeaders, DetachedStream, ErrorBody},
};
use crate::{
    call::Call,
    error::ApiError,
    json,
    sse::{self, LAST_EVENT_ID, ResumePoint, Resumed},
};

/// Options of `POST /v1/agents/{name}/stream`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct StreamQuery {
    /// `true` (or present without a value): start the stream and answer its
    /// id and `events_url` instead of the events.
    #[param(value_type = Option<bool>)]
    detach: Option<String>,
}

impl StreamQuery {
    fn detach(&self) -> bool {
        self.detach
            .as_deref()
            .is_some_and(|v| !matches!(v.trim(), "false" | "0"))
    }
}

/// Streams an agent's answer as Server-Sent Events.
#[utoipa::path(
    post,
    path = "/v1/agents/{name}/stream",
    tag = "streams",
    params(
        ("name" = String, Path, description = "Agent name or `skill:<id>`"),
        StreamQuery,
        ("Last-Event-ID" = Option<String>, Header, description = "Resume the stream after this event id (`<streamId>:<sequence>`); the body and `detach` are then ignored"),
        CallHeaders,
    ),
    request_body(content = openapi::Envelope, description = "The request envelope", content_type = "application/json"),
    responses(
        (status = 200, description = "The events: `id: <streamId>:<sequence>`, `event: progress|partial|result|error`, `data:` a StreamResponse (or, for a final gRPC error, the error JSON)", content_type = "text/event-stream", body = openapi::StreamResponse),
        (status = 202, description = "Detached (`?detach`): where to read the stream", body = DetachedStream),
        (status = 204, description = "Resumed after the stream's last event: nothing more to send"),
        (status = 400, description = "Invalid JSON or Last-Event-ID, or the resume point left the replay window", body = ErrorBody),
        (status = 404, description = "No agent registered for the target, or unknown stream", body = ErrorBody),
        (status = 413, description = "Body over the gateway's limit", body = ErrorBody),
    )
)]
pub(crate) async fn start(
    State(gateway): State<Arc<Gateway>>,
    Path(name): Path<String>,
    query: Result<Query<StreamQuery>, axum::extract::rejection::QueryRejection>,
    call: Call,
    body: json::Body,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|rejection| {
        ApiError::invalid_argument(
            "INVALID_QUERY",
            format!(
                "invalid query: {}; the only parameter is detach",
                rejection.body_text()
            ),
        )
    })?;
    // A resume reads a stream that exists: the body and `?detach` are for starting one.
    if let Some(last) = call.header(LAST_EVENT_ID) {
        let point = sse::parse_last_event_id(last)?;
        return resume(&gateway, &call, point).await;
    }
    let mut envelope: Envelope = body.parse()?;
    envelope.target = name;
    call.stamp(&mut envelope);
    let mut events = gateway
        .mesh
        .stream(
            call.ctx(),
            StreamRequest {
                envelope: Some(envelope),
                ..Default::default()
            },
        )
        .await?;
    if !query.detach() {
        return Ok(sse::response(None, events, gateway.config.sse_keep_alive));
    }
    let first = match events.next().await {
        Some(Ok(first)) => first,
        Some(Err(status)) => return Err(status.into()),
        None => return Err(sse::ended_without_events()),
    };
    // Let go: the node keeps the stream for its resume grace.
    drop(events);
    let detached = DetachedStream {
        events_url: format!("/v1/streams/{}/events", first.stream_id),
        stream_id: first.stream_id.clone(),
    };
    gateway.detached.remember(first);
    let body = serde_json::to_vec(&detached).unwrap_or_default();
    let mut response = json::response(StatusCode::ACCEPTED, body);
    if let Ok(location) = HeaderValue::from_str(&detached.events_url) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

/// Reads a stream as Server-Sent Events: a detached one from its start, or
/// any stream after the `Last-Event-ID` the client (or a browser
/// EventSource reconnecting by itself) sends.
#[utoipa::path(
    get,
    path = "/v1/streams/{id}/events",
    tag = "streams",
    params(
        ("id" = String, Path, description = "The stream id (`stream_id` of the detach answer)"),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id (`<streamId>:<sequence>`)"),
        CallHeaders,
    ),
    responses(
        (status = 200, description = "The events, as for `POST /v1/agents/{name}/stream`", content_type = "text/event-stream", body = openapi::StreamResponse),
        (status = 204, description = "The stream already ended after Last-Event-ID"),
        (status = 400, description = "Invalid Last-Event-ID, or it left the replay window", body = ErrorBody),
        (status = 404, description = "Unknown or expired stream, or a Last-Event-ID of another stream", body = ErrorBody),
    )
)]
pub(crate) async fn events(
    State(gateway): State<Arc<Gateway>>,
    Path(id): Path<String>,
    call: Call,
) -> Result<Response, ApiError> {
    let point = match call.header(LAST_EVENT_ID) {
        Some(last) => {
            let point = sse::parse_last_event_id(last)?;
            if point.stream_id != id {
                // An event of another stream is not one of this stream's events.
                return Err(ApiError::new(
                    Code::NotFound,
                    format!(
                        "stream {id} has no event {}: Last-Event-ID names stream {}",
                        last.trim(),
                        point.stream_id
                    ),
                )
                .with_reason("UNKNOWN_EVENT", [("stream", id.clone())]));
            }
            point
        }
        None => ResumePoint {
            stream_id: id,
            after: 0,
        },
    };
    match gateway.detached.first(&point.stream_id) {
        Some(first) if point.after < first.sequence => {
            let rest = open(&gateway, &call, &point.stream_id, first.sequence).await?;
            Ok(sse::response(
                Some(first),
                rest,
                gateway.config.sse_keep_alive,
            ))
        }
        _ => resume(&gateway, &call, point).await,
    }
}

/// The rest of a stream after `point`, as SSE (204 if there is none).
async fn resume(gateway: &Gateway, call: &Call, point: ResumePoint) -> Result<Response, ApiError> {
    let events = open(gateway, call, &point.stream_id, point.after).await?;
    Ok(match sse::peek_resumed(events) {
        Resumed::Finished => sse::finished(),
        Resumed::Events(events) => sse::response(None, events, gateway.config.sse_keep_alive),
    })
}

async fn open(
    gateway: &Gateway,
    call: &Call,
    stream_id: &str,
    after: u64,
) -> Result<crate::EventStream<StreamResponse>, ApiError> {
    let opened = gateway
        .mesh
        .stream(
            call.ctx(),
            StreamRequest {
                resume_stream_id: stream_id.to_owned(),
                resume_after_sequence: after,
                ..Default::default()
            },
        )
        .await;
    opened.map_err(|status| {
        if status.code() == Code::NotFound {
            gateway.detached.forget(stream_id);
        }
        ApiError::from(status)
    })
}

/// The first events of detached streams, kept for their first reader.
pub(crate) struct Detached {
    retention: Duration,
    max: usize,
    entries: Mutex<HashMap<String, (Instant, StreamResponse)>>,
}

impl Detached {
    pub(crate) fn new(retention: Duration, max: usize) -> Self {
        Self {
            retention,
            max: max.max(1),
            entries: Mutex::default(),
        }
    }

    fn remember(&self, first: StreamResponse) {
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.retain(|_, (at, _)| now.duration_since(*at) < self.retention);
        while entries.len() >= self.max {
            let oldest = entries
                .iter()
                .min_by_key(|(_, (at, _))| *at)
                .map(|(id, _)| id.clone());
            match oldest {
                Some(id) => entries.remove(&id),
                None => break,
            };
        }
        entries.insert(first.stream_id.clone(), (now, first));
    }

    fn first(&self, stream_id: &str) -> Option<StreamResponse> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .get(stream_id)
            .filter(|(at, _)| at.elapsed() < self.retention)
            .map(|(_, first)| first.clone())
    }

    fn forget(&self, stream_id: &str) {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(stream_id);
    }
}
