//! The `agentmesh` binary end to end: `serve --demo-agents`, the client
//! commands, grpcurl through server reflection, and graceful shutdown.

use std::{
    io::Write,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

const BIN: &str = env!("CARGO_BIN_EXE_agentmesh");

/// A node process with the demo agents, killed on drop.
struct NodeProcess {
    child: Child,
    address: String,
    /// The node's queue store (each node its own, removed afterwards).
    _data: tempfile::TempDir,
}

impl NodeProcess {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let address = format!("127.0.0.1:{port}");
        let data = tempfile::tempdir().unwrap();
        let child = Command::new(BIN)
            .args(["serve", "--demo-agents", "--listen", &address])
            .env("AGENTMESH_DATA_DIR", data.path())
            .env("AGENTMESH_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let node = Self {
            child,
            address,
            _data: data,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            let out = node.cli(&["agents"]);
            if String::from_utf8_lossy(&out.stdout).contains("counter") {
                return node;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("node with demo agents did not come up");
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .env("AGENTMESH_NODE", &self.address)
            .output()
            .unwrap()
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn serve_with_demo_agents_then_call_and_list() {
    let node = NodeProcess::start();
    let agents = node.cli(&["agents"]);
    let listing = String::from_utf8_lossy(&agents.stdout);
    assert!(
        listing.contains("echo") && listing.contains("counter"),
        "{listing}"
    );

    let call = node.cli(&["call", "echo", "--json", r#"{"text":"hi"}"#]);
    assert!(call.status.success(), "{call:?}");
    let reply: serde_json::Value = serde_json::from_slice(&call.stdout).unwrap();
    assert_eq!(reply, serde_json::json!({"text": "hi"}));

    let missing = node.cli(&["call", "nobody", "--json", "{}"]);
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        stderr.contains("NotFound") && stderr.contains("nobody"),
        "{stderr}"
    );

    let bad_json = node.cli(&["call", "echo", "--json", "{not json"]);
    assert!(!bad_json.status.success());
    assert!(String::from_utf8_lossy(&bad_json.stderr).contains("--json"));
}

#[test]
fn sigterm_shuts_the_node_down_gracefully() {
    let mut node = NodeProcess::start();
    let pid = node.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = node.child.try_wait().unwrap() {
            assert!(status.success(), "node exited with {status}");
            break;
        }
        assert!(Instant::now() < deadline, "node did not stop after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// grpcurl (1.8.6 speaks reflection v1alpha only) against the real binary.
#[test]
#[ignore = "needs AGENTMESH_TEST_GRPCURL"]
fn grpcurl_lists_checks_and_invokes() {
    let grpcurl = agentmesh_tests::outside_tool("AGENTMESH_TEST_GRPCURL", "a grpcurl binary");
    let node = NodeProcess::start();
    let run = |args: &[&str]| {
        let out = Command::new(&grpcurl).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "grpcurl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let list = run(&["-plaintext", &node.address, "list"]);
    for service in [
        "agentmesh.v1.AgentService",
        "agentmesh.v1.DiscoveryService",
        "agentmesh.v1.QueueService",
        "grpc.health.v1.Health",
    ] {
        assert!(list.contains(service), "{service} not in {list}");
    }
    let health = run(&["-plaintext", &node.address, "grpc.health.v1.Health/Check"]);
    assert!(health.contains("SERVING"), "{health}");
    let describe = run(&[
        "-plaintext",
        &node.address,
        "describe",
        "grpc.health.v1.Health",
    ]);
    assert!(describe.contains("rpc Check"), "{describe}");
    let invoke = run(&[
        "-plaintext",
        "-v",
        "-d",
        r#"{"envelope":{"target":"echo","json":{"text":"hi"}}}"#,
        &node.address,
        "agentmesh.v1.AgentService/Invoke",
    ]);
    assert!(invoke.contains("x-correlation-id:"), "{invoke}");
    assert!(invoke.contains(r#""text": "hi""#), "{invoke}");
}

/// `agentmesh auth hash-token` prints what `[[auth.tokens]]` stores; with authentication on,
/// the demo agents register with `AGENTMESH_TOKEN`, and the client commands are refused
/// without a token and served with `--token` or `AGENTMESH_TOKEN`.
#[test]
fn auth_hash_token_and_client_tokens() {
    let hashed = Command::new(BIN)
        .args(["auth", "hash-token", "ops-token"])
        .output()
        .unwrap();
    assert!(hashed.status.success(), "{hashed:?}");
    let hash = String::from_utf8(hashed.stdout).unwrap().trim().to_owned();
    // printf %s ops-token | sha256sum
    assert_eq!(
        hash,
        "sha256:d9310c002af91822beb0b3487d8b04f85bf6bf1f8a5496bff7d35fc7c5a29def"
    );
    let mut stdin_hash = Command::new(BIN)
        .args(["auth", "hash-token"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    stdin_hash
        .stdin
        .take()
        .unwrap()
        .write_all(b"ops-token\n")
        .unwrap();
    let from_stdin = stdin_hash.wait_with_output().unwrap();
    assert_eq!(String::from_utf8(from_stdin.stdout).unwrap().trim(), hash);

    let data = tempfile::tempdir().unwrap();
    let config = data.path().join("agentmesh.toml");
    std::fs::write(
        &config,
        format!(
            r#"
            [auth]
            enabled = true
            [[auth.tokens]]
            hash = "{hash}"
            principal = "ops"
            [[auth.policy]]
            principals = ["ops"]
            actions = ["*"]
            "#
        ),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let address = format!("127.0.0.1:{port}");
    let mut child = Command::new(BIN)
        .args(["serve", "--demo-agents", "--listen", &address, "--config"])
        .arg(&config)
        .env("AGENTMESH_DATA_DIR", data.path().join("data"))
        .env("AGENTMESH_LOG", "warn")
        .env("AGENTMESH_TOKEN", "ops-token")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let cli = |args: &[&str], token: Option<&str>| {
        let mut command = Command::new(BIN);
        command
            .args(args)
            .env("AGENTMESH_NODE", &address)
            .env_remove("AGENTMESH_TOKEN");
        if let Some(token) = token {
            command.env("AGENTMESH_TOKEN", token);
        }
        command.output().unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut up = false;
    while Instant::now() < deadline {
        let out = cli(&["agents"], Some("ops-token"));
        if String::from_utf8_lossy(&out.stdout).contains("counter") {
            up = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let refused = cli(&["call", "echo", "--json", "{}"], None);
    let with_flag = cli(
        &[
            "call",
            "echo",
            "--json",
            r#"{"a":1}"#,
            "--token",
            "ops-token",
        ],
        None,
    );
    let wrong = cli(&["call", "echo", "--json", "{}"], Some("nope"));
    let _ = child.kill();
    let _ = child.wait();
    assert!(up, "the demo agents registered with AGENTMESH_TOKEN");
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("Unauthenticated"), "{stderr}");
    assert!(with_flag.status.success(), "{with_flag:?}");
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&with_flag.stdout).unwrap(),
        serde_json::json!({"a": 1})
    );
    assert!(!wrong.status.success());
}
