//! TLS for the SDK: a client's connection to a TLS node ([`ClientTls`]) and an agent serving
//! over TLS ([`ServerTls`]), each with an optional certificate for mutual TLS.

use std::path::Path;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::error::SdkError;

fn read(path: &Path) -> Result<Vec<u8>, SdkError> {
    std::fs::read(path)
        .map_err(|error| SdkError::Tls(format!("cannot read {}: {error}", path.display())))
}

/// TLS of a connection to a node (or to any agentmesh gRPC server): which CAs to trust and,
/// for mutual TLS, the certificate to present.
///
/// Without a CA the system's roots are trusted.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    ca: Option<Vec<u8>>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
    domain: Option<String>,
}

impl ClientTls {
    /// Trusts the system's roots and presents no certificate.
    pub fn new() -> Self {
        Self::default()
    }

    /// Trusts the CA certificates in `pem` (instead of the system's roots).
    pub fn ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca = Some(pem.into());
        self
    }

    /// Trusts the CA certificates in the PEM file at `path`.
    pub fn ca_file(self, path: impl AsRef<Path>) -> Result<Self, SdkError> {
        Ok(self.ca_pem(read(path.as_ref())?))
    }

    /// Presents `cert` (PEM chain, leaf first) with its private `key` (PEM) when the server
    /// asks for a client certificate.
    pub fn identity_pem(mut self, cert: impl Into<Vec<u8>>, key: impl Into<Vec<u8>>) -> Self {
        self.identity = Some((cert.into(), key.into()));
        self
    }

    /// Like [`ClientTls::identity_pem`], from PEM files.
    pub fn identity_files(
        self,
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<Self, SdkError> {
        let cert = read(cert.as_ref())?;
        let key = read(key.as_ref())?;
        Ok(self.identity_pem(cert, key))
    }

    /// Checks the server's certificate against `name` instead of the address's host.
    pub fn domain_name(mut self, name: impl Into<String>) -> Self {
        self.domain = Some(name.into());
        self
    }

    pub(crate) fn config(&self) -> ClientTlsConfig {
        let mut config = ClientTlsConfig::new();
        config = match &self.ca {
            Some(ca) => config.ca_certificate(Certificate::from_pem(ca)),
            None => config.with_native_roots(),
        };
        if let Some((cert, key)) = &self.identity {
            config = config.identity(Identity::from_pem(cert, key));
        }
        if let Some(domain) = &self.domain {
            config = config.domain_name(domain);
        }
        config
    }
}

/// TLS of an agent's own server: its certificate and key and, for mutual TLS, the CAs whose
/// client certificates it accepts (the node's `[tls.agents]` certificate, typically).
#[derive(Debug, Clone)]
pub struct ServerTls {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
    client_auth_optional: bool,
}

impl ServerTls {
    /// Serves with `cert` (PEM chain, leaf first) and its private `key` (PEM).
    pub fn from_pem(cert: impl Into<Vec<u8>>, key: impl Into<Vec<u8>>) -> Self {
        Self {
            cert: cert.into(),
            key: key.into(),
            client_ca: None,
            client_auth_optional: false,
        }
    }

    /// Like [`ServerTls::from_pem`], from PEM files.
    pub fn from_files(cert: impl AsRef<Path>, key: impl AsRef<Path>) -> Result<Self, SdkError> {
        Ok(Self::from_pem(read(cert.as_ref())?, read(key.as_ref())?))
    }

    /// Asks callers for a certificate issued by a CA in `pem`; without one they are refused
    /// unless [`ServerTls::client_auth_optional`] is set.
    pub fn client_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.client_ca = Some(pem.into());
        self
    }

    /// Like [`ServerTls::client_ca_pem`], from a PEM file.
    pub fn client_ca_file(self, path: impl AsRef<Path>) -> Result<Self, SdkError> {
        Ok(self.client_ca_pem(read(path.as_ref())?))
    }

    /// Lets callers without a certificate in (those with one must still present a valid one).
    pub fn client_auth_optional(mut self, optional: bool) -> Self {
        self.client_auth_optional = optional;
        self
    }

    pub(crate) fn config(&self) -> ServerTlsConfig {
        let mut config = ServerTlsConfig::new().identity(Identity::from_pem(&self.cert, &self.key));
        if let Some(ca) = &self.client_ca {
            config = config
                .client_ca_root(Certificate::from_pem(ca))
                .client_auth_optional(self.client_auth_optional);
        }
        config
    }
}
