//! The router: resolves an envelope's `target` to a live instance (least loaded first, never
//! one whose breaker is open or that is full), fills the envelope from the call's context,
//! and forwards the call with a strictly shorter deadline than the caller's.
//!
//! - this file: settings, instance selection and unary calls;
//! - [`retry`]: one attempt at one instance (breaker, hop deadline, in-flight count) and
//!   the retry loop around it, shared by unary calls and stream opening;
//! - [`stream`]: server streams, through the resumable replay window;
//! - [`converse`]: conversations relayed both ways;
//! - [`pool`]: one connection per agent endpoint;
//! - [`foreign`]: agents reached over another protocol (external A2A agents);
//! - [`metrics`]: the counters the router keeps for `/metrics`.

mod converse;
mod foreign;
mod metrics;
mod pool;
mod retry;
mod stream;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use agentmesh_proto::{
    CallContext,
    metadata::{PRINCIPAL, VIA},
    v1::{Envelope, InvokeRequest, agent_service_client::AgentServiceClient},
};
use agentmesh_resilience::RetryBudget;
use rand::Rng;
use tokio::sync::Semaphore;
use tonic::{
    Code, Status,
    metadata::{MetadataMap, MetadataValue},
};

pub use foreign::{AgentClient, ForeignTransport};
pub use metrics::{RouterMetrics, Style};
pub use retry::agent_failure;

use crate::{
    access::{Access, Action},
    error::MeshError,
    idempotency::{Claim, IdempotencyCache, IdempotencyStore},
    journal::{JournalConfig, MemoryJournal, TraceJournal},
    registry::{AgentRegistry, CallKind, Instance},
    replay::{ReplayConfig, ReplayStore, StreamHub},
};
use pool::ChannelPool;
use retry::Attempt;

/// Router settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouterConfig {
    /// Deadline when a request arrives without the layers that set one.
    #[serde(with = "humantime_serde")]
    pub default_timeout: Duration,
    /// How much shorter each outgoing call's deadline is than what remains.
    #[serde(with = "humantime_serde")]
    pub hop_margin: Duration,
    /// Timeout for opening a connection to an agent.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Retries of failed calls.
    pub retry: RetryConfig,
    /// Most unary calls in flight to one instance; busier instances are skipped.
    pub max_in_flight_per_instance: u32,
    /// Most unary calls in flight through the node; beyond it calls are shed.
    pub max_in_flight: usize,
    /// Most streams and conversations open to one instance, apart from unary calls.
    pub max_long_lived_per_instance: u32,
    /// Most streams and conversations open through the node; beyond it they are refused.
    pub max_long_lived: usize,
    /// How long a response is remembered by idempotency key.
    #[serde(with = "humantime_serde")]
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
            max_long_lived_per_instance: 1024,
            max_long_lived: 10_000,
            idempotency_window: Duration::from_secs(600),
            idempotency_capacity: 100_000,
        }
    }
}

/// When and how failed calls are retried (gRPC A6 style).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts in all, the first included (1 disables retries).
    pub max_attempts: u32,
    /// Backoff ceiling of the first retry; doubles per retry, full jitter.
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// Largest backoff.
    #[serde(with = "humantime_serde")]
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

/// Routes calls to registered agents.
#[derive(Debug, Clone)]
pub struct Router {
    registry: Arc<dyn AgentRegistry>,
    channels: Arc<ChannelPool>,
    streams: Arc<dyn ReplayStore>,
    budget: Arc<RetryBudget>,
    slots: Arc<Semaphore>,
    long_lived_slots: Arc<Semaphore>,
    idempotency: Arc<dyn IdempotencyStore>,
    metrics: Arc<RouterMetrics>,
    journal: Arc<dyn TraceJournal>,
    access: Arc<Access>,
    foreign: Option<Arc<dyn ForeignTransport>>,
    config: RouterConfig,
}

/// A resolved destination: the instance and a client for it.
#[derive(Debug)]
pub struct Route {
    /// The chosen instance.
    pub instance: Arc<Instance>,
    /// How to reach it: a client connected (lazily) to its endpoint, or the transport of
    /// an agent reached over another protocol.
    pub client: AgentClient,
}

