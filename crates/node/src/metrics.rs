//! `GET /metrics`: Prometheus text exposition of the router's counters and
//! every instance's load and breaker state.

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

use crate::registry::Registry;

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
}

/// The `/metrics` route.
pub fn routes(registry: Arc<Registry>, router: crate::router::Router) -> axum::Router {
    axum::Router::new()
        .route("/metrics", get(render))
        .with_state(MetricsState { registry, router })
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
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
