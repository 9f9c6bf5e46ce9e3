//! Agents: discovery (`DiscoveryService.Lookup`) and request/response calls
//! (`AgentService.Invoke`).

use std::sync::Arc;

use agentmesh_proto::v1::{
    AddA2aAgentRequest, AgentFilter, AgentInstance, Envelope, InvokeRequest, LookupRequest,
};
use axum::{
    extract::{Path, Query, State},
    http::StatusCode,
    response::Response,
};
use serde::Deserialize;
use tonic::Code;
use utoipa::IntoParams;

use super::{
    Gateway,
    openapi::{self, CallHeaders, ErrorBody},
};
use crate::{call::Call, error::ApiError, json};

/// Filters of `GET /v1/agents`; absent ones match everything.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct AgentQuery {
    /// Agent name.
    name: Option<String>,
    /// Skill id.
    skill: Option<String>,
    /// A tag of any skill.
    tag: Option<String>,
    /// An accepted payload type.
    accepts_type: Option<String>,
    /// With `accepts_type`: a version of it that must be accepted.
    accepts_version: Option<String>,
}

impl From<AgentQuery> for AgentFilter {
    fn from(query: AgentQuery) -> Self {
        AgentFilter {
            name: query.name.unwrap_or_default(),
            skill: query.skill.unwrap_or_default(),
            tag: query.tag.unwrap_or_default(),
            accepts_type: query.accepts_type.unwrap_or_default(),
            accepts_version: query.accepts_version.unwrap_or_default(),
        }
    }
}

/// Lists registered agent instances.
#[utoipa::path(
    get,
    path = "/v1/agents",
    tag = "agents",
    params(AgentQuery, CallHeaders),
    responses(
        (status = 200, description = "Matching instances", body = openapi::AgentList),
        (status = 400, description = "Unknown query parameter", body = ErrorBody),
    )
)]
pub(crate) async fn list(
    State(gateway): State<Arc<Gateway>>,
    call: Call,
    query: Result<Query<AgentQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|rejection| {
        ApiError::invalid_argument(
            "INVALID_QUERY",
            format!(
                "invalid query: {}; known parameters are name, skill, tag, accepts_type and accepts_version",
                rejection.body_text()
            ),
        )
    })?;
    let instances = lookup(&gateway, &call, query.into()).await?;
    agent_list(&instances)
}

/// The instances of one agent.
#[utoipa::path(
    get,
    path = "/v1/agents/{name}",
    tag = "agents",
    params(("name" = String, Path, description = "Agent name"), CallHeaders),
    responses(
        (status = 200, description = "The agent's instances", body = openapi::AgentList),
        (status = 404, description = "No instance of that agent is registered", body = ErrorBody),
    )
)]
pub(crate) async fn get(
    State(gateway): State<Arc<Gateway>>,
    Path(name): Path<String>,
    call: Call,
) -> Result<Response, ApiError> {
    let filter = AgentFilter {
        name: name.clone(),
        ..Default::default()
    };
    let instances = lookup(&gateway, &call, filter).await?;
    if instances.is_empty() {
        return Err(agent_not_found(&name));
    }
    agent_list(&instances)
}

/// Calls an agent: the body is the request `Envelope` (its target is the
/// path's agent), the answer the reply `Envelope`.
#[utoipa::path(
    post,
    path = "/v1/agents/{name}/invoke",
    tag = "agents",
    params(("name" = String, Path, description = "Agent name or `skill:<id>`"), CallHeaders),
    request_body(content = openapi::Envelope, description = "The request envelope, e.g. `{\"json\":{\"text\":\"hi\"}}`", content_type = "application/json"),
    responses(
        (status = 200, description = "The agent's reply", body = openapi::Envelope),
        (status = 400, description = "Invalid JSON, or no instance accepts the payload's version", body = ErrorBody),
        (status = 404, description = "No agent registered for the target", body = ErrorBody),
        (status = 413, description = "Body over the gateway's limit", body = ErrorBody),
        (status = 503, description = "The agent is unreachable", body = ErrorBody),
        (status = 504, description = "The deadline passed", body = ErrorBody),
    )
)]
pub(crate) async fn invoke(
    State(gateway): State<Arc<Gateway>>,
    Path(name): Path<String>,
    call: Call,
    body: json::Body,
) -> Result<Response, ApiError> {
    let mut envelope: Envelope = body.parse()?;
    envelope.target = name;
    call.stamp(&mut envelope);
    let reply = gateway
        .mesh
        .invoke(
            call.ctx(),
            InvokeRequest {
                envelope: Some(envelope),
            },
        )
        .await?;
    json::ok(&reply.envelope.unwrap_or_default())
}

/// Adds an external A2A agent by the URL of its agent card (or its base URL): the node
/// fetches the card, lists the agent with its skills, keeps the card fresh, and routes
/// calls to it over A2A. The answer is the agent as the mesh lists it.
#[utoipa::path(
    post,
    path = "/v1/a2a-agents",
    tag = "agents",
    params(CallHeaders),
    request_body(content = openapi::AddA2aAgentRequest, description = "e.g. `{\"url\":\"http://127.0.0.1:9999\",\"name\":\"echo\"}`", content_type = "application/json"),
    responses(
        (status = 200, description = "The agent is listed", body = openapi::AddA2aAgentResponse),
        (status = 400, description = "Not an http(s) URL, a bad name, or a card the node cannot use", body = ErrorBody),
        (status = 503, description = "The card could not be fetched", body = ErrorBody),
        (status = 504, description = "Fetching the card took too long", body = ErrorBody),
    )
)]
pub(crate) async fn add_a2a(
    State(gateway): State<Arc<Gateway>>,
    call: Call,
    body: json::Body,
) -> Result<Response, ApiError> {
    let request: AddA2aAgentRequest = body.parse()?;
    json::ok(&gateway.mesh.add_a2a_agent(call.ctx(), request).await?)
}

async fn lookup(
    gateway: &Gateway,
    call: &Call,
    filter: AgentFilter,
) -> Result<Vec<AgentInstance>, ApiError> {
    Ok(gateway
        .mesh
        .lookup(
            call.ctx(),
            LookupRequest {
                filter: Some(filter),
            },
        )
        .await?
        .instances)
}

/// `{"agents":[...]}`, each instance in proto3 JSON.
fn agent_list(instances: &[AgentInstance]) -> Result<Response, ApiError> {
    let mut body = Vec::with_capacity(512 * instances.len() + 16);
    body.extend_from_slice(br#"{"agents":["#);
    for (i, instance) in instances.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        json::write_json(instance, &mut body)?;
    }
    body.extend_from_slice(b"]}");
    Ok(json::response(StatusCode::OK, body))
}

/// NOT_FOUND for an agent name, shaped like the node's own.
pub(crate) fn agent_not_found(name: &str) -> ApiError {
    ApiError::new(
        Code::NotFound,
        format!("no agent registered for target '{name}'"),
    )
    .with_reason("AGENT_NOT_FOUND", [("target", name.to_owned())])
}
