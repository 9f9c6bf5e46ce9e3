//! Talking to the node's HTTP gateway.

use std::time::Duration;

use serde_json::Value;

/// An HTTP client whose requests give up after 30 s.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Asserts that `response` is the gateway's error JSON
/// (`{"error":{"code","message","details"}}`) with HTTP `status` and `code`, and returns it.
pub async fn expect_gateway_error(response: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(response.status().as_u16(), status, "HTTP status");
    assert_eq!(
        response.headers()["content-type"],
        "application/json",
        "errors are JSON"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
    assert!(body["error"]["details"].is_array(), "{body}");
    body
}
