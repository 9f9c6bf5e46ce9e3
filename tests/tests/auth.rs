//! Authentication, authorisation and per-principal rate limits, over real sockets: API tokens
//! and JWTs (HS256, EdDSA from a PEM file and from a JWKS file, keys made at test time; RS256
//! from the test-only RSA keys in `tests/fixtures`) on gRPC and HTTP alike, group claims and
//! `?access_token=` on an event stream, the policy on calls, queues, traces and dead letters, registration
//! ownership, the caller's principal reaching the agent, and 429 / RESOURCE_EXHAUSTED.

use std::time::Duration;

use agentmesh_core::access::{Action, PolicyRule};
use agentmesh_node::{
    NodeConfig,
    auth::{AuthConfig, JwtConfig, RateLimitConfig, RateOverride, TokenConfig, hash_token},
};
use agentmesh_proto::v1::{
    AgentFilter, BreakerState, DeregisterRequest, Envelope, FanOutPolicy, FanOutRequest,
    HeartbeatRequest, InvokeRequest, RegisterRequest, agent_service_client::AgentServiceClient,
    discovery_service_client::DiscoveryServiceClient, fan_out_result::Outcome,
};
use agentmesh_sdk::{Agent, AgentRuntime, Context};
use agentmesh_tests::{
    Echo, TestNode, card, expect_gateway_error, http_client, start_agent, test_config,
};
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tonic::{Code, Status};
use tonic_types::StatusExt;

/// Answers with the principal the node stamped on the call.
#[derive(Debug)]
struct WhoAmI;

#[tonic::async_trait]
impl Agent for WhoAmI {
    async fn invoke(&self, ctx: Context, _request: Envelope) -> Result<Envelope, Status> {
        Ok(Envelope::json(
            "whoami.reply",
            json!({ "principal": ctx.principal() }),
        ))
    }
}

const HS_SECRET: &str = "a-test-secret-of-at-least-32-bytes!!";

/// Keys made for one test: an Ed25519 PEM key and a JWKS key (kid `k2`).
struct Keys {
    _dir: tempfile::TempDir,
    pem_signer: EncodingKey,
    jwks_signer: EncodingKey,
    pem_file: std::path::PathBuf,
    jwks_file: std::path::PathBuf,
}

fn keys() -> Keys {
    let dir = tempfile::tempdir().unwrap();
    let pem_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let jwks_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let pem_file = dir.path().join("ed25519.pub.pem");
    std::fs::write(&pem_file, pem_key.public_key_pem()).unwrap();
    let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(jwks_key.public_key_raw());
    let jwks = json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": x, "kid": "k2", "alg": "EdDSA", "use": "sig"}]});
    let jwks_file = dir.path().join("jwks.json");
    std::fs::write(&jwks_file, jwks.to_string()).unwrap();
    Keys {
        pem_signer: EncodingKey::from_ed_pem(pem_key.serialize_pem().as_bytes()).unwrap(),
        jwks_signer: EncodingKey::from_ed_pem(jwks_key.serialize_pem().as_bytes()).unwrap(),
        pem_file,
        jwks_file,
        _dir: dir,
    }
}

fn token(principal: &str, token: &str, groups: &[&str]) -> TokenConfig {
    TokenConfig {
        hash: hash_token(token),
        principal: principal.into(),
        groups: groups.iter().map(|g| (*g).to_owned()).collect(),
    }
}

fn rule(principals: &[&str], actions: &[Action], resources: &[&str]) -> PolicyRule {
    PolicyRule {
        principals: principals.iter().map(|p| (*p).to_owned()).collect(),
        actions: actions.to_vec(),
        resources: resources.iter().map(|r| (*r).to_owned()).collect(),
    }
}

