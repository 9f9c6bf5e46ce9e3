//! Idempotency keys in Redis: a duplicate call through any node gets the first call's reply.
//!
//! **What is kept where.** One Redis string per key (see [`scripts`] for its values).
//! `claim` takes the key with `SET NX PX` — a pending marker naming the leader (a token
//! and the node id), which lapses after the lead timeout unless the leader keeps it alive
//! (it does, every third of the timeout, for as long as its call runs). A success is
//! stored encoded with the window as its TTL; a failure or a dropped lead deletes the
//! marker, so the next duplicate leads. Nothing about keys is kept on the node besides
//! the duplicates waiting in it: Redis's memory is the only bound (set `maxmemory` with
//! a `volatile-*` policy if the window holds more than it should).
//!
//! **Waiting.** A duplicate that finds the key pending marks it as waited on and waits for
//! a wake-up: settling a waited-on key publishes the key and its leader on the wakes
//! channel, which every node follows. Should a wake-up be missed (the channel was
//! reconnecting, or the leader's node died and its marker lapsed), a waiter also looks
//! again after the poll interval — a bounded poll, never a busy loop.
//!
//! **When Redis is away.** `claim` fails with `UNAVAILABLE` naming the store; the caller
//! may retry. A leader that cannot record its outcome leaves the marker to lapse.

mod scripts;

use std::{collections::HashMap, sync::Arc, time::Duration};

use agentmesh_core::idempotency::{Claim, IdempotencyStore, Lead};
use agentmesh_proto::v1::Envelope;
use parking_lot::Mutex;
use prost::Message;
use redis::RedisError;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};

use crate::{
    follow::{Follower, Next, follow},
    store::RedisStore,
};

/// How long replies are remembered and how leads are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyOptions {
    /// How long a success is remembered (the reply's TTL in Redis).
    pub window: Duration,
    /// How long a lead lasts without its leader renewing it: how long duplicates wait for
    /// a node that died mid-call.
    pub lead_timeout: Duration,
    /// How often a waiting duplicate looks at the key again in case a wake-up was missed.
    pub poll: Duration,
}

impl Default for IdempotencyOptions {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(600),
            lead_timeout: Duration::from_secs(10),
            poll: Duration::from_secs(1),
        }
    }
}

/// Replies remembered by idempotency key in Redis, shared by every node on it.
#[derive(Debug)]
pub struct RedisIdempotency {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    store: RedisStore,
    channel: String,
    options: IdempotencyOptions,
    /// Duplicates waiting in this node, by idempotency key.
    waiters: Mutex<HashMap<String, watch::Sender<Option<Wake>>>>,
    /// Ends the wakes subscription and the leads' keep-alives when the store is dropped.
    cancel: CancellationToken,
}

impl Drop for RedisIdempotency {
    fn drop(&mut self) {
        self.shared.cancel.cancel();
    }
}

impl RedisIdempotency {
    /// Follows the wakes channel of `store`; `Unavailable` if Redis cannot be reached now.
    pub async fn connect(
        store: &RedisStore,
        options: IdempotencyOptions,
    ) -> Result<Self, agentmesh_core::MeshError> {
        let shared = Arc::new(Shared {
            store: store.clone(),
            channel: store.keys().idempotency_wakes(),
            options,
            waiters: Mutex::default(),
            cancel: CancellationToken::new(),
        });
        follow(
            store.clone(),
            shared.channel.clone(),
            Arc::clone(&shared),
            shared.cancel.clone(),
        )
        .await?;
        Ok(Self { shared })
    }
}

