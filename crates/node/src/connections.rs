//! Serves the node's one port: accepts connections up to a cap and runs each through hyper
//! (HTTP/1 or HTTP/2, detected per connection) with the limits of [`ConnectionSettings`]:
//!
//! - a connection that has not started a request within `header_read_timeout` is closed
//!   (silent sockets, half-sent request heads, HTTP/2 connections that never send a request);
//! - a connection with no call in progress for `idle_timeout` is closed (HTTP/2: GOAWAY, so a
//!   client's call racing the close is still served). A call in progress, a quiet stream
//!   included, keeps its connection: it is in progress until its response body ends;
//! - HTTP/2 clients that stop answering pings are dropped;
//! - past `max_connections`, a new connection is closed as soon as it is accepted, so silent
//!   clients cannot use up the process's file descriptors;
//! - with TLS on, the handshake comes first and must finish within the handshake timeout;
//!   a verified client certificate's [`TlsPeer`] rides in every request's extensions.
//!
//! When `shutdown` completes no more connections are accepted and every open one is asked to
//! finish its calls and close; [`serve`] returns once they all have.

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use axum::{Router, body::Body};
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
    service::TowerToHyperService,
};
use parking_lot::Mutex;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    sync::{Notify, Semaphore},
    task::JoinSet,
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::{
    config::ConnectionSettings,
    tls::{HandshakeFailure, ServerTls, TlsPeer},
};

/// How long a connection closed for being idle may take to say goodbye before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Most an HTTP/1 connection buffers, read side (a request head) or write side.
const HTTP1_MAX_BUF: usize = 64 * 1024;
/// Pause after a failed accept (e.g. out of file descriptors) before the next one.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves `app` on `listener` (over TLS with `tls`) until `shutdown` completes and every
/// connection has closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    settings: &ConnectionSettings,
    tls: Option<Arc<ServerTls>>,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        // What a connection may buffer either way: a request head, or response bytes a
        // client is not reading (an unread event stream). hyper's default is ~400 KiB.
        .max_buf_size(HTTP1_MAX_BUF);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(settings.http2_keep_alive_interval)
        .keep_alive_timeout(settings.http2_keep_alive_timeout);
    let builder = Arc::new(builder);
    let cap = settings.connection_cap();
    let permits = Arc::new(Semaphore::new(cap));
    let closing = CancellationToken::new();
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(%error, "cannot accept a connection");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                };
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    tracing::warn!(%peer, max_connections = cap, "too many connections; closing the new one");
                    drop(stream);
                    continue;
                };
                let connection = Connection {
                    builder: builder.clone(),
                    app: app.clone(),
                    header_read_timeout: settings.header_read_timeout,
                    idle_timeout: settings.idle_timeout,
                    closing: closing.clone(),
                    tls: tls.clone(),
                };
                connections.spawn(async move {
                    connection.serve(stream).await;
                    drop(permit);
                });
            }
        }
    }
    drop(listener);
    closing.cancel();
    while connections.join_next().await.is_some() {}
}

/// One accepted connection and what it is served with.
struct Connection {
    builder: Arc<auto::Builder<TokioExecutor>>,
    app: Router,
    header_read_timeout: Duration,
    idle_timeout: Duration,
    closing: CancellationToken,
    tls: Option<Arc<ServerTls>>,
}

