//! The gateway's routes, one module per resource, assembled into one axum
//! router whose OpenAPI document is generated from the handlers'
//! annotations (so `/openapi.json` cannot drift from what is served).
//!
//! Later resources (queues, results, dead letters, traces, metrics) get a
//! module of their own here and one `.routes(...)` line in [`router`].

mod agents;
mod converse;
mod fanout;
mod health;
pub(crate) mod openapi;
mod streams;
mod traces;

use std::sync::{Arc, OnceLock};

use axum::{
    extract::DefaultBodyLimit,
    http::{HeaderName, HeaderValue, Method, header},
};
use bytes::Bytes;
use tower_http::cors::{AllowOrigin, CorsLayer};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{GatewayConfig, Mesh};

/// What every handler shares.
pub(crate) struct Gateway {
    pub(crate) mesh: Arc<dyn Mesh>,
    pub(crate) config: GatewayConfig,
    /// Detached streams waiting for (or read by) their `events_url`.
    pub(crate) detached: streams::Detached,
    /// The OpenAPI document, serialized once at startup.
    pub(crate) openapi: OnceLock<Bytes>,
}

/// The gateway's routes, to be merged with the node's gRPC routes. It sets
/// no fallback, so unknown paths fall through to gRPC's.
pub fn router(mesh: Arc<dyn Mesh>, config: GatewayConfig) -> axum::Router {
    api(mesh, config).0
}

/// The gateway's routes and the queue routes over `queues`, behind the same
/// CORS layer.
pub fn router_with_queues(
    mesh: Arc<dyn Mesh>,
    queues: Arc<dyn crate::QueueApi>,
    config: GatewayConfig,
) -> axum::Router {
    let mut queue_routes = crate::queue_routes(queues);
    if let Some(cors) = cors_layer(&config.cors_origins) {
        queue_routes = queue_routes.layer(cors);
    }
    api(mesh, config).0.merge(queue_routes)
}

/// The OpenAPI document of every route, as served at `/openapi.json`.
pub fn openapi_document() -> serde_json::Value {
    api(no_mesh(), GatewayConfig::default()).1
}

/// A mesh that is never ready and reaches nothing: enough to build the
/// routes (for their document) without a node.
fn no_mesh() -> Arc<dyn Mesh> {
    use agentmesh_proto::{CallContext, v1};
    use tonic::Status;
    struct Nowhere;
    #[tonic::async_trait]
    impl Mesh for Nowhere {
        async fn invoke(
            &self,
            _: CallContext,
            _: v1::InvokeRequest,
        ) -> Result<v1::InvokeResponse, Status> {
            Err(Status::unavailable("no mesh"))
        }
        async fn stream(
            &self,
            _: CallContext,
            _: v1::StreamRequest,
        ) -> Result<crate::EventStream<v1::StreamResponse>, Status> {
            Err(Status::unavailable("no mesh"))
        }
        async fn converse(
            &self,
            _: CallContext,
            _: crate::EventStream<v1::ConverseRequest>,
        ) -> Result<crate::EventStream<v1::ConverseResponse>, Status> {
            Err(Status::unavailable("no mesh"))
        }
        async fn lookup(
            &self,
            _: CallContext,
            _: v1::LookupRequest,
        ) -> Result<v1::LookupResponse, Status> {
            Err(Status::unavailable("no mesh"))
        }
        async fn fan_out(
            &self,
            _: CallContext,
            _: v1::FanOutRequest,
        ) -> Result<v1::FanOutResponse, Status> {
            Err(Status::unavailable("no mesh"))
        }
        async fn get_trace(
            &self,
            _: CallContext,
            _: v1::GetTraceRequest,
        ) -> Result<v1::GetTraceResponse, Status> {
            Err(Status::unavailable("no mesh"))
        }
        async fn follow_trace(
            &self,
            _: CallContext,
            _: v1::FollowTraceRequest,
        ) -> Result<crate::EventStream<v1::Hop>, Status> {
            Err(Status::unavailable("no mesh"))
        }
        fn ready(&self) -> bool {
            false
        }
    }
    Arc::new(Nowhere)
}

