//! Binary encoding of the records stored in redb (little-endian, length-prefixed strings).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A stored record could not be decoded.
#[derive(Debug)]
pub(crate) struct Corrupt(pub(crate) &'static str);

pub(crate) fn ms_to_time(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

pub(crate) fn time_to_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

pub(crate) fn now_ms() -> u64 {
    time_to_ms(SystemTime::now())
}

pub(crate) fn dur_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[derive(Default)]
pub(crate) struct Enc(pub(crate) Vec<u8>);

impl Enc {
    pub(crate) fn with_capacity(n: usize) -> Self {
        Self(Vec::with_capacity(n))
    }
    pub(crate) fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub(crate) fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub(crate) fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub(crate) fn bytes(&mut self, v: &[u8]) -> &mut Self {
        // Lengths are bounded by the API limits (bodies <= 4 MiB, names <= 64 KiB).
        self.u32(u32::try_from(v.len()).unwrap_or(u32::MAX));
        self.0.extend_from_slice(v);
        self
    }
    pub(crate) fn str(&mut self, v: &str) -> &mut Self {
        self.bytes(v.as_bytes())
    }
    pub(crate) fn opt_str(&mut self, v: Option<&str>) -> &mut Self {
        match v {
            None => self.u8(0),
            Some(s) => self.u8(1).str(s),
        }
    }
    pub(crate) fn raw(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
}

pub(crate) struct Dec<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Dec<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], Corrupt> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or(Corrupt("truncated record"))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    pub(crate) fn u8(&mut self) -> Result<u8, Corrupt> {
        Ok(self.take(1)?[0])
    }
    pub(crate) fn u32(&mut self) -> Result<u32, Corrupt> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, Corrupt> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    pub(crate) fn bytes(&mut self) -> Result<&'a [u8], Corrupt> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    pub(crate) fn str(&mut self) -> Result<&'a str, Corrupt> {
        std::str::from_utf8(self.bytes()?).map_err(|_| Corrupt("invalid utf-8"))
    }
    pub(crate) fn opt_str(&mut self) -> Result<Option<&'a str>, Corrupt> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.str()?)),
            _ => Err(Corrupt("bad option tag")),
        }
    }
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos..];
        self.pos = self.buf.len();
        s
    }
}

const MESSAGE_V1: u8 = 1;
const DEAD_V1: u8 = 1;

/// A message record as stored in a chunk (see `chunk`).
pub(crate) struct MessageView<'a> {
    pub(crate) enqueued_ms: u64,
    pub(crate) id: &'a str,
    pub(crate) idempotency_key: Option<&'a str>,
    pub(crate) correlation_id: &'a str,
    pub(crate) reply_to: Option<&'a str>,
    pub(crate) body: &'a [u8],
}

/// Encoded size of a message record.
pub(crate) fn message_len(m: &MessageView<'_>) -> usize {
    let opt = |v: Option<&str>| 1 + v.map_or(0, |s| 4 + s.len());
    1 + 8
        + 4
        + m.id.len()
        + opt(m.idempotency_key)
        + 4
        + m.correlation_id.len()
        + opt(m.reply_to)
        + m.body.len()
}

/// Appends a message record to `out`.
pub(crate) fn encode_message_into(out: &mut Vec<u8>, m: &MessageView<'_>) {
    let mut e = Enc(std::mem::take(out));
    e.u8(MESSAGE_V1)
        .u64(m.enqueued_ms)
        .str(m.id)
        .opt_str(m.idempotency_key)
        .str(m.correlation_id)
        .opt_str(m.reply_to)
        .raw(m.body);
    *out = e.0;
}

#[cfg(test)]
pub(crate) fn encode_message(m: &MessageView<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(message_len(m));
    encode_message_into(&mut out, m);
    out
}

pub(crate) fn decode_message(buf: &[u8]) -> Result<MessageView<'_>, Corrupt> {
    let mut d = Dec::new(buf);
    if d.u8()? != MESSAGE_V1 {
        return Err(Corrupt("unknown message record version"));
    }
    Ok(MessageView {
        enqueued_ms: d.u64()?,
        id: d.str()?,
        idempotency_key: d.opt_str()?,
        correlation_id: d.str()?,
        reply_to: d.opt_str()?,
        body: d.rest(),
    })
}

/// One failed attempt as stored.
#[derive(Debug, Clone)]
pub(crate) struct StoredAttempt {
    pub(crate) attempt: u32,
    pub(crate) delivered_ms: u64,
    pub(crate) consumer_id: String,
    pub(crate) error: String,
}

