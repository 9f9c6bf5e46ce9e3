//! The durable queue over HTTP: submit, queue statistics, dead letters and
//! results (poll, long-poll and SSE).
//!
//! | route | what |
//! |---|---|
//! | `POST /v1/queues/{queue}/messages` | one `Envelope` or `{"messages":[...]}` → `SubmitResponse` (201 when something was accepted) |
//! | `GET /v1/queues` | `ListQueuesResponse` |
//! | `GET /v1/queues/{queue}/dead-letters?pageSize=&pageToken=` | `ListDeadLettersResponse` |
//! | `POST /v1/queues/{queue}/dead-letters/redrive` | `{"all":true}` or `{"messageIds":[...]}` → `RedriveDeadLettersResponse` |
//! | `POST /v1/queues/{queue}/dead-letters/purge` | same body → `PurgeDeadLettersResponse` |
//! | `GET /v1/results/{correlation_id}[?wait=true]` | `GetResultResponse`; 404 until the result is there |
//! | `GET /v1/results/{correlation_id}/events` | SSE: keep-alive comments, then one `result` event |
//!
//! The gateway calls the core's [`QueueApi`] in process with the call's
//! context, exactly as the gRPC face does.

use std::{convert::Infallible, sync::Arc};

use agentmesh_proto::v1::{
    AwaitResultRequest, AwaitResultResponse, Envelope, GetResultRequest, ListDeadLettersRequest,
    ListQueuesRequest, PurgeDeadLettersRequest, RedriveDeadLettersRequest, SubmitRequest,
};
use axum::{
    Router,
    extract::{DefaultBodyLimit, Path, Query, State},
    http::{HeaderValue, StatusCode},
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
    routing::{get, post},
};
use futures::StreamExt;
use serde::Deserialize;
use tonic::Code;

use agentmesh_core::QueueApi;

use crate::{
    call::Call,
    error::ApiError,
    json::{self, Body},
    routes::openapi::{self, CallHeaders, ErrorBody},
};

/// Largest request body the queue routes read (a batch of messages).
const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

type Api = Arc<dyn QueueApi>;

/// The queue routes' OpenAPI description, merged into `/openapi.json`.
#[derive(utoipa::OpenApi)]
#[openapi(paths(
    submit,
    list_queues,
    list_dead_letters,
    redrive,
    purge,
    get_result,
    result_events
))]
pub(crate) struct QueueDocs;

/// The queue and result routes, to be merged into the node's app.
pub fn queue_routes(api: Arc<dyn QueueApi>) -> Router {
    Router::new()
        .route("/v1/queues", get(list_queues))
        .route("/v1/queues/{queue}/messages", post(submit))
        .route("/v1/queues/{queue}/dead-letters", get(list_dead_letters))
        .route("/v1/queues/{queue}/dead-letters/redrive", post(redrive))
        .route("/v1/queues/{queue}/dead-letters/purge", post(purge))
        .route("/v1/results/{correlation_id}", get(get_result))
        .route("/v1/results/{correlation_id}/events", get(result_events))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(api)
}

/// Parses a submit body: one envelope, or `{"messages": [envelope, ...]}`.
fn parse_messages(body: &[u8]) -> Result<(Vec<Envelope>, bool), ApiError> {
    let invalid = |message: String| ApiError::invalid_argument("INVALID_JSON", message);
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(invalid(
            "the request body is empty: send an Envelope or {\"messages\": [...]}".into(),
        ));
    }
    crate::json::refuse_duplicate_keys(body)
        .map_err(|e| invalid(format!("invalid JSON in the request body: {e}")))?;
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| invalid(format!("invalid JSON in the request body: {e}")))?;
    let parse = |value: serde_json::Value, what: &str| {
        agentmesh_proto::json::from_json_value::<Envelope>(value).map_err(|e| {
            invalid(format!(
                "invalid {what}: expected an agentmesh.v1.Envelope in proto3 JSON form: {e}"
            ))
        })
    };
    match value {
        serde_json::Value::Object(mut map) if map.contains_key("messages") => {
            if map.len() > 1 {
                return Err(invalid(
                    "a batch body has only the field \"messages\"".into(),
                ));
            }
            let Some(serde_json::Value::Array(items)) = map.remove("messages") else {
                return Err(invalid("\"messages\" must be an array of envelopes".into()));
            };
            if items.is_empty() {
                return Err(invalid("\"messages\" is empty".into()));
            }
            let envelopes = items
                .into_iter()
                .enumerate()
                .map(|(i, item)| parse(item, &format!("messages[{i}]")))
                .collect::<Result<Vec<_>, _>>()?;
            Ok((envelopes, true))
        }
        value => Ok((vec![parse(value, "request body")?], false)),
    }
}

