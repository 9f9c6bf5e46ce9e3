//! The node's gRPC services: thin faces over the core. Each takes the call's
//! [`CallContext`] (from the edge layer), calls the core and wraps the answer.

mod agent;
mod discovery;
mod fanout;
mod queue;
mod trace;

use agentmesh_proto::{CallContext, DeadlinePolicy};
use tonic::Request;

pub use agent::AgentFace;
pub use discovery::Discovery;
pub use fanout::FanOutFace;
pub use queue::QueueFace;
pub use trace::TraceFace;

/// The context the edge layer stored on `request` (or, for a service mounted without that
/// layer, one read from its metadata the same way).
fn context<T>(request: &Request<T>) -> CallContext {
    CallContext::of(request).cloned().unwrap_or_else(|| {
        CallContext::from_metadata(request.metadata(), &DeadlinePolicy::default())
    })
}
