//! Proto3 canonical JSON in and out of HTTP bodies.
//!
//! The mapping is `agentmesh_proto::json`'s (prost-reflect over the
//! protocol's descriptor pool, unknown fields refused), used one level lower
//! for two reasons: parse errors name the field that was wrong (tracked with
//! `serde_path_to_error`), and writing serializes the reflected message
//! straight into bytes instead of through a `serde_json::Value`, one
//! allocation tree fewer per message on the SSE path where every event is
//! mapped. Integral doubles are written as integers (`1`, not `1.0`), as
//! other proto3 JSON encoders do, so `{"n": 1}` comes back as it went in.

use std::sync::LazyLock;

use agentmesh_proto::json::descriptor_pool;
use axum::{
    body::Bytes,
    extract::{FromRequest, Request},
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use prost::{Message, Name};
use prost_reflect::{DeserializeOptions, DynamicMessage, MessageDescriptor, SerializeOptions};
use tonic::Code;

use agentmesh_proto::v1::{Envelope, StreamResponse};

use crate::{error::ApiError, fastjson};

static SERIALIZE: LazyLock<SerializeOptions> =
    LazyLock::new(|| SerializeOptions::new().skip_default_fields(true));

/// The descriptor of `T` in the protocol's pool.
pub(crate) fn descriptor_of<T: Name>() -> Result<MessageDescriptor, ApiError> {
    descriptor_pool()
        .get_message_by_name(&T::full_name())
        .ok_or_else(|| {
            ApiError::new(
                Code::Internal,
                format!("no descriptor for {}", T::full_name()),
            )
        })
}

/// Appends the proto3 JSON of `message` to `out`: directly for the hot
/// messages (see `fastjson`), reflectively for the rest.
pub(crate) fn write_json<T: Message + Name + 'static>(
    message: &T,
    out: &mut Vec<u8>,
) -> Result<(), ApiError> {
    let start = out.len();
    let any = message as &dyn std::any::Any;
    let direct = if let Some(response) = any.downcast_ref::<StreamResponse>() {
        Some(fastjson::stream_response(response, out))
    } else {
        any.downcast_ref::<Envelope>()
            .map(|envelope| fastjson::write_envelope(envelope, out))
    };
    match direct {
        Some(Ok(())) => Ok(()),
        Some(Err(fastjson::Unsupported)) | None => {
            out.truncate(start);
            write_with(&descriptor_of::<T>()?, message, out)
        }
    }
}

/// Appends the proto3 JSON of `message`, of type `descriptor`, to `out`.
pub(crate) fn write_with<T: Message>(
    descriptor: &MessageDescriptor,
    message: &T,
    out: &mut Vec<u8>,
) -> Result<(), ApiError> {
    let dynamic = DynamicMessage::decode(descriptor.clone(), message.encode_to_vec().as_slice())
        .map_err(|e| ApiError::new(Code::Internal, format!("cannot map to JSON: {e}")))?;
    let mut serializer = serde_json::Serializer::with_formatter(out, IntegralFloats);
    dynamic
        .serialize_with_options(&mut serializer, &SERIALIZE)
        .map_err(|e| ApiError::new(Code::Internal, format!("cannot map to JSON: {e}")))
}

/// The proto3 JSON of `message`.
pub(crate) fn to_vec<T: Message + Name + 'static>(message: &T) -> Result<Vec<u8>, ApiError> {
    let mut out = Vec::with_capacity(256);
    write_json(message, &mut out)?;
    Ok(out)
}

/// Parses proto3 JSON into `T`; `what` names the input in the error
/// ("request body", "WebSocket message"). An empty input is `{}`.
pub(crate) fn parse<T: Message + Name + Default>(bytes: &[u8], what: &str) -> Result<T, ApiError> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        ApiError::invalid_argument(
            "INVALID_JSON",
            format!("invalid JSON in the {what}: it is not UTF-8 ({e})"),
        )
    })?;
    if text.trim().is_empty() {
        return Ok(T::default());
    }
    let invalid = |at: String, error: String| {
        let at = if at.is_empty() || at == "." {
            String::new()
        } else {
            format!(" at `{at}`")
        };
        ApiError::invalid_argument(
            "INVALID_JSON",
            format!(
                "invalid JSON in the {what}{at}: {error} (expected the proto3 JSON form of {})",
                T::full_name()
            ),
        )
    };
    let descriptor = descriptor_of::<T>()?;
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let mut track = serde_path_to_error::Track::new();
    let parsed = DynamicMessage::deserialize_with_options(
        descriptor,
        serde_path_to_error::Deserializer::new(&mut deserializer, &mut track),
        &DeserializeOptions::new().deny_unknown_fields(true),
    );
    let dynamic = parsed.map_err(|e| invalid(track.path().to_string(), e.to_string()))?;
    deserializer
        .end()
        .map_err(|e| invalid(String::new(), e.to_string()))?;
    dynamic
        .transcode_to::<T>()
        .map_err(|e| invalid(String::new(), e.to_string()))
}

