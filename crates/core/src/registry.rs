//! The registry of agent instances: cards, leases, expiry and change events.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use agentmesh_proto::v1::{
    AgentCard, AgentFilter, AgentInstance, BreakerState, Lease, WatchEventKind, WatchResponse,
};
use agentmesh_resilience::{BreakerConfig, BreakerState as Breaker, CircuitBreaker};
use parking_lot::RwLock;
use tokio::sync::broadcast;

use crate::error::MeshError;

/// Lease limits of the registry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LeaseConfig {
    /// TTL granted when the instance asks for none.
    #[serde(with = "humantime_serde")]
    pub default_ttl: Duration,
    /// Shortest TTL granted.
    #[serde(with = "humantime_serde")]
    pub min_ttl: Duration,
    /// Longest TTL granted.
    #[serde(with = "humantime_serde")]
    pub max_ttl: Duration,
}

impl LeaseConfig {
    /// The TTL granted for a requested one: the default when none is asked for, clamped to
    /// `[min_ttl, max_ttl]`.
    pub fn grant(&self, requested: Option<Duration>) -> Duration {
        requested
            .unwrap_or(self.default_ttl)
            .clamp(self.min_ttl, self.max_ttl)
    }
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self {
            default_ttl: Duration::from_secs(10),
            min_ttl: Duration::from_millis(100),
            max_ttl: Duration::from_secs(300),
        }
    }
}

/// One registered instance, shared with the router while calls are in flight.
#[derive(Debug)]
pub struct Instance {
    /// The card the instance registered with (instance id filled in).
    pub card: AgentCard,
    /// Calls currently routed to this instance, unary and long-lived together.
    pub in_flight: AtomicU32,
    /// Of those, the long-lived ones: server streams and conversations, bounded apart from
    /// unary calls so that idle streams cannot use up the room of short calls.
    pub long_lived: AtomicU32,
    /// The node's circuit breaker for this instance.
    pub breaker: CircuitBreaker,
    lease_id: String,
    registered_at: SystemTime,
}

impl Instance {
    /// This node's view of a registered instance: a fresh breaker and no call in flight.
    pub fn new(
        card: AgentCard,
        lease_id: String,
        registered_at: SystemTime,
        breaker: &BreakerConfig,
    ) -> Self {
        Self {
            card,
            in_flight: AtomicU32::new(0),
            long_lived: AtomicU32::new(0),
            breaker: CircuitBreaker::new(breaker.clone()),
            lease_id,
            registered_at,
        }
    }

    /// The lease the instance holds.
    pub fn lease_id(&self) -> &str {
        &self.lease_id
    }

    /// When the instance (last) registered.
    pub fn registered_at(&self) -> SystemTime {
        self.registered_at
    }

    /// Whether a `target` (agent name or `skill:<id>`) addresses this instance.
    pub fn addressed_by(&self, target: &str) -> bool {
        match target.strip_prefix("skill:") {
            Some(skill) => self.card.skills.iter().any(|s| s.id == skill),
            None => self.card.name == target,
        }
    }

    /// The instance's lease, `ttl` long and lapsing at `expires_at`.
    pub fn lease(&self, ttl: Duration, expires_at: Instant) -> Lease {
        let remaining = expires_at.saturating_duration_since(Instant::now());
        Lease {
            lease_id: self.lease_id.clone(),
            instance_id: self.card.instance_id.clone(),
            ttl: prost_types::Duration::try_from(ttl).ok(),
            expires_at: Some((SystemTime::now() + remaining).into()),
        }
    }

    /// The instance as discovery shows it: card, lease, in-flight count and breaker state.
    pub fn describe(&self, ttl: Duration, expires_at: Instant) -> AgentInstance {
        AgentInstance {
            card: Some(self.card.clone()),
            lease: Some(self.lease(ttl, expires_at)),
            registered_at: Some(self.registered_at.into()),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            breaker: match self.breaker.state() {
                Breaker::Closed => BreakerState::Closed,
                Breaker::Open => BreakerState::Open,
                Breaker::HalfOpen => BreakerState::HalfOpen,
            } as i32,
        }
    }

    /// Counts a unary call as in flight until the returned guard is dropped.
    pub fn start_call(self: &Arc<Self>) -> InFlightGuard {
        self.start(CallKind::Unary)
    }

