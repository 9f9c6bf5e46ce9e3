//! `GET /metrics`: Prometheus text exposition of the router's counters, every
//! instance's load and breaker state, and every queue's depth, in-flight count,
//! dead letters and oldest message (plus the embedded store's write counters).

use std::{
    fmt::Write,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use agentmesh_proto::v1::{AgentFilter, BreakerState};
use axum::{extract::State, http::header, response::IntoResponse, routing::get};
use tonic::Code;

use crate::{process_metrics::ProcessSample, queue_service::QueueHandle, registry::Registry};

/// Counters the router updates on its hot path (relaxed atomics).
#[derive(Debug, Default)]
pub struct RouterMetrics {
    /// Calls to agents, by gRPC code.
    by_code: [AtomicU64; 17],
    /// Retries made.
    pub retries: AtomicU64,
    /// Calls refused for overload.
    pub shed: AtomicU64,
}

impl RouterMetrics {
    /// Counts a finished call to an agent.
    pub fn record(&self, code: Code) {
        if let Some(counter) = self.by_code.get(code as usize) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[derive(Clone)]
struct MetricsState {
    registry: Arc<Registry>,
    router: crate::router::Router,
    queue: QueueHandle,
}

/// The `/metrics` route.
pub fn routes(
    registry: Arc<Registry>,
    router: crate::router::Router,
    queue: QueueHandle,
) -> axum::Router {
    axum::Router::new()
        .route("/metrics", get(render))
        .with_state(MetricsState {
            registry,
            router,
            queue,
        })
}

/// Reads one gauge's value off a queue's stats.
type QueueGauge = fn(&agentmesh_queue::QueueStats) -> f64;

/// Appends the queue gauges; a queue store that cannot answer is reported by
/// `agentmesh_queue_store_up 0` rather than failing the whole scrape.
async fn render_queues(out: &mut String, queue: &QueueHandle) {
    let stats = queue.backend().stats().await;
    let _ = writeln!(
        out,
        "# HELP agentmesh_queue_store_up Whether the queue store answered (1) or failed (0)."
    );
    let _ = writeln!(out, "# TYPE agentmesh_queue_store_up gauge");
    let _ = writeln!(out, "agentmesh_queue_store_up {}", u8::from(stats.is_ok()));
    let stats = stats.unwrap_or_default();
    let gauges: [(&str, &str, QueueGauge); 4] = [
        (
            "depth",
            "Messages waiting in a queue (ready or delayed for a retry).",
            |s| s.depth as f64,
        ),
        (
            "in_flight",
            "Messages of a queue leased to consumers.",
            |s| s.in_flight as f64,
        ),
        ("dead_letters", "Dead letters of a queue.", |s| {
            s.dead_letters as f64
        }),
        (
            "oldest_age_seconds",
            "Age of a queue's oldest message not yet acked (0 when empty).",
            |s| s.oldest_age.map_or(0.0, |a| a.as_secs_f64()),
        ),
    ];
    for (name, help, value) in gauges {
        let _ = writeln!(out, "# HELP agentmesh_queue_{name} {help}");
        let _ = writeln!(out, "# TYPE agentmesh_queue_{name} gauge");
        for s in &stats {
            let _ = writeln!(
                out,
                "agentmesh_queue_{name}{{queue=\"{}\"}} {}",
                escape(&s.name),
                value(s)
            );
        }
    }
    if let Some(io) = queue.io_stats() {
        let counters = [
            (
                "commits",
                "Transactions the embedded queue store committed.",
                io.commits,
            ),
            (
                "fsyncs",
                "Commits made durable with an fsync (group commits).",
                io.durable_commits,
            ),
            (
                "accepted_messages",
                "Messages the embedded queue store accepted.",
                io.accepted_messages,
            ),
            (
                "transactions",
                "Write transactions the embedded queue store began (an idle store begins none).",
                io.transactions,
            ),
            (
                "timer_wakeups",
                "Turns of the queue store's writer woken by a timer rather than a request.",
                io.timer_wakeups,
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(out, "# HELP agentmesh_queue_store_{name}_total {help}");
            let _ = writeln!(out, "# TYPE agentmesh_queue_store_{name}_total counter");
            let _ = writeln!(out, "agentmesh_queue_store_{name}_total {value}");
        }
    }
}

async fn render(State(state): State<MetricsState>) -> impl IntoResponse {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP agentmesh_routed_calls_total Calls routed to agents, by gRPC code."
    );
    let _ = writeln!(out, "# TYPE agentmesh_routed_calls_total counter");
    for (index, counter) in state.router.metrics().by_code.iter().enumerate() {
        let code = format!("{:?}", Code::from(index as i32));
        let _ = writeln!(
            out,
            "agentmesh_routed_calls_total{{code=\"{code}\"}} {}",
            counter.load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(
        out,
        "# HELP agentmesh_retries_total Retries made by the router."
    );
    let _ = writeln!(out, "# TYPE agentmesh_retries_total counter");
    let _ = writeln!(
        out,
        "agentmesh_retries_total {}",
        state.router.metrics().retries.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP agentmesh_shed_total Calls refused with RESOURCE_EXHAUSTED for overload."
    );
    let _ = writeln!(out, "# TYPE agentmesh_shed_total counter");
    let _ = writeln!(
        out,
        "agentmesh_shed_total {}",
        state.router.metrics().shed.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP agentmesh_agent_connections Connections the node holds to agent endpoints."
    );
    let _ = writeln!(out, "# TYPE agentmesh_agent_connections gauge");
    let _ = writeln!(
        out,
        "agentmesh_agent_connections {}",
        state.router.agent_connections()
    );
    let instances = state.registry.lookup(&AgentFilter::default());
    let _ = writeln!(
        out,
        "# HELP agentmesh_instances Registered agent instances."
    );
    let _ = writeln!(out, "# TYPE agentmesh_instances gauge");
    let _ = writeln!(out, "agentmesh_instances {}", instances.len());
    let _ = writeln!(
        out,
        "# HELP agentmesh_instance_in_flight Calls in flight to an instance."
    );
    let _ = writeln!(out, "# TYPE agentmesh_instance_in_flight gauge");
    let _ = writeln!(
        out,
        "# HELP agentmesh_breaker_state Circuit breaker of an instance: 0 closed, 1 half-open, 2 open."
    );
    let _ = writeln!(out, "# TYPE agentmesh_breaker_state gauge");
    for instance in &instances {
        let Some(card) = &instance.card else { continue };
        let labels = format!(
            "agent=\"{}\",instance=\"{}\"",
            escape(&card.name),
            escape(&card.instance_id)
        );
        let breaker = match BreakerState::try_from(instance.breaker) {
            Ok(BreakerState::Open) => 2,
            Ok(BreakerState::HalfOpen) => 1,
            _ => 0,
        };
        let _ = writeln!(
            out,
            "agentmesh_instance_in_flight{{{labels}}} {}",
            instance.in_flight
        );
        let _ = writeln!(out, "agentmesh_breaker_state{{{labels}}} {breaker}");
    }
    render_queues(&mut out, &state.queue).await;
    render_process(&mut out);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
}

/// Appends the standard `process_*` families.
fn render_process(out: &mut String) {
    let Some(p) = ProcessSample::read() else {
        return;
    };
    let mut family = |name: &str, kind: &str, help: &str, value: f64| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        let _ = writeln!(out, "{name} {value}");
    };
    family(
        "process_cpu_seconds_total",
        "counter",
        "Total user and system CPU time spent in seconds.",
        p.cpu_seconds,
    );
    family(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
        p.resident_memory_bytes as f64,
    );
    family(
        "process_virtual_memory_bytes",
        "gauge",
        "Virtual memory size in bytes.",
        p.virtual_memory_bytes as f64,
    );
    family(
        "process_open_fds",
        "gauge",
        "Number of open file descriptors.",
        p.open_fds as f64,
    );
    if let Some(max) = p.max_fds {
        family(
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            max as f64,
        );
    }
    if let Some(start) = p.start_time_seconds {
        family(
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            start,
        );
    }
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
