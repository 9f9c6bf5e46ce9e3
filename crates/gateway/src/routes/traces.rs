//! `GET /v1/traces/{correlation_id}`: the trace journal's hops of one chain, as a tree.

use std::sync::Arc;

use agentmesh_core::journal::{TraceNode, tree};
use agentmesh_proto::v1::{GetTraceRequest, Hop};
use axum::{
    extract::{Path, State},
    http::StatusCode,
    response::Response,
};
use serde::Serialize;
use utoipa::{OpenApi, ToSchema};

use super::{
    Gateway,
    openapi::{CallHeaders, ErrorBody},
};
use crate::{call::Call, error::ApiError, json};

/// A chain of messages: every hop recorded under one correlation id.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Trace {
    /// The correlation id.
    correlation_id: String,
    /// How many hops were recorded.
    hops: usize,
    /// When the first hop started (RFC 3339).
    started_at: String,
    /// From the first hop's start to the last hop's end, in milliseconds.
    duration_ms: f64,
    /// Hops that nothing recorded caused, each with the hops it caused.
    #[schema(no_recursion)]
    roots: Vec<TraceHop>,
}

/// The schemas a trace nests (a recursive one is not collected from the route).
#[derive(OpenApi)]
#[openapi(components(schemas(TraceHop)))]
pub(crate) struct TraceDocs;

/// One hop and the hops it caused.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct TraceHop {
    /// The envelope carried.
    envelope_id: String,
    /// The envelope that caused it.
    #[serde(skip_serializing_if = "String::is_empty")]
    causation_id: String,
    /// Who sent it.
    from: String,
    /// Where it went: `agent/instance`, `queue:<name>`, `discovery`, fan-out targets.
    to: String,
    /// `unary`, `stream`, `converse`, `fanout`, `lookup`, `submit` or `deliver`.
    style: String,
    /// The gRPC status code name of its outcome.
    code: String,
    /// The status message, or a note on what it did.
    #[serde(skip_serializing_if = "String::is_empty")]
    message: String,
    /// When it started (RFC 3339).
    started_at: String,
    /// Milliseconds after the trace's first hop started.
    offset_ms: f64,
    /// How long it took, in milliseconds.
    duration_ms: f64,
    /// Delivery attempt, from 1.
    attempt: u32,
    /// The node that carried it.
    node: String,
    /// The hops it caused, in the order they started.
    #[schema(no_recursion)]
    children: Vec<TraceHop>,
}

fn millis(hop: &Hop) -> (f64, f64) {
    let start = hop
        .started_at
        .map_or(0.0, |t| t.seconds as f64 * 1e3 + f64::from(t.nanos) / 1e6);
    let took = hop
        .duration
        .map_or(0.0, |d| d.seconds as f64 * 1e3 + f64::from(d.nanos) / 1e6);
    (start, took)
}

fn convert(node: TraceNode, origin: f64) -> TraceHop {
    let (start, took) = millis(&node.hop);
    let hop = node.hop;
    TraceHop {
        envelope_id: hop.envelope_id,
        causation_id: hop.causation_id,
        from: hop.from,
        to: hop.to,
        style: hop.style,
        code: hop.code,
        message: hop.message,
        started_at: hop.started_at.map(|t| t.to_string()).unwrap_or_default(),
        offset_ms: start - origin,
        duration_ms: took,
        attempt: hop.attempt,
        node: hop.node,
        children: node
            .children
            .into_iter()
            .map(|c| convert(c, origin))
            .collect(),
    }
}

/// The hops recorded under one correlation id, as a tree: a hop hangs under the first hop
/// of the same envelope (a retry under the first attempt, a delivery under its submit), else
/// under the hop of the envelope that caused it.
#[utoipa::path(
    get,
    path = "/v1/traces/{correlation_id}",
    operation_id = "get_trace",
    tag = "traces",
    params(
        ("correlation_id" = String, Path, description = "The chain's correlation id (`x-correlation-id`)"),
        CallHeaders,
    ),
    responses(
        (status = 200, description = "The chain as a tree of hops", body = Trace),
        (status = 404, description = "No hop recorded under this id (or aged out)", body = ErrorBody),
        (status = 400, description = "The journal is off on this node (FAILED_PRECONDITION)", body = ErrorBody),
    )
)]
pub(crate) async fn get(
    State(gateway): State<Arc<Gateway>>,
    call: Call,
    Path(correlation_id): Path<String>,
) -> Result<Response, ApiError> {
    let hops = gateway
        .mesh
        .get_trace(
            call.ctx(),
            GetTraceRequest {
                correlation_id: correlation_id.clone(),
            },
        )
        .await?
        .hops;
    let count = hops.len();
    let spans: Vec<(f64, f64)> = hops.iter().map(millis).collect();
    let origin = spans.iter().map(|s| s.0).fold(f64::INFINITY, f64::min);
    let end = spans.iter().map(|s| s.0 + s.1).fold(0.0, f64::max);
    let started_at = hops
        .iter()
        .filter_map(|h| h.started_at)
        .min_by_key(|t| (t.seconds, t.nanos))
        .map(|t| t.to_string())
        .unwrap_or_default();
    let trace = Trace {
        correlation_id,
        hops: count,
        started_at,
        duration_ms: (end - origin).max(0.0),
        roots: tree(hops).into_iter().map(|n| convert(n, origin)).collect(),
    };
    let body = serde_json::to_vec(&trace).unwrap_or_default();
    Ok(json::response(StatusCode::OK, body))
}