#[tonic::async_trait]
impl IdempotencyStore for RedisIdempotency {
    async fn claim(self: Arc<Self>, key: String) -> Result<Claim, Status> {
        let shared = &self.shared;
        let redis_key = shared.store.keys().idempotency(&key);
        loop {
            let token = uuid::Uuid::now_v7().simple().to_string();
            let previous: Option<Vec<u8>> = redis::cmd("SET")
                .arg(&redis_key)
                .arg(format!("p {token} {}", shared.store.node_id()))
                .arg("NX")
                .arg("PX")
                .arg(millis(shared.options.lead_timeout))
                .arg("GET")
                .query_async(&mut shared.store.connection())
                .await
                .map_err(|error| shared.unavailable("claiming an idempotency key", &error))?;
            let Some(previous) = previous else {
                return Ok(Claim::Lead(Box::new(RedisLead::new(
                    Arc::clone(shared),
                    key,
                    redis_key,
                    token,
                ))));
            };
            match Value::of(&previous)? {
                Value::Done(reply) => return Ok(Claim::Replay(reply)),
                Value::Pending => match shared.wait(&key, &redis_key).await? {
                    Waited::Replay(reply) => return Ok(Claim::Replay(reply)),
                    Waited::Vacant => continue,
                },
            }
        }
    }
}

/// A key's value, read.
enum Value {
    Pending,
    Done(Box<Envelope>),
}

impl Value {
    fn of(bytes: &[u8]) -> Result<Self, Status> {
        match bytes {
            [b'd', reply @ ..] => Envelope::decode(reply)
                .map(|reply| Value::Done(Box::new(reply)))
                .map_err(|error| {
                    Status::internal(format!(
                        "the reply remembered for this idempotency key is unreadable: {error}"
                    ))
                }),
            [b'p' | b'P', b' ', ..] => Ok(Value::Pending),
            _ => Err(Status::internal(
                "the idempotency key holds a value this node cannot read",
            )),
        }
    }

    /// The leader token of a pending value.
    fn leader(bytes: &[u8]) -> Option<&[u8]> {
        bytes.get(2..)?.split(|byte| *byte == b' ').next()
    }
}

/// How a wait ended.
enum Waited {
    Replay(Box<Envelope>),
    /// The key is free: try to lead.
    Vacant,
}

/// A key settled while a duplicate waited on it: `<kind> <leader> <key length> <key>…`,
/// kind `d` (a reply is stored), `r` (released: lead again), or `f` (failed), followed by
/// `<code> <message>`.
#[derive(Debug, Clone, PartialEq)]
struct Wake {
    leader: String,
    settled: Settled,
}

#[derive(Debug, Clone, PartialEq)]
enum Settled {
    Done,
    Released,
    Failed(Code, String),
}

impl Wake {
    fn encode(&self, key: &str) -> Vec<u8> {
        let kind = match self.settled {
            Settled::Done => 'd',
            Settled::Released => 'r',
            Settled::Failed(..) => 'f',
        };
        let mut bytes = format!("{kind} {} {} {key}", self.leader, key.len()).into_bytes();
        if let Settled::Failed(code, message) = &self.settled {
            bytes.extend(format!("{} {message}", *code as i32).into_bytes());
        }
        bytes
    }

    fn decode(bytes: &[u8]) -> Option<(String, Self)> {
        let text = std::str::from_utf8(bytes).ok()?;
        let mut fields = text.splitn(4, ' ');
        let (kind, leader, length, rest) = (
            fields.next()?,
            fields.next()?,
            fields.next()?,
            fields.next()?,
        );
        let length: usize = length.parse().ok()?;
        let (key, rest) = (rest.get(..length)?, rest.get(length..)?);
        let settled = match kind {
            "d" => Settled::Done,
            "r" => Settled::Released,
            "f" => {
                let (code, message) = rest.split_once(' ')?;
                Settled::Failed(Code::from(code.parse::<i32>().ok()?), message.to_owned())
            }
            _ => return None,
        };
        let wake = Wake {
            leader: leader.to_owned(),
            settled,
        };
        Some((key.to_owned(), wake))
    }
}

impl Shared {
    fn unavailable(&self, doing: &str, error: &RedisError) -> Status {
        self.store.unavailable(doing, error).into()
    }

