//! `/openapi.json`: the OpenAPI 3 document of the gateway, generated from
//! the handlers' `#[utoipa::path]` annotations. Proto messages are loose
//! `object` schemas that name their proto type: their exact shape is the
//! proto3 JSON mapping of `proto/agentmesh/v1`, which the protos document.

use std::{borrow::Cow, sync::Arc};

use axum::{extract::State, http::StatusCode, response::Response};
use serde::Serialize;
use serde_json::{Value, json};
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

## Authentication

A node starts with authentication off; then no route needs credentials. With \
`auth.enabled = true` every route marked with a security requirement needs \
`Authorization: Bearer <token>` (an API token or a JWT; see docs/security.md). A GET \
may carry the token as the `access_token` query parameter instead, for \
`EventSource` and `WebSocket`, which cannot set headers (`auth.query_token`, on by \
default). A missing, unknown, badly signed or expired token is 401 \
(`UNAUTHENTICATED`, with `WWW-Authenticate: Bearer realm=\"agentmesh\"`); a call \
the policy does not grant is 403 (`PERMISSION_DENIED`, naming the action and \
resource); a caller over its rate limit (`[rate_limit]`) is 429 \
(`RESOURCE_EXHAUSTED`, reason `RATE_LIMITED`, with `Retry-After` in seconds). \
`/healthz` and `/readyz` are always open. `/openapi.json` is open unless \
`auth.public_schema = false`. `/metrics` (Prometheus exposition, not part of this \
document) needs a token unless `auth.public_metrics = true`.

## Headers

- `X-Correlation-Id`: correlation id of the call chain. Sent on to the agent \
and echoed in every response; generated when absent or invalid.
- `X-Timeout-Ms`: the call's timeout in milliseconds (the HTTP form of \
`grpc-timeout`, which is also accepted). Default 30000; every hop gets a \
strictly shorter deadline. Past it the call fails with `DEADLINE_EXCEEDED` \
(HTTP 504), and a stream ends with an `error` event. A value that is not a \
whole number from 1 to 18446744073709551615 (`abc`, `-1`, `1e23`) is refused \
with 400 (`INVALID_TIMEOUT`); one over the node's `max_timeout` is cut to it.
- `traceparent`: W3C trace context, copied into the envelope when it has none.
- `Idempotency-Key`: copied into the envelope's `idempotencyKey` when it has none.
- `Last-Event-ID`: on stream routes, resumes a stream after the given event \
(see below).

A malformed `traceparent` is refused with 400, and an `X-Correlation-Id` or \
`Idempotency-Key` over 256 bytes with 431 (reason `INVALID_HEADER`), before \
anything reaches an agent. Other headers are ignored.

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

/// The finished document as JSON: the generated one with what utoipa's annotations cannot
/// say precisely — exact request bodies, header formats, name patterns, event schemas and
/// the error answers every route shares — so that a request the document allows is one
/// the gateway accepts, and one it forbids is refused.
pub(super) fn to_json(document: &utoipa::openapi::OpenApi) -> Value {
    let mut document = serde_json::to_value(document).unwrap_or_default();
    if let Some(schemas) = document
        .pointer_mut("/components/schemas")
        .and_then(Value::as_object_mut)
    {
        for (name, schema) in request_schemas() {
            schemas.insert(name.to_owned(), schema);
        }
    }
    if let Some(components) = document
        .get_mut("components")
        .and_then(Value::as_object_mut)
    {
        components.insert("securitySchemes".into(), security_schemes());
    }
    if let Some(paths) = document.get_mut("paths").and_then(Value::as_object_mut) {
        for (path, item) in paths.iter_mut() {
            let Some(item) = item.as_object_mut() else {
                continue;
            };
            for (method, operation) in item.iter_mut() {
                refine_operation(path, method, operation);
            }
        }
    }
    document
}

const ERROR_BODY: &str = "#/components/schemas/ErrorBody";

