//! TLS on the node's port and on its calls to agents.
//!
//! With `[tls] cert` and `key` set, every connection accepted on the node's one port is a TLS
//! connection: ALPN offers `h2` and `http/1.1`, so gRPC, the HTTP gateway, SSE and WebSocket all
//! share it as they do in plaintext. The handshake runs in the accept loop
//! ([`crate::connections`]) under `handshake_timeout`, after the connection cap, so a client
//! that connects and never says hello holds its slot no longer than that.
//!
//! With `client_ca` set, clients are asked for a certificate issued by one of those CAs
//! (`client_auth = "required"` refuses the handshake without one; `"optional"` lets it go on
//! without). A verified client certificate becomes a [`TlsPeer`], put in the extensions of
//! every request on that connection, for the layers that turn it into a principal.
//!
//! The certificate, key and client CA are read again whenever their files change (the
//! directories holding them are watched, so files replaced by rename, as secret mounts do, are
//! seen too): new connections get the new certificate, open ones keep theirs. A reload that
//! fails (half-written files, a key that does not match) keeps the previous configuration and
//! logs an error.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use parking_lot::RwLock;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio_rustls::rustls::{
    self, RootCertStore, ServerConfig,
    crypto::{CryptoProvider, ring},
    server::WebPkiClientVerifier,
};
use tokio_util::sync::CancellationToken;

/// TLS settings of the node's port (`[tls]`) and of its calls to agents (`[tls.agents]`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM file with the node's certificate chain, leaf first. With `key`, turns TLS on for
    /// the whole port; empty: plaintext.
    pub cert: String,
    /// PEM file with the private key of `cert` (PKCS#8, PKCS#1 or SEC1).
    pub key: String,
    /// PEM file of the CAs that issue client certificates; empty: no client certificates
    /// asked for.
    pub client_ca: String,
    /// With `client_ca`: whether a client must present a certificate.
    pub client_auth: ClientAuth,
    /// How long a new connection may take to complete its TLS handshake.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Reload the certificate, key and client CA when their files change.
    pub watch: bool,
    /// The node's calls to agents that registered an `https://` endpoint (and to other
    /// nodes at `https://` addresses).
    pub agents: AgentTlsSettings,
}

impl Default for TlsSettings {
    fn default() -> Self {
        Self {
            cert: String::new(),
            key: String::new(),
            client_ca: String::new(),
            client_auth: ClientAuth::Required,
            handshake_timeout: Duration::from_secs(10),
            watch: true,
            agents: AgentTlsSettings::default(),
        }
    }
}

impl TlsSettings {
    /// Whether the node's port serves TLS.
    pub fn enabled(&self) -> bool {
        !self.cert.is_empty()
    }

    /// Rejects settings that cannot work together, naming the keys at fault.
    pub fn validate(&self) -> Result<(), String> {
        if self.cert.is_empty() != self.key.is_empty() {
            return Err("tls.cert and tls.key must be set together".into());
        }
        if !self.client_ca.is_empty() && !self.enabled() {
            return Err("tls.client_ca needs tls.cert and tls.key".into());
        }
        if self.handshake_timeout.is_zero() {
            return Err("tls.handshake_timeout must be positive".into());
        }
        if self.agents.cert.is_empty() != self.agents.key.is_empty() {
            return Err("tls.agents.cert and tls.agents.key must be set together".into());
        }
        Ok(())
    }
}

/// Whether clients must present a certificate (with `tls.client_ca` set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// A client without a certificate is served, without a [`TlsPeer`]; one whose certificate
    /// does not verify is refused.
    Optional,
    /// A client without a verified certificate is refused at the handshake.
    Required,
}

/// TLS of the node's calls to agents (`[tls.agents]`): used for agents whose registered
/// endpoint is `https://…` (`http://` endpoints stay plaintext), and for other nodes of a
/// mesh on a shared store that advertise `https://` addresses (forwarded stream resumes).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentTlsSettings {
    /// PEM file of the CAs trusted to issue agents' certificates; empty: the system's roots.
    pub ca: String,
    /// PEM file with the certificate the node presents to agents that ask for one (mutual
    /// TLS); empty: none.
    pub cert: String,
    /// PEM file with the private key of `cert`.
    pub key: String,
}

