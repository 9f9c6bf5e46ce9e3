//! Entry points for the fuzz targets in `fuzz/` (not a stable API): the
//! gateway's own parsers and writers, reached without a running node.

use prost::{Message, Name};

/// Parses a `Last-Event-ID` header as the stream routes do: the stream id and
/// the last sequence seen, or the error message a client would get.
pub fn parse_last_event_id(value: &str) -> Result<(String, u64), String> {
    crate::sse::parse_last_event_id(value)
        .map(|point| (point.stream_id, point.after))
        .map_err(|e| e.message().to_owned())
}

/// Parses a request body as the routes do (proto3 JSON, unknown fields refused).
pub fn parse_json<T: Message + Name + Default>(bytes: &[u8]) -> Result<T, String> {
    crate::json::parse(bytes, "request body").map_err(|e| e.message().to_owned())
}

/// Writes a message as the routes do: directly for `Envelope` and
/// `StreamResponse`, reflectively for the rest.
pub fn write_json<T: Message + Name + 'static>(message: &T) -> Result<Vec<u8>, String> {
    crate::json::to_vec(message).map_err(|e| e.message().to_owned())
}

/// Writes a message with the reflective mapping only (what the direct writer
/// must agree with).
pub fn write_json_reflective<T: Message + Name>(message: &T) -> Result<Vec<u8>, String> {
    let descriptor = crate::json::descriptor_of::<T>().map_err(|e| e.message().to_owned())?;
    let mut out = Vec::new();
    crate::json::write_with(&descriptor, message, &mut out).map_err(|e| e.message().to_owned())?;
    Ok(out)
}

/// The submit route's check for JSON objects that name a key twice.
pub fn refuse_duplicate_keys(bytes: &[u8]) -> Result<(), String> {
    crate::json::refuse_duplicate_keys(bytes).map_err(|e| e.to_string())
}
