//! Resuming a stream through any node of a mesh: the resume is forwarded to the node that
//! owns the stream.
//!
//! A stream's replay window stays in the memory of the node that opened it, and its id names
//! that node (`{node}~{uuid}`). A caller whose connection to node A broke may resume through
//! node B: B sees that A owns the stream and asks A for the rest (an `AgentService.Stream`
//! resume, node to node), relaying it unchanged, so the caller gets no gap and no duplicate.
//!
//! Why forward rather than keep the window in a shared store: the window is the flow-control
//! bound between the agent and the reader, refilled event by event; mirroring every event to
//! Redis would cost a round trip per event for the rare resume. And the window cannot outlive
//! its owner anyway: the agent's side of the stream runs through the owning node, so if that
//! node dies the stream has ended, and the caller is told so plainly.

use std::sync::Arc;

use agentmesh_proto::Credentials;
use agentmesh_proto::v1::{
    StreamRequest, StreamResponse, agent_service_client::AgentServiceClient,
};
use futures::{StreamExt, stream::BoxStream};
use std::time::Instant;
use tonic::{Code, Status};

use super::{ReplayStore, StreamHub};
use crate::error::MeshError;

/// Separates the owning node's id from the rest of a stream id.
pub const OWNER_SEPARATOR: char = '~';

/// Where the other nodes of a mesh listen, by node id.
#[tonic::async_trait]
pub trait NodeDirectory: Send + Sync + std::fmt::Debug + 'static {
    /// The gRPC address (`http://host:port`) of node `node_id`, if it is alive.
    async fn address_of(&self, node_id: &str) -> Result<Option<String>, MeshError>;
}

/// A [`ReplayStore`] for one node of several: streams it opened are kept in its own
/// [`StreamHub`]; resumes of streams other nodes own are forwarded to them.
#[derive(Debug)]
pub struct ForwardingReplay {
    node_id: String,
    local: Arc<StreamHub>,
    directory: Arc<dyn NodeDirectory>,
}

impl ForwardingReplay {
    /// The replay store of node `node_id`, whose own streams live in `local`.
    pub fn new(node_id: String, local: Arc<StreamHub>, directory: Arc<dyn NodeDirectory>) -> Self {
        Self {
            node_id,
            local,
            directory,
        }
    }
}

/// The node that owns `stream_id`, if the id names one.
fn owner_of(stream_id: &str) -> Option<&str> {
    stream_id.split_once(OWNER_SEPARATOR).map(|(node, _)| node)
}

#[tonic::async_trait]
impl ReplayStore for ForwardingReplay {
    async fn start(
        self: Arc<Self>,
        upstream: BoxStream<'static, Result<StreamResponse, Status>>,
        deadline: Instant,
        hop: String,
    ) -> Result<BoxStream<'static, Result<StreamResponse, Status>>, MeshError> {
        Arc::clone(&self.local).start(upstream, deadline, hop).await
    }

    async fn resume(
        self: Arc<Self>,
        stream_id: &str,
        after: u64,
        credentials: Option<&Credentials>,
    ) -> Result<BoxStream<'static, Result<StreamResponse, Status>>, MeshError> {
        let owner = match owner_of(stream_id) {
            Some(owner) if owner != self.node_id => owner,
            _ => {
                return Arc::clone(&self.local)
                    .resume(stream_id, after, credentials)
                    .await;
            }
        };
        let gone = || {
            MeshError::StreamNotFound(format!(
                "{stream_id} (node {owner}, which served it, is gone: the stream ended with it)"
            ))
        };
        let address = self.directory.address_of(owner).await?.ok_or_else(gone)?;
        let started = Instant::now();
        let mut client = AgentServiceClient::connect(address.clone())
            .await
            .map_err(|e| {
                MeshError::Unavailable(format!(
                    "node {owner} at {address}, which serves stream {stream_id}, is unreachable: {e}"
                ))
            })?;
        let mut request = tonic::Request::new(StreamRequest {
            resume_stream_id: stream_id.to_owned(),
            resume_after_sequence: after,
            ..Default::default()
        });
        // With authentication on, the owner authenticates (and authorises) the caller itself.
        if let Some(credentials) = credentials {
            if let Ok(mut value) =
                tonic::metadata::MetadataValue::try_from(format!("Bearer {}", credentials.token()))
            {
                value.set_sensitive(true);
                request
                    .metadata_mut()
                    .insert(agentmesh_proto::metadata::AUTHORIZATION, value);
            }
        }
        match client.stream(request).await {
            Ok(response) => {
                tracing::debug!(stream = %stream_id, %owner, elapsed_us = started.elapsed().as_micros() as u64, "resume forwarded");
                Ok(response.into_inner().boxed())
            }
            // The owner's answer (not found, out of range) is the caller's answer.
            Err(status) if status.code() == Code::NotFound => Err(gone()),
            Err(status) => Err(MeshError::Forwarded(status)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_name_their_owner() {
        assert_eq!(owner_of("node-a~0190-abc"), Some("node-a"));
        assert_eq!(owner_of("0190-abc"), None);
    }
}
