//! Limits on what a caller sends, over real sockets: over-long or malformed forwarded headers
//! (`Idempotency-Key`, `x-correlation-id`, `traceparent`) and envelope fields are refused at
//! the node before anything reaches an agent, and an agent whose transport refuses a request
//! never has that counted against its breaker, so no caller can open another caller's breaker.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use agentmesh_node::{NodeConfig, RetryConfig, RouterConfig};
use agentmesh_proto::{
    limits::{MAX_ENVELOPE_HEADERS_BYTES, MAX_ID_BYTES},
    v1::{
        Envelope, InvokeRequest, RegisterRequest, agent_service_client::AgentServiceClient,
        agent_service_server::AgentServiceServer, discovery_service_client::DiscoveryServiceClient,
    },
};
use agentmesh_sdk::{AgentHost, BreakerConfig};
use agentmesh_tests::{
    Echo, TestNode, card, expect_gateway_error, http_client, start_agent, test_config,
};
use serde_json::json;
use tonic::{Code, Request, metadata::MetadataValue};

/// A node whose breakers open after 3 failures in a row and whose calls are not retried, so
/// every refusal the agent gives would show on its breaker at once.
async fn strict_node() -> TestNode {
    TestNode::start_with(NodeConfig {
        breaker: BreakerConfig {
            consecutive_failures: 3,
            open_for: Duration::from_secs(60),
            ..Default::default()
        },
        router: RouterConfig {
            retry: RetryConfig {
                max_attempts: 1,
                ..Default::default()
            },
            ..Default::default()
        },
        ..test_config()
    })
    .await
}

fn envelope(target: &str) -> Envelope {
    Envelope {
        target: target.into(),
        ..Envelope::json("x", json!({"text": "hi"}))
    }
}

async fn invoke(
    node: &TestNode,
    request: Request<InvokeRequest>,
) -> Result<Envelope, tonic::Status> {
    let mut client = AgentServiceClient::new(node.channel().await);
    Ok(client
        .invoke(request)
        .await?
        .into_inner()
        .envelope
        .unwrap_or_default())
}

