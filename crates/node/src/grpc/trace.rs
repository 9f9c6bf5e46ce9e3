//! `agentmesh.v1.TraceService` over the core's trace journal.

use std::sync::Arc;

use agentmesh_core::{EventStream, Mesh, MeshCore};
use agentmesh_proto::v1::{
    FollowTraceRequest, FollowTraceResponse, GetTraceRequest, GetTraceResponse,
    trace_service_server::TraceService,
};
use futures::StreamExt;
use tonic::{Request, Response, Status};

use super::context;

/// The gRPC face of the trace journal.
#[derive(Debug, Clone)]
pub struct TraceFace {
    mesh: Arc<MeshCore>,
}

impl TraceFace {
    /// Serves `mesh`'s journal.
    pub fn new(mesh: Arc<MeshCore>) -> Self {
        Self { mesh }
    }
}

#[tonic::async_trait]
impl TraceService for TraceFace {
    type FollowTraceStream = EventStream<FollowTraceResponse>;

    async fn get_trace(
        &self,
        request: Request<GetTraceRequest>,
    ) -> Result<Response<GetTraceResponse>, Status> {
        let ctx = context(&request);
        Ok(Response::new(
            self.mesh.get_trace(ctx, request.into_inner()).await?,
        ))
    }

    async fn follow_trace(
        &self,
        request: Request<FollowTraceRequest>,
    ) -> Result<Response<Self::FollowTraceStream>, Status> {
        let ctx = context(&request);
        let hops = self.mesh.follow_trace(ctx, request.into_inner()).await?;
        Ok(Response::new(
            hops.map(|hop| hop.map(|hop| FollowTraceResponse { hop: Some(hop) }))
                .boxed(),
        ))
    }
}
