//! The router: the node's own `agentmesh.v1.AgentService`. It resolves an
//! envelope's `target` to a live instance (least loaded first), stamps the
//! envelope (id, correlation, deadline), and forwards the call with a strictly
//! shorter deadline than the caller's.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use agentmesh_gateway::EventStream;
use agentmesh_proto::v1::converse_request;
use agentmesh_proto::{
    metadata::{CORRELATION_ID, IDEMPOTENCY_KEY, TRACEPARENT, VIA},
    v1::{
        ConverseRequest, ConverseResponse, Envelope, InvokeRequest, InvokeResponse, StreamRequest,
        StreamResponse, agent_service_client::AgentServiceClient,
        agent_service_server::AgentService,
    },
};
use agentmesh_resilience::{Backoff, RetryBudget, is_destination_failure};
use futures::StreamExt;
use parking_lot::Mutex;
use rand::seq::IndexedRandom;
use std::sync::atomic::Ordering;
use tokio::sync::Semaphore;
use tonic::{
    Code, Request, Response, Status, Streaming,
    metadata::{MetadataMap, MetadataValue},
    transport::{Channel, Endpoint},
};
use tonic_types::StatusExt;

use crate::{
    correlation::CorrelationId,
    deadline::Deadline,
    error::NodeError,
    idempotency::{Claim, IdempotencyCache},
    metrics::RouterMetrics,
    registry::{InFlightGuard, Instance, Registry},
    replay::{ReplayConfig, StreamHub},
};

/// Router settings.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// Deadline when a request arrives without the layers that set one.
    pub default_timeout: Duration,
    /// How much shorter each outgoing call's deadline is than what remains.
    pub hop_margin: Duration,
    /// Timeout for opening a connection to an agent.
    pub connect_timeout: Duration,
    /// Retries of failed calls.
    pub retry: RetryConfig,
    /// Most calls in flight to one instance; busier instances are skipped.
    pub max_in_flight_per_instance: u32,
    /// Most calls in flight through the node; beyond it calls are shed.
    pub max_in_flight: usize,
    /// How long a response is remembered by idempotency key.
    pub idempotency_window: Duration,
    /// Most responses remembered by idempotency key.
    pub idempotency_capacity: usize,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            default_timeout: Duration::from_secs(30),
            hop_margin: Duration::from_millis(50),
            connect_timeout: Duration::from_secs(2),
            retry: RetryConfig::default(),
            max_in_flight_per_instance: 256,
            max_in_flight: 10_000,
            idempotency_window: Duration::from_secs(600),
            idempotency_capacity: 100_000,
        }
    }
}

/// When and how failed calls are retried (gRPC A6 style).
#[derive(Debug, Clone)]
pub struct RetryConfig {
    /// Attempts in all, the first included (1 disables retries).
    pub max_attempts: u32,
    /// Backoff ceiling of the first retry; doubles per retry, full jitter.
    pub initial_backoff: Duration,
    /// Largest backoff.
    pub max_backoff: Duration,
    /// Extra load retries may add, as a fraction of first attempts.
    pub budget_ratio: f64,
    /// Retries always allowed per second, however quiet the node.
    pub budget_min_per_second: u32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(25),
            max_backoff: Duration::from_secs(1),
            budget_ratio: 0.2,
            budget_min_per_second: 10,
        }
    }
}

/// What the router knows about the call being served.
#[derive(Debug, Clone)]
pub struct CallInfo {
    /// Correlation id of the call chain.
    pub correlation_id: String,
    /// The call's absolute deadline.
    pub deadline: Deadline,
    /// W3C traceparent, if the caller sent one.
    pub traceparent: Option<String>,
    /// Idempotency key, if the caller sent one as metadata.
    pub idempotency_key: Option<String>,
}

impl CallInfo {
    /// Reads the call's context from a request's extensions and metadata.
    pub fn of<T>(request: &Request<T>, default_timeout: Duration) -> Self {
        let metadata = request.metadata();
        let text = |key: &str| {
            metadata
                .get(key)
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
        };
        Self {
            correlation_id: request
                .extensions()
                .get::<CorrelationId>()
                .map(|c| c.0.clone())
                .or_else(|| text(CORRELATION_ID))
                .unwrap_or_else(|| uuid::Uuid::now_v7().to_string()),
            deadline: request
                .extensions()
                .get::<Deadline>()
                .copied()
                .unwrap_or_else(|| Deadline(Instant::now() + default_timeout)),
            traceparent: text(TRACEPARENT),
            idempotency_key: text(IDEMPOTENCY_KEY),
        }
    }
}

