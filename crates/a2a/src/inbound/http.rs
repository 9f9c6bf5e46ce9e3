//! The A2A bindings on HTTP: JSON-RPC 2.0 at `POST /a2a/{agent}`, HTTP+JSON under it
//! (`/message:send`, `/message:stream`, `/tasks`, `/tasks/{id}`, `/tasks/{id}:cancel`,
//! `/tasks/{id}:subscribe`), and the agent card at `/.well-known/agent-card.json`.
//!
//! JSON-RPC errors are answered with HTTP 200 and the spec's error object (clients read
//! the body); HTTP+JSON errors with the spec's HTTP status and a `google.rpc.Status`-shaped
//! body whose `ErrorInfo` detail names the A2A reason.

use std::{collections::HashMap, convert::Infallible, sync::Arc};

use agentmesh_proto::{
    CallContext, DeadlinePolicy,
    v1::{InteractionStyle, LookupRequest},
};
use axum::{
    Json, Router,
    body::Bytes,
    extract::{FromRequestParts, Path, Query, State},
    http::{HeaderMap, StatusCode, request::Parts},
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
    routing::{get, post},
};
use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

use super::service::{A2aError, A2aInbound, EventPoint, TaskEvents, parse_event_id};
use crate::types::*;

/// The routes of every agent's A2A face.
pub fn router(inbound: Arc<A2aInbound>) -> Router {
    Router::new()
        .route("/a2a/{agent}/.well-known/agent-card.json", get(card))
        .route("/a2a/{agent}", post(jsonrpc))
        .route("/a2a/{agent}/{action}", post(rest_post).get(rest_get))
        .route("/a2a/{agent}/tasks/{task}", get(task_get).post(task_post))
        .route(
            "/a2a/{agent}/tasks/{task}/pushNotificationConfigs",
            post(push_create).get(push_list),
        )
        .route(
            "/a2a/{agent}/tasks/{task}/pushNotificationConfigs/{config}",
            get(push_get).delete(push_delete),
        )
        .with_state(inbound)
}

/// The call's context, built by the node's edge layer (or here, from the headers).
struct Ctx(CallContext, HeaderMap);

impl<S: Send + Sync> FromRequestParts<S> for Ctx {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let ctx = parts
            .extensions
            .get::<CallContext>()
            .cloned()
            .unwrap_or_else(|| {
                CallContext::from_headers(&parts.headers, &DeadlinePolicy::default())
            });
        Ok(Self(ctx, parts.headers.clone()))
    }
}

impl Ctx {
    fn header(&self, name: &str) -> Option<&str> {
        self.1
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
    }

    /// Refuses a protocol version other than 1.x (`A2A-Version`).
    fn check_version(&self) -> Result<(), A2aError> {
        match self.header(VERSION_HEADER) {
            None => Ok(()),
            Some(v) if v == "1" || v.starts_with("1.") => Ok(()),
            Some(v) => Err(A2aError::new(
                A2aErrorKind::VersionNotSupported,
                format!("A2A version {v} is not supported; this agent speaks {PROTOCOL_VERSION}"),
            )),
        }
    }

    /// Where a stream resumes (`Last-Event-ID`), checked against the task it names.
    fn resume_point(&self) -> Result<Option<(String, EventPoint)>, A2aError> {
        match self.header("last-event-id") {
            None => Ok(None),
            Some(id) => parse_event_id(id).map(Some).ok_or_else(|| {
                A2aError::params(format!(
                    "Last-Event-ID {id:?} is not an id of this agent's events (<taskId>:<sequence>:<index>)"
                ))
            }),
        }
    }

    /// The agent's base URL as the client reached it.
    fn base_url(&self, agent: &str) -> String {
        let host = self
            .header("x-forwarded-host")
            .or_else(|| self.header("host"))
            .unwrap_or("127.0.0.1:7700");
        let scheme = self.header("x-forwarded-proto").unwrap_or("http");
        format!("{scheme}://{host}/a2a/{agent}")
    }
}

