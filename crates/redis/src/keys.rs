//! Where everything lives in Redis: every key and channel is named here, under one prefix,
//! so several meshes share a Redis and a test removes its state by prefix.
//!
//! | key or channel                     | type    | holds                                      |
//! |------------------------------------|---------|--------------------------------------------|
//! | `{prefix}:registry:instances`      | hash    | instance id → record (lease id, TTL, registration time, card) |
//! | `{prefix}:registry:leases`         | hash    | lease id → instance id                     |
//! | `{prefix}:registry:expiries`       | zset    | instance id scored by its lease's expiry (Redis clock, ms) |
//! | `{prefix}:registry:version`        | string  | counter, one step per change               |
//! | `{prefix}:registry:changes`        | channel | every change, numbered by that counter     |
//! | `{prefix}:idempotency:{key}`       | string  | a pending marker (lead TTL) or a reply (window TTL) |
//! | `{prefix}:idempotency:wakes`       | channel | "this key is settled", for nodes with waiters |
//!
//! The registry is four keys, not a key per lease: its scripts name every key they touch
//! up front, and the whole registry goes with one `DEL`. The hash fields carry no TTL of
//! their own (Redis 7.0 has none); the reapers of the nodes remove lapsed leases.

/// The names of this mesh's keys and channels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys under `prefix` (e.g. `agentmesh`).
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    /// The prefix every key and channel starts with (then a `:`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Stream (capped, with a time to live): the journal's hops of one correlation id, each
    /// an encoded `agentmesh.v1.Hop` in field `h`.
    pub fn trace(&self, correlation_id: &str) -> String {
        format!("{}:trace:{correlation_id}", self.prefix)
    }

    /// String with a time to live: the gRPC address node `node_id` advertises (see
    /// [`crate::NodeRoster`]).
    pub fn node(&self, node_id: &str) -> String {
        format!("{}:node:{node_id}", self.prefix)
    }

    /// Hash: instance id → encoded record.
    pub fn registry_instances(&self) -> String {
        format!("{}:registry:instances", self.prefix)
    }

    /// Hash: lease id → instance id.
    pub fn registry_leases(&self) -> String {
        format!("{}:registry:leases", self.prefix)
    }

    /// Sorted set: instance id scored by the expiry of its lease, in Redis's milliseconds.
    pub fn registry_expiries(&self) -> String {
        format!("{}:registry:expiries", self.prefix)
    }

    /// Counter: the number of the last registry change.
    pub fn registry_version(&self) -> String {
        format!("{}:registry:version", self.prefix)
    }

    /// Channel: every registry change, numbered.
    pub fn registry_changes(&self) -> String {
        format!("{}:registry:changes", self.prefix)
    }

    /// String: the state of one idempotency key (pending or the remembered reply).
    pub fn idempotency(&self, key: &str) -> String {
        format!("{}:idempotency:{key}", self.prefix)
    }

    /// Channel: idempotency keys settled while a duplicate waited on them.
    pub fn idempotency_wakes(&self) -> String {
        format!("{}:idempotency:wakes", self.prefix)
    }

    /// The registry's keys, in the order its scripts take them.
    pub(crate) fn registry(&self) -> [String; 4] {
        [
            self.registry_instances(),
            self.registry_leases(),
            self.registry_expiries(),
            self.registry_version(),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_and_channel_sits_under_the_prefix() {
        let keys = Keys::new("mesh-a");
        assert_eq!(keys.registry_instances(), "mesh-a:registry:instances");
        assert_eq!(keys.registry_leases(), "mesh-a:registry:leases");
        assert_eq!(keys.registry_expiries(), "mesh-a:registry:expiries");
        assert_eq!(keys.registry_version(), "mesh-a:registry:version");
        assert_eq!(keys.registry_changes(), "mesh-a:registry:changes");
        assert_eq!(
            keys.idempotency("echo\u{0}order-7"),
            "mesh-a:idempotency:echo\u{0}order-7"
        );
        assert_eq!(keys.idempotency_wakes(), "mesh-a:idempotency:wakes");
        for key in keys.registry() {
            assert!(key.starts_with("mesh-a:"), "{key}");
        }
        // Two meshes on one Redis share nothing.
        let other = Keys::new("mesh-b");
        assert_ne!(keys.registry_instances(), other.registry_instances());
    }
}
