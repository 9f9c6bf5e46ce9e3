//! Unary calls through the node over real sockets: routing by name, skill and
//! payload version, correlation ids at the edge, idempotency keys, load shedding,
//! and malformed input that leaves the node serving.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use agentmesh_node::{NodeConfig, RouterConfig};
use agentmesh_proto::{
    metadata::CORRELATION_ID,
    v1::{
        AgentCard, AgentFilter, Envelope, InvokeRequest, PayloadType, RegisterRequest, Skill,
        agent_service_client::AgentServiceClient, discovery_service_client::DiscoveryServiceClient,
    },
};
use agentmesh_sdk::{Agent, CallOptions, Context};
use agentmesh_tests::{Controlled, Echo, TestNode, card, start_agent, test_config};
use serde_json::json;
use tonic::{Code, Request, Status};

#[tokio::test]
async fn register_lookup_invoke_echoes_correlation_id() {
    let node = TestNode::start().await;
    let agent = start_agent(&node, card("echo"), Echo).await;

    let found = node
        .client()
        .lookup(AgentFilter {
            name: "echo".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    let card = found[0].card.as_ref().unwrap();
    assert_eq!(card.endpoint, agent.card().endpoint);
    assert!(found[0].lease.as_ref().unwrap().expires_at.is_some());

    let mut client = AgentServiceClient::new(node.channel().await);
    let mut request = Request::new(InvokeRequest {
        envelope: Some(Envelope::json("echo.request", json!({"text": "hello"})).to("echo")),
    });
    request
        .metadata_mut()
        .insert(CORRELATION_ID, "corr-123".parse().unwrap());
    let response = client.invoke(request).await.unwrap();
    assert_eq!(
        response.metadata().get(CORRELATION_ID).unwrap(),
        "corr-123",
        "the node echoes the caller's correlation id"
    );
    let reply = response.into_inner().envelope.unwrap();
    assert_eq!(reply.json_payload(), Some(json!({"text": "hello"})));
    assert_eq!(reply.correlation_id, "corr-123");
    assert_eq!(reply.source, "echo");
    assert!(
        !reply.causation_id.is_empty(),
        "reply names the request as its cause"
    );

    // Without a correlation id the node generates one and echoes it.
    let response = client
        .invoke(InvokeRequest {
            envelope: Some(Envelope::json("echo.request", json!({})).to("skill:echo-skill")),
        })
        .await
        .unwrap();
    let generated = response
        .metadata()
        .get(CORRELATION_ID)
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert!(!generated.is_empty());
    assert_eq!(
        response.into_inner().envelope.unwrap().correlation_id,
        generated
    );

    agent.shutdown().await;
    node.stop().await;
}

/// An agent's replies are not held back by Nagle's algorithm: with TCP_NODELAY off on the
/// agent's side, each call at one in flight waits out the caller's delayed ACK (about 40 ms).
#[tokio::test]
async fn sequential_calls_do_not_wait_for_delayed_acks() {
    let node = TestNode::start().await;
    let agent = start_agent(&node, card("echo"), Echo).await;
    // 256 bytes, as in the unary section of the mesh bench: a tiny payload may not show the stall.
    let text = "x".repeat(256);
    let call = || InvokeRequest {
        envelope: Some(Envelope::json("echo.request", json!({ "text": text })).to("echo")),
    };
    let direct = tonic::transport::Endpoint::from_shared(agent.card().endpoint.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    for (path, channel) in [
        ("direct", direct),
        ("through the node", node.channel().await),
    ] {
        let mut client = AgentServiceClient::new(channel);
        client.invoke(call()).await.unwrap();
        let calls = 40;
        let started = std::time::Instant::now();
        for _ in 0..calls {
            client.invoke(call()).await.unwrap();
        }
        let elapsed = started.elapsed();
        // 40 stalls of 40 ms would take 1.6 s; a healthy debug build takes a few ms per call.
        assert!(
            elapsed < Duration::from_secs(1),
            "{calls} sequential calls {path} took {elapsed:?}"
        );
    }
    agent.shutdown().await;
    node.stop().await;
}

#[tokio::test]
async fn unknown_target_is_not_found_and_names_it() {
    let node = TestNode::start().await;
    let error = node
        .client()
        .invoke("no-such-agent", Envelope::json("x", json!({})))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::NotFound);
    assert!(
        error.message().contains("no-such-agent"),
        "message names the target: {}",
        error.message()
    );
    node.stop().await;
}

/// Replies with the version it is.
struct Versioned(&'static str);

#[tonic::async_trait]
impl Agent for Versioned {
    async fn invoke(&self, _ctx: Context, _request: Envelope) -> Result<Envelope, Status> {
        Ok(Envelope::json(
            "translate.reply",
            json!({ "served_by": self.0 }),
        ))
    }
}

#[tokio::test]
async fn versions_route_only_to_instances_that_accept_them() {
    let node = TestNode::start().await;
    let mut agents = Vec::new();
    for version in ["1", "2"] {
        let mut card = card("translate");
        card.skills = vec![Skill {
            id: "translate".into(),
            accepts: vec![PayloadType {
                r#type: "translate.request".into(),
                versions: vec![version.into()],
            }],
            ..Default::default()
        }];
        agents.push(start_agent(&node, card, Versioned(version)).await);
    }
    let client = node.client();
    for version in ["1", "2"] {
        for _ in 0..10 {
            let mut request = Envelope::json("translate.request", json!({}));
            request.type_version = version.into();
            let reply = client.invoke("translate", request).await.unwrap();
            assert_eq!(reply.json_payload().unwrap()["served_by"], version);
        }
    }
    let mut request = Envelope::json("translate.request", json!({}));
    request.type_version = "3".into();
    let error = client.invoke("translate", request).await.unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition);
    assert!(
        error.message().contains("[1, 2]"),
        "names the versions on offer: {}",
        error.message()
    );
    for agent in agents {
        agent.shutdown().await;
    }
    node.stop().await;
}

#[tokio::test]
async fn duplicate_idempotent_invokes_call_the_agent_once() {
    let node = TestNode::start().await;
    let counter = Controlled::default();
    let running = start_agent(&node, card("once"), counter.clone()).await;
    let client = node.client();
    let options = CallOptions {
        idempotency_key: Some("order-42".into()),
        ..Default::default()
    };
    let concurrent: Vec<_> = (0..5)
        .map(|i| {
            let client = client.clone();
            let options = options.clone();
            tokio::spawn(async move {
                client
                    .invoke_with("once", Envelope::json("x", json!({ "i": i })), options)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut replies = Vec::new();
    for call in concurrent {
        replies.push(call.await.unwrap());
    }
    let later = client
        .invoke_with("once", Envelope::json("x", json!({ "i": 99 })), options)
        .await
        .unwrap();
    replies.push(later);
    assert_eq!(
        counter.calls.load(Ordering::SeqCst),
        1,
        "the agent ran once"
    );
    assert!(
        replies.iter().all(|r| r.id == replies[0].id),
        "every duplicate got the first response"
    );
    // Another key runs again.
    client
        .invoke_with(
            "once",
            Envelope::json("x", json!({})),
            CallOptions {
                idempotency_key: Some("order-43".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(counter.calls.load(Ordering::SeqCst), 2);
    running.shutdown().await;
    node.stop().await;
}

/// Holds each call for a while and tracks the peak concurrency it saw.
#[derive(Clone, Default)]
struct Busy {
    current: Arc<AtomicU32>,
    peak: Arc<AtomicU32>,
}

#[tonic::async_trait]
impl Agent for Busy {
    async fn invoke(&self, _ctx: Context, _request: Envelope) -> Result<Envelope, Status> {
        let now = self.current.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.current.fetch_sub(1, Ordering::SeqCst);
        Ok(Envelope::default())
    }
}

#[tokio::test]
async fn overload_is_shed_with_resource_exhausted() {
    let node = TestNode::start_with(NodeConfig {
        router: RouterConfig {
            max_in_flight_per_instance: 4,
            max_in_flight: 6,
            ..Default::default()
        },
        ..test_config()
    })
    .await;
    let busy = Busy::default();
    let running = start_agent(&node, card("busy"), busy.clone()).await;
    let client = node.client_without_breakers();
    let calls: Vec<_> = (0..40)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.invoke("busy", Envelope::json("x", json!({}))).await })
        })
        .collect();
    let mut ok = 0;
    let mut shed = 0;
    for call in calls {
        match call.await.unwrap() {
            Ok(_) => ok += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                shed += 1;
            }
        }
    }
    assert!(ok >= 4, "{ok} served");
    assert!(shed >= 30, "{shed} shed instead of queued");
    assert!(
        busy.peak.load(Ordering::SeqCst) <= 4,
        "per-instance limit held"
    );
    running.shutdown().await;
    node.stop().await;
}

/// Sends raw bytes as a gRPC message.
#[derive(Debug, Clone, Default)]
struct RawCodec;

#[derive(Debug)]
struct RawCoder;

impl tonic::codec::Encoder for RawCoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        use bytes::Buf;
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCoder;
    type Decoder = RawCoder;
    fn encoder(&mut self) -> RawCoder {
        RawCoder
    }
    fn decoder(&mut self) -> RawCoder {
        RawCoder
    }
}

#[tokio::test]
async fn malformed_requests_are_invalid_argument_and_the_node_keeps_serving() {
    let node = TestNode::start().await;
    let agent = start_agent(&node, card("echo"), Echo).await;
    let channel = node.channel().await;

    // Bytes that are not a protobuf message at all.
    let mut raw = tonic::client::Grpc::new(channel.clone());
    raw.ready().await.unwrap();
    let error = raw
        .unary(
            Request::new(vec![0xff, 0xff, 0xff, 0xff, 0x0f]),
            http::uri::PathAndQuery::from_static("/agentmesh.v1.AgentService/Invoke"),
            RawCodec,
        )
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument, "{error:?}");
    assert!(error.message().contains("malformed"), "{}", error.message());

    let mut agents = AgentServiceClient::new(channel.clone());
    let missing_envelope = agents
        .invoke(InvokeRequest { envelope: None })
        .await
        .unwrap_err();
    assert_eq!(missing_envelope.code(), Code::InvalidArgument);
    let missing_target = agents
        .invoke(InvokeRequest {
            envelope: Some(Envelope::json("x", json!({}))),
        })
        .await
        .unwrap_err();
    assert_eq!(missing_target.code(), Code::InvalidArgument);
    assert!(missing_target.message().contains("target"));

    let mut discovery = DiscoveryServiceClient::new(channel.clone());
    for card in [
        AgentCard::default(),
        AgentCard {
            name: "no-endpoint".into(),
            ..Default::default()
        },
        AgentCard {
            name: "bad-endpoint".into(),
            endpoint: "not a uri".into(),
            ..Default::default()
        },
    ] {
        let error = discovery
            .register(RegisterRequest {
                card: Some(card),
                ttl: None,
            })
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{error:?}");
    }

    // Oversized messages are refused without taking the node down.
    let huge = Envelope::json("x", json!({"blob": "a".repeat(5 * 1024 * 1024)})).to("echo");
    let error = AgentServiceClient::new(channel.clone())
        .max_encoding_message_size(usize::MAX)
        .invoke(InvokeRequest {
            envelope: Some(huge),
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::ResourceExhausted, "{error:?}");

    // Still serving.
    let reply = node
        .client()
        .invoke("echo", Envelope::json("x", json!({"still": "up"})))
        .await
        .unwrap();
    assert_eq!(reply.json_payload(), Some(json!({"still": "up"})));
    agent.shutdown().await;
    node.stop().await;
}
