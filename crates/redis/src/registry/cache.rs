//! This node's copy of the registry: every instance as an [`Instance`] of its own (breaker,
//! in-flight count), kept in step with Redis by numbered changes.
//!
//! Every change carries the version Redis gave it, one more than the change before. The
//! cache remembers the version of the channel it has followed (`followed`) and of each
//! instance. A change from the channel with a version at or below `followed` is already
//! in the cache (it was in a snapshot); one that skips a number means messages were lost,
//! and the follower reloads. The node's own writes are applied at once, before their echo
//! arrives on the channel, so a node reads its own writes; the echo then finds the
//! instance at that version and changes nothing. An instance this node removed is
//! remembered (a tombstone) until the channel has caught up, so an older change still in
//! flight cannot bring it back.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use agentmesh_core::registry::Instance;
use agentmesh_proto::v1::{WatchEventKind, WatchResponse};
use agentmesh_resilience::BreakerConfig;

use super::change::{Change, Record};

/// One instance as this node sees it.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) instance: Arc<Instance>,
    pub(crate) ttl: Duration,
    pub(crate) expires_at: Instant,
    version: u64,
}

/// Where a change comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// The change channel, in order.
    Channel,
    /// A write of this node, answered by its script.
    Local,
}

/// What applying a change did.
#[derive(Debug, Default)]
pub(crate) struct Applied {
    /// The event for watchers, if the change was news to this node.
    pub(crate) event: Option<WatchResponse>,
    /// A lease's new expiry, for the reaper's plan.
    pub(crate) expires_at: Option<Instant>,
}

/// Everything Redis held at one version, read in one script.
#[derive(Debug)]
pub(crate) struct Snapshot {
    pub(crate) version: u64,
    /// Instance id → record and time left on its lease.
    pub(crate) instances: HashMap<String, (Record, Duration)>,
}

/// The cache itself.
#[derive(Debug, Default)]
pub(crate) struct Cache {
    pub(crate) entries: HashMap<String, Entry>,
    /// Instances this node removed, by the version that removed them.
    tombstones: HashMap<String, u64>,
    /// The version of the last change taken from the channel or a snapshot.
    followed: u64,
}

impl Cache {
    /// Whether a change from the channel follows on from what was followed: `Some(true)`
    /// to apply it, `Some(false)` if it is already in, `None` if changes were missed or the
    /// numbering started over (reload).
    pub(crate) fn in_order(&self, version: u64) -> Option<bool> {
        match version {
            // The counter was created again: the registry's keys were deleted (or Redis
            // lost them) while this node stayed subscribed. At worst one needless reload.
            1 if self.followed >= 1 => None,
            v if v <= self.followed => Some(false),
            v if v == self.followed + 1 => Some(true),
            _ => None,
        }
    }

    /// Applies one change; returns the watch event it makes, if any.
    pub(crate) fn apply(
        &mut self,
        change: Change,
        source: Source,
        breaker: &BreakerConfig,
    ) -> Applied {
        let version = change.version();
        if source == Source::Channel {
            self.followed = self.followed.max(version);
            if !self.tombstones.is_empty() {
                let followed = self.followed;
                self.tombstones.retain(|_, removed| *removed > followed);
            }
        }
        let id = change.instance_id();
        let known = self
            .entries
            .get(id)
            .map(|entry| entry.version)
            .or_else(|| self.tombstones.get(id).copied())
            .unwrap_or(0);
        if version <= known {
            return Applied::default();
        }
        match change {
            Change::Put {
                updated,
                remaining,
                record,
                ..
            } => {
                let id = record.card.instance_id.clone();
                self.tombstones.remove(&id);
                let entry = entry_of(record, remaining, version, breaker);
                let kind = if updated {
                    WatchEventKind::Updated
                } else {
                    WatchEventKind::Added
                };
                let applied = Applied {
                    event: Some(event_of(kind, &entry)),
                    expires_at: Some(entry.expires_at),
                };
                self.entries.insert(id, entry);
                applied
            }
            Change::Remove {
                expired, record, ..
            } => {
                let id = &record.card.instance_id;
                if source == Source::Local {
                    self.tombstones.insert(id.clone(), version);
                }
                let kind = if expired {
                    WatchEventKind::Expired
                } else {
                    WatchEventKind::Removed
                };
                let event = self.entries.remove(id).map(|entry| event_of(kind, &entry));
                Applied {
                    event,
                    expires_at: None,
                }
            }
            Change::Renew {
                remaining,
                instance_id,
                ..
            } => match self.entries.get_mut(&instance_id) {
                Some(entry) => {
                    entry.expires_at = Instant::now() + remaining;
                    entry.version = version;
                    Applied {
                        event: None,
                        expires_at: Some(entry.expires_at),
                    }
                }
                None => Applied::default(),
            },
        }
    }