pub(crate) fn encode_history(h: &[StoredAttempt]) -> Vec<u8> {
    let mut e = Enc::default();
    e.u32(u32::try_from(h.len()).unwrap_or(u32::MAX));
    for a in h {
        e.u32(a.attempt)
            .u64(a.delivered_ms)
            .str(&a.consumer_id)
            .str(&a.error);
    }
    e.0
}

pub(crate) fn decode_history(buf: &[u8]) -> Result<Vec<StoredAttempt>, Corrupt> {
    let mut d = Dec::new(buf);
    let n = d.u32()?;
    let mut out = Vec::with_capacity(n.min(1024) as usize);
    for _ in 0..n {
        out.push(StoredAttempt {
            attempt: d.u32()?,
            delivered_ms: d.u64()?,
            consumer_id: d.str()?.to_owned(),
            error: d.str()?.to_owned(),
        });
    }
    Ok(out)
}

/// A dead letter as stored: header, history, then the message record unchanged.
pub(crate) struct DeadView<'a> {
    pub(crate) dead_ms: u64,
    pub(crate) last_error: &'a str,
    pub(crate) history: &'a [u8],
    pub(crate) message: &'a [u8],
}

pub(crate) fn encode_dead(d: &DeadView<'_>) -> Vec<u8> {
    let mut e = Enc::with_capacity(32 + d.last_error.len() + d.history.len() + d.message.len());
    e.u8(DEAD_V1)
        .u64(d.dead_ms)
        .str(d.last_error)
        .bytes(d.history)
        .raw(d.message);
    e.0
}

pub(crate) fn decode_dead(buf: &[u8]) -> Result<DeadView<'_>, Corrupt> {
    let mut d = Dec::new(buf);
    if d.u8()? != DEAD_V1 {
        return Err(Corrupt("unknown dead-letter record version"));
    }
    Ok(DeadView {
        dead_ms: d.u64()?,
        last_error: d.str()?,
        history: d.bytes()?,
        message: d.rest(),
    })
}

/// `(expires_ms, payload)`: used by the dedup table (payload = message id) and results.
pub(crate) fn encode_expiring(expires_ms: u64, payload: &[u8]) -> Vec<u8> {
    let mut e = Enc::with_capacity(8 + payload.len());
    e.u64(expires_ms).raw(payload);
    e.0
}

pub(crate) fn decode_expiring(buf: &[u8]) -> Result<(u64, &[u8]), Corrupt> {
    let mut d = Dec::new(buf);
    Ok((d.u64()?, d.rest()))
}

/// Persistent per-queue row: id and counters.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QueueRow {
    pub(crate) id: u32,
    pub(crate) live: u64,
    pub(crate) dead: u64,
}

pub(crate) fn encode_queue_row(r: QueueRow) -> Vec<u8> {
    let mut e = Enc::with_capacity(20);
    e.u32(r.id).u64(r.live).u64(r.dead);
    e.0
}

pub(crate) fn decode_queue_row(buf: &[u8]) -> Result<QueueRow, Corrupt> {
    let mut d = Dec::new(buf);
    Ok(QueueRow {
        id: d.u32()?,
        live: d.u64()?,
        dead: d.u64()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_round_trip() {
        let m = MessageView {
            enqueued_ms: 42,
            id: "id",
            idempotency_key: Some("k"),
            correlation_id: "c",
            reply_to: None,
            body: b"hello",
        };
        let buf = encode_message(&m);
        assert_eq!(buf.len(), message_len(&m));
        let d = decode_message(&buf).unwrap();
        assert_eq!(
            (
                d.enqueued_ms,
                d.id,
                d.idempotency_key,
                d.correlation_id,
                d.reply_to,
                d.body
            ),
            (42, "id", Some("k"), "c", None, &b"hello"[..])
        );
        assert!(decode_message(&buf[..5]).is_err());
        let h = vec![StoredAttempt {
            attempt: 1,
            delivered_ms: 7,
            consumer_id: "w".into(),
            error: "boom".into(),
        }];
        let hb = encode_history(&h);
        let dead = encode_dead(&DeadView {
            dead_ms: 9,
            last_error: "boom",
            history: &hb,
            message: &buf,
        });
        let dv = decode_dead(&dead).unwrap();
        assert_eq!((dv.dead_ms, dv.last_error), (9, "boom"));
        assert_eq!(decode_history(dv.history).unwrap()[0].error, "boom");
        assert_eq!(decode_message(dv.message).unwrap().id, "id");
    }
}
