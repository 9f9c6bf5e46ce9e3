//! OpenTelemetry across hops: a real node exports its hop spans over OTLP/gRPC to a receiver
//! of the test's own, and a three-hop chain (client → A → B → C, each agent calling the next
//! through the node) is one trace: every span carries the caller's trace id, each hop's span
//! is the child of the `traceparent` its caller sent, and each agent sees its hop's span as
//! its parent.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use agentmesh_proto::v1::Envelope;
use agentmesh_sdk::{Agent, AgentRuntime, Context};
use agentmesh_tests::{NodeProcess, card, free_port};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
    trace_service_server::{TraceService, TraceServiceServer},
};
use opentelemetry_proto::tonic::trace::v1::Span;
use serde_json::json;
use tonic::{Request, Response, Status};

const BIN: &str = env!("CARGO_BIN_EXE_agentmesh");
const CALLER: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// The OTLP trace service: keeps every span it is sent.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

/// Calls `next` through the node (or answers, when last) and reports the `traceparent` it
/// was called with.
struct Hop {
    next: Option<&'static str>,
    seen: Arc<Mutex<Vec<(String, String)>>>,
    name: &'static str,
}

#[tonic::async_trait]
impl Agent for Hop {
    async fn invoke(&self, ctx: Context, request: Envelope) -> Result<Envelope, Status> {
        self.seen
            .lock()
            .unwrap()
            .push((self.name.to_owned(), ctx.traceparent().to_owned()));
        match self.next {
            Some(next) => {
                let client = ctx.client().expect("started against a node");
                client.invoke(next, request).await
            }
            None => Ok(Envelope::json("done", json!({}))),
        }
    }
}

fn span_id_of(traceparent: &str) -> Vec<u8> {
    hex(traceparent.split('-').nth(2).unwrap())
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_three_hop_chain_is_one_trace_with_each_hop_the_child_of_its_caller() {
    let receiver = Receiver::default();
    let otlp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let otlp_address = otlp.local_addr().unwrap();
    otlp.set_nonblocking(true).unwrap();
    let incoming = tonic::transport::server::TcpIncoming::from(
        tokio::net::TcpListener::from_std(otlp).unwrap(),
    );
    let service = TraceServiceServer::new(receiver.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming),
    );

    let data = tempfile::tempdir().unwrap();
    let _ = free_port;
    let mut node = NodeProcess::start(
        BIN,
        data.path(),
        &[
            "--set".to_owned(),
            format!("telemetry.otlp_endpoint=http://{otlp_address}"),
            "--set".to_owned(),
            "telemetry.service_name=otlp-test".to_owned(),
        ],
    )
    .await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut agents = Vec::new();
    for (name, next) in [
        ("hop-a", Some("hop-b")),
        ("hop-b", Some("hop-c")),
        ("hop-c", None),
    ] {
        let agent = Hop {
            next,
            seen: seen.clone(),
            name,
        };
        let running = AgentRuntime::new(card(name), agent)
            .node(node.address.clone())
            .start()
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), running.registered(1))
            .await
            .unwrap();
        agents.push(running);
    }
    let request = Envelope {
        traceparent: CALLER.into(),
        ..Envelope::json("t", json!({}))
    };
    node.client().invoke("hop-a", request).await.unwrap();
    for agent in agents {
        agent.shutdown().await;
    }
    // A graceful stop flushes the exporter.
    let pid = node.child.id().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let _ = tokio::task::spawn_blocking(move || node.child.wait()).await;

    let spans = receiver.spans.lock().unwrap().clone();
    let hops: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name.starts_with("unary hop-"))
        .collect();
    assert_eq!(
        hops.len(),
        3,
        "one span per hop: {:?}",
        spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    let trace_id = hex(CALLER.split('-').nth(1).unwrap());
    assert!(hops.iter().all(|s| s.trace_id == trace_id), "one trace id");
    let by_name = |name: &str| {
        *hops
            .iter()
            .find(|s| s.name == format!("unary {name}"))
            .unwrap()
    };
    let seen = seen.lock().unwrap().clone();
    let seen_by = |name: &str| seen.iter().find(|(n, _)| n == name).unwrap().1.clone();
    // The caller's span → the hop to A → (A's call) the hop to B → the hop to C.
    assert_eq!(by_name("hop-a").parent_span_id, span_id_of(CALLER));
    assert_eq!(
        span_id_of(&seen_by("hop-a")),
        by_name("hop-a").span_id,
        "A's parent is its hop"
    );
    assert_eq!(by_name("hop-b").parent_span_id, by_name("hop-a").span_id);
    assert_eq!(span_id_of(&seen_by("hop-b")), by_name("hop-b").span_id);
    assert_eq!(by_name("hop-c").parent_span_id, by_name("hop-b").span_id);
    assert_eq!(span_id_of(&seen_by("hop-c")), by_name("hop-c").span_id);
    // SPAN_KIND_CLIENT, status OK.
    assert!(hops.iter().all(|s| s.kind == 3), "client spans");
    assert!(
        hops.iter()
            .all(|s| s.status.as_ref().is_some_and(|st| st.code == 1)),
        "status OK"
    );
}
