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

/// The CAs of `ca` as trust anchors.
fn roots(ca: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates("TLS CA file", ca)? {
        roots.add(cert).map_err(|e| {
            TlsError(format!(
                "TLS CA file {} holds a certificate that cannot be a trust anchor: {e}",
                ca.display()
            ))
        })?;
    }
    Ok(roots)
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
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider)
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

/// TLS for the links between the nodes of a cluster: each side shows the node's certificate
/// and verifies the other's chain against the CA (mutual TLS). Host names are not checked —
/// a node's certificate need not name every address peers dial (pod IPs, headless Service
/// names); the shared cluster secret still authenticates each node inside the session.
pub struct ClusterTls {
    pub acceptor: TlsAcceptor,
    pub connector: tokio_rustls::TlsConnector,
}

/// Builds [`ClusterTls`] from the node's files; `files.ca` is required.
pub fn cluster_tls(files: &TlsFiles) -> Result<ClusterTls, TlsError> {
    let ca = files
        .ca
        .as_ref()
        .ok_or_else(|| TlsError("inter-node TLS needs a CA file (tls-ca-file)".into()))?;
    let acceptor = acceptor(files)?;
    let provider = provider();
    let chain = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots(ca)?),
        provider.clone(),
    )
    .build()
    .map_err(|e| TlsError(format!("TLS CA file {}: {e}", ca.display())))?;
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(format!("TLS protocol versions: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ChainOnly(chain)))
        .with_client_auth_cert(
            certificates("TLS certificate file", &files.cert)?,
            private_key(&files.key)?,
        )
        .map_err(|e| {
            TlsError(format!(
                "TLS key file {} does not fit the certificate in {}: {e}",
                files.key.display(),
                files.cert.display()
            ))
        })?;
    Ok(ClusterTls {
        acceptor,
        connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
    })
}

/// A server verifier that checks the chain (and signatures) but not the host name.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl rustls::client::danger::ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use rustls::{CertificateError, Error};
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
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

/// `ssl-cert-login-from`: which part of a client certificate's subject is the user name when
/// a client logs in with SASL EXTERNAL (RabbitMQ's `ssl_cert_login_from`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CertLoginFrom {
    /// The subject's Common Name (several are joined with `,`).
    #[default]
    CommonName,
    /// The whole subject in RabbitMQ's RFC 4514 form, e.g. `CN=alice,O=Example,C=GB`.
    DistinguishedName,
    /// A subject alternative name: the `ssl-cert-login-san-index`th (from 0) of the type
    /// `ssl-cert-login-san-type`.
    SubjectAltName,
}

/// `ssl-cert-login-san-type`: which kind of subject alternative name is the user name
/// (RabbitMQ's `ssl_cert_login_san_type`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SanType {
    #[default]
    Dns,
    Ip,
    Email,
    Uri,
}

/// `Display` through `as_str` and `Deserialize` through `FromStr`, for a setting whose value
/// is one of a few names.
macro_rules! named_setting {
    ($t:ty) => {
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

named_setting!(SanType);
named_setting!(CertLoginFrom);

impl SanType {
    pub fn as_str(self) -> &'static str {
        match self {
            SanType::Dns => "dns",
            SanType::Ip => "ip",
            SanType::Email => "email",
            SanType::Uri => "uri",
        }
    }
}

impl std::str::FromStr for SanType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "dns" => Ok(SanType::Dns),
            "ip" => Ok(SanType::Ip),
            "email" => Ok(SanType::Email),
            "uri" => Ok(SanType::Uri),
            "other_name" => Err(
                "ssl-cert-login-san-type: other_name is not supported (use dns, ip, email or uri)"
                    .into(),
            ),
            _ => Err(format!(
                "ssl-cert-login-san-type: '{s}' is none of dns, ip, email, uri"
            )),
        }
    }
}

impl CertLoginFrom {
    pub fn as_str(self) -> &'static str {
        match self {
            CertLoginFrom::CommonName => "common_name",
            CertLoginFrom::DistinguishedName => "distinguished_name",
            CertLoginFrom::SubjectAltName => "subject_alternative_name",
        }
    }
}