/// Puts messages on a queue: one `Envelope`, or `{"messages":[...]}`.
/// Each message is acknowledged only once durable; the answer gives each
/// one's fate (accepted, duplicate by idempotency key, rejected).
#[utoipa::path(
    post,
    path = "/v1/queues/{queue}/messages",
    tag = "queues",
    params(("queue" = String, Path, description = "Queue name"), CallHeaders),
    request_body(content = openapi::Envelope, description = "An Envelope, or `{\"messages\":[Envelope...]}`", content_type = "application/json"),
    responses(
        (status = 201, description = "At least one message accepted", body = openapi::SubmitResponse),
        (status = 200, description = "Nothing new accepted (duplicates or rejections)", body = openapi::SubmitResponse),
        (status = 400, description = "Invalid JSON, or a single message rejected", body = ErrorBody),
        (status = 413, description = "Body over the limit", body = ErrorBody),
        (status = 503, description = "The queue store failed", body = ErrorBody),
        (status = 507, description = "The queue store is out of disk space; the message was not acknowledged", body = ErrorBody),
    )
)]
async fn submit(
    State(api): State<Api>,
    Path(queue): Path<String>,
    call: Call,
    body: Body,
) -> Result<Response, ApiError> {
    agentmesh_proto::names::check_name("queue name", &queue)
        .map_err(|message| ApiError::invalid_argument("INVALID_NAME", message))?;
    let (mut envelopes, batch) = parse_messages(&body.0)?;
    if !batch {
        // A single message may carry its idempotency key and trace context as headers.
        for envelope in &mut envelopes {
            call.stamp(envelope);
        }
    }
    // One frame for the whole batch (an empty batch sends none).
    let requests = if envelopes.is_empty() {
        Vec::new()
    } else {
        vec![SubmitRequest {
            queue: queue.clone(),
            envelope: None,
            envelopes,
        }]
    };
    let frames = futures::stream::iter(requests.into_iter().map(Ok)).boxed();
    let response = api.submit(call.ctx(), frames).await?;
    if !batch && response.rejected == 1 {
        let reason = response
            .outcomes
            .first()
            .map(|o| o.reason.clone())
            .unwrap_or_default();
        return Err(
            ApiError::new(Code::InvalidArgument, format!("message rejected: {reason}"))
                .with_reason("MESSAGE_REJECTED", [("queue", queue)]),
        );
    }
    let status = if response.accepted > 0 {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(json::response(status, json::to_vec(&response)?))
}

/// Every queue with its depth, in-flight count, dead letters and oldest age.
#[utoipa::path(
    get,
    path = "/v1/queues",
    tag = "queues",
    params(CallHeaders),
    responses((status = 200, description = "The queues", body = openapi::ListQueuesResponse))
)]
async fn list_queues(State(api): State<Api>, call: Call) -> Result<Response, ApiError> {
    let response = api.list_queues(call.ctx(), ListQueuesRequest {}).await?;
    json::ok(&response)
}

/// `?pageSize=&pageToken=` (snake_case accepted too).
#[derive(Debug, Default, Deserialize)]
struct PageQuery {
    #[serde(rename = "pageSize", alias = "page_size")]
    page_size: Option<u32>,
    #[serde(rename = "pageToken", alias = "page_token")]
    page_token: Option<String>,
}

