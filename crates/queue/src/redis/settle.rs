//! Settling deliveries by receipt: ack (many in one function call, results stored and
//! forwarded), nack (retry or dead letter), extend, and release (also on drop, synchronously).

use super::keys::Receipt;
use super::library::Function;
use super::reply::{self, BadReply, ms_to_time};
use super::{Store, ms, positive_ms};
use crate::{MAX_BODY_BYTES, NackOutcome, QueueError};
use ::redis::{Cmd, Value};
use agentmesh_resilience::full_jitter_delay;
use bytes::Bytes;
use std::collections::HashMap;
use std::time::{Duration, SystemTime};

/// Most leases one release call hands back.
const RELEASE_CHUNK: usize = 1000;

fn lease_lost(receipt: &str) -> QueueError {
    QueueError::LeaseLost(format!(
        "receipt {receipt} is no longer valid: its lease lapsed or it was already settled"
    ))
}

impl Store {
    pub(super) async fn ack_many(
        &self,
        acks: Vec<(String, Option<Bytes>)>,
    ) -> Result<Vec<Result<(), QueueError>>, QueueError> {
        let mut outcomes: Vec<Option<Result<(), QueueError>>> = Vec::with_capacity(acks.len());
        // Acks of one lease (queue and token) travel as one group: see `lua/ack.lua`.
        let mut groups: Vec<AckGroup<'_>> = Vec::new();
        let mut group_of: HashMap<(&str, &str), usize> = HashMap::new();
        for (i, (receipt, result)) in acks.iter().enumerate() {
            let r = match Receipt::parse(receipt) {
                Ok(r) => r,
                Err(e) => {
                    outcomes.push(Some(Err(e)));
                    continue;
                }
            };
            if let Some(body) = result.as_ref().filter(|b| b.len() > MAX_BODY_BYTES) {
                outcomes.push(Some(Err(QueueError::InvalidArgument(format!(
                    "result is {} bytes, the limit is {MAX_BODY_BYTES}",
                    body.len()
                )))));
                continue;
            }
            outcomes.push(None);
            let at = *group_of.entry((r.queue, r.token)).or_insert_with(|| {
                groups.push(AckGroup {
                    queue: r.queue,
                    token: r.token,
                    first: r.entry,
                    last: r.entry,
                    acks: Vec::new(),
                });
                groups.len() - 1
            });
            let g = &mut groups[at];
            if stream_id_key(r.entry) < stream_id_key(g.first) {
                g.first = r.entry;
            }
            if stream_id_key(r.entry) > stream_id_key(g.last) {
                g.last = r.entry;
            }
            g.acks.push((i, r.entry, result.as_ref()));
        }
        if !groups.is_empty() {
            let mut cmd = self.lib.call(Function::Ack, self.keys.prefix());
            for g in &groups {
                cmd.arg(g.queue)
                    .arg(g.token)
                    .arg(g.first)
                    .arg(g.last)
                    .arg(g.acks.len());
                for (_, entry, _) in &g.acks {
                    cmd.arg(*entry);
                }
                let with_result = g.acks.iter().filter(|(_, _, r)| r.is_some()).count();
                cmd.arg(with_result);
                if with_result > 0 {
                    let ttl = ms(self.config.for_queue(g.queue).result_ttl).max(1);
                    for (j, (_, _, result)) in g.acks.iter().enumerate() {
                        if let Some(body) = result {
                            // The reply message's id, used only if the message has a reply_to.
                            cmd.arg(j + 1)
                                .arg(&body[..])
                                .arg(ttl)
                                .arg(uuid::Uuid::now_v7().to_string());
                        }
                    }
                }
            }
            let mut con = self.conns.shared();
            let reply = self
                .lib
                .run(&mut con, &cmd)
                .await
                .map_err(|e| self.conns.error("ack", &e))?;
            let acked = read_ints(reply).map_err(|e| self.conns.bad_reply("ack", e))?;
            let sent: Vec<usize> = groups
                .iter()
                .flat_map(|g| g.acks.iter().map(|(i, _, _)| *i))
                .collect();
            if acked.len() != sent.len() {
                return Err(self.conns.bad_reply(
                    "ack",
                    format!("{} outcomes for {} acks", acked.len(), sent.len()),
                ));
            }
            let mut at = 0;
            for g in &groups {
                let n = g.acks.len();
                let ok = acked[at..at + n].iter().filter(|&&ok| ok == 1).count();
                self.held.settled(g.token, ok);
                at += n;
            }
            for (&i, ok) in sent.iter().zip(acked) {
                outcomes[i] = Some(if ok == 1 {
                    Ok(())
                } else {
                    Err(lease_lost(&acks[i].0))
                });
            }
        }
        Ok(outcomes.into_iter().flatten().collect())
    }