    /// Waits until the pending key settles (or frees up); the leader's failure is returned
    /// as this call's error, as for duplicates waiting in one process.
    async fn wait(&self, key: &str, redis_key: &str) -> Result<Waited, Status> {
        let mut listener = self.listen(key);
        loop {
            listener.receiver.borrow_and_update();
            let value: Option<Vec<u8>> = scripts::WAIT
                .key(redis_key)
                .invoke_async(&mut self.store.connection())
                .await
                .map_err(|error| self.unavailable("waiting on an idempotency key", &error))?;
            let Some(value) = value else {
                return Ok(Waited::Vacant);
            };
            if let Value::Done(reply) = Value::of(&value)? {
                return Ok(Waited::Replay(reply));
            }
            let leader = Value::leader(&value).unwrap_or_default().to_vec();
            tokio::select! {
                _ = listener.receiver.changed() => {}
                _ = tokio::time::sleep(self.options.poll) => continue,
            }
            let wake = listener.receiver.borrow_and_update().clone();
            if let Some(Wake {
                leader: woke,
                settled: Settled::Failed(code, message),
            }) = wake
            {
                if woke.as_bytes() == leader {
                    return Err(Status::new(code, message));
                }
            }
            // Settled (a reply, or free to lead) or another leader's news: look again.
        }
    }

    fn listen(&self, key: &str) -> Listener<'_> {
        let receiver = self
            .waiters
            .lock()
            .entry(key.to_owned())
            .or_insert_with(|| watch::channel(None).0)
            .subscribe();
        Listener {
            shared: self,
            key: key.to_owned(),
            receiver,
        }
    }

    /// Runs a settling script in the background (a lead settles from sync code).
    fn settle(self: &Arc<Self>, key: &str, token: &str, settled: Settled, reply: Option<Vec<u8>>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!("an idempotency lead settled outside a runtime; its marker will lapse");
            return;
        };
        let shared = Arc::clone(self);
        let redis_key = self.store.keys().idempotency(key);
        let wake = Wake {
            leader: token.to_owned(),
            settled,
        }
        .encode(key);
        let token = token.to_owned();
        runtime.spawn(async move {
            let outcome: Result<i64, RedisError> = match reply {
                Some(reply) => {
                    scripts::COMPLETE
                        .key(&redis_key)
                        .arg(&token)
                        .arg(reply)
                        .arg(millis(shared.options.window))
                        .arg(&shared.channel)
                        .arg(wake)
                        .invoke_async(&mut shared.store.connection())
                        .await
                }
                None => {
                    scripts::RELEASE
                        .key(&redis_key)
                        .arg(&token)
                        .arg(&shared.channel)
                        .arg(wake)
                        .invoke_async(&mut shared.store.connection())
                        .await
                }
            };
            if let Err(error) = outcome {
                tracing::warn!(%error, "could not settle an idempotency key; its lead will lapse");
            }
        });
    }
}

/// One duplicate waiting in this node; leaves the waiters map with the last of its key.
struct Listener<'a> {
    shared: &'a Shared,
    key: String,
    receiver: watch::Receiver<Option<Wake>>,
}

impl Drop for Listener<'_> {
    fn drop(&mut self) {
        let mut waiters = self.shared.waiters.lock();
        // This listener's receiver is still alive here: one left means it was the last.
        if waiters
            .get(&self.key)
            .is_some_and(|sender| sender.receiver_count() <= 1)
        {
            waiters.remove(&self.key);
        }
    }
}

impl Follower for Shared {
    fn name(&self) -> &'static str {
        "idempotency wakes"
    }

    /// Wake-ups may have been missed while the channel was away: every waiter looks again.
    async fn reload(&self) -> Result<(), RedisError> {
        for sender in self.waiters.lock().values() {
            sender.send_replace(None);
        }
        Ok(())
    }

    fn message(&self, payload: &[u8]) -> Next {
        match Wake::decode(payload) {
            Some((key, wake)) => {
                if let Some(sender) = self.waiters.lock().get(&key) {
                    sender.send_replace(Some(wake));
                }
            }
            None => tracing::warn!("an unreadable message on the idempotency wakes channel"),
        }
        Next::Continue
    }
}

