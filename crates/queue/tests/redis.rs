//! What only a shared Redis can show: several nodes (backend instances) on one queue, what a
//! node going away leaves behind, the durability option, and Redis going away and coming back
//! (through a TCP proxy this test cuts, so the shared Redis itself is never restarted).
//! Ignored by default; run with `AGENTMESH_TEST_REDIS` set and `--run-ignored all`.

mod redis_fixture;

use agentmesh_queue::conformance::test_config;
use agentmesh_queue::{
    NewMessage, QueueBackend, QueueError, RedisBackend, RedisDurability, RedisOptions, SubmitFate,
};
use bytes::Bytes;
use redis_fixture::{TestRedis, redis_url};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

const LEASE: Duration = Duration::from_secs(30);

async fn node(redis: &TestRedis) -> Arc<RedisBackend> {
    Arc::new(
        redis
            .connect(test_config(), RedisOptions::default())
            .await
            .expect("connect"),
    )
}

fn msg(id: &str) -> NewMessage {
    NewMessage::new(id, Bytes::from(format!("body of {id}")))
}

async fn submit_ok(b: &dyn QueueBackend, queue: &str, messages: Vec<NewMessage>) {
    for fate in b.submit(queue, messages).await.expect("submit") {
        assert!(matches!(fate, SubmitFate::Accepted { .. }), "{fate:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs AGENTMESH_TEST_REDIS"]
async fn a_receipt_from_one_node_is_acked_through_another() {
    let redis = TestRedis::new();
    let (a, b) = (node(&redis).await, node(&redis).await);
    let q = "two-nodes";
    submit_ok(
        &*a,
        q,
        vec![msg("m1").with_correlation_id("corr-m1"), msg("m2")],
    )
    .await;
    let got = a
        .receive(q, "on-a", 2, LEASE, Duration::from_secs(1))
        .await
        .expect("receive");
    assert_eq!(got.len(), 2);
    // Node B settles what node A handed out: an ack with a result, an extend, a nack.
    b.ack(&got[0].receipt, Some(Bytes::from_static(b"done on b")))
        .await
        .expect("ack through b");
    b.extend(&got[1].receipt, Duration::from_secs(60))
        .await
        .expect("extend through b");
    assert!(matches!(
        a.ack(&got[0].receipt, None).await,
        Err(QueueError::LeaseLost(_))
    ));
    assert_eq!(
        a.get_result("corr-m1").await.expect("get_result"),
        Some(Bytes::from_static(b"done on b"))
    );
    b.nack(&got[1].receipt, "failed on b", Some(Duration::ZERO))
        .await
        .expect("nack through b");
    let again = a
        .receive(q, "on-a", 1, LEASE, Duration::from_secs(1))
        .await
        .expect("receive");
    assert_eq!(again[0].message_id, "m2");
    assert_eq!(again[0].attempt, 2);
    b.ack(&again[0].receipt, None).await.expect("ack");
    for n in [&a, &b] {
        let s = n.stats().await.expect("stats");
        assert_eq!((s[0].depth, s[0].in_flight), (0, 0), "{s:?}");
    }
}

/// The first ack of a lease skips checking its entries one by one; a receipt acked twice in
/// that call, or again later, is still lease lost, and one nacked first is not acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs AGENTMESH_TEST_REDIS"]
async fn the_first_ack_of_a_lease_still_settles_each_delivery_once() {
    let redis = TestRedis::new();
    let b = node(&redis).await;
    let q = "first-ack";
    submit_ok(&*b, q, (1..=4).map(|i| msg(&format!("m{i}"))).collect()).await;
    let got = b
        .receive(q, "c", 4, LEASE, Duration::from_secs(1))
        .await
        .expect("receive");
    assert_eq!(got.len(), 4);
    let r = |i: usize| got[i].receipt.clone();
    let outcomes = b
        .ack_many(vec![(r(0), None), (r(0), None), (r(1), None)])
        .await
        .expect("ack_many");
    assert!(outcomes[0].is_ok(), "{outcomes:?}");
    assert!(matches!(outcomes[1], Err(QueueError::LeaseLost(_))));
    assert!(outcomes[2].is_ok(), "{outcomes:?}");
    assert!(matches!(
        b.ack(&r(1), None).await,
        Err(QueueError::LeaseLost(_))
    ));
    b.ack(&r(2), None).await.expect("ack");
    let s = b.stats().await.expect("stats");
    assert_eq!((s[0].depth, s[0].in_flight), (0, 1), "{s:?}");

    // A lease whose entry was nacked before its first ack: that ack is lost.
    submit_ok(&*b, q, vec![msg("m5"), msg("m6")]).await;
    let got = b
        .receive(q, "c", 2, LEASE, Duration::from_secs(1))
        .await
        .expect("receive");
    let got: Vec<_> = got.into_iter().filter(|m| m.message_id != "m4").collect();
    assert_eq!(got.len(), 2, "{got:?}");
    b.nack(&got[0].receipt, "no", Some(Duration::from_secs(60)))
        .await
        .expect("nack");
    let outcomes = b
        .ack_many(vec![
            (got[0].receipt.clone(), None),
            (got[1].receipt.clone(), None),
        ])
        .await
        .expect("ack_many");
    assert!(matches!(outcomes[0], Err(QueueError::LeaseLost(_))));
    assert!(outcomes[1].is_ok(), "{outcomes:?}");
    let s = b.stats().await.expect("stats");
    assert_eq!((s[0].depth, s[0].in_flight), (1, 1), "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs AGENTMESH_TEST_REDIS"]
async fn a_waiting_consumer_and_a_result_waiter_wake_on_another_nodes_work() {
    let redis = TestRedis::new();
    let (a, b) = (node(&redis).await, node(&redis).await);
    let q = "wake-across";
    let consumer = {
        let b = b.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let got = b
                .receive(q, "on-b", 1, LEASE, Duration::from_secs(10))
                .await
                .expect("receive");
            (got, started.elapsed())
        })
    };
    let waiter = {
        let b = b.clone();
        tokio::spawn(async move { b.wait_result("corr-x", Duration::from_secs(10)).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    submit_ok(&*a, q, vec![msg("x").with_correlation_id("corr-x")]).await;
    let (got, waited) = consumer.await.expect("consumer");
    assert_eq!(got.len(), 1);
    assert!(waited < Duration::from_secs(3), "{waited:?}");
    let started = Instant::now();
    a.ack(&got[0].receipt, Some(Bytes::from_static(b"x done")))
        .await
        .expect("ack through a");
    assert_eq!(
        waiter.await.expect("waiter").expect("wait_result"),
        Some(Bytes::from_static(b"x done"))
    );
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs AGENTMESH_TEST_REDIS"]
async fn a_node_that_goes_away_hands_back_its_leases_unless_told_not_to() {
    let redis = TestRedis::new();
    let survivor = node(&redis).await;
    let q = "node-gone";
    submit_ok(&*survivor, q, vec![msg("handed-back"), msg("kept")]).await;

    // A node shutting down hands back what its consumers hold: at once, no attempt counted.
    let leaving = node(&redis).await;
    let got = leaving
        .receive(q, "leaving", 1, LEASE, Duration::from_secs(1))
        .await
        .expect("receive");
    assert_eq!(got[0].message_id, "handed-back");
    drop(leaving);
    let back = survivor
        .receive(q, "survivor", 1, LEASE, Duration::from_secs(1))
        .await
        .expect("receive");
    assert_eq!(back.len(), 1, "a dropped node's lease was not handed back");
    assert_eq!(
        (back[0].message_id.as_str(), back[0].attempt),
        ("handed-back", 1)
    );
    survivor.ack(&back[0].receipt, None).await.expect("ack");

    // One that vanishes without handing back (as after a crash): its receipts stay valid on
    // every node until the lease lapses.
    let crashing = redis
        .connect(
            test_config(),
            RedisOptions {
                release_leases_on_drop: false,
                ..RedisOptions::default()
            },
        )
        .await
        .expect("connect");
    let got = crashing
        .receive(q, "crashing", 1, LEASE, Duration::from_secs(1))
        .await
        .expect("receive");
    drop(crashing);
    let s = survivor.stats().await.expect("stats");
    assert_eq!((s[0].depth, s[0].in_flight), (0, 1), "{s:?}");
    survivor
        .ack(&got[0].receipt, None)
        .await
        .expect("a receipt outlives the node that issued it");
    let s = survivor.stats().await.expect("stats");
    assert_eq!((s[0].depth, s[0].in_flight), (0, 0), "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs AGENTMESH_TEST_REDIS"]
async fn wait_durability_needs_the_replicas_it_names() {
    let redis = TestRedis::new();
    let q = "durable";
    // The test Redis has no replicas: WAIT 0 is met at once, WAIT 1 times out.
    let none_needed = redis
        .connect(
            test_config(),
            RedisOptions {
                durability: RedisDurability::Wait {
                    replicas: 0,
                    timeout: Duration::from_millis(100),
                },
                ..RedisOptions::default()
            },
        )
        .await
        .expect("connect");
    submit_ok(&none_needed, q, vec![msg("w0")]).await;
    let one_needed = redis
        .connect(
            test_config(),
            RedisOptions {
                durability: RedisDurability::Wait {
                    replicas: 1,
                    timeout: Duration::from_millis(100),
                },
                ..RedisOptions::default()
            },
        )
        .await
        .expect("connect");
    let started = Instant::now();
    let err = one_needed
        .submit(q, vec![msg("w1").with_idempotency_key("w1")])
        .await
        .expect_err("no replica can acknowledge");
    assert!(
        matches!(&err, QueueError::Storage(m) if m.contains("WAIT") && m.contains("0 of 1")),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    // The batch was appended all the same; a resend with the same key is a duplicate.
    let fates = none_needed
        .submit(q, vec![msg("w1-again").with_idempotency_key("w1")])
        .await
        .expect("submit");
    assert_eq!(fates, vec![SubmitFate::Duplicate { id: "w1".into() }]);
    assert_eq!(none_needed.stats().await.expect("stats")[0].depth, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs AGENTMESH_TEST_REDIS"]
async fn an_unreachable_redis_is_a_storage_error_at_connect() {
    let _ = redis_url();
    // Nothing listens on a port we just bound and closed.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let err = RedisBackend::connect(
        &format!("redis://127.0.0.1:{port}"),
        "unreachable",
        test_config(),
        RedisOptions::default(),
    )
    .await
    .expect_err("nothing listens there");
    assert!(
        matches!(&err, QueueError::Storage(m) if m.contains(&format!("127.0.0.1:{port}"))),
        "{err}"
    );
}

/// A TCP proxy in front of the test Redis that can be cut (listener closed, every forwarded
/// connection dropped) and brought back on the same port.
struct Proxy {
    addr: SocketAddr,
    target: SocketAddr,
    serving: Option<tokio::task::JoinHandle<()>>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let mut proxy = Self {
            addr,
            target,
            serving: None,
        };
        proxy.serve(listener);
        proxy
    }

    fn serve(&mut self, listener: TcpListener) {
        let target = self.target;
        self.serving = Some(tokio::spawn(async move {
            // Aborting this task drops the set, which aborts every forwarding task.
            let mut links = JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                links.spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        }));
    }

    async fn cut(&mut self) {
        if let Some(task) = self.serving.take() {
            task.abort();
            let _ = task.await;
        }
    }

    async fn resume(&mut self) {
        let listener = TcpListener::bind(self.addr).await.expect("rebind proxy");
        self.serve(listener);
    }
}

fn target_of(url: &str) -> SocketAddr {
    let client = redis::Client::open(url).expect("redis url");
    let addr = client.get_connection_info().addr().to_string();
    std::net::ToSocketAddrs::to_socket_addrs(&addr)
        .expect("resolve")
        .next()
        .expect("an address")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs AGENTMESH_TEST_REDIS"]
async fn redis_going_away_is_a_storage_error_and_the_backend_recovers_by_itself() {
    let redis = TestRedis::new();
    let mut proxy = Proxy::start(target_of(&redis.url)).await;
    let url = format!("redis://{}", proxy.addr);
    let b = Arc::new(
        RedisBackend::connect(&url, &redis.prefix, test_config(), RedisOptions::default())
            .await
            .expect("connect through the proxy"),
    );
    let q = "outage";
    submit_ok(&*b, q, vec![msg("before")]).await;

    proxy.cut().await;
    let started = Instant::now();
    let err = b
        .submit(q, vec![msg("during")])
        .await
        .expect_err("redis is away");
    eprintln!("submit while redis is away: {err}");
    assert!(
        matches!(&err, QueueError::Storage(m) if m.contains(&proxy.addr.to_string())),
        "{err}"
    );
    for outcome in [
        b.receive(q, "c", 1, LEASE, Duration::from_millis(200))
            .await
            .map(|_| ()),
        b.stats().await.map(|_| ()),
        b.wait_result("nothing", Duration::from_millis(200))
            .await
            .map(|_| ()),
    ] {
        eprintln!("while redis is away: {outcome:?}");
        assert!(
            matches!(outcome, Err(QueueError::Storage(_))),
            "{outcome:?}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "errors took {:?}",
        started.elapsed()
    );

    proxy.resume().await;
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        match b.submit(q, vec![msg("after")]).await {
            Ok(fates) => {
                assert!(matches!(fates[0], SubmitFate::Accepted { .. }));
                break;
            }
            Err(QueueError::Storage(_)) if Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("the backend did not recover: {e}"),
        }
    }
    let got = b
        .receive(q, "c", 10, LEASE, Duration::from_secs(2))
        .await
        .expect("receive after recovery");
    let mut ids: Vec<&str> = got.iter().map(|m| m.message_id.as_str()).collect();
    ids.sort();
    assert_eq!(ids, vec!["after", "before"]);
    let acks = got.iter().map(|m| (m.receipt.clone(), None)).collect();
    for outcome in b.ack_many(acks).await.expect("ack_many") {
        outcome.expect("ack");
    }
    // A waiting receive works again too (it needs a fresh dedicated connection).
    let none = b
        .receive(q, "c", 1, LEASE, Duration::from_millis(100))
        .await
        .expect("waiting receive after recovery");
    assert!(none.is_empty());
    drop(b);
    proxy.cut().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs AGENTMESH_TEST_REDIS"]
async fn the_fixture_leaves_no_keys_behind() {
    let prefix;
    {
        let redis = TestRedis::new();
        prefix = redis.prefix.clone();
        let b = node(&redis).await;
        submit_ok(&*b, "q", vec![msg("a").with_idempotency_key("k")]).await;
        assert!(redis.key_count() > 0);
    }
    let probe = TestRedis {
        url: redis_url(),
        prefix,
    };
    assert_eq!(probe.key_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs AGENTMESH_TEST_REDIS"]
async fn a_redis_that_lost_the_function_library_gets_it_again() {
    let redis = TestRedis::new();
    let b = node(&redis).await;
    submit_ok(&*b, "reload", vec![msg("before")]).await;
    // As after a restart without persistence: the library is gone (other tests running now
    // reload it the same way).
    let client = redis::Client::open(redis.url.as_str()).expect("redis url");
    let mut con = client.get_connection().expect("connect");
    let libraries: Vec<Vec<redis::Value>> = redis::cmd("FUNCTION")
        .arg("LIST")
        .arg("LIBRARYNAME")
        .arg("agentmesh_queue_*")
        .query(&mut con)
        .expect("FUNCTION LIST");
    // Each library is a flat name/value list: library_name, name, engine, ...
    let names: Vec<String> = libraries
        .iter()
        .filter_map(|lib| match lib.get(1) {
            Some(redis::Value::BulkString(name)) => Some(String::from_utf8_lossy(name).into()),
            _ => None,
        })
        .collect();
    assert!(!names.is_empty(), "the backend loaded its library");
    for name in names {
        // Only ours: the Redis is shared with other work.
        let deleted: redis::RedisResult<()> = redis::cmd("FUNCTION")
            .arg("DELETE")
            .arg(&name)
            .query(&mut con);
        if let Err(e) = deleted {
            // Another test running now may have deleted it first.
            assert!(e.to_string().contains("not exist"), "{e}");
        }
    }
    submit_ok(&*b, "reload", vec![msg("after")]).await;
    let got = b
        .receive("reload", "c", 10, LEASE, Duration::from_secs(1))
        .await
        .expect("receive");
    assert_eq!(got.len(), 2);
}