impl AgentTlsSettings {
    /// The client TLS configuration of the node's channels to agents.
    pub fn client_config(&self) -> Result<tonic::transport::ClientTlsConfig, TlsError> {
        let mut config = tonic::transport::ClientTlsConfig::new();
        config = if self.ca.is_empty() {
            config.with_native_roots()
        } else {
            let ca = read(&self.ca)?;
            // Parsed here so a bad file is named at start rather than at the first call.
            parse_certs(&self.ca, &ca)?;
            config.ca_certificate(tonic::transport::Certificate::from_pem(ca))
        };
        if !self.cert.is_empty() {
            let cert = read(&self.cert)?;
            let key = read(&self.key)?;
            parse_certs(&self.cert, &cert)?;
            parse_key(&self.key, &key)?;
            config = config.identity(tonic::transport::Identity::from_pem(cert, key));
        }
        Ok(config)
    }

    /// The same settings for the node's HTTP calls (A2A agents and webhooks).
    pub fn http_tls(&self) -> Result<agentmesh_a2a::client::HttpTls, TlsError> {
        let mut tls = agentmesh_a2a::client::HttpTls::default();
        if !self.ca.is_empty() {
            let ca = read(&self.ca)?;
            parse_certs(&self.ca, &ca)?;
            tls.ca_pem = Some(ca);
        }
        if !self.cert.is_empty() {
            let mut pem = read(&self.cert)?;
            let key = read(&self.key)?;
            parse_certs(&self.cert, &pem)?;
            parse_key(&self.key, &key)?;
            pem.push(b'\n');
            pem.extend_from_slice(&key);
            tls.identity_pem = Some(pem);
        }
        Ok(tls)
    }
}

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A file holds no usable PEM item of the kind expected.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// rustls refused the configuration (e.g. a key that does not match the certificate).
    #[error("TLS configuration refused: {0}")]
    Config(String),
    /// The files could not be watched.
    #[error("cannot watch the certificate files: {0}")]
    Watch(#[from] notify::Error),
}

/// The identity of a client that presented a certificate the node verified (mutual TLS).
///
/// Put in the request extensions of every request on that connection (gRPC and HTTP alike):
/// `request.extensions().get::<TlsPeer>()`. Absent on plaintext connections and on TLS
/// connections without a client certificate (`client_auth = "optional"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPeer {
    /// The name to treat as the client's principal: the certificate subject's common name,
    /// or else its first DNS name, or else its first URI (e.g. a SPIFFE id).
    pub identity: String,
    /// The subject's common name, if any.
    pub common_name: Option<String>,
    /// DNS names of the subject alternative names.
    pub dns_names: Vec<String>,
    /// URIs of the subject alternative names.
    pub uris: Vec<String>,
    /// The client's certificate (DER), leaf only.
    pub certificate: CertificateDer<'static>,
}

impl TlsPeer {
    /// The identity of a verified leaf certificate; `None` if it names nobody.
    pub fn from_certificate(certificate: &CertificateDer<'_>) -> Option<Self> {
        let parsed = webpki::EndEntityCert::try_from(certificate).ok()?;
        let common_name = common_name(parsed.subject());
        let dns_names: Vec<String> = parsed.valid_dns_names().map(str::to_owned).collect();
        let uris: Vec<String> = parsed.valid_uri_names().map(str::to_owned).collect();
        let identity = common_name
            .clone()
            .or_else(|| dns_names.first().cloned())
            .or_else(|| uris.first().cloned())?;
        Some(Self {
            identity,
            common_name,
            dns_names,
            uris,
            certificate: certificate.clone().into_owned(),
        })
    }
}

/// The last common name (OID 2.5.4.3) of a DER-encoded Name's contents (a sequence of
/// SETs of {type, value} SEQUENCEs).
fn common_name(subject: &[u8]) -> Option<String> {
    const CN: &[u8] = &[0x55, 0x04, 0x03];
    let mut found = None;
    let mut names = subject;
    while !names.is_empty() {
        let (tag, set, rest) = der_item(names)?;
        names = rest;
        if tag != 0x31 {
            return None;
        }
        let mut attributes = set;
        while !attributes.is_empty() {
            let (tag, attribute, rest) = der_item(attributes)?;
            attributes = rest;
            if tag != 0x30 {
                return None;
            }
            let (oid_tag, oid, value) = der_item(attribute)?;
            let (value_tag, value, _) = der_item(value)?;
            // UTF8String, PrintableString, IA5String, TeletexString (read as Latin-1).
            if oid_tag == 0x06 && oid == CN {
                found = match value_tag {
                    0x0c | 0x13 | 0x16 => std::str::from_utf8(value).ok().map(str::to_owned),
                    0x14 => Some(value.iter().map(|&b| char::from(b)).collect()),
                    _ => None,
                };
            }
        }
    }
    found
}