    pub(super) async fn nack(
        &self,
        receipt: &str,
        error: &str,
        delay: Option<Duration>,
    ) -> Result<NackOutcome, QueueError> {
        let r = Receipt::parse(receipt)?;
        let cfg = self.config.for_queue(r.queue);
        // `r.attempt` is the attempt that failed: the first retry is retry 0.
        let delay = delay.unwrap_or_else(|| {
            full_jitter_delay(
                cfg.backoff_base,
                cfg.backoff_max,
                r.attempt.saturating_sub(1),
            )
        });
        let mut cmd = self.lib.call(Function::Nack, self.keys.prefix());
        cmd.arg(r.queue)
            .arg(r.entry)
            .arg(r.token)
            .arg(error)
            .arg(ms(delay))
            .arg(cfg.max_attempts);
        let mut con = self.conns.shared();
        let reply = self
            .lib
            .run(&mut con, &cmd)
            .await
            .map_err(|e| self.conns.error("nack", &e))?;
        let outcome = read_ints(reply).map_err(|e| self.conns.bad_reply("nack", e))?;
        if outcome.first().is_some_and(|&o| o != 0) {
            self.held.settled(r.token, 1);
        }
        match outcome.as_slice() {
            [0] => Err(lease_lost(receipt)),
            [1, at] => Ok(NackOutcome::Retry {
                at: ms_to_time(*at as u64),
            }),
            [2] => Ok(NackOutcome::DeadLettered),
            other => Err(self.conns.bad_reply("nack", format!("{other:?}"))),
        }
    }

    pub(super) async fn extend(
        &self,
        receipt: &str,
        lease: Duration,
    ) -> Result<SystemTime, QueueError> {
        let lease_ms = positive_ms("lease", lease)?;
        let r = Receipt::parse(receipt)?;
        let mut cmd = self.lib.call(Function::Extend, self.keys.prefix());
        cmd.arg(r.queue).arg(r.entry).arg(r.token).arg(lease_ms);
        let mut con = self.conns.shared();
        let reply = self
            .lib
            .run(&mut con, &cmd)
            .await
            .map_err(|e| self.conns.error("extend", &e))?;
        let expires = reply::string(reply).map_err(|e| self.conns.bad_reply("extend", e))?;
        if expires.is_empty() {
            return Err(lease_lost(receipt));
        }
        let expires_ms: u64 = expires
            .parse()
            .map_err(|e| self.conns.bad_reply("extend", e))?;
        self.held.extend(r.token, expires_ms);
        Ok(ms_to_time(expires_ms))
    }

    pub(super) async fn release(&self, receipts: &[String]) -> Result<u64, QueueError> {
        let mut released = 0;
        for cmd in self.release_calls(receipts) {
            let mut con = self.conns.shared();
            let reply = self
                .lib
                .run(&mut con, &cmd)
                .await
                .map_err(|e| self.conns.error("release", &e))?;
            released += reply::int(reply).map_err(|e| self.conns.bad_reply("release", e))? as u64;
        }
        // The call counts what it released, not which: only when that is every receipt is
        // each known to be settled (otherwise their leases are pruned after their expiry).
        if released as usize == receipts.len() {
            for r in receipts.iter().filter_map(|r| Receipt::parse(r).ok()) {
                self.held.settled(r.token, 1);
            }
        }
        Ok(released)
    }

    /// [`Store::release`] on a synchronous connection of its own, for `Drop`.
    pub(super) fn release_blocking(&self, receipts: &[String]) -> Result<u64, QueueError> {
        let mut released = 0;
        let calls = self.release_calls(receipts);
        if calls.is_empty() {
            return Ok(0);
        }
        let mut con = self
            .conns
            .sync()
            .map_err(|e| self.conns.error("release on drop (connecting)", &e))?;
        for cmd in calls {
            let reply = self
                .lib
                .run_sync(&mut con, &cmd)
                .map_err(|e| self.conns.error("release on drop", &e))?;
            released += reply::int(reply).map_err(|e| self.conns.bad_reply("release", e))? as u64;
        }
        Ok(released)
    }

    /// The release calls for `receipts`; malformed ones are skipped (nothing to hand back).
    fn release_calls(&self, receipts: &[String]) -> Vec<Cmd> {
        let valid: Vec<Receipt<'_>> = receipts
            .iter()
            .filter_map(|r| Receipt::parse(r).ok())
            .collect();
        valid
            .chunks(RELEASE_CHUNK)
            .map(|chunk| {
                let mut cmd = self.lib.call(Function::Release, self.keys.prefix());
                for r in chunk {
                    cmd.arg(r.queue).arg(r.entry).arg(r.token);
                }
                cmd
            })
            .collect()
    }
}

/// The acks of one lease in one ack call.
struct AckGroup<'a> {
    queue: &'a str,
    token: &'a str,
    /// The span of the entries, for the one `XPENDING` that checks them.
    first: &'a str,
    last: &'a str,
    /// Index in the call, entry id, result.
    acks: Vec<(usize, &'a str, Option<&'a Bytes>)>,
}

/// A stream id as a pair that sorts as Redis sorts ids (receipts were checked to hold one).
fn stream_id_key(id: &str) -> (u64, u64) {
    id.split_once('-')
        .and_then(|(ms, seq)| Some((ms.parse().ok()?, seq.parse().ok()?)))
        .unwrap_or_default()
}

fn read_ints(reply: Value) -> Result<Vec<i64>, BadReply> {
    reply::array(reply)?.into_iter().map(reply::int).collect()
}