impl Connection {
    async fn serve(mut self, stream: TcpStream) {
        // Without TCP_NODELAY, Nagle's algorithm holds back the last small write of a
        // response until the client's delayed ACK (~40 ms per client-streaming call).
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
        let address = stream.peer_addr().ok();
        let Some(tls) = self.tls.take() else {
            return self.serve_http(stream, address, None).await;
        };
        // The configuration of the moment: a reload affects only later connections.
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
        let handshake = async {
            let mut first = [0u8; 1];
            match stream.peek(&mut first).await {
                Ok(1) if first[0] != TLS_HANDSHAKE_RECORD => Err(Ok(stream)),
                Ok(_) => acceptor.accept(stream).await.map_err(Err),
                Err(error) => Err(Err(error)),
            }
        };
        // Boxed, like the TLS connection below: the TLS states are several KiB, and inline
        // they would size the task of every connection, plaintext ones included.
        let handshake = Box::pin(tokio::time::timeout(tls.handshake_timeout(), handshake));
        let stream = tokio::select! {
            () = self.closing.cancelled() => return,
            result = handshake => match result {
                Ok(Ok(stream)) => stream,
                Ok(Err(Ok(plaintext))) => {
                    tls.count_failure(HandshakeFailure::Plaintext);
                    return refuse_plaintext(plaintext).await;
                }
                Ok(Err(Err(error))) => {
                    tls.count_failure(HandshakeFailure::Refused);
                    tracing::debug!(%error, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tls.count_failure(HandshakeFailure::Timeout);
                    tracing::debug!("TLS handshake timed out; closing the connection");
                    return;
                }
            },
        };
        // Present only if the client's certificate verified against `tls.client_ca`.
        let peer = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(TlsPeer::from_certificate);
        Box::pin(self.serve_http(stream, address, peer)).await;
    }

    async fn serve_http<I>(self, io: I, address: Option<SocketAddr>, peer: Option<TlsPeer>)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let calls = Arc::new(CallsInProgress::new());
        let app = self.app;
        let tracked = calls.clone();
        // The peer's address, for the rate limit of callers without credentials.
        let address = address.map(axum::extract::ConnectInfo);
        let service = tower::service_fn(move |mut request: http::Request<Incoming>| {
            let call = tracked.started();
            let app = app.clone();
            if let Some(address) = address {
                request.extensions_mut().insert(address);
            }
            if let Some(peer) = &peer {
                request.extensions_mut().insert(peer.clone());
            }
            async move {
                let response = app.oneshot(request).await?;
                Ok::<_, Infallible>(
                    response.map(|body| Body::new(TrackedBody { body, _call: call })),
                )
            }
        });
        let connection = self
            .builder
            .serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(service));
        tokio::pin!(connection);
        let idle = calls.idle_past(self.header_read_timeout, self.idle_timeout);
        tokio::pin!(idle);
        // Set once the connection was asked to close because it sat idle.
        let mut drop_at: Option<Instant> = None;
        let mut asked_to_close = false;
        loop {
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(error) = result {
                        tracing::debug!(%error, "connection ended with an error");
                    }
                    return;
                }
                () = self.closing.cancelled(), if !asked_to_close => {
                    asked_to_close = true;
                    connection.as_mut().graceful_shutdown();
                }
                () = &mut idle, if !asked_to_close => {
                    tracing::debug!("closing an idle connection");
                    asked_to_close = true;
                    drop_at = Some(Instant::now() + CLOSE_GRACE);
                    connection.as_mut().graceful_shutdown();
                }
                () = sleep_until(drop_at) => return,
            }
        }
    }
}

/// The first byte of a TLS connection: a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Answers a plaintext HTTP/1 request on the TLS port with a 400 that says why, rather than
/// a reset (an HTTP/2 or other client just sees the connection close).
async fn refuse_plaintext(mut stream: TcpStream) {
    use tokio::io::AsyncWriteExt;
    tracing::debug!("plaintext client on the TLS port; closing the connection");
    let mut start = [0u8; 3];
    let is_http1 = matches!(stream.peek(&mut start).await, Ok(3) if start.iter().all(u8::is_ascii_uppercase) && &start != b"PRI");
    if is_http1 {
        let body = "this port serves TLS: use https://\n";
        let response = format!(
            "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = tokio::time::timeout(CLOSE_GRACE, async {
            stream.write_all(response.as_bytes()).await?;
            stream.shutdown().await
        })
        .await;
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Counts a connection's calls in progress and when it last had none.
struct CallsInProgress {
    state: Mutex<CallsState>,
    changed: Notify,
}

struct CallsState {
    in_progress: usize,
    /// When the count last fell to zero (or the connection was accepted).
    idle_since: Instant,
    /// Whether any call has started on the connection yet.
    started_any: bool,
}

impl CallsInProgress {
    fn new() -> Self {
        Self {
            state: Mutex::new(CallsState {
                in_progress: 0,
                idle_since: Instant::now(),
                started_any: false,
            }),
            changed: Notify::new(),
        }
    }

    fn started(self: &Arc<Self>) -> CallGuard {
        let mut state = self.state.lock();
        state.in_progress += 1;
        state.started_any = true;
        drop(state);
        self.changed.notify_one();
        CallGuard(self.clone())
    }

    /// Completes once no call has been in progress for the timeout that applies: the
    /// first-request timeout until a call has started, the idle timeout after.
    async fn idle_past(&self, first_request: Duration, idle: Duration) {
        loop {
            let deadline = {
                let state = self.state.lock();
                (state.in_progress == 0).then(|| {
                    let timeout = if state.started_any {
                        idle
                    } else {
                        first_request
                    };
                    state.idle_since + timeout
                })
            };
            match deadline {
                Some(deadline) if deadline <= Instant::now() => return,
                Some(deadline) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(deadline) => {}
                        () = self.changed.notified() => {}
                    }
                }
                None => self.changed.notified().await,
            }
        }
    }
}

/// One call in progress; it ends when dropped (with the response body it travels with).
struct CallGuard(Arc<CallsInProgress>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        let mut state = self.0.state.lock();
        state.in_progress -= 1;
        if state.in_progress == 0 {
            state.idle_since = Instant::now();
        }
        drop(state);
        self.0.changed.notify_one();
    }
}

/// A response body that keeps its call counted in progress until it ends or is dropped.
struct TrackedBody {
    body: Body,
    _call: CallGuard,
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
