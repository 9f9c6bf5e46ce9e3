//! The registry in Redis, cached on every node.
//!
//! **What is kept where.** Redis holds the truth: each instance's record (card, lease id,
//! TTL, registration time), which lease belongs to which instance, and when each lease
//! lapses (see [`crate::keys`]). Every change — register, heartbeat, deregister, expiry —
//! is one Lua script that changes those keys, takes the next number of a version counter
//! and publishes the change on the registry's channel, all in one atomic step.
//!
//! Each node keeps a **local cache**: every live instance as an [`Instance`] of its own,
//! with this node's breaker and in-flight count. `resolve` and `lookup` read only the
//! cache, so routing a call never waits on Redis. The cache is fed by the channel: a node
//! subscribes, loads everything in one script, and from then on applies each numbered
//! change in order (skipping what the load already had, reloading if a number is
//! missing). A node applies its own writes as soon as their script answers, so it reads
//! its own writes; `subscribe` reports changes made through any node, once each.
//!
//! **Expiry.** Leases lapse by Redis's clock. [`AgentRegistry::start`] runs a reaper that
//! sleeps until the earliest expiry it knows of, then runs a script that removes only
//! what really lapsed (a heartbeat through another node may have renewed it) and plans
//! its next look from the time left on the next lease. Every node runs one; the script
//! makes them agree, and each expiry is announced once.
//!
//! **When Redis is away.** Writes (register, heartbeat, deregister) fail with
//! `UNAVAILABLE` and a message naming the store; nothing panics. The cache keeps serving
//! the instances it had, so calls keep being routed to agents that are still up. The
//! subscription reconnects with backoff and reloads everything once Redis answers again,
//! reporting what changed meanwhile; the reaper retries with backoff too.

mod cache;
mod change;
mod reaper;
mod scripts;

use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use agentmesh_core::{
    MeshError,
    registry::{AgentRegistry, Instance, LeaseConfig, admit_card, card_matches, sort_for_lookup},
};
use agentmesh_proto::v1::{AgentCard, AgentFilter, AgentInstance, Lease, WatchResponse};
use agentmesh_resilience::{Backoff, BreakerConfig};
use parking_lot::RwLock;
use redis::{RedisError, Script, ScriptInvocation};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use self::{
    cache::{Applied, Cache, Snapshot, Source},
    change::{Change, Record},
    reaper::Plan,
};
use crate::{
    follow::{Follower, Next, follow},
    store::RedisStore,
};

/// Most instances one run of the reaper's script removes, so a burst of expiries does not
/// hold Redis for long; the reaper runs again at once for the rest.
const REAP_BATCH: usize = 256;

/// The registry of agent instances kept in Redis and cached on this node.
#[derive(Debug)]
pub struct RedisRegistry {
    shared: Arc<Shared>,
    /// Ends the subscription and the reaper when the registry is dropped.
    cancel: CancellationToken,
}

#[derive(Debug)]
struct Shared {
    store: RedisStore,
    keys: [String; 4],
    channel: String,
    cache: RwLock<Cache>,
    events: broadcast::Sender<WatchResponse>,
    plan: Plan,
    config: LeaseConfig,
    breaker: BreakerConfig,
}

impl Drop for RedisRegistry {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl RedisRegistry {
    /// Subscribes to the registry's changes in `store` and loads every instance, so the
    /// cache is warm on return; `Unavailable` if Redis cannot be reached now.
    pub async fn connect(
        store: &RedisStore,
        config: LeaseConfig,
        breaker: BreakerConfig,
    ) -> Result<Self, MeshError> {
        let (events, _) = broadcast::channel(1024);
        let shared = Arc::new(Shared {
            store: store.clone(),
            keys: store.keys().registry(),
            channel: store.keys().registry_changes(),
            cache: RwLock::new(Cache::default()),
            events,
            plan: Plan::default(),
            config,
            breaker,
        });
        let cancel = CancellationToken::new();
        follow(
            store.clone(),
            shared.channel.clone(),
            Arc::clone(&shared),
            cancel.clone(),
        )
        .await?;
        Ok(Self { shared, cancel })
    }

