//! TLS and mutual TLS over real sockets, with certificates made at test time: gRPC,
//! HTTP/1.1, HTTP/2, SSE and WebSocket on the node's one TLS port; plaintext clients refused
//! while the node keeps serving; client certificates required, refused from another CA, and
//! their identity in every request's extensions; certificates reloaded when their files
//! change while open streams go on; the node calling agents over TLS and mutual TLS; silent
//! TLS clients closed.

use std::time::Duration;

use agentmesh_node::{ClientAuth, TlsPeer, TlsSettings, connections, tls::ServerTls};
use agentmesh_proto::v1::Envelope;
use agentmesh_sdk::{AgentRuntime, ServerTls as AgentServerTls};
use agentmesh_tests::{
    Echo, SseReader, Streamer, TestNode, card, eventually,
    tls::{TestCa, TlsFiles},
};
use serde_json::json;
use tokio::{io::AsyncReadExt, net::TcpStream};
use tonic::Code;

/// Starts `agent` (plaintext) registered with the TLS `node` through a client trusting `ca`.
async fn start_agent_tls<A: agentmesh_sdk::Agent>(
    node: &TestNode,
    ca: &TestCa,
    name: &str,
    agent: A,
) -> agentmesh_sdk::RunningAgent {
    let running = AgentRuntime::new(card(name), agent)
        .node(node.https_url())
        .node_tls(ca.client_tls())
        .start()
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), running.registered(1))
        .await
        .expect("agent registers with the TLS node");
    running
}

