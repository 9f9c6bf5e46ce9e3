//! `agentmesh.v1.QueueService` over the core's queue operations.

use agentmesh_core::{EventStream, QueueApi, queue::Queues};
use agentmesh_proto::v1::{
    AwaitResultRequest, AwaitResultResponse, ConsumeRequest, ConsumeResponse, GetResultRequest,
    GetResultResponse, ListDeadLettersRequest, ListDeadLettersResponse, ListQueuesRequest,
    ListQueuesResponse, PurgeDeadLettersRequest, PurgeDeadLettersResponse,
    RedriveDeadLettersRequest, RedriveDeadLettersResponse, SubmitRequest, SubmitResponse,
    queue_service_server::QueueService,
};
use tonic::{Request, Response, Status, Streaming};

use super::{context, inbound};

/// The gRPC face of the durable queue.
#[derive(Debug, Clone)]
pub struct QueueFace {
    queues: Queues,
}

impl QueueFace {
    /// Serves `queues`.
    pub fn new(queues: Queues) -> Self {
        Self { queues }
    }
}

#[tonic::async_trait]
impl QueueService for QueueFace {
    async fn submit(
        &self,
        request: Request<Streaming<SubmitRequest>>,
    ) -> Result<Response<SubmitResponse>, Status> {
        let ctx = context(&request);
        let response = self
            .queues
            .submit(ctx, inbound(request.into_inner()))
            .await?;
        Ok(Response::new(response))
    }

    type ConsumeStream = EventStream<ConsumeResponse>;

    async fn consume(
        &self,
        request: Request<Streaming<ConsumeRequest>>,
    ) -> Result<Response<Self::ConsumeStream>, Status> {
        let ctx = context(&request);
        let frames = self
            .queues
            .consume(ctx, inbound(request.into_inner()))
            .await?;
        Ok(Response::new(frames))
    }

    async fn list_queues(
        &self,
        request: Request<ListQueuesRequest>,
    ) -> Result<Response<ListQueuesResponse>, Status> {
        let ctx = context(&request);
        Ok(Response::new(
            self.queues.list_queues(ctx, request.into_inner()).await?,
        ))
    }

    async fn list_dead_letters(
        &self,
        request: Request<ListDeadLettersRequest>,
    ) -> Result<Response<ListDeadLettersResponse>, Status> {
        let ctx = context(&request);
        Ok(Response::new(
            self.queues
                .list_dead_letters(ctx, request.into_inner())
                .await?,
        ))
    }

    async fn redrive_dead_letters(
        &self,
        request: Request<RedriveDeadLettersRequest>,
    ) -> Result<Response<RedriveDeadLettersResponse>, Status> {
        let ctx = context(&request);
        Ok(Response::new(
            self.queues
                .redrive_dead_letters(ctx, request.into_inner())
                .await?,
        ))
    }

    async fn purge_dead_letters(
        &self,
        request: Request<PurgeDeadLettersRequest>,
    ) -> Result<Response<PurgeDeadLettersResponse>, Status> {
        let ctx = context(&request);
        Ok(Response::new(
            self.queues
                .purge_dead_letters(ctx, request.into_inner())
                .await?,
        ))
    }

    async fn get_result(
        &self,
        request: Request<GetResultRequest>,
    ) -> Result<Response<GetResultResponse>, Status> {
        let ctx = context(&request);
        Ok(Response::new(
            self.queues.get_result(ctx, request.into_inner()).await?,
        ))
    }

    type AwaitResultStream = EventStream<AwaitResultResponse>;

    async fn await_result(
        &self,
        request: Request<AwaitResultRequest>,
    ) -> Result<Response<Self::AwaitResultStream>, Status> {
        let ctx = context(&request);
        Ok(Response::new(
            self.queues.await_result(ctx, request.into_inner()).await?,
        ))
    }
}
