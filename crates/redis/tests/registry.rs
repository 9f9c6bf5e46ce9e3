//! The registry in Redis as two nodes on one Redis see it: what one registers the other
//! routes to and watches, heartbeats and deregistrations count through either, the
//! reapers expire lapsed leases once, and a node cut off from Redis keeps routing from its
//! cache, refuses writes as unavailable and catches up when Redis is back.

mod support;

use std::time::{Duration, Instant};

use agentmesh_core::{
    MeshError,
    registry::{AgentRegistry, MemoryRegistry},
};
use agentmesh_proto::v1::{AgentCard, AgentFilter, WatchEventKind, WatchResponse};
use agentmesh_resilience::BreakerConfig;
use support::{Prefix, Proxy, card, eventually, registry, short_leases, store, store_at};
use tokio::sync::broadcast;

/// The next event, or a panic after a few seconds.
async fn next_event(
    events: &mut broadcast::Receiver<WatchResponse>,
) -> (WatchEventKind, AgentCard) {
    let event = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .expect("an event within 5 s")
        .expect("the event stream is open");
    let kind = WatchEventKind::try_from(event.kind).unwrap();
    (kind, event.instance.unwrap().card.unwrap())
}

fn by_name(name: &str) -> AgentFilter {
    AgentFilter {
        name: name.into(),
        ..Default::default()
    }
}

#[tokio::test]
#[ignore = "needs AGENTMESH_TEST_REDIS"]
async fn an_agent_registered_through_one_node_is_routed_through_the_other() {
    let prefix = Prefix::new();
    let (a, b) = (
        registry(&store(&prefix, "a").await).await,
        registry(&store(&prefix, "b").await).await,
    );
    let mut watch_b = b.subscribe();

    let (lease, card) = a.register(card("echo"), None).await.unwrap();
    // The registering node reads its own write at once.
    assert_eq!(a.resolve("echo").len(), 1);

    let (kind, seen) = next_event(&mut watch_b).await;
    assert_eq!(
        (kind, seen.instance_id.as_str()),
        (WatchEventKind::Added, card.instance_id.as_str())
    );
    // By the time B reports the change, its cache has it: no Redis on the call path.
    let routed = b.resolve("echo");
    assert_eq!(routed.len(), 1);
    assert_eq!(routed[0].card.instance_id, card.instance_id);
    assert_eq!(routed[0].lease_id(), lease.lease_id);
    assert_eq!(b.resolve("skill:echo-skill").len(), 1);
    assert!(b.resolve("other").is_empty());
    let found = b.lookup(&by_name("echo"));
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].lease.as_ref().unwrap().lease_id, lease.lease_id);
    assert_eq!(
        found,
        a.lookup(&by_name("echo"))
            .into_iter()
            .map(|mut i| {
                // Lease expiries are each node's estimate; the rest is the same.
                i.lease = found[0].lease.clone();
                i
            })
            .collect::<Vec<_>>()
    );

    // Each node has its own view of the instance: its own breaker and in-flight count.
    let _call = routed[0].start_call();
    assert_eq!(b.lookup(&by_name("echo"))[0].in_flight, 1);
    assert_eq!(a.lookup(&by_name("echo"))[0].in_flight, 0);
}

#[tokio::test]
#[ignore = "needs AGENTMESH_TEST_REDIS"]
async fn heartbeats_and_deregistration_count_through_either_node() {
    let prefix = Prefix::new();
    let (a, b) = (
        registry(&store(&prefix, "a").await).await,
        registry(&store(&prefix, "b").await).await,
    );
    let (lease, card) = a
        .register(card("pinged"), Some(Duration::from_millis(400)))
        .await
        .unwrap();
    // Renewed through B only, for three times the TTL.
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let renewed = b.heartbeat(&lease.lease_id).await.unwrap();
        assert_eq!(renewed.instance_id, card.instance_id);
    }
    assert_eq!(
        a.lookup(&by_name("pinged")).len(),
        1,
        "B's heartbeats renewed A's lease"
    );
    assert_eq!(b.lookup(&by_name("pinged")).len(), 1);

    let (mut watch_a, mut watch_b) = (a.subscribe(), b.subscribe());
    b.deregister(&lease.lease_id).await.unwrap();
    for watch in [&mut watch_a, &mut watch_b] {
        let (kind, seen) = next_event(watch).await;
        assert_eq!(
            (kind, seen.instance_id),
            (WatchEventKind::Removed, card.instance_id.clone())
        );
    }
    assert!(a.resolve("pinged").is_empty() && b.resolve("pinged").is_empty());
    for node in [&a, &b] {
        assert!(matches!(
            node.heartbeat(&lease.lease_id).await,
            Err(MeshError::LeaseNotFound(_))
        ));
        assert!(matches!(
            node.deregister(&lease.lease_id).await,
            Err(MeshError::LeaseNotFound(_))
        ));
    }
}

