//! One attempt at one instance, and the retry loop around attempts: shared by unary calls
//! and by opening streams (a stream is retried only until it has opened).

use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use agentmesh_proto::{CallContext, Deadline, v1::Envelope};
use agentmesh_resilience::{Backoff, counts_against_destination, request_rejection};
use tonic::{Code, Request, Status, metadata::MetadataMap};
use tonic_types::StatusExt;

use super::{AgentClient, Route, Router, Style, hop_metadata, hop_name};
use crate::{
    error::MeshError,
    journal::{finish, hop_of},
    registry::{CallKind, InFlightGuard, Instance},
    telemetry::HopSpan,
};

impl Router {
    /// Builds the outgoing request for a hop: the shrunk deadline and the
    /// tracing metadata of the envelope.
    pub fn outgoing<T>(
        &self,
        message: T,
        metadata: MetadataMap,
        call: &CallContext,
        hop: &str,
    ) -> Result<(Request<T>, Duration), MeshError> {
        let budget = hop_budget(&call.deadline, self.config.hop_margin, hop)?;
        let mut request = Request::from_parts(metadata, Default::default(), message);
        request.set_timeout(budget);
        Ok((request, budget))
    }

    /// Runs `attempt` against routed instances until it succeeds or a retry
    /// is not allowed: only UNAVAILABLE, only for calls with an idempotency
    /// key or to a skill declared idempotent, within `max_attempts`, the
    /// retry budget and the deadline, after the server's pushback or a
    /// jittered backoff, and on another instance when there is one.
    pub(super) async fn with_retries<T, F, Fut>(
        &self,
        call: &CallContext,
        mut envelope: Envelope,
        kind: CallKind,
        mut attempt: F,
    ) -> Result<T, Status>
    where
        F: FnMut(Route, Envelope) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        // A long-lived call holds its node-wide place for its whole life (taken by its caller).
        let _slot = match kind {
            CallKind::Unary => Some(self.slots.try_acquire().map_err(|_| {
                self.metrics.shed();
                MeshError::ResourceExhausted(format!(
                    "the node has {} unary calls in flight (router.max_in_flight); retry later",
                    self.config.max_in_flight
                ))
            })?),
            CallKind::LongLived => None,
        };
        self.budget.deposit();
        let retry = &self.config.retry;
        let mut backoff = Backoff::new(retry.initial_backoff, retry.max_backoff);
        let mut tried = Vec::new();
        let mut number = envelope.attempt.max(1);
        loop {
            let route = self.route(&envelope, &tried, kind)?;
            let may_retry = number < retry.max_attempts
                && (!envelope.idempotency_key.is_empty()
                    || route.instance.idempotent_for(&envelope.target));
            // The envelope is copied (payload and all) only when a retry may need it again;
            // otherwise this attempt is the last and takes it.
            let sent = if may_retry {
                tried.push(route.instance.card.instance_id.clone());
                Envelope {
                    attempt: number,
                    ..envelope.clone()
                }
            } else {
                envelope.attempt = number;
                std::mem::take(&mut envelope)
            };
            // Boxed: the attempt's state (the whole gRPC call) is large, and inline it would
            // be copied again into every future that awaits this one.
            let status = match Box::pin(attempt(route, sent)).await {
                Ok(value) => return Ok(value),
                Err(status) => status,
            };
            let pushback = pushback(&status);
            let retriable =
                may_retry && status.code() == Code::Unavailable && pushback != Some(None);
            if !retriable || !self.budget.withdraw() {
                return Err(status);
            }
            let delay = pushback.flatten().unwrap_or_else(|| backoff.next_delay());
            if delay + self.config.hop_margin >= call.deadline.remaining() {
                return Err(status);
            }
            self.metrics.retried();
            tracing::debug!(target = %envelope.target, attempt = number, delay_ms = delay.as_millis() as u64, %status, "retrying");
            tokio::time::sleep(delay).await;
            number += 1;
        }
    }

    /// One attempt at one instance: the breaker's permission, the hop's
    /// deadline, the in-flight count, and the outcome recorded on the breaker.
    /// `send` makes the actual call with the prepared request.
    pub(super) async fn attempt<M, T, Fut>(
        &self,
        call: &CallContext,
        route: Route,
        mut envelope: Envelope,
        style: Style,
        wrap: impl FnOnce(Envelope) -> M,
        send: impl FnOnce(AgentClient, Request<M>) -> Fut,
    ) -> Result<Attempt<T>, Status>
    where
        Fut: Future<Output = Result<T, Status>>,
    {
        let Route { instance, client } = route;
        let hop = hop_name(&instance);
        // The hop's span: the agent sees it as its caller.
        let span = HopSpan::open(
            &envelope.traceparent,
            style.as_str(),
            &instance.card.name,
            &envelope.correlation_id,
        );
        envelope.traceparent.clone_from(&span.traceparent);
        // The journal's hop, drawn up before the envelope is sent (its outcome set at the end).
        let mut journaled = self.journal.enabled().then(|| {
            let to = format!("{}/{}", instance.card.name, instance.card.instance_id);
            hop_of(
                &envelope,
                to,
                style.as_str(),
                SystemTime::now(),
                Duration::ZERO,
                Ok(()),
            )
        });
        let mut record = |outcome: Result<(), &Status>, took: Duration| {
            span.finish(outcome);
            if let Some(mut hop) = journaled.take() {
                finish(&mut hop, took, outcome);
                self.journal.record(hop);
            }
        };
        if let Err(open) = instance.breaker.try_acquire() {
            let status = Status::from(MeshError::BreakerOpen {
                target: hop,
                retry_after: open.retry_after(),
            });
            record(Err(&status), Duration::ZERO);
            return Err(status);
        }
        let metadata = hop_metadata(&envelope, call);
        let (request, budget) = match self.outgoing(wrap(envelope), metadata, call, &hop) {
            Ok(prepared) => prepared,
            Err(error) => {
                // No call was made: give the probe slot back as a non-failure.
                instance.breaker.record(true);
                let status = Status::from(error);
                record(Err(&status), Duration::ZERO);
                return Err(status);
            }
        };
        let in_flight = instance.start(match style {
            Style::Unary => CallKind::Unary,
            _ => CallKind::LongLived,
        });
        let started = Instant::now();
        // Boxed for the same reason as the attempt itself: the call's future is the largest
        // part of it, and moved on every await up the chain otherwise.
        let outcome = match tokio::time::timeout(budget, Box::pin(send(client, request))).await {
            Err(_) => Err(deadline_at(&hop, budget).into()),
            Ok(Err(status)) => Err(agent_failure(
                status,
                &hop,
                &instance,
                budget,
                started.elapsed(),
            )),
            Ok(Ok(value)) => Ok(value),
        };
        instance.breaker.record(match &outcome {
            Ok(_) => true,
            Err(status) => !counts_against_destination(status),
        });
        record(outcome.as_ref().map(|_| ()), started.elapsed());
        Ok(Attempt {
            value: outcome?,
            instance,
            in_flight,
            started,
            budget,
            hop,
        })
    }
}

