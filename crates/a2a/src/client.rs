//! A client of A2A agents: fetches their cards and sends them messages, blocking or
//! streaming (SSE), over the JSON-RPC and HTTP+JSON bindings.

use std::time::Duration;

use bytes::{Buf, BytesMut};
use futures::{StreamExt, stream::BoxStream};
use reqwest::{StatusCode, header::HeaderMap};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::types::{
    A2A_JSON_MEDIA_TYPE, A2aErrorKind, AGENT_CARD_PATH, AgentCard, BINDING_HTTP_JSON,
    BINDING_JSONRPC, GetTaskRequest, JsonRpcOutcome, JsonRpcRequest, JsonRpcResponse,
    PROTOCOL_VERSION, SendMessageRequest, SendMessageResponse, StreamResponse, Task,
    VERSION_HEADER, methods,
};

/// An A2A binding the client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binding {
    /// JSON-RPC 2.0 over HTTP (`JSONRPC`).
    JsonRpc,
    /// HTTP+JSON, the REST binding (`HTTP+JSON`).
    HttpJson,
}

impl Binding {
    /// The spelling of `protocolBinding` in agent cards.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::JsonRpc => BINDING_JSONRPC,
            Self::HttpJson => BINDING_HTTP_JSON,
        }
    }

    /// The binding a card's `protocolBinding` names, if the client speaks it.
    pub fn parse(binding: &str) -> Option<Self> {
        match binding.to_ascii_uppercase().as_str() {
            BINDING_JSONRPC => Some(Self::JsonRpc),
            BINDING_HTTP_JSON | "HTTP_JSON" | "REST" => Some(Self::HttpJson),
            _ => None,
        }
    }
}

/// Where and how to reach an A2A agent: one interface of its card.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// The interface's absolute URL.
    pub url: String,
    /// Its binding.
    pub binding: Binding,
    /// The tenant the card names for it, sent with every request.
    pub tenant: Option<String>,
}

/// What went wrong talking to an A2A agent.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The agent could not be reached, or the connection broke.
    #[error("{0}")]
    Unreachable(String),
    /// No (complete) answer within the request's timeout.
    #[error("no answer within {} ms", .0.as_millis())]
    TimedOut(Duration),
    /// The agent answered with an HTTP error status and no A2A error.
    #[error("HTTP {status}: {message}")]
    Http {
        /// The status.
        status: u16,
        /// What the body said (cut short).
        message: String,
        /// The `Retry-After` the agent asked for.
        retry_after: Option<Duration>,
    },
    /// The agent answered with an A2A error.
    #[error("A2A error {code}: {message}")]
    A2a {
        /// The JSON-RPC error code (the spec's, for errors the other bindings carry as reasons).
        code: i64,
        /// The agent's message.
        message: String,
    },
    /// The answer is not what the binding promises.
    #[error("{0}")]
    Invalid(String),
}

impl ClientError {
    /// The A2A error this is, if it is one of the spec's.
    pub fn kind(&self) -> Option<A2aErrorKind> {
        match self {
            Self::A2a { code, .. } => A2aErrorKind::from_code(*code),
            _ => None,
        }
    }
}

/// The URL of an agent's card: `url` itself when it names a `.json` document, else the
/// well-known path below it.
pub fn card_url(url: &str) -> String {
    let url = url.trim();
    if url.ends_with(".json") {
        url.to_owned()
    } else {
        format!("{}{AGENT_CARD_PATH}", url.trim_end_matches('/'))
    }
}

/// The first interface of the card, in its order of preference, whose binding the client
/// speaks (JSON-RPC or HTTP+JSON), its URL made absolute against the card's.
pub fn pick_interface(card: &AgentCard, card_url: &str) -> Result<Interface, String> {
    let base = reqwest::Url::parse(card_url).map_err(|e| format!("bad card URL: {e}"))?;
    for interface in &card.supported_interfaces {
        let Some(binding) = Binding::parse(&interface.protocol_binding) else {
            continue;
        };
        let url = base
            .join(&interface.url)
            .map_err(|e| format!("bad interface URL {:?}: {e}", interface.url))?;
        return Ok(Interface {
            url: url.to_string(),
            binding,
            tenant: interface.tenant.clone().filter(|t| !t.is_empty()),
        });
    }
    let offered: Vec<&str> = card
        .supported_interfaces
        .iter()
        .map(|i| i.protocol_binding.as_str())
        .collect();
    Err(format!(
        "the card offers no JSONRPC or HTTP+JSON interface (it offers [{}])",
        offered.join(", ")
    ))
}

