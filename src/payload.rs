//! Conversions between `serde_json::Value` and `google.protobuf.Value`, the
//! form a JSON payload takes inside an [`Envelope`](crate::v1::Envelope).

use prost_types::{ListValue, Struct, Value, value::Kind};

use crate::v1::{Envelope, envelope::Payload};

/// Converts a JSON value into a `google.protobuf.Value`.
pub fn json_to_value(json: serde_json::Value) -> Value {
    let kind = match json {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(items) => Kind::ListValue(ListValue {
            values: items.into_iter().map(json_to_value).collect(),
        }),
        serde_json::Value::Object(map) => Kind::StructValue(Struct {
            fields: map
                .into_iter()
                .map(|(k, v)| (k, json_to_value(v)))
                .collect(),
        }),
    };
    Value { kind: Some(kind) }
}

/// Converts a `google.protobuf.Value` back into JSON.
pub fn value_to_json(value: &Value) -> serde_json::Value {
    match &value.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(*b),
        Some(Kind::NumberValue(n)) => {
            // Integral numbers come back as integers so `{"n": 3}` round-trips.
            if n.fract() == 0.0 && n.abs() < 9.007_199_254_740_992e15 {
                serde_json::Value::from(*n as i64)
            } else {
                serde_json::Number::from_f64(*n)
                    .map(serde_json::Value::Number)
                    .unwrap_or(serde_json::Value::Null)
            }
        }
        Some(Kind::StringValue(s)) => serde_json::Value::String(s.clone()),
        Some(Kind::ListValue(list)) => {
            serde_json::Value::Array(list.values.iter().map(value_to_json).collect())
        }
        Some(Kind::StructValue(s)) => serde_json::Value::Object(
            s.fields
                .iter()
                .map(|(k, v)| (k.clone(), value_to_json(v)))
                .collect(),
        ),
    }
}

impl Envelope {
    /// An envelope of the given type carrying a JSON payload.
    pub fn json(r#type: impl Into<String>, payload: serde_json::Value) -> Self {
        Envelope {
            r#type: r#type.into(),
            content_type: "application/json".into(),
            payload: Some(Payload::Json(json_to_value(payload))),
            ..Default::default()
        }
    }

    /// The JSON payload, if the envelope carries one.
    pub fn json_payload(&self) -> Option<serde_json::Value> {
        match &self.payload {
            Some(Payload::Json(value)) => Some(value_to_json(value)),
            _ => None,
        }
    }

    /// Sets the target and returns the envelope.
    pub fn to(mut self, target: impl Into<String>) -> Self {
        self.target = target.into();
        self
    }
}