impl std::str::FromStr for CertLoginFrom {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "common_name" => Ok(CertLoginFrom::CommonName),
            "distinguished_name" => Ok(CertLoginFrom::DistinguishedName),
            // RabbitMQ accepts both spellings.
            "subject_alternative_name" | "subject_alt_name" => Ok(CertLoginFrom::SubjectAltName),
            _ => Err(format!(
                "ssl-cert-login-from: '{s}' is none of common_name, distinguished_name, subject_alternative_name"
            )),
        }
    }
}

/// The user name a client certificate (DER, as the TLS handshake verified it) logs in as with
/// SASL EXTERNAL. The error says what is wrong with the certificate; it goes to the client.
pub fn cert_login_name(
    der: &[u8],
    from: CertLoginFrom,
    san: (SanType, usize),
) -> Result<String, String> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| format!("the client certificate cannot be parsed: {e}"))?;
    let subject = cert.subject();
    let name = match from {
        CertLoginFrom::CommonName => {
            let cns = subject
                .iter_common_name()
                .map(|a| attribute_text(a.attr_value()))
                .collect::<Result<Vec<_>, _>>()?;
            if cns.is_empty() {
                return Err(
                    "the client certificate's subject has no common name (CN) to log in as".into(),
                );
            }
            cns.join(",")
        }
        CertLoginFrom::DistinguishedName => subject_dn(subject)?,
        CertLoginFrom::SubjectAltName => subject_alt_name(&cert, san.0, san.1)?,
    };
    if name.is_empty() {
        return Err(format!(
            "the client certificate's subject gives an empty user name ({from})"
        ));
    }
    Ok(name)
}

