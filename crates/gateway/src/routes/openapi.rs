//! `/openapi.json`: the OpenAPI 3 document of the gateway, generated from
//! the handlers' `#[utoipa::path]` annotations. Proto messages are loose
//! `object` schemas that name their proto type: their exact shape is the
//! proto3 JSON mapping of `proto/agentmesh/v1`, which the protos document.

use std::{borrow::Cow, sync::Arc};

use axum::{extract::State, http::StatusCode, response::Response};
use serde::Serialize;
use utoipa::{
    IntoParams, OpenApi, PartialSchema, ToSchema,
    openapi::{
        License, RefOr,
        schema::{AdditionalProperties, ObjectBuilder, Schema, Type},
    },
};

use super::Gateway;
use crate::json;

/// The document the routes are added to.
#[derive(OpenApi)]
#[openapi(tags(
    (name = "agents", description = "Discover agents and call them"),
    (name = "streams", description = "Server-Sent Events of streaming calls"),
    (name = "traces", description = "The trace journal: every hop of a chain of messages"),
    (name = "health", description = "Liveness, readiness and this document"),
))]
struct Base;

pub(super) fn base() -> utoipa::openapi::OpenApi {
    Base::openapi()
}

/// Fills in what the annotations do not carry: title, version and the
/// conventions every route shares.
pub(super) fn finish(document: &mut utoipa::openapi::OpenApi) {
    document.info.title = "agentmesh HTTP gateway".into();
    document.info.version = env!("CARGO_PKG_VERSION").into();
    document.info.description = Some(DESCRIPTION.into());
    document.info.license = Some(License::new("Apache-2.0"));
}

const DESCRIPTION: &str = "\
HTTP/JSON, Server-Sent Events and WebSocket access to an agentmesh node, on \
the same port as its gRPC services. Bodies are the proto3 canonical JSON \
mapping of the `agentmesh.v1` messages (camelCase fields, enums by name, \
64-bit integers as strings, `google.protobuf.Value` payloads as plain JSON). \
A body that names a field twice is refused with 400. Agent, skill and queue \
names are 1-128 characters of `A-Z a-z 0-9 . _ -`, not starting with `.`; \
others are refused with 400.

## Headers

- `X-Correlation-Id`: correlation id of the call chain. Sent on to the agent \
and echoed in every response; generated when absent or invalid.
- `X-Timeout-Ms`: the call's timeout in milliseconds (the HTTP form of \
`grpc-timeout`, which is also accepted). Default 30000; every hop gets a \
strictly shorter deadline. Past it the call fails with `DEADLINE_EXCEEDED` \
(HTTP 504), and a stream ends with an `error` event. A value that is not a \
whole number from 1 up (`abc`, `-1`, `1e23`) is refused with 400 \
(`INVALID_TIMEOUT`).
- `traceparent`: W3C trace context, copied into the envelope when it has none.
- `Idempotency-Key`: copied into the envelope's `idempotencyKey` when it has none.
- `Last-Event-ID`: on stream routes, resumes a stream after the given event \
(see below).

## Errors

Every error is `{\"error\":{\"code\":\"NOT_FOUND\",\"message\":\"...\",\"details\":[...]}}`: \
`code` is the gRPC code's name, `details` the google.rpc details in proto3 JSON \
(`google.rpc.ErrorInfo` with `reason`, `domain` and `metadata`). The HTTP \
status matches the code: INVALID_ARGUMENT, OUT_OF_RANGE and \
FAILED_PRECONDITION 400, UNAUTHENTICATED 401, PERMISSION_DENIED 403, \
NOT_FOUND 404, ALREADY_EXISTS and ABORTED 409, RESOURCE_EXHAUSTED 429, \
CANCELLED 499, INTERNAL, UNKNOWN and DATA_LOSS 500, UNIMPLEMENTED 501, \
UNAVAILABLE 503, DEADLINE_EXCEEDED 504. A body that is not valid JSON of the \
expected message is 400 (reason `INVALID_JSON`, the message says what is \
wrong); a body over the gateway's limit is 413 (reason `BODY_TOO_LARGE`).

## Streams (Server-Sent Events)

Each event has `id: <streamId>:<sequence>`, `event: progress|partial|result|error` \
and `data:` the `StreamResponse` JSON; comments keep the connection alive. \
The stream ends after `result` or `error`; a gRPC error that ends it is sent \
as `event: error` with the error JSON above. Reconnecting with \
`Last-Event-ID` resumes after that event, with no gap and no duplicate, while \
the node still holds it (else 400 `OUT_OF_RANGE`); a stream that already \
ended there answers 204, which stops a browser's EventSource from \
reconnecting. Clients should close their EventSource on `result` and \
`error`.

`POST /v1/agents/{name}/stream?detach` starts a stream without reading it \
and answers, as soon as the stream's first event exists (it carries the \
stream's id), 202 with its `stream_id` and `events_url` \
(`/v1/streams/{id}/events`), which an EventSource (that can only GET) then \
reads from the beginning, or from its `Last-Event-ID` when it reconnects. A detached stream nobody reads is \
cancelled after the node's resume grace (30 s by default).

## Conversations (WebSocket)