    /// Removes every lease that has lapsed by Redis's clock now (the reaper does this on
    /// its own once started); returns how many this call removed.
    pub async fn expire(&self) -> Result<usize, MeshError> {
        self.shared.reap().await
    }
}

#[tonic::async_trait]
impl AgentRegistry for RedisRegistry {
    async fn register(
        &self,
        mut card: AgentCard,
        requested_ttl: Option<Duration>,
    ) -> Result<(Lease, AgentCard), MeshError> {
        admit_card(&mut card)?;
        let shared = &self.shared;
        let ttl = shared.config.grant(requested_ttl);
        let lease_id = uuid::Uuid::now_v7().to_string();
        let record = Record {
            lease_id: lease_id.clone(),
            ttl,
            registered_at: SystemTime::now(),
            card: card.clone(),
        };
        let mut script = shared.script(&scripts::REGISTER);
        script
            .arg(&card.instance_id)
            .arg(&lease_id)
            .arg(ttl.as_millis() as u64)
            .arg(record.encode());
        let change = shared
            .run::<Option<Vec<u8>>>(&script)
            .await
            .map_err(|error| shared.store.unavailable("registering an agent", &error))?
            .ok_or_else(|| MeshError::Unavailable("registering returned nothing".into()))?;
        shared.apply_local(&change);
        tracing::info!(agent = %card.name, instance = %card.instance_id, endpoint = %card.endpoint, ttl_ms = ttl.as_millis() as u64, "agent registered");
        Ok((lease(lease_id, card.instance_id.clone(), ttl, ttl), card))
    }

    async fn heartbeat(&self, lease_id: &str) -> Result<Lease, MeshError> {
        let shared = &self.shared;
        let mut script = shared.script(&scripts::HEARTBEAT);
        script.arg(lease_id);
        let change = shared
            .run::<Option<Vec<u8>>>(&script)
            .await
            .map_err(|error| shared.store.unavailable("renewing a lease", &error))?
            .ok_or_else(|| MeshError::LeaseNotFound(lease_id.to_owned()))?;
        match shared.apply_local(&change) {
            Some(Change::Renew {
                remaining,
                instance_id,
                ..
            }) => Ok(lease(
                lease_id.to_owned(),
                instance_id,
                remaining,
                remaining,
            )),
            _ => Err(MeshError::Unavailable(
                "renewing a lease returned an unreadable change".into(),
            )),
        }
    }

    async fn deregister(&self, lease_id: &str) -> Result<(), MeshError> {
        let shared = &self.shared;
        let mut script = shared.script(&scripts::DEREGISTER);
        script.arg(lease_id);
        let change = shared
            .run::<Option<Vec<u8>>>(&script)
            .await
            .map_err(|error| shared.store.unavailable("deregistering an agent", &error))?
            .ok_or_else(|| MeshError::LeaseNotFound(lease_id.to_owned()))?;
        if let Some(change) = shared.apply_local(&change) {
            tracing::info!(instance = %change.instance_id(), "agent deregistered");
        }
        Ok(())
    }

    fn lookup(&self, filter: &AgentFilter) -> Vec<AgentInstance> {
        let cache = self.shared.cache.read();
        let mut found: Vec<AgentInstance> = cache
            .entries
            .values()
            .filter(|entry| card_matches(filter, &entry.instance.card))
            .map(|entry| entry.instance.describe(entry.ttl, entry.expires_at))
            .collect();
        drop(cache);
        sort_for_lookup(&mut found);
        found
    }

    fn resolve(&self, target: &str) -> Vec<Arc<Instance>> {
        self.shared
            .cache
            .read()
            .entries
            .values()
            .filter(|entry| entry.instance.addressed_by(target))
            .map(|entry| Arc::clone(&entry.instance))
            .collect()
    }

    fn subscribe(&self) -> broadcast::Receiver<WatchResponse> {
        self.shared.events.subscribe()
    }

    /// Runs the reaper until the registry is dropped: it sleeps until the earliest known
    /// expiry (or a registration that lapses sooner), never on a fixed tick, and with no
    /// instance registered it sleeps until one is.
    fn start(self: Arc<Self>) {
        tokio::spawn(reap_forever(Arc::clone(&self.shared), self.cancel.clone()));
    }
}

async fn reap_forever(shared: Arc<Shared>, cancel: CancellationToken) {
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(5));
    loop {
        if shared.plan.take_due(Instant::now()) {
            match shared.reap().await {
                Ok(_) => backoff.reset(),
                Err(error) => {
                    let delay = backoff.next_delay().max(Duration::from_millis(50));
                    tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "could not expire lapsed leases");
                    shared.plan.before(Instant::now() + delay);
                }
            }
            continue;
        }
        let next = shared.plan.next();
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = shared.plan.changed() => {}
            _ = tokio::time::sleep_until(next.unwrap_or_else(Instant::now).into()), if next.is_some() => {}
        }
    }
}

