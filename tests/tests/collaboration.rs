//! The collaboration every release must run (`examples/collaboration.rs`), against a real
//! node over real sockets: the nine steps happen in order under the coordinator's one
//! correlation id, and a worker killed mid-run leaves a partial result that names the part
//! it took with it.

use std::collections::BTreeSet;

use agentmesh_examples::collaboration::{self, LocalNode, Options, Outcome, Step, WORKERS};
use agentmesh_tests::TestNode;

/// Checks the chain: steps 1 to 9 each happened, their first occurrences in that order, every
/// step under the outcome's correlation id, and the causal order within each part.
fn assert_chain_in_order(outcome: &Outcome) {
    let steps = &outcome.steps;
    let mut firsts = Vec::new();
    for step in steps {
        if !firsts.contains(&step.number) {
            firsts.push(step.number);
        }
    }
    assert_eq!(
        firsts,
        (1..=9).collect::<Vec<u8>>(),
        "steps 1–9 each happened, first in that order:\n{}",
        listing(steps)
    );
    assert!(!outcome.correlation_id.is_empty());
    for step in steps {
        assert_eq!(
            step.correlation_id, outcome.correlation_id,
            "step {step} carries the coordinator's correlation id"
        );
    }
    // Discovery and assignment finish before any work starts.
    let last = |n: u8| steps.iter().rposition(|s| s.number == n).unwrap();
    let first = |n: u8| steps.iter().position(|s| s.number == n).unwrap();
    assert!(
        last(2) < first(3) && last(4) < first(5),
        "{}",
        listing(steps)
    );
    // The consultation: alpha (part 1) asks beta (part 2), and hears back.
    let consulted = steps.iter().find(|s| s.number == 6).unwrap();
    let answered = steps.iter().find(|s| s.number == 7).unwrap();
    assert_eq!(
        (consulted.from.as_str(), consulted.to.as_str()),
        ("alpha", "beta")
    );
    assert_eq!(
        (answered.from.as_str(), answered.to.as_str()),
        ("beta", "alpha")
    );
    assert!(first(6) < first(7), "{}", listing(steps));
    // Each part that came back: submitted (8) by its worker before it was collected (9).
    for summary in &outcome.summaries {
        let submitted = steps
            .iter()
            .position(|s| s.number == 8 && s.from == summary.worker)
            .unwrap_or_else(|| {
                panic!("{} submitted its part:\n{}", summary.worker, listing(steps))
            });
        let collected = steps
            .iter()
            .position(|s| s.number == 9 && s.detail.starts_with(&format!("part {}:", summary.part)))
            .unwrap_or_else(|| panic!("part {} was collected:\n{}", summary.part, listing(steps)));
        assert!(submitted < collected, "{}", listing(steps));
    }
}

fn listing(steps: &[Step]) -> String {
    steps.iter().map(|s| format!("{s}\n")).collect()
}

fn workers_with_step(outcome: &Outcome, number: u8, side: fn(&Step) -> &str) -> BTreeSet<String> {
    outcome
        .steps
        .iter()
        .filter(|s| s.number == number)
        .map(|s| side(s).to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nine_steps_happen_in_order_under_one_correlation_id() {
    // The node the example brings itself when run without --mesh.
    let node = LocalNode::start().await.unwrap();
    let outcome = collaboration::run(&node.addr(), Options::default())
        .await
        .unwrap();
    assert_chain_in_order(&outcome);
    assert!(outcome.is_complete(), "{outcome}");
    assert_eq!(
        outcome.summaries.iter().map(|s| s.part).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    let everyone: BTreeSet<String> = WORKERS.iter().map(|w| w.to_string()).collect();
    assert_eq!(
        workers_with_step(&outcome, 3, |s| &s.to),
        everyone,
        "every worker got the plan"
    );
    assert_eq!(
        workers_with_step(&outcome, 4, |s| &s.from),
        everyone,
        "every worker accepted"
    );
    assert_eq!(
        workers_with_step(&outcome, 5, |s| &s.from),
        everyone,
        "every worker streamed"
    );
    assert_eq!(
        workers_with_step(&outcome, 8, |s| &s.from),
        everyone,
        "every worker submitted"
    );
    // The consultation changed the result: alpha left the shared keyword to beta.
    let part = |n: u32| outcome.summaries.iter().find(|s| s.part == n).unwrap();
    let words = |n: u32| -> Vec<&str> { part(n).keywords.iter().map(|k| k.0.as_str()).collect() };
    assert!(
        !words(1).contains(&"agents") && words(2).contains(&"agents"),
        "{outcome}"
    );
    assert!(
        outcome
            .to_string()
            .ends_with(&format!("correlation id: {}", outcome.correlation_id))
    );
    // The node's trace journal holds the whole chain under that id, every style of it.
    let hops = agentmesh_sdk::MeshClient::connect_lazy(&node.addr())
        .unwrap()
        .trace(&outcome.correlation_id)
        .await
        .unwrap();
    let styles: BTreeSet<&str> = hops.iter().map(|h| h.style.as_str()).collect();
    for style in [
        "lookup", "fanout", "unary", "stream", "converse", "submit", "deliver",
    ] {
        assert!(
            styles.contains(style),
            "no {style} hop in the journal: {styles:?}"
        );
    }
    assert!(
        hops.iter()
            .all(|h| h.correlation_id == outcome.correlation_id)
    );
    let roots = agentmesh_core::journal::tree(hops.clone());
    assert!(roots.len() < hops.len(), "the hops form a tree, not a list");
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_run_leaves_a_partial_result_that_names_its_part() {
    // A node of its own, as `--mesh ADDR` names one.
    let node = TestNode::start().await;
    let options = Options {
        kill_worker: Some("gamma".into()),
        ..Default::default()
    };
    let outcome = collaboration::run(&node.addr(), options).await.unwrap();
    assert_chain_in_order(&outcome);
    assert!(!outcome.is_complete(), "{outcome}");
    assert_eq!(
        outcome.summaries.iter().map(|s| s.part).collect::<Vec<_>>(),
        [1, 2],
        "{outcome}"
    );
    let [missing] = outcome.missing.as_slice() else {
        panic!("exactly one part is missing: {outcome}");
    };
    assert_eq!(
        (missing.part, missing.title.as_str()),
        (3, "The durable queue")
    );
    assert_eq!(missing.worker, "gamma");
    assert!(missing.reason.contains("stream"), "{}", missing.reason);
    // gamma was killed after its first progress report: it started, but never submitted.
    assert!(workers_with_step(&outcome, 5, |s| &s.from).contains("gamma"));
    assert!(!workers_with_step(&outcome, 8, |s| &s.from).contains("gamma"));
    let printed = outcome.to_string();
    assert!(printed.contains("PARTIAL"), "{printed}");
    assert!(
        printed.contains("missing: part 3 \"The durable queue\" (assigned to gamma)"),
        "{printed}"
    );
    node.stop().await;
}