#[tokio::test]
#[ignore = "needs AGENTMESH_TEST_REDIS"]
async fn a_lapsed_lease_expires_once_and_both_nodes_see_it() {
    let prefix = Prefix::new();
    let (a, b) = (
        registry(&store(&prefix, "a").await).await,
        registry(&store(&prefix, "b").await).await,
    );
    let (mut watch_a, mut watch_b) = (a.subscribe(), b.subscribe());
    let began = Instant::now();
    let (lease, card) = a
        .register(card("ephemeral"), Some(Duration::from_millis(300)))
        .await
        .unwrap();
    for watch in [&mut watch_a, &mut watch_b] {
        assert_eq!(next_event(watch).await.0, WatchEventKind::Added);
        let (kind, seen) = next_event(watch).await;
        assert_eq!(
            (kind, seen.instance_id),
            (WatchEventKind::Expired, card.instance_id.clone())
        );
    }
    let took = began.elapsed();
    assert!(
        took >= Duration::from_millis(290) && took < Duration::from_secs(2),
        "expired after {took:?}, for a 300 ms lease"
    );
    assert!(a.resolve("ephemeral").is_empty() && b.resolve("ephemeral").is_empty());
    assert!(matches!(
        b.heartbeat(&lease.lease_id).await,
        Err(MeshError::LeaseNotFound(_))
    ));
    // Nothing of the instance is left in Redis; only the version counter remains.
    let keys = prefix.keys();
    assert_eq!(
        keys,
        vec![format!("{}:registry:version", prefix.0)],
        "{keys:?}"
    );
    // Announced once: no second Expired from the other reaper.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(watch_a.try_recv().is_err() && watch_b.try_recv().is_err());
}

#[tokio::test]
#[ignore = "needs AGENTMESH_TEST_REDIS"]
async fn a_late_heartbeat_after_expiry_is_refused_and_reregistering_replaces_the_lease() {
    let prefix = Prefix::new();
    let (a, b) = (
        registry(&store(&prefix, "a").await).await,
        registry(&store(&prefix, "b").await).await,
    );
    let mut fixed = card("steady");
    fixed.instance_id = "steady-1".into();
    let (first, _) = a.register(fixed.clone(), None).await.unwrap();
    let mut watch_b = b.subscribe();
    let (second, _) = b.register(fixed.clone(), None).await.unwrap();
    assert_ne!(first.lease_id, second.lease_id);
    let (kind, _) = next_event(&mut watch_b).await;
    assert_eq!(kind, WatchEventKind::Updated);
    assert!(matches!(
        a.heartbeat(&first.lease_id).await,
        Err(MeshError::LeaseNotFound(_))
    ));
    a.heartbeat(&second.lease_id).await.unwrap();
    assert!(
        eventually(Duration::from_secs(2), || async {
            a.lookup(&by_name("steady"))
                .first()
                .and_then(|i| i.lease.as_ref())
                .map(|l| l.lease_id.clone())
                == Some(second.lease_id.clone())
        })
        .await
    );
    assert_eq!(b.lookup(&by_name("steady")).len(), 1);
}

#[tokio::test]
#[ignore = "needs AGENTMESH_TEST_REDIS"]
async fn cards_are_checked_and_leases_granted_as_in_memory() {
    let prefix = Prefix::new();
    let node = registry(&store(&prefix, "a").await).await;
    let memory = MemoryRegistry::new(short_leases(), BreakerConfig::default());
    for bad in [
        AgentCard::default(),
        AgentCard {
            name: "skill:x".into(),
            endpoint: "http://h:1".into(),
            ..Default::default()
        },
        AgentCard {
            name: "x".into(),
            endpoint: "not a uri".into(),
            ..Default::default()
        },
    ] {
        let redis = node.register(bad.clone(), None).await.unwrap_err();
        let local = memory.register(bad, None).await.unwrap_err();
        assert!(matches!(redis, MeshError::InvalidArgument(_)));
        assert_eq!(redis.to_string(), local.to_string());
    }
    assert!(matches!(
        node.heartbeat("no-such-lease").await,
        Err(MeshError::LeaseNotFound(_))
    ));
    assert!(matches!(
        node.deregister("no-such-lease").await,
        Err(MeshError::LeaseNotFound(_))
    ));
    // Requested TTLs are clamped to the configured bounds; an instance id is given.
    let (lease, card) = node
        .register(card("clamped"), Some(Duration::from_secs(3600)))
        .await
        .unwrap();
    assert!(!card.instance_id.is_empty());
    assert_eq!(lease.ttl.unwrap().seconds, 60);
    node.deregister(&lease.lease_id).await.unwrap();
}

