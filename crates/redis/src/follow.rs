//! Following a change channel: subscribe, reload what may have been missed, then hand
//! every message over in order. A lost connection (Redis restarted, network gone, or a
//! ping unanswered) is reopened with backoff, and the follower reloads again.

use std::{future::Future, sync::Arc, time::Duration};

use agentmesh_core::MeshError;
use agentmesh_resilience::Backoff;
use futures::StreamExt;
use redis::{
    RedisError, Value,
    aio::{PubSubSink, PubSubStream},
};
use tokio_util::sync::CancellationToken;

use crate::store::RedisStore;

/// How often a quiet subscription checks that Redis still answers.
const PING_EVERY: Duration = Duration::from_secs(5);

/// What a follower wants after a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// Go on with the next message.
    Continue,
    /// Messages were missed: reload before going on.
    Reload,
}

/// Keeps some local state in step with a change channel.
pub(crate) trait Follower: Send + Sync + 'static {
    /// What is followed, for logs.
    fn name(&self) -> &'static str;

    /// Called once subscribed, the first time and after every reconnect, before any
    /// message: the follower reloads what it may have missed.
    fn reload(&self) -> impl Future<Output = Result<(), RedisError>> + Send;

    /// One message from the channel.
    fn message(&self, payload: &[u8]) -> Next;
}

/// Subscribes to `channel` and reloads the follower once (failing with `Unavailable` if
/// either fails), then follows the channel in the background until `cancel`.
pub(crate) async fn follow<F: Follower>(
    store: RedisStore,
    channel: String,
    follower: Arc<F>,
    cancel: CancellationToken,
) -> Result<(), MeshError> {
    let subscription = store
        .subscribe(&channel)
        .await
        .map_err(|error| store.unavailable(&format!("subscribing to {channel}"), &error))?;
    follower
        .reload()
        .await
        .map_err(|error| store.unavailable(&format!("loading the {}", follower.name()), &error))?;
    tokio::spawn(run(store, channel, follower, cancel, subscription));
    Ok(())
}

async fn run<F: Follower>(
    store: RedisStore,
    channel: String,
    follower: Arc<F>,
    cancel: CancellationToken,
    first: (PubSubSink, PubSubStream),
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut subscription = Some(first);
    loop {
        let (mut sink, mut stream) = match subscription.take() {
            Some(subscription) => subscription,
            None => {
                let attempt = async {
                    let subscription = store.subscribe(&channel).await?;
                    follower.reload().await?;
                    Ok::<_, RedisError>(subscription)
                };
                let outcome = tokio::select! {
                    _ = cancel.cancelled() => return,
                    outcome = attempt => outcome,
                };
                match outcome {
                    Ok(subscription) => {
                        tracing::info!(follower = follower.name(), %channel, "following changes again; reloaded");
                        backoff.reset();
                        subscription
                    }
                    Err(error) => {
                        let delay = backoff.next_delay();
                        tracing::warn!(follower = follower.name(), %channel, %error, retry_in_ms = delay.as_millis() as u64, "shared store unreachable; serving what is cached");
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep(delay) => continue,
                        }
                    }
                }
            }
        };
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.reset();
        let lost = loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                message = stream.next() => match message {
                    Some(message) => {
                        ping.reset();
                        if follower.message(message.get_payload_bytes()) == Next::Reload {
                            tracing::warn!(follower = follower.name(), %channel, "changes were missed; reloading");
                            if let Err(error) = follower.reload().await {
                                break error.to_string();
                            }
                        }
                    }
                    None => break "connection closed".to_owned(),
                },
                _ = ping.tick() => {
                    match tokio::time::timeout(store.response_timeout(), sink.ping::<Value>()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(error)) => break error.to_string(),
                        Err(_) => break "ping unanswered".to_owned(),
                    }
                }
            }
        };
        tracing::warn!(follower = follower.name(), %channel, reason = %lost, "lost the change channel; serving what is cached until it is back");
    }
}
