//! A direct proto3 JSON writer for the two messages on the gateway's hot
//! paths, `StreamResponse` (every SSE event) and `Envelope` (every reply and
//! WebSocket message).
//!
//! The reflective mapping re-decodes each message into a `DynamicMessage`
//! first, which costs several microseconds of allocation per event: more
//! than the rest of the SSE path together. This writes the same JSON as the
//! reflective mapping (field names, defaults skipped, 64-bit integers as
//! strings, enums by name, RFC 3339 timestamps, `google.protobuf.Value` as
//! plain JSON) straight from the generated structs. What it does not cover
//! (an `Any` or bytes payload, a non-finite number in a `Value`, an
//! out-of-range timestamp) reports [`Unsupported`], and the caller falls
//! back to the reflective mapping, which handles or rejects it as before.
//! Unit tests compare both mappings.

use std::io::Write;

use agentmesh_proto::v1::{Envelope, ErrorStatus, StreamEventKind, StreamResponse, envelope};
use prost_types::{Struct, Timestamp, Value, value::Kind};
use serde_json::ser::Formatter;

use crate::json::IntegralFloats;

/// The message holds something this writer leaves to the reflective mapping.
#[derive(Debug)]
pub(crate) struct Unsupported;

type Result = std::result::Result<(), Unsupported>;

/// Range of a valid `google.protobuf.Timestamp` (years 1 to 9999), as the
/// reflective mapping checks it.
const MIN_TIMESTAMP_SECONDS: i64 = -62_135_596_800;
const MAX_TIMESTAMP_SECONDS: i64 = 253_402_300_799;

/// A JSON object being written: commas between fields.
struct Object<'a> {
    out: &'a mut Vec<u8>,
    empty: bool,
}

impl<'a> Object<'a> {
    fn start(out: &'a mut Vec<u8>) -> Self {
        out.push(b'{');
        Self { out, empty: true }
    }

    /// Starts a field; `name` is a literal JSON name (no escaping needed).
    fn key(&mut self, name: &str) -> &mut Vec<u8> {
        if !self.empty {
            self.out.push(b',');
        }
        self.empty = false;
        self.out.push(b'"');
        self.out.extend_from_slice(name.as_bytes());
        self.out.extend_from_slice(b"\":");
        self.out
    }

    /// Starts a field whose name needs escaping (a map key).
    fn escaped_key(&mut self, name: &str) -> &mut Vec<u8> {
        if !self.empty {
            self.out.push(b',');
        }
        self.empty = false;
        string(self.out, name);
        self.out.push(b':');
        self.out
    }

    fn string(&mut self, name: &str, value: &str) {
        if !value.is_empty() {
            let out = self.key(name);
            string(out, value);
        }
    }

    fn end(self) {
        self.out.push(b'}');
    }
}

fn string(out: &mut Vec<u8>, value: &str) {
    // serde_json's escaping; writing to a Vec cannot fail.
    let _ = serde::Serializer::serialize_str(&mut serde_json::Serializer::new(out), value);
}

fn f64_number(out: &mut Vec<u8>, value: f64) {
    let _ = IntegralFloats.write_f64(out, value);
}

/// Writes `response` as proto3 JSON.
pub(crate) fn stream_response(response: &StreamResponse, out: &mut Vec<u8>) -> Result {
    let mut object = Object::start(out);
    object.string("streamId", &response.stream_id);
    if response.sequence != 0 {
        let out = object.key("sequence");
        let _ = write!(out, "\"{}\"", response.sequence);
    }
    if response.kind != 0 {
        let out = object.key("kind");
        match StreamEventKind::try_from(response.kind) {
            Ok(kind) => string(out, kind.as_str_name()),
            Err(_) => {
                let _ = IntegralFloats.write_i32(out, response.kind);
            }
        }
    }
    if let Some(envelope) = &response.envelope {
        write_envelope(envelope, object.key("envelope"))?;
    }
    if response.progress != 0.0 {
        let out = object.key("progress");
        let progress = response.progress;
        if progress.is_finite() {
            let _ = IntegralFloats.write_f32(out, progress);
        } else if progress.is_nan() {
            string(out, "NaN");
        } else if progress > 0.0 {
            string(out, "Infinity");
        } else {
            string(out, "-Infinity");
        }
    }
    object.string("message", &response.message);
    if let Some(error) = &response.error {
        error_status(error, object.key("error"));
    }
    object.end();
    Ok(())
}