#[tokio::test]
#[ignore = "needs AGENTMESH_TEST_REDIS"]
async fn the_keys_follow_the_documented_layout() {
    let prefix = Prefix::new();
    let node = registry(&store(&prefix, "a").await).await;
    let (lease, card) = node.register(card("laid-out"), None).await.unwrap();
    let p = &prefix.0;
    let mut keys = prefix.keys();
    keys.sort();
    assert_eq!(
        keys,
        vec![
            format!("{p}:registry:expiries"),
            format!("{p}:registry:instances"),
            format!("{p}:registry:leases"),
            format!("{p}:registry:version"),
        ]
    );
    let kind = |key: &str| prefix.query::<String>(redis::cmd("TYPE").arg(key));
    assert_eq!(kind(&format!("{p}:registry:instances")), "hash");
    assert_eq!(kind(&format!("{p}:registry:leases")), "hash");
    assert_eq!(kind(&format!("{p}:registry:expiries")), "zset");
    let owner: String = prefix.query(
        redis::cmd("HGET")
            .arg(format!("{p}:registry:leases"))
            .arg(&lease.lease_id),
    );
    assert_eq!(owner, card.instance_id);
    let record: Vec<u8> = prefix.query(
        redis::cmd("HGET")
            .arg(format!("{p}:registry:instances"))
            .arg(&card.instance_id),
    );
    assert!(record.starts_with(format!("{} 10000 ", lease.lease_id).as_bytes()));
}

#[tokio::test]
#[ignore = "needs AGENTMESH_TEST_REDIS"]
async fn a_node_cut_off_from_redis_serves_its_cache_and_catches_up() {
    let prefix = Prefix::new();
    let proxy = Proxy::start().await;
    let a = registry(&store_at(&proxy.url, &prefix, "a").await).await;
    let b = registry(&store(&prefix, "b").await).await;
    let (gone, _) = a.register(card("gone"), None).await.unwrap();
    a.register(card("stays"), None).await.unwrap();
    assert!(
        eventually(Duration::from_secs(2), || async {
            b.resolve("gone").len() == 1
        })
        .await
    );

    proxy.cut();
    // Routing goes on from the cache; writes fail as unavailable, naming the store.
    assert_eq!(a.resolve("gone").len(), 1);
    let refused = a.register(card("refused"), None).await.unwrap_err();
    let MeshError::Unavailable(message) = &refused else {
        panic!("expected Unavailable, got {refused:?}");
    };
    assert!(message.contains("Redis at redis://127.0.0.1:"), "{message}");
    assert_eq!(
        tonic::Status::from(refused).code(),
        tonic::Code::Unavailable
    );

    // Meanwhile, through the other node.
    b.deregister(&gone.lease_id).await.unwrap();
    b.register(card("late"), None).await.unwrap();
    let mut watch_a = a.subscribe();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(a.resolve("gone").len(), 1, "still cut off");

    proxy.restore();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let (kind, card) = next_event(&mut watch_a).await;
        seen.push((kind, card.name));
    }
    seen.sort_by_key(|(kind, _)| *kind as i32);
    assert_eq!(
        seen,
        vec![
            (WatchEventKind::Added, "late".into()),
            (WatchEventKind::Removed, "gone".into())
        ]
    );
    assert!(a.resolve("gone").is_empty());
    assert_eq!(a.resolve("late").len(), 1);
    assert_eq!(a.resolve("stays").len(), 1);
    // Writes work again through the reopened connection.
    assert!(
        eventually(Duration::from_secs(5), || async {
            a.register(card("back"), None).await.is_ok()
        })
        .await
    );
}

#[tokio::test]
#[ignore = "needs AGENTMESH_TEST_REDIS"]
async fn a_registry_whose_keys_were_lost_is_reloaded_whole() {
    let prefix = Prefix::new();
    let (a, b) = (
        registry(&store(&prefix, "a").await).await,
        registry(&store(&prefix, "b").await).await,
    );
    a.register(card("before"), None).await.unwrap();
    a.register(card("also-before"), None).await.unwrap();
    assert!(
        eventually(Duration::from_secs(2), || async {
            b.resolve("also-before").len() == 1
        })
        .await
    );
    // Redis loses the registry (a flush, or a restart without persistence) while both
    // nodes stay subscribed: the version counter starts over.
    let _: () = prefix.query(redis::cmd("DEL").arg(prefix.keys()));
    a.register(card("after"), None).await.unwrap();
    assert!(
        eventually(Duration::from_secs(3), || async {
            b.resolve("after").len() == 1 && b.resolve("before").is_empty()
        })
        .await,
        "B reloaded: {:?}",
        b.lookup(&AgentFilter::default())
    );
}