`GET /v1/agents/{name}/converse` upgrades to a WebSocket: each text message \
is an `Envelope` JSON for the agent, each message back is an `Envelope` JSON \
from it. The server pings; a client that stops answering is disconnected. \
When the conversation ends the socket is closed: 1000 when it ended \
normally, `4000 + gRPC code` (e.g. 4005 for NOT_FOUND) with `CODE: message` \
as the reason when it failed, 1007 for a message that is not Envelope JSON, \
1003 for a binary message. Browser pages may converse from this origin or \
one of the gateway's CORS origins (else 403).
";

/// A loose `object` schema for a proto message, named after it.
macro_rules! proto_schema {
    ($name:ident, $full:literal) => {
        #[doc = concat!("Schema of `", $full, "` in proto3 JSON.")]
        pub(crate) struct $name;

        impl PartialSchema for $name {
            fn schema() -> RefOr<Schema> {
                ObjectBuilder::new()
                    .schema_type(Type::Object)
                    .description(Some(concat!(
                        "`",
                        $full,
                        "` in the proto3 JSON mapping (see proto/agentmesh/v1)."
                    )))
                    .additional_properties(Some(AdditionalProperties::FreeForm(true)))
                    .into()
            }
        }

        impl ToSchema for $name {
            fn name() -> Cow<'static, str> {
                Cow::Borrowed(stringify!($name))
            }
        }
    };
}

proto_schema!(Envelope, "agentmesh.v1.Envelope");
proto_schema!(AgentInstance, "agentmesh.v1.AgentInstance");
proto_schema!(AddA2aAgentRequest, "agentmesh.v1.AddA2aAgentRequest");
proto_schema!(AddA2aAgentResponse, "agentmesh.v1.AddA2aAgentResponse");
proto_schema!(StreamResponse, "agentmesh.v1.StreamResponse");
proto_schema!(FanOutRequest, "agentmesh.v1.FanOutRequest");
proto_schema!(SubmitResponse, "agentmesh.v1.SubmitResponse");
proto_schema!(ListQueuesResponse, "agentmesh.v1.ListQueuesResponse");
proto_schema!(
    ListDeadLettersResponse,
    "agentmesh.v1.ListDeadLettersResponse"
);
proto_schema!(
    DeadLetterSelection,
    "agentmesh.v1.RedriveDeadLettersRequest / PurgeDeadLettersRequest"
);
proto_schema!(
    RedriveDeadLettersResponse,
    "agentmesh.v1.RedriveDeadLettersResponse"
);
proto_schema!(
    PurgeDeadLettersResponse,
    "agentmesh.v1.PurgeDeadLettersResponse"
);
proto_schema!(GetResultResponse, "agentmesh.v1.GetResultResponse");
proto_schema!(FanOutResponse, "agentmesh.v1.FanOutResponse");
proto_schema!(ErrorDetail, "google.protobuf.Any (a google.rpc detail)");

/// The agents matching a query.
#[derive(ToSchema)]
#[allow(dead_code, reason = "only describes the JSON the handlers write")]
pub(crate) struct AgentList {
    /// Matching instances, sorted by name then instance id.
    agents: Vec<AgentInstance>,
}

/// Every error response.
#[derive(ToSchema)]
#[allow(dead_code, reason = "only describes the JSON of `ApiError`")]
pub(crate) struct ErrorBody {
    /// What went wrong.
    error: ErrorObject,
}

/// The error of an [`ErrorBody`].
#[derive(ToSchema)]
#[allow(dead_code, reason = "only describes the JSON of `ApiError`")]
pub(crate) struct ErrorObject {
    /// The gRPC code's name, e.g. `NOT_FOUND`.
    #[schema(example = "NOT_FOUND")]
    code: String,
    /// A developer-facing message.
    message: String,
    /// google.rpc details (`ErrorInfo`, ...) with their `@type`.
    details: Vec<ErrorDetail>,
}

/// A health answer.
#[derive(ToSchema)]
#[allow(dead_code, reason = "only describes the JSON the handlers write")]
pub(crate) struct Status {
    /// `ok` or `ready`.
    status: String,
}

/// A detached stream and where to read it.
#[derive(Serialize, ToSchema)]
pub(crate) struct DetachedStream {
    /// The node's id of the stream (also usable with gRPC `resume_stream_id`).
    pub(crate) stream_id: String,
    /// Where an EventSource reads the stream: `/v1/streams/{id}/events`.
    pub(crate) events_url: String,
}

/// Headers every call through the mesh understands.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code, reason = "the node's layers and `Call` read these headers")]
pub(crate) struct CallHeaders {
    /// Correlation id of the call chain; echoed in the response, generated when absent.
    #[param(rename = "X-Correlation-Id")]
    correlation_id: Option<String>,
    /// Timeout of the call in milliseconds (default 30000); anything but a whole number from 1
    /// up is refused with 400.
    #[param(rename = "X-Timeout-Ms", minimum = 1)]
    timeout_ms: Option<u64>,
    /// W3C trace context, copied into the envelope when it has none.
    #[param(rename = "traceparent")]
    traceparent: Option<String>,
    /// Deduplication key, copied into the envelope when it has none.
    #[param(rename = "Idempotency-Key")]
    idempotency_key: Option<String>,
}

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "health",
    responses((status = 200, description = "The OpenAPI 3 document of the gateway", content_type = "application/json"))
)]
pub(crate) async fn serve(State(gateway): State<Arc<Gateway>>) -> Response {
    let body = gateway.openapi.get().cloned().unwrap_or_default();
    json::response(StatusCode::OK, body)
}
