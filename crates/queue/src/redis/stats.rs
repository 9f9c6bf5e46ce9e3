//! Per-queue statistics: the names from the queue set, then one function call per chunk of
//! queues that lapses their expired leases and counts.

use super::Store;
use super::library::Function;
use super::reply;
use crate::{QueueError, QueueStats};
use std::time::Duration;

/// Most queues one stats call covers.
const STATS_CHUNK: usize = 200;

impl Store {
    pub(super) async fn stats(&self) -> Result<Vec<QueueStats>, QueueError> {
        let mut con = self.conns.shared();
        let mut names: Vec<String> = ::redis::cmd("SMEMBERS")
            .arg(self.keys.queues())
            .query_async(&mut con)
            .await
            .map_err(|e| self.conns.error("stats", &e))?;
        names.sort();
        let mut out = Vec::with_capacity(names.len());
        for chunk in names.chunks(STATS_CHUNK) {
            let mut cmd = self.lib.call(Function::Stats, self.keys.prefix());
            for q in chunk {
                cmd.arg(q).arg(self.config.for_queue(q).max_attempts);
            }
            let reply = self
                .lib
                .run(&mut con, &cmd)
                .await
                .map_err(|e| self.conns.error("stats", &e))?;
            let counts: Vec<i64> = reply::array(reply)
                .and_then(|items| items.into_iter().map(reply::int).collect())
                .map_err(|e| self.conns.bad_reply("stats", e))?;
            if counts.len() != 4 * chunk.len() {
                return Err(self.conns.bad_reply(
                    "stats",
                    format!("{} counts for {} queues", counts.len(), chunk.len()),
                ));
            }
            for (name, c) in chunk.iter().zip(counts.chunks(4)) {
                let count = |v: i64| u64::try_from(v).unwrap_or(0);
                out.push(QueueStats {
                    name: name.clone(),
                    depth: count(c[0]),
                    in_flight: count(c[1]),
                    dead_letters: count(c[2]),
                    oldest_age: (c[3] >= 0).then(|| Duration::from_millis(count(c[3]))),
                });
            }
        }
        Ok(out)
    }
}
