//! A2A parts ↔ envelope payloads.
//!
//! | A2A message parts | envelope payload |
//! |---|---|
//! | one `data` part | JSON payload (the value), `application/json` |
//! | one `text` part | bytes of the text, its `mediaType` or `text/plain; charset=utf-8` |
//! | one `raw` part | the bytes, its `mediaType` or `application/octet-stream` |
//! | anything else (a `url` part, several parts) | JSON payload: the parts as A2A JSON, [`PARTS_CONTENT_TYPE`] |
//!
//! And back, for the agent's reply: a JSON payload becomes one `data` part (or the parts
//! themselves under [`PARTS_CONTENT_TYPE`]); bytes whose content type is `text/*` (or
//! empty) and valid UTF-8 become a `text` part; other bytes a `raw` part; a protobuf
//! payload a `raw` part with media type `application/x-protobuf` and its type URL in the
//! part's metadata.

use agentmesh_proto::{
    json_to_value,
    v1::{Envelope, envelope::Payload},
    value_to_json,
};
use base64::{Engine, engine::general_purpose::STANDARD};
use serde_json::{Value, json};

use crate::types::{Part, PartContent};

/// Content type of an envelope that carries A2A parts as they are (JSON).
pub const PARTS_CONTENT_TYPE: &str = "application/vnd.a2a.parts+json";
const TEXT: &str = "text/plain; charset=utf-8";

/// Puts the parts of a message into `envelope` (payload and content type).
pub fn parts_to_payload(parts: &[Part], envelope: &mut Envelope) -> Result<(), String> {
    if parts.is_empty() {
        return Err("the message has no parts".into());
    }
    for (i, part) in parts.iter().enumerate() {
        if part.content().is_none() {
            return Err(format!(
                "part {i} must have exactly one of text, raw, url and data"
            ));
        }
    }
    let (content_type, payload) = match parts {
        [one] => match one.content() {
            Some(PartContent::Data(value)) => (
                "application/json".to_owned(),
                Payload::Json(json_to_value(value.clone())),
            ),
            Some(PartContent::Text(text)) => (
                one.media_type.clone().unwrap_or_else(|| TEXT.to_owned()),
                Payload::Binary(text.as_bytes().to_vec()),
            ),
            Some(PartContent::Raw(raw)) => (
                one.media_type
                    .clone()
                    .unwrap_or_else(|| "application/octet-stream".to_owned()),
                Payload::Binary(
                    STANDARD
                        .decode(raw)
                        .map_err(|e| format!("part 0: raw is not base64: {e}"))?,
                ),
            ),
            _ => as_parts(parts),
        },
        _ => as_parts(parts),
    };
    envelope.content_type = content_type;
    envelope.payload = Some(payload);
    Ok(())
}

fn as_parts(parts: &[Part]) -> (String, Payload) {
    let value = serde_json::to_value(parts).unwrap_or(Value::Null);
    (
        PARTS_CONTENT_TYPE.to_owned(),
        Payload::Json(json_to_value(value)),
    )
}

/// The parts an agent's reply stands for.
pub fn payload_to_parts(envelope: &Envelope) -> Vec<Part> {
    match &envelope.payload {
        None => vec![Part::data(Value::Null)],
        Some(Payload::Json(value)) => {
            let value = value_to_json(value);
            if envelope.content_type == PARTS_CONTENT_TYPE {
                if let Ok(parts) = serde_json::from_value::<Vec<Part>>(value.clone()) {
                    if !parts.is_empty() && parts.iter().all(|p| p.content().is_some()) {
                        return parts;
                    }
                }
            }
            vec![Part::data(value)]
        }
        Some(Payload::Binary(bytes)) => {
            let content_type = envelope.content_type.trim();
            let textual = content_type.is_empty() || content_type.starts_with("text/");
            match (textual, std::str::from_utf8(bytes)) {
                (true, Ok(text)) => {
                    let mut part = Part::text(text);
                    if !content_type.is_empty() && content_type != TEXT {
                        part.media_type = Some(content_type.to_owned());
                    }
                    vec![part]
                }
                _ => vec![Part {
                    raw: Some(STANDARD.encode(bytes)),
                    media_type: Some(if content_type.is_empty() {
                        "application/octet-stream".to_owned()
                    } else {
                        content_type.to_owned()
                    }),
                    ..Part::default()
                }],
            }
        }
        Some(Payload::Proto(any)) => vec![Part {
            raw: Some(STANDARD.encode(&any.value)),
            media_type: Some("application/x-protobuf".to_owned()),
            metadata: json!({ "typeUrl": any.type_url }).as_object().cloned(),
            ..Part::default()
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(parts: Vec<Part>) -> (Envelope, Vec<Part>) {
        let mut envelope = Envelope::default();
        parts_to_payload(&parts, &mut envelope).unwrap();
        let back = payload_to_parts(&envelope);
        (envelope, back)
    }

    #[test]
    fn one_data_part_is_a_json_payload() {
        let (envelope, back) = round_trip(vec![Part::data(json!({"n": 3}))]);
        assert_eq!(envelope.json_payload(), Some(json!({"n": 3})));
        assert_eq!(back, vec![Part::data(json!({"n": 3}))]);
    }

    #[test]
    fn one_text_part_is_text_bytes() {
        let (envelope, back) = round_trip(vec![Part::text("hello")]);
        assert_eq!(envelope.content_type, TEXT);
        assert_eq!(envelope.payload, Some(Payload::Binary(b"hello".to_vec())));
        assert_eq!(back, vec![Part::text("hello")]);
    }

    #[test]
    fn raw_and_several_parts() {
        let raw = Part {
            raw: Some(STANDARD.encode([0u8, 159, 146, 150])),
            media_type: Some("image/png".into()),
            ..Part::default()
        };
        let (envelope, back) = round_trip(vec![raw.clone()]);
        assert_eq!(envelope.content_type, "image/png");
        assert_eq!(back, vec![raw]);
        let several = vec![Part::text("a"), Part::data(json!([1]))];
        let (envelope, back) = round_trip(several.clone());
        assert_eq!(envelope.content_type, PARTS_CONTENT_TYPE);
        assert_eq!(back, several);
    }

    #[test]
    fn invalid_parts_are_refused() {
        let mut envelope = Envelope::default();
        assert!(parts_to_payload(&[], &mut envelope).is_err());
        assert!(parts_to_payload(&[Part::default()], &mut envelope).is_err());
        let bad = Part {
            raw: Some("***".into()),
            ..Part::default()
        };
        assert!(parts_to_payload(&[bad], &mut envelope).is_err());
    }
}
