//! `agentmesh.v1.AgentService` as the node serves it: the router behind the core's [`Mesh`].

use std::sync::Arc;

use agentmesh_core::{EventStream, Mesh, MeshCore};
use agentmesh_proto::v1::{
    ConverseRequest, ConverseResponse, InvokeRequest, InvokeResponse, StreamRequest,
    StreamResponse, agent_service_server::AgentService,
};
use tonic::{Request, Response, Status, Streaming};

use super::{context, inbound};

/// The node's own `AgentService`: every call is routed to an agent.
#[derive(Debug, Clone)]
pub struct AgentFace {
    mesh: Arc<MeshCore>,
}

impl AgentFace {
    /// Serves `mesh`.
    pub fn new(mesh: Arc<MeshCore>) -> Self {
        Self { mesh }
    }
}

#[tonic::async_trait]
impl AgentService for AgentFace {
    async fn invoke(
        &self,
        request: Request<InvokeRequest>,
    ) -> Result<Response<InvokeResponse>, Status> {
        let ctx = context(&request);
        let reply = self.mesh.invoke(ctx, request.into_inner()).await?;
        Ok(Response::new(reply))
    }

    type StreamStream = EventStream<StreamResponse>;

    async fn stream(
        &self,
        request: Request<StreamRequest>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let ctx = context(&request);
        let events = self.mesh.stream(ctx, request.into_inner()).await?;
        Ok(Response::new(events))
    }

    type ConverseStream = EventStream<ConverseResponse>;

    async fn converse(
        &self,
        request: Request<Streaming<ConverseRequest>>,
    ) -> Result<Response<Self::ConverseStream>, Status> {
        let ctx = context(&request);
        let frames = self
            .mesh
            .converse(ctx, inbound(request.into_inner()))
            .await?;
        Ok(Response::new(frames))
    }
}
