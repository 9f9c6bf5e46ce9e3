//! The trace journal: every hop of every envelope the mesh carries, kept by correlation id so
//! that the whole message chain of a request can be read back ([`TraceJournal::hops`]) or
//! watched as it happens ([`TraceJournal::follow`]).
//!
//! A hop is recorded where the router makes a call (each attempt of a unary call, the opening
//! of a stream or conversation, a fan-out as a whole, a registry lookup) and where the queue
//! takes or hands out a message. Recording never waits: the in-memory journal appends under a
//! short lock, a remote one queues the hop for a background writer. The journal is bounded by
//! the number of correlation ids, the hops per id and their age ([`JournalConfig`]).

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use agentmesh_proto::{
    envelope::code_name,
    v1::{Envelope, Hop},
};
use futures::{StreamExt, stream::BoxStream};
use parking_lot::Mutex;
use tokio::sync::broadcast;
use tonic::{Code, Status};

use crate::error::MeshError;

/// Journal settings (`[trace]` in the node's config).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JournalConfig {
    /// Record hops at all.
    pub journal: bool,
    /// Most hops kept in all (about 300 bytes each); the oldest correlation ids go first.
    pub max_hops: usize,
    /// Most hops kept per correlation id; the oldest goes first.
    pub max_hops_per_trace: usize,
    /// How long a correlation id's hops are kept after its first one.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
}

impl Default for JournalConfig {
    fn default() -> Self {
        Self {
            journal: true,
            max_hops: 100_000,
            max_hops_per_trace: 1_000,
            max_age: Duration::from_secs(3600),
        }
    }
}

/// The hops of one correlation id as they are recorded.
pub type HopStream = BoxStream<'static, Result<Hop, MeshError>>;

/// Where hops are kept.
#[tonic::async_trait]
pub trait TraceJournal: Send + Sync + std::fmt::Debug + 'static {
    /// Whether hops are recorded at all (callers skip building them when not).
    fn enabled(&self) -> bool;
    /// Records one hop; never waits.
    fn record(&self, hop: Hop);
    /// Records several hops at once (one lock or one write for a batch).
    fn record_many(&self, hops: Vec<Hop>) {
        for hop in hops {
            self.record(hop);
        }
    }
    /// The hops of `correlation_id`, in the order they started (empty when none).
    async fn hops(&self, correlation_id: &str) -> Result<Vec<Hop>, MeshError>;
    /// The hops of `correlation_id` already recorded, then each new one.
    async fn follow(&self, correlation_id: &str) -> Result<HopStream, MeshError>;
}

/// A hop of `envelope` to `to`, finished now; `outcome` is its status. Only the envelope's
/// ids and names are copied, never its payload.
pub fn hop_of(
    envelope: &Envelope,
    to: impl Into<String>,
    style: &str,
    started_at: SystemTime,
    duration: Duration,
    outcome: Result<(), &Status>,
) -> Hop {
    let mut hop = Hop {
        correlation_id: envelope.correlation_id.clone(),
        envelope_id: envelope.id.clone(),
        causation_id: envelope.causation_id.clone(),
        from: if envelope.source.is_empty() {
            "client".to_owned()
        } else {
            envelope.source.clone()
        },
        to: to.into(),
        style: style.to_owned(),
        started_at: Some(started_at.into()),
        attempt: envelope.attempt.max(1),
        ..Default::default()
    };
    finish(&mut hop, duration, outcome);
    hop
}

/// Sets how long `hop` took and how it ended.
pub fn finish(hop: &mut Hop, duration: Duration, outcome: Result<(), &Status>) {
    let (code, message) = match outcome {
        Ok(()) => (Code::Ok, String::new()),
        Err(status) => (status.code(), status.message().to_owned()),
    };
    hop.code = code_name(code).to_owned();
    hop.message = message;
    hop.duration = prost_types::Duration::try_from(duration).ok();
}

