//! Bounds on calls in flight, over real sockets: unary calls and long-lived ones (server
//! streams and conversations) are bounded apart, per instance and node-wide, so idle
//! conversations cannot starve short calls; a refusal names the bound that was hit.

use std::time::Duration;

use agentmesh_node::{NodeConfig, RouterConfig};
use agentmesh_proto::v1::{AgentFilter, Envelope};
use agentmesh_sdk::{Agent, Context, Conversation, ConversationSender, ConversationStream};
use agentmesh_tests::{TestNode, card, start_agent, test_config};
use serde_json::json;
use tonic::{Code, Status};

/// Answers invokes with their payload and keeps every conversation open, silent, until its
/// caller half-closes.
struct Idle;

#[tonic::async_trait]
impl Agent for Idle {
    async fn invoke(&self, _ctx: Context, request: Envelope) -> Result<Envelope, Status> {
        Ok(request)
    }

    async fn converse(&self, _ctx: Context, mut conversation: Conversation) -> Result<(), Status> {
        while conversation.recv().await.is_some() {}
        Ok(())
    }
}

fn node_config(
    unary_per_instance: u32,
    long_lived_per_instance: u32,
    long_lived: usize,
) -> NodeConfig {
    NodeConfig {
        router: RouterConfig {
            max_in_flight_per_instance: unary_per_instance,
            max_long_lived_per_instance: long_lived_per_instance,
            max_long_lived: long_lived,
            ..Default::default()
        },
        ..test_config()
    }
}

/// Opens `count` idle conversations with `target`, all held open by the returned halves.
async fn open_conversations(
    node: &TestNode,
    target: &str,
    count: usize,
) -> Vec<(ConversationSender, ConversationStream)> {
    let client = node.client();
    let mut open = Vec::new();
    for i in 0..count {
        let conversation = client
            .converse(target, Duration::from_secs(1))
            .await
            .unwrap_or_else(|status| panic!("conversation {i}: {status:?}"));
        open.push(conversation);
    }
    open
}

async fn in_flight(node: &TestNode, name: &str) -> u32 {
    node.client()
        .lookup(AgentFilter {
            name: name.into(),
            ..Default::default()
        })
        .await
        .unwrap()[0]
        .in_flight
}

#[tokio::test]
async fn idle_conversations_leave_room_for_unary_calls() {
    // The unary bound is the size of the conversations' crowd: on one shared bound, the
    // conversations alone would fill it.
    let node = TestNode::start_with(node_config(8, 8, 100)).await;
    let _agent = start_agent(&node, card("idle"), Idle).await;
    let _open = open_conversations(&node, "idle", 8).await;
    assert_eq!(
        in_flight(&node, "idle").await,
        8,
        "the conversations are in flight"
    );

    let reply = node
        .client()
        .invoke("idle", Envelope::json("x", json!({"n": 1})))
        .await
        .expect("a unary call gets through while conversations fill their bound");
    assert_eq!(reply.json_payload().unwrap()["n"], 1);
    let started = node
        .client()
        .stream("idle", Envelope::json("x", json!({})))
        .await;
    let refused = started
        .map(drop)
        .expect_err("a stream is long-lived too: over its bound");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
}

#[tokio::test]
async fn the_long_lived_bounds_refuse_naming_themselves() {
    // Per instance.
    let node = TestNode::start_with(node_config(1, 4, 100)).await;
    let _agent = start_agent(&node, card("idle"), Idle).await;
    let _open = open_conversations(&node, "idle", 4).await;
    let refused = node
        .client()
        .converse("idle", Duration::from_secs(1))
        .await
        .map(drop)
        .expect_err("a fifth conversation is over the per-instance bound");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("router.max_long_lived_per_instance"),
        "{refused:?}"
    );
    node.client()
        .invoke("idle", Envelope::json("x", json!({})))
        .await
        .expect("unary calls are not held back");

    // Node-wide, across two agents.
    let node = TestNode::start_with(node_config(1, 100, 3)).await;
    let _first = start_agent(&node, card("idle"), Idle).await;
    let _second = start_agent(&node, card("other"), Idle).await;
    let open = open_conversations(&node, "idle", 3).await;
    let refused = node
        .client()
        .converse("other", Duration::from_secs(1))
        .await
        .map(drop)
        .expect_err("the node's bound on long-lived calls is reached");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("router.max_long_lived)"),
        "{refused:?}"
    );
    node.client()
        .invoke("other", Envelope::json("x", json!({})))
        .await
        .expect("unary calls have a bound of their own");
    // Closing conversations gives their places back.
    drop(open);
    let reopened = async {
        loop {
            match node
                .client()
                .converse("other", Duration::from_secs(1))
                .await
            {
                Ok(conversation) => return conversation,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), reopened)
        .await
        .expect("a closed conversation frees its place");
}
