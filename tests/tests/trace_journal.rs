//! The trace journal over real sockets: every hop of a chain (lookup, unary, fan-out,
//! stream, submit, delivery) is recorded under its correlation id, read back over gRPC as
//! hops and over HTTP as a tree, followed as it happens, bounded, and off when configured.

use std::time::Duration;

use agentmesh_node::NodeConfig;
use agentmesh_proto::v1::{AgentFilter, Envelope, FanOutPolicy, FanOutRequest};
use agentmesh_sdk::MeshClient;
use agentmesh_tests::{
    Echo, Streamer, TestNode, card, expect_gateway_error, http_client,
    queue::{RawConsumer, queue_config},
    start_agent, test_config,
};
use futures::StreamExt;
use serde_json::{Value, json};
use tonic::Code;

fn in_chain(correlation_id: &str, envelope: Envelope) -> Envelope {
    Envelope {
        correlation_id: correlation_id.into(),
        ..envelope
    }
}

#[tokio::test]
async fn every_hop_of_a_chain_is_recorded_and_read_back_as_a_tree() {
    let node = TestNode::start_with(NodeConfig {
        store: agentmesh_node::StoreSettings {
            node_id: "node-1".into(),
            ..Default::default()
        },
        ..queue_config()
    })
    .await;
    let _echo = start_agent(&node, card("echo"), Echo).await;
    let _counter = start_agent(&node, card("counter"), Streamer).await;
    let client = MeshClient::connect_lazy(&node.addr()).unwrap();
    let chain = "chain-1";

    // A lookup carries its correlation id as metadata.
    let mut lookup = tonic::Request::new(agentmesh_proto::v1::LookupRequest {
        filter: Some(AgentFilter {
            name: "echo".into(),
            ..Default::default()
        }),
    });
    lookup
        .metadata_mut()
        .insert("x-correlation-id", chain.parse().unwrap());
    client.discovery().lookup(lookup).await.unwrap();
    let request = in_chain(chain, Envelope::json("t", json!({ "hi": 1 })));
    let reply = client.invoke("echo", request).await.unwrap();
    assert_eq!(reply.correlation_id, chain);
    let fanned = client
        .fan_out(FanOutRequest {
            envelope: Some(in_chain(chain, Envelope::json("t", json!({})))),
            targets: vec!["echo".into(), "counter".into()],
            policy: FanOutPolicy::All as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(fanned.satisfied);
    let events = client
        .stream(
            "counter",
            in_chain(chain, Envelope::json("t", json!({ "n": 2 }))),
        )
        .await
        .unwrap();
    assert!(events.count().await >= 3);
    let submitted = client
        .submit("jobs", [in_chain(chain, Envelope::json("job", json!({})))])
        .await
        .unwrap();
    let job_id = submitted.outcomes[0].message_id.clone();
    let mut consumer = RawConsumer::open(&node, "jobs", 1, Duration::from_secs(30)).await;
    let delivery = consumer.delivery(Duration::from_secs(5)).await.unwrap();
    assert_eq!(delivery.envelope.unwrap().id, job_id);
    // Another chain's hop stays out of this one.
    client
        .invoke("echo", in_chain("chain-2", Envelope::json("t", json!({}))))
        .await
        .unwrap();

    let hops = client.trace(chain).await.unwrap();
    let count = |style: &str| hops.iter().filter(|h| h.style == style).count();
    assert_eq!(count("lookup"), 1);
    assert_eq!(count("unary"), 3, "the invoke and the fan-out's two calls");
    assert_eq!(count("fanout"), 1);
    assert_eq!(count("stream"), 1);
    assert_eq!(count("submit"), 1);
    assert_eq!(count("deliver"), 1);
    assert!(
        hops.iter()
            .all(|h| h.correlation_id == chain && h.node == "node-1")
    );
    assert!(hops.iter().all(|h| h.code == "OK"), "{hops:?}");
    let fanout = hops.iter().find(|h| h.style == "fanout").unwrap();
    assert_eq!(fanout.to, "echo,counter");
    let under_fanout = hops
        .iter()
        .filter(|h| h.causation_id == fanout.envelope_id)
        .count();
    assert_eq!(
        under_fanout, 2,
        "each target's hop names the fan-out as its cause"
    );
    let delivered = hops.iter().find(|h| h.style == "deliver").unwrap();
    assert_eq!(delivered.envelope_id, job_id);
    assert_eq!(delivered.from, "queue:jobs");
    assert!(delivered.to.starts_with("raw-"));
    let submit = hops.iter().find(|h| h.style == "submit").unwrap();
    assert_eq!(submit.to, "queue:jobs");
    let unary = hops.iter().find(|h| h.style == "unary").unwrap();
    assert!(unary.to.starts_with("echo/"));
    assert!(unary.duration.is_some() && unary.started_at.is_some());

    // Over HTTP: the same hops as a tree.
    let http = http_client();
    let tree: Value = http
        .get(format!("{}/v1/traces/{chain}", node.http_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(tree["correlationId"], chain);
    assert_eq!(tree["hops"], hops.len());
    let roots = tree["roots"].as_array().unwrap();
    let fanout_node = roots
        .iter()
        .find(|r| r["style"] == "fanout")
        .expect("the fan-out is a root");
    assert_eq!(fanout_node["children"].as_array().unwrap().len(), 2);
    let submit_node = roots.iter().find(|r| r["style"] == "submit").unwrap();
    assert_eq!(
        submit_node["children"][0]["style"], "deliver",
        "a delivery hangs under its submit"
    );
    assert!(tree["durationMs"].as_f64().unwrap() > 0.0);

    let missing = http
        .get(format!("{}/v1/traces/no-such-chain", node.http_url()))
        .send()
        .await
        .unwrap();
    expect_gateway_error(missing, 404, "NOT_FOUND").await;
    let status = client.trace("no-such-chain").await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

#[tokio::test]
async fn a_follower_sees_hops_as_they_are_recorded() {
    let node = TestNode::start().await;
    let _echo = start_agent(&node, card("echo"), Echo).await;
    let client = MeshClient::connect_lazy(&node.addr()).unwrap();
    client
        .invoke(
            "echo",
            in_chain("followed", Envelope::json("t", json!({ "n": 1 }))),
        )
        .await
        .unwrap();
    let mut follow = client.follow_trace("followed").await.unwrap();
    let first = follow.next().await.unwrap().unwrap();
    assert_eq!(first.style, "unary");
    let sent = in_chain("followed", Envelope::json("t", json!({ "n": 2 })));
    let second_id = client.invoke("echo", sent).await.unwrap().causation_id;
    let second = tokio::time::timeout(Duration::from_secs(5), follow.next())
        .await
        .expect("the new hop arrives")
        .unwrap()
        .unwrap();
    assert_eq!(second.envelope_id, second_id);
}

#[tokio::test]
async fn a_node_with_the_journal_off_records_nothing_and_says_so() {
    let mut config = test_config();
    config.trace.journal = false;
    let node = TestNode::start_with(config).await;
    let _echo = start_agent(&node, card("echo"), Echo).await;
    let client = MeshClient::connect_lazy(&node.addr()).unwrap();
    client
        .invoke("echo", in_chain("off", Envelope::json("t", json!({}))))
        .await
        .unwrap();
    let status = client.trace("off").await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("trace.journal"), "{status:?}");
}
