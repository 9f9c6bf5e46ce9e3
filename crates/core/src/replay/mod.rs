//! Resumable streams. The node numbers every event of a routed stream and
//! keeps the last `window` of them, so a caller that reconnects with the last
//! sequence it saw gets the rest: no gap, no duplicate.
//!
//! The window is also the flow-control bound: the node stops reading from the
//! agent while `window` events are waiting for a slow (or absent) reader, so
//! a slow reader slows the agent and memory stays bounded. A stream left
//! without a reader for `resume_grace` is cancelled upstream.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use agentmesh_proto::{Credentials, v1::StreamResponse};
use futures::{Stream, StreamExt, stream::BoxStream};
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::error::MeshError;

mod forward;

pub use forward::{ForwardingReplay, NodeDirectory, OWNER_SEPARATOR};

/// Limits of resumable streams.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplayConfig {
    /// Events kept per stream for resumption (and buffered at most).
    pub window: usize,
    /// Bytes of events (their encoded size) kept per stream, the same way: whichever of
    /// `window` and this is reached first bounds the stream, so a reader that stops
    /// reading costs at most this much (the newest event is always kept).
    pub window_bytes: usize,
    /// How long a stream without a reader is kept alive for a resume.
    #[serde(with = "humantime_serde")]
    pub resume_grace: Duration,
    /// How long a finished stream stays resumable.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// Most streams open at once; more are refused with RESOURCE_EXHAUSTED.
    pub max_streams: usize,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        Self {
            window: 256,
            window_bytes: 64 * 1024,
            resume_grace: Duration::from_secs(30),
            retention: Duration::from_secs(60),
            max_streams: 10_000,
        }
    }
}

#[derive(Debug)]
struct State {
    /// Buffered events; the front has sequence `first_seq`.
    events: VecDeque<StreamResponse>,
    /// The encoded size of each buffered event, front first, and their sum.
    sizes: VecDeque<usize>,
    bytes: usize,
    first_seq: u64,
    /// Highest sequence handed to a reader.
    delivered: u64,
    /// How the upstream ended, once it has.
    end: Option<Result<(), Status>>,
    readers: usize,
    ended_at: Option<Instant>,
    detached_at: Option<Instant>,
}

impl State {
    fn last_seq(&self) -> u64 {
        self.first_seq + self.events.len() as u64 - 1
    }

    /// Bytes of the buffered events nobody has read yet.
    fn undelivered_bytes(&self) -> usize {
        let read = usize::try_from(self.delivered.saturating_sub(self.first_seq - 1))
            .unwrap_or(usize::MAX)
            .min(self.sizes.len());
        self.sizes.iter().skip(read).sum()
    }
}

/// One resumable stream.
#[derive(Debug)]
struct Replay {
    id: String,
    state: Mutex<State>,
    /// Bumped on every change, so waiters wake.
    version: watch::Sender<u64>,
    cancel: CancellationToken,
}

impl Replay {
    fn changed(&self) {
        self.version.send_modify(|v| *v += 1);
    }
}

/// Where the numbered events of resumable streams are kept for readers that come back: in
/// this process ([`StreamHub`]) or somewhere several nodes can reach.
#[tonic::async_trait]
pub trait ReplayStore: Send + Sync + std::fmt::Debug + 'static {
    /// Starts pumping `upstream` into a new resumable stream and returns a reader from its
    /// beginning. `deadline` ends the stream with DEADLINE_EXCEEDED (naming `hop`) if it
    /// runs that long.
    async fn start(
        self: Arc<Self>,
        upstream: BoxStream<'static, Result<StreamResponse, Status>>,
        deadline: Instant,
        hop: String,
    ) -> Result<BoxStream<'static, Result<StreamResponse, Status>>, MeshError>;

    /// A reader of an existing stream from after `after` (its last seen sequence): no gap,
    /// no duplicate, or OUT_OF_RANGE when those events have left the window. `credentials`
    /// are the caller's, for the node that serves the stream when it is another one.
    async fn resume(
        self: Arc<Self>,
        stream_id: &str,
        after: u64,
        credentials: Option<&Credentials>,
    ) -> Result<BoxStream<'static, Result<StreamResponse, Status>>, MeshError>;
}

/// How long after a stream's retention its sweep runs (past the retention's own boundary).
const SWEEP_MARGIN: Duration = Duration::from_millis(100);

/// The least time between two sweeps run by starting streams: a sweep visits every stream,
/// and a node opening thousands of streams must not visit them all at each start.
const START_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Every resumable stream of this node, in memory.
#[derive(Debug)]
pub struct StreamHub {
    streams: Mutex<HashMap<String, Arc<Replay>>>,
    /// When a starting stream last swept.
    swept_at: Mutex<Instant>,
    config: ReplayConfig,
    /// Put before every stream id: the owning node's id when several nodes share a mesh.
    id_prefix: String,
}