    /// Brings the cache to a snapshot; returns the events of what differed.
    pub(crate) fn reload(
        &mut self,
        snapshot: Snapshot,
        breaker: &BreakerConfig,
    ) -> Vec<WatchResponse> {
        let Snapshot {
            version,
            mut instances,
        } = snapshot;
        if version < self.followed {
            // Redis lost its data (restarted without persistence, or the keys were
            // deleted): versions start over, so the ones held here mean nothing now.
            tracing::warn!(
                was = self.followed,
                now = version,
                "the shared registry started over; reloading it whole"
            );
            self.tombstones.clear();
            for entry in self.entries.values_mut() {
                entry.version = 0;
            }
        }
        self.followed = version;
        self.tombstones.retain(|_, removed| *removed > version);
        let now = Instant::now();
        let mut events = Vec::new();
        // Gone from Redis: removed while this node was not following.
        let gone: Vec<String> = self
            .entries
            .iter()
            .filter(|(id, entry)| entry.version <= version && !instances.contains_key(*id))
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            if let Some(entry) = self.entries.remove(&id) {
                let kind = if entry.expires_at <= now {
                    WatchEventKind::Expired
                } else {
                    WatchEventKind::Removed
                };
                events.push(event_of(kind, &entry));
            }
        }
        for (id, (record, remaining)) in instances.drain() {
            if self.tombstones.contains_key(&id) {
                continue;
            }
            match self.entries.get_mut(&id) {
                Some(entry) if entry.version > version => {}
                Some(entry) if entry.instance.lease_id() == record.lease_id => {
                    entry.expires_at = now + remaining;
                    entry.version = version;
                }
                existing => {
                    let kind = if existing.is_some() {
                        WatchEventKind::Updated
                    } else {
                        WatchEventKind::Added
                    };
                    let entry = entry_of(record, remaining, version, breaker);
                    events.push(event_of(kind, &entry));
                    self.entries.insert(id, entry);
                }
            }
        }
        events
    }

    /// The earliest lease expiry this node knows of.
    pub(crate) fn next_expiry(&self) -> Option<Instant> {
        self.entries.values().map(|entry| entry.expires_at).min()
    }
}

fn entry_of(record: Record, remaining: Duration, version: u64, breaker: &BreakerConfig) -> Entry {
    Entry {
        instance: Arc::new(Instance::new(
            record.card,
            record.lease_id,
            record.registered_at,
            breaker,
        )),
        ttl: record.ttl,
        expires_at: Instant::now() + remaining,
        version,
    }
}