/// A `$ref` to a component schema.
fn schema_ref(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

/// Agent, skill and queue names (`agentmesh_proto::names`).
const NAME_PATTERN: &str = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$";
/// A name, or empty for none.
const OPTIONAL_NAME_PATTERN: &str = "^([A-Za-z0-9_-][A-Za-z0-9._-]{0,127})?$";
/// A call's target: an agent name or `skill:<id>`.
const TARGET_PATTERN: &str = "^(skill:)?[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$";
/// A W3C traceparent (version 00, ids not all zero), or empty (treated as absent).
const TRACEPARENT_PATTERN: &str =
    "^(00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-fA-F]{2})?$";
/// `<streamId>:<sequence>`, or empty (treated as absent).
const LAST_EVENT_ID_PATTERN: &str = "^(.*\\S.*:[0-9]{1,19})?$";

/// The schema of each header the gateway reads, by its documented name.
fn header_schema(name: &str) -> Option<Value> {
    let id = json!({ "type": "string", "maxLength": agentmesh_proto::limits::MAX_ID_BYTES });
    Some(match name {
        "X-Correlation-Id" | "Idempotency-Key" => id,
        "X-Timeout-Ms" => json!({ "type": "integer", "minimum": 1, "maximum": u64::MAX }),
        "traceparent" => json!({ "type": "string", "pattern": TRACEPARENT_PATTERN }),
        "Last-Event-ID" => json!({ "type": "string", "pattern": LAST_EVENT_ID_PATTERN }),
        _ => return None,
    })
}

/// How a caller authenticates when the node has `auth.enabled = true`.
fn security_schemes() -> Value {
    json!({
        BEARER: {
            "type": "http",
            "scheme": "bearer",
            "description": "`Authorization: Bearer <token>`: an API token from the node's \
                configuration, or a JWT (HS256, RS256, EdDSA or ES256) with `sub` and `exp`. \
                Needed only when the node has `auth.enabled = true`.",
        },
        QUERY_TOKEN: {
            "type": "apiKey",
            "in": "query",
            "name": "access_token",
            "description": "The bearer token as a query parameter, on GET requests only \
                (EventSource and WebSocket cannot set headers). The node takes it out of the \
                URI before routing. Off with `auth.query_token = false`; query strings end up \
                in access logs, so prefer short-lived JWTs here.",
        },
    })
}

const BEARER: &str = "bearerAuth";
const QUERY_TOKEN: &str = "accessToken";

/// Routes served without credentials whatever the configuration.
const ALWAYS_OPEN: [&str; 2] = ["/healthz", "/readyz"];
/// Routes that filter what the caller may see (or check each item on its own) rather than
/// refuse it with 403.
const NEVER_FORBIDDEN: [(&str, &str); 5] = [
    ("get", "/v1/agents"),
    ("get", "/v1/agents/{name}"),
    ("get", "/v1/queues"),
    ("get", "/v1/streams/{id}/events"),
    ("post", "/v1/fanout"),
];

/// The security requirement of a route, and the answers authentication, the policy and the
/// rate limit can give on it.
fn secure_operation(path: &str, method: &str, operation: &mut Value) {
    if ALWAYS_OPEN.contains(&path) {
        operation["security"] = json!([]);
        return;
    }
    if path == "/openapi.json" {
        // Open by default (`auth.public_schema`); the empty requirement makes the token optional.
        operation["security"] = json!([{}, { BEARER: [] }, { QUERY_TOKEN: [] }]);
        return;
    }
    operation["security"] = if method == "get" {
        json!([{ BEARER: [] }, { QUERY_TOKEN: [] }])
    } else {
        json!([{ BEARER: [] }])
    };
    let Some(responses) = operation
        .get_mut("responses")
        .and_then(Value::as_object_mut)
    else {
        return;
    };
    let mut unauthenticated = error_response(
        "UNAUTHENTICATED: authentication is on and the token is missing, unknown, badly \
         signed, expired or for another issuer or audience",
    );
    unauthenticated["headers"] = json!({
        "WWW-Authenticate": {
            "description": "`Bearer realm=\"agentmesh\"`",
            "schema": { "type": "string" }
        }
    });
    responses.entry("401").or_insert(unauthenticated);
    if !NEVER_FORBIDDEN.contains(&(method, path)) {
        let denied = "PERMISSION_DENIED: no policy rule grants the caller this action on \
                      this resource (the message names both)";
        match responses.get_mut("403") {
            // A route's own 403 (converse: a foreign origin) gets the policy's added.
            Some(own) => {
                let description = own["description"].as_str().unwrap_or_default();
                own["description"] = json!(format!("{description}; or {denied}"));
            }
            None => {
                responses.insert("403".into(), error_response(denied));
            }
        }
    }
    let mut limited = error_response(
        "RESOURCE_EXHAUSTED: the caller is over its rate limit (reason `RATE_LIMITED`, with \
         Retry-After), or a limit of the mesh was reached",
    );
    limited["headers"] = json!({
        "Retry-After": {
            "description": "Seconds to wait before retrying; sent when the rate limit refused the call",
            "schema": { "type": "integer", "minimum": 1 }
        }
    });
    responses.entry("429").or_insert(limited);
}

/// An error response with the shared error body.
fn error_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": { "application/json": { "schema": { "$ref": ERROR_BODY } } }
    })
}

