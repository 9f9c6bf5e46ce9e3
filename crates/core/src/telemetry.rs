//! W3C trace context across hops: every hop the node makes to an agent runs in a span of its
//! own (a `tracing` span, exported as an OpenTelemetry span when the node has an exporter),
//! child of the caller's `traceparent`, and the agent gets the hop span's `traceparent`, so
//! each hop is one link of one trace.
//!
//! Without an exporter the spans cost little and export nothing, and the `traceparent` passed
//! on is still a child: same trace id, a fresh span id. A call that arrives without one
//! starts a trace.

use opentelemetry::{
    Context,
    trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState},
};
use tonic::Status;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use agentmesh_proto::envelope::code_name;

/// The span of one hop; ends when dropped.
#[derive(Debug)]
pub struct HopSpan {
    span: tracing::Span,
    /// The `traceparent` to send on the hop.
    pub traceparent: String,
}

impl HopSpan {
    /// Opens the span of a hop of `style` to `target`, child of `parent` (a `traceparent`;
    /// empty or malformed: a new trace).
    pub fn open(parent: &str, style: &str, target: &str, correlation_id: &str) -> Self {
        // Debug level: the log output leaves it out; the exporter, when there is one, takes it.
        let span = tracing::debug_span!(
            "agentmesh.hop",
            otel.name = %format!("{style} {target}"),
            otel.kind = "client",
            otel.status_code = Empty,
            otel.status_message = Empty,
            rpc.system = "grpc",
            rpc.grpc.status_code = Empty,
            agentmesh.style = %style,
            agentmesh.target = %target,
            agentmesh.correlation_id = %correlation_id,
        );
        let parent = parse(parent);
        if let Some(parent) = &parent {
            // Only fails once the span has started, which it has not.
            let _ = span.set_parent(Context::new().with_remote_span_context(parent.clone()));
        }
        let own = span.context().span().span_context().clone();
        let traceparent = if own.is_valid() {
            format_traceparent(&own)
        } else {
            // No exporter: a child of the caller's context all the same.
            let (trace_id, flags) = match &parent {
                Some(p) => (p.trace_id(), p.trace_flags()),
                None => (
                    TraceId::from_bytes(rand::random::<u128>().to_be_bytes()),
                    TraceFlags::SAMPLED,
                ),
            };
            let span_id = SpanId::from_bytes(rand::random::<u64>().max(1).to_be_bytes());
            format_traceparent(&SpanContext::new(
                trace_id,
                span_id,
                flags,
                false,
                TraceState::NONE,
            ))
        };
        Self { span, traceparent }
    }

    /// Records the hop's outcome on its span.
    pub fn finish(&self, outcome: Result<(), &Status>) {
        match outcome {
            Ok(()) => {
                self.span.record("rpc.grpc.status_code", 0);
                self.span.record("otel.status_code", "OK");
            }
            Err(status) => {
                self.span
                    .record("rpc.grpc.status_code", status.code() as i32);
                self.span.record("otel.status_code", "ERROR");
                self.span.record(
                    "otel.status_message",
                    format!("{}: {}", code_name(status.code()), status.message()).as_str(),
                );
            }
        }
    }
}

/// A `traceparent` (`00-{trace id}-{span id}-{flags}`), if well formed and valid.
pub fn parse(traceparent: &str) -> Option<SpanContext> {
    let mut parts = traceparent.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version.len() != 2
        || version == "ff"
        || trace.len() != 32
        || span.len() != 16
        || flags.len() != 2
    {
        return None;
    }
    let context = SpanContext::new(
        TraceId::from_hex(trace).ok()?,
        SpanId::from_hex(span).ok()?,
        TraceFlags::new(u8::from_str_radix(flags, 16).ok()?),
        true,
        TraceState::NONE,
    );
    context.is_valid().then_some(context)
}

fn format_traceparent(context: &SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        context.trace_id(),
        context.span_id(),
        context.trace_flags().to_u8()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_hop_continues_the_callers_trace_with_a_span_of_its_own() {
        let hop = HopSpan::open(PARENT, "unary", "echo", "c");
        let child = parse(&hop.traceparent).expect("a valid traceparent");
        let parent = parse(PARENT).unwrap();
        assert_eq!(child.trace_id(), parent.trace_id());
        assert_ne!(child.span_id(), parent.span_id());
        assert_eq!(child.trace_flags(), parent.trace_flags());
    }

    #[test]
    fn a_hop_without_a_valid_parent_starts_a_trace() {
        for parent in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        ] {
            let hop = HopSpan::open(parent, "unary", "echo", "c");
            let started = parse(&hop.traceparent).expect("a valid traceparent");
            assert!(started.is_sampled());
        }
        let a = HopSpan::open("", "unary", "echo", "c");
        let b = HopSpan::open("", "unary", "echo", "c");
        assert_ne!(a.traceparent, b.traceparent);
    }
}
