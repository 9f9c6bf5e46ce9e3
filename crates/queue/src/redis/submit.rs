//! Submit: a batch without idempotency keys is a `MULTI` of plain `XADD`s (after a function that
//! creates the queue if it is new), the cheapest append Redis has; a batch with keys is one
//! function call that suppresses duplicates in the same step, followed by `WAIT` in the same
//! round trip when the durability asks for replicas (every batch takes that path then).

use super::library::{Function, is_missing_function, is_missing_function_reply};
use super::reply::{self, BadReply};
use super::{RedisDurability, Store, ms};
use crate::{NewMessage, QueueError, SubmitFate, validate_queue_name};
use ::redis::Value;

impl Store {
    pub(super) async fn submit(
        &self,
        queue: &str,
        messages: Vec<NewMessage>,
    ) -> Result<Vec<SubmitFate>, QueueError> {
        validate_queue_name(queue)?;
        let window = ms(self.config.for_queue(queue).dedup_window).max(1);
        let mut cmd = self.lib.call(Function::Submit, self.keys.prefix());
        cmd.arg(queue).arg(window);
        let mut fates: Vec<Option<SubmitFate>> = Vec::with_capacity(messages.len());
        let mut sent = 0usize;
        for m in &messages {
            if let Some(reason) = m.reject_reason() {
                fates.push(Some(SubmitFate::Rejected { reason }));
                continue;
            }
            fates.push(None);
            sent += 1;
            cmd.arg(&m.id)
                .arg(if m.idempotency_key.is_some() {
                    "1"
                } else {
                    "0"
                })
                .arg(m.idempotency_key.as_deref().unwrap_or(""))
                .arg(&m.correlation_id)
                .arg(m.reply_to.as_deref().unwrap_or(""))
                .arg(&m.body[..]);
        }
        if sent == 0 {
            return Ok(fates.into_iter().flatten().collect());
        }
        let keyless = messages.iter().all(|m| m.idempotency_key.is_none());
        if keyless && self.options.durability == RedisDurability::Primary {
            return self.append_plain(queue, messages, fates, sent).await;
        }
        let reply = match self.options.durability {
            RedisDurability::Primary => {
                let mut con = self.conns.shared();
                self.lib
                    .run(&mut con, &cmd)
                    .await
                    .map_err(|e| self.conns.error("submit", &e))?
            }
            RedisDurability::Wait { replicas, timeout } => {
                self.submit_and_wait(&cmd, replicas, timeout).await?
            }
        };
        let appended = read_fates(reply).map_err(|e| self.conns.bad_reply("submit", e))?;
        if appended.len() != sent {
            return Err(self.conns.bad_reply(
                "submit",
                format!("{} fates for {sent} messages", appended.len()),
            ));
        }
        let mut appended = appended.into_iter();
        Ok(fates
            .into_iter()
            .zip(&messages)
            .map(|(fate, m)| {
                fate.unwrap_or_else(|| match appended.next() {
                    Some(Appended::Yes) => SubmitFate::Accepted { id: m.id.clone() },
                    Some(Appended::Duplicate(id)) => SubmitFate::Duplicate { id },
                    None => unreachable!("counted above"),
                })
            })
            .collect())
    }

    /// Appends a batch without idempotency keys: `MULTI`, the `ensure` function, one `XADD` per
    /// message (the fields the Lua `append` writes), `EXEC`.
    async fn append_plain(
        &self,
        queue: &str,
        messages: Vec<NewMessage>,
        fates: Vec<Option<SubmitFate>>,
        sent: usize,
    ) -> Result<Vec<SubmitFate>, QueueError> {
        let stream = self.keys.stream(queue);
        let mut ensure = self.lib.call(Function::Ensure, self.keys.prefix());
        ensure.arg(queue);
        let mut pipe = ::redis::pipe();
        pipe.atomic().ignore_errors().add_command(ensure.clone());
        for (m, fate) in messages.iter().zip(&fates) {
            if fate.is_some() {
                continue;
            }
            let xadd = pipe
                .cmd("XADD")
                .arg(&stream)
                .arg("*")
                .arg("m")
                .arg(&m.id)
                .arg("c")
                .arg(&m.correlation_id)
                .arg("b")
                .arg(&m.body[..]);
            if let Some(r) = &m.reply_to {
                xadd.arg("r").arg(r);
            }
        }
        let mut con = self.conns.shared();
        let replies: Vec<Value> = pipe
            .query_async(&mut con)
            .await
            .map_err(|e| self.conns.error("submit", &e))?;
        if replies.first().is_some_and(is_missing_function_reply) {
            // The appends went through; the queue's group may be missing: create it now.
            self.lib
                .load(&mut con)
                .await
                .map_err(|e| self.conns.error("submit (loading functions)", &e))?;
            self.lib
                .run(&mut con, &ensure)
                .await
                .map_err(|e| self.conns.error("submit", &e))?;
        }
        let appended = replies.len().saturating_sub(1);
        if let Some(Value::ServerError(e)) = replies
            .iter()
            .skip(1)
            .find(|v| matches!(v, Value::ServerError(_)))
        {
            return Err(self
                .conns
                .bad_reply("submit", format!("an append failed: {e:?}")));
        }
        if appended != sent {
            return Err(self
                .conns
                .bad_reply("submit", format!("{appended} appends for {sent} messages")));
        }
        Ok(fates
            .into_iter()
            .zip(messages)
            .map(|(fate, m)| fate.unwrap_or(SubmitFate::Accepted { id: m.id }))
            .collect())
    }

    /// The submit function and `WAIT replicas timeout` pipelined on a dedicated connection: `WAIT`
    /// blocks its connection, and it must follow the writes on the same connection.
    async fn submit_and_wait(
        &self,
        cmd: &::redis::Cmd,
        replicas: u32,
        timeout: std::time::Duration,
    ) -> Result<Value, QueueError> {
        let lib = &self.lib;
        let (reply, acked): (Value, i64) = self
            .conns
            .on_dedicated("submit (with WAIT)", timeout, false, |mut con| async move {
                let mut pipe = ::redis::pipe();
                pipe.add_command(cmd.clone())
                    .cmd("WAIT")
                    .arg(replicas)
                    .arg(ms(timeout));
                match pipe.query_async(&mut con).await {
                    Err(e) if is_missing_function(&e) => {
                        let _: String = lib.load_cmd().query_async(&mut con).await?;
                        pipe.query_async(&mut con).await
                    }
                    other => other,
                }
            })
            .await?;
        if acked < i64::from(replicas) {
            return Err(QueueError::Storage(format!(
                "redis at {}: only {acked} of {replicas} replicas acknowledged the batch within \
                 {timeout:?} (WAIT); it was appended and may be delivered: resend it with \
                 idempotency keys",
                self.conns.server()
            )));
        }
        Ok(reply)
    }
}

enum Appended {
    Yes,
    Duplicate(String),
}

fn read_fates(reply: Value) -> Result<Vec<Appended>, BadReply> {
    let mut items = reply::array(reply)?.into_iter();
    let mut out = Vec::new();
    while let Some(kind) = items.next() {
        let kind = reply::bytes(kind)?;
        let value = reply::next(&mut items, "a fate's id")?;
        out.push(match kind.as_slice() {
            b"a" => Appended::Yes,
            b"d" => Appended::Duplicate(reply::string(value)?),
            other => return Err(BadReply(format!("unknown fate {other:?}"))),
        });
    }
    Ok(out)
}
