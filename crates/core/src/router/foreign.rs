//! Agents the node reaches over another protocol than `agentmesh.v1.AgentService` (external
//! A2A agents). Their calls go through the same attempt and retry code as every other call
//! (breaker, hop deadline, in-flight counts, journal, span); only the last step, sending the
//! prepared request, is the transport's.

use std::sync::Arc;

use agentmesh_proto::v1::{
    AgentCard, Envelope, InvokeRequest, StreamRequest, StreamResponse,
    agent_service_client::AgentServiceClient,
};
use tonic::{Request, Status, transport::Channel};

use crate::{api::EventStream, registry::Instance};

/// A protocol the router speaks to some agents instead of `agentmesh.v1.AgentService`.
///
/// The requests it gets are the ones a gRPC agent would get: the hop's deadline is their
/// `grpc-timeout` (see [`tonic::Request::set_timeout`]) and their metadata carries the
/// envelope's tracing fields. Failures come back as the `Status` the caller should see;
/// the router records them on the instance's breaker with
/// [`agentmesh_resilience::counts_against_destination`].
#[tonic::async_trait]
pub trait ForeignTransport: Send + Sync + std::fmt::Debug + 'static {
    /// Whether this transport reaches the agent of `card`.
    fn handles(&self, card: &AgentCard) -> bool;

    /// A unary call.
    async fn invoke(
        &self,
        instance: &Instance,
        request: Request<InvokeRequest>,
    ) -> Result<Envelope, Status>;

    /// A server stream: its events as the agent would send them (progress, partials, then
    /// one result or error).
    async fn stream(
        &self,
        instance: &Instance,
        request: Request<StreamRequest>,
    ) -> Result<EventStream<StreamResponse>, Status>;
}

/// How the router reaches a routed instance.
#[derive(Debug, Clone)]
pub enum AgentClient {
    /// An agent serving `agentmesh.v1.AgentService`.
    Grpc(AgentServiceClient<Channel>),
    /// An agent reached over a [`ForeignTransport`].
    Foreign {
        /// The transport.
        transport: Arc<dyn ForeignTransport>,
        /// The instance it calls.
        instance: Arc<Instance>,
    },
}