/// The value of the sample `name{labels}` in the node's `/metrics`, read over TLS.
async fn metric(node: &TestNode, ca: &TestCa, sample: &str) -> u64 {
    let text = ca
        .http_client(None, false)
        .get(format!("{}/metrics", node.https_url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(sample))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {sample} in\n{text}"))
}

fn echo_request() -> serde_json::Value {
    json!({ "type": "echo.request", "json": { "hello": "tls" } })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_http1_http2_and_sse_share_the_tls_port() {
    let ca = TestCa::new("mesh CA");
    let files = TlsFiles::new(&ca, &ca.server(1));
    let node = TestNode::start_with(files.node_config(files.settings())).await;
    let echo = start_agent_tls(&node, &ca, "echo", Echo).await;
    let streamer = start_agent_tls(&node, &ca, "streamer", Streamer).await;

    // gRPC through the SDK.
    let client = node.tls_client(&ca.client_tls());
    let reply = client
        .invoke("echo", Envelope::json("echo.request", json!({ "n": 1 })))
        .await
        .unwrap();
    assert_eq!(reply.json_payload().unwrap(), json!({ "n": 1 }));

    // The gateway, over HTTP/1.1 and HTTP/2 (ALPN).
    for http2 in [false, true] {
        let response = ca
            .http_client(None, http2)
            .post(format!("{}/v1/agents/echo/invoke", node.https_url()))
            .json(&echo_request())
            .send()
            .await
            .unwrap();
        let expected = if http2 {
            reqwest::Version::HTTP_2
        } else {
            reqwest::Version::HTTP_11
        };
        assert_eq!(response.version(), expected);
        assert_eq!(response.status(), 200);
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["json"], json!({ "hello": "tls" }), "{body}");
    }

    // Server-Sent Events.
    let response = ca
        .http_client(None, false)
        .post(format!("{}/v1/agents/streamer/stream", node.https_url()))
        .json(&json!({ "type": "count.request", "json": { "n": 5, "delay_ms": 0 } }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let events = SseReader::new(response).rest().await;
    assert_eq!(events.len(), 7, "progress, 5 partials, result");
    assert_eq!(events.last().unwrap().json()["envelope"]["json"]["done"], 5);

    echo.shutdown().await;
    streamer.shutdown().await;
    node.stop().await;
}

/// Answers each message `{"n": x}` with `{"n": x}` until the socket closes.
struct Parrot;

#[tonic::async_trait]
impl agentmesh_sdk::Agent for Parrot {
    async fn invoke(
        &self,
        _ctx: agentmesh_sdk::Context,
        request: Envelope,
    ) -> Result<Envelope, tonic::Status> {
        Ok(request)
    }

    async fn converse(
        &self,
        _ctx: agentmesh_sdk::Context,
        mut conversation: agentmesh_sdk::Conversation,
    ) -> Result<(), tonic::Status> {
        while let Some(message) = conversation.recv().await {
            conversation
                .send(Envelope::json(
                    "parrot.reply",
                    message.json_payload().unwrap_or_default(),
                ))
                .await?;
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_conversations_run_over_tls() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let ca = TestCa::new("mesh CA");
    let files = TlsFiles::new(&ca, &ca.server(1));
    let node = TestNode::start_with(files.node_config(files.settings())).await;
    let parrot = start_agent_tls(&node, &ca, "parrot", Parrot).await;
    // Browsers offer both and get HTTP/1.1 for a WebSocket upgrade.
    let tls = ca
        .connect(node.address, None, &[b"http/1.1"])
        .await
        .unwrap();
    let url = format!("wss://{}/v1/agents/parrot/converse", node.address);
    let (mut socket, response) = tokio_tungstenite::client_async(url, tls).await.unwrap();
    assert_eq!(response.status().as_u16(), 101);
    for n in 1..=3 {
        let message = json!({ "type": "chat.message", "json": { "n": n } }).to_string();
        socket.send(Message::text(message)).await.unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .expect("a reply in time")
            .unwrap()
            .unwrap();
        let Message::Text(text) = reply else {
            panic!("expected text, got {reply:?}");
        };
        let envelope: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(envelope["json"], json!({ "n": n }), "{envelope}");
    }
    socket.close(None).await.unwrap();
    parrot.shutdown().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_clients_are_refused_and_the_node_keeps_serving() {
    let ca = TestCa::new("mesh CA");
    let files = TlsFiles::new(&ca, &ca.server(1));
    let node = TestNode::start_with(files.node_config(files.settings())).await;
    let echo = start_agent_tls(&node, &ca, "echo", Echo).await;

    let plaintext = node
        .client()
        .invoke("echo", Envelope::json("echo.request", json!({})))
        .await
        .unwrap_err();
    // The node closes the connection; how tonic reports that depends on when it notices.
    assert!(
        matches!(
            plaintext.code(),
            Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled
        ),
        "{plaintext:?}"
    );
    let http = agentmesh_tests::http_client()
        .post(format!("{}/v1/agents/echo/invoke", node.http_url()))
        .json(&echo_request())
        .send()
        .await;
    // A plaintext HTTP/1 request is answered with a 400 that says why.
    let http = http.expect("a plaintext HTTP/1 request is answered");
    assert_eq!(http.status(), 400);
    assert!(http.text().await.unwrap().contains("https://"));
    // A client that does not trust the node's CA is refused too.
    let stranger = TestCa::new("another CA");
    assert!(
        stranger
            .server_certificate(node.address, None)
            .await
            .is_err()
    );

    let reply = node
        .tls_client(&ca.client_tls())
        .invoke(
            "echo",
            Envelope::json("echo.request", json!({ "still": "serving" })),
        )
        .await
        .unwrap();
    assert_eq!(reply.json_payload().unwrap(), json!({ "still": "serving" }));
    // Counted: the gRPC and the HTTP/1 plaintext clients, the client that refused the node.
    let failures = "agentmesh_tls_handshake_failures_total";
    assert!(metric(&node, &ca, &format!("{failures}{{reason=\"plaintext\"}}")).await >= 2);
    assert!(metric(&node, &ca, &format!("{failures}{{reason=\"refused\"}}")).await >= 1);
    echo.shutdown().await;
    node.stop().await;
}

/// A client whose handshake the node refused: with TLS 1.3 the client learns it from the
/// node's alert after sending its request, so tonic reports it in several ways.
fn assert_refused(status: &tonic::Status) {
    assert!(
        matches!(
            status.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled
        ),
        "{status:?}"
    );
}

fn mutual(files: &TlsFiles, client_auth: ClientAuth) -> TlsSettings {
    TlsSettings {
        client_ca: files.ca.display().to_string(),
        client_auth,
        ..files.settings()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_required_refuses_clients_without_a_certificate_from_the_ca() {
    let ca = TestCa::new("mesh CA");
    let files = TlsFiles::new(&ca, &ca.server(1));
    let node = TestNode::start_with(files.node_config(mutual(&files, ClientAuth::Required))).await;
    let worker = ca.client("echo-agent");
    let running = AgentRuntime::new(card("echo"), Echo)
        .node(node.https_url())
        .node_tls(
            ca.client_tls()
                .identity_pem(worker.cert_pem.clone(), worker.key_pem.clone()),
        )
        .start()
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), running.registered(1))
        .await
        .expect("an agent with a client certificate registers");

    let request = || Envelope::json("echo.request", json!({ "m": 1 }));
    // No certificate: the handshake is refused.
    let without = node
        .tls_client(&ca.client_tls())
        .invoke("echo", request())
        .await
        .unwrap_err();
    assert_refused(&without);
    let http = ca
        .http_client(None, true)
        .post(format!("{}/v1/agents/echo/invoke", node.https_url()))
        .json(&echo_request())
        .send()
        .await;
    assert!(http.is_err(), "{http:?}");

    // A certificate from another CA: refused.
    let stranger = TestCa::new("another CA").client("intruder");
    let foreign = node
        .tls_client(
            &ca.client_tls()
                .identity_pem(stranger.cert_pem.clone(), stranger.key_pem.clone()),
        )
        .invoke("echo", request())
        .await
        .unwrap_err();
    assert_refused(&foreign);

    // A certificate from the CA: served, over gRPC and HTTP.
    let caller = ca.client("billing");
    let tls = ca
        .client_tls()
        .identity_pem(caller.cert_pem.clone(), caller.key_pem.clone());
    let reply = node
        .tls_client(&tls)
        .invoke("echo", request())
        .await
        .unwrap();
    assert_eq!(reply.json_payload().unwrap(), json!({ "m": 1 }));
    let response = ca
        .http_client(Some(&caller), true)
        .post(format!("{}/v1/agents/echo/invoke", node.https_url()))
        .json(&echo_request())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    running.shutdown().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optional_client_auth_serves_clients_with_or_without_a_certificate() {
    let ca = TestCa::new("mesh CA");
    let files = TlsFiles::new(&ca, &ca.server(1));
    let node = TestNode::start_with(files.node_config(mutual(&files, ClientAuth::Optional))).await;
    let echo = start_agent_tls(&node, &ca, "echo", Echo).await;
    let without = node
        .tls_client(&ca.client_tls())
        .invoke("echo", Envelope::json("echo.request", json!({})))
        .await;
    assert!(without.is_ok(), "{without:?}");
    let caller = ca.client("billing");
    assert!(
        ca.server_certificate(node.address, Some(&caller))
            .await
            .is_ok()
    );
    // A certificate that does not verify is still refused.
    let stranger = TestCa::new("another CA").client("intruder");
    let foreign = node
        .tls_client(
            &ca.client_tls()
                .identity_pem(stranger.cert_pem.clone(), stranger.key_pem.clone()),
        )
        .invoke("echo", Envelope::json("echo.request", json!({})))
        .await
        .unwrap_err();
    assert_refused(&foreign);
    echo.shutdown().await;
    node.stop().await;
}

/// The node's accept loop serving an app that answers with the [`TlsPeer`] it finds in the
/// request's extensions: what the node's own layers see.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_verified_client_identity_rides_in_every_request_on_the_connection() {
    let ca = TestCa::new("mesh CA");
    let files = TlsFiles::new(&ca, &ca.server(1));
    let tls = ServerTls::load(&mutual(&files, ClientAuth::Optional)).unwrap();
    let app = axum::Router::new().route(
        "/whoami",
        axum::routing::get(|peer: Option<axum::Extension<TlsPeer>>| async move {
            match peer {
                Some(axum::Extension(peer)) => format!("{}|{:?}", peer.identity, peer.common_name),
                None => "anonymous".to_owned(),
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        connections::serve(
            listener,
            app,
            &agentmesh_node::ConnectionSettings::default(),
            Some(tls),
            async move {
                let _ = stopped.await;
            },
        )
        .await;
    });
    let caller = ca.client("billing");
    for http2 in [false, true] {
        let client = ca.http_client(Some(&caller), http2);
        // Two requests on one connection: both carry the identity.
        for _ in 0..2 {
            let body = client
                .get(format!("https://{address}/whoami"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            assert_eq!(body, "billing|Some(\"billing\")");
        }
    }
    let anonymous = ca
        .http_client(None, false)
        .get(format!("https://{address}/whoami"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(anonymous, "anonymous");
    let _ = stop.send(());
    server.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_are_reloaded_when_their_files_change_and_open_streams_go_on() {
    let ca = TestCa::new("mesh CA");
    let first = ca.server(1);
    let files = TlsFiles::new(&ca, &first);
    let node = TestNode::start_with(files.node_config(files.settings())).await;
    let streamer = start_agent_tls(&node, &ca, "streamer", Streamer).await;
    assert_eq!(
        ca.server_certificate(node.address, None).await.unwrap(),
        first.der
    );

    // A long stream, open across the reload.
    let response = ca
        .http_client(None, false)
        .post(format!("{}/v1/agents/streamer/stream", node.https_url()))
        .json(&json!({ "type": "count.request", "json": { "n": 300, "delay_ms": 20 } }))
        .send()
        .await
        .unwrap();
    let mut stream = SseReader::new(response);
    let before = stream.next().await.expect("first event");

    let second = ca.server(2);
    second.write(files.dir.path(), "node");
    let reloaded = eventually(Duration::from_secs(15), || async {
        ca.server_certificate(node.address, None).await.as_ref() == Ok(&second.der)
    })
    .await;
    assert!(reloaded, "new connections get the new certificate");
    for _ in 0..3 {
        let event = stream.next().await.expect("the open stream goes on");
        assert!(event.sequence() > before.sequence());
    }
    drop(stream);

    // A broken file is not loaded: new connections keep getting the last good certificate.
    let failed = "agentmesh_tls_reloads_total{outcome=\"failed\"}";
    let failed_before = metric(&node, &ca, failed).await;
    std::fs::write(&files.cert, "not a certificate").unwrap();
    let refused = eventually(Duration::from_secs(15), || async {
        metric(&node, &ca, failed).await > failed_before
    })
    .await;
    assert!(refused, "the broken file is read and refused");
    assert_eq!(
        ca.server_certificate(node.address, None).await.unwrap(),
        second.der
    );
    // ... until a good one is written.
    let third = ca.server(3);
    third.write(files.dir.path(), "node");
    let reloaded = eventually(Duration::from_secs(15), || async {
        ca.server_certificate(node.address, None).await.as_ref() == Ok(&third.der)
    })
    .await;
    assert!(reloaded, "a good certificate after a bad one is loaded");
    let loaded = "agentmesh_tls_reloads_total{outcome=\"loaded\"}";
    assert!(metric(&node, &ca, loaded).await >= 2);

    streamer.shutdown().await;
    node.stop().await;
}

/// Echoes, and says whether its caller presented `expected` as its TLS certificate.
struct CheckingPeer {
    expected: rustls_pki_types::CertificateDer<'static>,
}

#[tonic::async_trait]
impl agentmesh_sdk::Agent for CheckingPeer {
    async fn invoke(
        &self,
        ctx: agentmesh_sdk::Context,
        request: Envelope,
    ) -> Result<Envelope, tonic::Status> {
        let mut reply = request.json_payload().unwrap_or_default();
        reply["caller_is_the_node"] =
            json!(ctx.peer_certificates().first() == Some(&self.expected));
        Ok(Envelope::json("echo.reply", reply))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_calls_agents_over_tls_and_mutual_tls() {
    let ca = TestCa::new("mesh CA");
    let dir = tempfile::tempdir().unwrap();
    let ca_file = ca.write(dir.path(), "ca");
    let node_client = ca.client("agentmesh-node");
    let (node_cert, node_key) = node_client.write(dir.path(), "node-client");
    let agent_cert = ca.server(11);

    // The agent serves TLS and asks callers for a certificate from the CA.
    let mut config = agentmesh_tests::test_config();
    config.tls.agents.ca = ca_file.display().to_string();
    config.tls.agents.cert = node_cert.display().to_string();
    config.tls.agents.key = node_key.display().to_string();
    let node = TestNode::start_with(config).await;
    let checking = CheckingPeer {
        expected: node_client.der.clone(),
    };
    let agent = AgentRuntime::new(card("secure-echo"), checking)
        .node(node.addr())
        .tls(
            AgentServerTls::from_pem(agent_cert.cert_pem.clone(), agent_cert.key_pem.clone())
                .client_ca_pem(ca.cert_pem.clone()),
        )
        .start()
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), agent.registered(1))
        .await
        .unwrap();
    assert!(agent.card().endpoint.starts_with("https://"));
    let client = node.client();
    for i in 0..3 {
        // Several calls: the one channel to the agent is reused.
        let reply = client
            .invoke(
                "secure-echo",
                Envelope::json("echo.request", json!({ "i": i })),
            )
            .await
            .unwrap();
        assert_eq!(
            reply.json_payload().unwrap(),
            json!({ "i": i, "caller_is_the_node": true }),
            "the agent sees the node's client certificate"
        );
    }

    // A node without a client certificate is refused by that agent; one that does not
    // trust the agent's CA refuses the agent.
    let mut config = agentmesh_tests::test_config();
    config.tls.agents.ca = ca_file.display().to_string();
    let anonymous = TestNode::start_with(config).await;
    let stranger_ca = TestCa::new("another CA").write(dir.path(), "other-ca");
    let mut config = agentmesh_tests::test_config();
    config.tls.agents.ca = stranger_ca.display().to_string();
    config.tls.agents.cert = node_cert.display().to_string();
    config.tls.agents.key = node_key.display().to_string();
    let distrustful = TestNode::start_with(config).await;
    for other in [&anonymous, &distrustful] {
        let registered = other
            .client()
            .discovery()
            .register(agentmesh_proto::v1::RegisterRequest {
                card: Some(agent.card().clone()),
                ttl: None,
            })
            .await;
        assert!(registered.is_ok(), "{registered:?}");
        let status = other
            .client_without_breakers()
            .invoke("secure-echo", Envelope::json("echo.request", json!({})))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(status.message().contains("unreachable"), "{status:?}");
    }

    agent.shutdown().await;
    anonymous.stop().await;
    distrustful.stop().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_tls_client_is_closed_by_the_handshake_timeout() {
    let ca = TestCa::new("mesh CA");
    let files = TlsFiles::new(&ca, &ca.server(1));
    let node = TestNode::start_with(files.node_config(TlsSettings {
        handshake_timeout: Duration::from_millis(300),
        ..files.settings()
    }))
    .await;
    let mut silent = TcpStream::connect(node.address).await.unwrap();
    let mut sink = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), silent.read_to_end(&mut sink)).await;
    assert!(read.is_ok(), "a client that never says hello is closed");
    assert!(ca.server_certificate(node.address, None).await.is_ok());
    node.stop().await;
}

#[test]
fn a_bad_certificate_file_stops_the_node_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("node.crt");
    std::fs::write(&cert, "garbage").unwrap();
    let key = dir.path().join("node.key");
    std::fs::write(&key, "garbage").unwrap();
    let error = ServerTls::load(&TlsSettings {
        cert: cert.display().to_string(),
        key: key.display().to_string(),
        ..TlsSettings::default()
    })
    .unwrap_err()
    .to_string();
    assert!(error.contains("node.crt"), "{error}");
}

/// Answers with the principal the node stamped on the call.
#[derive(Debug)]
struct WhoAmI;

#[tonic::async_trait]
impl agentmesh_sdk::Agent for WhoAmI {
    async fn invoke(
        &self,
        ctx: agentmesh_sdk::Context,
        _request: Envelope,
    ) -> Result<Envelope, tonic::Status> {
        Ok(Envelope::json(
            "whoami.reply",
            json!({ "principal": ctx.principal() }),
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_name_the_caller_when_authentication_is_on() {
    use agentmesh_core::access::{Action, PolicyRule};
    use agentmesh_node::auth::AuthConfig;

    let ca = TestCa::new("mesh CA");
    let files = TlsFiles::new(&ca, &ca.server(1));
    let rule = |principal: &str, action: Action, resource: &str| PolicyRule {
        principals: vec![principal.into()],
        actions: vec![action],
        resources: vec![resource.into()],
    };
    let mut config = files.node_config(mutual(&files, ClientAuth::Required));
    // No tokens and no JWT keys: the verified certificates are the only credentials.
    config.auth = AuthConfig {
        enabled: true,
        policy: vec![
            rule("whoami-agent", Action::Register, "whoami"),
            rule("billing", Action::Call, "whoami"),
        ],
        ..Default::default()
    };
    let node = TestNode::start_with(config).await;
    let worker = ca.client("whoami-agent");
    let running = AgentRuntime::new(card("whoami"), WhoAmI)
        .node(node.https_url())
        .node_tls(
            ca.client_tls()
                .identity_pem(worker.cert_pem.clone(), worker.key_pem.clone()),
        )
        .start()
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), running.registered(1))
        .await
        .expect("the agent registers as the principal its certificate names");

    let client_as = |name: &str| {
        let issued = ca.client(name);
        node.tls_client(
            &ca.client_tls()
                .identity_pem(issued.cert_pem.clone(), issued.key_pem.clone()),
        )
    };
    let request = || Envelope::json("whoami.request", json!({}));
    let reply = client_as("billing")
        .invoke("whoami", request())
        .await
        .unwrap();
    assert_eq!(
        reply.json_payload().unwrap(),
        json!({ "principal": "billing" })
    );
    let denied = client_as("reporting")
        .invoke("whoami", request())
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let response = ca
        .http_client(Some(&ca.client("reporting")), true)
        .post(format!("{}/v1/agents/whoami/invoke", node.https_url()))
        .json(&json!({ "json": {} }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);

    running.shutdown().await;
    node.stop().await;
}
