//! The `agentmesh` queue commands against a node: `submit` (with `--count`),
//! `queues`, `consume --exec` (the payload on stdin, stdout the result, a failure a
//! nack), `result` (with `--wait`) and `dlq list`, `redrive` and `purge`.

use std::time::Duration;

use agentmesh_tests::{
    TestNode,
    queue::{queue_node, queue_stats, wait_for_queue_stats},
};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_agentmesh");

async fn cli(node: &TestNode, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(BIN)
        .args(args)
        .env("AGENTMESH_NODE", node.addr())
        .env("AGENTMESH_LOG", "warn")
        .output()
        .await
        .unwrap()
}

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_submit_consume_exec_result_and_dlq() {
    let node = queue_node().await;
    let out = cli(
        &node,
        &[
            "submit",
            "cli-jobs",
            "--json",
            r#"{"x": 20}"#,
            "--type",
            "add",
            "--count",
            "2",
        ],
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out);
    let ids: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("accepted  "))
        .map(str::to_owned)
        .collect();
    assert_eq!(ids.len(), 2, "{text}");
    assert!(text.contains("2 accepted"), "{text}");
    // A poison message: the command fails on it.
    let out = cli(
        &node,
        &[
            "submit",
            "cli-jobs",
            "--json",
            r#"{"x": "boom"}"#,
            "--output",
            "json",
        ],
    )
    .await;
    let response: Value = serde_json::from_slice(&out.stdout).unwrap();
    let poison_id = response["outcomes"][0]["messageId"]
        .as_str()
        .unwrap()
        .to_owned();

    let queues_text = stdout(&cli(&node, &["queues"]).await);
    assert!(queues_text.contains("cli-jobs"), "{queues_text}");
    let line = queues_text
        .lines()
        .find(|l| l.starts_with("cli-jobs"))
        .unwrap();
    assert_eq!(line.split_whitespace().nth(1), Some("3"), "{queues_text}");

    // `consume --exec`: the payload on stdin, stdout is the result; failures nack.
    let script = r#"input=$(cat); case "$input" in *boom*) echo "cannot add boom" >&2; exit 3;; esac; echo "{\"y\": 21, \"in\": $input}""#;
    let out = cli(
        &node,
        &[
            "consume",
            "cli-jobs",
            "--exec",
            script,
            "--max",
            "5",
            "--lease-ms",
            "5000",
        ],
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    for id in &ids {
        let out = cli(&node, &["result", id, "--output", "json"]).await;
        assert!(out.status.success(), "{out:?}");
        let result: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(result["json"]["y"].as_f64(), Some(21.0), "{result}");
        // The command got the payload on stdin.
        assert_eq!(result["json"]["in"]["x"].as_f64(), Some(20.0), "{result}");
        assert_eq!(result["type"], "add.result");
    }
    let missing = cli(&node, &["result", &poison_id]).await;
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no result"));
    // Three failed attempts: a dead letter with the command's error.
    let client = node.client();
    wait_for_queue_stats(&client, "cli-jobs", Duration::from_secs(10), |s| {
        s.dead_letters == 1
    })
    .await;
    let listed = stdout(&cli(&node, &["dlq", "list", "cli-jobs"]).await);
    assert!(listed.contains(&poison_id), "{listed}");
    assert!(listed.contains("exited with"), "{listed}");
    let out = cli(&node, &["dlq", "redrive", "cli-jobs", "--id", &poison_id]).await;
    assert!(stdout(&out).contains("redrove 1"), "{out:?}");
    // `consume` without --exec prints and acks; `result --wait` gets nothing for it.
    let out = cli(
        &node,
        &["consume", "cli-jobs", "--max", "1", "--output", "json"],
    )
    .await;
    let printed: Value = serde_json::from_str(stdout(&out).lines().next().unwrap()).unwrap();
    assert_eq!(printed["id"], poison_id);
    assert_eq!(printed["attempt"], 1);
    let out = cli(&node, &["dlq", "purge", "cli-jobs", "--all"]).await;
    assert!(stdout(&out).contains("purged 0"), "{out:?}");
    let s = queue_stats(&client, "cli-jobs").await;
    assert_eq!((s.depth, s.in_flight, s.dead_letters), (0, 0, 0));
    let waited = cli(
        &node,
        &["result", "nobody", "--wait", "--timeout-ms", "300"],
    )
    .await;
    assert!(!waited.status.success());
    node.stop().await;
}
