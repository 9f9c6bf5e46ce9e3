//! Conversations through the mesh: the target comes from the first frame; frames are
//! relayed both ways, heartbeats included, with backpressure per direction.

use std::time::{Instant, SystemTime};

use agentmesh_proto::{
    CallContext,
    v1::{ConverseRequest, ConverseResponse, Envelope, converse_request},
};
use futures::StreamExt;
use tonic::{Request, Status};

use super::{Route, Router, Style, agent_failure, hop_metadata, hop_name, retry::hop_budget};
use crate::{api::EventStream, error::MeshError, journal::hop_of, telemetry::HopSpan};

impl Router {
    /// A conversation through the mesh. The target comes from the first
    /// frame (`open`, or an envelope's `target`); frames are relayed both
    /// ways, heartbeats included, with flow control per direction.
    pub async fn open_conversation(
        &self,
        call: CallContext,
        mut inbound: EventStream<ConverseRequest>,
    ) -> Result<EventStream<ConverseResponse>, Status> {
        let first = match tokio::time::timeout(call.deadline.remaining(), inbound.next()).await {
            Err(_) => {
                return Err(MeshError::DeadlineExceeded(
                    "no first frame before the deadline".into(),
                )
                .into());
            }
            Ok(None) => {
                return Err(MeshError::InvalidArgument(
                    "the conversation ended before its first frame".into(),
                )
                .into());
            }
            Ok(Some(first)) => first?,
        };
        let mut probe = match &first.frame {
            Some(converse_request::Frame::Open(open)) => Envelope {
                target: open.target.clone(),
                ..Default::default()
            },
            Some(converse_request::Frame::Envelope(envelope)) => envelope.clone(),
            _ => Envelope::default(),
        };
        if probe.target.is_empty() {
            return Err(MeshError::InvalidArgument(
                "the first frame must be `open` with a target, or an envelope with a target".into(),
            )
            .into());
        }
        probe.fill_from(&call);
        let Route {
            instance,
            mut client,
        } = self.route(&probe, &[])?;
        let hop = hop_name(&instance);
        let span = HopSpan::open(
            &probe.traceparent,
            Style::Converse.as_str(),
            &instance.card.name,
            &probe.correlation_id,
        );
        probe.traceparent.clone_from(&span.traceparent);
        let stamp_frame = {
            let call = call.clone();
            move |mut request: ConverseRequest| {
                if let Some(converse_request::Frame::Envelope(envelope)) = &mut request.frame {
                    envelope.fill_from(&call);
                }
                request
            }
        };
        let first = stamp_frame(first);
        // A caller error (e.g. a reset) ends the relay; dropping it resets the agent's side.
        // Frames are relayed through a small channel, so a slow agent slows
        // the caller (per-direction backpressure); a caller error (e.g. a
        // reset) ends the relay, and dropping it resets the agent's side.
        let (frames, outgoing) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            if frames.send(first).await.is_err() {
                return;
            }
            while let Some(Ok(frame)) = inbound.next().await {
                if frames.send(stamp_frame(frame)).await.is_err() {
                    return;
                }
            }
        });
        let outgoing = tokio_stream::wrappers::ReceiverStream::new(outgoing);
        let mut request = Request::from_parts(hop_metadata(&probe), Default::default(), outgoing);
        // A conversation has no deadline unless its caller set one.
        if call.deadline.explicit {
            request.set_timeout(hop_budget(&call.deadline, self.config.hop_margin, &hop)?);
        }
        let in_flight = instance.start_call();
        let started = Instant::now();
        let began = SystemTime::now();
        let budget = call.deadline.remaining();
        let opened =
            match tokio::time::timeout(self.config.connect_timeout * 2, client.converse(request))
                .await
            {
                Err(_) => Err(Status::from(MeshError::Unavailable(format!(
                    "{hop} did not open the conversation"
                )))),
                Ok(Err(status)) => Err(agent_failure(
                    status,
                    &hop,
                    &instance,
                    budget,
                    started.elapsed(),
                )),
                Ok(Ok(response)) => Ok(response.into_inner()),
            };
        span.finish(opened.as_ref().map(|_| ()));
        if self.journal().enabled() {
            let to = format!("{}/{}", instance.card.name, instance.card.instance_id);
            self.journal().record(hop_of(
                &probe,
                to,
                Style::Converse.as_str(),
                began,
                started.elapsed(),
                opened.as_ref().map(|_| ()),
            ));
        }
        let response = opened?;
        Ok(response
            .map(move |frame| {
                let _ = &in_flight;
                frame
            })
            .boxed())
    }
}