    /// Counts a call of `kind` as in flight until the returned guard is dropped.
    pub fn start(self: &Arc<Self>, kind: CallKind) -> InFlightGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        if kind == CallKind::LongLived {
            self.long_lived.fetch_add(1, Ordering::Relaxed);
        }
        InFlightGuard(Arc::clone(self), kind)
    }

    /// Calls of `kind` in flight to this instance.
    pub fn in_flight_of(&self, kind: CallKind) -> u32 {
        let long_lived = self.long_lived.load(Ordering::Relaxed);
        match kind {
            CallKind::LongLived => long_lived,
            CallKind::Unary => self
                .in_flight
                .load(Ordering::Relaxed)
                .saturating_sub(long_lived),
        }
    }

    /// Whether the instance accepts a payload of `type` at `version`.
    pub fn accepts(&self, r#type: &str, version: &str) -> bool {
        card_accepts(&self.card, r#type, version)
    }

    /// Whether calls with this envelope may be retried without an
    /// idempotency key: the addressed skill (or, by name, every skill) is
    /// declared idempotent.
    pub fn idempotent_for(&self, target: &str) -> bool {
        let skills = &self.card.skills;
        match target.strip_prefix("skill:") {
            Some(id) => skills.iter().any(|s| s.id == id && s.idempotent),
            None => !skills.is_empty() && skills.iter().all(|s| s.idempotent),
        }
    }

    /// The versions of `type` this instance declares (for error messages).
    pub fn versions_of(&self, r#type: &str) -> Vec<String> {
        self.card
            .skills
            .iter()
            .flat_map(|skill| skill.accepts.iter())
            .filter(|accepted| accepted.r#type == r#type)
            .flat_map(|accepted| accepted.versions.iter().cloned())
            .collect()
    }
}

/// What a call holds on to while it runs, for the bounds on calls in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallKind {
    /// A request and its reply (`Invoke`, a fan-out target).
    Unary,
    /// A server stream or a conversation, open as long as its caller keeps it.
    LongLived,
}

/// Decrements an instance's in-flight counts when dropped.
#[derive(Debug)]
pub struct InFlightGuard(Arc<Instance>, CallKind);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if self.1 == CallKind::LongLived {
            self.0.long_lived.fetch_sub(1, Ordering::Relaxed);
        }
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug)]
struct Entry {
    instance: Arc<Instance>,
    ttl: Duration,
    expires_at: Instant,
}

#[derive(Debug, Default)]
struct State {
    /// By instance id.
    instances: HashMap<String, Entry>,
    /// Lease id → instance id.
    leases: HashMap<String, String>,
}

/// The registry of agent instances, as the router, discovery and `/metrics` use it. Cards and
/// leases may live in this process ([`MemoryRegistry`]) or in a store shared by several
/// nodes; the [`Instance`]s handed out (with their breaker and in-flight count) are always
/// this node's own view.
#[tonic::async_trait]
pub trait AgentRegistry: Send + Sync + std::fmt::Debug + 'static {
    /// Registers (or re-registers) an instance and grants it a lease.
    async fn register(
        &self,
        card: AgentCard,
        requested_ttl: Option<Duration>,
    ) -> Result<(Lease, AgentCard), MeshError>;

    /// Renews a lease; `NotFound` if it lapsed or never existed.
    async fn heartbeat(&self, lease_id: &str) -> Result<Lease, MeshError>;

    /// Removes an instance at once.
    async fn deregister(&self, lease_id: &str) -> Result<(), MeshError>;

    /// Every live instance matching the filter, sorted by name then instance id.
    fn lookup(&self, filter: &AgentFilter) -> Vec<AgentInstance>;

    /// Live instances that a `target` (agent name or `skill:<id>`) addresses.
    fn resolve(&self, target: &str) -> Vec<Arc<Instance>>;

    /// Subscribes to registry changes.
    fn subscribe(&self) -> broadcast::Receiver<WatchResponse>;

    /// Starts the registry's upkeep (lease expiry) for as long as it lives.
    fn start(self: Arc<Self>);
}

/// The registry in this process: every live instance, its lease, and a stream of changes.
#[derive(Debug)]
pub struct MemoryRegistry {
    state: RwLock<State>,
    events: broadcast::Sender<WatchResponse>,
    /// Wakes the reaper when a lease may now expire sooner than it planned for (a new
    /// registration) or when the registry is dropped.
    reaper_wake: Arc<tokio::sync::Notify>,
    config: LeaseConfig,
    breaker: BreakerConfig,
}

impl Drop for MemoryRegistry {
    fn drop(&mut self) {
        // Lets the reaper see that the registry is gone and end.
        self.reaper_wake.notify_one();
    }
}