/// A client of A2A agents over HTTP.
#[derive(Debug, Clone)]
pub struct A2aClient {
    http: reqwest::Client,
}

/// TLS of the node's HTTP calls to `https://` A2A agents and webhooks (`[tls.agents]`).
#[derive(Debug, Clone, Default)]
pub struct HttpTls {
    /// PEM of the CAs trusted to issue their certificates; `None`: the system's roots.
    pub ca_pem: Option<Vec<u8>>,
    /// PEM of the certificate and key the node presents when asked (mutual TLS).
    pub identity_pem: Option<Vec<u8>>,
}

impl HttpTls {
    /// `builder` trusting these roots and presenting this identity.
    pub fn apply(
        &self,
        mut builder: reqwest::ClientBuilder,
    ) -> Result<reqwest::ClientBuilder, String> {
        builder = builder.use_rustls_tls();
        if let Some(pem) = &self.ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| format!("the CA file holds no usable certificate: {e}"))?;
            // The configured CAs replace the system's roots.
            builder = builder.tls_built_in_root_certs(false);
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        if let Some(pem) = &self.identity_pem {
            let identity = reqwest::Identity::from_pem(pem)
                .map_err(|e| format!("the certificate and key are not usable: {e}"))?;
            builder = builder.identity(identity);
        }
        Ok(builder)
    }
}

impl A2aClient {
    /// A client opening connections within `connect_timeout`, trusting the system's roots.
    pub fn new(connect_timeout: Duration) -> Self {
        Self::with_tls(connect_timeout, &HttpTls::default()).unwrap_or_else(|_| Self {
            http: reqwest::Client::default(),
        })
    }

    /// A client opening connections within `connect_timeout`, with `tls` for `https://`.
    pub fn with_tls(connect_timeout: Duration, tls: &HttpTls) -> Result<Self, String> {
        let builder = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true);
        let http = tls.apply(builder)?.build().map_err(|e| e.to_string())?;
        Ok(Self { http })
    }

    /// Fetches the card at `card_url`.
    pub async fn fetch_card(
        &self,
        card_url: &str,
        timeout: Duration,
    ) -> Result<AgentCard, ClientError> {
        let response = self
            .http
            .get(card_url)
            .header(VERSION_HEADER, PROTOCOL_VERSION)
            .header(reqwest::header::ACCEPT, "application/json")
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| sent_error(e, timeout))?;
        let body = checked(response, timeout).await?;
        serde_json::from_slice(&body).map_err(|e| {
            ClientError::Invalid(format!(
                "the card at {card_url} is not an A2A agent card: {e}"
            ))
        })
    }

    /// `SendMessage`, waiting for the answer within `timeout`.
    pub async fn send_message(
        &self,
        interface: &Interface,
        request: &SendMessageRequest,
        headers: HeaderMap,
        timeout: Duration,
    ) -> Result<SendMessageResponse, ClientError> {
        let response = self
            .post(interface, request, headers, timeout, false)
            .send()
            .await
            .map_err(|e| sent_error(e, timeout))?;
        let body = checked(response, timeout).await?;
        match interface.binding {
            Binding::JsonRpc => jsonrpc_result(&body),
            Binding::HttpJson => parse(&body),
        }
    }

    /// `GetTask`: the task as the agent has it now.
    pub async fn get_task(
        &self,
        interface: &Interface,
        task_id: &str,
        headers: HeaderMap,
        timeout: Duration,
    ) -> Result<Task, ClientError> {
        let builder = match interface.binding {
            Binding::JsonRpc => {
                let params = GetTaskRequest {
                    tenant: interface.tenant.clone(),
                    id: task_id.to_owned(),
                    history_length: Some(0),
                };
                self.http
                    .post(&interface.url)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .json(&JsonRpcRequest::new(
                        task_id.to_owned(),
                        methods::GET_TASK,
                        &params,
                    ))
            }
            Binding::HttpJson => {
                let base = interface.url.trim_end_matches('/');
                let url = match &interface.tenant {
                    Some(tenant) => format!("{base}/{tenant}/tasks/{task_id}"),
                    None => format!("{base}/tasks/{task_id}"),
                };
                self.http.get(url).query(&[("historyLength", "0")])
            }
        };
        let response = builder
            .headers(headers)
            .header(VERSION_HEADER, PROTOCOL_VERSION)
            .header(reqwest::header::ACCEPT, "application/json")
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| sent_error(e, timeout))?;
        let body = checked(response, timeout).await?;
        match interface.binding {
            Binding::JsonRpc => jsonrpc_result(&body),
            Binding::HttpJson => parse(&body),
        }
    }

    /// `SendStreamingMessage`: the agent's events as they come, the stream cut at `timeout`.
    pub async fn send_streaming_message(
        &self,
        interface: &Interface,
        request: &SendMessageRequest,
        headers: HeaderMap,
        timeout: Duration,
    ) -> Result<BoxStream<'static, Result<StreamResponse, ClientError>>, ClientError> {
        let response = self
            .post(interface, request, headers, timeout, true)
            .send()
            .await
            .map_err(|e| sent_error(e, timeout))?;
        if !response.status().is_success() {
            return Err(checked(response, timeout).await.unwrap_err());
        }
        let binding = interface.binding;
        let mut body = response.bytes_stream();
        let events = async_stream::stream! {
            let mut buffer = BytesMut::new();
            loop {
                while let Some(data) = next_event(&mut buffer) {
                    if data.is_empty() {
                        continue;
                    }
                    let event = match binding {
                        Binding::JsonRpc => jsonrpc_result::<StreamResponse>(data.as_bytes()),
                        Binding::HttpJson => parse::<StreamResponse>(data.as_bytes()),
                    };
                    yield event;
                }
                match body.next().await {
                    Some(Ok(chunk)) => buffer.extend_from_slice(&chunk),
                    Some(Err(e)) => {
                        yield Err(sent_error(e, timeout));
                        return;
                    }
                    None => return,
                }
            }
        };
        Ok(events.boxed())
    }

    fn post(
        &self,
        interface: &Interface,
        request: &SendMessageRequest,
        headers: HeaderMap,
        timeout: Duration,
        streaming: bool,
    ) -> reqwest::RequestBuilder {
        let mut request = request.clone();
        if request.tenant.is_none() {
            request.tenant.clone_from(&interface.tenant);
        }
        let builder = match interface.binding {
            Binding::JsonRpc => {
                let method = if streaming {
                    methods::SEND_STREAMING_MESSAGE
                } else {
                    methods::SEND_MESSAGE
                };
                let id = request.message.message_id.clone();
                self.http
                    .post(&interface.url)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .json(&JsonRpcRequest::new(id, method, &request))
            }
            Binding::HttpJson => {
                let operation = if streaming {
                    "message:stream"
                } else {
                    "message:send"
                };
                let url = format!("{}/{operation}", interface.url.trim_end_matches('/'));
                let body = serde_json::to_vec(&request).unwrap_or_default();
                self.http
                    .post(url)
                    .header(reqwest::header::CONTENT_TYPE, A2A_JSON_MEDIA_TYPE)
                    .body(body)
            }
        };
        let accept = if streaming {
            "text/event-stream"
        } else {
            "application/json"
        };
        builder
            .headers(headers)
            .header(VERSION_HEADER, PROTOCOL_VERSION)
            .header(reqwest::header::ACCEPT, accept)
            .timeout(timeout)
    }
}