/// Records a registry lookup made under `correlation_id` that found `found` instances.
pub fn record_lookup(
    journal: &dyn TraceJournal,
    correlation_id: &str,
    found: usize,
    began: SystemTime,
) {
    if !journal.enabled() || correlation_id.is_empty() {
        return;
    }
    // A lookup carries no envelope: its hop belongs to the chain by correlation id alone.
    let asked = Envelope {
        id: agentmesh_proto::new_id(),
        correlation_id: correlation_id.to_owned(),
        ..Default::default()
    };
    let mut hop = hop_of(
        &asked,
        "discovery",
        "lookup",
        began,
        began.elapsed().unwrap_or_default(),
        Ok(()),
    );
    hop.message = format!("{found} found");
    journal.record(hop);
}

/// A journal that records nothing (`trace.journal = false`).
#[derive(Debug, Default)]
pub struct NoJournal;

#[tonic::async_trait]
impl TraceJournal for NoJournal {
    fn enabled(&self) -> bool {
        false
    }

    fn record(&self, _hop: Hop) {}

    async fn hops(&self, _correlation_id: &str) -> Result<Vec<Hop>, MeshError> {
        Err(journal_off())
    }

    async fn follow(&self, _correlation_id: &str) -> Result<HopStream, MeshError> {
        Err(journal_off())
    }
}

fn journal_off() -> MeshError {
    MeshError::FailedPrecondition("the trace journal is off on this node (trace.journal)".into())
}

/// The journal in this process's memory.
#[derive(Debug)]
pub struct MemoryJournal {
    config: JournalConfig,
    node: String,
    inner: Mutex<Traces>,
    /// Every recorded hop, for followers (sent only while someone follows).
    recorded: broadcast::Sender<Arc<Hop>>,
}

#[derive(Debug, Default)]
struct Traces {
    by_id: HashMap<String, Trace>,
    /// Hops kept, over every trace.
    hops: usize,
    /// Correlation ids in the order of their first hop, for eviction by count and age.
    order: VecDeque<(Instant, String)>,
}

#[derive(Debug)]
struct Trace {
    first: Instant,
    hops: VecDeque<Hop>,
}

impl MemoryJournal {
    /// An empty journal whose hops name `node` as the node that carried them.
    pub fn new(config: JournalConfig, node: impl Into<String>) -> Self {
        Self {
            config,
            node: node.into(),
            inner: Mutex::default(),
            recorded: broadcast::channel(1024).0,
        }
    }

    fn evict(&self, traces: &mut Traces, now: Instant) {
        while let Some((first, id)) = traces.order.front() {
            let over = traces.hops > self.config.max_hops.max(1);
            if !over && now.duration_since(*first) < self.config.max_age {
                break;
            }
            // An id whose trace was replaced (aged out, then seen again) keeps its new entry.
            if traces.by_id.get(id).is_some_and(|t| t.first == *first) {
                if let Some(gone) = traces.by_id.remove(id) {
                    traces.hops -= gone.hops.len();
                }
            }
            traces.order.pop_front();
        }
    }

    fn push(&self, traces: &mut Traces, mut hop: Hop, now: Instant) {
        if hop.correlation_id.is_empty() {
            return;
        }
        if hop.node.is_empty() {
            hop.node.clone_from(&self.node);
        }
        let trace = match traces.by_id.get_mut(&hop.correlation_id) {
            Some(trace) => trace,
            None => {
                traces.order.push_back((now, hop.correlation_id.clone()));
                traces
                    .by_id
                    .entry(hop.correlation_id.clone())
                    .or_insert(Trace {
                        first: now,
                        hops: VecDeque::new(),
                    })
            }
        };
        if trace.hops.len() >= self.config.max_hops_per_trace.max(1) {
            trace.hops.pop_front();
            traces.hops -= 1;
        }
        // Sent under the lock, so a follower's snapshot and its live hops neither overlap
        // nor leave a gap.
        if self.recorded.receiver_count() > 0 {
            let _ = self.recorded.send(Arc::new(hop.clone()));
        }
        trace.hops.push_back(hop);
        traces.hops += 1;
    }
}

