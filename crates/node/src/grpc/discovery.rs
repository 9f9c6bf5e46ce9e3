//! `agentmesh.v1.DiscoveryService` over the [`AgentRegistry`].

use agentmesh_core::{Mesh, MeshCore};
use std::{pin::Pin, sync::Arc, time::Duration};

use agentmesh_core::access::Action;
use agentmesh_proto::CallContext;
use agentmesh_proto::v1::{
    AgentCard, AgentFilter, DeregisterRequest, DeregisterResponse, HeartbeatRequest,
    HeartbeatResponse, LookupRequest, LookupResponse, RegisterRequest, RegisterResponse,
    WatchEventKind, WatchRequest, WatchResponse, discovery_service_server::DiscoveryService,
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

/// The card metadata key under which the node records the principal that registered an
/// instance (with the card, so it lives wherever the registry does: memory or Redis).
pub(crate) const OWNER_KEY: &str = "agentmesh.principal";

impl Discovery {
    /// Refuses a heartbeat or deregistration of a lease registered by another principal. An
    /// unknown lease passes, for the registry to answer NOT_FOUND.
    fn check_lease_owner(&self, ctx: &CallContext, lease_id: &str) -> Result<(), Status> {
        if !self.mesh.router().access().enforced() {
            return Ok(());
        }
        let instances = self.registry.lookup(&AgentFilter::default());
        let held = instances
            .iter()
            .find(|i| i.lease.as_ref().is_some_and(|l| l.lease_id == lease_id));
        match held.and_then(|i| i.card.as_ref()) {
            Some(card) => check_owner(ctx, card, lease_id),
            None => Ok(()),
        }
    }
}

/// Refuses `ctx`'s principal unless it registered `card`.
fn check_owner(ctx: &CallContext, card: &AgentCard, what: &str) -> Result<(), Status> {
    let owner = card.metadata.get(OWNER_KEY).map(String::as_str);
    let caller = ctx.principal.as_ref().map(|p| p.id.as_str());
    if owner.is_some() && owner == caller {
        return Ok(());
    }
    tracing::warn!(
        correlation_id = %ctx.correlation_id,
        principal = caller.unwrap_or(""),
        agent = %card.name,
        "refused: the lease belongs to another principal"
    );
    Err(MeshError::PermissionDenied {
        principal: caller.map_or_else(|| "an anonymous caller".to_owned(), |c| format!("'{c}'")),
        action: "renew or replace",
        resource: format!("{what} (registered by another principal)"),
    }
    .into())
}

fn stamp_owner(ctx: &CallContext, card: &mut AgentCard) {
    match &ctx.principal {
        Some(principal) => {
            card.metadata
                .insert(OWNER_KEY.to_owned(), principal.id.clone());
        }
        None => {
            card.metadata.remove(OWNER_KEY);
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
        let ctx = super::context(&request);
        let request = request.into_inner();
        let mut card = request
            .card
            .ok_or_else(|| MeshError::InvalidArgument("card is required".into()))?;
        let access = self.mesh.router().access();
        if access.enforced() {
            access.check(&ctx, Action::Register, &card.name)?;
            // Re-registering an instance id is renewing its lease: only its owner may.
            if !card.instance_id.is_empty() {
                let existing = self.registry.lookup(&AgentFilter::default());
                if let Some(held) = existing
                    .iter()
                    .filter_map(|i| i.card.as_ref())
                    .find(|c| c.instance_id == card.instance_id)
                {
                    check_owner(&ctx, held, &card.instance_id)?;
                }
            }
            stamp_owner(&ctx, &mut card);
        } else {
            // The owner key is the node's to set: a caller's value is dropped.
            card.metadata.remove(OWNER_KEY);
        }
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
        let ctx = super::context(&request);
        let lease_id = request.into_inner().lease_id;
        self.check_lease_owner(&ctx, &lease_id)?;
        let lease = self.registry.heartbeat(&lease_id).await?;
        Ok(Response::new(HeartbeatResponse { lease: Some(lease) }))
    }

    async fn deregister(
        &self,
        request: Request<DeregisterRequest>,
    ) -> Result<Response<DeregisterResponse>, Status> {
        let ctx = super::context(&request);
        let lease_id = request.into_inner().lease_id;
        self.check_lease_owner(&ctx, &lease_id)?;
        self.registry.deregister(&lease_id).await?;
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

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let ctx = super::context(&request);
        let request = request.into_inner();
        let filter: AgentFilter = request.filter.unwrap_or_default();
        // Watching is discovering: with a policy, the watcher must be allowed the filter's
        // agent name (every agent, when it names none).
        let access = self.mesh.router().access();
        if access.enforced() {
            let name = if filter.name.is_empty() {
                "*"
            } else {
                filter.name.as_str()
            };
            access.check(&ctx, Action::Discover, name)?;
        }
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
