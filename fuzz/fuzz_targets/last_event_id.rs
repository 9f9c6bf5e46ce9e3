//! The SSE `Last-Event-ID` parser of the stream routes.
//!
//! Properties: it never panics; what it accepts names a non-empty stream id, and the id
//! written back in the gateway's form (`<stream_id>:<sequence>`) parses to the same point;
//! anything it accepts equals its trimmed form's parse.
#![no_main]

use agentmesh_gateway::fuzzing::parse_last_event_id;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = std::str::from_utf8(data) else {
        return;
    };
    match parse_last_event_id(value) {
        Ok((stream_id, after)) => {
            assert!(
                !stream_id.is_empty(),
                "accepted an empty stream id: {value:?}"
            );
            let written = format!("{stream_id}:{after}");
            assert_eq!(
                parse_last_event_id(&written),
                Ok((stream_id, after)),
                "{value:?} does not round-trip through {written:?}"
            );
            assert_eq!(
                parse_last_event_id(value.trim()),
                parse_last_event_id(value)
            );
        }
        Err(message) => {
            assert!(
                message.contains("Last-Event-ID"),
                "unclear error: {message}"
            );
        }
    }
});
