//! Dead letters: listed a page at a time (`XRANGE` on the dead-letter stream, the page token
//! is the last entry id), redriven or purged by a function, all or by message id.

use super::Store;
use super::keys::{is_stream_id, stream_id_ms};
use super::library::Function;
use super::reply::{self, BadReply, Fields, ms_to_time, parse_history};
use crate::{AttemptRecord, DeadLetter, QueueError, Selection, validate_queue_name};
use ::redis::Value;

/// Most dead letters one redrive or purge call moves.
const MOVE_CHUNK: usize = 500;

fn unknown_queue(queue: &str) -> QueueError {
    QueueError::NotFound(format!("queue {queue:?} does not exist"))
}

impl Store {
    pub(super) async fn list_dead_letters(
        &self,
        queue: &str,
        page_size: usize,
        after: Option<&str>,
    ) -> Result<(Vec<DeadLetter>, Option<String>), QueueError> {
        validate_queue_name(queue)?;
        let page_size = page_size.clamp(1, 1000);
        let start = match after {
            None => "-".to_owned(),
            Some(token) if is_stream_id(token) => format!("({token}"),
            Some(token) => {
                return Err(QueueError::InvalidArgument(format!(
                    "malformed page token {token:?}"
                )));
            }
        };
        let mut con = self.conns.shared();
        let (known, entries): (bool, Value) = ::redis::pipe()
            .cmd("SISMEMBER")
            .arg(self.keys.queues())
            .arg(queue)
            .cmd("XRANGE")
            .arg(self.keys.dead_letters(queue))
            .arg(start)
            .arg("+")
            .arg("COUNT")
            .arg(page_size + 1)
            .query_async(&mut con)
            .await
            .map_err(|e| self.conns.error("list dead letters", &e))?;
        if !known {
            return Err(unknown_queue(queue));
        }
        let mut page =
            read_dead_letters(entries).map_err(|e| self.conns.bad_reply("list dead letters", e))?;
        let next = if page.len() > page_size {
            page.truncate(page_size);
            page.last().map(|(id, _)| id.clone())
        } else {
            None
        };
        Ok((page.into_iter().map(|(_, d)| d).collect(), next))
    }

    /// Redrives (`redrive`) or purges the selected dead letters of `queue`; returns how many.
    pub(super) async fn redrive_or_purge(
        &self,
        queue: &str,
        selection: Selection,
        redrive: bool,
    ) -> Result<u64, QueueError> {
        validate_queue_name(queue)?;
        let op = if redrive { "redrive" } else { "purge" };
        let mut con = self.conns.shared();
        let mut moved = 0u64;
        let mut run = async |ids: &[String]| -> Result<(i64, bool), QueueError> {
            let mut cmd = self.lib.call(Function::DeadLetters, self.keys.prefix());
            cmd.arg(queue).arg(op).arg(MOVE_CHUNK).arg(ids);
            let reply = self
                .lib
                .run(&mut con, &cmd)
                .await
                .map_err(|e| self.conns.error(op, &e))?;
            let counts: Vec<i64> = reply::array(reply)
                .and_then(|items| items.into_iter().map(reply::int).collect())
                .map_err(|e| self.conns.bad_reply(op, e))?;
            match counts.as_slice() {
                [-1, _] => Err(unknown_queue(queue)),
                &[n, more] => Ok((n, more == 1)),
                other => Err(self.conns.bad_reply(op, format!("{other:?}"))),
            }
        };
        match selection {
            Selection::All => loop {
                let (n, more) = run(&[]).await?;
                moved += n as u64;
                if !more {
                    break;
                }
            },
            Selection::Ids(ids) if ids.is_empty() => {
                let known: bool = ::redis::cmd("SISMEMBER")
                    .arg(self.keys.queues())
                    .arg(queue)
                    .query_async(&mut self.conns.shared())
                    .await
                    .map_err(|e| self.conns.error(op, &e))?;
                if !known {
                    return Err(unknown_queue(queue));
                }
            }
            Selection::Ids(ids) => {
                for chunk in ids.chunks(MOVE_CHUNK) {
                    moved += run(chunk).await?.0 as u64;
                }
            }
        }
        Ok(moved)
    }
}

/// `XRANGE` entries of a dead-letter stream: `(entry id, dead letter)`.
fn read_dead_letters(entries: Value) -> Result<Vec<(String, DeadLetter)>, BadReply> {
    let mut out = Vec::new();
    for entry in reply::array(entries)? {
        let mut parts = reply::array(entry)?.into_iter();
        let id = reply::string(reply::next(&mut parts, "an entry id")?)?;
        let f = Fields::parse(reply::next(&mut parts, "an entry's fields")?)?;
        let dead_ms = stream_id_ms(&id).ok_or_else(|| BadReply(format!("bad entry id {id}")))?;
        let attempts = parse_history(&f.history)?
            .into_iter()
            .map(|a| AttemptRecord {
                attempt: a.attempt,
                delivered_at: ms_to_time(a.delivered_ms),
                consumer_id: a.consumer_id,
                error: a.error,
            })
            .collect();
        out.push((
            id,
            DeadLetter {
                message_id: f.id,
                correlation_id: f.correlation_id,
                reply_to: f.reply_to,
                body: f.body,
                enqueued_at: ms_to_time(f.enqueued_ms.unwrap_or(dead_ms)),
                dead_lettered_at: ms_to_time(dead_ms),
                last_error: f.last_error,
                attempts,
            },
        ));
    }
    Ok(out)
}