/// The node every test here starts: tokens for alice, bob, two agents and a rate-limited
/// caller; JWTs by HS256, an Ed25519 PEM key and a JWKS file; a policy granting alice most
/// things and bob little.
fn auth_node_config(keys: &Keys) -> NodeConfig {
    NodeConfig {
        auth: AuthConfig {
            enabled: true,
            tokens: vec![
                token("alice", "alice-token", &[]),
                token("bob", "bob-token", &[]),
                token("agent-a", "agent-a-token", &["agents"]),
                token("agent-b", "agent-b-token", &["agents"]),
                token("limited", "limited-token", &[]),
            ],
            jwt: JwtConfig {
                hs256_secret: HS_SECRET.into(),
                public_key_files: vec![keys.pem_file.clone()],
                jwks_file: keys.jwks_file.clone(),
                issuer: "https://issuer.test".into(),
                audience: "agentmesh".into(),
                leeway: Duration::from_secs(5),
                ..Default::default()
            },
            policy: vec![
                rule(
                    &["group:agents"],
                    &[Action::Register],
                    &["whoami", "echo", "a-*"],
                ),
                rule(
                    &["alice"],
                    &[
                        Action::Call,
                        Action::Submit,
                        Action::Consume,
                        Action::ReadTraces,
                        Action::ReadResults,
                        Action::Redrive,
                        Action::Discover,
                    ],
                    &["*"],
                ),
                rule(&["bob"], &[Action::Call], &["whoami"]),
                rule(&["bob"], &[Action::Submit], &["bob-*"]),
                rule(&["jwt-*", "limited"], &[Action::Call], &["echo", "whoami"]),
                rule(&["group:result-readers"], &[Action::ReadResults], &["*"]),
            ],
            ..Default::default()
        },
        rate_limit: RateLimitConfig {
            overrides: vec![RateOverride {
                principal: "limited".into(),
                per_second: 0.001,
                burst: 2,
            }],
            ..Default::default()
        },
        ..test_config()
    }
}

/// Starts `agent` as `name`, registering with `agent-a`'s token.
async fn start_owned<A: Agent>(
    node: &TestNode,
    name: &str,
    agent: A,
) -> agentmesh_sdk::RunningAgent {
    let running = AgentRuntime::new(card(name), agent)
        .node(node.addr())
        .token("agent-a-token")
        .start()
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), running.registered(1))
        .await
        .expect("agent registers with its token");
    running
}

/// A node with auth on and the `echo` and `whoami` agents registered by `agent-a`.
async fn auth_node(keys: &Keys) -> (TestNode, Vec<agentmesh_sdk::RunningAgent>) {
    let node = TestNode::start_with(auth_node_config(keys)).await;
    let agents = vec![
        start_owned(&node, "echo", Echo).await,
        start_owned(&node, "whoami", WhoAmI).await,
    ];
    (node, agents)
}

fn with_bearer<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

fn invoke(target: &str) -> InvokeRequest {
    let mut envelope = Envelope::json("t", json!({"hi": 1}));
    envelope.target = target.into();
    InvokeRequest {
        envelope: Some(envelope),
    }
}

fn jwt(key: &EncodingKey, alg: Algorithm, kid: Option<&str>, claims: Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, &claims, key).unwrap()
}

fn claims(sub: &str, exp_from_now: i64) -> Value {
    let now = jsonwebtoken::get_current_timestamp() as i64;
    json!({"sub": sub, "iss": "https://issuer.test", "aud": "agentmesh", "exp": now + exp_from_now})
}

