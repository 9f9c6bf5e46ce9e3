//! Bearer credentials to principals: API tokens (compared by SHA-256, the configuration never
//! holds a token itself) and JWTs (HS256, RS256, EdDSA, ES256; keys from the configuration, PEM
//! files or a JWKS file), with issuer, audience and expiry checks.

use std::collections::HashMap;

use agentmesh_proto::Principal;
use jsonwebtoken::{
    Algorithm, DecodingKey, Validation,
    jwk::{AlgorithmParameters, EllipticCurve, JwkSet},
};
use sha2::{Digest, Sha256};

use super::{AuthConfig, JwtConfig};

/// The `sha256:<hex>` form of `token`, as `[[auth.tokens]]` stores it.
pub fn hash_token(token: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(token.as_bytes())))
}

/// The digest in a `sha256:<hex>` hash.
pub(crate) fn parse_hash(hash: &str) -> Result<[u8; 32], String> {
    let hex = hash
        .strip_prefix("sha256:")
        .ok_or("must be `sha256:<64 hex digits>` (see `agentmesh auth hash-token`)")?;
    let mut digest = [0u8; 32];
    hex::decode_to_slice(hex, &mut digest)
        .map_err(|_| "must be `sha256:<64 hex digits>` (see `agentmesh auth hash-token`)")?;
    Ok(digest)
}

/// Why a bearer token was not accepted (told to the caller without detail beyond this).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected(pub String);

/// Verifies bearer tokens.
pub struct Authenticator {
    tokens: HashMap<[u8; 32], Principal>,
    keys: Vec<Key>,
    validation: ValidationBase,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("tokens", &self.tokens.len())
            .field("jwt_keys", &self.keys.len())
            .finish()
    }
}

struct Key {
    decoding: DecodingKey,
    algorithm: Algorithm,
    kid: Option<String>,
}

#[derive(Debug, Clone)]
struct ValidationBase {
    issuer: String,
    audience: String,
    leeway: u64,
}

/// The claims the node reads; the signature and the standard claims are checked by the
/// library.
#[derive(Debug, serde::Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    groups: OneOrMany,
    #[serde(default)]
    roles: OneOrMany,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::None => Vec::new(),
            OneOrMany::One(one) => vec![one],
            OneOrMany::Many(many) => many,
        }
    }
}

impl Authenticator {
    /// An authenticator for `config`'s tokens and JWT keys (key files are read here).
    pub fn new(config: &AuthConfig) -> Result<Self, String> {
        let mut tokens = HashMap::new();
        for (index, token) in config.tokens.iter().enumerate() {
            let digest = parse_hash(&token.hash)
                .map_err(|reason| format!("auth.tokens[{index}].hash: {reason}"))?;
            tokens.insert(
                digest,
                Principal {
                    id: token.principal.clone(),
                    groups: token.groups.clone(),
                },
            );
        }
        Ok(Self {
            tokens,
            keys: jwt_keys(&config.jwt)?,
            validation: ValidationBase {
                issuer: config.jwt.issuer.clone(),
                audience: config.jwt.audience.clone(),
                leeway: config.jwt.leeway.as_secs(),
            },
        })
    }

    /// The principal `token` authenticates as.
    pub fn authenticate(&self, token: &str) -> Result<Principal, Rejected> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(principal) = self.tokens.get(&digest) {
            return Ok(principal.clone());
        }
        if self.keys.is_empty() || token.split('.').count() != 3 {
            return Err(Rejected("unknown token".into()));
        }
        self.verify_jwt(token)
    }

    fn verify_jwt(&self, token: &str) -> Result<Principal, Rejected> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|error| Rejected(format!("malformed JWT: {error}")))?;
        let mut last = Rejected(format!("no key for a JWT signed with {:?}", header.alg));
        let candidates = self.keys.iter().filter(|key| {
            key.algorithm == header.alg
                && match (&header.kid, &key.kid) {
                    (Some(wanted), Some(kid)) => wanted == kid,
                    _ => true,
                }
        });
        for key in candidates {
            let mut validation = Validation::new(key.algorithm);
            validation.leeway = self.validation.leeway;
            validation.validate_nbf = true;
            validation.set_required_spec_claims(&["exp", "sub"]);
            if !self.validation.issuer.is_empty() {
                validation.set_issuer(&[&self.validation.issuer]);
            }
            if self.validation.audience.is_empty() {
                validation.validate_aud = false;
            } else {
                validation.set_audience(&[&self.validation.audience]);
            }
            match jsonwebtoken::decode::<Claims>(token, &key.decoding, &validation) {
                Ok(data) => {
                    let claims = data.claims;
                    if claims.sub.is_empty() {
                        return Err(Rejected("the JWT has an empty sub".into()));
                    }
                    let mut groups = claims.groups.into_vec();
                    groups.extend(claims.roles.into_vec());
                    return Ok(Principal {
                        id: claims.sub,
                        groups,
                    });
                }
                Err(error) => {
                    last = Rejected(format!("JWT rejected: {error}"));
                }
            }
        }
        Err(last)
    }
}