/// Connections to agents, one lazily connected channel per endpoint.
#[derive(Debug, Default)]
struct ChannelPool {
    channels: Mutex<HashMap<String, Channel>>,
}

impl ChannelPool {
    fn get(&self, endpoint: &str, connect_timeout: Duration) -> Result<Channel, NodeError> {
        let mut channels = self.channels.lock();
        if let Some(channel) = channels.get(endpoint) {
            return Ok(channel.clone());
        }
        let channel = Endpoint::from_shared(endpoint.to_owned())
            .map_err(|e| NodeError::Unavailable(format!("bad agent endpoint {endpoint}: {e}")))?
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .connect_lazy();
        channels.insert(endpoint.to_owned(), channel.clone());
        Ok(channel)
    }

    /// Drops the connections to endpoints no live instance uses any more.
    fn prune(&self, live: &std::collections::HashSet<String>) {
        self.channels
            .lock()
            .retain(|endpoint, _| live.contains(endpoint));
    }

    fn len(&self) -> usize {
        self.channels.lock().len()
    }
}

/// Routes calls to registered agents.
#[derive(Debug, Clone)]
pub struct Router {
    registry: Arc<Registry>,
    channels: Arc<ChannelPool>,
    streams: Arc<StreamHub>,
    budget: Arc<RetryBudget>,
    slots: Arc<Semaphore>,
    idempotency: Arc<IdempotencyCache>,
    metrics: Arc<RouterMetrics>,
    config: RouterConfig,
}

/// A resolved destination: the instance and a client for it.
#[derive(Debug)]
pub struct Route {
    /// The chosen instance.
    pub instance: Arc<Instance>,
    /// A client connected (lazily) to its endpoint.
    pub client: AgentServiceClient<Channel>,
}

impl Router {
    /// A router over `registry`.
    pub fn new(registry: Arc<Registry>, config: RouterConfig, replay: ReplayConfig) -> Self {
        Self {
            registry,
            channels: Arc::default(),
            streams: Arc::new(StreamHub::new(replay)),
            budget: Arc::new(RetryBudget::new(
                config.retry.budget_ratio,
                config.retry.budget_min_per_second,
            )),
            slots: Arc::new(Semaphore::new(config.max_in_flight)),
            idempotency: Arc::new(IdempotencyCache::new(
                config.idempotency_window,
                config.idempotency_capacity,
            )),
            metrics: Arc::default(),
            config,
        }
    }

