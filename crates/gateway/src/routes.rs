//! The gateway's routes.

use std::sync::Arc;

use crate::{GatewayConfig, Mesh};

/// The gateway's routes, to be merged with the node's gRPC routes. It sets
/// no fallback, so unknown paths fall through to gRPC's.
pub fn router(mesh: Arc<dyn Mesh>, config: GatewayConfig) -> axum::Router {
    let _ = (mesh, config);
    axum::Router::new()
}