#[tonic::async_trait]
impl TraceJournal for MemoryJournal {
    fn enabled(&self) -> bool {
        true
    }

    fn record(&self, hop: Hop) {
        let now = Instant::now();
        let mut traces = self.inner.lock();
        self.push(&mut traces, hop, now);
        self.evict(&mut traces, now);
    }

    fn record_many(&self, hops: Vec<Hop>) {
        let now = Instant::now();
        let mut traces = self.inner.lock();
        for hop in hops {
            self.push(&mut traces, hop, now);
        }
        self.evict(&mut traces, now);
    }

    async fn hops(&self, correlation_id: &str) -> Result<Vec<Hop>, MeshError> {
        let mut traces = self.inner.lock();
        self.evict(&mut traces, Instant::now());
        Ok(traces
            .by_id
            .get(correlation_id)
            .map(|t| sorted(t.hops.iter().cloned().collect()))
            .unwrap_or_default())
    }

    async fn follow(&self, correlation_id: &str) -> Result<HopStream, MeshError> {
        let (snapshot, live) = {
            let traces = self.inner.lock();
            let snapshot: Vec<Hop> = traces
                .by_id
                .get(correlation_id)
                .map(|t| sorted(t.hops.iter().cloned().collect()))
                .unwrap_or_default();
            (snapshot, self.recorded.subscribe())
        };
        let id = correlation_id.to_owned();
        let live = tokio_stream::wrappers::BroadcastStream::new(live).filter_map(move |hop| {
            let keep = match hop {
                Ok(hop) if hop.correlation_id == id => Some(Ok(Hop::clone(&hop))),
                Ok(_) => None,
                Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => {
                    Some(Err(MeshError::ResourceExhausted(format!(
                        "the follower fell {n} hops behind the journal; follow again"
                    ))))
                }
            };
            std::future::ready(keep)
        });
        Ok(futures::stream::iter(snapshot.into_iter().map(Ok))
            .chain(live)
            .boxed())
    }
}

/// Hops in the order they started (a stable sort: equal times keep their recording order).
pub fn sorted(mut hops: Vec<Hop>) -> Vec<Hop> {
    hops.sort_by_key(|h| {
        h.started_at
            .map(|t| (t.seconds, t.nanos))
            .unwrap_or_default()
    });
    hops
}

/// One hop of a trace and the hops it caused.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceNode {
    /// The hop.
    pub hop: Hop,
    /// Its children, in the order they started.
    pub children: Vec<TraceNode>,
}

