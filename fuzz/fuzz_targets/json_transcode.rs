//! Proto3 JSON transcoding as the gateway does it.
//!
//! Input: one byte picking the direction and message type, then the payload.
//! * JSON → protobuf (even first byte): a body the gateway parses, re-serialized by the
//!   gateway's writer, parses back to the same message; the reflective mapping of
//!   `agentmesh_proto::json` round-trips it too.
//! * protobuf → JSON (odd first byte): an `Envelope` or `StreamResponse` decoded from
//!   arbitrary protobuf is written as the gateway writes replies and SSE events; if that
//!   works, the direct writer agrees with the reflective one, and the JSON parses back to a
//!   message that writes the same JSON again.
//!
//! The submit route's duplicate-key check runs on every input.
#![no_main]

use agentmesh_gateway::fuzzing;
use agentmesh_proto::json;
use agentmesh_proto::v1::*;
use libfuzzer_sys::fuzz_target;
use prost::{Message, Name};

/// Equal, or unequal only where the mapping is not one-to-one on the decoded message: a NaN
/// (never equal to itself) or an `Any` (whose bytes are re-encoded from JSON).
fn same<T: PartialEq + std::fmt::Debug>(a: &T, b: &T) -> bool {
    if a == b {
        return true;
    }
    let debug = format!("{a:?}");
    debug.contains("NaN") || debug.contains("type_url")
}

fn value(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).expect("the gateway writes valid JSON")
}

fn from_json<T>(data: &[u8])
where
    T: Message + Name + Default + PartialEq + std::fmt::Debug + 'static,
{
    let Ok(first) = fuzzing::parse_json::<T>(data) else {
        return;
    };
    let written = fuzzing::write_json(&first).expect("a message parsed from JSON writes as JSON");
    let second = fuzzing::parse_json::<T>(&written).unwrap_or_else(|e| {
        panic!(
            "the gateway's own JSON does not parse: {e}\n{}",
            String::from_utf8_lossy(&written)
        )
    });
    assert!(
        same(&first, &second),
        "JSON round trip changed the message:\n{first:?}\n{second:?}"
    );
    assert_eq!(
        value(&written),
        value(&fuzzing::write_json(&second).expect("writes")),
        "JSON is not a fixed point"
    );
    // The mapping of agentmesh_proto::json (the CLI's) agrees.
    let json = json::to_json(&first).expect("to_json");
    let third: T = json::from_json_value(json).expect("from_json_value of to_json");
    assert!(
        same(&first, &third),
        "agentmesh_proto::json round trip changed the message"
    );
}

fn from_proto<T>(data: &[u8])
where
    T: Message + Name + Default + PartialEq + std::fmt::Debug + 'static,
{
    let Ok(message) = T::decode(data) else {
        return;
    };
    let reflective = fuzzing::write_json_reflective(&message);
    let Ok(written) = fuzzing::write_json(&message) else {
        assert!(
            reflective.is_err(),
            "only the direct writer failed on {message:?}"
        );
        return;
    };
    if let Ok(reflective) = &reflective {
        assert_eq!(
            value(&written),
            value(reflective),
            "the direct and the reflective writer disagree on {message:?}"
        );
    }
    let parsed = fuzzing::parse_json::<T>(&written).unwrap_or_else(|e| {
        panic!(
            "the gateway's own JSON does not parse: {e}\n{}",
            String::from_utf8_lossy(&written)
        )
    });
    let again = fuzzing::write_json(&parsed).expect("a parsed message writes");
    assert_eq!(value(&written), value(&again), "JSON is not a fixed point");
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, data)) = data.split_first() else {
        return;
    };
    let _ = fuzzing::refuse_duplicate_keys(data);
    if kind % 2 == 0 {
        match (kind / 2) % 10 {
            0 => from_json::<Envelope>(data),
            1 => from_json::<InvokeRequest>(data),
            2 => from_json::<StreamRequest>(data),
            3 => from_json::<SubmitRequest>(data),
            4 => from_json::<ConverseRequest>(data),
            5 => from_json::<RegisterRequest>(data),
            6 => from_json::<FanOutRequest>(data),
            7 => from_json::<RedriveDeadLettersRequest>(data),
            8 => from_json::<StreamResponse>(data),
            _ => from_json::<LookupRequest>(data),
        }
    } else if (kind / 2) % 2 == 0 {
        from_proto::<Envelope>(data);
    } else {
        from_proto::<StreamResponse>(data);
    }
});