impl MemoryRegistry {
    /// An empty registry.
    pub fn new(config: LeaseConfig, breaker: BreakerConfig) -> Self {
        let (events, _) = broadcast::channel(1024);
        Self {
            state: RwLock::new(State::default()),
            events,
            reaper_wake: Arc::new(tokio::sync::Notify::new()),
            config,
            breaker,
        }
    }

    /// Removes every instance whose lease has lapsed; returns how many.
    pub fn expire(&self, now: Instant) -> usize {
        let expired: Vec<WatchResponse> = {
            let mut state = self.state.write();
            let ids: Vec<String> = state
                .instances
                .iter()
                .filter(|(_, entry)| entry.expires_at <= now)
                .map(|(id, _)| id.clone())
                .collect();
            let state = &mut *state;
            ids.iter()
                .filter_map(|id| state.instances.remove(id))
                .map(|entry| {
                    state.leases.remove(&entry.instance.lease_id);
                    event_of(WatchEventKind::Expired, &entry)
                })
                .collect()
        };
        for event in &expired {
            if let Some(card) = event.instance.as_ref().and_then(|i| i.card.as_ref()) {
                tracing::warn!(agent = %card.name, instance = %card.instance_id, "agent lease expired");
            }
            let _ = self.events.send(event.clone());
        }
        expired.len()
    }

    /// The earliest time a lease lapses, if any instance is registered.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.state
            .read()
            .instances
            .values()
            .map(|entry| entry.expires_at)
            .min()
    }
}

#[tonic::async_trait]
impl AgentRegistry for MemoryRegistry {
    /// Registers (or re-registers) an instance and grants it a lease.
    async fn register(
        &self,
        mut card: AgentCard,
        requested_ttl: Option<Duration>,
    ) -> Result<(Lease, AgentCard), MeshError> {
        admit_card(&mut card)?;
        let ttl = self.config.grant(requested_ttl);
        let lease_id = uuid::Uuid::now_v7().to_string();
        let instance = Arc::new(Instance::new(
            card.clone(),
            lease_id.clone(),
            SystemTime::now(),
            &self.breaker,
        ));
        let entry = Entry {
            instance,
            ttl,
            expires_at: Instant::now() + ttl,
        };
        let lease = lease_of(&entry);
        let event = {
            let mut state = self.state.write();
            let previous = state.instances.insert(card.instance_id.clone(), entry);
            if let Some(previous) = &previous {
                state.leases.remove(&previous.instance.lease_id);
            }
            state
                .leases
                .insert(lease_id.clone(), card.instance_id.clone());
            let kind = if previous.is_some() {
                WatchEventKind::Updated
            } else {
                WatchEventKind::Added
            };
            event_of(kind, &state.instances[&card.instance_id])
        };
        tracing::info!(agent = %card.name, instance = %card.instance_id, endpoint = %card.endpoint, ttl_ms = ttl.as_millis() as u64, "agent registered");
        let _ = self.events.send(event);
        self.reaper_wake.notify_one();
        Ok((lease, card))
    }

    /// Renews a lease; `NotFound` if it lapsed or never existed.
    async fn heartbeat(&self, lease_id: &str) -> Result<Lease, MeshError> {
        let mut state = self.state.write();
        let instance_id = state
            .leases
            .get(lease_id)
            .cloned()
            .ok_or_else(|| MeshError::LeaseNotFound(lease_id.to_owned()))?;
        let entry = state
            .instances
            .get_mut(&instance_id)
            .ok_or_else(|| MeshError::LeaseNotFound(lease_id.to_owned()))?;
        entry.expires_at = Instant::now() + entry.ttl;
        Ok(lease_of(entry))
    }

    /// Removes an instance at once.
    async fn deregister(&self, lease_id: &str) -> Result<(), MeshError> {
        let event = {
            let mut state = self.state.write();
            let instance_id = state
                .leases
                .remove(lease_id)
                .ok_or_else(|| MeshError::LeaseNotFound(lease_id.to_owned()))?;
            let entry = state.instances.remove(&instance_id);
            entry.map(|entry| event_of(WatchEventKind::Removed, &entry))
        };
        if let Some(event) = event {
            tracing::info!(instance = %event.instance.as_ref().and_then(|i| i.card.as_ref()).map(|c| c.instance_id.as_str()).unwrap_or_default(), "agent deregistered");
            let _ = self.events.send(event);
        }
        Ok(())
    }

