//! The nodes of a mesh and where they listen, so a node can forward a stream resume to the
//! node that owns the stream (see `agentmesh_core::replay::ForwardingReplay`).
//!
//! Each node holds a lease on its entry: one key per node with a time to live, renewed at a
//! third of it while the node serves, deleted when it stops. A node that crashed drops off the
//! list when its lease lapses; until then, forwarding to it fails with UNAVAILABLE naming the
//! node and its address, and afterwards the resume fails because the node is gone.

use agentmesh_core::{MeshError, replay::NodeDirectory};
use redis::AsyncCommands;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use crate::store::RedisStore;

/// How long a node stays listed after its last renewal, unless configured otherwise.
pub const DEFAULT_NODE_TTL: Duration = Duration::from_secs(15);

/// The mesh's nodes, by id, in Redis.
#[derive(Debug, Clone)]
pub struct NodeRoster {
    store: RedisStore,
    ttl: Duration,
    renewing: CancellationToken,
}

impl NodeRoster {
    /// The roster kept in `store`; this node's entry lives `ttl` past its last renewal.
    pub fn new(store: RedisStore, ttl: Duration) -> Self {
        Self {
            store,
            ttl: ttl.max(Duration::from_millis(30)),
            renewing: CancellationToken::new(),
        }
    }

    /// Lists this node (the store's node id) at `address`, and keeps it listed (renewing its
    /// lease in a task of its own) until [`NodeRoster::withdraw`].
    pub async fn announce(&self, address: &str) -> Result<(), MeshError> {
        self.renew(address).await?;
        let roster = self.clone();
        let address = address.to_owned();
        tokio::spawn(async move {
            let every = roster.ttl / 3;
            loop {
                tokio::select! {
                    () = roster.renewing.cancelled() => return,
                    () = tokio::time::sleep(every) => {}
                }
                if let Err(error) = roster.renew(&address).await {
                    tracing::warn!(%error, "could not renew this node's entry on the mesh's list");
                }
            }
        });
        Ok(())
    }

    async fn renew(&self, address: &str) -> Result<(), MeshError> {
        let mut connection = self.store.connection();
        connection
            .pset_ex::<_, _, ()>(
                self.store.keys().node(self.store.node_id()),
                address,
                self.ttl.as_millis() as u64,
            )
            .await
            .map_err(|e| self.store.unavailable("announcing this node", &e))
    }

    /// Takes this node off the list and stops renewing its entry.
    pub async fn withdraw(&self) -> Result<(), MeshError> {
        self.renewing.cancel();
        let mut connection = self.store.connection();
        connection
            .del::<_, ()>(self.store.keys().node(self.store.node_id()))
            .await
            .map_err(|e| self.store.unavailable("withdrawing this node", &e))
    }
}

#[tonic::async_trait]
impl NodeDirectory for NodeRoster {
    async fn address_of(&self, node_id: &str) -> Result<Option<String>, MeshError> {
        let mut connection = self.store.connection();
        connection
            .get(self.store.keys().node(node_id))
            .await
            .map_err(|e| self.store.unavailable("looking up a node", &e))
    }
}
