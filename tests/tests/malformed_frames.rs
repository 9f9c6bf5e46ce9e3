//! Frames the node cannot read, sent raw over a real gRPC connection: a malformed frame
//! after a valid first one ends `Consume`, `Converse` and `Submit` with INVALID_ARGUMENT,
//! an oversized one with RESOURCE_EXHAUSTED, and an oversized unary request is
//! RESOURCE_EXHAUSTED too — never a silent OK.

use std::{marker::PhantomData, time::Duration};

use agentmesh_proto::v1::{
    ConsumeRequest, ConsumeResponse, ConsumeSubscribe, ConverseOpen, ConverseRequest,
    ConverseResponse, Envelope, InvokeRequest, SubmitRequest, SubmitResponse,
    agent_service_client::AgentServiceClient, consume_request, converse_request,
};
use agentmesh_sdk::{Agent, Context, Conversation};
use agentmesh_tests::{TestNode, card, queue::job, start_agent};
use bytes::{BufMut, Bytes};
use futures::StreamExt;
use prost::Message;
use tonic::{
    Code, Status,
    client::Grpc,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    transport::Channel,
};

/// Sends each frame's bytes as they are; reads the node's frames as `T`.
struct RawCodec<T>(PhantomData<T>);

impl<T> Default for RawCodec<T> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

struct RawEncoder;

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

struct ProtoDecoder<T>(PhantomData<T>);

impl<T: Message + Default> Decoder for ProtoDecoder<T> {
    type Item = T;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<T>, Status> {
        T::decode(src)
            .map(Some)
            .map_err(|e| Status::internal(e.to_string()))
    }
}

impl<T: Message + Default + Send + 'static> Codec for RawCodec<T> {
    type Encode = Bytes;
    type Decode = T;
    type Encoder = RawEncoder;
    type Decoder = ProtoDecoder<T>;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> ProtoDecoder<T> {
        ProtoDecoder(PhantomData)
    }
}

/// Bytes no protobuf decoder accepts: field 0 is not a field.
fn malformed() -> Bytes {
    Bytes::from_static(&[
        0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    ])
}

/// A frame of `mib` MiB, over the node's 4 MiB limit.
fn oversized(mib: usize) -> Bytes {
    Bytes::from(vec![0u8; mib * 1024 * 1024])
}

async fn grpc(node: &TestNode) -> Grpc<Channel> {
    Grpc::new(node.channel().await).max_encoding_message_size(usize::MAX)
}

/// Opens a bidi call at `path` with `frames`, and returns how the node ended it.
async fn bidi_outcome<T: Message + Default + Send + 'static>(
    node: &TestNode,
    path: &'static str,
    frames: Vec<Bytes>,
) -> Status {
    let mut client = grpc(node).await;
    client.ready().await.unwrap();
    // Keep the request stream open, so only the node can end the call.
    let frames = futures::stream::iter(frames).chain(futures::stream::pending());
    let mut responses = match client
        .streaming(
            tonic::Request::new(frames),
            http::uri::PathAndQuery::from_static(path),
            RawCodec::<T>::default(),
        )
        .await
    {
        Ok(response) => response.into_inner(),
        Err(status) => return status,
    };
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match responses.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return Status::ok("the call ended with OK"),
                Err(status) => return status,
            }
        }
    });
    ended.await.expect("the node did not end the call")
}

fn subscribe(queue: &str) -> Bytes {
    ConsumeRequest {
        action: Some(consume_request::Action::Subscribe(ConsumeSubscribe {
            queue: queue.into(),
            prefetch: 1,
            ..Default::default()
        })),
    }
    .encode_to_vec()
    .into()
}

fn open(target: &str) -> Bytes {
    ConverseRequest {
        frame: Some(converse_request::Frame::Open(ConverseOpen {
            target: target.into(),
            ..Default::default()
        })),
    }
    .encode_to_vec()
    .into()
}

/// Replies to every message.
struct Talker;

#[tonic::async_trait]
impl Agent for Talker {
    async fn invoke(&self, _ctx: Context, request: Envelope) -> Result<Envelope, Status> {
        Ok(request)
    }

    async fn converse(&self, _ctx: Context, mut conversation: Conversation) -> Result<(), Status> {
        while let Some(message) = conversation.recv().await {
            conversation.send(message).await?;
        }
        Ok(())
    }
}

const CONSUME: &str = "/agentmesh.v1.QueueService/Consume";
const CONVERSE: &str = "/agentmesh.v1.AgentService/Converse";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_consume_frame_after_subscribe_is_invalid_argument() {
    let node = TestNode::start().await;
    let status =
        bidi_outcome::<ConsumeResponse>(&node, CONSUME, vec![subscribe("raw"), malformed()]).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("decode"), "{status:?}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_consume_frame_is_resource_exhausted() {
    let node = TestNode::start().await;
    let status =
        bidi_outcome::<ConsumeResponse>(&node, CONSUME, vec![subscribe("raw"), oversized(8)]).await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_converse_frame_after_open_is_invalid_argument() {
    let node = TestNode::start().await;
    let _agent = start_agent(&node, card("talker"), Talker).await;
    let status =
        bidi_outcome::<ConverseResponse>(&node, CONVERSE, vec![open("talker"), malformed()]).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("decode"), "{status:?}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_converse_frames_are_resource_exhausted() {
    let node = TestNode::start().await;
    let _agent = start_agent(&node, card("talker"), Talker).await;
    for mib in [8, 64] {
        let status =
            bidi_outcome::<ConverseResponse>(&node, CONVERSE, vec![open("talker"), oversized(mib)])
                .await;
        assert_eq!(
            status.code(),
            Code::ResourceExhausted,
            "{mib} MiB: {status:?}"
        );
        assert!(status.message().contains("size limit"), "{status:?}");
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_submit_frame_is_invalid_argument() {
    let node = TestNode::start().await;
    let mut client = grpc(&node).await;
    client.ready().await.unwrap();
    let valid: Bytes = SubmitRequest {
        queue: "raw".into(),
        envelope: Some(Box::new(job(1))),
        ..Default::default()
    }
    .encode_to_vec()
    .into();
    let frames = futures::stream::iter([valid, malformed()]);
    let status = client
        .client_streaming::<_, Bytes, SubmitResponse, _>(
            tonic::Request::new(frames),
            http::uri::PathAndQuery::from_static("/agentmesh.v1.QueueService/Submit"),
            RawCodec::<SubmitResponse>::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_unary_request_is_resource_exhausted() {
    let node = TestNode::start().await;
    let mut client = AgentServiceClient::new(node.channel().await);
    let big = Envelope {
        target: "echo".into(),
        payload: Some(agentmesh_proto::v1::envelope::Payload::Binary(
            vec![7u8; 8 * 1024 * 1024],
        )),
        ..Default::default()
    };
    let status = client
        .invoke(InvokeRequest {
            envelope: Some(big),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("size limit"), "{status:?}");
    node.stop().await;
}