    /// Runs [`MemoryRegistry::expire`] whenever the earliest lease falls due, until the registry
    /// is dropped. With no instance registered it sleeps until one registers: an idle node
    /// does not wake. A heartbeat only pushes expiries later, so the reaper at worst wakes
    /// once at the old time and plans again.
    fn start(self: Arc<Self>) {
        let registry = Arc::downgrade(&self);
        let wake = Arc::clone(&self.reaper_wake);
        tokio::spawn(async move {
            loop {
                let next = {
                    let Some(registry) = registry.upgrade() else {
                        return;
                    };
                    registry.expire(Instant::now());
                    registry.next_expiry()
                };
                match next {
                    Some(at) => tokio::select! {
                        _ = tokio::time::sleep_until(at.into()) => {}
                        _ = wake.notified() => {}
                    },
                    None => wake.notified().await,
                }
            }
        });
    }

    /// Every live instance matching the filter, sorted by name then instance id.
    fn lookup(&self, filter: &AgentFilter) -> Vec<AgentInstance> {
        let state = self.state.read();
        let mut found: Vec<AgentInstance> = state
            .instances
            .values()
            .filter(|entry| matches(filter, &entry.instance))
            .map(instance_of)
            .collect();
        sort_for_lookup(&mut found);
        found
    }

    /// Live instances that a `target` (agent name or `skill:<id>`) addresses.
    fn resolve(&self, target: &str) -> Vec<Arc<Instance>> {
        let state = self.state.read();
        state
            .instances
            .values()
            .filter(|entry| entry.instance.addressed_by(target))
            .map(|entry| Arc::clone(&entry.instance))
            .collect()
    }

    /// Subscribes to registry changes.
    fn subscribe(&self) -> broadcast::Receiver<WatchResponse> {
        self.events.subscribe()
    }
}

/// Whether an instance matches a filter (used by `Watch`).
pub fn instance_matches(filter: &AgentFilter, instance: &AgentInstance) -> bool {
    instance
        .card
        .as_ref()
        .is_some_and(|card| card_matches(filter, card))
}

/// Whether a card accepts a payload of `type` at `version` (empty = any).
/// A card that declares no accepted types accepts everything.
pub fn card_accepts(card: &AgentCard, r#type: &str, version: &str) -> bool {
    if r#type.is_empty() {
        return true;
    }
    let mut declared = card
        .skills
        .iter()
        .flat_map(|skill| skill.accepts.iter())
        .peekable();
    if declared.peek().is_none() {
        return true;
    }
    declared.any(|accepted| {
        accepted.r#type == r#type
            && (version.is_empty()
                || accepted.versions.is_empty()
                || accepted.versions.iter().any(|v| v == version))
    })
}

/// Sorts instances the way `lookup` returns them: by name, then instance id.
pub fn sort_for_lookup(instances: &mut [AgentInstance]) {
    fn key(instance: &AgentInstance) -> Option<(&str, &str)> {
        let card = instance.card.as_ref()?;
        Some((card.name.as_str(), card.instance_id.as_str()))
    }
    instances.sort_by(|a, b| key(a).cmp(&key(b)));
}

/// Checks a card for registration and gives it an instance id if it has none. Every
/// registry runs this, so a card is accepted or refused the same way whatever keeps it.
pub fn admit_card(card: &mut AgentCard) -> Result<(), MeshError> {
    validate_card(card)?;
    if card.instance_id.is_empty() {
        card.instance_id = uuid::Uuid::now_v7().to_string();
    }
    Ok(())
}

fn validate_card(card: &AgentCard) -> Result<(), MeshError> {
    use agentmesh_proto::names::check_name;
    // The name rule leaves out ':', so no name can pass for `skill:<id>`.
    check_name("card.name", &card.name).map_err(MeshError::InvalidArgument)?;
    for skill in &card.skills {
        check_name("skill id", &skill.id).map_err(MeshError::InvalidArgument)?;
    }
    if card.endpoint.is_empty() {
        return Err(MeshError::InvalidArgument(
            "card.endpoint is required (where the agent serves agentmesh.v1.AgentService)".into(),
        ));
    }
    match card.endpoint.parse::<http::Uri>() {
        Ok(uri) if uri.scheme().is_some() && uri.host().is_some() => Ok(()),
        _ => Err(MeshError::InvalidArgument(format!(
            "card.endpoint {:?} is not an absolute URI such as http://127.0.0.1:9000",
            card.endpoint
        ))),
    }
}

fn matches(filter: &AgentFilter, instance: &Instance) -> bool {
    card_matches(filter, &instance.card)
}

