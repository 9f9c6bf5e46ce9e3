//! Who may use the node, and how often.
//!
//! - [`AuthConfig`] (`[auth]`): off by default; when on, every call but health (and the
//!   schema documents, unless told otherwise) must carry `authorization: Bearer <token>`,
//!   an API token from the configuration (stored as its SHA-256) or a JWT;
//! - [`credentials`]: turns a bearer token into a [`Principal`](agentmesh_proto::Principal);
//! - [`rate_limit`]: a token bucket per principal (per peer address without authentication);
//! - [`layer`]: the tower layer in front of every gRPC service and HTTP route that does both
//!   and stores the principal in the call's context;
//! - authorisation itself is [`agentmesh_core::access`], checked where each operation knows
//!   its target, so gRPC and HTTP share it.

pub mod credentials;
pub mod layer;
pub mod rate_limit;

use std::{path::PathBuf, time::Duration};

use agentmesh_core::access::PolicyRule;
use serde::{Deserialize, Serialize};

pub use credentials::{Authenticator, hash_token};
pub use layer::{AuthLayer, AuthStats};
pub use rate_limit::{RateLimitConfig, RateLimiter, RateOverride};

/// `[auth]`: authentication and the authorisation policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Whether calls must authenticate. Off by default (the local first run needs no token);
    /// once on, whatever no `[[auth.policy]]` rule grants is denied.
    pub enabled: bool,
    /// API tokens: `[[auth.tokens]]` with the token's `hash`, its `principal` and `groups`.
    pub tokens: Vec<TokenConfig>,
    /// JWT verification (`[auth.jwt]`).
    pub jwt: JwtConfig,
    /// Authorisation rules (`[[auth.policy]]`): `principals`, `actions`, `resources`.
    pub policy: Vec<PolicyRule>,
    /// Serve `/metrics` without a token.
    pub public_metrics: bool,
    /// Serve `/openapi.json` and gRPC server reflection without a token (they describe the
    /// API, they hold no data).
    pub public_schema: bool,
    /// Accept the token as an `access_token` query parameter on GET requests (SSE and
    /// WebSocket), for browsers, whose EventSource and WebSocket cannot set headers. Query
    /// strings end up in access logs: prefer short-lived JWTs there.
    pub query_token: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            tokens: Vec::new(),
            jwt: JwtConfig::default(),
            policy: Vec::new(),
            public_metrics: false,
            public_schema: true,
            query_token: true,
        }
    }
}

/// One API token (`[[auth.tokens]]`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TokenConfig {
    /// `sha256:<hex>` of the token (`agentmesh auth hash-token` prints it); the token itself
    /// is never stored.
    pub hash: String,
    /// The principal id the token authenticates as.
    pub principal: String,
    /// Groups or roles the token grants (`group:<name>` in policies).
    pub groups: Vec<String>,
}

/// `[auth.jwt]`: which JWTs are accepted. Off unless a key is configured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JwtConfig {
    /// HS256 shared secret (prefer `hs256_secret_file`).
    pub hs256_secret: String,
    /// File holding the HS256 secret (surrounding whitespace ignored).
    pub hs256_secret_file: PathBuf,
    /// PEM public keys: RSA (RS256) or Ed25519 (EdDSA).
    pub public_key_files: Vec<PathBuf>,
    /// A JWKS file (`{"keys": [...]}`): RSA, Ed25519 (OKP) or EC P-256 keys, chosen by `kid`.
    pub jwks_file: PathBuf,
    /// Required `iss`, when set.
    pub issuer: String,
    /// Required `aud` (one of the token's), when set.
    pub audience: String,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
}

impl Default for JwtConfig {
    fn default() -> Self {
        Self {
            hs256_secret: String::new(),
            hs256_secret_file: PathBuf::new(),
            public_key_files: Vec::new(),
            jwks_file: PathBuf::new(),
            issuer: String::new(),
            audience: String::new(),
            leeway: Duration::from_secs(30),
        }
    }
}

impl AuthConfig {
    /// Rejects an `[auth]` section that cannot work.
    pub fn validate(&self) -> Result<(), String> {
        for (index, token) in self.tokens.iter().enumerate() {
            if token.principal.is_empty() {
                return Err(format!("auth.tokens[{index}].principal is required"));
            }
            credentials::parse_hash(&token.hash)
                .map_err(|reason| format!("auth.tokens[{index}].hash: {reason}"))?;
        }
        if self.enabled && self.tokens.is_empty() && !self.jwt.configured() {
            return Err(
                "auth.enabled needs auth.tokens or an auth.jwt key: nobody could authenticate"
                    .into(),
            );
        }
        Ok(())
    }
}

impl JwtConfig {
    /// Whether any key is configured.
    pub fn configured(&self) -> bool {
        !self.hs256_secret.is_empty()
            || !self.hs256_secret_file.as_os_str().is_empty()
            || !self.public_key_files.is_empty()
            || !self.jwks_file.as_os_str().is_empty()
    }
}
