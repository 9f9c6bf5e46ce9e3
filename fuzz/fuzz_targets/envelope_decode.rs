//! Protobuf decoding of the envelope and of every request message the node decodes.
//!
//! Input: one byte picking the message type, then the encoded message. Properties: decoding
//! never panics; a decoded message re-encodes to bytes that decode to the same message, and
//! encoding is stable from there on; the checks the node runs on a decoded envelope (limits,
//! call context) never panic.
#![no_main]

use std::time::Duration;

use agentmesh_proto::v1::*;
use agentmesh_proto::{CallContext, limits};
use libfuzzer_sys::fuzz_target;
use prost::Message;

/// Equal, or unequal only through a NaN (a `google.protobuf.Value` number), which
/// survives the round trip but never compares equal.
fn same<T: Message + PartialEq + std::fmt::Debug>(a: &T, b: &T) -> bool {
    a == b || format!("{a:?}").contains("NaN")
}

/// Decodes `data` as `T` and checks the round trip; returns the message if it decoded.
fn round_trip<T: Message + Default + PartialEq + std::fmt::Debug>(data: &[u8]) -> Option<T> {
    let first = T::decode(data).ok()?;
    let bytes = first.encode_to_vec();
    assert_eq!(bytes.len(), first.encoded_len(), "encoded_len is exact");
    let second = T::decode(bytes.as_slice()).expect("a re-encoded message decodes");
    assert!(
        same(&first, &second),
        "decode → encode → decode changed the message:\n{first:?}\n{second:?}"
    );
    let third = T::decode(second.encode_to_vec().as_slice()).expect("decodes again");
    assert!(same(&second, &third), "encoding is not stable");
    Some(second)
}

fn check_envelope(envelope: &Envelope) {
    let _ = limits::check_envelope(envelope);
    let ctx = CallContext::from_envelope(envelope, Duration::from_secs(30));
    let _ = ctx.deadline.as_system_time();
    let _ = ctx.trace_metadata();
    let _ = envelope.metadata();
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, data)) = data.split_first() else {
        return;
    };
    match kind % 16 {
        0 => {
            if let Some(envelope) = round_trip::<Envelope>(data) {
                check_envelope(&envelope);
            }
        }
        1 => {
            if let Some(request) = round_trip::<InvokeRequest>(data) {
                request.envelope.as_ref().map(check_envelope);
            }
        }
        2 => {
            if let Some(request) = round_trip::<StreamRequest>(data) {
                request.envelope.as_ref().map(check_envelope);
            }
        }
        3 => {
            round_trip::<ConverseRequest>(data);
        }
        4 => {
            if let Some(request) = round_trip::<SubmitRequest>(data) {
                request.envelope.as_deref().map(check_envelope);
            }
        }
        5 => {
            round_trip::<ConsumeRequest>(data);
        }
        6 => {
            round_trip::<RegisterRequest>(data);
        }
        7 => {
            round_trip::<HeartbeatRequest>(data);
        }
        8 => {
            round_trip::<DeregisterRequest>(data);
        }
        9 => {
            round_trip::<LookupRequest>(data);
        }
        10 => {
            round_trip::<WatchRequest>(data);
        }
        11 => {
            round_trip::<FanOutRequest>(data);
        }
        12 => {
            round_trip::<ListDeadLettersRequest>(data);
        }
        13 => {
            round_trip::<RedriveDeadLettersRequest>(data);
        }
        14 => {
            round_trip::<AwaitResultRequest>(data);
        }
        _ => {
            round_trip::<GetTraceRequest>(data);
        }
    }
});
