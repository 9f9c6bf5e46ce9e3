//! The embedded queue against a model, under arbitrary interleavings of submit, receive, ack,
//! nack, lapsed leases, consumers that die, and restarts (clean, and crashes that leave the
//! file as a killed process would).
//!
//! The model knows what the store may hold without knowing when the writer syncs: every
//! message's failed-attempt count is a range (a crash may lose what was not yet synced), and
//! an ack is "pending" until something makes it durable (a later submit, whose fsync covers
//! every earlier commit, or a clean close). Checked on every delivery and at the end:
//! * no accepted submit is lost: after the run, every message not acked or dead-lettered
//!   is delivered again;
//! * no message is delivered after its ack was confirmed durable (nor after an ack in the
//!   same process);
//! * no message is delivered twice within a lease, nor before its retry time, nor once it is
//!   a dead letter;
//! * attempt numbers count failed attempts (nack, lapse, consumer death) and nothing else;
//! * a message's last failed attempt makes it a dead letter, with its whole history.
//!
//! Leases run on the real clock: a "lapsing" delivery takes a 1 ms lease, and the model
//! accepts either outcome of a race with it (settled, or lapsed and counted), never asserting
//! timing. `PROPTEST_CASES` sets the number of cases (default 64).

use agentmesh_queue::{
    BackendConfig, EmbeddedBackend, Leased, NackOutcome, NewMessage, QueueBackend, QueueConfig,
    QueueError, SubmitFate,
};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const QUEUE: &str = "model";
const MAX_ATTEMPTS: u32 = 3;
const CONSUMERS: usize = 3;
const LONG_LEASE: Duration = Duration::from_secs(60);
const SHORT_LEASE: Duration = Duration::from_millis(1);
/// A retry delay that never falls due during a case.
const PARKED: Duration = Duration::from_secs(3600);

fn config() -> BackendConfig {
    BackendConfig::new(QueueConfig {
        max_attempts: MAX_ATTEMPTS,
        dedup_window: Duration::from_secs(3600),
        backoff_base: Duration::from_millis(5),
        backoff_max: Duration::from_millis(20),
        result_ttl: Duration::from_secs(3600),
    })
}

#[derive(Debug, Clone, Copy)]
enum Delay {
    /// Ready again at once.
    Zero,
    /// The queue's backoff (a few ms).
    Backoff,
    /// Not due during the case.
    Parked,
}