impl StreamHub {
    /// An empty hub.
    pub fn new(config: ReplayConfig) -> Self {
        Self::owned_by(config, "")
    }

    /// An empty hub whose stream ids start with `node_id` and [`OWNER_SEPARATOR`], so any
    /// node can tell where a stream lives.
    pub fn owned_by(config: ReplayConfig, node_id: &str) -> Self {
        let id_prefix = if node_id.is_empty() {
            String::new()
        } else {
            format!("{node_id}{OWNER_SEPARATOR}")
        };
        Self {
            streams: Mutex::default(),
            swept_at: Mutex::new(Instant::now()),
            config,
            id_prefix,
        }
    }

    /// Removes finished streams past their retention; run periodically.
    pub fn sweep(&self) {
        let now = Instant::now();
        self.streams.lock().retain(|_, replay| {
            let state = replay.state.lock();
            !(state.readers == 0
                && state
                    .ended_at
                    .is_some_and(|t| now.duration_since(t) > self.config.retention))
        });
    }

    /// Sweeps unless a starting stream swept less than [`START_SWEEP_INTERVAL`] ago. Each
    /// finished stream also schedules a sweep of its own once its retention is over; this one
    /// catches streams a reader still held then.
    fn sweep_if_due(&self) {
        let now = Instant::now();
        {
            let mut swept_at = self.swept_at.lock();
            if now.duration_since(*swept_at) < START_SWEEP_INTERVAL {
                return;
            }
            *swept_at = now;
        }
        self.sweep();
    }

    fn reader(
        self: &Arc<Self>,
        replay: Arc<Replay>,
        after: u64,
    ) -> BoxStream<'static, Result<StreamResponse, Status>> {
        {
            let mut state = replay.state.lock();
            state.readers += 1;
            state.detached_at = None;
        }
        let guard = ReaderGuard {
            replay: Arc::clone(&replay),
            grace: self.config.resume_grace,
        };
        reader_stream(replay, after, guard).boxed()
    }
}

#[tonic::async_trait]
impl ReplayStore for StreamHub {
    async fn start(
        self: Arc<Self>,
        upstream: BoxStream<'static, Result<StreamResponse, Status>>,
        deadline: Instant,
        hop: String,
    ) -> Result<BoxStream<'static, Result<StreamResponse, Status>>, MeshError> {
        self.sweep_if_due();
        let id = format!("{}{}", self.id_prefix, uuid::Uuid::now_v7());
        let replay = Arc::new(Replay {
            id: id.clone(),
            state: Mutex::new(State {
                events: VecDeque::new(),
                sizes: VecDeque::new(),
                bytes: 0,
                first_seq: 1,
                delivered: 0,
                end: None,
                readers: 0,
                ended_at: None,
                detached_at: None,
            }),
            version: watch::channel(0).0,
            cancel: CancellationToken::new(),
        });
        if self.streams.lock().len() >= self.config.max_streams {
            // Full: finished streams past their retention make room, however recent the
            // last sweep.
            self.sweep();
        }
        {
            let mut streams = self.streams.lock();
            if streams.len() >= self.config.max_streams {
                return Err(MeshError::ResourceExhausted(format!(
                    "too many open streams ({}); retry later",
                    self.config.max_streams
                )));
            }
            streams.insert(id, Arc::clone(&replay));
        }
        let hub = Arc::downgrade(&self);
        let retention = self.config.retention;
        let pumped = pump(
            Arc::clone(&replay),
            upstream,
            Window {
                events: self.config.window,
                bytes: self.config.window_bytes,
            },
            deadline,
            hop,
        );
        tokio::spawn(async move {
            pumped.await;
            // The finished stream's events go once its retention is over, even if no other
            // stream starts (which also sweeps): memory comes back after a burst of streams.
            tokio::time::sleep(retention + SWEEP_MARGIN).await;
            if let Some(hub) = hub.upgrade() {
                hub.sweep();
            }
        });
        Ok(self.reader(replay, 0))
    }

    async fn resume(
        self: Arc<Self>,
        stream_id: &str,
        after: u64,
        _credentials: Option<&Credentials>,
    ) -> Result<BoxStream<'static, Result<StreamResponse, Status>>, MeshError> {
        let replay = self
            .streams
            .lock()
            .get(stream_id)
            .cloned()
            .ok_or_else(|| MeshError::StreamNotFound(stream_id.to_owned()))?;
        {
            let state = replay.state.lock();
            if after + 1 < state.first_seq {
                return Err(MeshError::OutOfRange(format!(
                    "stream {stream_id}: events after {after} are no longer in the replay window (it starts at {})",
                    state.first_seq
                )));
            }
            let last = state.last_seq();
            if after > last {
                return Err(MeshError::OutOfRange(format!(
                    "stream {stream_id}: sequence {after} was never sent (last is {last})"
                )));
            }
        }
        Ok(self.reader(replay, after))
    }
}