fn refine_operation(path: &str, method: &str, operation: &mut Value) {
    secure_operation(path, method, operation);
    let mut reads_call_headers = false;
    if let Some(parameters) = operation
        .get_mut("parameters")
        .and_then(Value::as_array_mut)
    {
        for parameter in parameters {
            let name = parameter["name"].as_str().unwrap_or_default().to_owned();
            match parameter["in"].as_str() {
                Some("header") => {
                    reads_call_headers |= name == "X-Timeout-Ms";
                    if let Some(schema) = header_schema(&name) {
                        parameter["schema"] = schema;
                    }
                }
                Some("query") if name == "pageSize" => {
                    parameter["schema"] =
                        json!({ "type": "integer", "minimum": 0, "maximum": u32::MAX });
                }
                Some("path") => {
                    let pattern = match (name.as_str(), path) {
                        ("queue", _) => Some(NAME_PATTERN),
                        ("name", p) if p.ends_with("/invoke") || p.ends_with("/stream") => {
                            Some(TARGET_PATTERN)
                        }
                        ("name", p) if p.ends_with("/converse") => Some(TARGET_PATTERN),
                        _ => None,
                    };
                    if let Some(pattern) = pattern {
                        parameter["schema"] = json!({ "type": "string", "pattern": pattern });
                    }
                }
                _ => {}
            }
        }
    }
    if path.ends_with("/converse") {
        // The WebSocket handshake (RFC 6455) as axum checks it; anything else is a 400.
        let handshake = [
            (
                "Connection",
                "Must list the `upgrade` token",
                json!({ "type": "string", "pattern": "^(.*,)?[ \\t]*[Uu][Pp][Gg][Rr][Aa][Dd][Ee][ \\t]*(,.*)?$" }),
            ),
            (
                "Upgrade",
                "`websocket`",
                json!({ "type": "string", "pattern": "^[Ww][Ee][Bb][Ss][Oo][Cc][Kk][Ee][Tt]$" }),
            ),
            (
                "Sec-WebSocket-Version",
                "`13`",
                json!({ "type": "string", "enum": ["13"] }),
            ),
            (
                "Sec-WebSocket-Key",
                "The client's handshake nonce",
                json!({ "type": "string" }),
            ),
        ];
        if let Some(parameters) = operation
            .get_mut("parameters")
            .and_then(Value::as_array_mut)
        {
            for (name, description, schema) in handshake {
                parameters.push(json!({
                    "name": name,
                    "in": "header",
                    "required": true,
                    "description": description,
                    "schema": schema,
                }));
            }
        }
    }
    let body = match (method, path) {
        ("post", "/v1/agents/{name}/invoke" | "/v1/agents/{name}/stream") => Some("EnvelopeIn"),
        ("post", "/v1/queues/{queue}/messages") => Some("SubmitBody"),
        ("post", p) if p.starts_with("/v1/queues/{queue}/dead-letters/") => {
            Some("DeadLetterSelection")
        }
        ("post", "/v1/fanout") => Some("FanOutRequestIn"),
        _ => None,
    };
    if let Some(body) = body {
        operation["requestBody"]["content"]["application/json"]["schema"] = schema_ref(body);
        operation["requestBody"]["required"] = json!(true);
    }
    let Some(responses) = operation
        .get_mut("responses")
        .and_then(Value::as_object_mut)
    else {
        return;
    };
    // Every event stream: the schema describes each event (OpenAPI 3.1 reading of SSE).
    for response in responses.values_mut() {
        if let Some(sse) = response.pointer_mut("/content/text~1event-stream") {
            let event = if path.starts_with("/v1/results/") {
                "ResultEvent"
            } else {
                "StreamEvent"
            };
            sse["schema"] = schema_ref(event);
        }
    }
    if reads_call_headers {
        for (status, description) in [
            (
                "400",
                "Invalid request: a header (X-Timeout-Ms, traceparent), parameter or body the gateway refuses",
            ),
            (
                "431",
                "A header over its limit (X-Correlation-Id or Idempotency-Key over 256 bytes)",
            ),
            (
                "503",
                "The node is not ready, or what the call needs is unavailable",
            ),
            ("504", "The call's deadline passed"),
        ] {
            responses
                .entry(status)
                .or_insert_with(|| error_response(description));
        }
    }
    if body.is_some() {
        responses
            .entry("413")
            .or_insert_with(|| error_response("Body over the gateway's limit"));
    }
}

