//! `agentmesh.v1.DiscoveryService` over the [`AgentRegistry`].

use agentmesh_core::{Mesh, MeshCore};
use std::{pin::Pin, sync::Arc, time::Duration};

use agentmesh_proto::v1::{
    AddA2aAgentRequest, AddA2aAgentResponse, AgentFilter, DeregisterRequest, DeregisterResponse,
    HeartbeatRequest, HeartbeatResponse, LookupRequest, LookupResponse, RegisterRequest,
    RegisterResponse, WatchEventKind, WatchRequest, WatchResponse,
    discovery_service_server::DiscoveryService,
};
use futures::Stream;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use agentmesh_core::{
    MeshError,
    registry::{AgentRegistry, instance_matches},
};

/// The gRPC face of the registry.
#[derive(Debug, Clone)]
pub struct Discovery {
    registry: Arc<dyn AgentRegistry>,
    /// Lookups go through the mesh, which records them in the trace journal.
    mesh: Arc<MeshCore>,
    shutdown: CancellationToken,
}

impl Discovery {
    /// Serves `registry` (lookups through `mesh`); `Watch` streams end when `shutdown` is
    /// cancelled.
    pub fn new(
        registry: Arc<dyn AgentRegistry>,
        mesh: Arc<MeshCore>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            registry,
            mesh,
            shutdown,
        }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl DiscoveryService for Discovery {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let request = request.into_inner();
        let card = request
            .card
            .ok_or_else(|| MeshError::InvalidArgument("card is required".into()))?;
        let ttl = match request.ttl {
            Some(ttl) => Some(Duration::try_from(ttl).map_err(|_| {
                MeshError::InvalidArgument("ttl must be a positive duration".into())
            })?),
            None => None,
        };
        let (lease, card) = self.registry.register(card, ttl).await?;
        Ok(Response::new(RegisterResponse {
            lease: Some(lease),
            card: Some(card),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let lease = self
            .registry
            .heartbeat(&request.into_inner().lease_id)
            .await?;
        Ok(Response::new(HeartbeatResponse { lease: Some(lease) }))
    }

    async fn deregister(
        &self,
        request: Request<DeregisterRequest>,
    ) -> Result<Response<DeregisterResponse>, Status> {
        self.registry
            .deregister(&request.into_inner().lease_id)
            .await?;
        Ok(Response::new(DeregisterResponse {}))
    }

    async fn lookup(
        &self,
        request: Request<LookupRequest>,
    ) -> Result<Response<LookupResponse>, Status> {
        let ctx = super::context(&request);
        Ok(Response::new(
            self.mesh.lookup(ctx, request.into_inner()).await?,
        ))
    }

    async fn add_a2a_agent(
        &self,
        request: Request<AddA2aAgentRequest>,
    ) -> Result<Response<AddA2aAgentResponse>, Status> {
        let ctx = super::context(&request);
        Ok(Response::new(
            self.mesh.add_a2a_agent(ctx, request.into_inner()).await?,
        ))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let request = request.into_inner();
        let filter: AgentFilter = request.filter.unwrap_or_default();
        // Subscribe before the snapshot so no change falls between the two.
        let events = self.registry.subscribe();
        let existing = if request.include_existing {
            self.registry.lookup(&filter)
        } else {
            Vec::new()
        };
        let shutdown = self.shutdown.clone();
        Ok(Response::new(watch_stream(
            existing, filter, shutdown, events,
        )))
    }
}

fn watch_stream(
    existing: Vec<agentmesh_proto::v1::AgentInstance>,
    filter: AgentFilter,
    shutdown: CancellationToken,
    mut events: tokio::sync::broadcast::Receiver<WatchResponse>,
) -> WatchStream {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        for instance in existing {
            let event = WatchResponse {
                kind: WatchEventKind::Added as i32,
                instance: Some(instance),
            };
            if tx.send(Ok(event)).await.is_err() {
                return;
            }
        }
        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tx.closed() => return,
                event = events.recv() => event,
            };
            match event {
                Ok(event) => {
                    let wanted = event
                        .instance
                        .as_ref()
                        .is_some_and(|i| instance_matches(&filter, i));
                    if wanted && tx.send(Ok(event)).await.is_err() {
                        return;
                    }
                }
                Err(RecvError::Lagged(missed)) => {
                    let _ = tx
                        .send(Err(Status::data_loss(format!(
                            "watcher fell {missed} events behind; watch again with include_existing"
                        ))))
                        .await;
                    return;
                }
                Err(RecvError::Closed) => return,
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