async fn card(State(a2a): State<Arc<A2aInbound>>, Path(agent): Path<String>, ctx: Ctx) -> Response {
    let instances = a2a
        .mesh
        .lookup(
            ctx.0.clone(),
            LookupRequest {
                filter: Some(agentmesh_proto::v1::AgentFilter {
                    name: agent.clone(),
                    ..Default::default()
                }),
            },
        )
        .await
        .map(|r| r.instances)
        .unwrap_or_default();
    let cards: Vec<_> = instances.into_iter().filter_map(|i| i.card).collect();
    let Some(first) = cards.first() else {
        return rest_error(&A2aError::new(
            A2aErrorKind::MethodNotFound,
            format!("no agent {agent:?} is registered on this mesh"),
        ));
    };
    let streaming = cards
        .iter()
        .any(|c| c.styles.contains(&(InteractionStyle::Stream as i32)));
    let base = ctx.base_url(&agent);
    let modes = vec!["application/json".to_owned(), "text/plain".to_owned()];
    let card = AgentCard {
        name: first.name.clone(),
        description: first.description.clone(),
        supported_interfaces: [BINDING_JSONRPC, BINDING_HTTP_JSON]
            .into_iter()
            .map(|binding| AgentInterface {
                url: base.clone(),
                protocol_binding: binding.to_owned(),
                tenant: None,
                protocol_version: PROTOCOL_VERSION.to_owned(),
            })
            .collect(),
        provider: None,
        version: first.version.clone(),
        documentation_url: None,
        capabilities: AgentCapabilities {
            streaming: Some(streaming),
            push_notifications: Some(true),
            extensions: Vec::new(),
            extended_agent_card: Some(false),
        },
        default_input_modes: modes.clone(),
        default_output_modes: modes,
        skills: first
            .skills
            .iter()
            .map(|s| AgentSkill {
                id: s.id.clone(),
                name: s.id.clone(),
                description: s.description.clone(),
                tags: s.tags.clone(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    Json(card).into_response()
}

// ---- JSON-RPC 2.0 ----

fn rpc(response: JsonRpcResponse) -> Response {
    Json(response).into_response()
}

fn rpc_error(id: Value, error: &A2aError) -> Response {
    rpc(JsonRpcResponse::error(id, json_rpc_error(error)))
}

fn json_rpc_error(error: &A2aError) -> JsonRpcError {
    let mut e = JsonRpcError::new(error.kind, error.message.clone());
    e.data = Some(json!([{
        "@type": ERROR_INFO_TYPE,
        "reason": error.kind.reason(),
        "domain": ERROR_INFO_DOMAIN,
    }]));
    e
}

fn parse<T: DeserializeOwned>(params: Value) -> Result<T, A2aError> {
    serde_path_to_error::deserialize(params).map_err(|e| {
        let path = e.path().to_string();
        A2aError::params(format!("invalid params at {path}: {}", e.into_inner()))
    })
}

async fn jsonrpc(
    State(a2a): State<Arc<A2aInbound>>,
    Path(agent): Path<String>,
    ctx: Ctx,
    body: Bytes,
) -> Response {
    let value: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return rpc_error(
                Value::Null,
                &A2aError::new(
                    A2aErrorKind::ParseError,
                    format!("the body is not JSON: {e}"),
                ),
            );
        }
    };
    let id = value.get("id").cloned().unwrap_or(Value::Null);
    let request: JsonRpcRequest = match serde_json::from_value(value) {
        Ok(r) => r,
        Err(e) => {
            return rpc_error(
                id,
                &A2aError::new(
                    A2aErrorKind::InvalidRequest,
                    format!("not a JSON-RPC 2.0 request: {e}"),
                ),
            );
        }
    };
    if request.jsonrpc != JSONRPC_VERSION {
        return rpc_error(
            id,
            &A2aError::new(A2aErrorKind::InvalidRequest, "jsonrpc must be \"2.0\""),
        );
    }
    if !matches!(id, Value::Null | Value::String(_) | Value::Number(_)) {
        return rpc_error(
            Value::Null,
            &A2aError::new(
                A2aErrorKind::InvalidRequest,
                "id must be a string, a number or null",
            ),
        );
    }
    if let Err(e) = ctx.check_version() {
        return rpc_error(id, &e);
    }
    let params = request.params.unwrap_or_else(|| json!({}));
    let task_method = matches!(
        request.method.as_str(),
        methods::GET_TASK
            | methods::LIST_TASKS
            | methods::CANCEL_TASK
            | methods::CREATE_TASK_PUSH_NOTIFICATION_CONFIG
            | methods::GET_TASK_PUSH_NOTIFICATION_CONFIG
            | methods::LIST_TASK_PUSH_NOTIFICATION_CONFIGS
            | methods::DELETE_TASK_PUSH_NOTIFICATION_CONFIG
    );
    if task_method && let Err(e) = a2a.authorize(&ctx.0, &agent) {
        return rpc_error(id, &e);
    }
    let outcome: Result<Value, A2aError> = match request.method.as_str() {
        methods::SEND_MESSAGE => match parse(params) {
            Ok(p) => a2a.send(&agent, ctx.0.clone(), p).await.map(to_value),
            Err(e) => Err(e),
        },
        methods::SEND_STREAMING_MESSAGE | methods::SUBSCRIBE_TO_TASK => {
            let events = match stream_op(&a2a, &agent, &ctx, &request.method, params, None).await {
                Ok(events) => events,
                Err(e) => return rpc_error(id, &e),
            };
            return sse(events, move |event| match event {
                Ok(e) => (
                    Some(e.id),
                    None,
                    to_value(JsonRpcResponse::result(id.clone(), e.response)),
                ),
                Err(e) => (
                    None,
                    None,
                    to_value(JsonRpcResponse::error(id.clone(), json_rpc_error(&e))),
                ),
            });
        }
        methods::GET_TASK => match parse(params) {
            Ok(p) => a2a.get_task(&agent, p).await.map(to_value),
            Err(e) => Err(e),
        },
        methods::LIST_TASKS => match parse(params) {
            Ok(p) => a2a.list_tasks(&agent, p).await.map(to_value),
            Err(e) => Err(e),
        },
        methods::CANCEL_TASK => match parse(params) {
            Ok(p) => a2a.cancel_task(&agent, p).await.map(to_value),
            Err(e) => Err(e),
        },
        methods::CREATE_TASK_PUSH_NOTIFICATION_CONFIG => match parse(params) {
            Ok(p) => a2a.create_push_config(&agent, p).await.map(to_value),
            Err(e) => Err(e),
        },
        methods::GET_TASK_PUSH_NOTIFICATION_CONFIG => match parse(params) {
            Ok(p) => a2a.get_push_config(&agent, p).await.map(to_value),
            Err(e) => Err(e),
        },
        methods::LIST_TASK_PUSH_NOTIFICATION_CONFIGS => match parse(params) {
            Ok(p) => a2a.list_push_configs(&agent, p).await.map(to_value),
            Err(e) => Err(e),
        },
        methods::DELETE_TASK_PUSH_NOTIFICATION_CONFIG => match parse(params) {
            Ok(p) => a2a.delete_push_config(&agent, p).await.map(|()| json!({})),
            Err(e) => Err(e),
        },
        methods::GET_EXTENDED_AGENT_CARD => Err(no_extended_card()),
        other => Err(A2aError::new(
            A2aErrorKind::MethodNotFound,
            format!(
                "no method {other:?}; the A2A 1.0 methods are SendMessage, SendStreamingMessage, GetTask, ListTasks, CancelTask, SubscribeToTask, the push notification config methods and GetExtendedAgentCard"
            ),
        )),
    };
    match outcome {
        Ok(result) => rpc(JsonRpcResponse::result(id, result)),
        Err(e) => rpc_error(id, &e),
    }
}

fn no_extended_card() -> A2aError {
    A2aError::new(
        A2aErrorKind::ExtendedAgentCardNotConfigured,
        "this agent has no extended card",
    )
}

fn to_value(v: impl serde::Serialize) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// Opens the events of a streaming send or a subscribe (`Last-Event-ID` resumes either).
async fn stream_op(
    a2a: &Arc<A2aInbound>,
    agent: &str,
    ctx: &Ctx,
    method: &str,
    params: Value,
    task: Option<String>,
) -> Result<TaskEvents, A2aError> {
    if let Some((task_id, point)) = ctx.resume_point()? {
        if let Some(named) = &task {
            if *named != task_id {
                return Err(A2aError::params(format!(
                    "Last-Event-ID names task {task_id}, not {named}"
                )));
            }
        }
        a2a.authorize(&ctx.0, agent)?;
        return a2a
            .subscribe(agent, ctx.0.clone(), &task_id, Some(point))
            .await;
    }
    if method == methods::SEND_STREAMING_MESSAGE {
        a2a.send_streaming(agent, ctx.0.clone(), parse(params)?)
            .await
    } else {
        a2a.authorize(&ctx.0, agent)?;
        let mut request: SubscribeToTaskRequest = parse(params)?;
        if let Some(task) = task {
            request.id = task;
        }
        a2a.subscribe(agent, ctx.0.clone(), &request.id, None).await
    }
}

type Frame = (Option<String>, Option<&'static str>, Value);

/// Server-Sent Events: each item as `id`, `event` and JSON `data`.
fn sse(
    events: TaskEvents,
    frame: impl FnMut(Result<super::service::TaskEvent, A2aError>) -> Frame + Send + 'static,
) -> Response {
    let stream = events.map(frame).map(|(id, name, data)| {
        let mut event = Event::default().data(data.to_string());
        if let Some(id) = id {
            event = event.id(id);
        }
        if let Some(name) = name {
            event = event.event(name);
        }
        Ok::<_, Infallible>(event)
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

// ---- HTTP+JSON ----

fn rest_error(error: &A2aError) -> Response {
    let status = StatusCode::from_u16(error.kind.http_status()).unwrap_or(StatusCode::BAD_REQUEST);
    (status, Json(rest_error_body(error))).into_response()
}

fn rest_error_body(error: &A2aError) -> Value {
    json!({
        "error": {
            "code": error.kind.http_status(),
            "status": error.kind.grpc_status(),
            "message": error.message,
            "details": [{
                "@type": ERROR_INFO_TYPE,
                "reason": error.kind.reason(),
                "domain": ERROR_INFO_DOMAIN,
            }],
        }
    })
}

fn rest(outcome: Result<Value, A2aError>) -> Response {
    match outcome {
        Ok(v) => Json(v).into_response(),
        Err(e) => rest_error(&e),
    }
}

fn rest_sse(events: TaskEvents) -> Response {
    sse(events, |event| match event {
        Ok(e) => (Some(e.id), None, to_value(e.response)),
        Err(e) => (None, Some("error"), rest_error_body(&e)),
    })
}

fn body_json(body: &Bytes) -> Result<Value, A2aError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    serde_json::from_slice(body).map_err(|e| {
        A2aError::new(
            A2aErrorKind::ParseError,
            format!("the body is not JSON: {e}"),
        )
    })
}

/// Query parameters as the JSON of a request (numbers and booleans typed).
fn query_json(query: HashMap<String, String>) -> Value {
    let mut map = Map::new();
    for (k, v) in query {
        let typed = match k.as_str() {
            "pageSize" | "historyLength" => v
                .parse::<i64>()
                .map(Value::from)
                .unwrap_or(Value::String(v)),
            "includeArtifacts" => match v.as_str() {
                "true" | "1" => Value::Bool(true),
                "false" | "0" => Value::Bool(false),
                _ => Value::String(v),
            },
            _ => Value::String(v),
        };
        map.insert(k, typed);
    }
    Value::Object(map)
}

async fn rest_post(
    State(a2a): State<Arc<A2aInbound>>,
    Path((agent, action)): Path<(String, String)>,
    ctx: Ctx,
    body: Bytes,
) -> Response {
    if let Err(e) = ctx.check_version() {
        return rest_error(&e);
    }
    let params = match body_json(&body) {
        Ok(p) => p,
        Err(e) => return rest_error(&e),
    };
    match action.as_str() {
        "message:send" => rest(match parse(params) {
            Ok(p) => a2a.send(&agent, ctx.0.clone(), p).await.map(to_value),
            Err(e) => Err(e),
        }),
        "message:stream" => {
            match stream_op(
                &a2a,
                &agent,
                &ctx,
                methods::SEND_STREAMING_MESSAGE,
                params,
                None,
            )
            .await
            {
                Ok(events) => rest_sse(events),
                Err(e) => rest_error(&e),
            }
        }
        _ => rest_error(&unknown_route(&action)),
    }
}

async fn rest_get(
    State(a2a): State<Arc<A2aInbound>>,
    Path((agent, action)): Path<(String, String)>,
    ctx: Ctx,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if let Err(e) = ctx.check_version() {
        return rest_error(&e);
    }
    match action.as_str() {
        "tasks" => rest(
            match a2a.authorize(&ctx.0, &agent).and(parse(query_json(query))) {
                Ok(p) => a2a.list_tasks(&agent, p).await.map(to_value),
                Err(e) => Err(e),
            },
        ),
        "extendedAgentCard" => rest_error(&no_extended_card()),
        _ => rest_error(&unknown_route(&action)),
    }
}

fn unknown_route(action: &str) -> A2aError {
    A2aError::new(
        A2aErrorKind::MethodNotFound,
        format!("no A2A operation at {action:?}"),
    )
}

/// `GET /tasks/{id}` and `GET /tasks/{id}:subscribe`.
async fn task_get(
    State(a2a): State<Arc<A2aInbound>>,
    Path((agent, task)): Path<(String, String)>,
    ctx: Ctx,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if let Err(e) = ctx.check_version() {
        return rest_error(&e);
    }
    if let Some(id) = task.strip_suffix(":subscribe") {
        return subscribe(&a2a, &agent, &ctx, id).await;
    }
    if let Err(e) = a2a.authorize(&ctx.0, &agent) {
        return rest_error(&e);
    }
    let mut params = query_json(query);
    params["id"] = Value::String(task);
    rest(match parse(params) {
        Ok(p) => a2a.get_task(&agent, p).await.map(to_value),
        Err(e) => Err(e),
    })
}

async fn subscribe(a2a: &Arc<A2aInbound>, agent: &str, ctx: &Ctx, id: &str) -> Response {
    match stream_op(
        a2a,
        agent,
        ctx,
        methods::SUBSCRIBE_TO_TASK,
        json!({}),
        Some(id.to_owned()),
    )
    .await
    {
        Ok(events) => rest_sse(events),
        Err(e) => rest_error(&e),
    }
}

/// `POST /tasks/{id}:cancel` and `POST /tasks/{id}:subscribe`.
async fn task_post(
    State(a2a): State<Arc<A2aInbound>>,
    Path((agent, task)): Path<(String, String)>,
    ctx: Ctx,
    body: Bytes,
) -> Response {
    if let Err(e) = ctx.check_version() {
        return rest_error(&e);
    }
    if let Some(id) = task.strip_suffix(":subscribe") {
        return subscribe(&a2a, &agent, &ctx, id).await;
    }
    let Some(id) = task.strip_suffix(":cancel") else {
        return rest_error(&unknown_route(&task));
    };
    if let Err(e) = a2a.authorize(&ctx.0, &agent) {
        return rest_error(&e);
    }
    let mut params = match body_json(&body) {
        Ok(p) => p,
        Err(e) => return rest_error(&e),
    };
    if !params.is_object() {
        return rest_error(&A2aError::params("the body must be a JSON object"));
    }
    params["id"] = Value::String(id.to_owned());
    rest(match parse(params) {
        Ok(p) => a2a.cancel_task(&agent, p).await.map(to_value),
        Err(e) => Err(e),
    })
}

/// `POST /tasks/{id}/pushNotificationConfigs`.
async fn push_create(
    State(a2a): State<Arc<A2aInbound>>,
    Path((agent, task)): Path<(String, String)>,
    ctx: Ctx,
    body: Bytes,
) -> Response {
    if let Err(e) = a2a.authorize(&ctx.0, &agent) {
        return rest_error(&e);
    }
    let mut params = match body_json(&body) {
        Ok(p) if p.is_object() => p,
        Ok(_) => return rest_error(&A2aError::params("the body must be a JSON object")),
        Err(e) => return rest_error(&e),
    };
    params["taskId"] = Value::String(task);
    rest(match parse(params) {
        Ok(p) => a2a.create_push_config(&agent, p).await.map(to_value),
        Err(e) => Err(e),
    })
}

/// `GET /tasks/{id}/pushNotificationConfigs`.
async fn push_list(
    State(a2a): State<Arc<A2aInbound>>,
    Path((agent, task)): Path<(String, String)>,
    ctx: Ctx,
) -> Response {
    if let Err(e) = a2a.authorize(&ctx.0, &agent) {
        return rest_error(&e);
    }
    rest(
        a2a.list_push_configs(
            &agent,
            ListTaskPushNotificationConfigsRequest {
                task_id: task,
                ..Default::default()
            },
        )
        .await
        .map(to_value),
    )
}

/// `GET /tasks/{id}/pushNotificationConfigs/{configId}`.
async fn push_get(
    State(a2a): State<Arc<A2aInbound>>,
    Path((agent, task, config)): Path<(String, String, String)>,
    ctx: Ctx,
) -> Response {
    if let Err(e) = a2a.authorize(&ctx.0, &agent) {
        return rest_error(&e);
    }
    let request = GetTaskPushNotificationConfigRequest {
        tenant: None,
        task_id: task,
        id: config,
    };
    rest(a2a.get_push_config(&agent, request).await.map(to_value))
}

/// `DELETE /tasks/{id}/pushNotificationConfigs/{configId}`.
async fn push_delete(
    State(a2a): State<Arc<A2aInbound>>,
    Path((agent, task, config)): Path<(String, String, String)>,
    ctx: Ctx,
) -> Response {
    if let Err(e) = a2a.authorize(&ctx.0, &agent) {
        return rest_error(&e);
    }
    let request = GetTaskPushNotificationConfigRequest {
        tenant: None,
        task_id: task,
        id: config,
    };
    rest(
        a2a.delete_push_config(&agent, request)
            .await
            .map(|()| json!({})),
    )
}
