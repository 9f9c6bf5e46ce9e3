//! The tower layer in front of every gRPC service and HTTP route (it sits inside the edge
//! layer, which has built the call's context): authenticates the bearer token, stores the
//! principal in the call's [`CallContext`], and applies the caller's rate limit. Health stays
//! open; `/metrics` and the schema documents as configured.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use agentmesh_gateway::ApiError;
use agentmesh_proto::{CallContext, Credentials, ERROR_DOMAIN, Principal, metadata::AUTHORIZATION};
use axum::extract::ConnectInfo;
use futures::future::BoxFuture;
use http::{
    HeaderValue, Method, Request, Response, StatusCode, Uri,
    header::{CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE},
};
use tonic::Code;
use tonic_types::{ErrorDetails, StatusExt};
use tower::{Layer, Service};

use super::{AuthConfig, Authenticator, RateLimitConfig, RateLimiter};
use crate::tls::TlsPeer;

/// The query parameter a browser's EventSource or WebSocket can carry its token in.
const QUERY_TOKEN: &str = "access_token";

/// Counts of calls the layer turned away, for `/metrics`.
#[derive(Debug, Default)]
pub struct AuthStats {
    /// Calls without valid credentials.
    pub unauthenticated: AtomicU64,
    /// Calls over their caller's rate.
    pub rate_limited: AtomicU64,
}

#[derive(Debug)]
struct Shared {
    authenticator: Option<Authenticator>,
    limiter: Option<RateLimiter>,
    public_metrics: bool,
    public_schema: bool,
    query_token: bool,
    stats: Arc<AuthStats>,
}

/// Authenticates calls and limits their rate (see the module docs).
#[derive(Debug, Clone)]
pub struct AuthLayer {
    shared: Arc<Shared>,
}

impl AuthLayer {
    /// The layer for `auth` and `rate_limit` (key files are read here).
    pub fn new(auth: &AuthConfig, rate_limit: &RateLimitConfig) -> Result<Self, String> {
        let authenticator = if auth.enabled {
            Some(Authenticator::new(auth)?)
        } else {
            None
        };
        Ok(Self {
            shared: Arc::new(Shared {
                authenticator,
                limiter: rate_limit.enabled().then(|| RateLimiter::new(rate_limit)),
                public_metrics: auth.public_metrics,
                public_schema: auth.public_schema,
                query_token: auth.query_token,
                stats: Arc::default(),
            }),
        })
    }

    /// The layer's counts.
    pub fn stats(&self) -> Arc<AuthStats> {
        Arc::clone(&self.shared.stats)
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            shared: Arc::clone(&self.shared),
        }
    }
}

/// The service produced by [`AuthLayer`].
#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    shared: Arc<Shared>,
}

/// Why a call is turned away.
enum Refusal {
    Unauthenticated(String),
    RateLimited(Duration),
}

impl<S, B, RB> Service<Request<B>> for AuthService<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Future: Send + 'static,
    RB: Default + From<String> + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        match self.shared.admit(&mut request) {
            Ok(()) => Box::pin(self.inner.call(request)),
            Err(refusal) => {
                let count = match refusal {
                    Refusal::Unauthenticated(_) => &self.shared.stats.unauthenticated,
                    Refusal::RateLimited(_) => &self.shared.stats.rate_limited,
                };
                count.fetch_add(1, Ordering::Relaxed);
                let response = refuse(&request, refusal);
                Box::pin(async move { Ok(response) })
            }
        }
    }
}

impl Shared {
    fn is_open(&self, method: &Method, path: &str) -> bool {
        // CORS preflights carry no credentials by design.
        *method == Method::OPTIONS
            || path == "/healthz"
            || path == "/readyz"
            || path.starts_with("/grpc.health.v1.Health/")
            || (self.public_metrics && path == "/metrics")
            || (self.public_schema
                && (path == "/openapi.json"
                    || path.starts_with("/grpc.reflection.v1.ServerReflection/")
                    || path.starts_with("/grpc.reflection.v1alpha.ServerReflection/")))
    }

    fn admit<B>(&self, request: &mut Request<B>) -> Result<(), Refusal> {
        if self.is_open(request.method(), request.uri().path()) {
            return Ok(());
        }
        let principal = match &self.authenticator {
            None => {
                // Authentication off: a token sent anyway is ignored, and an `access_token`
                // query parameter taken out, so a client that always sends one still works.
                self.token(request);
                None
            }
            Some(authenticator) => {
                let Some(token) = self.token(request) else {
                    // A client certificate verified against `tls.client_ca` names the caller
                    // when it sends no token.
                    let peer = request.extensions().get::<TlsPeer>().ok_or_else(|| {
                        Refusal::Unauthenticated(
                            "authentication required: send `authorization: Bearer <token>`".into(),
                        )
                    })?;
                    let principal = Principal {
                        id: peer.identity.clone(),
                        groups: Vec::new(),
                    };
                    return self.admit_principal(request, Some((principal, None)));
                };
                match authenticator.authenticate(&token) {
                    Ok(principal) => Some((principal, Some(token))),
                    Err(rejected) => {
                        let correlation_id = request
                            .extensions()
                            .get::<CallContext>()
                            .map(|ctx| ctx.correlation_id.clone())
                            .unwrap_or_default();
                        tracing::info!(%correlation_id, path = %request.uri().path(), reason = %rejected.0, "credentials rejected");
                        return Err(Refusal::Unauthenticated(
                            "invalid or expired credentials".into(),
                        ));
                    }
                }
            }
        };
        self.admit_principal(request, principal)
    }

