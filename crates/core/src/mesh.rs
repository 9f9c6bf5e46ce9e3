//! [`Mesh`] over the router and the registry: what both faces (the node's gRPC services and
//! the HTTP gateway) call for agents, discovery and fan-out.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use agentmesh_proto::{
    CallContext,
    v1::{
        ConverseRequest, ConverseResponse, FanOutRequest, FanOutResponse, FollowTraceRequest,
        GetTraceRequest, GetTraceResponse, Hop, InvokeRequest, InvokeResponse, LookupRequest,
        LookupResponse, StreamRequest, StreamResponse,
    },
};
use futures::StreamExt;
use tonic::Status;

use crate::{
    access::Action,
    api::{EventStream, Mesh},
    error::MeshError,
    journal::record_lookup,
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
        ctx: CallContext,
        request: LookupRequest,
    ) -> Result<LookupResponse, Status> {
        let began = std::time::SystemTime::now();
        let filter = request.filter.unwrap_or_default();
        let mut instances = self.registry.lookup(&filter);
        // A caller sees only the agents it may discover.
        let access = self.router.access();
        if access.enforced() {
            instances.retain(|instance| {
                let name = instance.card.as_ref().map_or("", |c| c.name.as_str());
                access.allows(ctx.principal.as_ref(), Action::Discover, name)
            });
        }
        record_lookup(
            self.router.journal().as_ref(),
            &ctx.correlation_id,
            instances.len(),
            began,
        );
        Ok(LookupResponse { instances })
    }

    async fn fan_out(
        &self,
        ctx: CallContext,
        request: FanOutRequest,
    ) -> Result<FanOutResponse, Status> {
        self.router.fan_out(ctx, request).await
    }

    async fn get_trace(
        &self,
        ctx: CallContext,
        request: GetTraceRequest,
    ) -> Result<GetTraceResponse, Status> {
        let id = required_correlation_id(&request.correlation_id)?;
        self.router.access().check(&ctx, Action::ReadTraces, id)?;
        let hops = self.router.journal().hops(id).await?;
        if hops.is_empty() {
            return Err(MeshError::TraceNotFound(id.to_owned()).into());
        }
        Ok(GetTraceResponse { hops })
    }

    async fn follow_trace(
        &self,
        ctx: CallContext,
        request: FollowTraceRequest,
    ) -> Result<EventStream<Hop>, Status> {
        let id = required_correlation_id(&request.correlation_id)?;
        self.router.access().check(&ctx, Action::ReadTraces, id)?;
        let hops = self.router.journal().follow(id).await?;
        // Following ends with the caller's deadline, when it set one.
        let until = ctx
            .deadline
            .explicit
            .then(|| tokio::time::Instant::from_std(ctx.deadline.at));
        let hops = hops.map(|hop| hop.map_err(Status::from));
        Ok(match until {
            Some(until) => hops.take_until(tokio::time::sleep_until(until)).boxed(),
            None => hops.boxed(),
        })
    }

    fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}

fn required_correlation_id(id: &str) -> Result<&str, MeshError> {
    if id.is_empty() {
        return Err(MeshError::InvalidArgument(
            "correlation_id is required".into(),
        ));
    }
    Ok(id)
}