/// A proto3 JSON field: `null` reads as the field's default, so it is allowed too.
fn nullable(mut schema: Value) -> Value {
    if let Some(ty) = schema.get("type").and_then(Value::as_str) {
        schema["type"] = json!([ty, "null"]);
    }
    schema
}

/// An object of proto fields, each of which may also be `null`.
fn proto_object(description: &str, required: &[&str], properties: Value) -> Value {
    let properties: serde_json::Map<String, Value> = properties
        .as_object()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|(name, schema)| {
            let schema = if required.contains(&name.as_str()) {
                schema
            } else {
                nullable(schema)
            };
            (name, schema)
        })
        .collect();
    json!({
        "type": "object",
        "description": description,
        "additionalProperties": false,
        "required": required,
        "properties": properties,
    })
}

/// An envelope with one payload at most: `json` (binary absent or null) or `binary` (json
/// absent or null), since both set is refused.
fn one_payload(envelope: Value) -> Value {
    // `binary: null` reads as absent, `json: null` as a null payload.
    let branch = |payload: &str| {
        let mut branch = envelope.clone();
        if payload == "json" {
            branch["properties"]["binary"] = json!({ "type": "null" });
        } else if let Some(properties) = branch["properties"].as_object_mut() {
            properties.remove("json");
        }
        if let Some(branch) = branch.as_object_mut() {
            branch.remove("description");
        }
        branch
    };
    json!({
        "type": "object",
        "description": envelope["description"],
        "anyOf": [branch("json"), branch("binary")],
    })
}