/// The hops of one trace as a tree: a hop hangs under the first earlier hop of the same
/// envelope (a retry under the first attempt, a delivery under its submit), else under the
/// first earlier hop of the envelope that caused it (`causation_id`); the rest are roots.
pub fn tree(hops: Vec<Hop>) -> Vec<TraceNode> {
    let hops = sorted(hops);
    let mut first_of: HashMap<&str, usize> = HashMap::new();
    let mut parent = vec![None; hops.len()];
    for (i, hop) in hops.iter().enumerate() {
        parent[i] = first_of
            .get(hop.envelope_id.as_str())
            .or_else(|| first_of.get(hop.causation_id.as_str()))
            .copied()
            .filter(|_| !hop.envelope_id.is_empty() || !hop.causation_id.is_empty());
        first_of.entry(hop.envelope_id.as_str()).or_insert(i);
    }
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); hops.len()];
    let mut roots = Vec::new();
    for (i, p) in parent.iter().enumerate() {
        match p {
            Some(p) => children[*p].push(i),
            None => roots.push(i),
        }
    }
    fn build(i: usize, hops: &[Hop], children: &[Vec<usize>]) -> TraceNode {
        TraceNode {
            hop: hops[i].clone(),
            children: children[i]
                .iter()
                .map(|&c| build(c, hops, children))
                .collect(),
        }
    }
    roots
        .into_iter()
        .map(|r| build(r, &hops, &children))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hop(correlation_id: &str, envelope_id: &str) -> Hop {
        let envelope = Envelope {
            id: envelope_id.into(),
            correlation_id: correlation_id.into(),
            ..Default::default()
        };
        hop_of(
            &envelope,
            "echo/1",
            "unary",
            SystemTime::now(),
            Duration::from_millis(1),
            Ok(()),
        )
    }

    #[tokio::test]
    async fn keeps_hops_by_correlation_id_within_its_bounds() {
        let journal = MemoryJournal::new(
            JournalConfig {
                max_hops: 4,
                max_hops_per_trace: 3,
                ..Default::default()
            },
            "node-1",
        );
        for i in 0..5 {
            journal.record(hop("a", &format!("e{i}")));
        }
        let a = journal.hops("a").await.unwrap();
        assert_eq!(
            a.iter().map(|h| h.envelope_id.as_str()).collect::<Vec<_>>(),
            ["e2", "e3", "e4"],
            "the oldest hops of a trace go first"
        );
        assert!(a.iter().all(|h| h.node == "node-1" && h.from == "client"));
        journal.record(hop("b", "x"));
        assert_eq!(journal.hops("a").await.unwrap().len(), 3, "4 hops in all");
        journal.record(hop("c", "y"));
        assert!(
            journal.hops("a").await.unwrap().is_empty(),
            "the oldest trace went"
        );
        assert_eq!(journal.hops("b").await.unwrap().len(), 1);
        assert_eq!(journal.hops("c").await.unwrap().len(), 1);
        journal.record(hop("", "no-id"));
        assert!(journal.hops("").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn traces_age_out() {
        let journal = MemoryJournal::new(
            JournalConfig {
                max_age: Duration::from_millis(20),
                ..Default::default()
            },
            "n",
        );
        journal.record(hop("a", "e1"));
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert!(journal.hops("a").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_follower_sees_recorded_hops_then_new_ones_once() {
        let journal = MemoryJournal::new(JournalConfig::default(), "n");
        journal.record(hop("a", "e1"));
        let mut follow = journal.follow("a").await.unwrap();
        journal.record(hop("other", "z"));
        journal.record(hop("a", "e2"));
        let first = follow.next().await.unwrap().unwrap();
        let second = follow.next().await.unwrap().unwrap();
        assert_eq!(
            (first.envelope_id.as_str(), second.envelope_id.as_str()),
            ("e1", "e2")
        );
    }

    #[test]
    fn hops_form_a_tree_by_envelope_and_causation() {
        let at = |ms: u64| SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
        let hop_at = |id: &str, cause: &str, ms: u64| {
            let envelope = Envelope {
                id: id.into(),
                causation_id: cause.into(),
                correlation_id: "c".into(),
                ..Default::default()
            };
            hop_of(&envelope, "x", "unary", at(ms), Duration::ZERO, Ok(()))
        };
        let roots = tree(vec![
            hop_at("w1", "f", 3),
            hop_at("f", "", 1),
            hop_at("w2", "f", 2),
            hop_at("w1", "f", 4),
            hop_at("q", "w1", 5),
            hop_at("lookup", "", 0),
        ]);
        let ids = |nodes: &[TraceNode]| {
            nodes
                .iter()
                .map(|n| n.hop.envelope_id.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(&roots), ["lookup", "f"]);
        assert_eq!(ids(&roots[1].children), ["w2", "w1"]);
        let w1 = &roots[1].children[1];
        assert_eq!(
            ids(&w1.children),
            ["w1", "q"],
            "the retry, then what w1 caused"
        );
    }
}
