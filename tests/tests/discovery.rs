//! Discovery over real sockets: `Watch` sees agents come and go, a lapsed lease
//! removes its instance, an agent registers again with a restarted node, and the
//! node closes its connections to agents that left.

use std::time::Duration;

use agentmesh_proto::v1::{
    AgentCard, AgentFilter, Envelope, LookupRequest, RegisterRequest, WatchEventKind, WatchRequest,
    discovery_service_client::DiscoveryServiceClient,
};
use agentmesh_tests::{
    Echo, TestNode, card, eventually, start_agent, start_agent_with_ttl, test_config,
};
use serde_json::json;
use tonic::Code;

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
async fn restarted_node_sees_the_agent_register_again() {
    let node = TestNode::start().await;
    let address = node.address;
    let agent =
        start_agent_with_ttl(&node, card("survivor"), Echo, Duration::from_millis(300)).await;
    assert_eq!(agent.registration().count, 1);
    node.stop().await;

    let node = TestNode::start_at(test_config(), address).await;
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
