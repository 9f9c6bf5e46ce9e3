//! Errors as HTTP clients see them: `{"error":{"code","message","details"}}`
//! with the HTTP status that matches the gRPC code, so a failure reads the
//! same whether it came from the gateway itself or from the mesh behind it.

use std::collections::HashMap;

use agentmesh_core::queue::QUEUE_STORAGE_FULL;
use agentmesh_proto::{ERROR_DOMAIN, envelope::code_name};

use axum::{
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// A failed request: a gRPC code, a message and google.rpc details.
#[derive(Debug, Clone)]
pub struct ApiError {
    code: Code,
    message: String,
    details: Vec<Value>,
    /// Overrides the status derived from `code` (413 has no gRPC code).
    http: Option<StatusCode>,
}

impl ApiError {
    /// An error with `code` and `message` and no details.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            details: Vec::new(),
            http: None,
        }
    }

    /// INVALID_ARGUMENT with an `ErrorInfo` of `reason`.
    pub fn invalid_argument(reason: &str, message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, message).with_reason(reason, [])
    }

    /// Adds a `google.rpc.ErrorInfo` in the gateway's domain.
    pub fn with_reason<'a>(
        mut self,
        reason: &str,
        metadata: impl IntoIterator<Item = (&'a str, String)>,
    ) -> Self {
        let metadata: HashMap<&str, String> = metadata.into_iter().collect();
        self.details.push(json!({
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": reason,
            "domain": ERROR_DOMAIN,
            "metadata": metadata,
        }));
        self
    }

    /// Answers with `status` instead of the one matching the gRPC code.
    pub fn with_http_status(mut self, status: StatusCode) -> Self {
        self.http = Some(status);
        self
    }

    /// The HTTP status of the response.
    pub fn http_status(&self) -> StatusCode {
        self.http.unwrap_or_else(|| http_status(self.code))
    }

    /// The gRPC code.
    pub fn code(&self) -> Code {
        self.code
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The JSON body: `{"error":{"code","message","details"}}`.
    pub fn to_json(&self) -> Value {
        json!({
            "error": {
                "code": code_name(self.code),
                "message": self.message,
                "details": self.details,
            }
        })
    }
}

impl From<Status> for ApiError {
    fn from(status: Status) -> Self {
        Self::from(&status)
    }
}

impl From<&Status> for ApiError {
    fn from(status: &Status) -> Self {
        let details = status.get_error_details();
        let full = details
            .error_info()
            .is_some_and(|info| info.reason == QUEUE_STORAGE_FULL);
        Self {
            code: status.code(),
            message: status.message().to_owned(),
            details: details_json(&details),
            http: full.then_some(StatusCode::INSUFFICIENT_STORAGE),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self.to_json()).unwrap_or_default();
        let mut response = (self.http_status(), body).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", code_name(self.code), self.message)
    }
}

impl std::error::Error for ApiError {}

