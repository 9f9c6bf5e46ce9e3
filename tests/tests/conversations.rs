//! Conversations through the node over real sockets: many messages both ways at
//! once, a silent peer reported UNAVAILABLE on either side, heartbeats that keep a
//! quiet conversation alive, and a clean end on half-close.

use std::{pin::Pin, time::Duration};

use agentmesh_proto::v1::{
    ConverseOpen, ConverseRequest, ConverseResponse, Envelope, InvokeRequest, InvokeResponse,
    StreamRequest, StreamResponse,
    agent_service_client::AgentServiceClient,
    agent_service_server::{AgentService, AgentServiceServer},
    converse_request,
};
use agentmesh_sdk::{Agent, Context, Conversation};
use agentmesh_tests::{TestNode, card, start_agent};
use futures::{Stream, StreamExt};
use serde_json::json;
use tonic::{Code, Request, Response, Status, Streaming};

/// Replies to every message with `{"echo": payload}`.
struct Talker;

#[tonic::async_trait]
impl Agent for Talker {
    async fn invoke(&self, _ctx: Context, request: Envelope) -> Result<Envelope, Status> {
        Ok(request)
    }

    async fn converse(&self, _ctx: Context, mut conversation: Conversation) -> Result<(), Status> {
        while let Some(message) = conversation.recv().await {
            let payload = message.json_payload().unwrap_or_default();
            conversation
                .send(Envelope::json("talk.reply", json!({ "echo": payload })))
                .await?;
        }
        Ok(())
    }
}

#[tokio::test]
async fn converse_round_trips_many_messages_both_ways_concurrently() {
    let node = TestNode::start().await;
    let agent = start_agent(&node, card("talker"), Talker).await;
    let (sender, mut replies) = node
        .client()
        .converse("talker", Duration::from_millis(200))
        .await
        .unwrap();
    const N: u64 = 500;
    let writer = tokio::spawn(async move {
        for i in 0..N {
            sender
                .send(Envelope::json("talk", json!({ "i": i })))
                .await
                .unwrap();
        }
        // Dropping the sender half-closes our side; the agent then finishes.
    });
    let mut got = Vec::new();
    while let Some(reply) = replies.next().await {
        got.push(
            reply.unwrap().json_payload().unwrap()["echo"]["i"]
                .as_u64()
                .unwrap(),
        );
    }
    writer.await.unwrap();
    assert_eq!(
        got,
        (0..N).collect::<Vec<_>>(),
        "every message answered, in order"
    );
    agent.shutdown().await;
    node.stop().await;
}

#[tokio::test]
async fn a_silent_caller_is_detected_by_the_agent() {
    let node = TestNode::start().await;
    let agent = start_agent(&node, card("talker"), Talker).await;
    // A raw client that opens with a 100 ms heartbeat and then never speaks.
    let (frames, frames_rx) = tokio::sync::mpsc::channel(4);
    frames
        .send(ConverseRequest {
            frame: Some(converse_request::Frame::Open(ConverseOpen {
                target: "talker".into(),
                heartbeat_interval: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 100_000_000,
                }),
            })),
        })
        .await
        .unwrap();
    let mut responses = AgentServiceClient::new(node.channel().await)
        .converse(tokio_stream::wrappers::ReceiverStream::new(frames_rx))
        .await
        .unwrap()
        .into_inner();
    let started = std::time::Instant::now();
    let status = loop {
        match responses.message().await {
            Ok(Some(_heartbeat)) => continue,
            Ok(None) => panic!("ended without an error"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("silent"), "{}", status.message());
    assert!(started.elapsed() < Duration::from_secs(2));
    drop(frames);
    agent.shutdown().await;
    node.stop().await;
}

/// An AgentService that accepts conversations and then says nothing at all.
#[derive(Clone)]
struct Mute;

#[tonic::async_trait]
impl AgentService for Mute {
    async fn invoke(&self, _: Request<InvokeRequest>) -> Result<Response<InvokeResponse>, Status> {
        Err(Status::unimplemented(""))
    }

    type StreamStream = Pin<Box<dyn Stream<Item = Result<StreamResponse, Status>> + Send>>;

    async fn stream(
        &self,
        _: Request<StreamRequest>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        Err(Status::unimplemented(""))
    }

    type ConverseStream = Pin<Box<dyn Stream<Item = Result<ConverseResponse, Status>> + Send>>;

    async fn converse(
        &self,
        request: Request<Streaming<ConverseRequest>>,
    ) -> Result<Response<Self::ConverseStream>, Status> {
        let mut inbound = request.into_inner();
        // Keep reading (so the caller is not blocked) but never answer.
        tokio::spawn(async move { while let Ok(Some(_)) = inbound.message().await {} });
        Ok(Response::new(futures::stream::pending().boxed()))
    }
}

#[tokio::test]
async fn a_silent_agent_is_detected_by_the_caller() {
    let node = TestNode::start().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentServiceServer::new(Mute))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let mut mute_card = card("mute");
    mute_card.endpoint = format!("http://{address}");
    node.client()
        .discovery()
        .register(agentmesh_proto::v1::RegisterRequest {
            card: Some(mute_card),
            ttl: None,
        })
        .await
        .unwrap();
    let (sender, mut replies) = node
        .client()
        .converse("mute", Duration::from_millis(100))
        .await
        .unwrap();
    sender
        .send(Envelope::json("hello", json!({})))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(3), replies.next())
        .await
        .expect("silence is detected in time")
        .expect("an error, not the end of the stream");
    let status = outcome.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("silent"), "{}", status.message());
    assert!(started.elapsed() >= Duration::from_millis(250));
    node.stop().await;
}

#[tokio::test]
async fn heartbeats_keep_a_quiet_conversation_alive() {
    let node = TestNode::start().await;
    let agent = start_agent(&node, card("talker"), Talker).await;
    let (sender, mut replies) = node
        .client()
        .converse("talker", Duration::from_millis(50))
        .await
        .unwrap();
    // Quiet for many heartbeat intervals, then talk: still alive on both sides.
    tokio::time::sleep(Duration::from_millis(600)).await;
    sender
        .send(Envelope::json("talk", json!({"i": 1})))
        .await
        .unwrap();
    let reply = replies.next().await.unwrap().unwrap();
    assert_eq!(reply.json_payload().unwrap()["echo"]["i"], 1);
    drop(sender);
    assert!(
        replies.next().await.is_none(),
        "half-close ends the conversation cleanly"
    );
    agent.shutdown().await;
    node.stop().await;
}
