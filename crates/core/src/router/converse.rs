//! Conversations through the mesh: the target comes from the first frame; frames are
//! relayed both ways, heartbeats included, with backpressure per direction.

use std::time::{Instant, SystemTime};

use agentmesh_proto::{
    CallContext,
    v1::{ConverseRequest, ConverseResponse, Envelope, converse_request},
};
use futures::StreamExt;
use tonic::{Request, Status};

use super::{
    Route, Router, Style, agent_failure, check_forwarded, hop_metadata, hop_name, retry::hop_budget,
};
use crate::{
    api::EventStream, error::MeshError, journal::hop_of, registry::CallKind, telemetry::HopSpan,
};

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
        self.check_call(&call, &probe.target)?;
        probe.fill_from(&call);
        check_forwarded(&probe)?;
        let slot = self.long_lived_slot()?;
        let Route {
            instance,
            mut client,
        } = self.route(&probe, &[], CallKind::LongLived)?;
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
                    envelope.fill_frame(&call);
                }
                request
            }
        };
        let first = stamp_frame(first);
        // Frames are relayed through a small channel, so a slow agent slows the caller
        // (per-direction backpressure). A frame the caller sent that could not be read ends the
        // relay and the conversation with that frame's status; the agent's side is dropped.
        let (frames, outgoing) = tokio::sync::mpsc::channel(16);
        let (caller_failed, mut caller_failure) = tokio::sync::oneshot::channel::<Status>();
        tokio::spawn(async move {
            if frames.send(first).await.is_err() {
                return;
            }
            while let Some(frame) = inbound.next().await {
                match frame {
                    Ok(frame) => {
                        if frames.send(stamp_frame(frame)).await.is_err() {
                            return;
                        }
                    }
                    Err(status) => {
                        let _ = caller_failed.send(status);
                        return;
                    }
                }
            }
        });
        let outgoing = tokio_stream::wrappers::ReceiverStream::new(outgoing);
        let mut request =
            Request::from_parts(hop_metadata(&probe, &call), Default::default(), outgoing);
        // A conversation has no deadline unless its caller set one.
        if call.deadline.explicit {
            request.set_timeout(hop_budget(&call.deadline, self.config.hop_margin, &hop)?);
        }
        let in_flight = instance.start(CallKind::LongLived);
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
        Ok(async_stream::stream! {
            let _in_flight = (in_flight, slot);
            let mut response = response;
            let mut caller_ok = true;
            loop {
                tokio::select! {
                    biased;
                    failed = &mut caller_failure, if caller_ok => match failed {
                        Ok(status) => {
                            yield Err(status);
                            break;
                        }
                        // The caller's side ended cleanly; the agent's may go on.
                        Err(_) => caller_ok = false,
                    },
                    frame = response.next() => match frame {
                        Some(frame) => yield frame,
                        None => break,
                    },
                }
            }
        }
        .boxed())
    }
}
