//! [`RedisJournal`]: the trace journal in Redis, so every node records into and reads from
//! the same chains: a hop carried by node A and one carried by node B under the same
//! correlation id land in one trace.
//!
//! One capped stream per correlation id (`XADD MAXLEN ~`), with a time to live renewed as
//! hops arrive. Recording never waits on Redis: hops go through a bounded channel to one
//! writer task that pipelines them (one round trip per batch); when Redis cannot keep up or
//! is away, hops are dropped and counted rather than slowing calls down.

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use agentmesh_core::{
    MeshError,
    journal::{HopStream, JournalConfig, TraceJournal, sorted},
};
use agentmesh_proto::v1::Hop;
use futures::StreamExt;
use prost::Message;
use redis::{
    Value,
    streams::{StreamRangeReply, StreamReadOptions, StreamReadReply},
};
use tokio::sync::mpsc;

use crate::store::RedisStore;

/// Hops waiting for the writer at most; beyond that they are dropped.
const QUEUED_HOPS: usize = 8192;
/// Hops the writer sends in one pipeline at most.
const WRITE_BATCH: usize = 512;

/// The trace journal in Redis.
#[derive(Debug, Clone)]
pub struct RedisJournal {
    store: RedisStore,
    config: JournalConfig,
    queued: mpsc::Sender<Hop>,
    dropped: Arc<AtomicU64>,
}

impl RedisJournal {
    /// A journal in `store`, bounded by `config` (per correlation id: its hop count and
    /// age; the total is bounded by the age). Starts its writer task.
    pub fn new(store: RedisStore, config: JournalConfig) -> Self {
        let (queued, hops) = mpsc::channel(QUEUED_HOPS);
        let journal = Self {
            store,
            config,
            queued,
            dropped: Arc::default(),
        };
        tokio::spawn(journal.clone().write(hops));
        journal
    }

    /// Hops dropped because Redis could not take them in time.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    async fn write(self, mut hops: mpsc::Receiver<Hop>) {
        let mut batch = Vec::with_capacity(WRITE_BATCH);
        let ttl = self.config.max_age.as_millis().max(1) as u64;
        let cap = self.config.max_hops_per_trace.max(1);
        while hops.recv_many(&mut batch, WRITE_BATCH).await > 0 {
            let mut pipe = redis::pipe();
            let mut keys = HashSet::new();
            let lost = batch.len();
            for hop in batch.drain(..) {
                let key = self.store.keys().trace(&hop.correlation_id);
                pipe.cmd("XADD")
                    .arg(&key)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(cap)
                    .arg("*")
                    .arg("h")
                    .arg(hop.encode_to_vec())
                    .ignore();
                keys.insert(key);
            }
            for key in keys {
                pipe.cmd("PEXPIRE").arg(key).arg(ttl).ignore();
            }
            let mut connection = self.store.connection();
            if let Err(error) = pipe.query_async::<()>(&mut connection).await {
                self.dropped.fetch_add(lost as u64, Ordering::Relaxed);
                tracing::warn!(%error, lost, "could not write trace hops to the shared store");
            }
        }
    }
}

fn decode(fields: &std::collections::HashMap<String, Value>) -> Option<Hop> {
    match fields.get("h")? {
        Value::BulkString(bytes) => Hop::decode(bytes.as_slice()).ok(),
        _ => None,
    }
}

#[tonic::async_trait]
impl TraceJournal for RedisJournal {
    fn enabled(&self) -> bool {
        true
    }

    fn record(&self, mut hop: Hop) {
        if hop.correlation_id.is_empty() {
            return;
        }
        if hop.node.is_empty() {
            hop.node = self.store.node_id().to_owned();
        }
        if self.queued.try_send(hop).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    async fn hops(&self, correlation_id: &str) -> Result<Vec<Hop>, MeshError> {
        let mut connection = self.store.connection();
        let range: StreamRangeReply = redis::cmd("XRANGE")
            .arg(self.store.keys().trace(correlation_id))
            .arg("-")
            .arg("+")
            .query_async(&mut connection)
            .await
            .map_err(|e| self.store.unavailable("reading a trace", &e))?;
        Ok(sorted(
            range.ids.iter().filter_map(|e| decode(&e.map)).collect(),
        ))
    }

    async fn follow(&self, correlation_id: &str) -> Result<HopStream, MeshError> {
        let key = self.store.keys().trace(correlation_id);
        let mut connection = self.store.connection();
        let range: StreamRangeReply = redis::cmd("XRANGE")
            .arg(&key)
            .arg("-")
            .arg("+")
            .query_async(&mut connection)
            .await
            .map_err(|e| self.store.unavailable("reading a trace", &e))?;
        let last = range
            .ids
            .last()
            .map_or_else(|| "0-0".to_owned(), |e| e.id.clone());
        let recorded: Vec<Hop> = range.ids.iter().filter_map(|e| decode(&e.map)).collect();
        let blocking = self
            .store
            .dedicated()
            .await
            .map_err(|e| self.store.unavailable("following a trace", &e))?;
        let store = self.store.clone();
        // Each turn blocks up to a few seconds, so a follower whose caller left is noticed.
        let live =
            futures::stream::unfold((blocking, last, key), move |(mut blocking, last, key)| {
                let store = store.clone();
                async move {
                    loop {
                        let options = StreamReadOptions::default().block(5_000).count(256);
                        let read: Result<Option<StreamReadReply>, _> =
                            redis::AsyncCommands::xread_options(
                                &mut blocking,
                                &[&key],
                                &[&last],
                                &options,
                            )
                            .await;
                        match read {
                            Err(e) => {
                                let error = store.unavailable("following a trace", &e);
                                return Some((vec![Err(error)], (blocking, last, key)));
                            }
                            Ok(None) => continue,
                            Ok(Some(reply)) => {
                                let entries: Vec<_> =
                                    reply.keys.into_iter().flat_map(|k| k.ids).collect();
                                let Some(newest) = entries.last().map(|e| e.id.clone()) else {
                                    continue;
                                };
                                let hops = entries
                                    .iter()
                                    .filter_map(|e| decode(&e.map))
                                    .map(Ok)
                                    .collect();
                                return Some((hops, (blocking, newest, key)));
                            }
                        }
                    }
                }
            })
            .flat_map(futures::stream::iter);
        Ok(futures::stream::iter(recorded.into_iter().map(Ok))
            .chain(live)
            .boxed())
    }
}
