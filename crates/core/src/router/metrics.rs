//! What the router counts on its hot path, as typed Prometheus families: every call to an
//! agent by target, style and status code with its latency, retries, and calls shed.

use std::time::Duration;

use agentmesh_proto::envelope::code_name;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tonic::Code;

/// The interaction style of a routed call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Style {
    /// `Invoke`.
    Unary,
    /// `Stream` (latency: until the stream opened).
    Stream,
    /// `Converse` (latency: until the conversation opened).
    Converse,
}

impl Style {
    /// The style's name in metrics and the trace journal.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unary => "unary",
            Self::Stream => "stream",
            Self::Converse => "converse",
        }
    }
}

/// Labels of a routed call.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CallLabels {
    /// The agent's name.
    target: String,
    style: &'static str,
    code: &'static str,
}

type LatencyFamily = Family<CallLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 100 µs to ~13 s, doubling.
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

/// The router's metrics; cheap to clone (every family is shared).
#[derive(Debug, Clone)]
pub struct RouterMetrics {
    calls: LatencyFamily,
    retries: Counter,
    shed: Counter,
}

impl Default for RouterMetrics {
    fn default() -> Self {
        Self {
            calls: Family::new_with_constructor(latency_histogram),
            retries: Counter::default(),
            shed: Counter::default(),
        }
    }
}

impl RouterMetrics {
    /// Counts a finished call (or an opened stream) to `target` and its latency.
    pub fn record(&self, target: &str, style: Style, code: Code, latency: Duration) {
        self.calls
            .get_or_create(&CallLabels {
                target: target.to_owned(),
                style: style.as_str(),
                code: code_name(code),
            })
            .observe(latency.as_secs_f64());
    }

    /// Counts a retry.
    pub fn retried(&self) {
        self.retries.inc();
    }

    /// Counts a call refused for overload.
    pub fn shed(&self) {
        self.shed.inc();
    }

    /// Retries so far.
    pub fn retries(&self) -> u64 {
        self.retries.get()
    }

    /// Adds the router's families to `registry` (help texts without a final period:
    /// `prometheus-client` adds one).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "agentmesh_routed_calls_seconds",
            "Calls routed to agents (streams and conversations until they opened), by target, style and gRPC code",
            self.calls.clone(),
        );
        registry.register(
            "agentmesh_retries",
            "Retries made by the router",
            self.retries.clone(),
        );
        registry.register(
            "agentmesh_shed",
            "Calls refused with RESOURCE_EXHAUSTED for overload",
            self.shed.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_calls_with_their_labels() {
        let metrics = RouterMetrics::default();
        metrics.record("echo", Style::Unary, Code::Ok, Duration::from_millis(2));
        metrics.record(
            "echo",
            Style::Unary,
            Code::Unavailable,
            Duration::from_millis(1),
        );
        metrics.retried();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(
                "agentmesh_routed_calls_seconds_count{target=\"echo\",style=\"unary\",code=\"OK\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("code=\"UNAVAILABLE\""), "{text}");
        assert!(text.contains("agentmesh_retries_total 1"), "{text}");
        assert_eq!(metrics.retries(), 1);
    }
}