    /// Closes connections to agents that left: on every registry removal or
    /// expiry, endpoints no live instance uses are dropped from the pool.
    pub fn spawn_channel_pruner(&self) {
        let mut events = self.registry.subscribe();
        let registry = Arc::downgrade(&self.registry);
        let channels = Arc::downgrade(&self.channels);
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
                let (Some(registry), Some(channels)) = (registry.upgrade(), channels.upgrade())
                else {
                    return;
                };
                let live = registry
                    .lookup(&agentmesh_proto::v1::AgentFilter::default())
                    .into_iter()
                    .filter_map(|instance| instance.card.map(|card| card.endpoint))
                    .collect();
                channels.prune(&live);
            }
        });
    }

    /// Open (or lazily opening) connections to agents.
    pub fn agent_connections(&self) -> usize {
        self.channels.len()
    }

    /// The router's counters, for `/metrics`.
    pub fn metrics(&self) -> Arc<RouterMetrics> {
        Arc::clone(&self.metrics)
    }

    /// The router's settings.
    pub fn config(&self) -> &RouterConfig {
        &self.config
    }

    /// Live instances for an envelope's target that accept its payload type
    /// and version (FAILED_PRECONDITION naming the versions on offer if
    /// none does).
    pub fn compatible(&self, envelope: &Envelope) -> Result<Vec<Arc<Instance>>, NodeError> {
        let target = envelope.target.as_str();
        let candidates = self.registry.resolve(target);
        if candidates.is_empty() {
            return Err(NodeError::AgentNotFound {
                target: target.to_owned(),
            });
        }
        let (compatible, incompatible): (Vec<_>, Vec<_>) = candidates
            .into_iter()
            .partition(|i| i.accepts(&envelope.r#type, &envelope.type_version));
        if compatible.is_empty() {
            let mut offered: Vec<String> = incompatible
                .iter()
                .flat_map(|i| i.versions_of(&envelope.r#type))
                .collect();
            offered.sort();
            offered.dedup();
            return Err(NodeError::NoCompatibleVersion {
                target: target.to_owned(),
                payload_type: envelope.r#type.clone(),
                version: envelope.type_version.clone(),
                offered,
            });
        }
        Ok(compatible)
    }

    /// Picks the least-loaded compatible instance whose breaker is closed (or
    /// due for a probe) and that has room for another call, preferring
    /// instances not in `tried`.
    pub fn route(&self, envelope: &Envelope, tried: &[String]) -> Result<Route, NodeError> {
        let compatible = self.compatible(envelope)?;
        let limit = self.config.max_in_flight_per_instance;
        let load = |i: &Arc<Instance>| i.in_flight.load(std::sync::atomic::Ordering::Relaxed);
        let usable: Vec<&Arc<Instance>> = compatible
            .iter()
            .filter(|i| i.breaker.would_allow() && load(i) < limit)
            .collect();
        if usable.is_empty() {
            let all_open = compatible.iter().all(|i| !i.breaker.would_allow());
            if all_open {
                let probe_in = compatible
                    .iter()
                    .filter_map(|i| i.breaker.try_acquire().err())
                    .map(|open| open.retry_after())
                    .min()
                    .unwrap_or_default();
                return Err(NodeError::BreakerOpen {
                    target: envelope.target.clone(),
                    retry_after: probe_in,
                });
            }
            return Err(NodeError::ResourceExhausted(format!(
                "every instance of '{}' has {limit} calls in flight; retry later",
                envelope.target
            )));
        }
        let fresh: Vec<&Arc<Instance>> = usable
            .iter()
            .filter(|i| !tried.contains(&i.card.instance_id))
            .copied()
            .collect();
        let pool = if fresh.is_empty() { usable } else { fresh };
        let least = pool.iter().map(|i| load(i)).min().unwrap_or_default();
        let least_loaded: Vec<&Arc<Instance>> =
            pool.into_iter().filter(|i| load(i) == least).collect();
        let instance = Arc::clone(
            least_loaded
                .choose(&mut rand::rng())
                .expect("at least one usable instance"),
        );
        self.route_to(instance)
    }

    /// A route to a specific instance.
    pub fn route_to(&self, instance: Arc<Instance>) -> Result<Route, NodeError> {
        let channel = self
            .channels
            .get(&instance.card.endpoint, self.config.connect_timeout)?;
        Ok(Route {
            instance,
            client: AgentServiceClient::new(channel)
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX),
        })
    }

    /// Fills in what the sender left empty: id, correlation, creation time,
    /// deadline, trace context, idempotency key and attempt.
    pub fn stamp(envelope: &mut Envelope, call: &CallInfo) {
        if envelope.id.is_empty() {
            envelope.id = uuid::Uuid::now_v7().to_string();
        }
        if envelope.correlation_id.is_empty() {
            envelope.correlation_id = call.correlation_id.clone();
        }
        if envelope.created_at.is_none() {
            envelope.created_at = Some(SystemTime::now().into());
        }
        let deadline = SystemTime::now() + call.deadline.remaining();
        let earlier = envelope
            .deadline
            .and_then(|d| SystemTime::try_from(d).ok())
            .is_some_and(|d| d <= deadline);
        if !earlier {
            envelope.deadline = Some(deadline.into());
        }
        if envelope.traceparent.is_empty() {
            envelope.traceparent = call.traceparent.clone().unwrap_or_default();
        }
        if envelope.idempotency_key.is_empty() {
            envelope.idempotency_key = call.idempotency_key.clone().unwrap_or_default();
        }
        if envelope.attempt == 0 {
            envelope.attempt = 1;
        }
    }

    /// Builds the outgoing request for a hop: the shrunk deadline and the
    /// tracing metadata of the envelope.
    pub fn outgoing<T>(
        &self,
        message: T,
        metadata: MetadataMap,
        call: &CallInfo,
        hop: &str,
    ) -> Result<(Request<T>, Duration), NodeError> {
        let budget = call.deadline.for_next_hop(self.config.hop_margin, hop)?;
        let mut request = Request::from_parts(metadata, Default::default(), message);
        request.set_timeout(budget);
        Ok((request, budget))
    }

    /// Server streaming through the mesh: a new resumable stream, or the
    /// rest of an earlier one.
    pub async fn open_stream(
        &self,
        call: CallInfo,
        request: StreamRequest,
    ) -> Result<EventStream<StreamResponse>, Status> {
        if !request.resume_stream_id.is_empty() {
            return Ok(self
                .streams
                .resume(&request.resume_stream_id, request.resume_after_sequence)?);
        }
        let mut envelope = request
            .envelope
            .ok_or_else(|| NodeError::InvalidArgument("envelope is required".into()))?;
        require_target(&envelope)?;
        Self::stamp(&mut envelope, &call);
        // A stream is retried only until it has opened: before its first event.
        let Attempt {
            value: response,
            in_flight,
            started,
            budget,
            hop,
            ..
        } = self
            .with_retries(&call, &envelope, |route, sent| {
                self.open_upstream(&call, route, sent)
            })
            .await?;
        let upstream = response
            .map(move |event| {
                // The instance counts as busy for as long as its stream runs.
                let _ = &in_flight;
                event
            })
            .boxed();
        Ok(self.streams.start(upstream, started + budget, hop)?)
    }

    /// A conversation through the mesh. The target comes from the first
    /// frame (`open`, or an envelope's `target`); frames are relayed both
    /// ways, heartbeats included, with flow control per direction.
    pub async fn open_conversation(
        &self,
        call: CallInfo,
        caller_set_deadline: bool,
        mut inbound: EventStream<ConverseRequest>,
    ) -> Result<EventStream<ConverseResponse>, Status> {
        let first = match tokio::time::timeout(call.deadline.remaining(), inbound.next()).await {
            Err(_) => {
                return Err(NodeError::DeadlineExceeded(
                    "no first frame before the deadline".into(),
                )
                .into());
            }
            Ok(None) => {
                return Err(NodeError::InvalidArgument(
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
            return Err(NodeError::InvalidArgument(
                "the first frame must be `open` with a target, or an envelope with a target".into(),
            )
            .into());
        }
        Self::stamp(&mut probe, &call);
        let Route {
            instance,
            mut client,
        } = self.route(&probe, &[])?;
        let hop = hop_name(&instance);
        let stamp_frame = {
            let call = call.clone();
            move |mut request: ConverseRequest| {
                if let Some(converse_request::Frame::Envelope(envelope)) = &mut request.frame {
                    Self::stamp(envelope, &call);
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
        let mut request =
            Request::from_parts(tracing_metadata(&probe), Default::default(), outgoing);
        if caller_set_deadline {
            request.set_timeout(call.deadline.for_next_hop(self.config.hop_margin, &hop)?);
        }
        let in_flight = instance.start_call();
        let started = Instant::now();
        let budget = call.deadline.remaining();
        let response =
            match tokio::time::timeout(self.config.connect_timeout * 2, client.converse(request))
                .await
            {
                Err(_) => {
                    return Err(NodeError::Unavailable(format!(
                        "{hop} did not open the conversation"
                    ))
                    .into());
                }
                Ok(Err(status)) => {
                    return Err(agent_failure(
                        status,
                        &hop,
                        &instance,
                        budget,
                        started.elapsed(),
                    ));
                }
                Ok(Ok(response)) => response.into_inner(),
            };
        Ok(response
            .map(move |frame| {
                let _ = &in_flight;
                frame
            })
            .boxed())
    }

    /// Unary invoke through the mesh: deduplicated by idempotency key,
    /// shed under overload, retried where safe.
    pub async fn call_unary(
        &self,
        call: CallInfo,
        mut envelope: Envelope,
    ) -> Result<Envelope, Status> {
        require_target(&envelope)?;
        Self::stamp(&mut envelope, &call);
        let lead = if envelope.idempotency_key.is_empty() {
            None
        } else {
            let key = format!("{}\u{0}{}", envelope.target, envelope.idempotency_key);
            match self.idempotency.claim(key).await? {
                Claim::Replay(reply) => return Ok(*reply),
                Claim::Lead(guard) => Some(guard),
            }
        };
        let outcome = self
            .with_retries(&call, &envelope, |route, sent| {
                self.call_instance(&call, sent, route)
            })
            .await;
        if let Some(lead) = lead {
            lead.complete(&outcome);
        }
        outcome
    }

    /// Runs `attempt` against routed instances until it succeeds or a retry
    /// is not allowed: only UNAVAILABLE, only for calls with an idempotency
    /// key or to a skill declared idempotent, within `max_attempts`, the
    /// retry budget and the deadline, after the server's pushback or a
    /// jittered backoff, and on another instance when there is one.
    async fn with_retries<T, F, Fut>(
        &self,
        call: &CallInfo,
        envelope: &Envelope,
        mut attempt: F,
    ) -> Result<T, Status>
    where
        F: FnMut(Route, Envelope) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let _slot = self.slots.try_acquire().map_err(|_| {
            self.metrics.shed.fetch_add(1, Ordering::Relaxed);
            NodeError::ResourceExhausted(format!(
                "the node has {} calls in flight; retry later",
                self.config.max_in_flight
            ))
        })?;
        self.budget.deposit();
        let retry = &self.config.retry;
        let mut backoff = Backoff::new(retry.initial_backoff, retry.max_backoff);
        let mut tried = Vec::new();
        let mut number = envelope.attempt.max(1);
        loop {
            let route = self.route(envelope, &tried)?;
            let safe = !envelope.idempotency_key.is_empty()
                || route.instance.idempotent_for(&envelope.target);
            tried.push(route.instance.card.instance_id.clone());
            let mut sent = envelope.clone();
            sent.attempt = number;
            let status = match attempt(route, sent).await {
                Ok(value) => return Ok(value),
                Err(status) => status,
            };
            let pushback = pushback(&status);
            let retriable = safe
                && status.code() == Code::Unavailable
                && number < retry.max_attempts
                && pushback != Some(None);
            if !retriable || !self.budget.withdraw() {
                return Err(status);
            }
            let delay = pushback.flatten().unwrap_or_else(|| backoff.next_delay());
            if delay + self.config.hop_margin >= call.deadline.remaining() {
                return Err(status);
            }
            self.metrics.retries.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(target = %envelope.target, attempt = number, delay_ms = delay.as_millis() as u64, %status, "retrying");
            tokio::time::sleep(delay).await;
            number += 1;
        }
    }

    /// One attempt at one instance: the breaker's permission, the hop's
    /// deadline, the in-flight count, and the outcome recorded on the breaker.
    /// `send` makes the actual call with the prepared request.
    async fn attempt<M, T, Fut>(
        &self,
        call: &CallInfo,
        route: Route,
        envelope: Envelope,
        wrap: impl FnOnce(Envelope) -> M,
        send: impl FnOnce(AgentServiceClient<Channel>, Request<M>) -> Fut,
    ) -> Result<Attempt<T>, Status>
    where
        Fut: Future<Output = Result<T, Status>>,
    {
        let Route { instance, client } = route;
        let hop = hop_name(&instance);
        if let Err(open) = instance.breaker.try_acquire() {
            return Err(NodeError::BreakerOpen {
                target: hop,
                retry_after: open.retry_after(),
            }
            .into());
        }
        let metadata = tracing_metadata(&envelope);
        let (request, budget) = match self.outgoing(wrap(envelope), metadata, call, &hop) {
            Ok(prepared) => prepared,
            Err(error) => {
                // No call was made: give the probe slot back as a non-failure.
                instance.breaker.record(true);
                return Err(error.into());
            }
        };
        let in_flight = instance.start_call();
        let started = Instant::now();
        let outcome = match tokio::time::timeout(budget, send(client, request)).await {
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
            Err(status) => !is_destination_failure(status.code()),
        });
        Ok(Attempt {
            value: outcome?,
            instance,
            in_flight,
            started,
            budget,
            hop,
        })
    }

    /// Opens the agent's side of a stream on one instance.
    async fn open_upstream(
        &self,
        call: &CallInfo,
        route: Route,
        envelope: Envelope,
    ) -> Result<Attempt<Streaming<StreamResponse>>, Status> {
        self.attempt(
            call,
            route,
            envelope,
            |envelope| StreamRequest {
                envelope: Some(envelope),
                ..Default::default()
            },
            async |mut client, request| Ok(client.stream(request).await?.into_inner()),
        )
        .await
    }

    /// One unary attempt at one instance.
    pub async fn call_instance(
        &self,
        call: &CallInfo,
        envelope: Envelope,
        route: Route,
    ) -> Result<Envelope, Status> {
        let request_id = envelope.id.clone();
        let correlation_id = envelope.correlation_id.clone();
        let result = self
            .attempt(
                call,
                route,
                envelope,
                |envelope| InvokeRequest {
                    envelope: Some(envelope),
                },
                async |mut client, request| {
                    Ok(client
                        .invoke(request)
                        .await?
                        .into_inner()
                        .envelope
                        .unwrap_or_default())
                },
            )
            .await;
        self.metrics.record(match &result {
            Ok(_) => Code::Ok,
            Err(status) => status.code(),
        });
        let Attempt {
            value: mut reply,
            instance,
            started,
            ..
        } = result?;
        let elapsed = started.elapsed();
        if reply.correlation_id.is_empty() {
            reply.correlation_id = correlation_id;
        }
        if reply.causation_id.is_empty() {
            reply.causation_id = request_id;
        }
        if reply.source.is_empty() {
            reply.source = instance.card.name.clone();
        }
        if reply.id.is_empty() {
            reply.id = uuid::Uuid::now_v7().to_string();
        }
        tracing::debug!(agent = %instance.card.name, elapsed_us = elapsed.as_micros() as u64, "invoke routed");
        Ok(reply)
    }
}

/// The outcome of one attempt at one instance, with what the caller needs
/// to keep going (the in-flight guard lives as long as a stream does).
struct Attempt<T> {
    value: T,
    instance: Arc<Instance>,
    in_flight: InFlightGuard,
    started: Instant,
    budget: Duration,
    hop: String,
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

#[tonic::async_trait]
impl AgentService for Router {
    async fn invoke(
        &self,
        request: Request<InvokeRequest>,
    ) -> Result<Response<InvokeResponse>, Status> {
        let call = CallInfo::of(&request, self.config.default_timeout);
        let envelope = request
            .into_inner()
            .envelope
            .ok_or_else(|| NodeError::InvalidArgument("envelope is required".into()))?;
        let reply = self.call_unary(call, envelope).await?;
        Ok(Response::new(InvokeResponse {
            envelope: Some(reply),
        }))
    }

    type StreamStream = EventStream<StreamResponse>;

    async fn stream(
        &self,
        request: Request<StreamRequest>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let call = CallInfo::of(&request, self.config.default_timeout);
        let events = self.open_stream(call, request.into_inner()).await?;
        Ok(Response::new(events))
    }

    type ConverseStream = EventStream<ConverseResponse>;

    async fn converse(
        &self,
        request: Request<Streaming<ConverseRequest>>,
    ) -> Result<Response<Self::ConverseStream>, Status> {
        let call = CallInfo::of(&request, self.config.default_timeout);
        let explicit = caller_set_deadline(request.metadata());
        let inbound = request.into_inner().boxed();
        let frames = self.open_conversation(call, explicit, inbound).await?;
        Ok(Response::new(frames))
    }
}

fn require_target(envelope: &Envelope) -> Result<(), NodeError> {
    if envelope.target.is_empty() {
        return Err(NodeError::InvalidArgument(
            "envelope.target is required: an agent name or skill:<id>".into(),
        ));
    }
    Ok(())
}

fn hop_name(instance: &Instance) -> String {
    format!(
        "agent '{}' (instance {})",
        instance.card.name, instance.card.instance_id
    )
}

fn deadline_at(hop: &str, budget: Duration) -> NodeError {
    NodeError::DeadlineExceeded(format!(
        "deadline exceeded waiting for {hop}: no answer within its {} ms budget",
        budget.as_millis()
    ))
}

/// Maps an agent's failure to what the caller should see: our deadline if it
/// ran out, a clear UNAVAILABLE if the agent could not be reached, and the
/// agent's own status otherwise.
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
    if status.code() == Code::Unavailable && is_transport_error(&status) {
        return NodeError::Unavailable(format!(
            "{hop} at {} is unreachable: {}",
            instance.card.endpoint,
            status.message()
        ))
        .into();
    }
    status
}

fn is_transport_error(status: &Status) -> bool {
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
    status.message().contains("transport error") || status.message().contains("connect")
}

/// Whether the caller asked for a deadline (conversations have none by default).
pub fn caller_set_deadline(metadata: &MetadataMap) -> bool {
    metadata.contains_key(agentmesh_proto::metadata::GRPC_TIMEOUT)
        || metadata.contains_key(agentmesh_proto::metadata::TIMEOUT_MS)
}

/// Outgoing metadata that carries an envelope's tracing fields.
pub fn tracing_metadata(envelope: &Envelope) -> MetadataMap {
    let mut metadata = MetadataMap::new();
    let mut put = |key: &'static str, value: &str| {
        if let Ok(value) = MetadataValue::try_from(value) {
            if !value.is_empty() {
                metadata.insert(key, value);
            }
        }
    };
    put(CORRELATION_ID, &envelope.correlation_id);
    put(TRACEPARENT, &envelope.traceparent);
    put(IDEMPOTENCY_KEY, &envelope.idempotency_key);
    put(VIA, "agentmesh-node");
    metadata
}
