//! The processes the parent runs from this same binary: the agent every path reaches, and
//! the bare pass-through proxy the node is measured against.

use std::pin::Pin;

use agentmesh_proto::v1::{
    ConverseRequest, ConverseResponse, Envelope, InvokeRequest, InvokeResponse, StreamRequest,
    StreamResponse,
    agent_service_client::AgentServiceClient,
    agent_service_server::{AgentService, AgentServiceServer},
};
use agentmesh_sdk::{Agent, AgentRuntime, Context, StreamSink};
use futures::{Stream, StreamExt};
use serde_json::json;
use tonic::{
    Request, Response, Status, Streaming,
    transport::{Endpoint, server::TcpIncoming},
};

use crate::harness::{announce, wait_for_parent};

/// The agent's name on every node.
pub(crate) const AGENT: &str = "bench-echo";

/// Echoes a call; a stream asked for `{"n": N}` sends N small partial results as fast as
/// it can, then a result.
#[derive(Debug, Clone)]
struct BenchAgent;

#[tonic::async_trait]
impl Agent for BenchAgent {
    async fn invoke(&self, _ctx: Context, request: Envelope) -> Result<Envelope, Status> {
        Ok(request)
    }

    async fn stream(
        &self,
        _ctx: Context,
        request: Envelope,
        events: StreamSink,
    ) -> Result<Envelope, Status> {
        let n = request.json_payload().unwrap_or_default()["n"]
            .as_u64()
            .unwrap_or(1000);
        for i in 0..n {
            events
                .partial(Envelope::json("tick", json!({ "i": i })))
                .await?;
        }
        Ok(Envelope::json("done", json!({ "n": n })))
    }
}

/// `mesh agent NODE…`: the bench agent, registered with every node.
pub(crate) async fn serve_agent(nodes: &[String]) {
    serve_registered(AGENT, BenchAgent, nodes).await;
}

/// Serves `agent` as `name`, registered with every node of `nodes`. The later runtimes only
/// advertise the first one's endpoint, so every node reaches the same server. Returns when
/// the parent is done.
pub(crate) async fn serve_registered<A: Agent + Clone>(name: &str, agent: A, nodes: &[String]) {
    let card = agentmesh_tests::card(name);
    let first = AgentRuntime::new(card.clone(), agent.clone())
        .node(nodes[0].clone())
        .start()
        .await
        .expect("agent starts");
    first.registered(1).await;
    let mut others = Vec::new();
    for node in &nodes[1..] {
        let other = AgentRuntime::new(card.clone(), agent.clone())
            .node(node.clone())
            .advertise(first.card().endpoint.clone())
            .start()
            .await
            .expect("agent starts");
        other.registered(1).await;
        others.push(other);
    }
    announce(first.address());
    wait_for_parent().await;
}

/// A bare pass-through: `Invoke` and `Stream` forwarded as they are on one pooled channel,
/// with no routing, deadlines, retries or tracing.
struct PassThrough {
    agent: AgentServiceClient<tonic::transport::Channel>,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for PassThrough {
    async fn invoke(
        &self,
        request: Request<InvokeRequest>,
    ) -> Result<Response<InvokeResponse>, Status> {
        let reply = self.agent.clone().invoke(request.into_inner()).await?;
        Ok(Response::new(reply.into_inner()))
    }

    type StreamStream = BoxStream<StreamResponse>;

    async fn stream(
        &self,
        request: Request<StreamRequest>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let events = self.agent.clone().stream(request.into_inner()).await?;
        Ok(Response::new(events.into_inner().boxed()))
    }

    type ConverseStream = BoxStream<ConverseResponse>;

    async fn converse(
        &self,
        _request: Request<Streaming<ConverseRequest>>,
    ) -> Result<Response<Self::ConverseStream>, Status> {
        Err(Status::unimplemented(
            "the bench proxy forwards Invoke and Stream only",
        ))
    }
}

/// `mesh proxy AGENT`: the pass-through proxy in front of the agent.
pub(crate) async fn serve_proxy(agent: &str) {
    // One connection for every call, with TCP_NODELAY, like the node's pool to agents.
    let channel = Endpoint::from_shared(format!("http://{agent}"))
        .expect("agent address")
        .tcp_nodelay(true)
        .connect()
        .await
        .expect("proxy connects to the agent");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    announce(listener.local_addr().unwrap());
    let service = AgentServiceServer::new(PassThrough {
        agent: AgentServiceClient::new(channel),
    });
    tokio::select! {
        // TCP_NODELAY on the accepted sockets, as the node and the agent runtime set it.
        served = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true))) => {
            served.expect("proxy serves")
        }
        () = wait_for_parent() => {}
    }
}