impl Shared {
    fn script<'a>(&self, script: &'a Script) -> ScriptInvocation<'a> {
        let mut invocation = script.prepare_invoke();
        for key in &self.keys {
            invocation.key(key);
        }
        invocation.arg(&self.channel);
        invocation
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T, RedisError> {
        invocation.invoke_async(&mut self.store.connection()).await
    }

    /// Applies a change this node's script answered with; returns it decoded.
    fn apply_local(&self, bytes: &[u8]) -> Option<Change> {
        let Some(change) = Change::decode(bytes) else {
            tracing::error!("a registry script answered with an unreadable change");
            return None;
        };
        let applied = self
            .cache
            .write()
            .apply(change.clone(), Source::Local, &self.breaker);
        self.announce(applied);
        Some(change)
    }

    fn announce(&self, applied: Applied) {
        if let Some(event) = applied.event {
            let _ = self.events.send(event);
        }
        if let Some(at) = applied.expires_at {
            self.plan.before(at);
        }
    }

    async fn reap(&self) -> Result<usize, MeshError> {
        let mut removed = 0;
        loop {
            let mut script = self.script(&scripts::REAP);
            script.arg(REAP_BATCH);
            let (wait_ms, changes): (i64, Vec<Vec<u8>>) = self
                .run(&script)
                .await
                .map_err(|error| self.store.unavailable("expiring lapsed leases", &error))?;
            for change in &changes {
                if let Some(Change::Remove { record, .. }) = self.apply_local(change) {
                    tracing::warn!(agent = %record.card.name, instance = %record.card.instance_id, "agent lease expired");
                }
            }
            removed += changes.len();
            if let Ok(wait) = u64::try_from(wait_ms) {
                self.plan
                    .before(Instant::now() + Duration::from_millis(wait));
            }
            if changes.len() < REAP_BATCH {
                return Ok(removed);
            }
        }
    }
}

impl Follower for Shared {
    fn name(&self) -> &'static str {
        "registry"
    }

    async fn reload(&self) -> Result<(), RedisError> {
        let script = self.script(&scripts::SNAPSHOT);
        let (version, now_ms, records, expiries): SnapshotReply = self.run(&script).await?;
        let expiries: std::collections::HashMap<String, u64> = expiries.into_iter().collect();
        let instances = records
            .into_iter()
            .filter_map(|(id, bytes)| {
                let record = Record::decode(&bytes)?;
                let remaining = expiries.get(&id).map_or(Duration::ZERO, |at| {
                    Duration::from_millis(at.saturating_sub(now_ms))
                });
                Some((id, (record, remaining)))
            })
            .collect();
        let mut cache = self.cache.write();
        for event in cache.reload(Snapshot { version, instances }, &self.breaker) {
            let _ = self.events.send(event);
        }
        if let Some(at) = cache.next_expiry() {
            self.plan.before(at);
        }
        Ok(())
    }

    fn message(&self, payload: &[u8]) -> Next {
        let Some(change) = Change::decode(payload) else {
            tracing::warn!("an unreadable registry change on the channel");
            return Next::Reload;
        };
        let mut cache = self.cache.write();
        match cache.in_order(change.version()) {
            Some(true) => {
                let applied = cache.apply(change, Source::Channel, &self.breaker);
                drop(cache);
                self.announce(applied);
                Next::Continue
            }
            Some(false) => Next::Continue,
            None => Next::Reload,
        }
    }
}

/// What the snapshot script answers: version, Redis's time in ms, the instances hash and
/// the expiries (instance id, ms).
type SnapshotReply = (u64, u64, Vec<(String, Vec<u8>)>, Vec<(String, u64)>);

/// A lease as the caller sees it.
fn lease(lease_id: String, instance_id: String, ttl: Duration, remaining: Duration) -> Lease {
    Lease {
        lease_id,
        instance_id,
        ttl: prost_types::Duration::try_from(ttl).ok(),
        expires_at: Some((SystemTime::now() + remaining).into()),
    }
}