/// The HTTP status for a gRPC code (the google.rpc.Code mapping, with 499
/// for a cancelled call as nginx and Google's APIs use it).
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        // google.rpc.Code maps FAILED_PRECONDITION to 400: 412 is about HTTP
        // conditional headers, which the gateway does not use.
        Code::FailedPrecondition => StatusCode::BAD_REQUEST,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Cancelled => StatusCode::from_u16(499).expect("499 is a valid status code"),
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Internal | Code::Unknown | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The google.rpc details of a status in their proto3 JSON form (an `Any`
/// with `@type`), so HTTP clients get the same structured information as
/// gRPC ones.
fn details_json(details: &ErrorDetails) -> Vec<Value> {
    const PREFIX: &str = "type.googleapis.com/google.rpc.";
    let mut out = Vec::new();
    if let Some(info) = details.error_info() {
        out.push(json!({
            "@type": format!("{PREFIX}ErrorInfo"),
            "reason": info.reason,
            "domain": info.domain,
            "metadata": info.metadata,
        }));
    }
    if let Some(retry) = details.retry_info() {
        let mut value = json!({ "@type": format!("{PREFIX}RetryInfo") });
        if let Some(delay) = retry.retry_delay {
            value["retryDelay"] = json!(format!("{}s", delay.as_secs_f64()));
        }
        out.push(value);
    }
    if let Some(bad) = details.bad_request() {
        let violations: Vec<Value> = bad
            .field_violations
            .iter()
            .map(|v| json!({ "field": v.field, "description": v.description }))
            .collect();
        out.push(json!({ "@type": format!("{PREFIX}BadRequest"), "fieldViolations": violations }));
    }
    if let Some(failure) = details.precondition_failure() {
        let violations: Vec<Value> = failure
            .violations
            .iter()
            .map(
                |v| json!({ "type": v.r#type, "subject": v.subject, "description": v.description }),
            )
            .collect();
        out.push(
            json!({ "@type": format!("{PREFIX}PreconditionFailure"), "violations": violations }),
        );
    }
    if let Some(quota) = details.quota_failure() {
        let violations: Vec<Value> = quota
            .violations
            .iter()
            .map(|v| json!({ "subject": v.subject, "description": v.description }))
            .collect();
        out.push(json!({ "@type": format!("{PREFIX}QuotaFailure"), "violations": violations }));
    }
    if let Some(resource) = details.resource_info() {
        out.push(json!({
            "@type": format!("{PREFIX}ResourceInfo"),
            "resourceType": resource.resource_type,
            "resourceName": resource.resource_name,
            "owner": resource.owner,
            "description": resource.description,
        }));
    }
    if let Some(request) = details.request_info() {
        out.push(json!({
            "@type": format!("{PREFIX}RequestInfo"),
            "requestId": request.request_id,
            "servingData": request.serving_data,
        }));
    }
    if let Some(help) = details.help() {
        let links: Vec<Value> = help
            .links
            .iter()
            .map(|l| json!({ "description": l.description, "url": l.url }))
            .collect();
        out.push(json!({ "@type": format!("{PREFIX}Help"), "links": links }));
    }
    if let Some(message) = details.localized_message() {
        out.push(json!({
            "@type": format!("{PREFIX}LocalizedMessage"),
            "locale": message.locale,
            "message": message.message,
        }));
    }
    if let Some(debug) = details.debug_info() {
        out.push(json!({
            "@type": format!("{PREFIX}DebugInfo"),
            "stackEntries": debug.stack_entries,
            "detail": debug.detail,
        }));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_every_code_to_the_documented_status() {
        let cases = [
            (Code::NotFound, 404),
            (Code::InvalidArgument, 400),
            (Code::FailedPrecondition, 400),
            (Code::DeadlineExceeded, 504),
            (Code::Unavailable, 503),
            (Code::ResourceExhausted, 429),
            (Code::OutOfRange, 400),
            (Code::Unimplemented, 501),
            (Code::Unauthenticated, 401),
            (Code::PermissionDenied, 403),
            (Code::AlreadyExists, 409),
            (Code::Aborted, 409),
            (Code::Cancelled, 499),
            (Code::Internal, 500),
            (Code::Unknown, 500),
            (Code::DataLoss, 500),
        ];
        for (code, status) in cases {
            assert_eq!(http_status(code).as_u16(), status, "{code:?}");
        }
    }

    #[test]
    fn carries_error_info_from_status_details() {
        let status = Status::with_error_details(
            Code::NotFound,
            "no agent registered for target 'x'",
            ErrorDetails::with_error_info(
                "AGENT_NOT_FOUND",
                ERROR_DOMAIN,
                [("target".to_owned(), "x".to_owned())],
            ),
        );
        let body = ApiError::from(status).to_json();
        assert_eq!(body["error"]["code"], "NOT_FOUND");
        assert_eq!(body["error"]["details"][0]["reason"], "AGENT_NOT_FOUND");
        assert_eq!(body["error"]["details"][0]["metadata"]["target"], "x");
        assert_eq!(
            body["error"]["details"][0]["@type"],
            "type.googleapis.com/google.rpc.ErrorInfo"
        );
    }
}
