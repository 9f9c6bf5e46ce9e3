//! A collaboration over the mesh, printed step by step as it happens: a coordinator
//! discovers three workers by skill, assigns them the parts of a document with one
//! fan-out, follows their progress streams; two workers consult each other peer to peer;
//! the finished parts come back through a queue with `reply_to`, collected by the
//! coordinator's correlation id, which every step carries.
//!
//! ```sh
//! cargo run --release --example collaboration                        # brings its own node
//! cargo run --release --example collaboration -- --mesh 127.0.0.1:7700
//! cargo run --release --example collaboration -- --kill-worker gamma # ends with a partial result
//! ```

use agentmesh_examples::collaboration::{self, LocalNode, Options, Step, WORKERS};

const USAGE: &str = "usage: collaboration [--mesh HOST:PORT] [--kill-worker NAME]";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut mesh = None;
    let mut options = Options {
        print: true,
        ..Default::default()
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--mesh" => mesh = Some(args.next().ok_or(USAGE)?),
            "--kill-worker" => options.kill_worker = Some(args.next().ok_or(USAGE)?),
            "-h" | "--help" => {
                println!("{USAGE}\nworkers: {}", WORKERS.join(", "));
                return Ok(());
            }
            other => return Err(format!("unexpected argument {other:?}\n{USAGE}").into()),
        }
    }
    if let Some(name) = options.kill_worker.as_deref() {
        if !WORKERS.contains(&name) {
            return Err(format!(
                "no worker named {name}; the workers are {}",
                WORKERS.join(", ")
            )
            .into());
        }
    }
    let local = match &mesh {
        Some(_) => None,
        None => Some(LocalNode::start().await?),
    };
    let node = mesh.unwrap_or_else(|| local.as_ref().map(LocalNode::addr).unwrap_or_default());
    let kind = if local.is_some() {
        "in this process"
    } else {
        "given by --mesh"
    };
    println!("node {node} ({kind}); workers {}", WORKERS.join(", "));
    println!("{}", Step::header());
    let outcome = collaboration::run(&node, options).await?;
    println!("{outcome}");
    // The node recorded every hop of the chain under its correlation id.
    let hops = agentmesh_sdk::MeshClient::connect_lazy(&node)?
        .trace(&outcome.correlation_id)
        .await?;
    let mut by_style = std::collections::BTreeMap::<String, usize>::new();
    for hop in &hops {
        *by_style.entry(hop.style.clone()).or_default() += 1;
    }
    let styles: Vec<String> = by_style.iter().map(|(s, n)| format!("{s} {n}")).collect();
    println!("trace journal: {} hops ({})", hops.len(), styles.join(", "));
    if local.is_none() {
        println!(
            "draw it: agentmesh trace {} --node {node}",
            outcome.correlation_id
        );
    }
    if let Some(local) = local {
        local.stop().await?;
    }
    Ok(())
}