/// One DER item at the front of `input`: (tag, contents, what follows).
fn der_item(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (length, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let length = rest[..count]
            .iter()
            .fold(0usize, |length, &b| (length << 8) | usize::from(b));
        (length, &rest[count..])
    };
    (rest.len() >= length).then(|| (tag, &rest[..length], &rest[length..]))
}

/// The node's TLS server configuration, swapped whole when its files change.
#[derive(Debug)]
pub struct ServerTls {
    settings: TlsSettings,
    current: RwLock<Loaded>,
    counts: TlsCounts,
}

/// Why a connection did not get past the TLS handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// The client sent no complete hello within `handshake_timeout`.
    Timeout,
    /// The client spoke plaintext.
    Plaintext,
    /// The handshake failed (no or a bad client certificate, no common protocol, …).
    Refused,
}

/// What `/metrics` shows of TLS: failed handshakes by reason, reloads by outcome.
#[derive(Debug, Default)]
struct TlsCounts {
    timeouts: AtomicU64,
    plaintext: AtomicU64,
    refused: AtomicU64,
    reloaded: AtomicU64,
    reload_failed: AtomicU64,
}

#[derive(Debug)]
struct Loaded {
    config: Arc<ServerConfig>,
    /// The files' contents it was built from, so events that change nothing change nothing.
    sources: Vec<Vec<u8>>,
}

impl ServerTls {
    /// Reads the files named by `settings` (which must have TLS enabled).
    pub fn load(settings: &TlsSettings) -> Result<Arc<Self>, TlsError> {
        let sources = read_sources(settings)?;
        let config = server_config(settings, &sources)?;
        Ok(Arc::new(Self {
            settings: settings.clone(),
            current: RwLock::new(Loaded { config, sources }),
            counts: TlsCounts::default(),
        }))
    }

    /// Counts a connection that did not get past the handshake.
    pub fn count_failure(&self, failure: HandshakeFailure) {
        let counter = match failure {
            HandshakeFailure::Timeout => &self.counts.timeouts,
            HandshakeFailure::Plaintext => &self.counts.plaintext,
            HandshakeFailure::Refused => &self.counts.refused,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Failed handshakes so far: (timed out, plaintext, refused).
    pub fn handshake_failures(&self) -> (u64, u64, u64) {
        let counts = &self.counts;
        (
            counts.timeouts.load(Ordering::Relaxed),
            counts.plaintext.load(Ordering::Relaxed),
            counts.refused.load(Ordering::Relaxed),
        )
    }

    /// Reloads so far: (loaded, failed and kept the previous configuration).
    pub fn reloads(&self) -> (u64, u64) {
        (
            self.counts.reloaded.load(Ordering::Relaxed),
            self.counts.reload_failed.load(Ordering::Relaxed),
        )
    }

    /// The configuration new connections are accepted with.
    pub fn config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.current.read().config)
    }

    /// How long a handshake may take.
    pub fn handshake_timeout(&self) -> Duration {
        self.settings.handshake_timeout
    }