fn api(mesh: Arc<dyn Mesh>, config: GatewayConfig) -> (axum::Router, serde_json::Value) {
    let cors = cors_layer(&config.cors_origins);
    let body_limit = config.max_body_bytes;
    let gateway = Arc::new(Gateway {
        detached: streams::Detached::new(config.detached_retention, config.max_detached),
        mesh,
        config,
        openapi: OnceLock::new(),
    });
    let (router, mut document) = OpenApiRouter::with_openapi(openapi::base())
        .routes(routes!(agents::list))
        .routes(routes!(agents::get))
        .routes(routes!(agents::invoke))
        .routes(routes!(agents::add_a2a))
        .routes(routes!(streams::start))
        .routes(routes!(streams::events))
        .routes(routes!(converse::converse))
        .routes(routes!(fanout::fan_out))
        .routes(routes!(traces::get))
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz))
        .routes(routes!(openapi::serve))
        .split_for_parts();
    document.merge(<crate::queues::QueueDocs as utoipa::OpenApi>::openapi());
    document.merge(<traces::TraceDocs as utoipa::OpenApi>::openapi());
    openapi::finish(&mut document);
    let document = openapi::to_json(&document);
    let serialized = serde_json::to_vec(&document).unwrap_or_default();
    let _ = gateway.openapi.set(Bytes::from(serialized));
    let mut router = router
        .with_state(gateway)
        // Bodies over the limit are refused while being read, as JSON 413s
        // (see `json::Body`), before anything reaches the mesh.
        .layer(DefaultBodyLimit::max(body_limit));
    if let Some(cors) = cors {
        router = router.layer(cors);
    }
    (router, document)
}

/// CORS for browsers on other origins: the configured origins (`*` for
/// any) may call every route and read the correlation id.
fn cors_layer(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o.trim() == "*") {
        AllowOrigin::any()
    } else {
        let list: Vec<HeaderValue> = origins
            .iter()
            .filter_map(
                |o| match HeaderValue::from_str(o.trim().trim_end_matches('/')) {
                    Ok(value) => Some(value),
                    Err(_) => {
                        tracing::warn!(origin = %o, "ignoring an invalid CORS origin");
                        None
                    }
                },
            )
            .collect();
        AllowOrigin::list(list)
    };
    let headers = [
        header::CONTENT_TYPE,
        header::ACCEPT,
        HeaderName::from_static("last-event-id"),
        HeaderName::from_static("x-correlation-id"),
        HeaderName::from_static("x-timeout-ms"),
        HeaderName::from_static("traceparent"),
        HeaderName::from_static("tracestate"),
        HeaderName::from_static("idempotency-key"),
    ];
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
            .allow_headers(headers)
            .expose_headers([HeaderName::from_static("x-correlation-id")])
            .max_age(std::time::Duration::from_secs(600)),
    )
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use tower::ServiceExt;

    use super::*;

    async fn get(path: &str) -> (u16, serde_json::Value) {
        let (router, _) = api(no_mesh(), GatewayConfig::default());
        let response = router
            .oneshot(axum::http::Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, serde_json::from_slice(&body).unwrap())
    }

    #[tokio::test]
    async fn readyz_is_503_until_the_node_is_ready() {
        assert_eq!(get("/healthz").await.0, 200);
        let (status, body) = get("/readyz").await;
        assert_eq!(status, 503);
        assert_eq!(body["error"]["code"], "UNAVAILABLE");
        let (status, body) = get("/v1/agents").await;
        assert_eq!(status, 503, "mesh errors map to their HTTP status");
        assert_eq!(body["error"]["message"], "no mesh");
    }

    #[test]
    fn the_document_has_every_route() {
        let document = openapi_document();
        assert!(document["openapi"].as_str().unwrap().starts_with("3."));
        let paths = document["paths"].as_object().unwrap();
        for (path, method) in [
            ("/v1/agents", "get"),
            ("/v1/agents/{name}", "get"),
            ("/v1/agents/{name}/invoke", "post"),
            ("/v1/a2a-agents", "post"),
            ("/v1/agents/{name}/stream", "post"),
            ("/v1/agents/{name}/converse", "get"),
            ("/v1/streams/{id}/events", "get"),
            ("/healthz", "get"),
            ("/readyz", "get"),
            ("/openapi.json", "get"),
            ("/v1/fanout", "post"),
            ("/v1/queues", "get"),
            ("/v1/queues/{queue}/messages", "post"),
            ("/v1/queues/{queue}/dead-letters", "get"),
            ("/v1/queues/{queue}/dead-letters/redrive", "post"),
            ("/v1/queues/{queue}/dead-letters/purge", "post"),
            ("/v1/results/{correlation_id}", "get"),
            ("/v1/results/{correlation_id}/events", "get"),
        ] {
            assert!(
                paths[path][method].is_object(),
                "{method} {path} is documented"
            );
        }
        let schemas = document["components"]["schemas"].as_object().unwrap();
        for schema in ["Envelope", "ErrorBody", "AgentList", "DetachedStream"] {
            assert!(schemas.contains_key(schema), "schema {schema}");
        }
    }
}
