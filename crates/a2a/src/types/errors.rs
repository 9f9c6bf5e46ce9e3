//! The spec's errors: JSON-RPC codes, HTTP statuses and reasons of each binding.

/// An A2A error, with its code on each binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum A2aErrorKind {
    /// -32700: the body is not JSON.
    ParseError,
    /// -32600: not a valid JSON-RPC request.
    InvalidRequest,
    /// -32601: no such method.
    MethodNotFound,
    /// -32602: the params are invalid.
    InvalidParams,
    /// -32603: an error inside the server.
    InternalError,
    /// -32001
    TaskNotFound,
    /// -32002
    TaskNotCancelable,
    /// -32003
    PushNotificationNotSupported,
    /// -32004
    UnsupportedOperation,
    /// -32005
    ContentTypeNotSupported,
    /// -32006
    InvalidAgentResponse,
    /// -32007
    ExtendedAgentCardNotConfigured,
    /// -32008
    ExtensionSupportRequired,
    /// -32009
    VersionNotSupported,
    /// -32000 (the JSON-RPC range for a server's own errors; the spec has no code for it),
    /// HTTP 403: the caller may not use this agent. Not in [`Self::ALL`], the spec's kinds.
    PermissionDenied,
}

impl A2aErrorKind {
    pub const ALL: [Self; 14] = [
        Self::ParseError,
        Self::InvalidRequest,
        Self::MethodNotFound,
        Self::InvalidParams,
        Self::InternalError,
        Self::TaskNotFound,
        Self::TaskNotCancelable,
        Self::PushNotificationNotSupported,
        Self::UnsupportedOperation,
        Self::ContentTypeNotSupported,
        Self::InvalidAgentResponse,
        Self::ExtendedAgentCardNotConfigured,
        Self::ExtensionSupportRequired,
        Self::VersionNotSupported,
    ];

    /// The JSON-RPC error code.
    pub fn code(self) -> i64 {
        match self {
            Self::ParseError => -32700,
            Self::InvalidRequest => -32600,
            Self::MethodNotFound => -32601,
            Self::InvalidParams => -32602,
            Self::InternalError => -32603,
            Self::TaskNotFound => -32001,
            Self::TaskNotCancelable => -32002,
            Self::PushNotificationNotSupported => -32003,
            Self::UnsupportedOperation => -32004,
            Self::ContentTypeNotSupported => -32005,
            Self::InvalidAgentResponse => -32006,
            Self::ExtendedAgentCardNotConfigured => -32007,
            Self::ExtensionSupportRequired => -32008,
            Self::VersionNotSupported => -32009,
            Self::PermissionDenied => -32000,
        }
    }

    pub fn from_code(code: i64) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.code() == code)
    }

    /// The HTTP status of the HTTP+JSON binding.
    pub fn http_status(self) -> u16 {
        match self {
            Self::TaskNotFound | Self::MethodNotFound => 404,
            Self::PermissionDenied => 403,
            Self::InternalError | Self::InvalidAgentResponse => 500,
            _ => 400,
        }
    }

    /// The gRPC status name of the gRPC binding.
    pub fn grpc_status(self) -> &'static str {
        match self {
            Self::TaskNotFound | Self::MethodNotFound => "NOT_FOUND",
            Self::PermissionDenied => "PERMISSION_DENIED",
            Self::InternalError | Self::InvalidAgentResponse => "INTERNAL",
            Self::ParseError
            | Self::InvalidRequest
            | Self::InvalidParams
            | Self::ContentTypeNotSupported => "INVALID_ARGUMENT",
            _ => "FAILED_PRECONDITION",
        }
    }

    /// The `reason` of the `google.rpc.ErrorInfo` detail (HTTP+JSON and gRPC).
    pub fn reason(self) -> &'static str {
        match self {
            Self::ParseError => "PARSE_ERROR",
            Self::InvalidRequest => "INVALID_REQUEST",
            Self::MethodNotFound => "METHOD_NOT_FOUND",
            Self::InvalidParams => "INVALID_PARAMS",
            Self::InternalError => "INTERNAL_ERROR",
            Self::TaskNotFound => "TASK_NOT_FOUND",
            Self::TaskNotCancelable => "TASK_NOT_CANCELABLE",
            Self::PushNotificationNotSupported => "PUSH_NOTIFICATION_NOT_SUPPORTED",
            Self::UnsupportedOperation => "UNSUPPORTED_OPERATION",
            Self::ContentTypeNotSupported => "CONTENT_TYPE_NOT_SUPPORTED",
            Self::InvalidAgentResponse => "INVALID_AGENT_RESPONSE",
            Self::ExtendedAgentCardNotConfigured => "EXTENDED_AGENT_CARD_NOT_CONFIGURED",
            Self::ExtensionSupportRequired => "EXTENSION_SUPPORT_REQUIRED",
            Self::VersionNotSupported => "VERSION_NOT_SUPPORTED",
            Self::PermissionDenied => "PERMISSION_DENIED",
        }
    }

    /// The spec's default message.
    pub fn default_message(self) -> &'static str {
        match self {
            Self::ParseError => "Invalid JSON payload",
            Self::InvalidRequest => "Invalid Request",
            Self::MethodNotFound => "Method not found",
            Self::InvalidParams => "Invalid params",
            Self::InternalError => "Internal error",
            Self::TaskNotFound => "Task not found",
            Self::TaskNotCancelable => "Task cannot be canceled",
            Self::PushNotificationNotSupported => "Push Notification is not supported",
            Self::UnsupportedOperation => "This operation is not supported",
            Self::ContentTypeNotSupported => "Incompatible content types",
            Self::InvalidAgentResponse => "Invalid agent response",
            Self::ExtendedAgentCardNotConfigured => "Extended agent card is not configured",
            Self::ExtensionSupportRequired => "Extension support required",
            Self::VersionNotSupported => "Version not supported",
            Self::PermissionDenied => "Permission denied",
        }
    }
}

/// The domain of the `google.rpc.ErrorInfo` details of A2A errors.
pub const ERROR_INFO_DOMAIN: &str = "a2a-protocol.org";
/// `@type` of a `google.rpc.ErrorInfo` detail in JSON.
pub const ERROR_INFO_TYPE: &str = "type.googleapis.com/google.rpc.ErrorInfo";
