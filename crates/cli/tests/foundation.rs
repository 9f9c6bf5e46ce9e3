//! The foundation over real sockets: discovery, the unary path through the
//! node, correlation, deadlines, health, reflection and bad input.

mod common;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use agentmesh_proto::{
    metadata::CORRELATION_ID,
    v1::{
        AgentCard, AgentFilter, Envelope, InvokeRequest, LookupRequest, RegisterRequest,
        WatchEventKind, WatchRequest, agent_service_client::AgentServiceClient,
        discovery_service_client::DiscoveryServiceClient,
    },
};
use agentmesh_sdk::{Agent, CallOptions, Context};
use common::*;
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

#[tokio::test]
async fn deregister_on_shutdown_and_watch_sees_changes() {
    let node = TestNode::start().await;
    let mut discovery = DiscoveryServiceClient::new(node.channel().await);
    let mut watch = discovery
        .watch(WatchRequest {
            filter: Some(AgentFilter {
                name: "watched".into(),
                ..Default::default()
            }),
            include_existing: true,
        })
        .await
        .unwrap()
        .into_inner();
    let agent = start_agent(&node, card("watched"), Echo).await;
    let added = watch.message().await.unwrap().unwrap();
    assert_eq!(added.kind, WatchEventKind::Added as i32);
    agent.shutdown().await;
    let removed = watch.message().await.unwrap().unwrap();
    assert_eq!(removed.kind, WatchEventKind::Removed as i32);
    let left = node
        .client()
        .lookup(AgentFilter {
            name: "watched".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(left.is_empty(), "a shut-down agent deregisters");
    node.stop().await;
}

#[tokio::test]
async fn expired_lease_removes_the_agent() {
    let node = TestNode::start().await;
    let mut discovery = DiscoveryServiceClient::new(node.channel().await);
    // Register by hand and never heartbeat.
    let lease = discovery
        .register(RegisterRequest {
            card: Some(AgentCard {
                name: "ephemeral".into(),
                endpoint: "http://127.0.0.1:1".into(),
                ..Default::default()
            }),
            ttl: Some(prost_types::Duration {
                seconds: 0,
                nanos: 200_000_000,
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();
    let lookup = |d: &mut DiscoveryServiceClient<_>| {
        let mut d = d.clone();
        async move {
            d.lookup(LookupRequest {
                filter: Some(AgentFilter {
                    name: "ephemeral".into(),
                    ..Default::default()
                }),
            })
            .await
            .unwrap()
            .into_inner()
            .instances
            .len()
        }
    };
    assert_eq!(lookup(&mut discovery).await, 1);
    assert!(
        eventually(Duration::from_secs(2), || lookup(&mut discovery).then_is(0)).await,
        "the lapsed lease removes the instance"
    );
    let heartbeat = discovery
        .heartbeat(agentmesh_proto::v1::HeartbeatRequest {
            lease_id: lease.lease_id,
        })
        .await
        .unwrap_err();
    assert_eq!(heartbeat.code(), Code::NotFound);
    let error = node
        .client()
        .invoke("ephemeral", Envelope::json("x", json!({})))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::NotFound);
    node.stop().await;
}

/// `future.then_is(v)`: resolves to whether the output equals `v`.
trait ThenIs<T> {
    fn then_is(self, expected: T) -> impl std::future::Future<Output = bool>;
}

impl<T: PartialEq, F: std::future::Future<Output = T>> ThenIs<T> for F {
    async fn then_is(self, expected: T) -> bool {
        self.await == expected
    }
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

/// Records how much time it was given, then sleeps past it.
struct Slow {
    seen: Arc<Mutex<Option<Duration>>>,
}

#[tonic::async_trait]
impl Agent for Slow {
    async fn invoke(&self, ctx: Context, _request: Envelope) -> Result<Envelope, Status> {
        *self.seen.lock().unwrap() = ctx.remaining();
        tokio::time::sleep(Duration::from_secs(5)).await;
        Ok(Envelope::default())
    }
}

#[tokio::test]
async fn slow_agent_hits_the_deadline_and_saw_a_shorter_one() {
    let node = TestNode::start().await;
    let seen = Arc::new(Mutex::new(None));
    let agent = start_agent(&node, card("slow"), Slow { seen: seen.clone() }).await;
    let caller_timeout = Duration::from_millis(600);
    let started = std::time::Instant::now();
    let error = node
        .client()
        .invoke_with(
            "slow",
            Envelope::json("x", json!({})),
            CallOptions {
                timeout: Some(caller_timeout),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::DeadlineExceeded, "{error:?}");
    assert!(
        error.message().contains("slow"),
        "the error names the hop that ran out: {}",
        error.message()
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    let seen = seen.lock().unwrap().expect("the agent saw a deadline");
    assert!(
        seen < caller_timeout - Duration::from_millis(20),
        "agent deadline {seen:?} is strictly shorter than the caller's {caller_timeout:?}"
    );
    agent.shutdown().await;
    node.stop().await;
}

/// Calls `echo` from inside its handler and reports what `echo` saw.
struct Relay;

#[tonic::async_trait]
impl Agent for Relay {
    async fn invoke(&self, ctx: Context, _request: Envelope) -> Result<Envelope, Status> {
        let client = ctx
            .client()
            .expect("agents started with a node get a client");
        let inner = client
            .invoke("probe", Envelope::json("probe", json!({})))
            .await?;
        Ok(Envelope::json(
            "relay.reply",
            json!({
                "outer_remaining_ms": ctx.remaining().unwrap().as_millis() as u64,
                "inner": inner.json_payload(),
            }),
        ))
    }
}

/// Reports the correlation id and remaining time it was called with.
struct Probe;

#[tonic::async_trait]
impl Agent for Probe {
    async fn invoke(&self, ctx: Context, _request: Envelope) -> Result<Envelope, Status> {
        Ok(Envelope::json(
            "probe.reply",
            json!({
                "correlation_id": ctx.correlation_id(),
                "remaining_ms": ctx.remaining().unwrap().as_millis() as u64,
            }),
        ))
    }
}

#[tokio::test]
async fn calls_from_a_handler_inherit_correlation_and_a_shorter_deadline() {
    let node = TestNode::start().await;
    let relay = start_agent(&node, card("relay"), Relay).await;
    let probe = start_agent(&node, card("probe"), Probe).await;
    let mut request = Envelope::json("go", json!({}));
    request.correlation_id = "chain-1".into();
    let reply = node
        .client()
        .invoke_with(
            "relay",
            request,
            CallOptions {
                timeout: Some(Duration::from_secs(5)),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let payload = reply.json_payload().unwrap();
    assert_eq!(payload["inner"]["correlation_id"], "chain-1");
    let outer = payload["outer_remaining_ms"].as_u64().unwrap();
    let inner = payload["inner"]["remaining_ms"].as_u64().unwrap();
    assert!(
        outer < 5000,
        "relay saw less than the caller's 5 s: {outer}"
    );
    assert!(
        inner < outer,
        "probe ({inner} ms) saw less than relay ({outer} ms)"
    );
    relay.shutdown().await;
    probe.shutdown().await;
    node.stop().await;
}

#[tokio::test]
async fn health_check_is_serving() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let node = TestNode::start().await;
    let mut health = HealthClient::new(node.channel().await);
    for service in [
        "",
        "agentmesh.v1.AgentService",
        "agentmesh.v1.DiscoveryService",
    ] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "service {service:?}");
    }
    node.stop().await;
}

#[tokio::test]
async fn reflection_lists_the_services_in_v1_and_v1alpha() {
    use futures::StreamExt;
    let node = TestNode::start().await;
    let channel = node.channel().await;

    let mut v1alpha =
        tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient::new(
            channel.clone(),
        );
    let request = tonic_reflection::pb::v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            ),
        ),
    };
    let mut responses = v1alpha
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    let Some(tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection response");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "agentmesh.v1.AgentService",
        "agentmesh.v1.DiscoveryService",
        "agentmesh.v1.QueueService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }

    let mut v1 =
        tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(channel);
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1::server_reflection_request::MessageRequest::FileContainingSymbol(
                "agentmesh.v1.AgentService".into(),
            ),
        ),
    };
    let mut responses = v1
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    assert!(matches!(
        response.message_response,
        Some(tonic_reflection::pb::v1::server_reflection_response::MessageResponse::FileDescriptorResponse(_))
    ));
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
    assert_eq!(error.code(), Code::OutOfRange, "{error:?}");

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

#[tokio::test]
async fn restarted_node_sees_the_agent_register_again() {
    let node = TestNode::start().await;
    let address = node.address;
    let agent =
        start_agent_with_ttl(&node, card("survivor"), Echo, Duration::from_millis(300)).await;
    assert_eq!(agent.registration().count, 1);
    node.stop().await;

    let node = TestNode::start_with(test_config(), address).await;
    let client = node.client();
    let back = eventually(Duration::from_secs(3), || {
        let client = client.clone();
        async move {
            client
                .lookup(AgentFilter {
                    name: "survivor".into(),
                    ..Default::default()
                })
                .await
                .map(|found| found.len() == 1)
                .unwrap_or(false)
        }
    })
    .await;
    assert!(back, "the agent registered again with the restarted node");
    assert!(agent.registration().count >= 2);
    let reply = client
        .invoke("survivor", Envelope::json("x", json!({"n": 1})))
        .await
        .unwrap();
    assert_eq!(reply.json_payload(), Some(json!({"n": 1})));
    agent.shutdown().await;
    node.stop().await;
}

#[tokio::test]
async fn connections_to_departed_agents_are_closed() {
    let node = TestNode::start().await;
    let agent = start_agent(&node, card("echo"), Echo).await;
    node.client()
        .invoke("echo", Envelope::json("x", json!({})))
        .await
        .unwrap();
    let connections = || async {
        let metrics = reqwest::get(format!("http://{}/metrics", node.addr()))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("agentmesh_agent_connections "))
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap()
    };
    assert_eq!(connections().await, 1);
    agent.shutdown().await;
    assert!(
        eventually(Duration::from_secs(2), || async {
            connections().await == 0
        })
        .await,
        "the node dropped its connection to the deregistered agent"
    );
    node.stop().await;
}