fn event_of(kind: WatchEventKind, entry: &Entry) -> WatchResponse {
    WatchResponse {
        kind: kind as i32,
        instance: Some(entry.instance.describe(entry.ttl, entry.expires_at)),
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use agentmesh_proto::v1::AgentCard;

    use super::*;

    fn record(id: &str, lease: &str) -> Record {
        Record {
            lease_id: lease.into(),
            ttl: Duration::from_secs(10),
            registered_at: SystemTime::now(),
            card: AgentCard {
                name: "echo".into(),
                instance_id: id.into(),
                endpoint: "http://127.0.0.1:9000".into(),
                ..Default::default()
            },
        }
    }

    fn put(version: u64, id: &str, lease: &str) -> Change {
        Change::Put {
            version,
            updated: false,
            remaining: Duration::from_secs(10),
            record: record(id, lease),
        }
    }

    fn remove(version: u64, id: &str, lease: &str) -> Change {
        Change::Remove {
            version,
            expired: false,
            record: record(id, lease),
        }
    }

    fn kinds(applied: Applied) -> Option<i32> {
        applied.event.map(|event| event.kind)
    }

    #[test]
    fn the_echo_of_a_local_write_changes_nothing() {
        let (mut cache, breaker) = (Cache::default(), BreakerConfig::default());
        let added = cache.apply(put(1, "a", "l1"), Source::Local, &breaker);
        assert_eq!(kinds(added), Some(WatchEventKind::Added as i32));
        let instance = Arc::clone(&cache.entries["a"].instance);
        assert_eq!(cache.in_order(1), Some(true));
        let echo = cache.apply(put(1, "a", "l1"), Source::Channel, &breaker);
        assert!(echo.event.is_none());
        assert!(
            Arc::ptr_eq(&instance, &cache.entries["a"].instance),
            "the breaker is kept"
        );
    }

    #[test]
    fn a_late_change_cannot_bring_back_what_this_node_removed() {
        let (mut cache, breaker) = (Cache::default(), BreakerConfig::default());
        cache.apply(put(1, "a", "l1"), Source::Channel, &breaker);
        // Registered again elsewhere (2) and deregistered here (3) before 2 arrives.
        let removed = cache.apply(remove(3, "a", "l2"), Source::Local, &breaker);
        assert_eq!(kinds(removed), Some(WatchEventKind::Removed as i32));
        let late = cache.apply(put(2, "a", "l2"), Source::Channel, &breaker);
        assert!(late.event.is_none());
        assert!(!cache.entries.contains_key("a"));
        cache.apply(remove(3, "a", "l2"), Source::Channel, &breaker);
        assert!(cache.tombstones.is_empty(), "caught up: the tombstone goes");
    }

    #[test]
    fn a_skipped_number_asks_for_a_reload() {
        let (mut cache, breaker) = (Cache::default(), BreakerConfig::default());
        cache.apply(put(1, "a", "l1"), Source::Channel, &breaker);
        cache.apply(put(2, "b", "l2"), Source::Channel, &breaker);
        assert_eq!(cache.in_order(2), Some(false));
        assert_eq!(cache.in_order(3), Some(true));
        assert_eq!(cache.in_order(4), None);
        assert_eq!(cache.in_order(1), None, "the counter started over");
    }

    #[test]
    fn a_reload_reports_only_differences() {
        let (mut cache, breaker) = (Cache::default(), BreakerConfig::default());
        cache.apply(put(1, "a", "l1"), Source::Channel, &breaker);
        cache.apply(put(2, "b", "l2"), Source::Channel, &breaker);
        let kept = Arc::clone(&cache.entries["a"].instance);
        let snapshot = Snapshot {
            version: 5,
            instances: HashMap::from([
                ("a".into(), (record("a", "l1"), Duration::from_secs(3))),
                ("c".into(), (record("c", "l3"), Duration::from_secs(3))),
            ]),
        };
        let events = cache.reload(snapshot, &breaker);
        let mut seen: Vec<(i32, String)> = events
            .iter()
            .map(|e| {
                (
                    e.kind,
                    e.instance
                        .as_ref()
                        .unwrap()
                        .card
                        .as_ref()
                        .unwrap()
                        .instance_id
                        .clone(),
                )
            })
            .collect();
        seen.sort();
        assert_eq!(
            seen,
            vec![
                (WatchEventKind::Added as i32, "c".into()),
                (WatchEventKind::Removed as i32, "b".into()),
            ]
        );
        assert!(Arc::ptr_eq(&kept, &cache.entries["a"].instance));
        assert_eq!(cache.in_order(6), Some(true));
    }

    #[test]
    fn a_redis_that_started_over_is_taken_whole() {
        let (mut cache, breaker) = (Cache::default(), BreakerConfig::default());
        for version in 1..=9 {
            cache.apply(put(version, "a", "l1"), Source::Channel, &breaker);
        }
        let events = cache.reload(
            Snapshot {
                version: 0,
                instances: HashMap::new(),
            },
            &breaker,
        );
        assert_eq!(events.len(), 1);
        assert!(cache.entries.is_empty());
        assert_eq!(cache.in_order(1), Some(true));
    }
}
