//! Reading function replies (RESP2 shapes: Lua tables arrive as arrays, strings as bulk strings)
//! and stream entries. A reply of the wrong shape is a [`BadReply`], turned into a storage
//! error that names the operation.

use ::redis::Value;
use bytes::Bytes;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Why a reply could not be read.
#[derive(Debug)]
pub(super) struct BadReply(pub(super) String);

impl std::fmt::Display for BadReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn bad(what: &str, v: &Value) -> BadReply {
    BadReply(format!("expected {what}, got {v:?}"))
}

pub(super) fn array(v: Value) -> Result<Vec<Value>, BadReply> {
    match v {
        Value::Array(items) | Value::Set(items) => Ok(items),
        Value::Nil => Ok(Vec::new()),
        other => Err(bad("an array", &other)),
    }
}

pub(super) fn bytes(v: Value) -> Result<Vec<u8>, BadReply> {
    match v {
        Value::BulkString(b) => Ok(b),
        Value::SimpleString(s) => Ok(s.into_bytes()),
        Value::Int(i) => Ok(i.to_string().into_bytes()),
        other => Err(bad("a string", &other)),
    }
}

pub(super) fn string(v: Value) -> Result<String, BadReply> {
    String::from_utf8(bytes(v)?).map_err(|e| BadReply(format!("not UTF-8: {e}")))
}

pub(super) fn int(v: Value) -> Result<i64, BadReply> {
    match v {
        Value::Int(i) => Ok(i),
        Value::BulkString(b) => std::str::from_utf8(&b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| BadReply(format!("expected an integer, got {b:?}"))),
        other => Err(bad("an integer", &other)),
    }
}

/// The next item of a reply being walked, or an error naming what was missing.
pub(super) fn next(items: &mut impl Iterator<Item = Value>, what: &str) -> Result<Value, BadReply> {
    items
        .next()
        .ok_or_else(|| BadReply(format!("reply ends before {what}")))
}

pub(super) fn ms_to_time(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// The fields of a stream entry (`m` id, `c` correlation id, `r` reply_to, `b` body, `t` first
/// enqueue time; dead letters add `e` last error and `h` history).
#[derive(Debug, Default)]
pub(super) struct Fields {
    pub(super) id: String,
    pub(super) correlation_id: String,
    pub(super) reply_to: Option<String>,
    pub(super) body: Bytes,
    pub(super) enqueued_ms: Option<u64>,
    pub(super) last_error: String,
    pub(super) history: Vec<u8>,
}

impl Fields {
    /// Reads a flat name/value list.
    pub(super) fn parse(v: Value) -> Result<Self, BadReply> {
        let mut f = Fields::default();
        let mut items = array(v)?.into_iter();
        while let Some(name) = items.next() {
            let name = bytes(name)?;
            let value = next(&mut items, "a field value")?;
            match name.as_slice() {
                b"m" => f.id = string(value)?,
                b"c" => f.correlation_id = string(value)?,
                b"r" => f.reply_to = Some(string(value)?),
                b"b" => f.body = Bytes::from(bytes(value)?),
                b"t" => f.enqueued_ms = Some(int(value)? as u64),
                b"e" => f.last_error = string(value)?,
                b"h" => f.history = bytes(value)?,
                _ => {}
            }
        }
        Ok(f)
    }
}

/// One failed attempt of a history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct StoredAttempt {
    pub(super) attempt: u32,
    pub(super) delivered_ms: u64,
    pub(super) consumer_id: String,
    pub(super) error: String,
}

/// Reads a history: four netstrings (`len:bytes`) per attempt: attempt, delivered at (ms),
/// consumer id, error.
pub(super) fn parse_history(mut buf: &[u8]) -> Result<Vec<StoredAttempt>, BadReply> {
    fn netstring<'a>(buf: &mut &'a [u8]) -> Result<&'a [u8], BadReply> {
        let colon = buf
            .iter()
            .position(|&b| b == b':')
            .ok_or_else(|| BadReply("history: netstring without length".into()))?;
        let len: usize = std::str::from_utf8(&buf[..colon])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| BadReply("history: bad netstring length".into()))?;
        let rest = &buf[colon + 1..];
        if rest.len() < len {
            return Err(BadReply("history: netstring runs past the end".into()));
        }
        let (field, tail) = rest.split_at(len);
        *buf = tail;
        Ok(field)
    }
    fn text(b: &[u8]) -> String {
        String::from_utf8_lossy(b).into_owned()
    }
    fn number<T: std::str::FromStr>(b: &[u8]) -> Result<T, BadReply> {
        std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| BadReply(format!("history: bad number {b:?}")))
    }
    let mut out = Vec::new();
    while !buf.is_empty() {
        let attempt = number(netstring(&mut buf)?)?;
        let delivered_ms = number(netstring(&mut buf)?)?;
        let consumer_id = text(netstring(&mut buf)?);
        let error = text(netstring(&mut buf)?);
        out.push(StoredAttempt {
            attempt,
            delivered_ms,
            consumer_id,
            error,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_history_reads_back_any_bytes() {
        // Written as the Lua prelude does: ns(attempt) .. ns(delivered) .. ns(consumer) .. ns(error).
        let mut buf = Vec::new();
        for (a, d, c, e) in [
            ("1", "1700000000000", "a:b:", ""),
            ("2", "1700000000001", "w", "x\n:12:3:yz"),
        ] {
            for f in [a, d, c, e] {
                buf.extend_from_slice(format!("{}:{f}", f.len()).as_bytes());
            }
        }
        let parsed = parse_history(&buf).expect("parse");
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[0].consumer_id, "a:b:");
        assert_eq!(parsed[0].error, "");
        assert_eq!(parsed[1].attempt, 2);
        assert_eq!(parsed[1].delivered_ms, 1_700_000_000_001);
        assert_eq!(parsed[1].error, "x\n:12:3:yz");
        assert!(parse_history(b"5:ab").is_err());
    }
}