/// Request bodies, exactly: the fields of the proto message a caller may set, in the proto3
/// JSON mapping, with the gateway's limits.
fn request_schemas() -> Vec<(&'static str, Value)> {
    let id = json!({ "type": "string", "maxLength": agentmesh_proto::limits::MAX_ID_BYTES });
    // RFC 3339, within the years proto3 JSON timestamps cover (0001 and 9999 are left out
    // whole so that an offset cannot push a time outside them).
    let timestamp = json!({
        "type": "string",
        "format": "date-time",
        "pattern": "^(000[2-9]|00[1-9][0-9]|0[1-9][0-9]{2}|[1-8][0-9]{3}|9[0-8][0-9]{2}|99[0-8][0-9]|999[0-8])-"
    });
    let envelope = proto_object(
        "An `agentmesh.v1.Envelope` a caller sends, in the proto3 JSON mapping. One payload \
         at most: `json` (any JSON value) or `binary` (base64). The ids, key and source are at \
         most 256 bytes, `headers` at most 8 KiB in all. The node \
         fills `id`, `correlationId`, `createdAt` and the trace context when they are empty.",
        &[],
        json!({
            "id": { "type": "string" },
            "type": { "type": "string", "description": "The payload's type, e.g. `summarize.request`" },
            "typeVersion": { "type": "string" },
            "contentType": { "type": "string" },
            "schemaRef": { "type": "string" },
            "json": { "description": "A JSON payload (google.protobuf.Value)" },
            "binary": {
                "type": "string",
                "description": "A binary payload in base64, standard or URL-safe, padded or not",
                "pattern": "^(([A-Za-z0-9+/]{4})*([A-Za-z0-9+/]{2}={0,2}|[A-Za-z0-9+/]{3}=?)?|([A-Za-z0-9_-]{4})*([A-Za-z0-9_-]{2}={0,2}|[A-Za-z0-9_-]{3}=?)?)$"
            },
            "correlationId": id,
            "causationId": id,
            "idempotencyKey": id,
            "traceparent": { "type": "string", "pattern": TRACEPARENT_PATTERN },
            "source": id,
            "target": { "type": "string", "description": "Ignored on agent routes: the path names the target" },
            "replyTo": { "type": "string", "description": "On a queue: the queue for the consumer's reply" },
            "createdAt": timestamp,
            "deadline": timestamp,
            "headers": {
                "type": "object",
                "additionalProperties": { "type": "string" }
            }
        }),
    );
    // `replyTo` names the queue for a consumer's reply: checked on messages put on a queue.
    let mut queued = envelope.clone();
    queued["properties"]["replyTo"] =
        json!({ "type": ["string", "null"], "pattern": OPTIONAL_NAME_PATTERN });
    queued["description"] = json!(
        "An `agentmesh.v1.Envelope` put on a queue: as `EnvelopeIn`, and `replyTo`, if set, \
         is a queue name."
    );
    // In a batch each message is accepted or rejected on its own (its outcome says why), so
    // an item only has to be an Envelope in proto3 JSON: the limits apply per message.
    let mut item = envelope.clone();
    item["description"] = json!(
        "An `agentmesh.v1.Envelope` in a batch, in the proto3 JSON mapping. A message that \
         breaks a limit of `EnvelopeIn` (ids, traceparent, headers, `replyTo`) is rejected on \
         its own, with the reason in its outcome."
    );
    if let Some(properties) = item["properties"].as_object_mut() {
        for (name, schema) in properties.iter_mut() {
            if let Some(schema) = schema.as_object_mut() {
                schema.remove("maxLength");
                // Base64 and timestamps are part of the JSON form; the other patterns are limits.
                if !matches!(name.as_str(), "binary" | "createdAt" | "deadline") {
                    schema.remove("pattern");
                }
            }
        }
    }
    let batch = proto_object(
        "A batch of envelopes",
        &["messages"],
        json!({
            "messages": { "type": "array", "minItems": 1, "items": schema_ref("EnvelopeItem") }
        }),
    );
    let selection = |required: &str, chosen: Value| {
        let mut properties = json!({
            "all": { "type": "boolean" },
            "messageIds": { "type": "array", "items": { "type": "string" } }
        });
        properties[required] = chosen;
        proto_object(
            "Which dead letters: `{\"all\":true}` or `{\"messageIds\":[...]}`",
            &[required],
            properties,
        )
    };
    let policies = [
        "FAN_OUT_POLICY_UNSPECIFIED",
        "FAN_OUT_POLICY_ALL",
        "FAN_OUT_POLICY_QUORUM",
        "FAN_OUT_POLICY_FIRST",
    ];
    let fan_out = |required: &str, chosen: Value| {
        let mut properties = json!({
            "envelope": schema_ref("EnvelopeIn"),
            "targets": { "type": "array", "maxItems": 256, "items": { "type": "string" } },
            "skill": { "type": "string", "pattern": OPTIONAL_NAME_PATTERN },
            "policy": {
                "description": "How many answers complete the fan-out (the enum's name, or its number; unknown numbers read as ALL)",
                "anyOf": [
                    { "type": "string", "enum": policies },
                    { "type": "integer", "minimum": i32::MIN, "maximum": i32::MAX },
                    { "type": "null" }
                ]
            },
            "count": { "type": "integer", "minimum": 0, "maximum": u32::MAX }
        });
        properties[required] = chosen;
        proto_object(
            "An `agentmesh.v1.FanOutRequest`: the envelope, and targets or a skill (at most \
             256 destinations in all). With QUORUM or FIRST, `count` is from 1 up to the \
             number of destinations.",
            &["envelope", required],
            properties,
        )
    };
    let stream_event = json!({
        "type": "object",
        "description": "One Server-Sent Event of a stream: `id: <streamId>:<sequence>`, its kind as \
            `event`, and as `data` a `StreamResponse` in proto3 JSON — or, for `event: error` \
            without an id, the error JSON `{\"error\":{...}}` of a gRPC error that ended the stream.",
        "required": ["event", "data"],
        "properties": {
            "event": { "type": "string", "enum": ["progress", "partial", "result", "error"] },
            "id": { "type": "string" },
            "data": { "type": "string", "contentMediaType": "application/json" }
        }
    });
    let result_event = json!({
        "type": "object",
        "description": "The Server-Sent Event that ends a result wait: `event: result` with \
            `id: <correlationId>` and an `AwaitResultResponse` as `data`, or `event: error` with \
            the error JSON `{\"error\":{...}}` (e.g. DEADLINE_EXCEEDED when the call's deadline passed first).",
        "required": ["event", "data"],
        "properties": {
            "event": { "type": "string", "enum": ["result", "error"] },
            "id": { "type": "string" },
            "data": { "type": "string", "contentMediaType": "application/json" }
        }
    });
    vec![
        ("QueueEnvelope", one_payload(queued)),
        ("EnvelopeIn", one_payload(envelope)),
        ("EnvelopeItem", one_payload(item)),
        (
            "SubmitBody",
            json!({ "type": "object", "oneOf": [schema_ref("QueueEnvelope"), batch] }),
        ),
        (
            "DeadLetterSelection",
            json!({ "type": "object", "anyOf": [
                selection("all", json!({ "const": true })),
                selection("messageIds", json!({ "type": "array", "minItems": 1, "items": { "type": "string" } })),
            ]}),
        ),
        (
            "FanOutRequestIn",
            json!({ "type": "object", "anyOf": [
                fan_out("targets", json!({ "type": "array", "minItems": 1, "maxItems": 256, "items": { "type": "string" } })),
                fan_out("skill", json!({ "type": "string", "pattern": NAME_PATTERN })),
            ]}),
        ),
        ("StreamEvent", stream_event),
        ("ResultEvent", result_event),
    ]
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    #[test]
    fn every_call_route_documents_the_errors_it_can_give() {
        let document = super::super::openapi_document();
        let paths = document["paths"].as_object().unwrap();
        let mut call_routes = 0;
        for (path, item) in paths {
            for (method, operation) in item.as_object().unwrap() {
                let parameters = operation["parameters"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                let timeout = parameters.iter().find(|p| p["name"] == "X-Timeout-Ms");
                let Some(timeout) = timeout else { continue };
                call_routes += 1;
                assert_eq!(timeout["schema"]["type"], "integer", "{method} {path}");
                assert_eq!(timeout["schema"]["minimum"], 1, "{method} {path}");
                let mut statuses = vec!["400", "401", "429", "431", "503", "504"];
                if !super::NEVER_FORBIDDEN.contains(&(method.as_str(), path.as_str())) {
                    statuses.push("403");
                }
                let security = operation["security"].as_array().unwrap();
                assert!(
                    security.contains(&serde_json::json!({ "bearerAuth": [] })),
                    "{method} {path} needs a bearer token"
                );
                assert_eq!(
                    security.contains(&serde_json::json!({ "accessToken": [] })),
                    method == "get",
                    "{method} {path}: access_token on GETs only"
                );
                assert!(
                    operation["responses"]["429"]["headers"]["Retry-After"].is_object(),
                    "{method} {path}: 429 says Retry-After"
                );
                assert!(
                    operation["responses"]["401"]["headers"]["WWW-Authenticate"].is_object(),
                    "{method} {path}: 401 says WWW-Authenticate"
                );
                for status in statuses {
                    let response = &operation["responses"][status];
                    assert_eq!(
                        response["content"]["application/json"]["schema"]["$ref"],
                        "#/components/schemas/ErrorBody",
                        "{method} {path} documents {status}"
                    );
                }
                for response in operation["responses"].as_object().unwrap().values() {
                    if let Some(sse) = response.pointer("/content/text~1event-stream") {
                        let event = sse["schema"]["$ref"].as_str().unwrap();
                        assert!(event.ends_with("Event"), "{method} {path}: {event}");
                    }
                }
            }
        }
        assert!(call_routes >= 14, "{call_routes} call routes");
        for path in super::ALWAYS_OPEN {
            assert_eq!(
                paths[path]["get"]["security"],
                serde_json::json!([]),
                "{path}"
            );
        }
        let schema = paths["/openapi.json"]["get"]["security"]
            .as_array()
            .unwrap();
        assert!(
            schema.contains(&serde_json::json!({})),
            "/openapi.json is open by default"
        );
        let schemes = &document["components"]["securitySchemes"];
        assert_eq!(schemes["bearerAuth"]["scheme"], "bearer");
        assert_eq!(schemes["accessToken"]["in"], "query");
        assert_eq!(schemes["accessToken"]["name"], "access_token");
        let schemas = &document["components"]["schemas"];
        let result_events: Vec<&Value> = schemas["ResultEvent"]["properties"]["event"]["enum"]
            .as_array()
            .unwrap()
            .iter()
            .collect();
        assert!(
            result_events.contains(&&Value::from("error")),
            "event: error"
        );
        assert_eq!(
            schemas["EnvelopeIn"]["anyOf"][0]["additionalProperties"], false,
            "request envelopes name their fields"
        );
    }
}