/// Whether a card matches a filter (empty fields match anything).
pub fn card_matches(filter: &AgentFilter, card: &AgentCard) -> bool {
    (filter.name.is_empty() || card.name == filter.name)
        && (filter.skill.is_empty() || card.skills.iter().any(|s| s.id == filter.skill))
        && (filter.tag.is_empty() || card.skills.iter().any(|s| s.tags.contains(&filter.tag)))
        && (filter.accepts_type.is_empty()
            || card_accepts(card, &filter.accepts_type, &filter.accepts_version))
}

fn lease_of(entry: &Entry) -> Lease {
    entry.instance.lease(entry.ttl, entry.expires_at)
}

fn instance_of(entry: &Entry) -> AgentInstance {
    entry.instance.describe(entry.ttl, entry.expires_at)
}

fn event_of(kind: WatchEventKind, entry: &Entry) -> WatchResponse {
    WatchResponse {
        kind: kind as i32,
        instance: Some(instance_of(entry)),
    }
}

#[cfg(test)]
mod tests {
    use agentmesh_proto::v1::Skill;

    use super::*;

    fn card(name: &str, skill: &str) -> AgentCard {
        AgentCard {
            name: name.into(),
            endpoint: "http://127.0.0.1:9000".into(),
            skills: vec![Skill {
                id: skill.into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn a_lease_is_granted_within_the_bounds() {
        let config = LeaseConfig::default();
        assert_eq!(config.grant(None), config.default_ttl);
        assert_eq!(config.grant(Some(Duration::from_millis(1))), config.min_ttl);
        assert_eq!(
            config.grant(Some(Duration::from_secs(86_400))),
            config.max_ttl
        );
        assert_eq!(
            config.grant(Some(Duration::from_secs(30))),
            Duration::from_secs(30)
        );
    }

    #[test]
    fn a_card_is_admitted_with_an_instance_id_or_refused() {
        let mut good = card("echo", "say");
        admit_card(&mut good).unwrap();
        assert!(!good.instance_id.is_empty());
        let mut kept = card("echo", "say");
        kept.instance_id = "mine".into();
        admit_card(&mut kept).unwrap();
        assert_eq!(kept.instance_id, "mine");
        let mut bad = card("skill:echo", "say");
        assert!(matches!(
            admit_card(&mut bad),
            Err(MeshError::InvalidArgument(_))
        ));
    }

    #[test]
    fn an_instance_built_elsewhere_describes_itself_like_a_registered_one() {
        let instance = Arc::new(Instance::new(
            card("echo", "say"),
            "lease-1".into(),
            SystemTime::now(),
            &BreakerConfig::default(),
        ));
        assert!(instance.addressed_by("echo") && instance.addressed_by("skill:say"));
        assert!(!instance.addressed_by("say") && !instance.addressed_by("skill:echo"));
        let _call = instance.start_call();
        let described = instance.describe(
            Duration::from_secs(10),
            Instant::now() + Duration::from_secs(4),
        );
        assert_eq!(described.in_flight, 1);
        assert_eq!(described.breaker, BreakerState::Closed as i32);
        let lease = described.lease.unwrap();
        assert_eq!(
            (lease.lease_id.as_str(), lease.ttl.unwrap().seconds),
            ("lease-1", 10)
        );
    }

    #[test]
    fn lookups_sort_by_name_then_instance() {
        let described = |name: &str, id: &str| {
            let mut card = card(name, "s");
            card.instance_id = id.into();
            Instance::new(
                card,
                "l".into(),
                SystemTime::now(),
                &BreakerConfig::default(),
            )
            .describe(Duration::from_secs(1), Instant::now())
        };
        let mut found = vec![
            described("b", "1"),
            described("a", "2"),
            described("a", "1"),
        ];
        sort_for_lookup(&mut found);
        let order: Vec<(String, String)> = found
            .into_iter()
            .map(|i| i.card.unwrap())
            .map(|c| (c.name, c.instance_id))
            .collect();
        assert_eq!(
            order,
            [("a", "1"), ("a", "2"), ("b", "1")].map(|(n, i)| (n.to_owned(), i.to_owned()))
        );
    }

    #[tokio::test]
    async fn the_memory_registry_resolves_by_name_and_skill() {
        let registry = MemoryRegistry::new(LeaseConfig::default(), BreakerConfig::default());
        let (lease, _) = registry.register(card("echo", "say"), None).await.unwrap();
        assert_eq!(registry.resolve("echo").len(), 1);
        assert_eq!(registry.resolve("skill:say").len(), 1);
        assert_eq!(registry.lookup(&AgentFilter::default()).len(), 1);
        registry.deregister(&lease.lease_id).await.unwrap();
        assert!(registry.resolve("echo").is_empty());
    }
}
