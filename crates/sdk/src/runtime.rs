//! Running an agent: serve it, register it with the node, keep the lease
//! alive, re-register after the node restarts or the connection drops, and
//! deregister on shutdown.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use agentmesh_proto::v1::{
    AgentCard, DeregisterRequest, HeartbeatRequest, RegisterRequest,
    agent_service_server::AgentServiceServer, discovery_service_client::DiscoveryServiceClient,
};
use agentmesh_resilience::Backoff;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tonic::{Code, transport::server::TcpIncoming};

use crate::{Agent, AgentHost, client::MeshClient, error::SdkError};

/// The registration state an agent publishes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registration {
    /// The current lease, if registered.
    pub lease_id: Option<String>,
    /// The instance id the node knows this agent by.
    pub instance_id: String,
    /// How many times the agent has registered (1 after the first time;
    /// more after re-registrations).
    pub count: u64,
}

/// Builder for a running agent.
#[derive(Debug)]
pub struct AgentRuntime<A> {
    card: AgentCard,
    agent: Arc<A>,
    node: Option<String>,
    listen: SocketAddr,
    advertise: Option<String>,
    ttl: Duration,
    token: Option<String>,
}

impl<A: Agent> AgentRuntime<A> {
    /// An agent described by `card` and implemented by `agent`.
    pub fn new(card: AgentCard, agent: A) -> Self {
        Self {
            card,
            agent: Arc::new(agent),
            node: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise: None,
            ttl: Duration::from_secs(10),
            token: None,
        }
    }

    /// The token (API token or JWT) to present to a node with authentication on: registration,
    /// heartbeats and the calls the agent's handlers make through the node carry it.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// The node to register with (`host:port` or a URI).
    pub fn node(mut self, address: impl Into<String>) -> Self {
        self.node = Some(address.into());
        self
    }

    /// Where to serve (default `127.0.0.1:0`, an ephemeral port).
    pub fn listen(mut self, address: SocketAddr) -> Self {
        self.listen = address;
        self
    }

    /// The endpoint to register, when it differs from the bound address.
    pub fn advertise(mut self, endpoint: impl Into<String>) -> Self {
        self.advertise = Some(endpoint.into());
        self
    }

    /// Lease TTL to ask for; heartbeats go every third of it.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Binds, starts serving and registering, and returns at once.
    pub async fn start(self) -> Result<RunningAgent, SdkError> {
        let listener = TcpListener::bind(self.listen).await?;
        let address = listener.local_addr()?;
        let mut card = self.card;
        card.endpoint = self
            .advertise
            .unwrap_or_else(|| format!("http://{address}"));
        if card.instance_id.is_empty() {
            card.instance_id = uuid::Uuid::now_v7().to_string();
        }
        let client = match &self.node {
            Some(node) => {
                let client = MeshClient::connect_lazy(node)?;
                Some(match &self.token {
                    Some(token) => client.with_token(token)?,
                    None => client,
                })
            }
            None => None,
        };
        let shutdown = CancellationToken::new();
        let host = AgentHost::new(self.agent, card.name.clone(), client.clone());
        let server = {
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                tonic::transport::Server::builder()
                    .add_service(
                        AgentServiceServer::new(host)
                            .max_decoding_message_size(usize::MAX)
                            .max_encoding_message_size(usize::MAX),
                    )
                    .serve_with_incoming_shutdown(
                        // The builder's `tcp_nodelay` does not reach sockets accepted from our
                        // own listener; without it Nagle holds back the reply's last frames
                        // until the caller's delayed ACK, about 40 ms per call.
                        TcpIncoming::from(listener).with_nodelay(Some(true)),
                        shutdown.cancelled_owned(),
                    )
                    .await
            })
        };
        let (state, registration) = watch::channel(Registration {
            instance_id: card.instance_id.clone(),
            ..Default::default()
        });
        let keeper = client.map(|client| {
            tokio::spawn(keep_registered(
                client.discovery(),
                card.clone(),
                self.ttl,
                state,
                shutdown.clone(),
            ))
        });
        tracing::info!(agent = %card.name, endpoint = %card.endpoint, "agent serving");
        Ok(RunningAgent {
            address,
            card,
            registration,
            shutdown,
            server,
            keeper,
        })
    }
}

