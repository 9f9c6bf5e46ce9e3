//! Certificates made at test time (rcgen): a CA, server certificates for `127.0.0.1` and
//! `localhost`, client certificates with a common name; PEM files in a temp dir; a node
//! configured to serve TLS with them; TLS clients (SDK, reqwest, raw rustls) that trust them.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use agentmesh_node::{NodeConfig, TlsSettings};
use agentmesh_sdk::{ClientTls, MeshClient};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::net::TcpStream;
use tokio_rustls::{
    TlsConnector,
    rustls::{ClientConfig, RootCertStore, crypto::ring},
};

use crate::TestNode;

/// A certificate authority made for one test.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    /// Its certificate, PEM.
    pub cert_pem: String,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

/// A certificate a [`TestCa`] issued, with its key.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Its private key, PEM (PKCS#8).
    pub key_pem: String,
    /// The certificate, DER, to compare with what a peer presents.
    pub der: CertificateDer<'static>,
}

impl Issued {
    /// Writes `<stem>.crt` and `<stem>.key` into `dir`; returns their paths.
    pub fn write(&self, dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
        let cert = dir.join(format!("{stem}.crt"));
        let key = dir.join(format!("{stem}.key"));
        std::fs::write(&cert, &self.cert_pem).unwrap();
        std::fs::write(&key, &self.key_pem).unwrap();
        (cert, key)
    }
}

impl TestCa {
    /// A new CA named `name`.
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let cert_pem = issuer.pem();
        Self { issuer, cert_pem }
    }

    /// Writes the CA certificate to `<dir>/<stem>.crt`.
    pub fn write(&self, dir: &Path, stem: &str) -> PathBuf {
        let path = dir.join(format!("{stem}.crt"));
        std::fs::write(&path, &self.cert_pem).unwrap();
        path
    }

    fn issue(
        &self,
        names: &[&str],
        common_name: &str,
        serial: u64,
        usage: ExtendedKeyUsagePurpose,
    ) -> Issued {
        let names: Vec<String> = names.iter().map(|name| (*name).to_owned()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.serial_number = Some(SerialNumber::from(serial));
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }

    /// A server certificate for `127.0.0.1` and `localhost` with serial number `serial`.
    pub fn server(&self, serial: u64) -> Issued {
        self.issue(
            &["127.0.0.1", "localhost"],
            "agentmesh node",
            serial,
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate whose subject's common name is `common_name`.
    pub fn client(&self, common_name: &str) -> Issued {
        self.issue(&[], common_name, 7, ExtendedKeyUsagePurpose::ClientAuth)
    }

    /// An SDK client's TLS options trusting this CA.
    pub fn client_tls(&self) -> ClientTls {
        ClientTls::new().ca_pem(self.cert_pem.clone())
    }

    /// A reqwest client trusting this CA, presenting `identity` if given.
    pub fn http_client(&self, identity: Option<&Issued>, http2: bool) -> reqwest::Client {
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .timeout(Duration::from_secs(30))
            .add_root_certificate(
                reqwest::Certificate::from_pem(self.cert_pem.as_bytes()).unwrap(),
            );
        if let Some(identity) = identity {
            let pem = format!("{}{}", identity.cert_pem, identity.key_pem);
            builder = builder.identity(reqwest::Identity::from_pem(pem.as_bytes()).unwrap());
        }
        builder = if http2 {
            builder.http2_prior_knowledge()
        } else {
            builder.http1_only()
        };
        builder.build().unwrap()
    }

    /// Opens a TLS connection to `address` trusting this CA and returns the certificate the
    /// server presented (or the handshake's error).
    pub async fn server_certificate(
        &self,
        address: std::net::SocketAddr,
        identity: Option<&Issued>,
    ) -> Result<CertificateDer<'static>, String> {
        let stream = self.connect(address, identity, &[]).await?;
        let (_, connection) = stream.get_ref();
        Ok(connection.peer_certificates().unwrap()[0].clone())
    }

    /// A TLS connection to `address` trusting this CA, presenting `identity` if given and
    /// offering the ALPN protocols `alpn`.
    pub async fn connect(
        &self,
        address: std::net::SocketAddr,
        identity: Option<&Issued>,
        alpn: &[&[u8]],
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).unwrap())
            .unwrap();
        let builder = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let config = match identity {
            Some(identity) => builder
                .with_client_auth_cert(
                    vec![identity.der.clone()],
                    rustls_pki_types::PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes())
                        .unwrap(),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        let mut config = config;
        config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
        let tcp = TcpStream::connect(address)
            .await
            .map_err(|e| e.to_string())?;
        let name = ServerName::try_from("127.0.0.1").unwrap();
        TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())
    }
}

/// PEM files of a node serving TLS, in a temp dir that lives as long as this value.
#[derive(Debug)]
pub struct TlsFiles {
    /// The directory holding them.
    pub dir: tempfile::TempDir,
    /// The node's certificate file.
    pub cert: PathBuf,
    /// The node's key file.
    pub key: PathBuf,
    /// The CA file (for client certificates too).
    pub ca: PathBuf,
}

impl TlsFiles {
    /// Writes `server` and `ca`'s certificate into a new temp dir.
    pub fn new(ca: &TestCa, server: &Issued) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = server.write(dir.path(), "node");
        let ca = ca.write(dir.path(), "ca");
        Self { dir, cert, key, ca }
    }

    /// `[tls]` serving these files, without client certificates.
    pub fn settings(&self) -> TlsSettings {
        TlsSettings {
            cert: self.cert.display().to_string(),
            key: self.key.display().to_string(),
            ..TlsSettings::default()
        }
    }

    /// A node configuration ([`crate::test_config`]) with these `[tls]` settings.
    pub fn node_config(&self, tls: TlsSettings) -> NodeConfig {
        NodeConfig {
            tls,
            ..crate::test_config()
        }
    }
}

impl TestNode {
    /// `https://host:port`, the base of the gateway's routes on a TLS node.
    pub fn https_url(&self) -> String {
        format!("https://{}", self.address)
    }

    /// An SDK client of a TLS node.
    pub fn tls_client(&self, tls: &ClientTls) -> MeshClient {
        MeshClient::connect_lazy_tls(&self.https_url(), tls).unwrap()
    }
}
