//! `GET /metrics`: the node's figures in the OpenMetrics text format (which Prometheus
//! scrapes), as typed `prometheus-client` families: the router's calls with their latency
//! by target, style and code, retries and calls shed; every instance's load and breaker;
//! every queue's depth, in-flight count, dead letters and oldest message; the embedded
//! store's write counters; and the standard `process_*` figures.

use std::sync::{Arc, atomic::Ordering};

use agentmesh_core::{Router, queue::QueueHandle, registry::AgentRegistry};
use agentmesh_proto::v1::{AgentFilter, BreakerState};
use axum::{extract::State, http::header, response::IntoResponse, routing::get};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::{Registry as Families, Unit},
};

use crate::{auth::AuthStats, process_metrics::ProcessSample};

/// The OpenMetrics content type.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone)]
struct MetricsState {
    registry: Arc<dyn AgentRegistry>,
    router: Router,
    queue: QueueHandle,
    auth: Arc<AuthStats>,
}

/// The `/metrics` route.
pub fn routes(
    registry: Arc<dyn AgentRegistry>,
    router: Router,
    queue: QueueHandle,
    auth: Arc<AuthStats>,
) -> axum::Router {
    axum::Router::new()
        .route("/metrics", get(render))
        .with_state(MetricsState {
            registry,
            router,
            queue,
            auth,
        })
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct InstanceLabels {
    agent: String,
    instance: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct QueueLabels {
    queue: String,
}

/// A gauge holding `value` now.
fn gauge(value: i64) -> Gauge {
    let gauge = Gauge::default();
    gauge.set(value);
    gauge
}

/// A counter standing at `value` (read off a source that keeps its own count).
fn counter(value: u64) -> Counter {
    let counter = Counter::default();
    counter.inc_by(value);
    counter
}

/// Registers the figures read at this scrape; the router's own families are shared, the
/// rest are built from the current state.
/// Help texts end without a period: `prometheus-client` adds one.
async fn collect(state: &MetricsState) -> Families {
    let mut families = Families::default();
    state.router.metrics().register(&mut families);
    families.register(
        "agentmesh_agent_connections",
        "Connections the node holds to agent endpoints",
        gauge(state.router.agent_connections() as i64),
    );
    let instances = state.registry.lookup(&AgentFilter::default());
    families.register(
        "agentmesh_instances",
        "Registered agent instances",
        gauge(instances.len() as i64),
    );
    let in_flight = Family::<InstanceLabels, Gauge>::default();
    let breaker = Family::<InstanceLabels, Gauge>::default();
    for instance in &instances {
        let Some(card) = &instance.card else { continue };
        let labels = InstanceLabels {
            agent: card.name.clone(),
            instance: card.instance_id.clone(),
        };
        in_flight
            .get_or_create(&labels)
            .set(i64::from(instance.in_flight));
        breaker
            .get_or_create(&labels)
            .set(match BreakerState::try_from(instance.breaker) {
                Ok(BreakerState::Open) => 2,
                Ok(BreakerState::HalfOpen) => 1,
                _ => 0,
            });
    }
    families.register(
        "agentmesh_instance_in_flight",
        "Calls in flight to an instance",
        in_flight,
    );
    families.register(
        "agentmesh_breaker_state",
        "Circuit breaker of an instance: 0 closed, 1 half-open, 2 open",
        breaker,
    );
    families.register(
        "agentmesh_auth_failures",
        "Calls refused for missing, invalid or expired credentials",
        counter(state.auth.unauthenticated.load(Ordering::Relaxed)),
    );
    families.register(
        "agentmesh_auth_denied",
        "Calls refused by the authorisation policy",
        counter(state.router.access().denied()),
    );
    families.register(
        "agentmesh_rate_limited",
        "Calls refused over their caller's rate limit",
        counter(state.auth.rate_limited.load(Ordering::Relaxed)),
    );
    collect_queues(&mut families, &state.queue).await;
    collect_process(&mut families);
    families
}

/// The queue gauges; a store that cannot answer is reported by `agentmesh_queue_store_up 0`
/// rather than failing the whole scrape.
async fn collect_queues(families: &mut Families, queue: &QueueHandle) {
    let stats = queue.backend().stats().await;
    families.register(
        "agentmesh_queue_store_up",
        "Whether the queue store answered (1) or failed (0)",
        gauge(i64::from(stats.is_ok())),
    );
    let stats = stats.unwrap_or_default();
    type Read = fn(&agentmesh_queue::QueueStats) -> i64;
    let gauges: [(&str, &str, Read); 3] = [
        (
            "agentmesh_queue_depth",
            "Messages waiting in a queue (ready or delayed for a retry)",
            |s| s.depth as i64,
        ),
        (
            "agentmesh_queue_in_flight",
            "Messages of a queue leased to consumers",
            |s| s.in_flight as i64,
        ),
        (
            "agentmesh_queue_dead_letters",
            "Dead letters of a queue",
            |s| s.dead_letters as i64,
        ),
    ];
    for (name, help, read) in gauges {
        let family = Family::<QueueLabels, Gauge>::default();
        for s in &stats {
            family
                .get_or_create(&QueueLabels {
                    queue: s.name.clone(),
                })
                .set(read(s));
        }
        families.register(name, help, family);
    }
    let oldest = Family::<QueueLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    for s in &stats {
        oldest
            .get_or_create(&QueueLabels {
                queue: s.name.clone(),
            })
            .set(s.oldest_age.map_or(0.0, |a| a.as_secs_f64()));
    }
    families.register_with_unit(
        "agentmesh_queue_oldest_age",
        "Age of a queue's oldest message not yet acked (0 when empty)",
        Unit::Seconds,
        oldest,
    );
    if let Some(io) = queue.io_stats() {
        let counters = [
            (
                "commits",
                "Transactions the embedded queue store committed",
                io.commits,
            ),
            (
                "fsyncs",
                "Commits made durable with an fsync (group commits)",
                io.durable_commits,
            ),
            (
                "accepted_messages",
                "Messages the embedded queue store accepted",
                io.accepted_messages,
            ),
            (
                "transactions",
                "Write transactions the embedded queue store began (an idle store begins none)",
                io.transactions,
            ),
            (
                "timer_wakeups",
                "Turns of the queue store's writer woken by a timer rather than a request",
                io.timer_wakeups,
            ),
        ];
        for (name, help, value) in counters {
            families.register(
                format!("agentmesh_queue_store_{name}"),
                help,
                counter(value),
            );
        }
    }
}

/// The standard `process_*` families.
fn collect_process(families: &mut Families) {
    let Some(p) = ProcessSample::read() else {
        return;
    };
    let cpu = Counter::<f64, std::sync::atomic::AtomicU64>::default();
    cpu.inc_by(p.cpu_seconds);
    families.register_with_unit(
        "process_cpu",
        "Total user and system CPU time spent in seconds",
        Unit::Seconds,
        cpu,
    );
    families.register_with_unit(
        "process_resident_memory",
        "Resident memory size in bytes",
        Unit::Bytes,
        gauge(p.resident_memory_bytes as i64),
    );
    families.register_with_unit(
        "process_virtual_memory",
        "Virtual memory size in bytes",
        Unit::Bytes,
        gauge(p.virtual_memory_bytes as i64),
    );
    families.register(
        "process_open_fds",
        "Number of open file descriptors",
        gauge(p.open_fds as i64),
    );
    if let Some(max) = p.max_fds {
        families.register(
            "process_max_fds",
            "Maximum number of open file descriptors",
            gauge(max as i64),
        );
    }
    if let Some(start) = p.start_time_seconds {
        let started = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        started.set(start);
        families.register_with_unit(
            "process_start_time",
            "Start time of the process since unix epoch in seconds",
            Unit::Seconds,
            started,
        );
    }
}

async fn render(State(state): State<MetricsState>) -> impl IntoResponse {
    let families = collect(&state).await;
    let mut body = String::with_capacity(8 * 1024);
    if let Err(error) = prometheus_client::encoding::text::encode(&mut body, &families) {
        tracing::error!(%error, "encoding /metrics failed");
    }
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], body)
}