#[derive(Debug, Clone)]
enum Op {
    Submit(usize),
    /// Receive up to `max` for `consumer`; `lapsing` takes a 1 ms lease.
    Receive {
        consumer: usize,
        max: usize,
        lapsing: bool,
    },
    /// Settle the `n`-th held delivery (modulo how many are held).
    Ack(usize),
    Nack(usize, Delay),
    /// The consumer went away holding its deliveries.
    Abandon(usize),
    /// The node hands the consumer's deliveries back on shutdown.
    Release(usize),
    CleanRestart,
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    let delay = prop_oneof![Just(Delay::Zero), Just(Delay::Backoff), Just(Delay::Parked)];
    prop_oneof![
        3 => (1..4usize).prop_map(Op::Submit),
        5 => (0..CONSUMERS, 1..5usize, proptest::bool::weighted(0.2)).prop_map(
            |(consumer, max, lapsing)| Op::Receive { consumer, max, lapsing }
        ),
        3 => any::<usize>().prop_map(Op::Ack),
        3 => (any::<usize>(), delay).prop_map(|(n, d)| Op::Nack(n, d)),
        1 => (0..CONSUMERS).prop_map(Op::Abandon),
        1 => (0..CONSUMERS).prop_map(Op::Release),
        1 => Just(Op::CleanRestart),
        1 => Just(Op::Crash),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Acked {
    No,
    /// Acked in this process, not yet known durable.
    Pending,
    /// Acked, and a later fsync (or clean close) covered it.
    Durable,
    /// Acked, then a crash before it was known durable: the store may have lost it.
    Maybe,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Parked {
    No,
    /// Waiting for a retry that is not due; `durable` once an fsync covered the nack.
    Yes {
        durable: bool,
    },
    /// Parked by a nack a crash may have lost.
    Maybe,
}

#[derive(Debug, Clone)]
struct Held {
    receipt: String,
    consumer: usize,
    lapsing: bool,
}

/// What the model knows of one accepted message.
#[derive(Debug, Clone)]
struct Msg {
    /// The store's failed-attempt count lies in `lo..=hi`.
    lo: u32,
    hi: u32,
    /// Failed attempts known to be durable.
    durable_lo: u32,
    acked: Acked,
    parked: Parked,
    /// The live delivery of this process, if any.
    held: Option<Held>,
}

impl Msg {
    fn fail(&mut self) {
        self.lo += 1;
        self.hi += 1;
    }
    fn certainly_dead(&self) -> bool {
        self.lo >= MAX_ATTEMPTS
    }
}

struct Harness {
    base: tempfile::TempDir,
    incarnation: usize,
    store: Option<EmbeddedBackend>,
    msgs: BTreeMap<String, Msg>,
    next_id: usize,
    /// Ids of the held deliveries, in the order they were handed out.
    held_order: Vec<String>,
}

fn open(dir: &Path) -> EmbeddedBackend {
    EmbeddedBackend::open(dir, config()).expect("the store opens")
}

impl Harness {
    fn new() -> Self {
        let base = tempfile::tempdir().expect("temp dir");
        let store = open(&base.path().join("0"));
        Self {
            base,
            incarnation: 0,
            store: Some(store),
            msgs: BTreeMap::new(),
            next_id: 0,
            held_order: Vec::new(),
        }
    }

    fn dir(&self) -> PathBuf {
        self.base.path().join(self.incarnation.to_string())
    }

    fn store(&self) -> &EmbeddedBackend {
        self.store.as_ref().expect("open")
    }

    /// An fsync covered every commit so far.
    fn all_durable(&mut self) {
        for m in self.msgs.values_mut() {
            m.durable_lo = m.lo;
            if m.acked == Acked::Pending {
                m.acked = Acked::Durable;
            }
            if let Parked::Yes { .. } = m.parked {
                m.parked = Parked::Yes { durable: true };
            }
        }
    }

    /// Deliveries of a process that went away: not counted, unless a lapsing lease was
    /// already counted before it did.
    fn forget_deliveries(&mut self) {
        for m in self.msgs.values_mut() {
            if let Some(h) = m.held.take() {
                if h.lapsing {
                    m.hi += 1;
                }
            }
        }
        self.held_order.clear();
    }

    fn check_delivery(&mut self, d: &Leased, consumer: usize, lapsing: bool) {
        let m = self
            .msgs
            .get_mut(&d.message_id)
            .unwrap_or_else(|| panic!("delivered a message never submitted: {d:?}"));
        match m.acked {
            Acked::Durable => panic!("{} delivered after its ack was durable", d.message_id),
            Acked::Pending => panic!("{} delivered after it was acked", d.message_id),
            Acked::Maybe => m.acked = Acked::No,
            Acked::No => {}
        }
        if let Some(h) = m.held.take() {
            // Only a lapsed lease lets the message out again, and the lapse counted.
            assert!(
                h.lapsing,
                "{} delivered twice within a lease: {d:?}",
                d.message_id
            );
            m.fail();
            self.held_order.retain(|id| *id != d.message_id);
        }
        match m.parked {
            Parked::Yes { .. } => panic!("{} delivered before its retry time", d.message_id),
            Parked::Maybe | Parked::No => m.parked = Parked::No,
        }
        assert!(
            !m.certainly_dead(),
            "{} delivered after it was dead-lettered ({m:?})",
            d.message_id
        );
        assert!(
            (m.lo + 1..=m.hi + 1).contains(&d.attempt) && d.attempt <= MAX_ATTEMPTS,
            "{} delivered as attempt {}, the model says {}..={}",
            d.message_id,
            d.attempt,
            m.lo + 1,
            m.hi + 1
        );
        m.lo = d.attempt - 1;
        m.hi = d.attempt - 1;
        m.held = Some(Held {
            receipt: d.receipt.clone(),
            consumer,
            lapsing,
        });
        self.held_order.push(d.message_id.clone());
    }

    fn pick_held(&self, n: usize) -> Option<String> {
        (!self.held_order.is_empty()).then(|| self.held_order[n % self.held_order.len()].clone())
    }

    async fn apply(&mut self, op: &Op) {
        match *op {
            Op::Submit(n) => {
                let ids: Vec<String> = (0..n).map(|i| format!("m{}", self.next_id + i)).collect();
                self.next_id += n;
                let batch = ids
                    .iter()
                    .map(|id| NewMessage::new(id.clone(), format!("body of {id}")))
                    .collect();
                let fates = self.store().submit(QUEUE, batch).await.expect("submit");
                for (id, fate) in ids.iter().zip(&fates) {
                    assert_eq!(fate, &SubmitFate::Accepted { id: id.clone() });
                }
                self.all_durable();
                for id in ids {
                    self.msgs.insert(
                        id,
                        Msg {
                            lo: 0,
                            hi: 0,
                            durable_lo: 0,
                            acked: Acked::No,
                            parked: Parked::No,
                            held: None,
                        },
                    );
                }
            }
            Op::Receive {
                consumer,
                max,
                lapsing,
            } => {
                let lease = if lapsing { SHORT_LEASE } else { LONG_LEASE };
                let got = self
                    .store()
                    .receive(QUEUE, &format!("c{consumer}"), max, lease, Duration::ZERO)
                    .await
                    .expect("receive");
                assert!(got.len() <= max);
                let ids: BTreeSet<&str> = got.iter().map(|d| d.message_id.as_str()).collect();
                assert_eq!(
                    ids.len(),
                    got.len(),
                    "one receive handed a message out twice"
                );
                for d in &got {
                    assert_eq!(&d.body[..], format!("body of {}", d.message_id).as_bytes());
                    self.check_delivery(d, consumer, lapsing);
                }
            }
            Op::Ack(n) => {
                let Some(id) = self.pick_held(n) else { return };
                self.held_order.retain(|h| *h != id);
                let m = self.msgs.get_mut(&id).expect("known");
                let h = m.held.take().expect("held");
                match self
                    .store
                    .as_ref()
                    .expect("open")
                    .ack(&h.receipt, None)
                    .await
                {
                    Ok(()) => m.acked = Acked::Pending,
                    Err(QueueError::LeaseLost(_)) if h.lapsing => m.fail(),
                    Err(e) => panic!("ack of {id}: {e:?}"),
                }
            }
            Op::Nack(n, delay) => {
                let Some(id) = self.pick_held(n) else { return };
                self.held_order.retain(|h| *h != id);
                let m = self.msgs.get_mut(&id).expect("known");
                let h = m.held.take().expect("held");
                let wait = match delay {
                    Delay::Zero => Some(Duration::ZERO),
                    Delay::Backoff => None,
                    Delay::Parked => Some(PARKED),
                };
                let store = self.store.as_ref().expect("open");
                let last = m.lo + 1 >= MAX_ATTEMPTS;
                match store.nack(&h.receipt, "model nack", wait).await {
                    Ok(outcome) => {
                        m.fail();
                        match outcome {
                            NackOutcome::DeadLettered => {
                                assert!(last, "{id} dead-lettered early ({m:?})")
                            }
                            NackOutcome::Retry { .. } => {
                                assert!(!last, "{id} retried past its last attempt ({m:?})");
                                if let Delay::Parked = delay {
                                    m.parked = Parked::Yes { durable: false };
                                }
                            }
                        }
                    }
                    Err(QueueError::LeaseLost(_)) if h.lapsing => m.fail(),
                    Err(e) => panic!("nack of {id}: {e:?}"),
                }
            }
            Op::Abandon(consumer) | Op::Release(consumer) => {
                let abandon = matches!(op, Op::Abandon(_));
                let mine: Vec<String> = self
                    .held_order
                    .iter()
                    .filter(|id| self.msgs[*id].held.as_ref().unwrap().consumer == consumer)
                    .cloned()
                    .collect();
                let mut receipts = Vec::new();
                let (mut sure, mut lapsing) = (0, 0);
                for id in &mine {
                    let m = self.msgs.get_mut(id).expect("known");
                    let h = m.held.take().expect("held");
                    receipts.push(h.receipt);
                    if h.lapsing {
                        lapsing += 1;
                    } else {
                        sure += 1;
                    }
                    // Abandoned: a failed attempt either way (abandon or lapse). Released: not
                    // counted, unless the lease lapsed first.
                    if abandon {
                        m.fail();
                    } else if h.lapsing {
                        m.hi += 1;
                    }
                }
                self.held_order.retain(|id| !mine.contains(id));
                let store = self.store();
                let n = if abandon {
                    store.abandon(receipts, "consumer died").await
                } else {
                    store.release(receipts).await
                }
                .expect("abandon / release");
                assert!(
                    (sure..=sure + lapsing).contains(&n),
                    "{n} of {sure} live and {lapsing} lapsing leases handed back"
                );
            }
            Op::CleanRestart => {
                drop(self.store.take());
                self.forget_deliveries();
                self.all_durable();
                self.store = Some(open(&self.dir()));
            }
            Op::Crash => {
                let store = self.store.take().expect("open");
                self.incarnation += 1;
                store.crash_into(&self.dir()).expect("crash");
                self.forget_deliveries();
                for m in self.msgs.values_mut() {
                    m.lo = m.durable_lo;
                    if m.acked == Acked::Pending {
                        m.acked = Acked::Maybe;
                    }
                    if m.parked == (Parked::Yes { durable: false }) {
                        m.parked = Parked::Maybe;
                    }
                }
                self.store = Some(open(&self.dir()));
            }
        }
    }

    /// Hands back what is held, drains the queue and checks that nothing was lost.
    async fn finish(&mut self) {
        let mut receipts = Vec::new();
        for id in std::mem::take(&mut self.held_order) {
            let m = self.msgs.get_mut(&id).expect("known");
            let h = m.held.take().expect("held");
            if h.lapsing {
                // Let it lapse (and count) rather than race the release with it.
                m.fail();
            } else {
                receipts.push(h.receipt);
            }
        }
        self.store().release(receipts).await.expect("release");
        // Everything surely alive, ready and un-acked must come out.
        let must: BTreeSet<String> = self
            .msgs
            .iter()
            .filter(|(_, m)| m.acked == Acked::No && m.parked == Parked::No)
            .filter(|(_, m)| m.hi < MAX_ATTEMPTS)
            .map(|(id, _)| id.clone())
            .collect();
        let mut drained = BTreeSet::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = self
                .store()
                .receive(QUEUE, "drain", 64, LONG_LEASE, Duration::from_millis(100))
                .await
                .expect("receive");
            if got.is_empty() && must.is_subset(&drained) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "lost messages: {:?}",
                must.difference(&drained).collect::<Vec<_>>()
            );
            for d in &got {
                self.check_delivery(d, 0, false);
                self.store().ack(&d.receipt, None).await.expect("ack");
                let m = self.msgs.get_mut(&d.message_id).expect("known");
                m.held = None;
                m.acked = Acked::Pending;
                drained.insert(d.message_id.clone());
            }
            self.held_order.clear();
        }
        // Dead letters: every message surely dead, none that cannot be, each with its history.
        let mut dead = BTreeSet::new();
        let mut after = None;
        loop {
            let (page, next) = match self
                .store()
                .list_dead_letters(QUEUE, 100, after.as_deref())
                .await
            {
                Ok(page) => page,
                Err(QueueError::NotFound(_)) if self.msgs.is_empty() => break,
                Err(e) => panic!("list dead letters: {e:?}"),
            };
            for dl in page {
                let m = &self.msgs[&dl.message_id];
                assert!(
                    m.hi >= MAX_ATTEMPTS && !drained.contains(&dl.message_id),
                    "{} is a dead letter, the model says {m:?}",
                    dl.message_id
                );
                assert!(!matches!(m.acked, Acked::Durable | Acked::Pending));
                let attempts: Vec<u32> = dl.attempts.iter().map(|a| a.attempt).collect();
                assert_eq!(
                    attempts,
                    (1..=MAX_ATTEMPTS).collect::<Vec<_>>(),
                    "history of {}",
                    dl.message_id
                );
                dead.insert(dl.message_id);
            }
            match next {
                Some(token) => after = Some(token),
                None => break,
            }
        }
        for (id, m) in &self.msgs {
            if m.certainly_dead() {
                assert!(dead.contains(id), "{id} should be a dead letter: {m:?}");
            }
        }
        // What is left waits for its retry: the parked messages, and nothing else.
        if !self.msgs.is_empty() {
            let stats = self.store().stats().await.expect("stats");
            let s = stats.iter().find(|s| s.name == QUEUE).expect("stats");
            let parked = self
                .msgs
                .iter()
                .filter(|(id, m)| m.parked != Parked::No && !drained.contains(*id))
                .count() as u64;
            assert_eq!((s.depth, s.in_flight), (parked, 0), "{s:?}");
            assert_eq!(s.dead_letters, dead.len() as u64);
        }
    }
}

async fn run_case(ops: Vec<Op>) {
    let mut harness = Harness::new();
    for op in &ops {
        harness.apply(op).await;
    }
    harness.finish().await;
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn embedded_store_keeps_the_queue_contract(ops in proptest::collection::vec(op(), 1..40)) {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime")
            .block_on(run_case(ops));
    }
}
