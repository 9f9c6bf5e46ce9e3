//! The node's gRPC services: thin faces over the core. Each takes the call's
//! [`CallContext`] (from the edge layer), calls the core and wraps the answer.

mod agent;
mod discovery;
mod fanout;
mod oversized;
mod queue;
mod trace;

use agentmesh_core::EventStream;
use agentmesh_proto::{CallContext, DeadlinePolicy};
use futures::StreamExt;
use tonic::{Code, Request, Status, Streaming};

pub use agent::AgentFace;
pub use discovery::Discovery;
pub use fanout::FanOutFace;
pub use oversized::OversizedRequestLayer;
pub use queue::QueueFace;
pub use trace::TraceFace;

/// The context the edge layer stored on `request` (or, for a service mounted without that
/// layer, one read from its metadata the same way).
fn context<T>(request: &Request<T>) -> CallContext {
    CallContext::of(request).cloned().unwrap_or_else(|| {
        CallContext::from_metadata(request.metadata(), &DeadlinePolicy::default())
    })
}

/// A client's stream of frames as the core reads it. tonic reports a frame it cannot read as
/// INTERNAL (malformed protobuf) or OUT_OF_RANGE (over the size limit), codes meant for server
/// faults and positions; the call is ended with INVALID_ARGUMENT or RESOURCE_EXHAUSTED instead.
fn inbound<T: Send + 'static>(frames: Streaming<T>) -> EventStream<T> {
    frames.map(|frame| frame.map_err(unreadable_frame)).boxed()
}

/// The status for a frame the node could not read.
fn unreadable_frame(status: Status) -> Status {
    match status.code() {
        Code::OutOfRange => Status::resource_exhausted(format!(
            "a frame is over the size limit: {}",
            status.message()
        )),
        Code::Internal => Status::invalid_argument(format!(
            "a frame could not be decoded: {}",
            status.message()
        )),
        _ => status,
    }
}