fn error_status(error: &ErrorStatus, out: &mut Vec<u8>) {
    let mut object = Object::start(out);
    if error.code != 0 {
        let _ = IntegralFloats.write_i32(object.key("code"), error.code);
    }
    object.string("message", &error.message);
    object.end();
}

/// Writes `envelope` as proto3 JSON.
pub(crate) fn write_envelope(envelope: &Envelope, out: &mut Vec<u8>) -> Result {
    let mut object = Object::start(out);
    object.string("id", &envelope.id);
    object.string("type", &envelope.r#type);
    object.string("typeVersion", &envelope.type_version);
    object.string("contentType", &envelope.content_type);
    object.string("schemaRef", &envelope.schema_ref);
    match &envelope.payload {
        None => {}
        Some(envelope::Payload::Json(value)) => json_value(value, object.key("json"))?,
        // `Any` needs the type registry and bytes need base64: rare on the
        // hot paths, left to the reflective mapping.
        Some(envelope::Payload::Proto(_) | envelope::Payload::Binary(_)) => {
            return Err(Unsupported);
        }
    }
    object.string("correlationId", &envelope.correlation_id);
    object.string("causationId", &envelope.causation_id);
    object.string("idempotencyKey", &envelope.idempotency_key);
    object.string("traceparent", &envelope.traceparent);
    object.string("source", &envelope.source);
    object.string("target", &envelope.target);
    object.string("replyTo", &envelope.reply_to);
    if let Some(created_at) = &envelope.created_at {
        timestamp(created_at, object.key("createdAt"))?;
    }
    if let Some(deadline) = &envelope.deadline {
        timestamp(deadline, object.key("deadline"))?;
    }
    if !envelope.headers.is_empty() {
        let out = object.key("headers");
        let mut headers = Object::start(out);
        for (name, value) in &envelope.headers {
            string(headers.escaped_key(name), value);
        }
        headers.end();
    }
    if envelope.attempt != 0 {
        let _ = IntegralFloats.write_u32(object.key("attempt"), envelope.attempt);
    }
    object.end();
    Ok(())
}

fn timestamp(timestamp: &Timestamp, out: &mut Vec<u8>) -> Result {
    if !(MIN_TIMESTAMP_SECONDS..=MAX_TIMESTAMP_SECONDS).contains(&timestamp.seconds) {
        return Err(Unsupported);
    }
    // prost-types' RFC 3339 form, exactly what the reflective mapping writes.
    let _ = write!(out, "\"{timestamp}\"");
    Ok(())
}

fn json_value(value: &Value, out: &mut Vec<u8>) -> Result {
    match &value.kind {
        None | Some(Kind::NullValue(_)) => out.extend_from_slice(b"null"),
        Some(Kind::BoolValue(true)) => out.extend_from_slice(b"true"),
        Some(Kind::BoolValue(false)) => out.extend_from_slice(b"false"),
        Some(Kind::NumberValue(number)) => {
            if !number.is_finite() {
                return Err(Unsupported);
            }
            f64_number(out, *number);
        }
        Some(Kind::StringValue(text)) => string(out, text),
        Some(Kind::ListValue(list)) => {
            out.push(b'[');
            for (i, item) in list.values.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                json_value(item, out)?;
            }
            out.push(b']');
        }
        Some(Kind::StructValue(fields)) => json_struct(fields, out)?,
    }
    Ok(())
}

fn json_struct(fields: &Struct, out: &mut Vec<u8>) -> Result {
    let mut object = Object::start(out);
    for (name, value) in &fields.fields {
        json_value(value, object.escaped_key(name))?;
    }
    object.end();
    Ok(())
}

#[cfg(test)]
mod tests {
    use agentmesh_proto::v1::ErrorStatus;
    use serde_json::json;

    use super::*;

    /// The reflective mapping of `message`, parsed.
    fn reflective<T: prost::Message + prost::Name>(message: &T) -> serde_json::Value {
        let mut out = Vec::new();
        let descriptor = crate::json::descriptor_of::<T>().unwrap();
        crate::json::write_with(&descriptor, message, &mut out).unwrap();
        serde_json::from_slice(&out).unwrap()
    }

    fn direct_response(response: &StreamResponse) -> serde_json::Value {
        let mut out = Vec::new();
        stream_response(response, &mut out).unwrap();
        serde_json::from_slice(&out).expect("valid JSON")
    }

