//! Calling agents through the node.

use std::{collections::HashMap, sync::Arc, time::Duration};

use agentmesh_resilience::{BreakerConfig, CircuitBreaker, counts_against_destination};
use parking_lot::Mutex;

use agentmesh_proto::v1::{
    AgentFilter, AgentInstance, Envelope, FanOutRequest, FanOutResponse, FollowTraceRequest,
    GetTraceRequest, Hop, InvokeRequest, LookupRequest, StreamRequest, StreamResponse,
    agent_service_client::AgentServiceClient, discovery_service_client::DiscoveryServiceClient,
    fan_out_service_client::FanOutServiceClient, trace_service_client::TraceServiceClient,
};
use tonic::{
    Request, Status, Streaming,
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Channel, Endpoint},
};

use crate::{call_scope, error::SdkError};

/// Per-call options.
#[derive(Debug, Clone, Default)]
pub struct CallOptions {
    /// Timeout of the call; capped by the inherited deadline when called
    /// from inside a handler. Default 30 s.
    pub timeout: Option<Duration>,
    /// Idempotency key (also settable on the envelope).
    pub idempotency_key: Option<String>,
}

/// The credentials a client presents to the node: `authorization: Bearer <token>` on every
/// call, when it has a token (an API token or a JWT).
#[derive(Clone, Default)]
pub struct Credentials(Option<MetadataValue<Ascii>>);

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.write_str(if self.0.is_some() {
            "Credentials(bearer)"
        } else {
            "Credentials(none)"
        })
    }
}

impl Credentials {
    /// Credentials that send `token` as a bearer token.
    pub fn bearer(token: &str) -> Result<Self, SdkError> {
        let mut value = MetadataValue::try_from(format!("Bearer {}", token.trim()))
            .map_err(|_| SdkError::InvalidToken("not printable ASCII".into()))?;
        value.set_sensitive(true);
        Ok(Self(Some(value)))
    }
}

impl Interceptor for Credentials {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert(agentmesh_proto::metadata::AUTHORIZATION, value.clone());
        }
        Ok(request)
    }
}

/// The channel the generated clients of a [`MeshClient`] use: its connection, with its
/// credentials on every call.
pub type NodeChannel = InterceptedService<Channel, Credentials>;

/// A client of the node: invoke agents by name or `skill:<id>`, look them up.
///
/// Inside a handler, calls inherit the handled call's correlation id and a
/// deadline strictly shorter than what it has left.
#[derive(Debug, Clone)]
pub struct MeshClient {
    channel: Channel,
    credentials: Credentials,
    hop_margin: Duration,
    default_timeout: Duration,
    breakers: Option<Arc<TargetBreakers>>,
}

/// One circuit breaker per target, so a failing target fails fast on the
/// client too, without a round trip to the node.
#[derive(Debug)]
struct TargetBreakers {
    config: BreakerConfig,
    by_target: Mutex<HashMap<String, Arc<CircuitBreaker>>>,
}

impl TargetBreakers {
    fn get(&self, target: &str) -> Arc<CircuitBreaker> {
        let mut by_target = self.by_target.lock();
        if by_target.len() > 10_000 {
            by_target.clear();
        }
        Arc::clone(
            by_target
                .entry(target.to_owned())
                .or_insert_with(|| Arc::new(CircuitBreaker::new(self.config.clone()))),
        )
    }
}

/// Turns `host:port` or a URI into an endpoint.
pub(crate) fn endpoint(address: &str) -> Result<Endpoint, SdkError> {
    let uri = if address.contains("://") {
        address.to_owned()
    } else {
        format!("http://{address}")
    };
    Endpoint::from_shared(uri)
        .map(|e| {
            e.tcp_nodelay(true)
                .connect_timeout(Duration::from_secs(2))
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_while_idle(true)
        })
        .map_err(|e| SdkError::InvalidAddress {
            address: address.to_owned(),
            reason: e.to_string(),
        })
}

impl MeshClient {
    /// A client of the node at `address` (`host:port` or `http://host:port`).
    /// Connects on first use and reconnects by itself.
    pub fn connect_lazy(address: &str) -> Result<Self, SdkError> {
        Ok(Self::from_channel(endpoint(address)?.connect_lazy()))
    }

