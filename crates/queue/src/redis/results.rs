//! Results by correlation id: `GET` on the result key, and waiting for one with a blocking
//! `XREAD` on its `result-ready` stream from id 0 (so a result that lands between the `GET`
//! and the wait is not missed), which works whichever node acks.

use super::{Store, ms};
use crate::QueueError;
use ::redis::Value;
use bytes::Bytes;
use std::time::Duration;

impl Store {
    pub(super) async fn get_result(
        &self,
        correlation_id: &str,
    ) -> Result<Option<Bytes>, QueueError> {
        let mut con = self.conns.shared();
        let found: Option<Vec<u8>> = ::redis::cmd("GET")
            .arg(self.keys.result(correlation_id))
            .query_async(&mut con)
            .await
            .map_err(|e| self.conns.error("get_result", &e))?;
        Ok(found.map(Bytes::from))
    }

    pub(super) async fn wait_result(
        &self,
        correlation_id: &str,
        timeout: Duration,
    ) -> Result<Option<Bytes>, QueueError> {
        if let Some(found) = self.get_result(correlation_id).await? {
            return Ok(Some(found));
        }
        if timeout.is_zero() {
            return Ok(None);
        }
        let block_ms = ms(timeout).max(1);
        let ready = self.keys.result_ready(correlation_id);
        let woke: Value = self
            .conns
            .on_dedicated("wait_result", timeout, true, |mut con| {
                let mut cmd = ::redis::cmd("XREAD");
                cmd.arg("COUNT")
                    .arg(1)
                    .arg("BLOCK")
                    .arg(block_ms)
                    .arg("STREAMS")
                    .arg(&ready)
                    .arg("0-0");
                async move { cmd.query_async(&mut con).await }
            })
            .await?;
        if matches!(woke, Value::Nil) {
            return Ok(None);
        }
        self.get_result(correlation_id).await
    }
}
