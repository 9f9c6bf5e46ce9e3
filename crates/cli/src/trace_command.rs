//! `agentmesh trace ID`: the node's trace journal for one correlation id, drawn as a waterfall
//! (the tree of hops, each with its start and duration on a shared time axis), or with
//! `--follow` one line per hop as it is recorded.

use agentmesh_core::journal::{TraceNode, tree};
use agentmesh_proto::v1::Hop;

use crate::{NodeArgs, Output, status_error};

/// Width of the waterfall's time axis, in characters.
const BAR_WIDTH: usize = 32;

/// `agentmesh trace`'s arguments.
#[derive(Debug, clap::Args)]
pub(crate) struct TraceArgs {
    /// The correlation id (printed by callers, sent back as `x-correlation-id`).
    correlation_id: String,
    /// Show hops as they are recorded (those already recorded first) until interrupted.
    #[arg(long)]
    follow: bool,
    #[command(flatten)]
    node: NodeArgs,
}

pub(crate) async fn run(args: TraceArgs) -> anyhow::Result<()> {
    let client = args.node.client()?;
    if args.follow {
        let mut hops = client
            .follow_trace(&args.correlation_id)
            .await
            .map_err(status_error)?;
        let mut origin = None;
        while let Some(hop) = futures::StreamExt::next(&mut hops).await {
            let hop = hop.map_err(status_error)?;
            match args.node.output {
                Output::Json => println!("{}", agentmesh_proto::json::to_json(&hop)?),
                Output::Text => {
                    let start = start_ms(&hop);
                    let origin = *origin.get_or_insert(start);
                    println!("{:>+10.1} ms  {}", start - origin, describe(&hop));
                }
            }
        }
        return Ok(());
    }
    let hops = client
        .trace(&args.correlation_id)
        .await
        .map_err(status_error)?;
    if args.node.output == Output::Json {
        for hop in &hops {
            println!("{}", agentmesh_proto::json::to_json(hop)?);
        }
        return Ok(());
    }
    print!("{}", waterfall(&args.correlation_id, hops));
    Ok(())
}

fn start_ms(hop: &Hop) -> f64 {
    hop.started_at
        .map_or(0.0, |t| t.seconds as f64 * 1e3 + f64::from(t.nanos) / 1e6)
}

fn duration_ms(hop: &Hop) -> f64 {
    hop.duration
        .map_or(0.0, |d| d.seconds as f64 * 1e3 + f64::from(d.nanos) / 1e6)
}

/// `style  from → to  CODE (message) attempt n  [node]`.
fn describe(hop: &Hop) -> String {
    let mut line = format!("{:<8} {} → {}  {}", hop.style, hop.from, hop.to, hop.code);
    if !hop.message.is_empty() {
        line.push_str(&format!(" ({})", hop.message));
    }
    if hop.attempt > 1 {
        line.push_str(&format!("  attempt {}", hop.attempt));
    }
    if !hop.node.is_empty() {
        line.push_str(&format!("  [{}]", hop.node));
    }
    line
}

/// The trace as text: a header, then one line per hop in tree order with its offset,
/// duration and a bar on the trace's time axis.
fn waterfall(correlation_id: &str, hops: Vec<Hop>) -> String {
    let origin = hops.iter().map(start_ms).fold(f64::INFINITY, f64::min);
    let end = hops
        .iter()
        .map(|h| start_ms(h) + duration_ms(h))
        .fold(0.0, f64::max);
    let span = (end - origin).max(0.001);
    let mut out = format!(
        "trace {correlation_id}: {} hops over {:.1} ms\n",
        hops.len(),
        end - origin
    );
    fn walk(nodes: &[TraceNode], depth: usize, origin: f64, span: f64, out: &mut String) {
        for node in nodes {
            let hop = &node.hop;
            let offset = start_ms(hop) - origin;
            let took = duration_ms(hop);
            let from = ((offset / span) * BAR_WIDTH as f64).floor() as usize;
            let len = (((took / span) * BAR_WIDTH as f64).round() as usize).max(1);
            let from = from.min(BAR_WIDTH - 1);
            let len = len.min(BAR_WIDTH - from);
            let bar = format!(
                "{}{}{}",
                " ".repeat(from),
                "█".repeat(len),
                " ".repeat(BAR_WIDTH - from - len)
            );
            out.push_str(&format!(
                "{offset:>9.1} ms {took:>8.1} ms |{bar}| {}{}\n",
                "  ".repeat(depth),
                describe(hop)
            ));
            walk(&node.children, depth + 1, origin, span, out);
        }
    }
    walk(&tree(hops), 0, origin, span, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hop(id: &str, cause: &str, style: &str, start_ms: i64, took_ms: i64) -> Hop {
        Hop {
            correlation_id: "c".into(),
            envelope_id: id.into(),
            causation_id: cause.into(),
            from: "client".into(),
            to: "echo/1".into(),
            style: style.into(),
            code: "OK".into(),
            started_at: Some(prost_types::Timestamp {
                seconds: start_ms / 1000,
                nanos: (start_ms % 1000 * 1_000_000) as i32,
            }),
            duration: Some(prost_types::Duration {
                seconds: 0,
                nanos: (took_ms * 1_000_000) as i32,
            }),
            attempt: 1,
            node: "n1".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_waterfall_nests_caused_hops_on_one_time_axis() {
        let text = waterfall(
            "c",
            vec![
                hop("f", "", "fanout", 1_000, 100),
                hop("a", "f", "unary", 1_010, 40),
                hop("b", "f", "unary", 1_050, 50),
            ],
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "trace c: 3 hops over 100.0 ms");
        assert!(
            lines[1].contains("      0.0 ms    100.0 ms |████████████████████████████████| fanout"),
            "{}",
            lines[1]
        );
        assert!(
            lines[2].contains("     10.0 ms     40.0 ms |   █████████████"),
            "{}",
            lines[2]
        );
        assert!(
            lines[2].contains("|   unary"),
            "children are indented: {}",
            lines[2]
        );
        assert!(lines[3].contains("[n1]"));
    }
}