/// A page of a queue's dead letters (`?pageSize=&pageToken=`).
#[utoipa::path(
    get,
    path = "/v1/queues/{queue}/dead-letters",
    tag = "queues",
    params(("queue" = String, Path, description = "Queue name"), ("pageSize" = Option<u32>, Query, description = "Dead letters per page (default 100)"), ("pageToken" = Option<String>, Query, description = "`nextPageToken` of the previous page"), CallHeaders),
    responses(
        (status = 200, description = "Dead letters, oldest first", body = openapi::ListDeadLettersResponse),
        (status = 404, description = "No such queue", body = ErrorBody),
    )
)]
async fn list_dead_letters(
    State(api): State<Api>,
    Path(queue): Path<String>,
    query: Result<Query<PageQuery>, axum::extract::rejection::QueryRejection>,
    call: Call,
) -> Result<Response, ApiError> {
    let Query(page) = query.map_err(|e| {
        ApiError::invalid_argument("INVALID_QUERY", format!("invalid query string: {e}"))
    })?;
    let request = ListDeadLettersRequest {
        queue,
        page_size: page.page_size.unwrap_or_default(),
        page_token: page.page_token.unwrap_or_default(),
    };
    let response = api.list_dead_letters(call.ctx(), request).await?;
    json::ok(&response)
}

/// Moves dead letters back into their queue with a fresh attempt count.
#[utoipa::path(
    post,
    path = "/v1/queues/{queue}/dead-letters/redrive",
    tag = "queues",
    params(("queue" = String, Path, description = "Queue name"), CallHeaders),
    request_body(content = openapi::DeadLetterSelection, description = "`{\"all\":true}` or `{\"messageIds\":[...]}`", content_type = "application/json"),
    responses(
        (status = 200, description = "How many went back", body = openapi::RedriveDeadLettersResponse),
        (status = 404, description = "No such queue", body = ErrorBody),
    )
)]
async fn redrive(
    State(api): State<Api>,
    Path(queue): Path<String>,
    call: Call,
    body: Body,
) -> Result<Response, ApiError> {
    let mut request: RedriveDeadLettersRequest = body.parse()?;
    request.queue = queue;
    let response = api.redrive_dead_letters(call.ctx(), request).await?;
    json::ok(&response)
}

/// Deletes dead letters for good.
#[utoipa::path(
    post,
    path = "/v1/queues/{queue}/dead-letters/purge",
    tag = "queues",
    params(("queue" = String, Path, description = "Queue name"), CallHeaders),
    request_body(content = openapi::DeadLetterSelection, description = "`{\"all\":true}` or `{\"messageIds\":[...]}`", content_type = "application/json"),
    responses(
        (status = 200, description = "How many were deleted", body = openapi::PurgeDeadLettersResponse),
        (status = 404, description = "No such queue", body = ErrorBody),
    )
)]
async fn purge(
    State(api): State<Api>,
    Path(queue): Path<String>,
    call: Call,
    body: Body,
) -> Result<Response, ApiError> {
    let mut request: PurgeDeadLettersRequest = body.parse()?;
    request.queue = queue;
    let response = api.purge_dead_letters(call.ctx(), request).await?;
    json::ok(&response)
}

/// `?wait=true` (or a bare `?wait`).
#[derive(Debug, Default, Deserialize)]
struct WaitQuery {
    wait: Option<String>,
}

impl WaitQuery {
    fn wait(&self) -> Result<bool, ApiError> {
        match self.wait.as_deref().map(str::trim) {
            None | Some("false" | "0") => Ok(false),
            Some("" | "true" | "1") => Ok(true),
            Some(other) => Err(ApiError::invalid_argument(
                "INVALID_QUERY",
                format!("wait must be true or false, not {other:?}"),
            )),
        }
    }
}

