//! Envelopes ↔ the messages of an external A2A agent, by the rules mesh agents served over
//! A2A follow ([`crate::inbound::mapping`]): the envelope's payload becomes the message's
//! parts, and the parts of the agent's answer become the reply's payload.

use agentmesh_proto::v1::Envelope;

use crate::{
    inbound::mapping::{parts_to_payload, payload_to_parts},
    types::{Message, Part, Role},
};

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
        parts: payload_to_parts(envelope),
        ..Default::default()
    })
}

/// The envelope (payload and content type) the parts of an agent's answer stand for.
pub fn payload_of(parts: &[Part]) -> Result<Envelope, String> {
    let mut envelope = Envelope::default();
    parts_to_payload(parts, &mut envelope)?;
    Ok(envelope)
}

#[cfg(test)]
mod tests {
    use agentmesh_proto::{json_to_value, v1::envelope::Payload};
    use serde_json::json;

    use super::*;
    use crate::inbound::mapping::PARTS_CONTENT_TYPE;

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
        assert_eq!(payload_to_parts(&text), vec![Part::text("hi")]);
        let several = payload_of(&[Part::text("a"), Part::data(json!(1))]).unwrap();
        assert_eq!(several.content_type, PARTS_CONTENT_TYPE);
        assert_eq!(payload_to_parts(&several).len(), 2);
        assert!(payload_of(&[Part::default()]).is_err());
    }
}
