//! [`Mesh`] over the router and the registry: what both faces (the node's gRPC services and
//! the HTTP gateway) call for agents, discovery and fan-out.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use agentmesh_proto::{
    CallContext,
    v1::{
        ConverseRequest, ConverseResponse, FanOutRequest, FanOutResponse, InvokeRequest,
        InvokeResponse, LookupRequest, LookupResponse, StreamRequest, StreamResponse,
    },
};
use tonic::Status;

use crate::{
    api::{EventStream, Mesh},
    error::MeshError,
    registry::AgentRegistry,
    router::Router,
};

/// The mesh's agent-facing operations over one router and registry.
#[derive(Debug, Clone)]
pub struct MeshCore {
    router: Router,
    registry: Arc<dyn AgentRegistry>,
    ready: Arc<AtomicBool>,
}

impl MeshCore {
    /// The mesh over `router` and `registry`; `ready` says whether the node serves yet.
    pub fn new(router: Router, registry: Arc<dyn AgentRegistry>, ready: Arc<AtomicBool>) -> Self {
        Self {
            router,
            registry,
            ready,
        }
    }

    /// The router.
    pub fn router(&self) -> &Router {
        &self.router
    }

    /// The registry.
    pub fn registry(&self) -> &Arc<dyn AgentRegistry> {
        &self.registry
    }
}

#[tonic::async_trait]
impl Mesh for MeshCore {
    async fn invoke(
        &self,
        ctx: CallContext,
        request: InvokeRequest,
    ) -> Result<InvokeResponse, Status> {
        let envelope = request
            .envelope
            .ok_or_else(|| MeshError::InvalidArgument("envelope is required".into()))?;
        let reply = self.router.call_unary(ctx, envelope).await?;
        Ok(InvokeResponse {
            envelope: Some(reply),
        })
    }

    async fn stream(
        &self,
        ctx: CallContext,
        request: StreamRequest,
    ) -> Result<EventStream<StreamResponse>, Status> {
        self.router.open_stream(ctx, request).await
    }

    async fn converse(
        &self,
        ctx: CallContext,
        inbound: EventStream<ConverseRequest>,
    ) -> Result<EventStream<ConverseResponse>, Status> {
        self.router.open_conversation(ctx, inbound).await
    }

    async fn lookup(
        &self,
        _ctx: CallContext,
        request: LookupRequest,
    ) -> Result<LookupResponse, Status> {
        let filter = request.filter.unwrap_or_default();
        Ok(LookupResponse {
            instances: self.registry.lookup(&filter),
        })
    }

    async fn fan_out(
        &self,
        ctx: CallContext,
        request: FanOutRequest,
    ) -> Result<FanOutResponse, Status> {
        self.router.fan_out(ctx, request).await
    }

    fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}
