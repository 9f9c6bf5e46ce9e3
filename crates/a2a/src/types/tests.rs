//! Round trips of JSON as the spec and `a2a-sdk` 1.3 write it.

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::*;

/// Parses `sample`, writes it back and expects the same JSON.
fn round_trip<T: Serialize + DeserializeOwned + std::fmt::Debug>(sample: Value) -> T {
    let parsed: T = serde_json::from_value(sample.clone()).expect("parses");
    let written = serde_json::to_value(&parsed).expect("writes");
    assert_eq!(written, sample, "{parsed:?}");
    parsed
}

#[test]
fn send_message_request_from_the_sdk() {
    let req: JsonRpcRequest = round_trip(json!({
        "jsonrpc": "2.0",
        "id": "9d2c",
        "method": "SendMessage",
        "params": {
            "message": {
                "messageId": "msg-1",
                "contextId": "ctx-1",
                "role": "ROLE_USER",
                "parts": [{"text": "hello"}, {"data": {"n": 1}}],
                "metadata": {"k": "v"}
            },
            "configuration": {"acceptedOutputModes": ["text/plain"], "returnImmediately": true}
        }
    }));
    assert_eq!(req.method, methods::SEND_MESSAGE);
    let params: SendMessageRequest = round_trip(req.params.unwrap());
    assert_eq!(params.message.role, Role::User);
    assert_eq!(
        params.message.parts[0].content(),
        Some(PartContent::Text("hello"))
    );
    assert_eq!(
        params.message.parts[1].content(),
        Some(PartContent::Data(&json!({"n": 1})))
    );
    assert!(params.configuration.unwrap().non_blocking());
}

#[test]
fn parts_are_a_one_of() {
    let file: Part =
        round_trip(json!({"raw": "aGk=", "filename": "a.txt", "mediaType": "text/plain"}));
    assert_eq!(file.content(), Some(PartContent::Raw("aGk=")));
    let url: Part =
        round_trip(json!({"url": "https://example.com/a.png", "mediaType": "image/png"}));
    assert_eq!(
        url.content(),
        Some(PartContent::Url("https://example.com/a.png"))
    );
    let null: Part = round_trip(json!({"data": null}));
    assert_eq!(null.content(), Some(PartContent::Data(&Value::Null)));
    let none: Part = serde_json::from_value(json!({})).unwrap();
    assert_eq!(none.content(), None);
    let two: Part = serde_json::from_value(json!({"text": "a", "url": "b"})).unwrap();
    assert_eq!(two.content(), None);
}

#[test]
fn task_with_artifact_and_history() {
    let task: Task = round_trip(json!({
        "id": "task-1",
        "contextId": "ctx-1",
        "status": {"state": "TASK_STATE_COMPLETED", "timestamp": "2026-05-01T10:00:00Z"},
        "artifacts": [{"artifactId": "a-1", "name": "result", "parts": [{"text": "done"}]}],
        "history": [{"messageId": "msg-1", "role": "ROLE_USER", "parts": [{"text": "go"}]}]
    }));
    assert!(task.status.state.is_terminal());
    let resp: SendMessageResponse =
        round_trip(json!({"task": serde_json::to_value(&task).unwrap()}));
    assert!(matches!(resp, SendMessageResponse::Task(_)));
    let msg: SendMessageResponse = round_trip(json!({
        "message": {"messageId": "m-2", "role": "ROLE_AGENT", "parts": [{"text": "hi"}]}
    }));
    assert!(matches!(msg, SendMessageResponse::Message(m) if m.role == Role::Agent));
}

#[test]
fn stream_events() {
    let status: StreamResponse = round_trip(json!({
        "statusUpdate": {
            "taskId": "t", "contextId": "c",
            "status": {"state": "TASK_STATE_WORKING", "message": {
                "messageId": "p1", "role": "ROLE_AGENT", "parts": [{"text": "50%"}]}}
        }
    }));
    assert!(
        matches!(status, StreamResponse::StatusUpdate(e) if e.status.state == TaskState::Working)
    );
    let artifact: StreamResponse = round_trip(json!({
        "artifactUpdate": {
            "taskId": "t", "contextId": "c",
            "artifact": {"artifactId": "a", "parts": [{"text": "par"}]},
            "append": true, "lastChunk": true
        }
    }));
    assert!(matches!(artifact, StreamResponse::ArtifactUpdate(e) if e.append && e.last_chunk));
}

#[test]
fn zero_values_may_be_absent_and_03_spellings_are_accepted() {
    let task: Task =
        serde_json::from_value(json!({"id": "t", "status": {"state": "working"}})).unwrap();
    assert_eq!(task.status.state, TaskState::Working);
    assert_eq!(task.context_id, "");
    let cfg: SendMessageConfiguration = serde_json::from_value(json!({"blocking": false})).unwrap();
    assert!(cfg.non_blocking());
    let role: Role = serde_json::from_value(json!("agent")).unwrap();
    assert_eq!(role, Role::Agent);
}