    /// Applies the rate limit to the caller and stores who it is in the request.
    fn admit_principal<B>(
        &self,
        request: &mut Request<B>,
        principal: Option<(Principal, Option<String>)>,
    ) -> Result<(), Refusal> {
        if let Some(limiter) = &self.limiter {
            let key = match &principal {
                Some((principal, _)) => Some(format!("p:{}", principal.id)),
                None => request
                    .extensions()
                    .get::<ConnectInfo<SocketAddr>>()
                    .map(|ConnectInfo(peer)| format!("ip:{}", peer.ip())),
            };
            if let Some(key) = key {
                let id = principal.as_ref().map(|(p, _)| p.id.as_str());
                if let Err(wait) = limiter.acquire(&key, id) {
                    tracing::info!(caller = %key, path = %request.uri().path(), "rate limited");
                    return Err(Refusal::RateLimited(wait));
                }
            }
        }
        if let Some((principal, token)) = principal {
            // In the call's context for the faces and the core, and on its own for any
            // handler that only wants to know who is calling.
            request.extensions_mut().insert(principal.clone());
            if let Some(ctx) = request.extensions_mut().get_mut::<CallContext>() {
                ctx.principal = Some(principal);
                ctx.credentials = token.map(Credentials::bearer);
            }
        }
        Ok(())
    }

    /// The bearer token of `request`: its `authorization` header or, where allowed, the
    /// `access_token` query parameter of a GET (then taken out of the URI, so it reaches no
    /// handler or log below).
    fn token<B>(&self, request: &mut Request<B>) -> Option<String> {
        // The query parameter is taken out even when the header is there, so no route ever
        // sees it.
        let from_query = self.query_token(request);
        if let Some(value) = request.headers().get(AUTHORIZATION) {
            let value = value.to_str().ok()?.trim();
            let (scheme, token) = value.split_once(' ')?;
            return scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| token.trim().to_owned())
                .filter(|t| !t.is_empty());
        }
        from_query
    }

    /// Takes the `access_token` query parameter out of a GET's URI, where allowed.
    fn query_token<B>(&self, request: &mut Request<B>) -> Option<String> {
        if !self.query_token || request.method() != Method::GET {
            return None;
        }
        let query = request.uri().query()?;
        let mut token = None;
        let rest: Vec<&str> = query
            .split('&')
            .filter(|pair| {
                match pair
                    .strip_prefix(QUERY_TOKEN)
                    .and_then(|v| v.strip_prefix('='))
                {
                    Some(value) => {
                        token = Some(percent_decode(value));
                        false
                    }
                    None => true,
                }
            })
            .collect();
        let token = token?;
        let path = request.uri().path();
        let path_and_query = if rest.is_empty() {
            path.to_owned()
        } else {
            format!("{path}?{}", rest.join("&"))
        };
        let mut parts = request.uri().clone().into_parts();
        parts.path_and_query = path_and_query.parse().ok();
        if let Ok(uri) = Uri::from_parts(parts) {
            *request.uri_mut() = uri;
        }
        Some(token).filter(|t| !t.is_empty())
    }
}

/// Decodes `%XX` escapes (JWTs and hex tokens rarely need them, but a client may escape).
fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(byte) = u8::from_str_radix(&value[i + 1..i + 3], 16) {
                out.push(byte);
                i += 3;
                continue;
            }
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The answer to a refused call, in the caller's protocol: gRPC UNAUTHENTICATED or
/// RESOURCE_EXHAUSTED with a `RetryInfo`; HTTP 401 with `WWW-Authenticate: Bearer` or 429 with
/// `Retry-After`, and the gateway's JSON error.
fn refuse<B, RB: Default + From<String>>(request: &Request<B>, refusal: Refusal) -> Response<RB> {
    let grpc = request
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let (status, extra) = match refusal {
        Refusal::Unauthenticated(message) => {
            let details = ErrorDetails::with_error_info(
                "UNAUTHENTICATED",
                ERROR_DOMAIN,
                std::collections::HashMap::<String, String>::new(),
            );
            (
                tonic::Status::with_error_details(Code::Unauthenticated, message, details),
                (
                    WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"agentmesh\""),
                ),
            )
        }
        Refusal::RateLimited(wait) => {
            let mut details = ErrorDetails::with_error_info(
                "RATE_LIMITED",
                ERROR_DOMAIN,
                std::collections::HashMap::<String, String>::new(),
            );
            details.set_retry_info(Some(wait));
            let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
            (
                tonic::Status::with_error_details(
                    Code::ResourceExhausted,
                    format!(
                        "rate limit exceeded: retry in {} ms",
                        wait.as_millis().max(1)
                    ),
                    details,
                ),
                (RETRY_AFTER, HeaderValue::from(seconds)),
            )
        }
    };
    let mut response = if grpc {
        status.into_http()
    } else {
        let error = ApiError::from(&status);
        let mut response = Response::new(RB::from(error.to_json().to_string()));
        *response.status_mut() = match status.code() {
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            _ => StatusCode::TOO_MANY_REQUESTS,
        };
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        response
    };
    response.headers_mut().insert(extra.0, extra.1);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_query_tokens() {
        assert_eq!(percent_decode("a%2Eb.c"), "a.b.c");
        assert_eq!(percent_decode("abc%"), "abc%");
        assert_eq!(percent_decode("abc%4"), "abc%4");
    }
}