    /// Reads the files again; on success new connections use what they now hold. Returns
    /// whether anything changed.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let sources = read_sources(&self.settings)?;
        if self.current.read().sources == sources {
            return Ok(false);
        }
        let config = server_config(&self.settings, &sources)?;
        *self.current.write() = Loaded { config, sources };
        Ok(true)
    }

    /// Reloads whenever the files change (if `watch` is set), until `stop` is cancelled.
    pub fn watch(self: &Arc<Self>, stop: CancellationToken) -> Result<(), TlsError> {
        if !self.settings.watch {
            return Ok(());
        }
        use notify::Watcher;
        let (changed, mut changes) = tokio::sync::mpsc::unbounded_channel();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                // Reads (ours included) are no change.
                if let Ok(event) = event
                    && !matches!(event.kind, notify::EventKind::Access(_))
                {
                    let _ = changed.send(());
                }
            })?;
        // The directories, not the files: a file replaced by rename is a new inode.
        let directories: BTreeSet<PathBuf> = self
            .files()
            .map(|file| match Path::new(file).parent() {
                Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
                _ => PathBuf::from("."),
            })
            .collect();
        for directory in &directories {
            watcher.watch(directory, notify::RecursiveMode::NonRecursive)?;
        }
        let tls = Arc::downgrade(self);
        tokio::spawn(async move {
            // Moved in so it watches as long as this task runs.
            let _watcher = watcher;
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    change = changes.recv() => if change.is_none() { return },
                }
                // Writers touch a file several times (truncate, write, rename): settle first.
                tokio::time::sleep(Duration::from_millis(200)).await;
                while changes.try_recv().is_ok() {}
                let Some(tls) = tls.upgrade() else { return };
                match tls.reload() {
                    Ok(true) => {
                        tls.counts.reloaded.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(cert = %tls.settings.cert, "TLS certificate reloaded");
                    }
                    Ok(false) => {}
                    Err(error) => {
                        tls.counts.reload_failed.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(%error, "TLS certificate reload failed; keeping the previous one");
                    }
                }
            }
        });
        Ok(())
    }

    fn files(&self) -> impl Iterator<Item = &String> {
        [
            &self.settings.cert,
            &self.settings.key,
            &self.settings.client_ca,
        ]
        .into_iter()
        .filter(|file| !file.is_empty())
    }
}

fn read(path: &str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn read_sources(settings: &TlsSettings) -> Result<Vec<Vec<u8>>, TlsError> {
    let mut sources = vec![read(&settings.cert)?, read(&settings.key)?];
    if !settings.client_ca.is_empty() {
        sources.push(read(&settings.client_ca)?);
    }
    Ok(sources)
}

fn parse_certs(path: &str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| TlsError::Pem {
            path: path.to_owned(),
            reason: error.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_owned(),
            reason: "no CERTIFICATE in the file".into(),
        });
    }
    Ok(certs)
}

fn parse_key(path: &str, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|error| TlsError::Pem {
        path: path.to_owned(),
        reason: format!("no private key: {error}"),
    })
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// The server configuration built from the files' contents (cert, key[, client CA]).
fn server_config(
    settings: &TlsSettings,
    sources: &[Vec<u8>],
) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = parse_certs(&settings.cert, &sources[0])?;
    let key = parse_key(&settings.key, &sources[1])?;
    let refused = |error: rustls::Error| TlsError::Config(error.to_string());
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(refused)?;
    let builder = match sources.get(2) {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in parse_certs(&settings.client_ca, ca)? {
                roots.add(cert).map_err(|error| TlsError::Pem {
                    path: settings.client_ca.clone(),
                    reason: error.to_string(),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
            let verifier = match settings.client_auth {
                ClientAuth::Optional => verifier.allow_unauthenticated(),
                ClientAuth::Required => verifier,
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .map_err(|error| TlsError::Config(error.to_string()))?,
            )
        }
    };
    let mut config = builder.with_single_cert(certs, key).map_err(refused)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_the_common_name_else_the_first_san() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["worker.example".into()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "agentmesh");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "billing-agent");
        let cert = params.self_signed(&key).unwrap();
        let peer = TlsPeer::from_certificate(cert.der()).unwrap();
        assert_eq!(peer.identity, "billing-agent");
        assert_eq!(peer.dns_names, ["worker.example"]);

        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://mesh/ns/a/sa/b".try_into().unwrap(),
        )];
        params.distinguished_name = rcgen::DistinguishedName::new();
        let cert = params.self_signed(&key).unwrap();
        let peer = TlsPeer::from_certificate(cert.der()).unwrap();
        assert_eq!(peer.identity, "spiffe://mesh/ns/a/sa/b");
        assert_eq!(peer.common_name, None);
    }

    #[test]
    fn settings_that_cannot_work_are_named() {
        let half = TlsSettings {
            cert: "node.pem".into(),
            ..TlsSettings::default()
        };
        assert!(half.validate().unwrap_err().contains("tls.key"));
        let ca_alone = TlsSettings {
            client_ca: "ca.pem".into(),
            ..TlsSettings::default()
        };
        assert!(ca_alone.validate().unwrap_err().contains("tls.client_ca"));
        assert!(TlsSettings::default().validate().is_ok());
    }
}
