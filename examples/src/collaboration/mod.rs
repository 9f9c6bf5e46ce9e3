//! A typical collaboration over the mesh, under one correlation id: a coordinator discovers
//! workers by skill (steps 1–2), assigns them the parts of a document with one fan-out
//! (3–4), follows each part's progress stream (5); two workers consult each other peer to
//! peer (6–7); the finished parts go through a queue with `reply_to` (8) and the
//! coordinator collects them by correlation id (9).
//!
//! Modules: `chain` (the numbered steps as they happen), `document` (the parts and their
//! analysis), `worker` (the `summarize` agent, each on a runtime of its own so it can be
//! killed), `coordinator` (the calls that drive the run), `local_node` (a node in this
//! process, for a run without `--mesh`).

mod chain;
mod coordinator;
mod document;
mod local_node;
mod worker;

use std::{fmt, sync::Arc};

use agentmesh_sdk::MeshClient;

pub use chain::{Chain, Step};
pub use document::{Keyword, Part, document};
pub use local_node::LocalNode;
pub use worker::{FINISH_QUEUE, LocalWorker, SKILL};

use coordinator::Coordinator;

/// Errors of a run that could not go on (a worker or the node unreachable, no workers found).
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// The workers a run starts.
pub const WORKERS: [&str; 3] = ["alpha", "beta", "gamma"];

/// How a run goes.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Kill this worker as soon as its first progress report arrives.
    pub kill_worker: Option<String>,
    /// Print every step as it happens.
    pub print: bool,
}

/// A finished part, as it came back through the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartSummary {
    /// The part's number.
    pub part: u32,
    /// The part's title.
    pub title: String,
    /// The worker that did the part.
    pub worker: String,
    /// The worker whose queue consumer finished it.
    pub finished_by: String,
    /// Words in the part.
    pub words: u64,
    /// The part's keywords, after the consultation.
    pub keywords: Vec<Keyword>,
}

/// A part the run ended without.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingPart {
    /// The part's number.
    pub part: u32,
    /// The part's title.
    pub title: String,
    /// The worker it was assigned to.
    pub worker: String,
    /// What went wrong.
    pub reason: String,
}

/// How a run ended: every part, or a partial result that says what is missing.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The coordinator's correlation id, which every step carried.
    pub correlation_id: String,
    /// The steps, in the order they happened.
    pub steps: Vec<Step>,
    /// The parts that came back, by part number.
    pub summaries: Vec<PartSummary>,
    /// The parts that did not, by part number.
    pub missing: Vec<MissingPart>,
}

impl Outcome {
    /// Whether every part came back.
    pub fn is_complete(&self) -> bool {
        self.missing.is_empty()
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let total = self.summaries.len() + self.missing.len();
        let verdict = if self.is_complete() {
            "complete"
        } else {
            "PARTIAL"
        };
        writeln!(
            f,
            "result ({verdict}): {} of {total} parts",
            self.summaries.len()
        )?;
        for s in &self.summaries {
            writeln!(
                f,
                "  part {} \"{}\" by {}: {} words, keywords {}",
                s.part,
                s.title,
                s.worker,
                s.words,
                document::describe(&s.keywords)
            )?;
        }
        for m in &self.missing {
            writeln!(
                f,
                "  missing: part {} \"{}\" (assigned to {}): {}",
                m.part, m.title, m.worker, m.reason
            )?;
        }
        write!(f, "correlation id: {}", self.correlation_id)
    }
}

/// Runs one collaboration against the node at `node`: starts the workers, runs the
/// coordinator, stops the workers that are still alive.
pub async fn run(node: &str, options: Options) -> Result<Outcome, Error> {
    if let Some(name) = &options.kill_worker {
        if !WORKERS.contains(&name.as_str()) {
            return Err(format!("no worker named {name}; the workers are {WORKERS:?}").into());
        }
    }
    let chain = Chain::new(options.print);
    let mut workers = Vec::new();
    for name in WORKERS {
        workers.push(Arc::new(
            LocalWorker::start(name, node, chain.clone()).await?,
        ));
    }
    let coordinator = Coordinator {
        client: MeshClient::connect_lazy(node)?,
        chain,
        correlation_id: agentmesh_sdk::proto::new_id(),
        victim: workers
            .iter()
            .find(|w| Some(w.name()) == options.kill_worker.as_deref())
            .cloned(),
    };
    let outcome = coordinator.run().await;
    for worker in &workers {
        worker.stop().await;
    }
    outcome
}
