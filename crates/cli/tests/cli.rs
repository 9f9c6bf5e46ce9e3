//! The `agentmesh` binary end to end: `serve --demo-agents`, the client
//! commands, grpcurl through server reflection, and graceful shutdown.

use std::{
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
