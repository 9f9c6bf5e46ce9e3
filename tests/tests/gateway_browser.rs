//! A real browser on another origin: headless Chromium, driven by playwright-core
//! (`gateway_browser.js`), loads `gateway_browser.html`, which starts a detached
//! stream with a CORS request and reads it with an `EventSource`.

use std::{net::SocketAddr, time::Duration};

use agentmesh_gateway::GatewayConfig;
use agentmesh_tests::{Streamer, TestNode, card, outside_tool, start_agent};
use serde_json::Value;

/// Serves `page` to `GET /` on a port of its own.
async fn serve_page(page: &'static str) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buffer = [0u8; 4096];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buffer[..n]),
                    }
                }
                let (status, body) =
                    if request.starts_with(b"GET /?") || request.starts_with(b"GET / ") {
                        ("200 OK", page)
                    } else {
                        ("404 Not Found", "")
                    };
                let response = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: text/html; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
            });
        }
    });
    address
}

#[tokio::test]
#[ignore = "needs AGENTMESH_TEST_CHROMIUM and AGENTMESH_TEST_NODE_MODULES"]
async fn browser_event_source_reads_a_detached_stream_from_another_origin() {
    let chromium = outside_tool("AGENTMESH_TEST_CHROMIUM", "a Chromium binary");
    let node_modules = outside_tool(
        "AGENTMESH_TEST_NODE_MODULES",
        "a node_modules directory with playwright-core",
    );
    // The page comes from another port, so another origin; only it may call.
    let page_origin = format!(
        "http://{}",
        serve_page(include_str!("gateway_browser.html")).await
    );
    let node = TestNode::start_with_gateway(GatewayConfig {
        cors_origins: vec![page_origin.clone()],
        ..Default::default()
    })
    .await;
    let agent = start_agent(&node, card("streamer"), Streamer).await;
    let n = 25;
    let page_url = format!("{page_origin}/?gateway={}&n={n}", node.http_url());

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/gateway_browser.js");
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("node")
            .arg(script)
            .arg(&page_url)
            .env("NODE_PATH", &node_modules)
            .env("AGENTMESH_TEST_CHROMIUM", &chromium)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the browser finishes within a minute")
    .expect("run node");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "browser run failed:\n{stdout}\n{stderr}"
    );
    let result: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("bad output ({e}):\n{stdout}\n{stderr}"));
    assert_eq!(result["outcome"], "result", "{result}\n{stderr}");
    assert_eq!(result["status"], 202, "{result}");
    assert_eq!(
        result["correlation"], "browser-1",
        "the exposed correlation id is readable cross-origin: {result}"
    );
    let events = result["events"].as_array().unwrap();
    assert_eq!(events.len() as u64, n + 2, "{result}");
    let stream_id = result["detached"]["stream_id"].as_str().unwrap();
    for (i, event) in events.iter().enumerate() {
        let sequence = i as u64 + 1;
        assert_eq!(
            event["id"],
            format!("{stream_id}:{sequence}"),
            "lastEventId of event {sequence}: {result}"
        );
        assert_eq!(event["data"]["sequence"], sequence.to_string());
    }
    assert_eq!(events[0]["event"], "progress");
    assert_eq!(events[1]["event"], "partial");
    assert_eq!(events[n as usize + 1]["event"], "result");
    assert_eq!(
        events[n as usize + 1]["data"]["envelope"]["json"]["done"],
        n
    );

    agent.shutdown().await;
    node.stop().await;
}
