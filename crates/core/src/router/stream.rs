//! Server streaming through the mesh: a new resumable stream (retried only until it opens),
//! or the rest of an earlier one from its replay window.

use std::sync::Arc;

use agentmesh_proto::{
    CallContext,
    v1::{Envelope, StreamRequest, StreamResponse},
};
use futures::StreamExt;
use tonic::Status;

use super::retry::Attempt;
use super::{AgentClient, Route, Router, Style, check_forwarded, require_target};
use crate::{api::EventStream, error::MeshError, registry::CallKind};

impl Router {
    /// Server streaming through the mesh: a new resumable stream, or the
    /// rest of an earlier one.
    pub async fn open_stream(
        &self,
        call: CallContext,
        request: StreamRequest,
    ) -> Result<EventStream<StreamResponse>, Status> {
        if !request.resume_stream_id.is_empty() {
            return Ok(Arc::clone(&self.streams)
                .resume(
                    &request.resume_stream_id,
                    request.resume_after_sequence,
                    call.credentials.as_ref(),
                )
                .await?);
        }
        let mut envelope = request
            .envelope
            .ok_or_else(|| MeshError::InvalidArgument("envelope is required".into()))?;
        require_target(&envelope)?;
        self.check_call(&call, &envelope.target)?;
        envelope.fill_from(&call);
        check_forwarded(&envelope)?;
        let slot = self.long_lived_slot()?;
        // A stream is retried only until it has opened: before its first event.
        let Attempt {
            value: response,
            in_flight,
            started,
            budget,
            hop,
            ..
        } = self
            .with_retries(&call, envelope, CallKind::LongLived, |route, sent| {
                self.open_upstream(&call, route, sent)
            })
            .await?;
        let upstream = response
            .map(move |event| {
                // The instance and the node count the stream for as long as it runs.
                let _ = (&in_flight, &slot);
                event
            })
            .boxed();
        Ok(Arc::clone(&self.streams)
            .start(upstream, started + budget, hop)
            .await?)
    }

    /// Opens the agent's side of a stream on one instance.
    async fn open_upstream(
        &self,
        call: &CallContext,
        route: Route,
        envelope: Envelope,
    ) -> Result<Attempt<EventStream<StreamResponse>>, Status> {
        self.attempt(
            call,
            route,
            envelope,
            Style::Stream,
            |envelope| StreamRequest {
                envelope: Some(envelope),
                ..Default::default()
            },
            async |client, request| match client {
                AgentClient::Grpc(mut client) => {
                    Ok(client.stream(request).await?.into_inner().boxed())
                }
                AgentClient::Foreign {
                    transport,
                    instance,
                } => transport.stream(&instance, request).await,
            },
        )
        .await
    }
}
