//! Liveness and readiness, for load balancers and orchestrators.

use std::sync::Arc;

use axum::{
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use tonic::Code;

use super::Gateway;
use crate::{error::ApiError, json};

/// The process is up (it answered).
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "health",
    responses((status = 200, description = "The process is up", body = super::openapi::Status))
)]
pub(crate) async fn healthz() -> Response {
    json::response(StatusCode::OK, r#"{"status":"ok"}"#)
}

/// The node serves calls: 200 once it is ready, 503 before that and while
/// it drains at shutdown.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    responses(
        (status = 200, description = "The node is ready", body = super::openapi::Status),
        (status = 503, description = "Not ready (starting or draining)", body = super::openapi::ErrorBody),
    )
)]
pub(crate) async fn readyz(State(gateway): State<Arc<Gateway>>) -> Response {
    if gateway.mesh.ready() {
        json::response(StatusCode::OK, r#"{"status":"ready"}"#)
    } else {
        ApiError::new(Code::Unavailable, "the node is not ready to serve")
            .with_reason("NOT_READY", [])
            .into_response()
    }
}