    /// A client over an existing channel.
    pub fn from_channel(channel: Channel) -> Self {
        Self {
            channel,
            credentials: Credentials::default(),
            hop_margin: Duration::from_millis(50),
            default_timeout: Duration::from_secs(30),
            breakers: Some(Arc::new(TargetBreakers {
                config: BreakerConfig::default(),
                by_target: Mutex::default(),
            })),
        }
    }

    /// Sets the per-target circuit breakers' configuration (`None` disables them).
    pub fn with_breakers(mut self, config: Option<BreakerConfig>) -> Self {
        self.breakers = config.map(|config| {
            Arc::new(TargetBreakers {
                config,
                by_target: Mutex::default(),
            })
        });
        self
    }

    /// How much shorter than the inherited deadline outgoing calls are.
    pub fn with_hop_margin(mut self, margin: Duration) -> Self {
        self.hop_margin = margin;
        self
    }

    /// Presents `token` (an API token or a JWT) as `authorization: Bearer <token>` on every
    /// call, for a node with authentication on.
    pub fn with_token(mut self, token: &str) -> Result<Self, SdkError> {
        self.credentials = Credentials::bearer(token)?;
        Ok(self)
    }

    /// The underlying channel, without the client's credentials (see [`MeshClient::node_channel`]).
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// The channel with the client's credentials, for generated clients.
    pub fn node_channel(&self) -> NodeChannel {
        InterceptedService::new(self.channel.clone(), self.credentials.clone())
    }

    /// The generated `AgentService` client, talking to the node's router.
    pub fn agents(&self) -> AgentServiceClient<NodeChannel> {
        AgentServiceClient::new(self.node_channel())
    }

    /// The generated `DiscoveryService` client.
    pub fn discovery(&self) -> DiscoveryServiceClient<NodeChannel> {
        DiscoveryServiceClient::new(self.node_channel())
    }

    /// Invokes `target` (an agent name or `skill:<id>`) with `envelope`.
    pub async fn invoke(&self, target: &str, envelope: Envelope) -> Result<Envelope, Status> {
        self.invoke_with(target, envelope, CallOptions::default())
            .await
    }

    /// Invokes `target` with per-call options.
    pub async fn invoke_with(
        &self,
        target: &str,
        envelope: Envelope,
        options: CallOptions,
    ) -> Result<Envelope, Status> {
        let (request, timeout) =
            self.prepare(target, envelope, &options, |envelope| InvokeRequest {
                envelope: Some(envelope),
            })?;
        let breaker = self.breakers.as_ref().map(|b| b.get(target));
        if let Some(breaker) = &breaker {
            if let Err(open) = breaker.try_acquire() {
                return Err(Status::unavailable(format!(
                    "client circuit breaker open for '{target}': failing fast; next probe in {} ms",
                    open.retry_after().as_millis()
                )));
            }
        }
        let result = match tokio::time::timeout(timeout, self.agents().invoke(request)).await {
            Err(_) => Err(Status::deadline_exceeded(format!(
                "no answer from '{target}' within {} ms",
                timeout.as_millis()
            ))),
            Ok(result) => result.map(|r| r.into_inner().envelope.unwrap_or_default()),
        };
        if let Some(breaker) = breaker {
            breaker.record(match &result {
                Ok(_) => true,
                Err(status) => !counts_against_destination(status),
            });
        }
        result
    }

    /// Starts a stream from `target`: progress, partial results and the
    /// final result, as a `futures::Stream`. Events carry a `stream_id` and
    /// `sequence`; after a cut, [`MeshClient::resume`] gets the rest.
    pub async fn stream(
        &self,
        target: &str,
        envelope: Envelope,
    ) -> Result<Streaming<StreamResponse>, Status> {
        self.stream_with(target, envelope, CallOptions::default())
            .await
    }

    /// Starts a stream with per-call options (the timeout covers the whole stream).
    pub async fn stream_with(
        &self,
        target: &str,
        envelope: Envelope,
        options: CallOptions,
    ) -> Result<Streaming<StreamResponse>, Status> {
        let (request, _) = self.prepare(target, envelope, &options, |envelope| StreamRequest {
            envelope: Some(envelope),
            ..Default::default()
        })?;
        Ok(self.agents().stream(request).await?.into_inner())
    }

