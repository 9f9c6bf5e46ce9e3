//! `agentmesh serve` with `[tls]` set by flags, and the client commands' `--ca`, `--cert` and
//! `--key` (and their variables) against it, with mutual TLS required.

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use agentmesh_sdk::AgentRuntime;
use agentmesh_tests::{Echo, card, free_port, tls::TestCa};

const BIN: &str = env!("CARGO_BIN_EXE_agentmesh");

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_commands_reach_a_mutual_tls_node() {
    let ca = TestCa::new("mesh CA");
    let dir = tempfile::tempdir().unwrap();
    let ca_file = ca.write(dir.path(), "ca");
    let (cert, key) = ca.server(1).write(dir.path(), "node");
    let caller = ca.client("operator");
    let (caller_cert, caller_key) = caller.write(dir.path(), "operator");
    let address = format!("127.0.0.1:{}", free_port());
    let _node = Killed(
        Command::new(BIN)
            .args(["serve", "--listen", &address, "--data-dir"])
            .arg(dir.path().join("data"))
            .arg("--set")
            .arg(format!("tls.cert={}", cert.display()))
            .arg("--set")
            .arg(format!("tls.key={}", key.display()))
            .arg("--set")
            .arg(format!("tls.client_ca={}", ca_file.display()))
            .env("AGENTMESH_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let https = format!("https://{address}");
    // Registering needs a client certificate too; the agent retries until the node is up.
    let agent = AgentRuntime::new(card("echo"), Echo)
        .node(https.clone())
        .node_tls(
            ca.client_tls()
                .identity_pem(caller.cert_pem.clone(), caller.key_pem.clone()),
        )
        .start()
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(20), agent.registered(1))
        .await
        .expect("the agent registers with the TLS node");

    let cli = |args: &[&str], envs: &[(&str, &std::path::Path)]| {
        let mut command = Command::new(BIN);
        command.args(args).env("AGENTMESH_NODE", &https);
        for (name, value) in envs {
            command.env(name, value);
        }
        command.output().unwrap()
    };
    let ca_arg = ca_file.display().to_string();
    let cert_arg = caller_cert.display().to_string();
    let key_arg = caller_key.display().to_string();
    let call = cli(
        &[
            "call",
            "echo",
            "--json",
            r#"{"over":"tls"}"#,
            "--ca",
            &ca_arg,
            "--cert",
            &cert_arg,
            "--key",
            &key_arg,
        ],
        &[],
    );
    assert!(call.status.success(), "{call:?}");
    let reply: serde_json::Value = serde_json::from_slice(&call.stdout).unwrap();
    assert_eq!(reply, serde_json::json!({"over": "tls"}));

    // The same through the variables.
    let listing = cli(
        &["agents"],
        &[
            ("AGENTMESH_CA", &ca_file),
            ("AGENTMESH_CERT", &caller_cert),
            ("AGENTMESH_KEY", &caller_key),
        ],
    );
    assert!(listing.status.success(), "{listing:?}");
    assert!(String::from_utf8_lossy(&listing.stdout).contains("echo"));

    // Without a client certificate the node refuses the connection.
    let refused = cli(&["call", "echo", "--json", "{}", "--ca", &ca_arg], &[]);
    assert!(!refused.status.success(), "{refused:?}");

    agent.shutdown().await;
}