/// The result a consumer acked a message with; `?wait=true` waits for it
/// until the request's deadline (`X-Timeout-Ms`).
#[utoipa::path(
    get,
    path = "/v1/results/{correlation_id}",
    tag = "results",
    params(("correlation_id" = String, Path, description = "Correlation id of the submitted message (its id unless it set one)"), ("wait" = Option<bool>, Query, description = "Wait for the result until the deadline"), CallHeaders),
    responses(
        (status = 200, description = "The result", body = openapi::GetResultResponse),
        (status = 404, description = "No result (yet)", body = ErrorBody),
        (status = 504, description = "Waited until the deadline", body = ErrorBody),
    )
)]
async fn get_result(
    State(api): State<Api>,
    Path(correlation_id): Path<String>,
    query: Result<Query<WaitQuery>, axum::extract::rejection::QueryRejection>,
    call: Call,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| {
        ApiError::invalid_argument("INVALID_QUERY", format!("invalid query string: {e}"))
    })?;
    let request = GetResultRequest {
        correlation_id,
        wait: query.wait()?,
    };
    let response = api.get_result(call.ctx(), request).await?;
    json::ok(&response)
}

/// Server-Sent Events that complete when the result lands: keep-alive
/// comments while waiting, then one `result` event (or an `error` event).
#[utoipa::path(
    get,
    path = "/v1/results/{correlation_id}/events",
    tag = "results",
    params(("correlation_id" = String, Path, description = "Correlation id of the submitted message (its id unless it set one)"), CallHeaders),
    responses((status = 200, description = "`text/event-stream`: one `result` event", content_type = "text/event-stream", body = String))
)]
async fn result_events(
    State(api): State<Api>,
    Path(correlation_id): Path<String>,
    call: Call,
) -> Result<Response, ApiError> {
    let request = AwaitResultRequest {
        correlation_id: correlation_id.clone(),
    };
    let events = api.await_result(call.ctx(), request).await?;
    let events = events
        // Nothing follows the result or an error.
        .scan(false, |ended, item| {
            let next = if *ended {
                None
            } else {
                *ended = match &item {
                    Ok(response) => response.result.is_some(),
                    Err(_) => true,
                };
                Some(item)
            };
            std::future::ready(next)
        })
        .map(move |item| {
            Ok::<_, Infallible>(match item {
                Ok(response) if response.result.is_some() => {
                    result_event(&correlation_id, &response)
                }
                Ok(_) => Event::default().comment("waiting"),
                Err(status) => error_event(&ApiError::from(status)),
            })
        });
    let mut response = Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response();
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

fn result_event(correlation_id: &str, response: &AwaitResultResponse) -> Event {
    match json::to_vec(response) {
        Ok(data) => Event::default()
            .id(correlation_id)
            .event("result")
            .data(String::from_utf8_lossy(&data)),
        Err(error) => error_event(&error),
    }
}

fn error_event(error: &ApiError) -> Event {
    Event::default()
        .event("error")
        .data(error.to_json().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_one_envelope_or_a_batch() {
        let (one, batch) = parse_messages(br#"{"type":"t","json":{"a":1}}"#).unwrap();
        assert!(!batch);
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].r#type, "t");
        let (many, batch) =
            parse_messages(br#"{"messages":[{"type":"a"},{"type":"b","idempotencyKey":"k"}]}"#)
                .unwrap();
        assert!(batch);
        assert_eq!(many.len(), 2);
        assert_eq!(many[1].idempotency_key, "k");
    }

    #[test]
    fn rejects_malformed_bodies_with_a_reason() {
        for (body, needle) in [
            (&b""[..], "empty"),
            (b"{", "invalid JSON"),
            (br#"{"messages":{}}"#, "array"),
            (br#"{"messages":[]}"#, "empty"),
            (br#"{"messages":[{"typo":1}]}"#, "messages[0]"),
            (br#"{"tpye":"x"}"#, "Envelope"),
        ] {
            let error = parse_messages(body).unwrap_err();
            assert_eq!(error.code(), Code::InvalidArgument);
            assert!(error.message().contains(needle), "{error}");
        }
    }

    #[test]
    fn reads_the_wait_flag() {
        let q = |w: Option<&str>| WaitQuery {
            wait: w.map(str::to_owned),
        };
        assert!(!q(None).wait().unwrap());
        assert!(q(Some("")).wait().unwrap());
        assert!(q(Some("true")).wait().unwrap());
        assert!(!q(Some("false")).wait().unwrap());
        assert!(q(Some("maybe")).wait().is_err());
    }
}
