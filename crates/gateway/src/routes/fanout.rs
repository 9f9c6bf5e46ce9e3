//! `POST /v1/fanout`: one request to many agents under a completion policy.

use std::sync::Arc;

use agentmesh_proto::v1::FanOutRequest;
use axum::{extract::State, response::Response};

use super::{
    Gateway,
    openapi::{self, CallHeaders, ErrorBody},
};
use crate::{call::Call, error::ApiError, json};

/// Sends the body's envelope to every target (or every instance of a skill)
/// and answers with each target's outcome. Per-target failures are part of
/// the 200 answer (`satisfied` says whether the policy was met); only a
/// malformed request fails as a whole.
#[utoipa::path(
    post,
    path = "/v1/fanout",
    tag = "fanout",
    params(CallHeaders),
    request_body(content = openapi::FanOutRequest, description = "e.g. `{\"envelope\":{\"json\":{}},\"targets\":[\"a\",\"b\"],\"policy\":\"FAN_OUT_POLICY_QUORUM\",\"count\":1}`", content_type = "application/json"),
    responses(
        (status = 200, description = "Every target's outcome", body = openapi::FanOutResponse),
        (status = 400, description = "Invalid JSON, no targets, or a count out of range", body = ErrorBody),
        (status = 404, description = "The skill has no instances", body = ErrorBody),
        (status = 413, description = "Body over the gateway's limit", body = ErrorBody),
    )
)]
pub(crate) async fn fan_out(
    State(gateway): State<Arc<Gateway>>,
    call: Call,
    body: json::Body,
) -> Result<Response, ApiError> {
    let mut request: FanOutRequest = body.parse()?;
    if let Some(envelope) = request.envelope.as_mut() {
        call.stamp(envelope);
    }
    let response = gateway.mesh.fan_out(call.ctx(), request).await?;
    json::ok(&response)
}
