//! One Redis as the mesh's shared store: a reconnecting connection for commands and
//! scripts, dedicated connections for the change channels, and the key prefix.

use std::time::Duration;

use agentmesh_core::MeshError;
use redis::{
    Client, RedisError,
    aio::{ConnectionManager, ConnectionManagerConfig, PubSubSink, PubSubStream},
};

use crate::keys::Keys;

/// How to reach the store and name things in it.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Put before every key and channel, so several meshes share one Redis.
    pub key_prefix: String,
    /// This node's id, written into the idempotency keys it leads (empty: a fresh one).
    pub node_id: String,
    /// How long opening a connection may take.
    pub connect_timeout: Duration,
    /// How long a command may take before it fails as unavailable.
    pub response_timeout: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            key_prefix: "agentmesh".into(),
            node_id: String::new(),
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(2),
        }
    }
}

/// A Redis shared by the nodes of a mesh. Cloning is cheap: clones share the connection.
#[derive(Clone)]
pub struct RedisStore {
    client: Client,
    connection: ConnectionManager,
    keys: Keys,
    node_id: String,
    /// The URL without credentials, for error messages and logs.
    address: String,
    options: StoreOptions,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("address", &self.address)
            .field("prefix", &self.keys.prefix())
            .field("node_id", &self.node_id)
            .finish()
    }
}

impl RedisStore {
    /// Connects to `url` (`redis://HOST:PORT[/DB]`); `Unavailable` if Redis cannot be
    /// reached now. Once connected, a lost connection is reopened by itself.
    pub async fn connect(url: &str, options: StoreOptions) -> Result<Self, MeshError> {
        let address = without_credentials(url);
        let client = Client::open(url).map_err(|error| {
            MeshError::InvalidArgument(format!("store URL {address:?} is not usable: {error}"))
        })?;
        // A command during an outage fails after one quick reconnect attempt instead of
        // waiting through a long backoff: callers get UNAVAILABLE and retry themselves.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(options.connect_timeout))
            .set_response_timeout(Some(options.response_timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(200));
        let connection = ConnectionManager::new_with_config(client.clone(), config)
            .await
            .map_err(|error| unavailable(&address, "connecting", &error))?;
        let node_id = if options.node_id.is_empty() {
            uuid::Uuid::now_v7().to_string()
        } else {
            options.node_id.clone()
        };
        Ok(Self {
            client,
            connection,
            keys: Keys::new(options.key_prefix.clone()),
            node_id,
            address,
            options,
        })
    }

    /// The names of this mesh's keys and channels.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// This node's id in the mesh.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Where the store is (the URL without credentials).
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The shared command connection (a cheap clone).
    pub(crate) fn connection(&self) -> ConnectionManager {
        self.connection.clone()
    }

    /// A connection of its own, for a blocking read that must not hold up the shared one.
    pub(crate) async fn dedicated(&self) -> Result<redis::aio::MultiplexedConnection, RedisError> {
        self.client
            .get_multiplexed_async_connection_with_config(
                &redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(self.options.connect_timeout)),
            )
            .await
    }

    /// A connection of its own subscribed to `channel`.
    pub(crate) async fn subscribe(
        &self,
        channel: &str,
    ) -> Result<(PubSubSink, PubSubStream), RedisError> {
        // Pub/sub connections take no timeouts of their own: bounded here.
        let open = async {
            let mut pubsub = self.client.get_async_pubsub().await?;
            pubsub.subscribe(channel).await?;
            Ok(pubsub.split())
        };
        match tokio::time::timeout(
            self.options.connect_timeout + self.options.response_timeout,
            open,
        )
        .await
        {
            Ok(result) => result,
            Err(_) => Err(RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "subscribing timed out",
            ))),
        }
    }

    /// How long a command may take.
    pub(crate) fn response_timeout(&self) -> Duration {
        self.options.response_timeout
    }

    /// The error a caller sees when `doing` something with Redis failed.
    pub(crate) fn unavailable(&self, doing: &str, error: &RedisError) -> MeshError {
        unavailable(&self.address, doing, error)
    }
}

fn unavailable(address: &str, doing: &str, error: &RedisError) -> MeshError {
    let state = if error.is_io_error()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
    {
        "is unreachable"
    } else {
        "failed"
    };
    MeshError::Unavailable(format!(
        "shared store (Redis at {address}) {state} while {doing}: {error}"
    ))
}

/// `redis://user:secret@host:6379/0` → `redis://host:6379/0`.
fn without_credentials(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}{}", &url[..scheme + 3], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_stay_out_of_messages() {
        assert_eq!(
            without_credentials("redis://user:secret@10.0.0.5:6379/2"),
            "redis://10.0.0.5:6379/2"
        );
        assert_eq!(
            without_credentials("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
    }

    #[tokio::test]
    async fn an_unreachable_redis_is_unavailable_not_a_panic() {
        // Port 1 on loopback refuses connections.
        let error = RedisStore::connect(
            "redis://127.0.0.1:1",
            StoreOptions {
                connect_timeout: Duration::from_millis(200),
                ..StoreOptions::default()
            },
        )
        .await
        .unwrap_err();
        let MeshError::Unavailable(message) = error else {
            panic!("expected Unavailable, got {error:?}");
        };
        assert!(
            message.contains("Redis at redis://127.0.0.1:1") && message.contains("unreachable"),
            "{message}"
        );
    }
}
