//! The guides in `docs/guides/` run: each guide's shell snippets for a tool run with
//! `bash` against `agentmesh serve --demo-agents` (the node the guides tell a reader to
//! start), and their output is checked; every Rust snippet must be an excerpt of a
//! compiled example. The conventions are in `agentmesh_tests::guides`.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use agentmesh_sdk::proto::v1::AgentFilter;
use agentmesh_tests::{
    NodeProcess, eventually,
    guides::{SnippetRunner, check_excerpt, parse, read_guide},
    outside_tool,
};

const BIN: &str = env!("CARGO_BIN_EXE_agentmesh");

fn repository() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    root.canonicalize().unwrap_or(root)
}

fn guides_dir() -> PathBuf {
    repository().join("docs/guides")
}

/// Runs the `tool` snippets of guide `name` against a fresh node with the demo agents.
async fn run_guide(name: &str, tool: &str, tool_path: &str) {
    let data = tempfile::tempdir().unwrap();
    let node = NodeProcess::start(BIN, data.path(), &["--demo-agents".into()]).await;
    let client = node.client();
    let registered = eventually(Duration::from_secs(20), || async {
        let agents = client
            .lookup(AgentFilter::default())
            .await
            .unwrap_or_default();
        ["echo", "counter", "slow"].iter().all(|name| {
            agents
                .iter()
                .any(|a| a.card.as_ref().is_some_and(|c| c.name == *name))
        })
    })
    .await;
    assert!(registered, "the demo agents did not register");
    let runner = SnippetRunner::new()
        .env("MESH", node.address.clone())
        .env("HTTP", format!("http://{}", node.address))
        .program(tool_path)
        // The queue guide consumes with the `agentmesh` command.
        .program(BIN);
    runner
        .run_guide(&read_guide(&guides_dir(), name), tool)
        .await;
}

fn grpcurl() -> String {
    outside_tool("AGENTMESH_TEST_GRPCURL", "a grpcurl binary")
}

fn curl() -> String {
    outside_tool("AGENTMESH_TEST_CURL", "a curl binary")
}

/// Every guide parses (each shell block is marked `run=TOOL` or `no-run`, each output
/// block follows a run block), each style is shown with both tools and in Rust, and
/// every Rust block is a run of lines of the compiled file it names.
#[test]
fn guides_are_marked_and_their_rust_is_compiled_code() {
    let mut checked = 0;
    for entry in std::fs::read_dir(guides_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "md") {
            continue;
        }
        let guide = parse(&path, &std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{e}"));
        for excerpt in &guide.rust {
            check_excerpt(&repository(), excerpt)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
        checked += 1;
    }
    assert!(checked >= 5, "only {checked} guides in {:?}", guides_dir());
    for name in ["unary.md", "stream.md", "converse.md", "queue.md"] {
        let guide = read_guide(&guides_dir(), name);
        for tool in ["grpcurl", "curl"] {
            assert!(
                guide.shell.iter().any(|s| s.tool == tool),
                "{name} has no run={tool} snippet"
            );
        }
        assert!(!guide.rust.is_empty(), "{name} has no Rust snippet");
    }
}

#[tokio::test]
#[ignore = "needs AGENTMESH_TEST_GRPCURL"]
async fn unary_guide_with_grpcurl() {
    run_guide("unary.md", "grpcurl", &grpcurl()).await;
}

#[tokio::test]
#[ignore = "needs AGENTMESH_TEST_CURL"]
async fn unary_guide_with_curl() {
    run_guide("unary.md", "curl", &curl()).await;
}

#[tokio::test]
#[ignore = "needs AGENTMESH_TEST_GRPCURL"]
async fn stream_guide_with_grpcurl() {
    run_guide("stream.md", "grpcurl", &grpcurl()).await;
}

#[tokio::test]
#[ignore = "needs AGENTMESH_TEST_CURL"]
async fn stream_guide_with_curl() {
    run_guide("stream.md", "curl", &curl()).await;
}

#[tokio::test]
#[ignore = "needs AGENTMESH_TEST_GRPCURL"]
async fn converse_guide_with_grpcurl() {
    run_guide("converse.md", "grpcurl", &grpcurl()).await;
}

#[tokio::test]
#[ignore = "needs AGENTMESH_TEST_CURL"]
async fn converse_guide_with_curl() {
    run_guide("converse.md", "curl", &curl()).await;
}

#[tokio::test]
#[ignore = "needs AGENTMESH_TEST_GRPCURL"]
async fn queue_guide_with_grpcurl() {
    run_guide("queue.md", "grpcurl", &grpcurl()).await;
}

#[tokio::test]
#[ignore = "needs AGENTMESH_TEST_CURL"]
async fn queue_guide_with_curl() {
    run_guide("queue.md", "curl", &curl()).await;
}