async fn http_invoke(node: &TestNode, target: &str, bearer: Option<&str>) -> reqwest::Response {
    let mut request = http_client()
        .post(format!("{}/v1/agents/{target}/invoke", node.http_url()))
        .json(&json!({"json": {"hi": 1}}));
    if let Some(token) = bearer {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap()
}

/// Calls the node's policy has denied (`/metrics`).
async fn denied(node: &TestNode) -> u64 {
    let metrics = http_client()
        .get(format!("{}/metrics", node.http_url()))
        .bearer_auth("alice-token")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let line = metrics
        .lines()
        .find(|l| l.starts_with("agentmesh_auth_denied_total "))
        .expect("denials are counted");
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// A JSON-RPC call to the A2A agent `agent` as the holder of `bearer`.
async fn a2a_rpc(node: &TestNode, agent: &str, bearer: &str, method: &str, params: Value) -> Value {
    let response = http_client()
        .post(format!("{}/a2a/{agent}", node.http_url()))
        .bearer_auth(bearer)
        .json(&json!({"jsonrpc": "2.0", "id": 7, "method": method, "params": params}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    response.json().await.unwrap()
}

#[tokio::test]
async fn a2a_task_operations_need_call_on_the_tasks_agent() {
    let keys = keys();
    let (node, _agents) = auth_node(&keys).await;
    let send = |id: &str| json!({"message": {"messageId": id, "role": "ROLE_USER", "parts": [{"text": "hi"}]}});

    // Alice may call echo: her task completes.
    let sent = a2a_rpc(&node, "echo", "alice-token", "SendMessage", send("m-alice")).await;
    let task = sent["result"]["task"]["id"]
        .as_str()
        .expect("a task")
        .to_owned();
    assert_eq!(
        sent["result"]["task"]["status"]["state"], "TASK_STATE_COMPLETED",
        "{sent}"
    );
    let denied_before = denied(&node).await;

    // Bob may call only whoami: every operation on echo's tasks is denied on JSON-RPC...
    let by_id = json!({"id": task});
    let push = json!({"taskId": task, "id": "cfg-1"});
    let create = json!({"taskId": task, "url": "http://127.0.0.1:9/hook"});
    for (method, params) in [
        ("GetTask", by_id.clone()),
        ("ListTasks", json!({})),
        ("CancelTask", by_id.clone()),
        ("SubscribeToTask", by_id.clone()),
        ("CreateTaskPushNotificationConfig", create),
        ("GetTaskPushNotificationConfig", push.clone()),
        ("ListTaskPushNotificationConfigs", json!({"taskId": task})),
        ("DeleteTaskPushNotificationConfig", push),
    ] {
        let answer = a2a_rpc(&node, "echo", "bob-token", method, params).await;
        assert_eq!(answer["error"]["code"], -32000, "{method}: {answer}");
        assert_eq!(
            answer["error"]["data"][0]["reason"], "PERMISSION_DENIED",
            "{method}: {answer}"
        );
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains("'bob' may not call 'echo'"), "{message}");
        assert!(answer.get("result").is_none(), "{method}: {answer}");
    }
    // ...and answers 403 on HTTP+JSON.
    let base = format!("{}/a2a/echo", node.http_url());
    let client = http_client();
    for request in [
        client.get(format!("{base}/tasks/{task}")),
        client.get(format!("{base}/tasks")),
        client.post(format!("{base}/tasks/{task}:cancel")),
        client.get(format!("{base}/tasks/{task}:subscribe")),
        client.post(format!("{base}/tasks/{task}:subscribe")),
        client
            .post(format!("{base}/tasks/{task}/pushNotificationConfigs"))
            .json(&json!({"url": "http://127.0.0.1:9/hook"})),
        client.get(format!("{base}/tasks/{task}/pushNotificationConfigs")),
        client.get(format!("{base}/tasks/{task}/pushNotificationConfigs/cfg-1")),
        client.delete(format!("{base}/tasks/{task}/pushNotificationConfigs/cfg-1")),
    ] {
        let response = request.bearer_auth("bob-token").send().await.unwrap();
        let url = response.url().clone();
        assert_eq!(response.status().as_u16(), 403, "{url}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(
            body["error"]["status"], "PERMISSION_DENIED",
            "{url}: {body}"
        );
        assert_eq!(body["error"]["details"][0]["reason"], "PERMISSION_DENIED");
    }
    // Each denial is counted like any other.
    assert_eq!(denied(&node).await, denied_before + 17);

    // The task is untouched, and Alice still reads it.
    let got = a2a_rpc(&node, "echo", "alice-token", "GetTask", by_id).await;
    assert_eq!(
        got["result"]["status"]["state"], "TASK_STATE_COMPLETED",
        "{got}"
    );
    let listed = a2a_rpc(&node, "echo", "alice-token", "ListTasks", json!({})).await;
    assert_eq!(
        listed["result"]["tasks"][0]["id"],
        task.as_str(),
        "{listed}"
    );

    // Bob's own agent lists only its own tasks.
    let mine = a2a_rpc(&node, "whoami", "bob-token", "SendMessage", send("m-bob")).await;
    let mine = mine["result"]["task"]["id"]
        .as_str()
        .expect("a task")
        .to_owned();
    let listed = a2a_rpc(&node, "whoami", "bob-token", "ListTasks", json!({})).await;
    let ids: Vec<&str> = listed["result"]["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["id"].as_str())
        .collect();
    assert_eq!(ids, [mine.as_str()], "{listed}");
    node.stop().await;
}

#[tokio::test]
async fn calls_without_valid_credentials_get_401_or_unauthenticated() {
    let keys = keys();
    let (node, _agents) = auth_node(&keys).await;

    // HTTP: no token, an unknown one, a malformed header.
    let response = http_invoke(&node, "echo", None).await;
    assert_eq!(
        response.headers()["www-authenticate"],
        "Bearer realm=\"agentmesh\""
    );
    expect_gateway_error(response, 401, "UNAUTHENTICATED").await;
    let response = http_invoke(&node, "echo", Some("not-a-token")).await;
    assert!(response.headers().contains_key("www-authenticate"));
    expect_gateway_error(response, 401, "UNAUTHENTICATED").await;
    let response = http_client()
        .get(format!("{}/v1/agents", node.http_url()))
        .header("authorization", "Basic YWxpY2U6eA==")
        .send()
        .await
        .unwrap();
    expect_gateway_error(response, 401, "UNAUTHENTICATED").await;

    // gRPC: the same on every service.
    let mut agents = AgentServiceClient::new(node.channel().await);
    let status = agents.invoke(invoke("echo")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let status = agents
        .invoke(with_bearer(invoke("echo"), "wrong"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let status = DiscoveryServiceClient::new(node.channel().await)
        .register(RegisterRequest {
            card: Some(card("echo")),
            ttl: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    // Health stays open, and so do the schema documents; /metrics needs a token.
    let http = http_client();
    for path in ["/healthz", "/readyz", "/openapi.json"] {
        let response = http
            .get(format!("{}{path}", node.http_url()))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
    let mut health = tonic_health::pb::health_client::HealthClient::new(node.channel().await);
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("gRPC health is open");
    let metrics = http
        .get(format!("{}/metrics", node.http_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status(), 401);
    let metrics = http
        .get(format!("{}/metrics", node.http_url()))
        .bearer_auth("alice-token")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let failures = metrics
        .lines()
        .find(|l| l.starts_with("agentmesh_auth_failures_total"))
        .expect("auth failures are counted");
    assert!(!failures.ends_with(" 0"), "{failures}");

    // A browser's EventSource can send the token as a query parameter on GET.
    let response = http
        .get(format!(
            "{}/v1/agents?access_token=alice-token",
            node.http_url()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // A valid token works on both faces.
    assert_eq!(
        http_invoke(&node, "echo", Some("alice-token"))
            .await
            .status(),
        200
    );
    agents
        .invoke(with_bearer(invoke("echo"), "alice-token"))
        .await
        .unwrap();
    node.stop().await;
}

#[tokio::test]
async fn jwts_signed_with_hs256_eddsa_and_jwks_keys_are_checked() {
    let keys = keys();
    let (node, _agents) = auth_node(&keys).await;
    let hs = EncodingKey::from_secret(HS_SECRET.as_bytes()).unwrap();
    let whoami = |token: String| {
        let node = &node;
        async move {
            node.client()
                .with_token(&token)
                .unwrap()
                .invoke("whoami", Envelope::json("t", json!({})))
                .await
        }
    };

    let reply = whoami(jwt(&hs, Algorithm::HS256, None, claims("jwt-hs", 60)))
        .await
        .unwrap();
    assert_eq!(reply.json_payload().unwrap()["principal"], "jwt-hs");
    let reply = whoami(jwt(
        &keys.pem_signer,
        Algorithm::EdDSA,
        None,
        claims("jwt-ed", 60),
    ))
    .await
    .unwrap();
    assert_eq!(reply.json_payload().unwrap()["principal"], "jwt-ed");
    let reply = whoami(jwt(
        &keys.jwks_signer,
        Algorithm::EdDSA,
        Some("k2"),
        claims("jwt-jwks", 60),
    ))
    .await
    .unwrap();
    assert_eq!(reply.json_payload().unwrap()["principal"], "jwt-jwks");

    // Expired (beyond the leeway), wrong signature, wrong issuer, a kid no key has (the
    // keys without a kid are tried, and the signature does not match them).
    let rejected = [
        jwt(&hs, Algorithm::HS256, None, claims("jwt-hs", -60)),
        jwt(
            &EncodingKey::from_secret(b"another-secret-of-at-least-32-bytes!").unwrap(),
            Algorithm::HS256,
            None,
            claims("jwt-hs", 60),
        ),
        jwt(
            &hs,
            Algorithm::HS256,
            None,
            json!({"sub": "jwt-hs", "iss": "https://elsewhere", "aud": "agentmesh", "exp": jsonwebtoken::get_current_timestamp() + 60}),
        ),
        jwt(
            &keys.jwks_signer,
            Algorithm::EdDSA,
            Some("k9"),
            claims("jwt-jwks", 60),
        ),
        jwt(
            &keys.pem_signer,
            Algorithm::EdDSA,
            None,
            claims("jwt-ed", -60),
        ),
    ];
    for token in rejected {
        let status = whoami(token.clone()).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        let response = http_invoke(&node, "whoami", Some(&token)).await;
        assert_eq!(response.status(), 401);
    }
    node.stop().await;
}

/// A file of `tests/fixtures`: RSA keys made with openssl for these tests only (rcgen makes no
/// RSA keys).
fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

fn rsa_signer(name: &str) -> EncodingKey {
    EncodingKey::from_rsa_pem(&std::fs::read(fixture(name)).unwrap()).unwrap()
}

#[tokio::test]
async fn rs256_jwts_from_a_pem_file_and_a_jwks_file_are_checked() {
    let keys = keys();
    let mut config = auth_node_config(&keys);
    config
        .auth
        .jwt
        .public_key_files
        .push(fixture("jwt-rs256-a.pub.pem"));
    // An RSA JWK (`n`, `e`) of another key, kid `rsa-b`.
    config.auth.jwt.jwks_file = fixture("jwt-rs256-b.jwks.json");
    let node = TestNode::start_with(config).await;
    let _whoami = start_owned(&node, "whoami", WhoAmI).await;
    let pem_key = rsa_signer("jwt-rs256-a.key.pem");
    let jwks_key = rsa_signer("jwt-rs256-b.key.pem");
    let other_key = rsa_signer("jwt-rs256-other.key.pem");
    let whoami = |token: String| {
        let node = &node;
        async move {
            node.client()
                .with_token(&token)
                .unwrap()
                .invoke("whoami", Envelope::json("t", json!({})))
                .await
        }
    };

    for (token, principal) in [
        (
            jwt(&pem_key, Algorithm::RS256, None, claims("jwt-rsa-pem", 60)),
            "jwt-rsa-pem",
        ),
        (
            jwt(
                &jwks_key,
                Algorithm::RS256,
                Some("rsa-b"),
                claims("jwt-rsa-jwks", 60),
            ),
            "jwt-rsa-jwks",
        ),
    ] {
        let reply = whoami(token.clone()).await.unwrap();
        assert_eq!(reply.json_payload().unwrap()["principal"], principal);
        let response = http_invoke(&node, "whoami", Some(&token)).await;
        assert_eq!(response.status(), 200);
        let reply: Value = response.json().await.unwrap();
        assert_eq!(reply["json"]["principal"], principal, "{reply}");
    }

    // Signed by an RSA key the node does not know, with no kid or the JWKS key's kid; and
    // an RS256 token expired beyond the leeway.
    let rejected = [
        jwt(
            &other_key,
            Algorithm::RS256,
            None,
            claims("jwt-rsa-pem", 60),
        ),
        jwt(
            &other_key,
            Algorithm::RS256,
            Some("rsa-b"),
            claims("jwt-rsa-jwks", 60),
        ),
        jwt(&pem_key, Algorithm::RS256, None, claims("jwt-rsa-pem", -60)),
    ];
    for token in rejected {
        let status = whoami(token.clone()).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        let response = http_invoke(&node, "whoami", Some(&token)).await;
        assert_eq!(response.status(), 401);
    }
    node.stop().await;
}

/// An EventSource cannot set headers: its JWT rides in `?access_token=`, and the groups in
/// the JWT's `groups` claim are what `group:` rules match.
#[tokio::test]
async fn a_jwt_groups_claim_grants_a_result_stream_read_with_access_token() {
    let keys = keys();
    let node = TestNode::start_with(auth_node_config(&keys)).await;
    let hs = EncodingKey::from_secret(HS_SECRET.as_bytes()).unwrap();
    let token = |groups: Value| {
        let mut claims = claims("reader", 60);
        claims["groups"] = groups;
        jwt(&hs, Algorithm::HS256, None, claims)
    };
    let events = |token: Option<String>| {
        let mut url = format!("{}/v1/results/corr-sse-1/events", node.http_url());
        if let Some(token) = token {
            url.push_str(&format!("?access_token={token}"));
        }
        // Nothing is submitted under this id: the wait ends at the call's deadline.
        http_client().get(url).header("x-timeout-ms", "300").send()
    };

    let response = events(Some(token(json!(["staff", "result-readers"]))))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let body = response.text().await.unwrap();
    assert!(body.contains("event: error"), "{body}");
    assert!(body.contains("DEADLINE_EXCEEDED"), "{body}");

    // A group as a single string counts too.
    let response = events(Some(token(json!("result-readers")))).await.unwrap();
    assert_eq!(response.status(), 200);
    drop(response);

    let response = events(Some(token(json!(["staff"])))).await.unwrap();
    assert_eq!(response.status(), 403);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "PERMISSION_DENIED", "{body}");

    let response = events(None).await.unwrap();
    assert_eq!(response.status(), 401);
    assert!(response.headers().contains_key("www-authenticate"));
    node.stop().await;
}

#[tokio::test]
async fn the_policy_allows_and_denies_calls_without_touching_the_breaker() {
    let keys = keys();
    let (node, _agents) = auth_node(&keys).await;
    let bob = node
        .client_without_breakers()
        .with_token("bob-token")
        .unwrap();
    bob.invoke("whoami", Envelope::json("t", json!({})))
        .await
        .expect("bob may call whoami");
    for _ in 0..8 {
        let status = bob
            .invoke("echo", Envelope::json("t", json!({})))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert!(
            status.message().contains("call 'echo'"),
            "{}",
            status.message()
        );
        assert_eq!(
            status.get_error_details().error_info().unwrap().reason,
            "PERMISSION_DENIED"
        );
        let response = http_invoke(&node, "echo", Some("bob-token")).await;
        let body = expect_gateway_error(response, 403, "PERMISSION_DENIED").await;
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("'echo'"),
            "{body}"
        );
    }
    // Fan-out checks every target: the denied one fails in the results.
    let fanned = bob
        .fan_out(FanOutRequest {
            envelope: Some(Envelope::json("t", json!({}))),
            targets: vec!["whoami".into(), "echo".into()],
            policy: FanOutPolicy::BestEffort as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    for result in &fanned.results {
        match (result.target.as_str(), &result.outcome) {
            ("whoami", Some(Outcome::Envelope(_))) => {}
            ("echo", Some(Outcome::Error(error))) => {
                assert_eq!(error.code, Code::PermissionDenied as i32, "{error:?}")
            }
            other => panic!("unexpected fan-out result {other:?}"),
        }
    }

    // Denials never reached the agent: its breaker is closed and alice gets through.
    let alice = node.client().with_token("alice-token").unwrap();
    let instances = alice
        .lookup(AgentFilter {
            name: "echo".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(instances.len(), 1);
    assert_eq!(instances[0].breaker, BreakerState::Closed as i32);
    alice
        .invoke("echo", Envelope::json("t", json!({})))
        .await
        .unwrap();
    // Bob discovers nothing; alice sees both agents.
    assert!(bob.lookup(AgentFilter::default()).await.unwrap().is_empty());
    assert_eq!(alice.lookup(AgentFilter::default()).await.unwrap().len(), 2);
    let metrics = http_client()
        .get(format!("{}/metrics", node.http_url()))
        .bearer_auth("alice-token")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let denied = metrics
        .lines()
        .find(|l| l.starts_with("agentmesh_auth_denied_total "))
        .expect("denials are counted");
    let denied: u64 = denied.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(denied >= 17, "{denied}");
    node.stop().await;
}

#[tokio::test]
async fn nobody_renews_replaces_or_deregisters_another_principals_lease() {
    let keys = keys();
    let (node, agents) = auth_node(&keys).await;
    let registration = agents[0].registration();
    let lease_id = registration.lease_id.clone().unwrap();
    let mut discovery = DiscoveryServiceClient::new(node.channel().await);

    // agent-b may register `echo` instances, but not take over agent-a's.
    let mut taken = card("echo");
    taken.instance_id = registration.instance_id.clone();
    taken.endpoint = "http://127.0.0.1:1".into();
    let status = discovery
        .register(with_bearer(
            RegisterRequest {
                card: Some(taken),
                ttl: None,
            },
            "agent-b-token",
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    for status in [
        discovery
            .heartbeat(with_bearer(
                HeartbeatRequest {
                    lease_id: lease_id.clone(),
                },
                "agent-b-token",
            ))
            .await
            .unwrap_err(),
        discovery
            .deregister(with_bearer(
                DeregisterRequest {
                    lease_id: lease_id.clone(),
                },
                "agent-b-token",
            ))
            .await
            .unwrap_err(),
    ] {
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    }
    // A name the policy does not give agent-b, and a principal without `register`.
    let status = discovery
        .register(with_bearer(
            RegisterRequest {
                card: Some(card("billing")),
                ttl: None,
            },
            "agent-b-token",
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let status = discovery
        .register(with_bearer(
            RegisterRequest {
                card: Some(card("a-new")),
                ttl: None,
            },
            "bob-token",
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    // agent-b registers an instance of its own, and the owner renews its lease.
    let mut own = card("a-new");
    own.endpoint = "http://127.0.0.1:1".into();
    let registered = discovery
        .register(with_bearer(
            RegisterRequest {
                card: Some(own),
                ttl: None,
            },
            "agent-b-token",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        registered.card.unwrap().metadata["agentmesh.principal"],
        "agent-b",
        "the registry records the owner"
    );
    discovery
        .heartbeat(with_bearer(
            HeartbeatRequest {
                lease_id: lease_id.clone(),
            },
            "agent-a-token",
        ))
        .await
        .expect("the owner renews");
    // agent-a's echo still serves.
    node.client()
        .with_token("alice-token")
        .unwrap()
        .invoke("echo", Envelope::json("t", json!({})))
        .await
        .unwrap();
    node.stop().await;
}

#[tokio::test]
async fn the_agent_sees_the_callers_principal_and_never_a_spoofed_one() {
    let keys = keys();
    let (node, _agents) = auth_node(&keys).await;
    let mut agents = AgentServiceClient::new(node.channel().await);
    let mut request = with_bearer(invoke("whoami"), "alice-token");
    request
        .metadata_mut()
        .insert("x-agentmesh-principal", "mallory".parse().unwrap());
    let reply = agents.invoke(request).await.unwrap().into_inner();
    assert_eq!(
        reply.envelope.unwrap().json_payload().unwrap()["principal"],
        "alice"
    );
    let reply: Value = http_client()
        .post(format!("{}/v1/agents/whoami/invoke", node.http_url()))
        .bearer_auth("bob-token")
        .header("x-agentmesh-principal", "mallory")
        .json(&json!({"json": {}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(reply["json"]["principal"], "bob", "{reply}");
    node.stop().await;

    // Without authentication there is no principal, and a caller cannot invent one.
    let open = TestNode::start().await;
    let _whoami = start_agent(&open, card("whoami"), WhoAmI).await;
    let reply: Value = http_client()
        .post(format!("{}/v1/agents/whoami/invoke", open.http_url()))
        .header("x-agentmesh-principal", "mallory")
        .json(&json!({"json": {}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(reply["json"]["principal"], Value::Null, "{reply}");
    open.stop().await;
}

#[tokio::test]
async fn queues_traces_and_dead_letters_follow_the_policy() {
    let keys = keys();
    let (node, _agents) = auth_node(&keys).await;
    let http = http_client();
    let base = node.http_url();
    let submit = |queue: &'static str, token: &'static str| {
        http.post(format!("{base}/v1/queues/{queue}/messages"))
            .bearer_auth(token)
            .header("x-correlation-id", format!("corr-{queue}-{token}"))
            .json(&json!({"type": "job", "json": {"n": 1}}))
            .send()
    };
    assert_eq!(submit("jobs", "alice-token").await.unwrap().status(), 201);
    assert_eq!(submit("bob-jobs", "bob-token").await.unwrap().status(), 201);
    let denied = submit("jobs", "bob-token").await.unwrap();
    expect_gateway_error(denied, 403, "PERMISSION_DENIED").await;

    // gRPC consume: bob may not; alice gets the message.
    let bob = node.client().with_token("bob-token").unwrap();
    let mut bob_queues = bob.queues();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(agentmesh_proto::v1::ConsumeRequest {
        action: Some(agentmesh_proto::v1::consume_request::Action::Subscribe(
            agentmesh_proto::v1::ConsumeSubscribe {
                queue: "jobs".into(),
                ..Default::default()
            },
        )),
    })
    .await
    .unwrap();
    let status = bob_queues
        .consume(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    // Traces: alice may read them, bob may not.
    let trace = |token: &'static str| {
        http.get(format!("{base}/v1/traces/corr-jobs-alice-token"))
            .bearer_auth(token)
            .send()
    };
    assert_eq!(trace("alice-token").await.unwrap().status(), 200);
    expect_gateway_error(trace("bob-token").await.unwrap(), 403, "PERMISSION_DENIED").await;

    // Dead letters: alice may redrive (nothing there yet), bob may neither redrive nor
    // purge; alice may not purge either (no rule grants it).
    let dead_letters = |action: &'static str, token: &'static str| {
        http.post(format!("{base}/v1/queues/jobs/dead-letters/{action}"))
            .bearer_auth(token)
            .json(&json!({"all": true}))
            .send()
    };
    assert_eq!(
        dead_letters("redrive", "alice-token")
            .await
            .unwrap()
            .status(),
        200
    );
    for (action, token) in [
        ("redrive", "bob-token"),
        ("purge", "bob-token"),
        ("purge", "alice-token"),
    ] {
        let response = dead_letters(action, token).await.unwrap();
        let body = expect_gateway_error(response, 403, "PERMISSION_DENIED").await;
        assert!(
            body["error"]["message"].as_str().unwrap().contains(action),
            "{body}"
        );
    }
    // Listing queues shows each caller the queues it may use.
    let listed: Value = http
        .get(format!("{base}/v1/queues"))
        .bearer_auth("bob-token")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = listed["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["bob-jobs"], "{listed}");
    node.stop().await;
}

#[tokio::test]
async fn over_the_rate_callers_get_429_or_resource_exhausted_and_others_do_not() {
    let keys = keys();
    let (node, _agents) = auth_node(&keys).await;
    // `limited` has a burst of 2 and then one call every 1000 s.
    assert_eq!(
        http_invoke(&node, "echo", Some("limited-token"))
            .await
            .status(),
        200
    );
    assert_eq!(
        http_invoke(&node, "echo", Some("limited-token"))
            .await
            .status(),
        200
    );
    let response = http_invoke(&node, "echo", Some("limited-token")).await;
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after > 1, "{retry_after}");
    expect_gateway_error(response, 429, "RESOURCE_EXHAUSTED").await;

    let limited = node
        .client_without_breakers()
        .with_token("limited-token")
        .unwrap();
    let status = limited
        .invoke("echo", Envelope::json("t", json!({})))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let retry = status
        .get_error_details()
        .retry_info()
        .expect("RetryInfo")
        .retry_delay
        .expect("a delay");
    assert!(retry > Duration::from_secs(1), "{retry:?}");

    // Everyone else is unaffected.
    for _ in 0..10 {
        assert_eq!(
            http_invoke(&node, "echo", Some("alice-token"))
                .await
                .status(),
            200
        );
    }
    let metrics = http_client()
        .get(format!("{}/metrics", node.http_url()))
        .bearer_auth("alice-token")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l == "agentmesh_rate_limited_total 2"),
        "{metrics}"
    );
    node.stop().await;
}

#[tokio::test]
async fn without_authentication_the_rate_limit_is_per_peer_address() {
    let node = TestNode::start_with(NodeConfig {
        rate_limit: RateLimitConfig {
            per_second: 0.001,
            burst: 2,
            ..Default::default()
        },
        ..test_config()
    })
    .await;
    let _echo = start_agent(&node, card("echo"), Echo).await;
    // The agent's registration and heartbeats come from this address too: within a few
    // calls the bucket of two is empty.
    let mut refused = None;
    for _ in 0..4 {
        let response = http_invoke(&node, "echo", None).await;
        if response.status() == 429 {
            refused = Some(response);
            break;
        }
        assert_eq!(response.status(), 200);
    }
    let response = refused.expect("the third call from one address is refused");
    assert!(response.headers().contains_key("retry-after"));
    expect_gateway_error(response, 429, "RESOURCE_EXHAUSTED").await;
    // Health probes are never limited.
    let health = http_client()
        .get(format!("{}/healthz", node.http_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    drop(_echo);
    node.stop().await;
}

/// A node refuses to start with auth on and nobody able to authenticate.
#[test]
fn auth_on_without_credentials_is_refused() {
    let config = NodeConfig {
        auth: AuthConfig {
            enabled: true,
            ..Default::default()
        },
        ..test_config()
    };
    let error = config.validate().unwrap_err();
    assert!(error.contains("auth.enabled"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_authentication_a_token_sent_anyway_is_ignored() {
    let node = TestNode::start_with(test_config()).await;
    let listed = http_client()
        .get(format!(
            "{}/v1/agents?access_token=left-over",
            node.http_url()
        ))
        .bearer_auth("left-over")
        .send()
        .await
        .unwrap();
    assert_eq!(listed.status(), 200);
    let listed = http_client()
        .get(format!(
            "{}/v1/agents?access_token=left-over",
            node.http_url()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(listed.status(), 200, "{:?}", listed.text().await);
}
