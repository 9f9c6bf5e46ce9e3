//! JSON-RPC 2.0 envelopes and the A2A method names.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::A2aErrorKind;

pub const JSONRPC_VERSION: &str = "2.0";

/// The A2A 1.0 JSON-RPC method names.
pub mod methods {
    pub const SEND_MESSAGE: &str = "SendMessage";
    pub const SEND_STREAMING_MESSAGE: &str = "SendStreamingMessage";
    pub const GET_TASK: &str = "GetTask";
    pub const LIST_TASKS: &str = "ListTasks";
    pub const CANCEL_TASK: &str = "CancelTask";
    pub const SUBSCRIBE_TO_TASK: &str = "SubscribeToTask";
    pub const CREATE_TASK_PUSH_NOTIFICATION_CONFIG: &str = "CreateTaskPushNotificationConfig";
    pub const GET_TASK_PUSH_NOTIFICATION_CONFIG: &str = "GetTaskPushNotificationConfig";
    pub const LIST_TASK_PUSH_NOTIFICATION_CONFIGS: &str = "ListTaskPushNotificationConfigs";
    pub const DELETE_TASK_PUSH_NOTIFICATION_CONFIG: &str = "DeleteTaskPushNotificationConfig";
    pub const GET_EXTENDED_AGENT_CARD: &str = "GetExtendedAgentCard";
}

/// A JSON-RPC 2.0 request. Without `id` it is a notification.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JsonRpcRequest {
    pub jsonrpc: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
    pub method: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<Value>,
}

impl JsonRpcRequest {
    pub fn new(id: impl Into<Value>, method: &str, params: impl Serialize) -> Self {
        Self {
            jsonrpc: JSONRPC_VERSION.to_owned(),
            id: Some(id.into()),
            method: method.to_owned(),
            params: Some(serde_json::to_value(params).unwrap_or(Value::Null)),
        }
    }
}

/// A JSON-RPC 2.0 error object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JsonRpcError {
    pub code: i64,
    #[serde(default)]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

impl JsonRpcError {
    pub fn new(kind: A2aErrorKind, message: impl Into<String>) -> Self {
        Self {
            code: kind.code(),
            message: message.into(),
            data: None,
        }
    }

    /// The A2A error this code stands for, if it is one of the spec's.
    pub fn kind(&self) -> Option<A2aErrorKind> {
        A2aErrorKind::from_code(self.code)
    }
}

/// A JSON-RPC 2.0 response: a result or an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JsonRpcResponse {
    pub jsonrpc: String,
    /// The request's id; `null` when it could not be read.
    #[serde(default)]
    pub id: Value,
    #[serde(flatten)]
    pub outcome: JsonRpcOutcome,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JsonRpcOutcome {
    Result(Value),
    Error(JsonRpcError),
}

impl JsonRpcResponse {
    pub fn result(id: Value, result: impl Serialize) -> Self {
        let outcome = match serde_json::to_value(result) {
            Ok(v) => JsonRpcOutcome::Result(v),
            Err(e) => JsonRpcOutcome::Error(JsonRpcError::new(
                A2aErrorKind::InternalError,
                e.to_string(),
            )),
        };
        Self {
            jsonrpc: JSONRPC_VERSION.to_owned(),
            id,
            outcome,
        }
    }

    pub fn error(id: Value, error: JsonRpcError) -> Self {
        Self {
            jsonrpc: JSONRPC_VERSION.to_owned(),
            id,
            outcome: JsonRpcOutcome::Error(error),
        }
    }
}
