//! The core's operations as its faces call them: the gRPC services of the node and the
//! HTTP gateway both take the call's [`CallContext`], call one of these, and wrap the answer.

use agentmesh_proto::{
    CallContext,
    v1::{
        AddA2aAgentRequest, AddA2aAgentResponse, AwaitResultRequest, AwaitResultResponse,
        ConsumeRequest, ConsumeResponse, ConverseRequest, ConverseResponse, FanOutRequest,
        FanOutResponse, FollowTraceRequest, GetResultRequest, GetResultResponse, GetTraceRequest,
        GetTraceResponse, Hop, InvokeRequest, InvokeResponse, ListDeadLettersRequest,
        ListDeadLettersResponse, ListQueuesRequest, ListQueuesResponse, LookupRequest,
        LookupResponse, PurgeDeadLettersRequest, PurgeDeadLettersResponse,
        RedriveDeadLettersRequest, RedriveDeadLettersResponse, StreamRequest, StreamResponse,
        SubmitRequest, SubmitResponse,
    },
};
use futures::stream::BoxStream;
use tonic::Status;

/// A stream of messages or the status that ended it.
pub type EventStream<T> = BoxStream<'static, Result<T, Status>>;

/// Calls to agents through the mesh, and discovery.
#[tonic::async_trait]
pub trait Mesh: Send + Sync + 'static {
    /// `AgentService.Invoke` through the router.
    async fn invoke(
        &self,
        ctx: CallContext,
        request: InvokeRequest,
    ) -> Result<InvokeResponse, Status>;

    /// `AgentService.Stream` through the router (including resumption).
    async fn stream(
        &self,
        ctx: CallContext,
        request: StreamRequest,
    ) -> Result<EventStream<StreamResponse>, Status>;

    /// `AgentService.Converse` through the router.
    async fn converse(
        &self,
        ctx: CallContext,
        inbound: EventStream<ConverseRequest>,
    ) -> Result<EventStream<ConverseResponse>, Status>;

    /// `DiscoveryService.Lookup`.
    async fn lookup(
        &self,
        ctx: CallContext,
        request: LookupRequest,
    ) -> Result<LookupResponse, Status>;

    /// `DiscoveryService.AddA2aAgent`: UNIMPLEMENTED unless the node reaches A2A agents.
    async fn add_a2a_agent(
        &self,
        _ctx: CallContext,
        _request: AddA2aAgentRequest,
    ) -> Result<AddA2aAgentResponse, Status> {
        Err(Status::unimplemented(
            "this node does not add external A2A agents",
        ))
    }

    /// `FanOutService.FanOut`.
    async fn fan_out(
        &self,
        ctx: CallContext,
        request: FanOutRequest,
    ) -> Result<FanOutResponse, Status>;

    /// `TraceService.GetTrace`: the journal's hops of one correlation id.
    async fn get_trace(
        &self,
        ctx: CallContext,
        request: GetTraceRequest,
    ) -> Result<GetTraceResponse, Status>;

    /// `TraceService.FollowTrace`: those hops, then each new one.
    async fn follow_trace(
        &self,
        ctx: CallContext,
        request: FollowTraceRequest,
    ) -> Result<EventStream<Hop>, Status>;

    /// Whether the node is ready to serve (for `/readyz`).
    fn ready(&self) -> bool;
}

/// The durable queue's operations (`QueueService`).
#[tonic::async_trait]
pub trait QueueApi: Send + Sync + 'static {
    /// `Submit`: every message of every frame, each with its own outcome.
    async fn submit(
        &self,
        ctx: CallContext,
        frames: EventStream<SubmitRequest>,
    ) -> Result<SubmitResponse, Status>;

    /// `Consume`: a subscription frame, then deliveries one way and acks the other.
    async fn consume(
        &self,
        ctx: CallContext,
        inbound: EventStream<ConsumeRequest>,
    ) -> Result<EventStream<ConsumeResponse>, Status>;

    /// `ListQueues`.
    async fn list_queues(
        &self,
        ctx: CallContext,
        request: ListQueuesRequest,
    ) -> Result<ListQueuesResponse, Status>;

    /// `ListDeadLetters`.
    async fn list_dead_letters(
        &self,
        ctx: CallContext,
        request: ListDeadLettersRequest,
    ) -> Result<ListDeadLettersResponse, Status>;

    /// `RedriveDeadLetters`.
    async fn redrive_dead_letters(
        &self,
        ctx: CallContext,
        request: RedriveDeadLettersRequest,
    ) -> Result<RedriveDeadLettersResponse, Status>;

    /// `PurgeDeadLetters`.
    async fn purge_dead_letters(
        &self,
        ctx: CallContext,
        request: PurgeDeadLettersRequest,
    ) -> Result<PurgeDeadLettersResponse, Status>;

    /// `GetResult` (with `wait`, until the call's deadline).
    async fn get_result(
        &self,
        ctx: CallContext,
        request: GetResultRequest,
    ) -> Result<GetResultResponse, Status>;

    /// `AwaitResult`: keep-alive events, then the result.
    async fn await_result(
        &self,
        ctx: CallContext,
        request: AwaitResultRequest,
    ) -> Result<EventStream<AwaitResultResponse>, Status>;
}

/// Adds external A2A agents to the mesh (`DiscoveryService.AddA2aAgent`).
#[tonic::async_trait]
pub trait A2aAgents: Send + Sync + std::fmt::Debug + 'static {
    /// Fetches the agent's card, lists the agent and keeps its card fresh.
    async fn add(&self, request: AddA2aAgentRequest) -> Result<AddA2aAgentResponse, Status>;
}
