//! The proto3 canonical JSON mapping of `agentmesh.v1` messages.
//!
//! Built on prost-reflect over the crate's own descriptor set, so the JSON is
//! exactly what grpcurl and every other proto3 implementation read and write
//! (camelCase names, enums by name, 64-bit integers as strings, Timestamps in
//! RFC 3339 with `Z`, `google.protobuf.Value` as plain JSON).

use std::sync::LazyLock;

use prost::{Message, Name};
use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage, SerializeOptions};

/// Why a message could not be mapped to or from JSON.
#[derive(Debug)]
pub struct JsonError(String);

impl std::fmt::Display for JsonError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for JsonError {}

/// The descriptor pool of the `agentmesh.v1` package and its imports.
pub fn descriptor_pool() -> &'static DescriptorPool {
    static POOL: LazyLock<DescriptorPool> = LazyLock::new(|| {
        DescriptorPool::decode(crate::FILE_DESCRIPTOR_SET)
            .expect("the descriptor set built by build.rs decodes")
    });
    &POOL
}

fn descriptor<T: Name>() -> Result<prost_reflect::MessageDescriptor, JsonError> {
    descriptor_pool()
        .get_message_by_name(&T::full_name())
        .ok_or_else(|| JsonError(format!("unknown message type {}", T::full_name())))
}

/// Serializes a message as proto3 canonical JSON.
pub fn to_json<T: Message + Name>(message: &T) -> Result<serde_json::Value, JsonError> {
    let dynamic = DynamicMessage::decode(descriptor::<T>()?, message.encode_to_vec().as_slice())
        .map_err(|e| JsonError(e.to_string()))?;
    dynamic
        .serialize_with_options(
            serde_json::value::Serializer,
            &SerializeOptions::new().skip_default_fields(true),
        )
        .map_err(|e| JsonError(e.to_string()))
}

/// Parses proto3 JSON into a message. Unknown fields are an error, so typos
/// surface instead of being silently dropped.
pub fn from_json<T: Message + Name + Default>(json: &str) -> Result<T, JsonError> {
    let mut deserializer = serde_json::Deserializer::from_str(json);
    let dynamic = DynamicMessage::deserialize_with_options(
        descriptor::<T>()?,
        &mut deserializer,
        &DeserializeOptions::new().deny_unknown_fields(true),
    )
    .map_err(|e| JsonError(e.to_string()))?;
    deserializer.end().map_err(|e| JsonError(e.to_string()))?;
    dynamic
        .transcode_to::<T>()
        .map_err(|e| JsonError(e.to_string()))
}

/// Parses proto3 JSON given as an already-parsed JSON value.
pub fn from_json_value<T: Message + Name + Default>(
    json: serde_json::Value,
) -> Result<T, JsonError> {
    let dynamic = DynamicMessage::deserialize_with_options(
        descriptor::<T>()?,
        json,
        &DeserializeOptions::new().deny_unknown_fields(true),
    )
    .map_err(|e| JsonError(e.to_string()))?;
    dynamic
        .transcode_to::<T>()
        .map_err(|e| JsonError(e.to_string()))
}