    fn full_envelope() -> Envelope {
        let mut envelope = Envelope::json(
            "translate.request",
            json!({
                "text": "quote \" backslash \\ newline \n tab \t control \u{1} emoji 😀 é",
                "n": 3, "neg": -2.5, "big": 1.0e300, "tiny": 1.5e-7, "zero": 0,
                "list": [1, "two", null, true, false, {"deep": [[]]}],
                "empty": {},
            }),
        );
        envelope.id = "0199-id".into();
        envelope.type_version = "2".into();
        envelope.schema_ref = "agentmesh.v1.Example".into();
        envelope.correlation_id = "corr".into();
        envelope.causation_id = "cause".into();
        envelope.idempotency_key = "key".into();
        envelope.traceparent = "00-abc-def-01".into();
        envelope.source = "me".into();
        envelope.target = "skill:x".into();
        envelope.reply_to = "results".into();
        envelope.created_at = Some(Timestamp {
            seconds: 1_764_000_000,
            nanos: 123_456_789,
        });
        envelope.deadline = Some(Timestamp {
            seconds: 1_764_000_030,
            nanos: 500_000_000,
        });
        envelope.headers = [
            ("a".to_owned(), "1".to_owned()),
            ("ü \"q\"".to_owned(), "".to_owned()),
        ]
        .into_iter()
        .collect();
        envelope.attempt = 3;
        envelope
    }

    #[test]
    fn writes_what_the_reflective_mapping_writes() {
        let envelope = full_envelope();
        let responses = [
            StreamResponse {
                stream_id: "s-1".into(),
                sequence: u64::MAX,
                kind: StreamEventKind::Partial as i32,
                envelope: Some(envelope.clone()),
                ..Default::default()
            },
            StreamResponse {
                stream_id: "s-1".into(),
                sequence: 2,
                kind: StreamEventKind::Progress as i32,
                progress: 0.25,
                message: "a quarter".into(),
                ..Default::default()
            },
            StreamResponse {
                sequence: 3,
                kind: StreamEventKind::Progress as i32,
                progress: 1.0,
                ..Default::default()
            },
            StreamResponse {
                kind: StreamEventKind::Error as i32,
                error: Some(ErrorStatus {
                    code: 5,
                    message: "gone".into(),
                }),
                ..Default::default()
            },
            StreamResponse {
                kind: 99,
                progress: f32::NAN,
                error: Some(ErrorStatus::default()),
                envelope: Some(Envelope::default()),
                ..Default::default()
            },
            StreamResponse {
                progress: f32::NEG_INFINITY,
                envelope: Some(Envelope {
                    payload: Some(envelope::Payload::Json(Value { kind: None })),
                    created_at: Some(Timestamp::default()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            StreamResponse::default(),
        ];
        for response in &responses {
            assert_eq!(
                direct_response(response),
                reflective(response),
                "{response:?}"
            );
        }
        let mut out = Vec::new();
        write_envelope(&envelope, &mut out).unwrap();
        let direct: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(direct, reflective(&envelope));
    }

    #[test]
    fn writes_timestamps_like_the_reflective_mapping() {
        for (seconds, nanos) in [
            (0, 0),
            (1, 1_000_000),
            (1, 1_000),
            (1, 1),
            (-1, 999_999_999),
            (MIN_TIMESTAMP_SECONDS, 0),
            (MAX_TIMESTAMP_SECONDS, 999_999_999),
        ] {
            let envelope = Envelope {
                created_at: Some(Timestamp { seconds, nanos }),
                ..Default::default()
            };
            let mut out = Vec::new();
            write_envelope(&envelope, &mut out).unwrap();
            let direct: serde_json::Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(direct, reflective(&envelope), "{seconds} {nanos}");
        }
    }

    #[test]
    fn leaves_the_rest_to_the_reflective_mapping() {
        let unsupported = [
            Envelope {
                payload: Some(envelope::Payload::Binary(vec![1, 2])),
                ..Default::default()
            },
            Envelope {
                payload: Some(envelope::Payload::Proto(prost_types::Any::default())),
                ..Default::default()
            },
            Envelope {
                payload: Some(envelope::Payload::Json(Value {
                    kind: Some(Kind::NumberValue(f64::NAN)),
                })),
                ..Default::default()
            },
            Envelope {
                deadline: Some(Timestamp {
                    seconds: MAX_TIMESTAMP_SECONDS + 1,
                    nanos: 0,
                }),
                ..Default::default()
            },
        ];
        for envelope in &unsupported {
            assert!(
                write_envelope(envelope, &mut Vec::new()).is_err(),
                "{envelope:?}"
            );
        }
    }
}
