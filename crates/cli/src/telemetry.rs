//! The process's log output and, when `telemetry.otlp_endpoint` is set, the OTLP export of
//! the node's hop spans (through `tracing-opentelemetry`), each with a filter of its own: the
//! log level (`AGENTMESH_LOG`) does not decide which spans are exported.

use agentmesh_node::TelemetryConfig;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{Resource, trace::SdkTracerProvider};
use tracing_subscriber::{
    EnvFilter, Layer, filter::Targets, layer::SubscriberExt, util::SubscriberInitExt,
};

/// Flushes and stops the exporter when dropped.
pub(crate) struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            if let Err(error) = provider.shutdown() {
                eprintln!("warning: exporting the last spans failed: {error}");
            }
        }
    }
}

fn log_filter() -> EnvFilter {
    EnvFilter::try_from_env("AGENTMESH_LOG").unwrap_or_else(|_| "info".into())
}

fn log_layer<S>() -> impl Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(log_filter())
}

/// Log output only (client commands).
pub(crate) fn init_logs() {
    tracing_subscriber::registry().with(log_layer()).init();
}

/// Log output, and span export as `config` says. Must run inside the Tokio runtime (the
/// exporter's gRPC client lives there).
pub(crate) fn init(config: &TelemetryConfig) -> anyhow::Result<Telemetry> {
    if config.otlp_endpoint.is_empty() {
        init_logs();
        return Ok(Telemetry { provider: None });
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(&config.otlp_endpoint)
        .build()?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            Resource::builder()
                .with_service_name(config.service_name.clone())
                .build(),
        )
        .build();
    let spans = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("agentmesh"))
        .with_filter(
            Targets::new().with_target("agentmesh_core::telemetry", tracing::Level::DEBUG),
        );
    tracing_subscriber::registry()
        .with(log_layer())
        .with(spans)
        .init();
    tracing::info!(endpoint = %config.otlp_endpoint, "exporting hop spans over OTLP");
    Ok(Telemetry {
        provider: Some(provider),
    })
}
