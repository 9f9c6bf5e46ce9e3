//! The nodes of a mesh and where they listen, so a node can forward a stream resume to the
//! node that owns the stream (see `agentmesh_core::replay::ForwardingReplay`).
//!
//! A node announces itself when it starts serving and withdraws when it stops. A node that
//! crashed stays listed until another node with its id starts; forwarding to it then fails
//! with UNAVAILABLE naming the node and its address, which is what happened to its streams.

use agentmesh_core::{MeshError, replay::NodeDirectory};
use redis::AsyncCommands;

use crate::store::RedisStore;

/// The mesh's nodes, by id, in Redis.
#[derive(Debug, Clone)]
pub struct NodeRoster {
    store: RedisStore,
}

impl NodeRoster {
    /// The roster kept in `store`.
    pub fn new(store: RedisStore) -> Self {
        Self { store }
    }

    /// Lists this node (the store's node id) at `address`.
    pub async fn announce(&self, address: &str) -> Result<(), MeshError> {
        let mut connection = self.store.connection();
        connection
            .hset::<_, _, _, ()>(self.store.keys().nodes(), self.store.node_id(), address)
            .await
            .map_err(|e| self.store.unavailable("announcing this node", &e))
    }

    /// Takes this node off the list.
    pub async fn withdraw(&self) -> Result<(), MeshError> {
        let mut connection = self.store.connection();
        connection
            .hdel::<_, _, ()>(self.store.keys().nodes(), self.store.node_id())
            .await
            .map_err(|e| self.store.unavailable("withdrawing this node", &e))
    }
}

#[tonic::async_trait]
impl NodeDirectory for NodeRoster {
    async fn address_of(&self, node_id: &str) -> Result<Option<String>, MeshError> {
        let mut connection = self.store.connection();
        connection
            .hget(self.store.keys().nodes(), node_id)
            .await
            .map_err(|e| self.store.unavailable("looking up a node", &e))
    }
}
