//! External A2A agents with the `agentmesh` binary: one listed from the configuration file
//! (`[[a2a.agents]]`), one added with `agentmesh agents add-a2a`; both are listed again
//! after the node restarts. The agent is `examples/python/a2a_agent.py` (a2a-sdk 1.3's
//! server side) as a real process.

use std::{path::Path, process::Stdio, time::Duration};

use agentmesh_sdk::{
    MeshClient,
    proto::v1::{AgentFilter, Envelope, envelope::Payload},
};
use agentmesh_tests::{NodeProcess, eventually, outside_tool};
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::Command,
};

const BIN: &str = env!("CARGO_BIN_EXE_agentmesh");

async fn listed(client: &MeshClient, name: &str) -> bool {
    client
        .lookup(AgentFilter {
            name: name.into(),
            ..Default::default()
        })
        .await
        .is_ok_and(|found| found.len() == 1)
}

async fn echo(client: &MeshClient, target: &str) -> String {
    let reply = client
        .invoke(
            target,
            Envelope {
                content_type: "text/plain".into(),
                payload: Some(Payload::Binary(b"ping".to_vec())),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    match reply.payload {
        Some(Payload::Binary(bytes)) => String::from_utf8(bytes).unwrap(),
        other => panic!("expected text, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs AGENTMESH_TEST_PYTHON"]
async fn a2a_agents_from_the_config_file_and_add_a2a_survive_a_restart() {
    let python = outside_tool(
        "AGENTMESH_TEST_PYTHON",
        "a Python 3 with a2a-sdk[http-server] 1.3 and uvicorn (examples/python/requirements.txt)",
    );
    let mut agent = Command::new(&python)
        .args(["a2a_agent.py", "--port", "0"])
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/python"))
        .env("PYTHONUNBUFFERED", "1")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let line = tokio::time::timeout(
        Duration::from_secs(60),
        BufReader::new(agent.stdout.take().unwrap())
            .lines()
            .next_line(),
    )
    .await
    .expect("a2a_agent.py listens within a minute")
    .unwrap()
    .unwrap();
    let url = serde_json::from_str::<Value>(&line).unwrap()["listening"]
        .as_str()
        .unwrap()
        .to_owned();

    let data = tempfile::tempdir().unwrap();
    let config = data.path().join("agentmesh.toml");
    std::fs::write(
        &config,
        format!("[[a2a.agents]]\nurl = \"{url}\"\nname = \"from-config\"\n"),
    )
    .unwrap();
    let extra = ["--config".to_owned(), config.display().to_string()];
    let mut node = NodeProcess::start(BIN, &data.path().join("data"), &extra).await;
    let client = node.client();
    assert!(
        eventually(Duration::from_secs(20), || listed(&client, "from-config")).await,
        "the configured A2A agent is listed"
    );
    assert_eq!(echo(&client, "from-config").await, "echo: ping");

    let added = std::process::Command::new(BIN)
        .args(["agents", "add-a2a", &url, "--name", "added", "--node"])
        .arg(&node.address)
        .output()
        .unwrap();
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    let said = String::from_utf8_lossy(&added.stdout);
    assert!(
        said.starts_with("added A2A agent added at ") && said.contains("skills: echo"),
        "{said}"
    );
    assert_eq!(echo(&client, "added").await, "echo: ping");

    // A bad URL is refused with the reason.
    let refused = std::process::Command::new(BIN)
        .args(["agents", "add-a2a", "ftp://nowhere", "--node"])
        .arg(&node.address)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("InvalidArgument"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    // After a restart on the same data directory both are listed again.
    node.kill();
    let node = NodeProcess::start(BIN, &data.path().join("data"), &extra).await;
    let client = node.client();
    for name in ["from-config", "added"] {
        assert!(
            eventually(Duration::from_secs(20), || listed(&client, name)).await,
            "{name} is listed after a restart"
        );
    }
    assert_eq!(echo(&client, "added").await, "echo: ping");
}
