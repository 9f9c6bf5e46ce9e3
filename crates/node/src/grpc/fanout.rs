//! `agentmesh.v1.FanOutService` over the core's fan-out.

use std::sync::Arc;

use agentmesh_core::{Mesh, MeshCore};
use agentmesh_proto::v1::{FanOutRequest, FanOutResponse, fan_out_service_server::FanOutService};
use tonic::{Request, Response, Status};

use super::context;

/// The gRPC face of fan-out.
#[derive(Debug, Clone)]
pub struct FanOutFace {
    mesh: Arc<MeshCore>,
}

impl FanOutFace {
    /// Serves `mesh`.
    pub fn new(mesh: Arc<MeshCore>) -> Self {
        Self { mesh }
    }
}

#[tonic::async_trait]
impl FanOutService for FanOutFace {
    async fn fan_out(
        &self,
        request: Request<FanOutRequest>,
    ) -> Result<Response<FanOutResponse>, Status> {
        let ctx = context(&request);
        let response = self.mesh.fan_out(ctx, request.into_inner()).await?;
        Ok(Response::new(response))
    }
}
