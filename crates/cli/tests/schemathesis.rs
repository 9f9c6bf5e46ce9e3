//! The gateway against its own OpenAPI document: schemathesis runs every check against
//! `agentmesh serve --demo-agents` and must find nothing.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

const BIN: &str = env!("CARGO_BIN_EXE_agentmesh");

/// What schemathesis is told beyond the command line, with why.
///
/// - `allow-extra-parameters = false`: the document lists the headers and query parameters
///   the gateway reads, not every one a client may send. HTTP clients and proxies add
///   headers of their own (User-Agent, X-Forwarded-For, ...), so the gateway ignores
///   unknown ones; schemathesis would otherwise expect them refused.
/// - `negative_data_rejection` also takes 413 and 431: a body or header over its limit is
///   refused with those statuses, which are rejections as much as 400 is.
/// - `query.pageToken = ""`: a page token is opaque (the store's `nextPageToken`; its form
///   differs between the embedded and the Redis store), so a made-up one is refused; the run
///   lists from the first page.
/// - No credentials, and no `ignored_auth` check (`--exclude-checks`): the document declares
///   what a node with authentication on requires (a bearer token, or `access_token` on a
///   GET), and this node runs with it off, so every route answers without a token and reads
///   no `access_token` (tests/tests/auth.rs covers the node with authentication on).
/// - `fan_out` may answer 400 to a request the document allows: "`count` at most the number
///   of destinations" (with a skill, the number of its instances) is a rule JSON Schema
///   cannot state; the document says it in words.
/// - `add_a2a` may answer 400 to a request the document allows: its `url` must be an http(s)
///   URL of a reachable A2A agent. The body's schema stays loose so that the run never makes
///   the node fetch generated URLs.
const CONFIG: &str = r#"
[generation]
allow-extra-parameters = false
with-security-parameters = false

[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "431", "5XX"]

[parameters]
"query.pageToken" = ""

[[operations]]
include-operation-id = "fan_out"
checks.positive_data_acceptance.expected-statuses = ["2XX", "400", "404"]

[[operations]]
include-operation-id = "add_a2a"
checks.positive_data_acceptance.expected-statuses = ["2XX", "400", "503", "504"]
"#;

/// A node with the demo agents, killed on drop. Deadlines are capped at one second so that
/// `?wait=true` and result streams end quickly under generated input.
struct Node {
    child: Child,
    address: String,
    _data: tempfile::TempDir,
}

impl Node {
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
            .args([
                "--set",
                "max_timeout=1s",
                "--set",
                "router.default_timeout=1s",
            ])
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
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let out = Command::new(BIN)
                .arg("agents")
                .env("AGENTMESH_NODE", &node.address)
                .output()
                .unwrap();
            if String::from_utf8_lossy(&out.stdout).contains("counter") {
                return node;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("node with demo agents did not come up");
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// schemathesis (PyPI, the path in `AGENTMESH_TEST_SCHEMATHESIS`) with `--checks all` over
/// every phase: examples, coverage (boundary and invalid values of every parameter and
/// body), fuzzing, and stateful (sequences that feed one answer's ids into the next call).
/// A fixed seed and 20 examples per operation keep it reproducible and within a few
/// minutes; one worker, because schemathesis' generator is not reliable across threads.
#[test]
#[ignore = "needs AGENTMESH_TEST_SCHEMATHESIS"]
fn the_gateway_does_what_its_openapi_document_says() {
    let schemathesis = match std::env::var("AGENTMESH_TEST_SCHEMATHESIS") {
        Ok(path) if !path.is_empty() => path,
        _ => panic!(
            "AGENTMESH_TEST_SCHEMATHESIS is not set: this test needs the schemathesis command \
             (pip install schemathesis). Set it, or run .ci/run"
        ),
    };
    let node = Node::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("schemathesis.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let output = Command::new(&schemathesis)
        .arg("--config-file")
        .arg(&config)
        .arg("run")
        .arg(format!("http://{}/openapi.json", node.address))
        .args(["--checks", "all", "--exclude-checks", "ignored_auth"])
        .args(["--seed", "1", "--max-examples", "20"])
        .args(["--workers", "1", "--request-timeout", "10", "--no-color"])
        .arg("--report-dir")
        .arg(dir.path())
        .current_dir(dir.path())
        .output()
        .expect("run schemathesis");
    drop(node);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "schemathesis found the gateway and its document disagreeing:\n{stdout}\n{stderr}"
    );
    // Every operation of the document was tested ("Selected: 17/17", "Tested: 17").
    let count = |label: &str| {
        stdout
            .lines()
            .find_map(|line| line.trim().strip_prefix(label))
            .map(|rest| {
                rest.trim()
                    .rsplit('/')
                    .next()
                    .unwrap_or_default()
                    .to_owned()
            })
    };
    let selected = count("Selected:");
    assert!(
        selected.is_some(),
        "no summary from schemathesis:\n{stdout}"
    );
    assert_eq!(
        count("Tested:"),
        selected,
        "schemathesis left operations untested:\n{stdout}"
    );
}