/// Checks that no JSON object in `bytes` names a key twice (serde_json would keep the last one
/// silently, where the proto3 JSON parser of the other routes refuses it).
pub(crate) fn refuse_duplicate_keys(bytes: &[u8]) -> Result<(), serde_json::Error> {
    use serde::de::{Deserializer as _, Error as _, MapAccess, SeqAccess, Visitor};

    struct Unique;

    impl<'de> Visitor<'de> for Unique {
        type Value = ();

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("JSON")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            let mut seen = std::collections::HashSet::new();
            while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                if !seen.insert(key.clone()) {
                    return Err(A::Error::custom(format!(
                        "duplicate field {}",
                        agentmesh_proto::names::quoted(&key)
                    )));
                }
                map.next_value_seed(UniqueSeed)?;
            }
            Ok(())
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            while seq.next_element_seed(UniqueSeed)?.is_some() {}
            Ok(())
        }

        fn visit_bool<E>(self, _: bool) -> Result<(), E> {
            Ok(())
        }
        fn visit_i64<E>(self, _: i64) -> Result<(), E> {
            Ok(())
        }
        fn visit_u64<E>(self, _: u64) -> Result<(), E> {
            Ok(())
        }
        fn visit_f64<E>(self, _: f64) -> Result<(), E> {
            Ok(())
        }
        fn visit_str<E>(self, _: &str) -> Result<(), E> {
            Ok(())
        }
        fn visit_unit<E>(self) -> Result<(), E> {
            Ok(())
        }
    }

    struct UniqueSeed;

    impl<'de> serde::de::DeserializeSeed<'de> for UniqueSeed {
        type Value = ();

        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(Unique)
        }
    }

    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    deserializer.deserialize_any(Unique)?;
    deserializer.end()
}

/// Writes integral floating-point numbers without a fraction. prost-reflect
/// writes every `google.protobuf.Value` number as a double, so a payload's
/// `1` would come back as `1.0`.
pub(crate) struct IntegralFloats;

/// Below 2^53 every integral double is exactly an `i64`.
const EXACT: f64 = 9_007_199_254_740_992.0;

impl serde_json::ser::Formatter for IntegralFloats {
    fn write_f64<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        value: f64,
    ) -> std::io::Result<()> {
        if value.fract() == 0.0 && value.abs() < EXACT {
            self.write_i64(writer, value as i64)
        } else {
            serde_json::ser::CompactFormatter.write_f64(writer, value)
        }
    }

    fn write_f32<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        value: f32,
    ) -> std::io::Result<()> {
        if value.fract() == 0.0 && f64::from(value).abs() < EXACT {
            self.write_i64(writer, value as i64)
        } else {
            serde_json::ser::CompactFormatter.write_f32(writer, value)
        }
    }
}

/// A JSON response with an already-serialized body.
pub(crate) fn response(status: StatusCode, body: impl Into<axum::body::Body>) -> Response {
    let mut response = (status, body.into()).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// `200 OK` with the proto3 JSON of `message`.
pub(crate) fn ok<T: Message + Name + 'static>(message: &T) -> Result<Response, ApiError> {
    Ok(response(StatusCode::OK, to_vec(message)?))
}

/// The raw request body, read up to the configured limit. Decoding is left
/// to the handler, which may not need it (a resumed stream ignores it), and
/// reading errors become JSON errors (413 over the limit).
#[derive(Debug)]
pub(crate) struct Body(pub(crate) Bytes);

impl Body {
    /// Parses the body as proto3 JSON of `T`.
    pub(crate) fn parse<T: Message + Name + Default>(&self) -> Result<T, ApiError> {
        parse(&self.0, "request body")
    }
}

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Bytes::from_request(request, state).await {
            Ok(bytes) => Ok(Body(bytes)),
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(ApiError::new(
                    Code::ResourceExhausted,
                    "the request body is larger than the gateway accepts",
                )
                .with_reason("BODY_TOO_LARGE", [])
                .with_http_status(StatusCode::PAYLOAD_TOO_LARGE))
            }
            Err(rejection) => Err(ApiError::invalid_argument(
                "UNREADABLE_BODY",
                format!("cannot read the request body: {}", rejection.body_text()),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use agentmesh_proto::v1::{Envelope, StreamEventKind, StreamResponse};

    use super::*;

    #[test]
    fn writes_the_same_json_as_to_json() {
        let event = StreamResponse {
            stream_id: "s".into(),
            sequence: 7,
            kind: StreamEventKind::Partial as i32,
            envelope: Some(Envelope::json("t", serde_json::json!({"a": [1, "x"]}))),
            ..Default::default()
        };
        let bytes = to_vec(&event).unwrap();
        let direct: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        // The same JSON as `to_json`, with integral doubles as integers.
        let mut reference = Vec::new();
        serde::Serialize::serialize(
            &agentmesh_proto::json::to_json(&event).unwrap(),
            &mut serde_json::Serializer::with_formatter(&mut reference, IntegralFloats),
        )
        .unwrap();
        let reference: serde_json::Value = serde_json::from_slice(&reference).unwrap();
        assert_eq!(direct, reference);
        let text = String::from_utf8(bytes).unwrap();
        assert!(
            text.contains(r#""a":[1,"x"]"#),
            "integral numbers stay integers: {text}"
        );
        assert_eq!(direct["sequence"], "7");
        assert_eq!(direct["kind"], "STREAM_EVENT_KIND_PARTIAL");
    }

    #[test]
    fn parse_errors_name_the_input_and_the_problem() {
        let error = parse::<Envelope>(br#"{"jsn": 1}"#, "request body").unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument);
        assert!(error.message().contains("request body"), "{error}");
        assert!(error.message().contains("agentmesh.v1.Envelope"), "{error}");
        assert!(error.message().contains("jsn"), "{error}");
        let error = parse::<Envelope>(br#"{"json": {}, "attempt": "many"}"#, "body").unwrap_err();
        assert!(error.message().contains("at `attempt`"), "{error}");
        let error = parse::<Envelope>(br#"{"headers": {"a": 1}}"#, "body").unwrap_err();
        assert!(error.message().contains("at `headers.a`"), "{error}");
        assert_eq!(
            parse::<Envelope>(b"  ", "request body").unwrap(),
            Envelope::default()
        );
    }
}