impl Router {
    /// A router over `registry`, with its stream replay and idempotency stores in memory.
    pub fn new(
        registry: Arc<dyn AgentRegistry>,
        config: RouterConfig,
        replay: ReplayConfig,
    ) -> Self {
        let idempotency = Arc::new(IdempotencyCache::new(
            config.idempotency_window,
            config.idempotency_capacity,
        ));
        let streams = Arc::new(StreamHub::new(replay));
        Self::with_stores(registry, streams, idempotency, config)
    }

    /// A router over the given stores (shared ones let several nodes serve one mesh).
    pub fn with_stores(
        registry: Arc<dyn AgentRegistry>,
        streams: Arc<dyn ReplayStore>,
        idempotency: Arc<dyn IdempotencyStore>,
        config: RouterConfig,
    ) -> Self {
        Self {
            registry,
            channels: Arc::default(),
            streams,
            budget: Arc::new(RetryBudget::new(
                config.retry.budget_ratio,
                config.retry.budget_min_per_second,
            )),
            slots: Arc::new(Semaphore::new(config.max_in_flight)),
            long_lived_slots: Arc::new(Semaphore::new(config.max_long_lived)),
            idempotency,
            metrics: Arc::default(),
            journal: Arc::new(MemoryJournal::new(JournalConfig::default(), "")),
            access: Arc::new(Access::open()),
            foreign: None,
            config,
        }
    }

    /// The same router recording its hops in `journal`.
    pub fn with_journal(mut self, journal: Arc<dyn TraceJournal>) -> Self {
        self.journal = journal;
        self
    }

    /// The same router enforcing `access` on every call it routes.
    pub fn with_access(mut self, access: Arc<Access>) -> Self {
        self.access = access;
        self
    }

    /// The policy calls are checked against.
    pub fn access(&self) -> &Arc<Access> {
        &self.access
    }

    /// Refuses a call its caller may not make to `target`, before anything is routed (so a
    /// refusal never reaches an agent or its breaker).
    pub(crate) fn check_call(&self, call: &CallContext, target: &str) -> Result<(), MeshError> {
        self.access.check(call, Action::Call, target)
    }

    /// The same router calling agents with `https://` endpoints over TLS configured by
    /// `tls` (trust roots, and a client certificate for agents that ask for one).
    pub fn with_agent_tls(mut self, tls: tonic::transport::ClientTlsConfig) -> Self {
        self.channels = Arc::new(ChannelPool::with_tls(tls));
        self
    }

    /// The same router reaching the agents `transport` handles through it.
    pub fn with_foreign_transport(mut self, transport: Arc<dyn ForeignTransport>) -> Self {
        self.foreign = Some(transport);
        self
    }

