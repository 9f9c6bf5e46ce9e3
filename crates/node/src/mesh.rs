//! The node as the HTTP gateway sees it: the same router and registry the
//! gRPC services use, called in-process.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use agentmesh_gateway::{EventStream, Mesh};
use agentmesh_proto::v1::{
    ConverseRequest, ConverseResponse, FanOutRequest, FanOutResponse, InvokeRequest,
    InvokeResponse, LookupRequest, LookupResponse, StreamRequest, StreamResponse,
};
use tonic::{Request, Status};

use crate::{
    error::NodeError,
    registry::Registry,
    router::{CallInfo, Router, caller_set_deadline},
};

/// [`Mesh`] over the node's router and registry.
#[derive(Debug, Clone)]
pub struct NodeMesh {
    router: Router,
    registry: Arc<Registry>,
    ready: Arc<AtomicBool>,
}

impl NodeMesh {
    /// The gateway's view of a node; `ready` says whether it serves yet.
    pub fn new(router: Router, registry: Arc<Registry>, ready: Arc<AtomicBool>) -> Self {
        Self {
            router,
            registry,
            ready,
        }
    }

    fn call<T>(&self, request: &Request<T>) -> CallInfo {
        CallInfo::of(request, self.router.config().default_timeout)
    }
}

#[tonic::async_trait]
impl Mesh for NodeMesh {
    async fn invoke(&self, request: Request<InvokeRequest>) -> Result<InvokeResponse, Status> {
        let call = self.call(&request);
        let envelope = request
            .into_inner()
            .envelope
            .ok_or_else(|| NodeError::InvalidArgument("envelope is required".into()))?;
        let reply = self.router.call_unary(call, envelope).await?;
        Ok(InvokeResponse {
            envelope: Some(reply),
        })
    }

    async fn stream(
        &self,
        request: Request<StreamRequest>,
    ) -> Result<EventStream<StreamResponse>, Status> {
        let call = self.call(&request);
        self.router.open_stream(call, request.into_inner()).await
    }

    async fn converse(
        &self,
        request: Request<EventStream<ConverseRequest>>,
    ) -> Result<EventStream<ConverseResponse>, Status> {
        let call = self.call(&request);
        let explicit = caller_set_deadline(request.metadata());
        self.router
            .open_conversation(call, explicit, request.into_inner())
            .await
    }

    async fn lookup(&self, request: Request<LookupRequest>) -> Result<LookupResponse, Status> {
        let filter = request.into_inner().filter.unwrap_or_default();
        Ok(LookupResponse {
            instances: self.registry.lookup(&filter),
        })
    }

    async fn fan_out(&self, request: Request<FanOutRequest>) -> Result<FanOutResponse, Status> {
        let call = self.call(&request);
        self.router.fan_out(call, request.into_inner()).await
    }

    fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}
