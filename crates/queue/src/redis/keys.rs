//! Key names (the same scheme as the Lua prelude's `qkey`) and receipts.

use crate::{QueueError, validate_queue_name};

/// The names of the keys under one prefix that Rust reads directly; the Lua functions build the
/// rest (`leases`, `holders`, `fresh`, `retry`, `fails`, `dlx`, `dedup`) the same way.
#[derive(Debug, Clone)]
pub(super) struct Keys {
    prefix: String,
}

impl Keys {
    pub(super) fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    pub(super) fn prefix(&self) -> &str {
        &self.prefix
    }

    fn per_queue(&self, kind: &str, queue: &str) -> String {
        format!("{}:{kind}:{queue}", self.prefix)
    }

    /// The queue's stream (its consumer group is `agentmesh`).
    pub(super) fn stream(&self, queue: &str) -> String {
        self.per_queue("q", queue)
    }

    /// A one-entry stream appended to whenever a message of `queue` is ready again without
    /// being appended (release, a lapse, a nack without delay): waiting receives block on it.
    pub(super) fn wake(&self, queue: &str) -> String {
        self.per_queue("wake", queue)
    }

    /// The queue's dead letters (a stream).
    pub(super) fn dead_letters(&self, queue: &str) -> String {
        self.per_queue("dlq", queue)
    }

    /// The set of every queue's name.
    pub(super) fn queues(&self) -> String {
        format!("{}:queues", self.prefix)
    }

    /// An ack's result.
    pub(super) fn result(&self, correlation_id: &str) -> String {
        format!("{}:result:{correlation_id}", self.prefix)
    }

    /// A one-entry stream appended to when the result lands: `wait_result` blocks on it.
    pub(super) fn result_ready(&self, correlation_id: &str) -> String {
        format!("{}:result-ready:{correlation_id}", self.prefix)
    }
}

/// What a receipt names: `"{entry id}.{token}.{attempt}.{queue}"`.
///
/// Everything needed to settle the delivery is in it, so any node (or this one after a
/// restart) can ack it; the token tells this lease from earlier and later ones on the entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Receipt<'a> {
    pub(super) entry: &'a str,
    pub(super) token: &'a str,
    pub(super) attempt: u32,
    pub(super) queue: &'a str,
}

impl<'a> Receipt<'a> {
    pub(super) fn format(entry: &str, token: &str, attempt: u32, queue: &str) -> String {
        format!("{entry}.{token}.{attempt}.{queue}")
    }

    pub(super) fn parse(receipt: &'a str) -> Result<Self, QueueError> {
        let bad = || QueueError::InvalidArgument(format!("malformed receipt {receipt:?}"));
        let mut parts = receipt.splitn(4, '.');
        let entry = parts.next().ok_or_else(bad)?;
        let token = parts.next().ok_or_else(bad)?;
        let attempt = parts.next().ok_or_else(bad)?;
        let queue = parts.next().ok_or_else(bad)?;
        if !is_stream_id(entry) || !is_digits(token) {
            return Err(bad());
        }
        let attempt = attempt.parse::<u32>().map_err(|_| bad())?;
        validate_queue_name(queue).map_err(|_| bad())?;
        Ok(Self {
            entry,
            token,
            attempt,
            queue,
        })
    }
}

fn is_digits(s: &str) -> bool {
    !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit())
}

/// Whether `s` is a stream entry id, `{ms}-{seq}`.
pub(super) fn is_stream_id(s: &str) -> bool {
    s.split_once('-')
        .is_some_and(|(ms, seq)| is_digits(ms) && is_digits(seq))
}

/// The millisecond part of a stream entry id (Redis's clock when it was added).
pub(super) fn stream_id_ms(id: &str) -> Option<u64> {
    id.split_once('-').and_then(|(ms, _)| ms.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_receipt_round_trips_with_dots_in_the_queue_name() {
        let r = Receipt::format("1700000000000-3", "42", 2, "orders.eu:v1");
        let parsed = Receipt::parse(&r).expect("parse");
        assert_eq!(
            parsed,
            Receipt {
                entry: "1700000000000-3",
                token: "42",
                attempt: 2,
                queue: "orders.eu:v1",
            }
        );
    }

    #[test]
    fn malformed_receipts_are_invalid_arguments() {
        for bad in [
            "",
            "garbage",
            "1-0.1.1",
            "1-0.x.1.q",
            "1.1.1.q",
            "1-0.1.-1.q",
            "1-0.1.1.",
            "1-0.1.1.q\u{7}",
        ] {
            assert!(
                matches!(Receipt::parse(bad), Err(QueueError::InvalidArgument(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn stream_ids_carry_their_time() {
        assert!(is_stream_id("1700000000000-0"));
        assert!(!is_stream_id("1700000000000"));
        assert!(!is_stream_id("-0"));
        assert_eq!(stream_id_ms("1700000000123-7"), Some(1_700_000_000_123));
    }
}
