//! Connection limits on a real socket: silent, half-sent and idle connections are closed
//! after the configured timeouts, quiet streams keep their connection, and connections past
//! the cap are closed as soon as they are accepted.

use std::time::{Duration, Instant};

use agentmesh_node::{ConnectionSettings, NodeConfig};
use agentmesh_tests::{
    TestNode,
    queue::{RawConsumer, job, queue_config},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const HEADER_READ_TIMEOUT: Duration = Duration::from_millis(400);
const IDLE_TIMEOUT: Duration = Duration::from_millis(1000);

/// Short timeouts, so that each is seen to work within a test.
fn short_timeouts(max_connections: usize) -> NodeConfig {
    let mut config = queue_config();
    config.connections = ConnectionSettings {
        max_connections,
        header_read_timeout: HEADER_READ_TIMEOUT,
        idle_timeout: IDLE_TIMEOUT,
        http2_keep_alive_interval: Duration::from_millis(200),
        http2_keep_alive_timeout: Duration::from_millis(500),
    };
    config
}

/// Reads until the node closes `stream`; returns how long that took from `since`.
async fn closed_by_node(stream: &mut TcpStream, since: Instant, within: Duration) -> Duration {
    let mut sink = Vec::new();
    let read = tokio::time::timeout(within, stream.read_to_end(&mut sink)).await;
    assert!(
        read.is_ok(),
        "still open after {within:?}; read {} bytes",
        sink.len()
    );
    since.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_closed_after_the_header_read_timeout() {
    let node = TestNode::start_with(short_timeouts(0)).await;
    let opened = Instant::now();
    let mut silent = TcpStream::connect(node.address).await.unwrap();
    let after = closed_by_node(&mut silent, opened, Duration::from_secs(5)).await;
    assert!(after >= HEADER_READ_TIMEOUT / 2, "closed after {after:?}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_sent_http1_request_is_closed_after_the_header_read_timeout() {
    let node = TestNode::start_with(short_timeouts(0)).await;
    let mut half = TcpStream::connect(node.address).await.unwrap();
    let opened = Instant::now();
    half.write_all(b"POST /v1/agents/echo/invoke HTTP/1.1\r\nHost: mesh\r\nContent-Le")
        .await
        .unwrap();
    closed_by_node(&mut half, opened, Duration::from_secs(5)).await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_is_closed_after_the_idle_timeout() {
    let node = TestNode::start_with(short_timeouts(0)).await;
    let tcp = TcpStream::connect(node.address).await.unwrap();
    let (send, connection) = h2::client::handshake(tcp).await.unwrap();
    let connection = tokio::spawn(connection);
    let mut send = send.ready().await.unwrap();
    let request = http::Request::get(format!("{}/healthz", node.http_url()))
        .body(())
        .unwrap();
    let (response, _) = send.send_request(request, true).unwrap();
    let mut body = response.await.unwrap().into_body();
    while let Some(chunk) = body.data().await {
        chunk.unwrap();
    }
    drop(body);
    let idle_from = Instant::now();
    // Pings are answered, and still an idle connection does not stay open.
    tokio::time::sleep(IDLE_TIMEOUT / 2).await;
    assert!(!connection.is_finished(), "closed before the idle timeout");
    tokio::time::timeout(Duration::from_secs(5), connection)
        .await
        .expect("an idle HTTP/2 connection stayed open")
        .unwrap()
        .ok();
    assert!(idle_from.elapsed() >= IDLE_TIMEOUT * 3 / 4);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_connection_without_a_request_is_closed_after_the_header_read_timeout() {
    let node = TestNode::start_with(short_timeouts(0)).await;
    let tcp = TcpStream::connect(node.address).await.unwrap();
    let (_send, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), connection)
        .await
        .expect("an HTTP/2 connection that sent no request stayed open")
        .ok();
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_stream_keeps_its_connection_past_the_idle_timeout() {
    let node = TestNode::start_with(short_timeouts(0)).await;
    let mut consumer = RawConsumer::open(&node, "quiet", 1, Duration::from_secs(30)).await;
    // Nothing moves on the stream for well past every timeout.
    assert!(
        consumer
            .delivery(IDLE_TIMEOUT * 3 + HEADER_READ_TIMEOUT)
            .await
            .is_none()
    );
    node.client().submit("quiet", [job(1)]).await.unwrap();
    let delivery = consumer
        .delivery(Duration::from_secs(5))
        .await
        .expect("the quiet stream was cut");
    assert!(consumer.ack(&delivery.receipt, None).await.error.is_none());
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_are_closed_at_once() {
    let mut config = short_timeouts(3);
    config.connections.header_read_timeout = Duration::from_secs(30);
    let node = TestNode::start_with(config).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(node.address).await.unwrap());
    }
    // Let the node accept the three before the fourth arrives.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut excess = TcpStream::connect(node.address).await.unwrap();
    let opened = Instant::now();
    let after = closed_by_node(&mut excess, opened, Duration::from_secs(2)).await;
    assert!(after < Duration::from_secs(1), "closed after {after:?}");
    // A freed place is taken again.
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut next = TcpStream::connect(node.address).await.unwrap();
    next.write_all(b"GET /healthz HTTP/1.1\r\nHost: mesh\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), next.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    drop(held);
    node.stop().await;
}