/// The `index`th (from 0) subject alternative name of type `kind`.
fn subject_alt_name(
    cert: &x509_parser::prelude::X509Certificate<'_>,
    kind: SanType,
    index: usize,
) -> Result<String, String> {
    use x509_parser::extensions::GeneralName;
    let ext = cert.subject_alternative_name().map_err(|e| {
        format!("the client certificate's subject alternative names cannot be parsed: {e}")
    })?;
    let names: Vec<String> = ext
        .map(|e| e.value.general_names.as_slice())
        .unwrap_or_default()
        .iter()
        .filter_map(|n| match (kind, n) {
            (SanType::Dns, GeneralName::DNSName(d)) => Some((*d).to_owned()),
            (SanType::Email, GeneralName::RFC822Name(m)) => Some((*m).to_owned()),
            (SanType::Uri, GeneralName::URI(u)) => Some((*u).to_owned()),
            (SanType::Ip, GeneralName::IPAddress(b)) => match b.len() {
                4 => <[u8; 4]>::try_from(*b)
                    .ok()
                    .map(|a| std::net::Ipv4Addr::from(a).to_string()),
                16 => <[u8; 16]>::try_from(*b)
                    .ok()
                    .map(|a| std::net::Ipv6Addr::from(a).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect();
    names.get(index).cloned().ok_or_else(|| {
        format!(
            "the client certificate has {} subject alternative name(s) of type {kind}, so none at index {index} to log in as",
            names.len()
        )
    })
}

/// A subject as RabbitMQ's `rabbit_cert_info:subject/1` writes it (RFC 4514): the last RDN
/// first, RDNs joined with `,`, the attributes of a multi-valued RDN with `+`, short names for
/// the usual attribute types and the dotted OID otherwise, values escaped.
fn subject_dn(name: &x509_parser::x509::X509Name<'_>) -> Result<String, String> {
    let mut rdns = Vec::new();
    for rdn in name.iter_rdn() {
        let mut parts = Vec::new();
        for attr in rdn.iter() {
            let oid = attr.attr_type().to_id_string();
            let key = attribute_short_name(&oid).map_or(oid.clone(), str::to_owned);
            parts.push(format!(
                "{key}={}",
                escape_dn_value(&attribute_text(attr.attr_value())?)
            ));
        }
        rdns.push(parts.join("+"));
    }
    rdns.reverse();
    Ok(rdns.join(","))
}

/// RabbitMQ's names for attribute types in a DN.
fn attribute_short_name(oid: &str) -> Option<&'static str> {
    Some(match oid {
        "2.5.4.3" => "CN",
        "2.5.4.4" => "SN",
        "2.5.4.5" => "SERIALNUMBER",
        "2.5.4.6" => "C",
        "2.5.4.7" => "L",
        "2.5.4.8" => "ST",
        "2.5.4.9" => "STREET",
        "2.5.4.10" => "O",
        "2.5.4.11" => "OU",
        "2.5.4.12" => "TITLE",
        "2.5.4.42" => "GIVENNAME",
        "2.5.4.43" => "INITIALS",
        "2.5.4.44" => "GENERATIONQUALIFIER",
        "2.5.4.65" => "PSEUDONYM",
        "0.9.2342.19200300.100.1.1" => "UID",
        "0.9.2342.19200300.100.1.25" => "DC",
        "1.2.840.113549.1.9.1" => "EMAILADDRESS",
        _ => return None,
    })
}

/// An attribute value as text: the directory string types decoded to UTF-8 (TeletexString
/// read as Latin-1, as RabbitMQ does); any other type as `#` and the hex of its DER (RFC 4514).
fn attribute_text(v: &x509_parser::der_parser::asn1_rs::Any<'_>) -> Result<String, String> {
    use x509_parser::der_parser::asn1_rs::{Tag, ToDer};
    let bad = |what: &str| format!("the client certificate's subject holds an invalid {what}");
    let data = v.as_bytes();
    match v.tag() {
        Tag::Utf8String
        | Tag::PrintableString
        | Tag::Ia5String
        | Tag::NumericString
        | Tag::VisibleString => std::str::from_utf8(data)
            .map(str::to_owned)
            .map_err(|_| bad("string")),
        Tag::T61String => Ok(data.iter().map(|&b| char::from(b)).collect()),
        Tag::BmpString => {
            if !data.len().is_multiple_of(2) {
                return Err(bad("BMPString"));
            }
            let units = data
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]));
            char::decode_utf16(units)
                .collect::<Result<String, _>>()
                .map_err(|_| bad("BMPString"))
        }
        Tag::UniversalString => {
            if !data.len().is_multiple_of(4) {
                return Err(bad("UniversalString"));
            }
            data.chunks_exact(4)
                .map(|c| char::from_u32(u32::from_be_bytes([c[0], c[1], c[2], c[3]])))
                .collect::<Option<String>>()
                .ok_or_else(|| bad("UniversalString"))
        }
        _ => {
            let der = v.to_der_vec().map_err(|_| bad("attribute value"))?;
            let mut s = String::with_capacity(1 + 2 * der.len());
            s.push('#');
            for b in der {
                s.push_str(&format!("{b:02x}"));
            }
            Ok(s)
        }
    }
}

