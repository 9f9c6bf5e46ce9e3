//! Fan-out: one request to many targets under a completion policy (all, quorum, first,
//! best effort), with every target's outcome reported.

use std::time::{Instant, SystemTime};

use agentmesh_proto::v1::{
    ErrorStatus, FanOutPolicy, FanOutRequest, FanOutResponse, FanOutResult, fan_out_result,
};
use futures::{StreamExt, stream::FuturesUnordered};
use tonic::Status;

use agentmesh_proto::CallContext;

use crate::{error::MeshError, journal::hop_of, router::Router, telemetry::HopSpan};

/// Most targets of one fan-out.
const MAX_TARGETS: usize = 256;

impl Router {
    /// Runs a fan-out. Per-target failures are reported in the results,
    /// never as the call's status; only a malformed request fails it.
    pub async fn fan_out(
        &self,
        call: CallContext,
        request: FanOutRequest,
    ) -> Result<FanOutResponse, Status> {
        let mut envelope = request
            .envelope
            .ok_or_else(|| MeshError::InvalidArgument("envelope is required".into()))?;
        let policy = FanOutPolicy::try_from(request.policy).unwrap_or(FanOutPolicy::All);
        let policy = if policy == FanOutPolicy::Unspecified {
            FanOutPolicy::All
        } else {
            policy
        };
        // Targets: explicit ones (one instance each), or every instance of a skill.
        let mut destinations = Vec::new();
        if !request.skill.is_empty() {
            let mut probe = envelope.clone();
            probe.target = format!("skill:{}", request.skill);
            for instance in self.compatible(&probe)? {
                destinations.push((instance.card.name.clone(), Some(instance)));
            }
        }
        for target in &request.targets {
            destinations.push((target.clone(), None));
        }
        if destinations.is_empty() {
            return Err(MeshError::InvalidArgument("name targets or a skill".into()).into());
        }
        if destinations.len() > MAX_TARGETS {
            return Err(MeshError::InvalidArgument(format!(
                "at most {MAX_TARGETS} targets per fan-out"
            ))
            .into());
        }
        let total = destinations.len();
        let needed = match policy {
            FanOutPolicy::Quorum | FanOutPolicy::First => {
                let count = request.count as usize;
                if count == 0 || count > total {
                    return Err(MeshError::InvalidArgument(format!(
                        "count must be between 1 and the number of targets ({total})"
                    ))
                    .into());
                }
                count
            }
            _ => total,
        };
        envelope.target.clear();
        envelope.fill_from(&call);
        agentmesh_proto::limits::check_envelope(&envelope)
            .map_err(|refusal| MeshError::InvalidArgument(refusal.message))?;
        let began = (Instant::now(), SystemTime::now());
        let targets: Vec<String> = destinations.iter().map(|(t, _)| t.clone()).collect();
        // The fan-out's span is the parent of every target's hop.
        let span = HopSpan::open(
            &envelope.traceparent,
            "fanout",
            &targets.join(","),
            &envelope.correlation_id,
        );
        envelope.traceparent.clone_from(&span.traceparent);

        let mut results: Vec<FanOutResult> = destinations
            .iter()
            .map(|(target, _)| FanOutResult {
                target: target.clone(),
                ..Default::default()
            })
            .collect();
        let mut pending = FuturesUnordered::new();
        for (index, (target, instance)) in destinations.into_iter().enumerate() {
            let mut sent = envelope.clone();
            sent.target = target.clone();
            sent.id = agentmesh_proto::new_id();
            sent.causation_id = envelope.id.clone();
            let call = call.clone();
            let router = self.clone();
            // Each target is checked on its own: a denied one fails in the results, the
            // others still run. Instances found by skill are checked against the skill.
            let allowed = match &instance {
                Some(_) => self.check_call(&call, &format!("skill:{}", request.skill)),
                None => self.check_call(&call, &target),
            };
            pending.push(async move {
                let started = Instant::now();
                let route = match (allowed, instance) {
                    (Err(denied), _) => Err(denied),
                    (Ok(()), Some(instance)) => router.route_to(instance),
                    (Ok(()), None) => router.route(&sent, &[], crate::registry::CallKind::Unary),
                };
                let outcome = match route {
                    Ok(route) => {
                        let instance_id = route.instance.card.instance_id.clone();
                        (instance_id, router.call_instance(&call, sent, route).await)
                    }
                    Err(error) => (String::new(), Err(Status::from(error))),
                };
                (index, outcome, started.elapsed())
            });
        }
        // Best effort answers before the caller's deadline, with what it has,
        // leaving two hop margins for the reply to travel back.
        let answer_by = Instant::now()
            + call
                .deadline
                .remaining()
                .saturating_sub(self.config().hop_margin * 2);
        let (mut succeeded, mut failed) = (0usize, 0usize);
        let satisfied = loop {
            let next = tokio::select! {
                next = pending.next() => next,
                _ = tokio::time::sleep_until(answer_by.into()) => None,
            };
            let Some((index, (instance_id, outcome), latency)) = next else {
                break match policy {
                    FanOutPolicy::BestEffort => true,
                    _ => succeeded >= needed,
                };
            };
            let result = &mut results[index];
            result.instance_id = instance_id;
            result.latency = prost_types::Duration::try_from(latency).ok();
            match outcome {
                Ok(reply) => {
                    succeeded += 1;
                    result.outcome = Some(fan_out_result::Outcome::Envelope(reply));
                }
                Err(status) => {
                    failed += 1;
                    result.outcome =
                        Some(fan_out_result::Outcome::Error(ErrorStatus::from(&status)));
                }
            }
            match policy {
                FanOutPolicy::Quorum | FanOutPolicy::First if succeeded >= needed => break true,
                FanOutPolicy::Quorum | FanOutPolicy::First if total - failed < needed => {
                    break false;
                }
                _ => {}
            }
        };
        // Whatever did not finish is cancelled (dropping its call) and reported.
        drop(pending);
        let unfinished = if Instant::now() >= answer_by {
            ErrorStatus::from(&Status::deadline_exceeded(
                "no answer before the fan-out's deadline",
            ))
        } else {
            ErrorStatus::from(&Status::cancelled(
                "not needed: the policy was already decided",
            ))
        };
        for result in &mut results {
            if result.outcome.is_none() {
                result.outcome = Some(fan_out_result::Outcome::Error(unfinished.clone()));
            }
        }
        let outcome = if satisfied {
            Ok(())
        } else {
            Err(Status::unavailable(format!(
                "the {} policy was not satisfied",
                policy.as_str_name()
            )))
        };
        span.finish(outcome.as_ref().map(|_| ()));
        if self.journal().enabled() {
            self.journal().record(hop_of(
                &envelope,
                targets.join(","),
                "fanout",
                began.1,
                began.0.elapsed(),
                outcome.as_ref().map(|_| ()),
            ));
        }
        Ok(FanOutResponse { results, satisfied })
    }
}
