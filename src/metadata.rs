//! Names and formats of the metadata (gRPC) / headers (HTTP) that carry an
//! envelope's tracing and deadline information across every hop.

use std::time::Duration;

/// Correlation id of the call chain; generated at the edge if absent and echoed back.
pub const CORRELATION_ID: &str = "x-correlation-id";
/// W3C trace context.
pub const TRACEPARENT: &str = "traceparent";
/// Key under which a call or message is deduplicated.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Standard gRPC deadline header.
pub const GRPC_TIMEOUT: &str = "grpc-timeout";
/// Timeout in milliseconds, for HTTP clients that cannot send `grpc-timeout`.
pub const TIMEOUT_MS: &str = "x-timeout-ms";
/// Set by the node on calls it routes to an agent: the hop they came through.
pub const VIA: &str = "x-agentmesh-via";
/// Set by the node on calls it routes to an agent: the authenticated caller's principal id.
/// The node always overwrites it, so a caller cannot choose it; agents read it, never callers.
pub const PRINCIPAL: &str = "x-agentmesh-principal";
/// Bearer credentials: an API token or a JWT (`authorization: Bearer <token>`).
pub const AUTHORIZATION: &str = "authorization";

/// Parses an `x-timeout-ms` value: a whole number of milliseconds from 1 to `u64::MAX`,
/// digits only (no sign, exponent or fraction), as the OpenAPI document states it.
pub fn parse_timeout_ms(value: &str) -> Option<Duration> {
    let digits = value.trim();
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let ms = digits.parse::<u64>().ok()?;
    (ms >= 1).then(|| Duration::from_millis(ms))
}

/// Parses a `grpc-timeout` value (`<digits><unit>`, unit one of H M S m u n).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.checked_mul(3600)?),
        "M" => Duration::from_secs(amount.checked_mul(60)?),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// Whether a caller-supplied correlation id is acceptable as-is (printable
/// ASCII, at most [`crate::limits::MAX_ID_BYTES`]); others are replaced by a fresh id (the edge
/// refuses longer ones before that).
pub fn is_valid_correlation_id(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= crate::limits::MAX_ID_BYTES
        && value.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeout_ms_is_digits_from_one_up() {
        assert_eq!(parse_timeout_ms("250"), Some(Duration::from_millis(250)));
        assert_eq!(parse_timeout_ms(" 7 "), Some(Duration::from_millis(7)));
        assert_eq!(
            parse_timeout_ms("18446744073709551615"),
            Some(Duration::from_millis(u64::MAX))
        );
        for bad in [
            "",
            "0",
            "000",
            "-1",
            "+5",
            "1e23",
            "1.5",
            "abc",
            "5ms",
            "18446744073709551616",
        ] {
            assert_eq!(parse_timeout_ms(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn parses_grpc_timeouts() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(
            parse_grpc_timeout("99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout("5x"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
    }
}
