//! Submit: one function call appends the batch (duplicates by idempotency key suppressed in the same
//! step), followed by `WAIT` in the same round trip when the durability asks for replicas.

use super::library::{Function, is_missing_function};
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
