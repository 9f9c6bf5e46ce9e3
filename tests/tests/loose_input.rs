//! Loose input refused at the edge, with short errors: agent, skill and queue names outside
//! the one name rule, a malformed `X-Timeout-Ms`, and a submit body with a duplicate key.

use agentmesh_proto::v1::{RegisterRequest, discovery_service_client::DiscoveryServiceClient};
use agentmesh_tests::{TestNode, card, http_client};
use serde_json::{Value, json};
use tonic::Code;

/// A card that registers as it is, named `name`.
fn card_named(name: &str) -> agentmesh_proto::v1::AgentCard {
    agentmesh_proto::v1::AgentCard {
        endpoint: "http://127.0.0.1:9".into(),
        ..card(name)
    }
}

fn bad_names() -> Vec<String> {
    vec![
        "a".repeat(100_000),
        "nul\0name".into(),
        "bell\u{7}".into(),
        "../etc".into(),
        "with space".into(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_refuses_names_outside_the_rule_briefly() {
    let node = TestNode::start().await;
    let mut discovery =
        DiscoveryServiceClient::new(node.channel().await).max_decoding_message_size(usize::MAX);
    // The same card with a good name registers.
    discovery
        .register(RegisterRequest {
            card: Some(card_named("fine-name")),
            ..Default::default()
        })
        .await
        .unwrap();
    for name in bad_names() {
        let status = discovery
            .register(RegisterRequest {
                card: Some(card_named(&name)),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{:.60}", name);
        assert!(status.message().len() < 300, "{}", status.message().len());
        let mut skilled = card_named("fine-name");
        skilled.skills[0].id = name.clone();
        let status = discovery
            .register(RegisterRequest {
                card: Some(skilled),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invoking_a_name_outside_the_rule_is_a_short_400() {
    let node = TestNode::start().await;
    let http = http_client();
    // As long as a URL may be; over gRPC below, 100k characters.
    let long_path = "a".repeat(10_000);
    for target in [long_path.as_str(), ".hidden", "nul%00", "a%2Fb"] {
        let response = http
            .post(format!("{}/v1/agents/{target}/invoke", node.http_url()))
            .json(&json!({"json": {"x": 1}}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{:.40}", target);
        let header_bytes: usize = response
            .headers()
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len())
            .sum();
        let body = response.text().await.unwrap();
        assert!(body.len() + header_bytes < 2000, "{} bytes", body.len());
    }
    // Over gRPC too.
    let long = "a".repeat(100_000);
    let status = node
        .client()
        .invoke(&long, agentmesh_proto::v1::Envelope::json("x", json!({})))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().len() < 300);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_refuses_queue_names_outside_the_rule() {
    let node = TestNode::start().await;
    let http = http_client();
    for queue in [".secret", "a%00b", "a%2Fb"] {
        let response = http
            .post(format!("{}/v1/queues/{queue}/messages", node.http_url()))
            .json(&json!({"json": {"x": 1}}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{queue}");
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_timeout_header_is_400() {
    let node = TestNode::start().await;
    let http = http_client();
    for timeout in ["abc", "-1", "1e23", "0", "99999999999999999999999"] {
        let response = http
            .post(format!("{}/v1/agents/echo/invoke", node.http_url()))
            .header("x-timeout-ms", timeout)
            .json(&json!({"json": {"x": 1}}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{timeout}");
        let body: Value = response.json().await.unwrap();
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("X-Timeout-Ms"),
            "{body}"
        );
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_refuses_duplicate_keys_like_invoke() {
    let node = TestNode::start().await;
    let http = http_client();
    for body in [
        r#"{"json": {"a": 1}, "json": {"a": 2}}"#,
        r#"{"json": {"a": 1, "a": 2}}"#,
        r#"{"messages": [{"type": "t", "type": "u"}]}"#,
    ] {
        let response = http
            .post(format!("{}/v1/queues/dups/messages", node.http_url()))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{body}");
        let error: Value = response.json().await.unwrap();
        assert!(
            error["error"]["message"]
                .as_str()
                .unwrap()
                .contains("duplicate"),
            "{error}"
        );
    }
    node.stop().await;
}
