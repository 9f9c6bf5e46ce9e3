//! The `agentmesh.v1` protocol.
//!
//! Everything that crosses the mesh is defined in `proto/agentmesh/v1/` and
//! compiled here: the message types and gRPC stubs ([`v1`]), the encoded
//! descriptor set used by server reflection ([`FILE_DESCRIPTOR_SET`]), and the
//! proto3 canonical JSON mapping of every message ([`json`]), which the HTTP
//! gateway and the CLI speak.
//!
//! Beside the generated code sit the rules every hop shares:
//! - [`context`]: the [`CallContext`] of a call (correlation id, deadline, trace context,
//!   idempotency key, caller), built once at the edge or from an envelope;
//! - [`envelope`]: filling an envelope from a context, answering one, its metadata, and
//!   [`v1::ErrorStatus`] from a `tonic::Status`;
//! - [`metadata`]: the names of the headers that carry them;
//! - [`limits`]: how long those headers and an envelope's ids, key and headers may be;
//! - [`names`]: the rule for agent, skill and queue names;
//! - [`codec`]: the gRPC codec that reports undecodable messages as `INVALID_ARGUMENT`.

pub mod codec;
pub mod context;
pub mod envelope;
pub mod json;
pub mod limits;
pub mod metadata;
pub mod names;
mod payload;

/// Generated messages and gRPC clients/servers of the `agentmesh.v1` package.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod v1 {
    tonic::include_proto!("agentmesh.v1");
}

/// The encoded `FileDescriptorSet` of every `agentmesh.v1` file and its imports.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/agentmesh_descriptor.bin"));

pub use context::{CallContext, Credentials, Deadline, DeadlinePolicy, Principal, new_id};
pub use envelope::ERROR_DOMAIN;
pub use payload::{json_to_value, value_to_json};