/// The data of the next complete server-sent event in `buffer`, taken out of it.
fn next_event(buffer: &mut BytesMut) -> Option<String> {
    let text = std::str::from_utf8(buffer).ok()?;
    let (end, separator) = [("\r\n\r\n", 4), ("\n\n", 2), ("\r\r", 2)]
        .iter()
        .filter_map(|(sep, len)| text.find(sep).map(|at| (at, *len)))
        .min()?;
    let event = text[..end].to_owned();
    buffer.advance(end + separator);
    let data: Vec<&str> = event
        .lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .map(|data| data.strip_prefix(' ').unwrap_or(data))
        .collect();
    Some(data.join("\n"))
}

fn sent_error(error: reqwest::Error, timeout: Duration) -> ClientError {
    if error.is_timeout() {
        return ClientError::TimedOut(timeout);
    }
    // The chain says why (connection refused, reset, …).
    let mut message = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        message = format!("{message}: {cause}");
        source = cause.source();
    }
    ClientError::Unreachable(message)
}

/// The body of a successful response, or the error the response stands for.
async fn checked(
    response: reqwest::Response,
    timeout: Duration,
) -> Result<bytes::Bytes, ClientError> {
    let status = response.status();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let body = response.bytes().await.map_err(|e| sent_error(e, timeout))?;
    if status.is_success() {
        return Ok(body);
    }
    Err(http_error(status, &body, retry_after))
}