/// The lead on a key held in Redis: kept alive while the call runs, settled once.
#[derive(Debug)]
struct RedisLead {
    shared: Arc<Shared>,
    key: String,
    token: String,
    keep_alive: tokio::task::AbortHandle,
    settled: bool,
}

impl RedisLead {
    fn new(shared: Arc<Shared>, key: String, redis_key: String, token: String) -> Self {
        let keep_alive = tokio::spawn(keep_alive(
            Arc::clone(&shared),
            redis_key.clone(),
            token.clone(),
        ))
        .abort_handle();
        Self {
            shared,
            key,
            token,
            keep_alive,
            settled: false,
        }
    }

    fn settle(&mut self, settled: Settled, reply: Option<Vec<u8>>) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        self.keep_alive.abort();
        self.shared.settle(&self.key, &self.token, settled, reply);
    }
}

impl Lead for RedisLead {
    fn complete(mut self: Box<Self>, outcome: &Result<Envelope, Status>) {
        match outcome {
            Ok(reply) => {
                let mut bytes = vec![b'd'];
                reply.encode(&mut bytes).expect("a Vec grows as needed");
                self.settle(Settled::Done, Some(bytes));
            }
            Err(status) => self.settle(
                Settled::Failed(status.code(), status.message().to_owned()),
                None,
            ),
        }
    }
}

impl Drop for RedisLead {
    fn drop(&mut self) {
        // The leading call was cancelled: free the key so a duplicate can lead.
        self.settle(Settled::Released, None);
    }
}

/// Renews a lead every third of the lead timeout while it is held.
async fn keep_alive(shared: Arc<Shared>, redis_key: String, token: String) {
    let timeout = shared.options.lead_timeout;
    loop {
        tokio::select! {
            _ = shared.cancel.cancelled() => return,
            _ = tokio::time::sleep(timeout / 3) => {}
        }
        let held: Result<i64, RedisError> = scripts::KEEP
            .key(&redis_key)
            .arg(&token)
            .arg(millis(timeout))
            .invoke_async(&mut shared.store.connection())
            .await;
        match held {
            Ok(1) => {}
            Ok(_) => return,
            Err(error) => tracing::warn!(%error, "could not renew an idempotency lead"),
        }
    }
}

fn millis(duration: Duration) -> u64 {
    (duration.as_millis() as u64).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wakes_read_back_whatever_the_key_holds() {
        let key = "echo\u{0}order 7";
        for settled in [
            Settled::Done,
            Settled::Released,
            Settled::Failed(Code::Unavailable, "agent down: try again".into()),
        ] {
            let wake = Wake {
                leader: "0190abc".into(),
                settled,
            };
            assert_eq!(
                Wake::decode(&wake.encode(key)),
                Some((key.to_owned(), wake))
            );
        }
        assert_eq!(Wake::decode(b"x 1 1 k"), None);
        assert_eq!(Wake::decode(b"d 1 9 short"), None);
    }

    #[test]
    fn values_read_as_the_scripts_write_them() {
        assert!(matches!(Value::of(b"p 0190abc node-a"), Ok(Value::Pending)));
        assert_eq!(Value::leader(b"P 0190abc node-a"), Some(&b"0190abc"[..]));
        let mut done = vec![b'd'];
        Envelope {
            id: "r1".into(),
            ..Default::default()
        }
        .encode(&mut done)
        .unwrap();
        assert!(matches!(Value::of(&done), Ok(Value::Done(reply)) if reply.id == "r1"));
        assert!(Value::of(b"zzz").is_err());
    }
}