    /// Resumes a stream after the last sequence the caller saw: the node
    /// sends every later event, with no gap and no duplicate.
    pub async fn resume(
        &self,
        stream_id: &str,
        after_sequence: u64,
    ) -> Result<Streaming<StreamResponse>, Status> {
        let request = StreamRequest {
            resume_stream_id: stream_id.to_owned(),
            resume_after_sequence: after_sequence,
            ..Default::default()
        };
        Ok(self.agents().stream(request).await?.into_inner())
    }

    /// Sends one request to many targets under a completion policy; every
    /// target's outcome is in the response.
    pub async fn fan_out(&self, request: FanOutRequest) -> Result<FanOutResponse, Status> {
        self.fan_out_with(request, CallOptions::default()).await
    }

    /// [`MeshClient::fan_out`] with per-call options.
    pub async fn fan_out_with(
        &self,
        mut request: FanOutRequest,
        options: CallOptions,
    ) -> Result<FanOutResponse, Status> {
        let envelope = request.envelope.take().unwrap_or_default();
        let (request, timeout) =
            self.prepare("", envelope, &options, |envelope| FanOutRequest {
                envelope: Some(envelope),
                ..request
            })?;
        match tokio::time::timeout(
            timeout,
            FanOutServiceClient::new(self.node_channel()).fan_out(request),
        )
        .await
        {
            Err(_) => Err(Status::deadline_exceeded("fan-out did not answer in time")),
            Ok(result) => Ok(result?.into_inner()),
        }
    }

    /// The hops the node's trace journal recorded under `correlation_id`, in the order they
    /// started (NOT_FOUND when none).
    pub async fn trace(&self, correlation_id: &str) -> Result<Vec<Hop>, Status> {
        Ok(TraceServiceClient::new(self.node_channel())
            .get_trace(GetTraceRequest {
                correlation_id: correlation_id.to_owned(),
            })
            .await?
            .into_inner()
            .hops)
    }

    /// The hops of `correlation_id` recorded so far, then each new one as it is recorded.
    pub async fn follow_trace(
        &self,
        correlation_id: &str,
    ) -> Result<impl futures::Stream<Item = Result<Hop, Status>> + Unpin + use<>, Status> {
        let frames = TraceServiceClient::new(self.node_channel())
            .follow_trace(FollowTraceRequest {
                correlation_id: correlation_id.to_owned(),
            })
            .await?
            .into_inner();
        Ok(futures::StreamExt::filter_map(frames, |frame| {
            std::future::ready(match frame {
                Ok(frame) => frame.hop.map(Ok),
                Err(status) => Some(Err(status)),
            })
        }))
    }

    /// Finds registered instances.
    pub async fn lookup(&self, filter: AgentFilter) -> Result<Vec<AgentInstance>, Status> {
        Ok(self
            .discovery()
            .lookup(LookupRequest {
                filter: Some(filter),
            })
            .await?
            .into_inner()
            .instances)
    }

    /// Fills the envelope from the current context and builds the request
    /// with its deadline.
    pub(crate) fn prepare<T>(
        &self,
        target: &str,
        mut envelope: Envelope,
        options: &CallOptions,
        wrap: impl FnOnce(Envelope) -> T,
    ) -> Result<(Request<T>, Duration), Status> {
        envelope.target = target.to_owned();
        if let Some(key) = &options.idempotency_key {
            envelope.idempotency_key = key.clone();
        }
        let current = call_scope::current();
        let mut timeout = options.timeout.unwrap_or(self.default_timeout);
        if let Some(ctx) = &current {
            envelope.follow(&ctx.call, &ctx.message_id);
            let deadline = ctx.call.deadline;
            if let Some(remaining) = deadline.explicit.then(|| deadline.remaining()) {
                let budget = remaining
                    .checked_sub(self.hop_margin)
                    .filter(|b| !b.is_zero());
                let Some(budget) = budget else {
                    return Err(Status::deadline_exceeded(format!(
                        "deadline exceeded before calling '{target}': {} ms left",
                        remaining.as_millis()
                    )));
                };
                timeout = timeout.min(budget);
            }
        }
        if envelope.correlation_id.is_empty() {
            envelope.correlation_id = agentmesh_proto::new_id();
        }
        let metadata = envelope.metadata();
        let mut request = Request::from_parts(metadata, Default::default(), wrap(envelope));
        request.set_timeout(timeout);
        Ok((request, timeout))
    }
}