/// An HTTP error answer: the A2A error in it (a JSON-RPC error, or an HTTP+JSON
/// `google.rpc.Status` whose ErrorInfo names the spec's reason), else the bare status.
fn http_error(status: StatusCode, body: &[u8], retry_after: Option<Duration>) -> ClientError {
    if let Ok(value) = serde_json::from_slice::<Value>(body) {
        if let Some(error) = value.get("error") {
            let message = error
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            if let Some(code) = error.get("code").and_then(Value::as_i64)
                && A2aErrorKind::from_code(code).is_some()
            {
                return ClientError::A2a { code, message };
            }
            let reason = error
                .get("details")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .find_map(|detail| detail.get("reason").and_then(Value::as_str));
            if let Some(kind) =
                reason.and_then(|r| A2aErrorKind::ALL.into_iter().find(|k| k.reason() == r))
            {
                return ClientError::A2a {
                    code: kind.code(),
                    message,
                };
            }
        }
    }
    let text = String::from_utf8_lossy(body);
    let message: String = text.trim().chars().take(200).collect();
    ClientError::Http {
        status: status.as_u16(),
        message,
        retry_after,
    }
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ClientError> {
    serde_json::from_slice(body).map_err(|e| {
        ClientError::Invalid(format!(
            "the agent's answer is not a valid A2A {}: {e}",
            short_type_name::<T>()
        ))
    })
}

fn jsonrpc_result<T: DeserializeOwned>(body: &[u8]) -> Result<T, ClientError> {
    let response: JsonRpcResponse = parse(body)?;
    match response.outcome {
        JsonRpcOutcome::Result(value) => serde_json::from_value(value).map_err(|e| {
            ClientError::Invalid(format!(
                "the agent's JSON-RPC result is not a valid A2A {}: {e}",
                short_type_name::<T>()
            ))
        }),
        JsonRpcOutcome::Error(error) => Err(ClientError::A2a {
            code: error.code,
            message: error.message,
        }),
    }
}

fn short_type_name<T>() -> &'static str {
    let name = std::any::type_name::<T>();
    name.rsplit("::").next().unwrap_or(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::AgentInterface;

    #[test]
    fn a_card_url_is_the_well_known_path_below_a_base_url() {
        assert_eq!(
            card_url("http://127.0.0.1:9/agents/echo/"),
            "http://127.0.0.1:9/agents/echo/.well-known/agent-card.json"
        );
        assert_eq!(card_url("http://h/x/card.json"), "http://h/x/card.json");
    }

    #[test]
    fn the_first_interface_the_client_speaks_is_picked_and_made_absolute() {
        let card = AgentCard {
            supported_interfaces: vec![
                AgentInterface {
                    url: "grpc://h:1".into(),
                    protocol_binding: "GRPC".into(),
                    ..Default::default()
                },
                AgentInterface {
                    url: "/rest".into(),
                    protocol_binding: "HTTP+JSON".into(),
                    ..Default::default()
                },
                AgentInterface {
                    url: "http://h:2/rpc".into(),
                    protocol_binding: "JSONRPC".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let picked = pick_interface(&card, "http://h:2/.well-known/agent-card.json").unwrap();
        assert_eq!(picked.binding, Binding::HttpJson);
        assert_eq!(picked.url, "http://h:2/rest");
        let none = AgentCard::default();
        assert!(pick_interface(&none, "http://h/").is_err());
    }

    #[test]
    fn server_sent_events_are_split_and_their_data_joined() {
        let mut buffer =
            BytesMut::from(&b"event: x\ndata: {\"a\":\ndata: 1}\n\ndata: 2\r\n\r\ndata: 3"[..]);
        assert_eq!(next_event(&mut buffer).as_deref(), Some("{\"a\":\n1}"));
        assert_eq!(next_event(&mut buffer).as_deref(), Some("2"));
        assert_eq!(next_event(&mut buffer), None);
        assert_eq!(&buffer[..], b"data: 3");
    }

    #[test]
    fn error_bodies_of_both_bindings_become_a2a_errors() {
        let jsonrpc = br#"{"jsonrpc":"2.0","id":1,"error":{"code":-32001,"message":"gone"}}"#;
        assert!(matches!(
            http_error(StatusCode::OK, jsonrpc, None),
            ClientError::A2a { code: -32001, .. }
        ));
        let rest = br#"{"error":{"code":404,"status":"NOT_FOUND","message":"gone","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"TASK_NOT_FOUND","domain":"a2a-protocol.org"}]}}"#;
        assert!(matches!(
            http_error(StatusCode::NOT_FOUND, rest, None),
            ClientError::A2a { code: -32001, .. }
        ));
        assert!(matches!(
            http_error(StatusCode::BAD_GATEWAY, b"upstream down", None),
            ClientError::Http { status: 502, .. }
        ));
    }
}
