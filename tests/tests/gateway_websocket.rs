//! Conversations over WebSocket through the gateway: many messages both ways, close
//! codes that carry a failure's reason, pings that keep a quiet conversation alive,
//! and the origin check for pages on other sites.

use std::time::{Duration, Instant};

use agentmesh_gateway::GatewayConfig;
use agentmesh_proto::v1::Envelope;
use agentmesh_sdk::{Agent, Context, Conversation};
use agentmesh_tests::{Echo, TestNode, card, start_agent};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{self, Message};
use tonic::Status;

/// Replies to each message `{"n": x}` with `{"n": x, "k": <count>}`; ends on
/// `{"end": true}`, fails with ABORTED on `{"fail": true}`.
struct Chatter;

#[tonic::async_trait]
impl Agent for Chatter {
    async fn invoke(&self, _ctx: Context, request: Envelope) -> Result<Envelope, Status> {
        Ok(request)
    }

    async fn converse(&self, _ctx: Context, mut conversation: Conversation) -> Result<(), Status> {
        let mut k = 0u64;
        while let Some(message) = conversation.recv().await {
            let payload = message.json_payload().unwrap_or_default();
            if payload["fail"] == json!(true) {
                return Err(Status::aborted("the chatter was asked to fail"));
            }
            if payload["end"] == json!(true) {
                return Ok(());
            }
            k += 1;
            conversation
                .send(Envelope::json(
                    "chat.reply",
                    json!({ "n": payload["n"], "k": k }),
                ))
                .await?;
        }
        Ok(())
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn converse(node: &TestNode, agent: &str) -> Socket {
    let url = format!("ws://{}/v1/agents/{agent}/converse", node.addr());
    let (socket, response) = tokio_tungstenite::connect_async(url).await.unwrap();
    assert_eq!(response.status().as_u16(), 101);
    assert!(response.headers().contains_key("x-correlation-id"));
    socket
}

/// The close frame that ends `socket` (code, reason), skipping other messages.
async fn close_frame(socket: &mut Socket) -> (u16, String) {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .expect("the socket closes in time");
        match message {
            Some(Ok(Message::Close(Some(frame)))) => {
                return (u16::from(frame.code), frame.reason.to_string());
            }
            Some(Ok(Message::Close(None))) | None => panic!("closed without a reason"),
            Some(Ok(_)) => continue,
            Some(Err(error)) => panic!("socket failed: {error}"),
        }
    }
}

#[tokio::test]
async fn websocket_round_trips_many_messages() {
    let node = TestNode::start().await;
    let agent = start_agent(&node, card("chat"), Chatter).await;
    let socket = converse(&node, "chat").await;
    let (mut write, mut read) = socket.split();
    let count = 500u64;
    let writer = tokio::spawn(async move {
        for n in 1..=count {
            let message = json!({ "type": "chat.message", "json": { "n": n } }).to_string();
            write.send(Message::text(message)).await.unwrap();
        }
        write
    });
    for k in 1..=count {
        let message = tokio::time::timeout(Duration::from_secs(10), read.next())
            .await
            .expect("a reply in time")
            .unwrap()
            .unwrap();
        let Message::Text(text) = message else {
            panic!("expected a text message, got {message:?}");
        };
        let envelope: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(envelope["json"], json!({ "n": k, "k": k }), "{envelope}");
        assert_eq!(envelope["type"], "chat.reply");
    }
    let mut write = writer.await.unwrap();
    // Ending the conversation normally closes the socket with 1000.
    write
        .send(Message::text(
            json!({ "json": { "end": true } }).to_string(),
        ))
        .await
        .unwrap();
    let mut socket = write.reunite(read).unwrap();
    let (code, reason) = close_frame(&mut socket).await;
    assert_eq!(code, 1000, "{reason}");

    agent.shutdown().await;
    node.stop().await;
}

#[tokio::test]
async fn websocket_closes_with_the_reason_of_a_failure() {
    let node = TestNode::start().await;
    let agent = start_agent(&node, card("chat"), Chatter).await;

    // The agent fails: 4000 + ABORTED (10), reason `ABORTED: ...`.
    let mut socket = converse(&node, "chat").await;
    socket
        .send(Message::text(r#"{"json":{"n":1}}"#))
        .await
        .unwrap();
    socket
        .send(Message::text(r#"{"json":{"fail":true}}"#))
        .await
        .unwrap();
    let (code, reason) = close_frame(&mut socket).await;
    assert_eq!(code, 4010, "{reason}");
    assert!(reason.starts_with("ABORTED: "), "{reason}");
    assert!(reason.contains("asked to fail"), "{reason}");

    // A message that is not Envelope JSON: 1007, naming the problem.
    let mut socket = converse(&node, "chat").await;
    socket
        .send(Message::text(r#"{"json": oops}"#))
        .await
        .unwrap();
    let (code, reason) = close_frame(&mut socket).await;
    assert_eq!(code, 1007, "{reason}");
    assert!(reason.contains("invalid JSON"), "{reason}");

    // An agent that does not converse: 4000 + UNIMPLEMENTED (12).
    let echo = start_agent(&node, card("echo"), Echo).await;
    let mut socket = converse(&node, "echo").await;
    let (code, reason) = close_frame(&mut socket).await;
    assert_eq!(code, 4012, "{reason}");

    echo.shutdown().await;
    agent.shutdown().await;
    node.stop().await;
}

#[tokio::test]
async fn websocket_pings_and_keeps_a_quiet_conversation_alive() {
    // Heartbeats every 100 ms: the agent would declare a silent caller dead
    // after 300 ms, so the gateway must keep them up for the quiet browser.
    let node = TestNode::start_with_gateway(GatewayConfig {
        ws_ping_interval: Duration::from_millis(100),
        converse_heartbeat: Duration::from_millis(100),
        ..Default::default()
    })
    .await;
    let agent = start_agent(&node, card("chat"), Chatter).await;
    let mut socket = converse(&node, "chat").await;
    let quiet_until = Instant::now() + Duration::from_millis(1000);
    let mut pings = 0;
    while Instant::now() < quiet_until {
        match tokio::time::timeout(Duration::from_millis(50), socket.next()).await {
            Ok(Some(Ok(Message::Ping(_)))) => pings += 1,
            Ok(Some(Ok(other))) => panic!("only pings while quiet, got {other:?}"),
            Ok(other) => panic!("the socket ended: {other:?}"),
            Err(_) => {}
        }
    }
    assert!(pings >= 3, "{pings} pings");
    socket
        .send(Message::text(r#"{"json":{"n":7}}"#))
        .await
        .unwrap();
    let reply = loop {
        match socket.next().await.unwrap().unwrap() {
            Message::Text(text) => break serde_json::from_str::<Value>(&text).unwrap(),
            _ => continue,
        }
    };
    assert_eq!(reply["json"], json!({ "n": 7, "k": 1 }));
    socket.close(None).await.unwrap();
    agent.shutdown().await;
    node.stop().await;
}

#[tokio::test]
async fn websocket_from_another_origin_needs_a_cors_origin() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let node = TestNode::start_with_gateway(GatewayConfig {
        cors_origins: vec!["http://app.example".into()],
        ..Default::default()
    })
    .await;
    let agent = start_agent(&node, card("chat"), Chatter).await;
    let url = format!("ws://{}/v1/agents/chat/converse", node.addr());
    let from = |origin: &str| {
        let mut request = url.as_str().into_client_request().unwrap();
        request
            .headers_mut()
            .insert("origin", origin.parse().unwrap());
        tokio_tungstenite::connect_async(request)
    };
    match from("http://evil.example").await {
        Err(tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 403);
            let body: Value = serde_json::from_slice(response.body().as_deref().unwrap()).unwrap();
            assert_eq!(body["error"]["code"], "PERMISSION_DENIED");
        }
        other => panic!("expected a 403, got {other:?}"),
    }
    let (mut socket, _) = from("http://app.example").await.unwrap();
    socket.close(None).await.unwrap();
    let same_origin = format!("http://{}", node.addr());
    let (mut socket, _) = from(&same_origin).await.unwrap();
    socket.close(None).await.unwrap();
    agent.shutdown().await;
    node.stop().await;
}