    /// Where the router records its hops.
    pub fn journal(&self) -> &Arc<dyn TraceJournal> {
        &self.journal
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
    pub fn compatible(&self, envelope: &Envelope) -> Result<Vec<Arc<Instance>>, MeshError> {
        let target = envelope.target.as_str();
        // A target no agent could have registered is the caller's mistake, said briefly.
        match target.strip_prefix("skill:") {
            Some(skill) => agentmesh_proto::names::check_name("target skill id", skill),
            None => agentmesh_proto::names::check_name("target agent name", target),
        }
        .map_err(MeshError::InvalidArgument)?;
        let mut candidates = self.registry.resolve(target);
        if candidates.is_empty() {
            return Err(MeshError::AgentNotFound {
                target: target.to_owned(),
            });
        }
        let accepts = |i: &Arc<Instance>| i.accepts(&envelope.r#type, &envelope.type_version);
        // Usually every candidate accepts the envelope: the list is then kept as it is.
        if candidates.iter().all(accepts) {
            return Ok(candidates);
        }
        if candidates.iter().any(accepts) {
            candidates.retain(accepts);
            return Ok(candidates);
        }
        let mut offered: Vec<String> = candidates
            .iter()
            .flat_map(|i| i.versions_of(&envelope.r#type))
            .collect();
        offered.sort();
        offered.dedup();
        Err(MeshError::NoCompatibleVersion {
            target: target.to_owned(),
            payload_type: envelope.r#type.clone(),
            version: envelope.type_version.clone(),
            offered,
        })
    }

    /// Picks the least-loaded compatible instance whose breaker is closed (or
    /// due for a probe) and that has room for another call of `kind`, preferring
    /// instances not in `tried`.
    pub fn route(
        &self,
        envelope: &Envelope,
        tried: &[String],
        kind: CallKind,
    ) -> Result<Route, MeshError> {
        let compatible = self.compatible(envelope)?;
        let limit = match kind {
            CallKind::Unary => self.config.max_in_flight_per_instance,
            CallKind::LongLived => self.config.max_long_lived_per_instance,
        };
        // One pass, no allocation: the least loaded usable instance not yet tried (else the
        // least loaded usable one), ties broken at random. Each instance's state is read once,
        // so calls finishing meanwhile cannot leave the choice empty.
        let mut fresh = LeastLoaded::default();
        let mut any = LeastLoaded::default();
        for instance in &compatible {
            if !(instance.breaker.would_allow() && instance.in_flight_of(kind) < limit) {
                continue;
            }
            let load = instance
                .in_flight
                .load(std::sync::atomic::Ordering::Relaxed);
            any.offer(instance, load);
            if !tried.contains(&instance.card.instance_id) {
                fresh.offer(instance, load);
            }
        }
        let Some(instance) = fresh.chosen.or(any.chosen) else {
            let all_open = compatible.iter().all(|i| !i.breaker.would_allow());
            if all_open {
                let probe_in = compatible
                    .iter()
                    .filter_map(|i| i.breaker.try_acquire().err())
                    .map(|open| open.retry_after())
                    .min()
                    .unwrap_or_default();
                return Err(MeshError::BreakerOpen {
                    target: envelope.target.clone(),
                    retry_after: probe_in,
                });
            }
            let bound = match kind {
                CallKind::Unary => "unary calls in flight (router.max_in_flight_per_instance)",
                CallKind::LongLived => {
                    "streams and conversations open (router.max_long_lived_per_instance)"
                }
            };
            return Err(MeshError::ResourceExhausted(format!(
                "every instance of '{}' has {limit} {bound}; retry later",
                envelope.target
            )));
        };
        let instance = Arc::clone(instance);
        self.route_to(instance)
    }

    /// A route to a specific instance.
    pub fn route_to(&self, instance: Arc<Instance>) -> Result<Route, MeshError> {
        if let Some(transport) = &self.foreign
            && transport.handles(&instance.card)
        {
            return Ok(Route {
                client: AgentClient::Foreign {
                    transport: Arc::clone(transport),
                    instance: Arc::clone(&instance),
                },
                instance,
            });
        }
        let channel = self
            .channels
            .get(&instance.card.endpoint, self.config.connect_timeout)?;
        Ok(Route {
            instance,
            client: AgentClient::Grpc(
                AgentServiceClient::new(channel)
                    .max_decoding_message_size(usize::MAX)
                    .max_encoding_message_size(usize::MAX),
            ),
        })
    }

    /// Unary invoke through the mesh: deduplicated by idempotency key,
    /// shed under overload, retried where safe.
    pub async fn call_unary(
        &self,
        call: CallContext,
        mut envelope: Envelope,
    ) -> Result<Envelope, Status> {
        require_target(&envelope)?;
        self.check_call(&call, &envelope.target)?;
        envelope.fill_from(&call);
        check_forwarded(&envelope)?;
        let lead = if envelope.idempotency_key.is_empty() {
            None
        } else {
            // Keys are per caller: one principal never receives another's remembered reply.
            let principal = call.principal.as_ref().map_or("", |p| p.id.as_str());
            let key = format!(
                "{}\u{0}{}\u{0}{}",
                envelope.target, principal, envelope.idempotency_key
            );
            match Arc::clone(&self.idempotency).claim(key).await? {
                Claim::Replay(reply) => return Ok(*reply),
                Claim::Lead(guard) => Some(guard),
            }
        };
        let outcome = self
            .with_retries(&call, envelope, CallKind::Unary, |route, sent| {
                self.call_instance(&call, sent, route)
            })
            .await;
        if let Some(lead) = lead {
            lead.complete(&outcome);
        }
        outcome
    }

    /// One unary attempt at one instance.
    pub async fn call_instance(
        &self,
        call: &CallContext,
        envelope: Envelope,
        route: Route,
    ) -> Result<Envelope, Status> {
        let began = Instant::now();
        // Only what the reply needs is kept: the payload is not copied.
        let (request_id, correlation_id) = (envelope.id.clone(), envelope.correlation_id.clone());
        let target = envelope.target.clone();
        let result = self
            .attempt(
                call,
                route,
                envelope,
                Style::Unary,
                |envelope| InvokeRequest {
                    envelope: Some(envelope),
                },
                async |client, request| match client {
                    AgentClient::Grpc(mut client) => Ok(client
                        .invoke(request)
                        .await?
                        .into_inner()
                        .envelope
                        .unwrap_or_default()),
                    AgentClient::Foreign {
                        transport,
                        instance,
                    } => transport.invoke(&instance, request).await,
                },
            )
            .await;
        let code = match &result {
            Ok(_) => Code::Ok,
            Err(status) => status.code(),
        };
        self.metrics
            .record(&target, Style::Unary, code, began.elapsed());
        let Attempt {
            value: mut reply,
            instance,
            started,
            ..
        } = result?;
        reply.answer(&correlation_id, &request_id, &instance.card.name);
        tracing::debug!(agent = %instance.card.name, elapsed_us = started.elapsed().as_micros() as u64, "invoke routed");
        Ok(reply)
    }
}

impl Router {
    /// A place among the node's streams and conversations, held for as long as one is open.
    fn long_lived_slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, MeshError> {
        Arc::clone(&self.long_lived_slots)
            .try_acquire_owned()
            .map_err(|_| {
                self.metrics.shed();
                MeshError::ResourceExhausted(format!(
                    "the node has {} streams and conversations open (router.max_long_lived); retry later",
                    self.config.max_long_lived
                ))
            })
    }
}

/// The least loaded of the instances offered, chosen uniformly at random among equals
/// (reservoir sampling: the k-th equal replaces the choice with probability 1/k).
#[derive(Default)]
struct LeastLoaded<'a> {
    chosen: Option<&'a Arc<Instance>>,
    load: u32,
    ties: u32,
}

impl<'a> LeastLoaded<'a> {
    fn offer(&mut self, instance: &'a Arc<Instance>, load: u32) {
        if self.chosen.is_none() || load < self.load {
            *self = Self {
                chosen: Some(instance),
                load,
                ties: 1,
            };
        } else if load == self.load {
            self.ties += 1;
            if rand::rng().random_range(0..self.ties) == 0 {
                self.chosen = Some(instance);
            }
        }
    }
}

fn require_target(envelope: &Envelope) -> Result<(), MeshError> {
    if envelope.target.is_empty() {
        return Err(MeshError::InvalidArgument(
            "envelope.target is required: an agent name or skill:<id>".into(),
        ));
    }
    Ok(())
}

/// Refuses an envelope whose forwarded fields break the caller limits, before it is routed:
/// an agent would refuse it as a whole, and that must not count against the agent.
fn check_forwarded(envelope: &Envelope) -> Result<(), MeshError> {
    agentmesh_proto::limits::check_envelope(envelope)
        .map_err(|refusal| MeshError::InvalidArgument(refusal.message))
}

fn hop_name(instance: &Instance) -> String {
    format!(
        "agent '{}' (instance {})",
        instance.card.name, instance.card.instance_id
    )
}

/// The metadata of a hop to an agent: the envelope's tracing fields, where it came from, and
/// the authenticated caller. The map is built afresh, so nothing a caller sent in
/// `x-agentmesh-principal` reaches the agent.
fn hop_metadata(envelope: &Envelope, call: &CallContext) -> MetadataMap {
    let mut metadata = envelope.metadata();
    metadata.insert(VIA, MetadataValue::from_static("agentmesh-node"));
    if let Some(principal) = &call.principal {
        if let Ok(value) = MetadataValue::try_from(principal.id.as_str()) {
            metadata.insert(PRINCIPAL, value);
        }
    }
    metadata
}
