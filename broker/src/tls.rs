//! The AMQPS listener's TLS settings: the server certificate and key, and optionally a CA
//! whose certificates clients must present (mutual TLS).
//!
//! Files are PEM, as in a `kubernetes.io/tls` Secret (`tls.crt`, `tls.key`, `ca.crt`). They are
//! read once at start-up; every error names the file it is about. rustls runs with the `ring`
//! provider, chosen explicitly, so it does not matter which providers feature unification
//! enables elsewhere in a build.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
pub use tokio_rustls::TlsAcceptor;

/// A TLS setting that cannot be used; the message names the file.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(String);

/// Where the listener's certificate, key and client CA are.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by one of these CAs.
    pub ca: Option<PathBuf>,
}

fn read(what: &str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError(format!("cannot read {what} {}: {e}", path.display())))
}

fn certificates(what: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError(format!("{what} {} is not valid PEM: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(TlsError(format!(
            "{what} {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        )));
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read("TLS key file", path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError(format!(
            "TLS key file {} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)",
            path.display()
        )),
        e => TlsError(format!(
            "TLS key file {} is not valid PEM: {e}",
            path.display()
        )),
    })
}

/// The crypto provider of every TLS session of the node.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads the files and builds the listener's TLS configuration.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = certificates("TLS certificate file", &files.cert)?;
    let key = private_key(&files.key)?;
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(format!("TLS protocol versions: {e}")))?;
    let builder = match &files.ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates("TLS CA file", ca)? {
                roots.add(cert).map_err(|e| {
                    TlsError(format!(
                        "TLS CA file {} holds a certificate that cannot be a trust anchor: {e}",
                        ca.display()
                    ))
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError(format!("TLS CA file {}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder.with_single_cert(certs, key).map_err(|e| {
        TlsError(format!(
            "TLS key file {} does not fit the certificate in {}: {e}",
            files.key.display(),
            files.cert.display()
        ))
    })?;
    Ok(Arc::new(config))
}

/// The acceptor for the AMQPS listener.
pub fn acceptor(files: &TlsFiles) -> Result<TlsAcceptor, TlsError> {
    Ok(TlsAcceptor::from(server_config(files)?))
}

/// What the management API shows about a TLS connection.
#[derive(Debug, Clone)]
pub struct TlsSession {
    /// `tlsv1.3`, `tlsv1.2`, as RabbitMQ names them.
    pub protocol: String,
    /// The negotiated cipher suite, e.g. `TLS13_AES_256_GCM_SHA384`.
    pub cipher: String,
}

impl TlsSession {
    pub fn of(conn: &rustls::ServerConnection) -> Self {
        let protocol = match conn.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "tlsv1.3".to_owned(),
            Some(rustls::ProtocolVersion::TLSv1_2) => "tlsv1.2".to_owned(),
            Some(other) => format!("{other:?}").to_lowercase(),
            None => String::new(),
        };
        let cipher = conn
            .negotiated_cipher_suite()
            .and_then(|s| s.suite().as_str())
            .unwrap_or_default()
            .to_owned();
        Self { protocol, cipher }
    }
}