/// A started agent. Dropping it does not stop it; call [`RunningAgent::shutdown`].
#[derive(Debug)]
pub struct RunningAgent {
    address: SocketAddr,
    card: AgentCard,
    registration: watch::Receiver<Registration>,
    shutdown: CancellationToken,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    keeper: Option<JoinHandle<()>>,
}

impl RunningAgent {
    /// The address the agent serves on.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The card as registered (endpoint and instance id filled in).
    pub fn card(&self) -> &AgentCard {
        &self.card
    }

    /// The current registration state.
    pub fn registration(&self) -> Registration {
        self.registration.borrow().clone()
    }

    /// Waits until the agent has registered at least `count` times.
    pub async fn registered(&self, count: u64) -> Registration {
        let mut registration = self.registration.clone();
        registration
            .wait_for(|r| r.count >= count && r.lease_id.is_some())
            .await
            .map(|r| r.clone())
            .unwrap_or_default()
    }

    /// Deregisters, stops serving and waits for in-flight calls.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        if let Some(keeper) = self.keeper {
            let _ = keeper.await;
        }
        let _ = self.server.await;
    }

    /// Resolves when a shutdown has been requested.
    pub fn stopping(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}

/// Registers, heartbeats, re-registers whenever the lease is lost, and
/// deregisters once `shutdown` fires.
async fn keep_registered(
    mut discovery: DiscoveryServiceClient<crate::client::NodeChannel>,
    card: AgentCard,
    ttl: Duration,
    state: watch::Sender<Registration>,
    shutdown: CancellationToken,
) {
    let beat = (ttl / 3).max(Duration::from_millis(10));
    let mut backoff = Backoff::new(Duration::from_millis(50), beat.max(Duration::from_secs(1)));
    let mut lease_id: Option<String> = None;
    loop {
        let next = match &lease_id {
            None => {
                let request = RegisterRequest {
                    card: Some(card.clone()),
                    ttl: prost_types::Duration::try_from(ttl).ok(),
                };
                match tokio::select! {
                    _ = shutdown.cancelled() => break,
                    r = discovery.register(request) => r,
                } {
                    Ok(response) => {
                        let lease = response.into_inner().lease.unwrap_or_default();
                        tracing::info!(agent = %card.name, lease = %lease.lease_id, "registered with the node");
                        lease_id = Some(lease.lease_id.clone());
                        state.send_modify(|r| {
                            r.lease_id = Some(lease.lease_id);
                            r.count += 1;
                        });
                        backoff.reset();
                        beat
                    }
                    Err(status) => {
                        tracing::debug!(agent = %card.name, %status, "registration failed; retrying");
                        backoff.next_delay()
                    }
                }
            }
            Some(id) => {
                let request = HeartbeatRequest {
                    lease_id: id.clone(),
                };
                match tokio::select! {
                    _ = shutdown.cancelled() => break,
                    r = discovery.heartbeat(request) => r,
                } {
                    Ok(_) => {
                        backoff.reset();
                        beat
                    }
                    Err(status) if status.code() == Code::NotFound => {
                        tracing::warn!(agent = %card.name, "lease lost (node restarted or lease lapsed); registering again");
                        lease_id = None;
                        state.send_modify(|r| r.lease_id = None);
                        Duration::ZERO
                    }
                    Err(status) => {
                        tracing::debug!(agent = %card.name, %status, "heartbeat failed; retrying");
                        backoff.next_delay().min(beat)
                    }
                }
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(next) => {}
        }
    }
    if let Some(id) = lease_id {
        let request = DeregisterRequest { lease_id: id };
        let _ = tokio::time::timeout(Duration::from_secs(2), discovery.deregister(request)).await;
        tracing::info!(agent = %card.name, "deregistered");
    }
}