/// Tracks a reader; when the last one leaves an unfinished stream, the
/// upstream is cancelled unless someone resumes within the grace period.
struct ReaderGuard {
    replay: Arc<Replay>,
    grace: Duration,
}

impl Drop for ReaderGuard {
    fn drop(&mut self) {
        let mut state = self.replay.state.lock();
        state.readers -= 1;
        if state.readers > 0 || state.end.is_some() {
            return;
        }
        let detached = Instant::now();
        state.detached_at = Some(detached);
        drop(state);
        let replay = Arc::clone(&self.replay);
        let grace = self.grace;
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            let abandoned = {
                let state = replay.state.lock();
                state.readers == 0 && state.end.is_none() && state.detached_at == Some(detached)
            };
            if abandoned {
                tracing::info!(stream = %replay.id, "no reader came back; cancelling the stream upstream");
                replay.cancel.cancel();
            }
        });
    }
}

fn reader_stream(
    replay: Arc<Replay>,
    mut after: u64,
    guard: ReaderGuard,
) -> impl Stream<Item = Result<StreamResponse, Status>> {
    let mut version = replay.version.subscribe();
    async_stream::stream! {
        let _guard = guard;
        loop {
            version.borrow_and_update();
            let next = {
                let mut state = replay.state.lock();
                let wanted = after + 1;
                if wanted < state.first_seq {
                    Some(Err(Status::out_of_range(format!(
                        "the reader fell behind the replay window of stream {}", replay.id
                    ))))
                } else if let Some(event) = state.events.get((wanted - state.first_seq) as usize) {
                    let event = event.clone();
                    after = wanted;
                    state.delivered = state.delivered.max(wanted);
                    Some(Ok(event))
                } else {
                    match &state.end {
                        Some(Ok(())) => return,
                        Some(Err(status)) => Some(Err(status.clone())),
                        None => None,
                    }
                }
            };
            match next {
                Some(Ok(event)) => {
                    replay.changed();
                    yield Ok(event);
                }
                Some(Err(status)) => {
                    yield Err(status);
                    return;
                }
                None => {
                    if version.changed().await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// How much of a stream is kept: events and their bytes.
#[derive(Debug, Clone, Copy)]
struct Window {
    events: usize,
    bytes: usize,
}

async fn pump(
    replay: Arc<Replay>,
    mut upstream: BoxStream<'static, Result<StreamResponse, Status>>,
    window: Window,
    deadline: Instant,
    hop: String,
) {
    let mut version = replay.version.subscribe();
    let end = loop {
        // Wait while the window is full of events nobody has read yet.
        loop {
            version.borrow_and_update();
            let full = {
                let state = replay.state.lock();
                let undelivered = (state.first_seq + state.events.len() as u64 - 1)
                    .saturating_sub(state.delivered);
                undelivered >= window.events as u64
                    || (undelivered > 0 && state.undelivered_bytes() >= window.bytes)
            };
            if !full {
                break;
            }
            tokio::select! {
                _ = replay.cancel.cancelled() => break,
                _ = tokio::time::sleep_until(deadline.into()) => break,
                _ = version.changed() => {}
            }
        }
        let item = tokio::select! {
            _ = replay.cancel.cancelled() => {
                break Err(Status::cancelled("stream abandoned: no reader resumed it in time"));
            }
            _ = tokio::time::sleep_until(deadline.into()) => {
                break Err(MeshError::DeadlineExceeded(format!(
                    "deadline exceeded while streaming from {hop}"
                )).into());
            }
            item = upstream.next() => item,
        };
        match item {
            Some(Ok(mut event)) => {
                let mut state = replay.state.lock();
                event.stream_id = replay.id.clone();
                event.sequence = state.first_seq + state.events.len() as u64;
                let size = prost::Message::encoded_len(&event);
                state.events.push_back(event);
                state.sizes.push_back(size);
                state.bytes += size;
                // Over the byte bound, only events a reader already has make room: the
                // wait above bounds the unread ones.
                while state.events.len() > window.events
                    || (state.events.len() > 1
                        && state.bytes > window.bytes
                        && state.first_seq <= state.delivered)
                {
                    state.events.pop_front();
                    state.bytes -= state.sizes.pop_front().unwrap_or_default();
                    state.first_seq += 1;
                }
                drop(state);
                replay.changed();
            }
            Some(Err(status)) => break Err(status),
            None => break Ok(()),
        }
    };
    // Dropping the upstream here cancels the agent's side if it is still going.
    drop(upstream);
    let mut state = replay.state.lock();
    state.end = Some(end);
    state.ended_at = Some(Instant::now());
    drop(state);
    replay.changed();
}