/// The outcome of one attempt at one instance, with what the caller needs
/// to keep going (the in-flight guard lives as long as a stream does).
pub(super) struct Attempt<T> {
    pub(super) value: T,
    pub(super) instance: Arc<Instance>,
    pub(super) in_flight: InFlightGuard,
    pub(super) started: Instant,
    pub(super) budget: Duration,
    pub(super) hop: String,
}

/// Server pushback (gRPC A6): `Some(Some(d))` retry after `d`, `Some(None)`
/// do not retry, `None` no pushback. Read from `grpc-retry-pushback-ms` or a
/// google.rpc.RetryInfo detail.
fn pushback(status: &Status) -> Option<Option<Duration>> {
    if let Some(value) = status.metadata().get("grpc-retry-pushback-ms") {
        return Some(
            value
                .to_str()
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .map(Duration::from_millis),
        );
    }
    status
        .get_details_retry_info()
        .and_then(|info| info.retry_delay)
        .map(Some)
}

fn deadline_at(hop: &str, budget: Duration) -> MeshError {
    MeshError::DeadlineExceeded(format!(
        "deadline exceeded waiting for {hop}: no answer within its {} ms budget",
        budget.as_millis()
    ))
}

/// Maps an agent's failure to what the caller should see: our deadline if it
/// ran out, a clear UNAVAILABLE if the agent could not be reached, INVALID_ARGUMENT
/// if the agent's transport refused the request itself (the caller's failure, which
/// must not count against the agent), and the agent's own status otherwise.
pub fn agent_failure(
    status: Status,
    hop: &str,
    instance: &Instance,
    budget: Duration,
    elapsed: Duration,
) -> Status {
    let timed_out =
        elapsed >= budget && matches!(status.code(), Code::Cancelled | Code::DeadlineExceeded);
    if timed_out {
        return deadline_at(hop, budget).into();
    }
    if let Some(http) = request_rejection(&status) {
        let reason = match http {
            413 => "its body is too large",
            414 => "its path is too long",
            431 => "its headers are too large",
            _ => "it is malformed",
        };
        return MeshError::InvalidArgument(format!(
            "{hop} refused the request (HTTP {http}): {reason}; the request must change, the agent is not at fault"
        ))
        .into();
    }
    // A connection that failed under the call (a refused TLS handshake surfaces as
    // CANCELLED "connection closed" or UNKNOWN "fatal alert") is the agent being unreachable.
    let failed_connection = match status.code() {
        Code::Unavailable => is_transport_error(&status),
        Code::Cancelled | Code::Unknown => has_transport_source(&status),
        _ => false,
    };
    if failed_connection {
        return MeshError::Unavailable(format!(
            "{hop} at {} is unreachable: {}",
            instance.card.endpoint,
            status.message()
        ))
        .into();
    }
    status
}

fn is_transport_error(status: &Status) -> bool {
    has_transport_source(status)
        || status.message().contains("transport error")
        || status.message().contains("connect")
}

/// Whether the status was made by this side's transport (not received from the agent).
fn has_transport_source(status: &Status) -> bool {
    use std::error::Error;
    let mut source = status.source();
    while let Some(error) = source {
        if error.downcast_ref::<tonic::transport::Error>().is_some()
            || error.downcast_ref::<std::io::Error>().is_some()
        {
            return true;
        }
        source = error.source();
    }
    false
}

/// The budget of the next hop, or DEADLINE_EXCEEDED naming the hop when nothing would be left.
pub(crate) fn hop_budget(
    deadline: &Deadline,
    margin: Duration,
    hop: &str,
) -> Result<Duration, MeshError> {
    deadline.for_next_hop(margin).ok_or_else(|| {
        MeshError::DeadlineExceeded(format!(
            "deadline exceeded before calling {hop}: {} ms left, {} ms needed as hop margin",
            deadline.remaining().as_millis(),
            margin.as_millis()
        ))
    })
}
