//! Reading Server-Sent Events the way a client sees them on the wire.

use std::{pin::Pin, time::Duration};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde_json::Value;

/// One Server-Sent Event.
#[derive(Debug, Clone)]
pub struct SseEvent {
    /// The `id:` field; the gateway's is `<stream_id>:<sequence>`.
    pub id: Option<String>,
    /// The `event:` field (`message` when absent).
    pub event: String,
    /// The `data:` lines, joined by newlines.
    pub data: String,
}

impl SseEvent {
    /// The data, parsed as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap()
    }

    /// The sequence in `id: <stream_id>:<sequence>`.
    pub fn sequence(&self) -> u64 {
        let id = self.id.as_deref().expect("event has an id");
        id.rsplit_once(':').unwrap().1.parse().unwrap()
    }

    /// The stream id in `id: <stream_id>:<sequence>`.
    pub fn stream_id(&self) -> String {
        let id = self.id.as_deref().expect("event has an id");
        id.rsplit_once(':').unwrap().0.to_owned()
    }
}

/// A reader of the SSE wire format over a response body.
pub struct SseReader {
    body: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    buffer: Vec<u8>,
    /// Comment lines seen so far (the gateway's keep-alives).
    pub comments: usize,
}

impl std::fmt::Debug for SseReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SseReader")
            .field("buffered", &self.buffer.len())
            .field("comments", &self.comments)
            .finish_non_exhaustive()
    }
}

impl SseReader {
    /// Reads `response`, which must be a 200 with `text/event-stream`.
    pub fn new(response: reqwest::Response) -> Self {
        assert_eq!(response.status().as_u16(), 200, "SSE answers 200");
        assert_eq!(
            response.headers()["content-type"],
            "text/event-stream",
            "SSE content type"
        );
        Self {
            body: Box::pin(response.bytes_stream()),
            buffer: Vec::new(),
            comments: 0,
        }
    }

    /// The next event (comments are counted, not returned); `None` at the end.
    pub async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buffer.drain(..end + 2).collect();
                let block = String::from_utf8(block).expect("SSE is UTF-8");
                let mut event = SseEvent {
                    id: None,
                    event: "message".into(),
                    data: String::new(),
                };
                let mut has_data = false;
                for line in block.lines().filter(|l| !l.is_empty()) {
                    if line.starts_with(':') {
                        self.comments += 1;
                        continue;
                    }
                    let (field, value) = line.split_once(':').unwrap_or((line, ""));
                    let value = value.strip_prefix(' ').unwrap_or(value);
                    match field {
                        "id" => event.id = Some(value.to_owned()),
                        "event" => event.event = value.to_owned(),
                        "data" => {
                            if has_data {
                                event.data.push('\n');
                            }
                            event.data.push_str(value);
                            has_data = true;
                        }
                        _ => {}
                    }
                }
                if has_data {
                    return Some(event);
                }
                continue;
            }
            match tokio::time::timeout(Duration::from_secs(20), self.body.next())
                .await
                .expect("the SSE stream stalled")
            {
                Some(Ok(chunk)) => self.buffer.extend_from_slice(&chunk),
                Some(Err(error)) => panic!("SSE body failed: {error}"),
                None => return None,
            }
        }
    }

    /// Every remaining event, up to the end of the stream.
    pub async fn rest(mut self) -> Vec<SseEvent> {
        let mut events = Vec::new();
        while let Some(event) = self.next().await {
            events.push(event);
        }
        events
    }
}