#[test]
fn task_queries() {
    let list: ListTasksRequest = round_trip(json!({
        "contextId": "ctx", "status": "TASK_STATE_SUBMITTED", "pageSize": 10,
        "pageToken": "abc", "historyLength": 2, "includeArtifacts": true,
        "statusTimestampAfter": "2026-01-01T00:00:00Z"
    }));
    assert_eq!(list.status, Some(TaskState::Submitted));
    round_trip::<ListTasksResponse>(json!({
        "tasks": [{"id": "t", "contextId": "c", "status": {"state": "TASK_STATE_FAILED"}}],
        "nextPageToken": "", "pageSize": 10, "totalSize": 1
    }));
    round_trip::<GetTaskRequest>(json!({"id": "t", "historyLength": 0}));
    round_trip::<CancelTaskRequest>(json!({"id": "t"}));
    round_trip::<SubscribeToTaskRequest>(json!({"tenant": "x", "id": "t"}));
}

#[test]
fn push_notification_configs() {
    let cfg: TaskPushNotificationConfig = round_trip(json!({
        "id": "cfg-1", "taskId": "t", "url": "https://hooks.example.com/a2a",
        "token": "opaque", "authentication": {"scheme": "Bearer", "credentials": "s3cret"}
    }));
    assert_eq!(cfg.authentication.unwrap().scheme, "Bearer");
    round_trip::<GetTaskPushNotificationConfigRequest>(json!({"taskId": "t", "id": "cfg-1"}));
    round_trip::<ListTaskPushNotificationConfigsRequest>(json!({"taskId": "t", "pageSize": 5}));
    round_trip::<ListTaskPushNotificationConfigsResponse>(json!({
        "configs": [{"id": "c", "taskId": "t", "url": "http://h"}], "nextPageToken": "n"
    }));
}

#[test]
fn agent_card() {
    let card: AgentCard = round_trip(json!({
        "name": "translator",
        "description": "Translates text",
        "supportedInterfaces": [
            {"url": "http://127.0.0.1:7700/a2a/translator", "protocolBinding": "JSONRPC", "protocolVersion": "1.0"},
            {"url": "http://127.0.0.1:7700/a2a/translator", "protocolBinding": "HTTP+JSON", "protocolVersion": "1.0"}
        ],
        "provider": {"url": "https://example.com", "organization": "Example"},
        "version": "1.2.0",
        "capabilities": {"streaming": true, "pushNotifications": false},
        "securitySchemes": {
            "bearer": {"httpAuthSecurityScheme": {"scheme": "Bearer", "bearerFormat": "JWT"}},
            "oauth": {"oauth2SecurityScheme": {"flows": {"clientCredentials": {
                "tokenUrl": "https://auth.example.com/token", "scopes": {"call": "call agents"}}}}}
        },
        "securityRequirements": [{"schemes": {"bearer": {"list": []}}}],
        "defaultInputModes": ["text/plain", "application/json"],
        "defaultOutputModes": ["text/plain"],
        "skills": [{"id": "translate", "name": "translate", "description": "", "tags": ["nlp"]}]
    }));
    assert_eq!(
        card.supported_interfaces[1].protocol_binding,
        BINDING_HTTP_JSON
    );
    assert_eq!(card.capabilities.streaming, Some(true));
    assert!(
        card.security_schemes["bearer"]
            .http_auth_security_scheme
            .is_some()
    );
}

#[test]
fn json_rpc_envelopes_and_error_codes() {
    let ok: JsonRpcResponse = round_trip(json!({"jsonrpc": "2.0", "id": 1, "result": {"id": "t"}}));
    assert!(matches!(ok.outcome, JsonRpcOutcome::Result(_)));
    let err: JsonRpcResponse = round_trip(json!({
        "jsonrpc": "2.0", "id": null,
        "error": {"code": -32001, "message": "Task not found", "data": [{"@type": ERROR_INFO_TYPE}]}
    }));
    let JsonRpcOutcome::Error(e) = err.outcome else {
        panic!()
    };
    assert_eq!(e.kind(), Some(A2aErrorKind::TaskNotFound));
    let codes: Vec<i64> = A2aErrorKind::ALL.iter().map(|k| k.code()).collect();
    assert_eq!(
        codes,
        [
            -32700, -32600, -32601, -32602, -32603, -32001, -32002, -32003, -32004, -32005, -32006,
            -32007, -32008, -32009
        ]
    );
    assert_eq!(A2aErrorKind::TaskNotFound.http_status(), 404);
    assert_eq!(A2aErrorKind::TaskNotCancelable.http_status(), 400);
    assert_eq!(A2aErrorKind::InternalError.http_status(), 500);
    let notification: JsonRpcRequest =
        serde_json::from_value(json!({"jsonrpc": "2.0", "method": "GetTask"})).unwrap();
    assert_eq!(notification.id, None);
}