#[tokio::test]
async fn oversized_headers_leave_the_breaker_closed_for_everyone_else() {
    let node = strict_node().await;
    let _agent = start_agent(&node, card("echo"), Echo).await;
    let http = http_client();
    let url = format!("{}/v1/agents/echo/invoke", node.http_url());
    let huge = "k".repeat(20_000);
    for i in 0..8 {
        for (name, value) in [
            ("Idempotency-Key", format!("{huge}{i}")),
            ("traceparent", format!("{huge}{i}")),
            ("x-correlation-id", format!("{huge}{i}")),
        ] {
            let response = http
                .post(&url)
                .header(name, value)
                .body(r#"{"json":1}"#)
                .send()
                .await
                .unwrap();
            let body = expect_gateway_error(response, 431, "INVALID_ARGUMENT").await;
            let message = body["error"]["message"].as_str().unwrap();
            assert!(
                message.contains("the limit is") || message.contains("traceparent"),
                "{message}"
            );
            assert!(
                message.len() < 300,
                "the value is not echoed back: {message}"
            );
        }
    }
    // Another caller still reaches echo, over HTTP and gRPC.
    let response = http
        .post(&url)
        .header("Idempotency-Key", "fine")
        .body(r#"{"json":{"text":"hi"}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    invoke(
        &node,
        Request::new(InvokeRequest {
            envelope: Some(envelope("echo")),
        }),
    )
    .await
    .expect("echo is callable: its breaker is closed");
}

#[tokio::test]
async fn over_long_or_malformed_fields_are_refused_before_routing() {
    let node = strict_node().await;
    let _agent = start_agent(&node, card("echo"), Echo).await;
    let long = "x".repeat(MAX_ID_BYTES + 1);

    // HTTP headers: a malformed traceparent is 400, an over-long value 431.
    let http = http_client();
    let url = format!("{}/v1/agents/echo/invoke", node.http_url());
    for (name, value, status) in [
        ("traceparent", "00-abc-def-01", 400),
        (
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            431,
        ),
        ("Idempotency-Key", long.as_str(), 431),
        ("x-correlation-id", long.as_str(), 431),
    ] {
        let response = http
            .post(&url)
            .header(name, value)
            .body("{}")
            .send()
            .await
            .unwrap();
        expect_gateway_error(response, status, "INVALID_ARGUMENT").await;
    }
    // Envelope fields in an HTTP body.
    let response = http
        .post(&url)
        .json(&json!({ "idempotencyKey": long, "json": {} }))
        .send()
        .await
        .unwrap();
    let body = expect_gateway_error(response, 400, "INVALID_ARGUMENT").await;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("idempotency_key"),
        "{body}"
    );

    // gRPC metadata.
    for (name, value) in [
        ("idempotency-key", long.as_str()),
        ("x-correlation-id", long.as_str()),
        ("traceparent", "not-a-traceparent"),
    ] {
        let mut request = Request::new(InvokeRequest {
            envelope: Some(envelope("echo")),
        });
        request
            .metadata_mut()
            .insert(name, MetadataValue::try_from(value).unwrap());
        let status = invoke(&node, request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status:?}");
        assert!(status.message().contains(name), "{name}: {status:?}");
    }

    // The envelope's own fields, the 20 KB key of the report among them.
    let huge = "k".repeat(20_000);
    let mut headers = std::collections::HashMap::new();
    headers.insert("big".to_owned(), "v".repeat(MAX_ENVELOPE_HEADERS_BYTES));
    let cases: Vec<(&str, Envelope)> = vec![
        (
            "idempotency_key",
            Envelope {
                idempotency_key: huge.clone(),
                ..envelope("echo")
            },
        ),
        (
            "correlation_id",
            Envelope {
                correlation_id: long.clone(),
                ..envelope("echo")
            },
        ),
        (
            "causation_id",
            Envelope {
                causation_id: long.clone(),
                ..envelope("echo")
            },
        ),
        (
            "source",
            Envelope {
                source: long.clone(),
                ..envelope("echo")
            },
        ),
        (
            "traceparent",
            Envelope {
                traceparent: "00-t-s-01".into(),
                ..envelope("echo")
            },
        ),
        (
            "headers",
            Envelope {
                headers,
                ..envelope("echo")
            },
        ),
    ];
    for (field, sent) in cases {
        for _ in 0..4 {
            let request = Request::new(InvokeRequest {
                envelope: Some(sent.clone()),
            });
            let status = invoke(&node, request).await.unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
            assert!(status.message().contains(field), "{field}: {status:?}");
        }
    }
    // None of it reached echo or its breaker.
    invoke(
        &node,
        Request::new(InvokeRequest {
            envelope: Some(envelope("echo")),
        }),
    )
    .await
    .expect("echo is callable");
}

/// An agent whose HTTP/2 layer takes at most `max_header_list` bytes of headers (it answers
/// 431 to more), registered with `node` as `name`.
async fn agent_with_header_limit(
    node: &TestNode,
    name: &str,
    max_header_list: u32,
) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let address = listener.local_addr().unwrap();
    let host = AgentHost::new(Arc::new(Echo), name, None);
    let server = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .http2_max_header_list_size(max_header_list)
            .add_service(AgentServiceServer::new(host))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    let mut agent_card = card(name);
    agent_card.endpoint = format!("http://{address}");
    agent_card.instance_id = format!("{name}-1");
    DiscoveryServiceClient::new(node.channel().await)
        .register(RegisterRequest {
            card: Some(agent_card),
            ttl: Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            }),
        })
        .await
        .unwrap();
    server
}

#[tokio::test]
async fn an_agent_refusing_a_request_is_the_callers_failure_not_the_agents() {
    let node = strict_node().await;
    // Room for the node's own headers and short ids, not for a key near the node's limit.
    let agent = agent_with_header_limit(&node, "picky", 800).await;
    invoke(
        &node,
        Request::new(InvokeRequest {
            envelope: Some(envelope("picky")),
        }),
    )
    .await
    .expect("a plain call fits the agent's header limit");
    for i in 0..6 {
        let sent = Envelope {
            idempotency_key: format!("{}{i}", "k".repeat(MAX_ID_BYTES - 1)),
            ..envelope("picky")
        };
        let status = invoke(
            &node,
            Request::new(InvokeRequest {
                envelope: Some(sent),
            }),
        )
        .await
        .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("HTTP 431"), "{status:?}");
        assert!(status.message().contains("picky"), "{status:?}");
    }
    invoke(
        &node,
        Request::new(InvokeRequest {
            envelope: Some(envelope("picky")),
        }),
    )
    .await
    .expect("the agent's breaker stays closed for other callers");
    agent.abort();
}
