//! What the gateway needs from the node.

use agentmesh_proto::v1::{
    ConverseRequest, ConverseResponse, FanOutRequest, FanOutResponse, InvokeRequest,
    InvokeResponse, LookupRequest, LookupResponse, StreamRequest, StreamResponse,
};
use futures::stream::BoxStream;
use tonic::{Request, Status};

/// A stream of messages or the status that ended it.
pub type EventStream<T> = BoxStream<'static, Result<T, Status>>;

/// The node's services, as the gateway calls them in-process.
#[tonic::async_trait]
pub trait Mesh: Send + Sync + 'static {
    /// `AgentService.Invoke` through the router.
    async fn invoke(&self, request: Request<InvokeRequest>) -> Result<InvokeResponse, Status>;

    /// `AgentService.Stream` through the router (including resumption).
    async fn stream(
        &self,
        request: Request<StreamRequest>,
    ) -> Result<EventStream<StreamResponse>, Status>;

    /// `AgentService.Converse` through the router.
    async fn converse(
        &self,
        request: Request<EventStream<ConverseRequest>>,
    ) -> Result<EventStream<ConverseResponse>, Status>;

    /// `DiscoveryService.Lookup`.
    async fn lookup(&self, request: Request<LookupRequest>) -> Result<LookupResponse, Status>;

    /// `FanOutService.FanOut`.
    async fn fan_out(&self, request: Request<FanOutRequest>) -> Result<FanOutResponse, Status>;

    /// Whether the node is ready to serve (for `/readyz`).
    fn ready(&self) -> bool;
}
