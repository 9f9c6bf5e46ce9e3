//! The limits on what a caller may put in the fields that travel as headers to an agent
//! (correlation and causation ids, idempotency key, traceparent, source) and on an
//! envelope's headers map, in one place. The edge checks the call's headers and the router,
//! the fan-out and the queue check each envelope before anything is forwarded, so an
//! over-long value is the caller's INVALID_ARGUMENT (HTTP 400, or 431 for a header) and never
//! an agent's refusal that would count against its breaker.

use crate::{
    metadata::{CORRELATION_ID, IDEMPOTENCY_KEY, TRACEPARENT},
    v1::Envelope,
};

/// Longest id or key a caller may send: correlation and causation ids, idempotency keys, source.
pub const MAX_ID_BYTES: usize = 256;
/// Length of a W3C `traceparent` (version 00): `00-<32 hex>-<16 hex>-<2 hex>`.
pub const TRACEPARENT_LEN: usize = 55;
/// Most bytes of an envelope's `headers` map, names and values together.
pub const MAX_ENVELOPE_HEADERS_BYTES: usize = 8 * 1024;

/// Why a caller's value was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// What was wrong, naming the field and the limit (never echoing the value).
    pub message: String,
    /// Whether it was refused for its size (HTTP 431 for a header) rather than its form.
    pub oversized: bool,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Refusal {}

/// Checks an id or key: at most [`MAX_ID_BYTES`].
pub fn check_id(field: &str, value: &[u8]) -> Result<(), Refusal> {
    if value.len() > MAX_ID_BYTES {
        return Err(Refusal {
            message: format!(
                "{field} is {} bytes long, the limit is {MAX_ID_BYTES}",
                value.len()
            ),
            oversized: true,
        });
    }
    Ok(())
}

/// Checks a W3C traceparent: `00-<32 hex>-<16 hex>-<2 hex>`, lower-case, ids not all zero.
pub fn check_traceparent(field: &str, value: &[u8]) -> Result<(), Refusal> {
    if value.len() > TRACEPARENT_LEN {
        return Err(Refusal {
            message: format!(
                "{field} is {} bytes long, a W3C traceparent is {TRACEPARENT_LEN}",
                value.len()
            ),
            oversized: true,
        });
    }
    let hex = |part: &[u8]| {
        part.iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
            && part.iter().any(|b| *b != b'0')
    };
    let parts: Vec<&[u8]> = value.split(|b| *b == b'-').collect();
    let well_formed = matches!(
        parts.as_slice(),
        [version, trace, parent, flags]
            if *version == b"00" && trace.len() == 32 && hex(trace)
                && parent.len() == 16 && hex(parent)
                && flags.len() == 2 && flags.iter().all(u8::is_ascii_hexdigit)
    );
    if !well_formed {
        return Err(Refusal {
            message: format!(
                "{field} is not a W3C traceparent: 00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>"
            ),
            oversized: false,
        });
    }
    Ok(())
}

/// Checks the headers of a call that the node forwards (`idempotency-key`, `x-correlation-id`,
/// `traceparent`); `header` reads one by name, as raw bytes.
pub fn check_call_headers<'a>(header: impl Fn(&str) -> Option<&'a [u8]>) -> Result<(), Refusal> {
    let trimmed = |name| {
        header(name)
            .map(<[u8]>::trim_ascii)
            .filter(|v| !v.is_empty())
    };
    if let Some(key) = trimmed(IDEMPOTENCY_KEY) {
        check_id("the idempotency-key header", key)?;
    }
    if let Some(id) = trimmed(CORRELATION_ID) {
        check_id("the x-correlation-id header", id)?;
    }
    if let Some(traceparent) = trimmed(TRACEPARENT) {
        check_traceparent("the traceparent header", traceparent)?;
    }
    Ok(())
}

/// Checks the fields of an envelope a caller sent: its ids, key and source, its
/// traceparent, and the size of its headers map.
pub fn check_envelope(envelope: &Envelope) -> Result<(), Refusal> {
    for (field, value) in [
        ("envelope.idempotency_key", &envelope.idempotency_key),
        ("envelope.correlation_id", &envelope.correlation_id),
        ("envelope.causation_id", &envelope.causation_id),
        ("envelope.source", &envelope.source),
    ] {
        check_id(field, value.as_bytes())?;
    }
    if !envelope.traceparent.is_empty() {
        check_traceparent("envelope.traceparent", envelope.traceparent.as_bytes())?;
    }
    let headers: usize = envelope
        .headers
        .iter()
        .map(|(name, value)| name.len() + value.len())
        .sum();
    if headers > MAX_ENVELOPE_HEADERS_BYTES {
        return Err(Refusal {
            message: format!(
                "envelope.headers holds {headers} bytes, the limit is {MAX_ENVELOPE_HEADERS_BYTES}"
            ),
            oversized: true,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn traceparents_follow_w3c() {
        assert_eq!(check_traceparent("t", GOOD.as_bytes()), Ok(()));
        for bad in [
            "00-abc-def-01",
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-0g",
        ] {
            let refusal = check_traceparent("t", bad.as_bytes()).unwrap_err();
            assert!(!refusal.oversized, "{bad}");
        }
        let long = format!("{GOOD}-{}", "0".repeat(100));
        assert!(
            check_traceparent("t", long.as_bytes())
                .unwrap_err()
                .oversized
        );
    }

    #[test]
    fn ids_and_headers_have_limits() {
        let header = |value: &'static str| {
            move |name: &str| (name == IDEMPOTENCY_KEY).then_some(value.as_bytes())
        };
        assert_eq!(check_call_headers(header("k")), Ok(()));
        let long: &'static str = "k".repeat(MAX_ID_BYTES + 1).leak();
        let refusal = check_call_headers(header(long)).unwrap_err();
        assert!(refusal.oversized && refusal.message.contains("idempotency-key"));

        let mut envelope = Envelope {
            source: "s".repeat(MAX_ID_BYTES),
            traceparent: GOOD.into(),
            ..Default::default()
        };
        assert_eq!(check_envelope(&envelope), Ok(()));
        envelope
            .headers
            .insert("h".into(), "v".repeat(MAX_ENVELOPE_HEADERS_BYTES));
        assert!(
            check_envelope(&envelope)
                .unwrap_err()
                .message
                .contains("headers")
        );
        envelope.headers.clear();
        envelope.causation_id = "c".repeat(MAX_ID_BYTES + 1);
        assert!(
            check_envelope(&envelope)
                .unwrap_err()
                .message
                .contains("causation_id")
        );
    }
}
