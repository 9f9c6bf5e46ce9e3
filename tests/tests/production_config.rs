//! The README's "Running in production" configuration, loaded as written: its paths point
//! at certificates and keys made here, and the node it configures refuses callers without
//! credentials and applies its policy to an API token, a JWT and a client certificate.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agentmesh_node::NodeConfig;
use agentmesh_proto::v1::Envelope;
use agentmesh_sdk::AgentRuntime;
use agentmesh_tests::{Echo, TestNode, card, tls::TestCa};
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

const README: &str = include_str!("../../README.md");
const MARKER: &str = "<!-- production.toml: tests/tests/production_config.rs loads this block -->";

/// The TOML block that follows the marker in the README.
fn readme_config() -> String {
    let after = README
        .split_once(MARKER)
        .expect("the README marks its production configuration")
        .1;
    let body = after
        .trim_start()
        .strip_prefix("```toml\n")
        .expect("a toml block follows the marker");
    body[..body.find("```").expect("the block ends")].to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_production_configuration_of_the_readme_serves_only_who_it_names() {
    let etc = tempfile::tempdir().unwrap();
    let tls_dir = etc.path().join("tls");
    std::fs::create_dir(&tls_dir).unwrap();
    let node_ca = TestCa::new("node CA");
    node_ca.server(1).write(&tls_dir, "node");
    let clients_ca = TestCa::new("clients CA");
    clients_ca.write(&tls_dir, "clients-ca");
    TestCa::new("agents CA").write(&tls_dir, "agents-ca");
    let signer = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(signer.public_key_raw());
    let jwks =
        json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": x, "kid": "idp-1", "alg": "EdDSA"}]});
    std::fs::write(etc.path().join("jwks.json"), jwks.to_string()).unwrap();

    let text = readme_config().replace("/etc/agentmesh/", &format!("{}/", etc.path().display()));
    let mut config = NodeConfig::from_toml(&text).expect("the README's configuration loads");
    config.shutdown_grace = Duration::from_secs(1);
    assert!(config.auth.enabled && config.tls.enabled());
    assert!(config.rate_limit.per_second > 0.0);
    let node = TestNode::start_with(config).await;
    let base = node.https_url();

    // The billing agent registers with its client certificate (issued to billing-agent).
    let issued = clients_ca.client("billing-agent");
    let agent = AgentRuntime::new(card("billing"), Echo)
        .node(base.clone())
        .node_tls(
            node_ca
                .client_tls()
                .identity_pem(issued.cert_pem.clone(), issued.key_pem.clone()),
        )
        .start()
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), agent.registered(1))
        .await
        .expect("billing-agent may register billing");

    let http = node_ca.http_client(None, true);
    let invoke = |agent: &str, bearer: Option<String>| {
        let mut request = http
            .post(format!("{base}/v1/agents/{agent}/invoke"))
            .json(&json!({ "json": { "amount": 3 } }));
        if let Some(bearer) = bearer {
            request = request.bearer_auth(bearer);
        }
        request.send()
    };

    // No credentials: 401.
    let anonymous = invoke("billing", None).await.unwrap();
    assert_eq!(anonymous.status(), 401);

    // The API token whose hash is in the file: frontend may call billing.
    let frontend = Some("change-me-frontend-token".to_owned());
    let reply = invoke("billing", frontend.clone()).await.unwrap();
    assert_eq!(reply.status(), 200);
    let reply: serde_json::Value = reply.json().await.unwrap();
    assert_eq!(reply["json"], json!({ "amount": 3 }), "{reply}");
    // ... and nothing else.
    let denied = http
        .get(format!("{base}/v1/traces/{}", agentmesh_proto::new_id()))
        .bearer_auth("change-me-frontend-token")
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), 403);

    // A JWT from the identity provider, for an operator: may read traces.
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 300;
    let claims = json!({
        "sub": "dana", "groups": ["operators"], "exp": exp,
        "iss": "https://login.example.com/", "aud": "agentmesh",
    });
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some("idp-1".into());
    let key = EncodingKey::from_ed_pem(signer.serialize_pem().as_bytes()).unwrap();
    let jwt = jsonwebtoken::encode(&header, &claims, &key).unwrap();
    let traces = http
        .get(format!("{base}/v1/traces/{}", agentmesh_proto::new_id()))
        .bearer_auth(&jwt)
        .send()
        .await
        .unwrap();
    assert_ne!(traces.status(), 401);
    assert_ne!(traces.status(), 403);
    // A token for another audience is refused.
    let stranger = jsonwebtoken::encode(
        &header,
        &json!({ "sub": "dana", "exp": exp, "iss": "https://login.example.com/", "aud": "other" }),
        &key,
    )
    .unwrap();
    assert_eq!(
        invoke("billing", Some(stranger)).await.unwrap().status(),
        401
    );

    // A client certificate names its caller: billing-agent may register, not call.
    let as_agent = node.tls_client(
        &node_ca
            .client_tls()
            .identity_pem(issued.cert_pem.clone(), issued.key_pem.clone()),
    );
    let refused = as_agent
        .invoke("billing", Envelope::json("charge", json!({})))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");

    agent.shutdown().await;
    node.stop().await;
}