fn jwt_keys(config: &JwtConfig) -> Result<Vec<Key>, String> {
    let mut keys = Vec::new();
    let mut secret = config.hs256_secret.clone();
    if !config.hs256_secret_file.as_os_str().is_empty() {
        let path = &config.hs256_secret_file;
        secret = std::fs::read_to_string(path)
            .map_err(|error| format!("auth.jwt.hs256_secret_file {}: {error}", path.display()))?
            .trim()
            .to_owned();
    }
    if !secret.is_empty() {
        keys.push(Key {
            decoding: DecodingKey::from_secret(secret.as_bytes())
                .map_err(|error| format!("auth.jwt.hs256_secret: {error}"))?,
            algorithm: Algorithm::HS256,
            kid: None,
        });
    }
    for path in &config.public_key_files {
        let pem = std::fs::read(path)
            .map_err(|error| format!("auth.jwt.public_key_files {}: {error}", path.display()))?;
        let key = if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
            (key, Algorithm::RS256)
        } else if let Ok(key) = DecodingKey::from_ed_pem(&pem) {
            (key, Algorithm::EdDSA)
        } else if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
            (key, Algorithm::ES256)
        } else {
            return Err(format!(
                "auth.jwt.public_key_files {}: not a PEM RSA, Ed25519 or P-256 public key",
                path.display()
            ));
        };
        keys.push(Key {
            decoding: key.0,
            algorithm: key.1,
            kid: None,
        });
    }
    if !config.jwks_file.as_os_str().is_empty() {
        let path = &config.jwks_file;
        let text = std::fs::read_to_string(path)
            .map_err(|error| format!("auth.jwt.jwks_file {}: {error}", path.display()))?;
        let set: JwkSet = serde_json::from_str(&text)
            .map_err(|error| format!("auth.jwt.jwks_file {}: {error}", path.display()))?;
        for jwk in &set.keys {
            let algorithm = match (jwk.common.key_algorithm, &jwk.algorithm) {
                (Some(alg), _) => format!("{alg:?}").parse::<Algorithm>().ok(),
                (None, AlgorithmParameters::RSA(_)) => Some(Algorithm::RS256),
                (None, AlgorithmParameters::OctetKeyPair(_)) => Some(Algorithm::EdDSA),
                (None, AlgorithmParameters::EllipticCurve(ec))
                    if ec.curve == EllipticCurve::P256 =>
                {
                    Some(Algorithm::ES256)
                }
                _ => None,
            };
            let Some(algorithm) = algorithm else {
                tracing::warn!(file = %path.display(), kid = ?jwk.common.key_id, "skipping a JWKS key of an unsupported kind");
                continue;
            };
            let decoding = DecodingKey::from_jwk(jwk)
                .map_err(|error| format!("auth.jwt.jwks_file {}: {error}", path.display()))?;
            keys.push(Key {
                decoding,
                algorithm,
                kid: jwk.common.key_id.clone(),
            });
        }
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{EncodingKey, Header};

    use super::*;
    use crate::auth::TokenConfig;

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    #[test]
    fn tokens_are_matched_by_hash() {
        let config = AuthConfig {
            enabled: true,
            tokens: vec![TokenConfig {
                hash: hash_token("s3cret"),
                principal: "alice".into(),
                groups: vec!["ops".into()],
            }],
            ..Default::default()
        };
        config.validate().unwrap();
        let auth = Authenticator::new(&config).unwrap();
        let alice = auth.authenticate("s3cret").unwrap();
        assert_eq!(alice.id, "alice");
        assert_eq!(alice.groups, ["ops"]);
        assert!(auth.authenticate("wrong").is_err());
        assert!(parse_hash("md5:00").is_err());
    }

    #[test]
    fn hs256_jwts_with_issuer_audience_and_expiry() {
        let config = AuthConfig {
            enabled: true,
            jwt: JwtConfig {
                hs256_secret: "k".repeat(32),
                issuer: "https://issuer".into(),
                audience: "agentmesh".into(),
                leeway: std::time::Duration::from_secs(5),
                ..Default::default()
            },
            ..Default::default()
        };
        let auth = Authenticator::new(&config).unwrap();
        let key = EncodingKey::from_secret("k".repeat(32).as_bytes()).unwrap();
        let sign = |claims: serde_json::Value| {
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap()
        };
        let good = sign(serde_json::json!({
            "sub": "bob", "iss": "https://issuer", "aud": "agentmesh", "exp": now() + 60,
            "roles": ["reader"],
        }));
        let bob = auth.authenticate(&good).unwrap();
        assert_eq!(
            (bob.id.as_str(), bob.groups.as_slice()),
            ("bob", &["reader".to_owned()][..])
        );
        for bad in [
            serde_json::json!({"sub": "bob", "iss": "https://issuer", "aud": "agentmesh", "exp": now() - 60}),
            serde_json::json!({"sub": "bob", "iss": "https://other", "aud": "agentmesh", "exp": now() + 60}),
            serde_json::json!({"sub": "bob", "iss": "https://issuer", "aud": "else", "exp": now() + 60}),
            serde_json::json!({"iss": "https://issuer", "aud": "agentmesh", "exp": now() + 60}),
        ] {
            assert!(auth.authenticate(&sign(bad.clone())).is_err(), "{bad}");
        }
        let forged = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"sub": "bob", "iss": "https://issuer", "aud": "agentmesh", "exp": now() + 60}),
            &EncodingKey::from_secret(b"another secret of the same length!").unwrap(),
        )
        .unwrap();
        assert!(auth.authenticate(&forged).is_err());
    }
}