/// Escapes a DN attribute value as RabbitMQ does (RFC 4514 §2.4): `\` before a leading space or
/// `#`, a trailing space, and `"+,;<>\`; bytes outside printable ASCII (and `~`) as `\XX` of
/// their UTF-8 encoding.
fn escape_dn_value(v: &str) -> String {
    let bytes = v.as_bytes();
    let mut out = String::with_capacity(v.len());
    for (i, &b) in bytes.iter().enumerate() {
        let first = i == 0;
        let last = i + 1 == bytes.len();
        match b {
            b' ' | b'#' if first => {
                out.push('\\');
                out.push(char::from(b));
            }
            b' ' if last => out.push_str("\\ "),
            b'"' | b'+' | b',' | b';' | b'<' | b'>' | b'\\' => {
                out.push('\\');
                out.push(char::from(b));
            }
            b if !(32..126).contains(&b) => out.push_str(&format!("\\{b:02X}")),
            b => out.push(char::from(b)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use rcgen::string::{BmpString, PrintableString, TeletexString, UniversalString};
    use rcgen::{CertificateParams, DistinguishedName, DnType, DnValue, KeyPair};

    /// A self-signed certificate (DER) with this subject, in this order (first = outermost).
    fn cert(subject: &[(DnType, DnValue)]) -> Vec<u8> {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name = DistinguishedName::new();
        for (t, v) in subject {
            p.distinguished_name.push(t.clone(), v.clone());
        }
        let key = KeyPair::generate().unwrap();
        p.self_signed(&key).unwrap().der().to_vec()
    }

    const SAN: (SanType, usize) = (SanType::Dns, 0);

    #[test]
    fn subject_alternative_names_by_type_and_index() {
        use rcgen::SanType as R;
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, "cn-name");
        p.subject_alt_names = vec![
            R::DnsName("first.example".try_into().unwrap()),
            R::Rfc822Name("alice@example.com".try_into().unwrap()),
            R::DnsName("second.example".try_into().unwrap()),
            R::IpAddress("10.1.2.3".parse().unwrap()),
            R::IpAddress("2001:db8::1".parse().unwrap()),
            R::URI("spiffe://example.org/ns/apps/sa/orders".try_into().unwrap()),
        ];
        let key = KeyPair::generate().unwrap();
        let der = p.self_signed(&key).unwrap().der().to_vec();
        let san = |t, i| cert_login_name(&der, CertLoginFrom::SubjectAltName, (t, i));
        assert_eq!(san(SanType::Dns, 0).unwrap(), "first.example");
        assert_eq!(san(SanType::Dns, 1).unwrap(), "second.example");
        assert_eq!(san(SanType::Email, 0).unwrap(), "alice@example.com");
        assert_eq!(san(SanType::Ip, 0).unwrap(), "10.1.2.3");
        assert_eq!(san(SanType::Ip, 1).unwrap(), "2001:db8::1");
        assert_eq!(
            san(SanType::Uri, 0).unwrap(),
            "spiffe://example.org/ns/apps/sa/orders"
        );
        let e = san(SanType::Dns, 2).unwrap_err();
        assert!(
            e.contains("2 subject alternative name(s) of type dns"),
            "{e}"
        );
        // A certificate without the extension.
        let plain = cert(&[(DnType::CommonName, utf8("x"))]);
        let e = cert_login_name(&plain, CertLoginFrom::SubjectAltName, SAN).unwrap_err();
        assert!(e.contains("0 subject alternative name(s)"), "{e}");
        assert_eq!(
            "subject_alt_name".parse::<CertLoginFrom>(),
            Ok(CertLoginFrom::SubjectAltName)
        );
        assert!(
            "other_name"
                .parse::<SanType>()
                .unwrap_err()
                .contains("not supported")
        );
    }

    fn utf8(s: &str) -> DnValue {
        DnValue::Utf8String(s.to_owned())
    }

    #[test]
    fn common_name_and_distinguished_name() {
        let der = cert(&[
            (DnType::CountryName, utf8("GB")),
            (DnType::OrganizationName, utf8("Example")),
            (DnType::OrganizationalUnitName, utf8("Ops")),
            (DnType::CommonName, utf8("alice")),
        ]);
        assert_eq!(
            cert_login_name(&der, CertLoginFrom::CommonName, SAN).unwrap(),
            "alice"
        );
        // RabbitMQ's order: the last RDN first.
        assert_eq!(
            cert_login_name(&der, CertLoginFrom::DistinguishedName, SAN).unwrap(),
            "CN=alice,OU=Ops,O=Example,C=GB"
        );
        // Less usual attribute types: RabbitMQ's short names, else the dotted OID.
        let der = cert(&[
            (
                DnType::CustomDnType(vec![0, 9, 2342, 19200300, 100, 1, 25]),
                { DnValue::Ia5String("example".try_into().unwrap()) },
            ),
            (DnType::LocalityName, utf8("London")),
            (DnType::StateOrProvinceName, utf8("England")),
            (DnType::CustomDnType(vec![1, 2, 3, 4]), utf8("x")),
            (DnType::CommonName, utf8("bob")),
        ]);
        assert_eq!(
            cert_login_name(&der, CertLoginFrom::DistinguishedName, SAN).unwrap(),
            "CN=bob,1.2.3.4=x,ST=England,L=London,DC=example"
        );
    }

    #[test]
    fn a_certificate_without_a_common_name() {
        let der = cert(&[(DnType::OrganizationName, utf8("Example"))]);
        let e = cert_login_name(&der, CertLoginFrom::CommonName, SAN).unwrap_err();
        assert!(e.contains("no common name (CN)"), "{e}");
        // The DN is still a name.
        assert_eq!(
            cert_login_name(&der, CertLoginFrom::DistinguishedName, SAN).unwrap(),
            "O=Example"
        );
        let empty = cert(&[]);
        let e = cert_login_name(&empty, CertLoginFrom::DistinguishedName, SAN).unwrap_err();
        assert!(e.contains("empty user name"), "{e}");
        let e = cert_login_name(&empty, CertLoginFrom::CommonName, SAN).unwrap_err();
        assert!(e.contains("no common name"), "{e}");
    }

    #[test]
    fn values_are_escaped_in_a_dn_only() {
        let der = cert(&[
            (
                DnType::OrganizationName,
                utf8("#Acme, Inc. + \"Co\" <x>;\\ "),
            ),
            (DnType::OrganizationalUnitName, utf8(" Café~")),
            (DnType::CommonName, utf8("a,b")),
        ]);
        assert_eq!(
            cert_login_name(&der, CertLoginFrom::CommonName, SAN).unwrap(),
            "a,b"
        );
        assert_eq!(
            cert_login_name(&der, CertLoginFrom::DistinguishedName, SAN).unwrap(),
            r#"CN=a\,b,OU=\ Caf\C3\A9\7E,O=\#Acme\, Inc. \+ \"Co\" \<x\>\;\\\ "#
        );
    }

    #[test]
    fn directory_string_types_are_decoded() {
        let der = cert(&[
            (
                DnType::CountryName,
                DnValue::PrintableString(PrintableString::try_from("GB").unwrap()),
            ),
            (
                DnType::OrganizationName,
                DnValue::BmpString(BmpString::try_from("Ωmega").unwrap()),
            ),
            (
                DnType::OrganizationalUnitName,
                DnValue::TeletexString(TeletexString::try_from("Teletex").unwrap()),
            ),
            (
                DnType::CommonName,
                DnValue::UniversalString(UniversalString::try_from("zoë").unwrap()),
            ),
        ]);
        assert_eq!(
            cert_login_name(&der, CertLoginFrom::CommonName, SAN).unwrap(),
            "zoë"
        );
        assert_eq!(
            cert_login_name(&der, CertLoginFrom::DistinguishedName, SAN).unwrap(),
            r"CN=zo\C3\AB,OU=Teletex,O=\CE\A9mega,C=GB"
        );
    }

    #[test]
    fn what_is_not_a_certificate_is_an_error_not_a_panic() {
        for junk in [&b""[..], b"\x30", b"\x30\x03\x02\x01\x00", &[0xff; 64]] {
            let e = cert_login_name(junk, CertLoginFrom::CommonName, SAN).unwrap_err();
            assert!(e.contains("cannot be parsed"), "{e}");
        }
        // A truncated real certificate.
        let der = cert(&[(DnType::CommonName, utf8("alice"))]);
        for n in [1, der.len() / 2, der.len() - 1] {
            assert!(cert_login_name(&der[..n], CertLoginFrom::DistinguishedName, SAN).is_err());
        }
    }

    #[test]
    fn login_from_setting() {
        assert_eq!(
            "common_name".parse::<CertLoginFrom>(),
            Ok(CertLoginFrom::CommonName)
        );
        assert_eq!(
            "distinguished_name".parse::<CertLoginFrom>(),
            Ok(CertLoginFrom::DistinguishedName)
        );
        let e = "cn".parse::<CertLoginFrom>().unwrap_err();
        assert!(
            e.contains("ssl-cert-login-from")
                && e.contains("common_name")
                && e.contains("distinguished_name"),
            "{e}"
        );
        assert_eq!(CertLoginFrom::default(), CertLoginFrom::CommonName);
    }
}
