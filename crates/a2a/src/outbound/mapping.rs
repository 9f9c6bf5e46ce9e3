//! Envelopes ↔ the messages and parts of an external A2A agent, by the same rules as
//! mesh agents served over A2A:
//!
//! | envelope payload | A2A parts |
//! |---|---|
//! | JSON (`application/vnd.a2a.parts+json`: the parts themselves) | one `data` part |
//! | bytes, `text/*` or no content type, valid UTF-8 | one `text` part |
//! | other bytes | one `raw` part with the content type as `mediaType` |
//! | protobuf | one `raw` part, `application/x-protobuf`, `typeUrl` in its metadata |
//!
//! and back: one `data` part is a JSON payload, one `text` part text bytes, one `raw` part
//! its bytes, anything else the parts as JSON under `application/vnd.a2a.parts+json`.

use agentmesh_proto::{
    json_to_value,
    v1::{Envelope, envelope::Payload},
    value_to_json,
};
use base64::{Engine, engine::general_purpose::STANDARD};
use serde_json::{Value, json};

use crate::types::{Message, Part, PartContent, Role};

/// Content type of an envelope whose JSON payload is a list of A2A parts.
pub const PARTS_CONTENT_TYPE: &str = "application/vnd.a2a.parts+json";
const TEXT: &str = "text/plain; charset=utf-8";

/// The A2A message an envelope is sent as. Its `messageId` is the envelope's idempotency
/// key, or its id when it has none; its `contextId` the correlation id.
pub fn message_of(envelope: &Envelope) -> Result<Message, String> {
    let message_id = [&envelope.idempotency_key, &envelope.id]
        .into_iter()
        .find(|id| !id.is_empty())
        .cloned()
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    Ok(Message {
        message_id,
        context_id: Some(envelope.correlation_id.clone()).filter(|c| !c.is_empty()),
        role: Role::User,
        parts: parts_of(envelope),
        ..Default::default()
    })
}

/// The parts an envelope's payload stands for.
pub fn parts_of(envelope: &Envelope) -> Vec<Part> {
    match &envelope.payload {
        None => vec![Part::data(Value::Null)],
        Some(Payload::Json(value)) => {
            let value = value_to_json(value);
            if envelope.content_type == PARTS_CONTENT_TYPE
                && let Ok(parts) = serde_json::from_value::<Vec<Part>>(value.clone())
                && !parts.is_empty()
                && parts.iter().all(|p| p.content().is_some())
            {
                return parts;
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

/// The envelope (payload and content type) the parts of an agent's answer stand for.
pub fn payload_of(parts: &[Part]) -> Result<Envelope, String> {
    for (i, part) in parts.iter().enumerate() {
        if part.content().is_none() {
            return Err(format!(
                "part {i} must have exactly one of text, raw, url and data"
            ));
        }
    }
    let as_parts = || {
        (
            PARTS_CONTENT_TYPE.to_owned(),
            Payload::Json(json_to_value(
                serde_json::to_value(parts).unwrap_or(Value::Null),
            )),
        )
    };
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
            _ => as_parts(),
        },
        _ => as_parts(),
    };
    Ok(Envelope {
        content_type,
        payload: Some(payload),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_idempotency_key_is_the_message_id() {
        let envelope = Envelope {
            id: "e1".into(),
            idempotency_key: "k1".into(),
            correlation_id: "c1".into(),
            payload: Some(Payload::Json(json_to_value(json!({"n": 1})))),
            ..Default::default()
        };
        let message = message_of(&envelope).unwrap();
        assert_eq!(message.message_id, "k1");
        assert_eq!(message.context_id.as_deref(), Some("c1"));
        assert_eq!(message.parts, vec![Part::data(json!({"n": 1}))]);
        let unkeyed = Envelope {
            idempotency_key: String::new(),
            ..envelope
        };
        assert_eq!(message_of(&unkeyed).unwrap().message_id, "e1");
    }

    #[test]
    fn answers_map_back_to_payloads() {
        let text = payload_of(&[Part::text("hi")]).unwrap();
        assert_eq!(text.payload, Some(Payload::Binary(b"hi".to_vec())));
        assert_eq!(parts_of(&text), vec![Part::text("hi")]);
        let several = payload_of(&[Part::text("a"), Part::data(json!(1))]).unwrap();
        assert_eq!(several.content_type, PARTS_CONTENT_TYPE);
        assert_eq!(parts_of(&several).len(), 2);
        assert!(payload_of(&[Part::default()]).is_err());
    }
}
