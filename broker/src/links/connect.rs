//! Opening a link's AMQP connections with lapin.
//!
//! Warren opens the TCP connection (and the TLS session, with rustls and the ring provider)
//! itself and hands the stream to lapin through [`lapin::Connection::connector`], so that:
//! the host is used as written (lapin's URI parser turns an IP address into `localhost`),
//! connect time is bounded, TLS follows RabbitMQ's URI parameters (`cacertfile`, `certfile`,
//! `keyfile`, `verify`, `server_name_indication`) with one crypto provider, and the link knows
//! its local address (to name its connection as the peer's management API does).
//!
//! A URI without a host is the node itself: the link connects to the node's own AMQP listener
//! on loopback as the internal account ([`crate::auth::INTERNAL_USER`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use amq_protocol::auth::{Credentials, SASLMechanism};
use amq_protocol::protocol::{AMQPClass, connection};
use amq_protocol::types::{AMQPValue, FieldTable};
use bytes::BytesMut;
use lapin::tcp::{AsyncTcpStream, RustlsConnector};
use lapin::uri::{AMQPAuthority, AMQPQueryString, AMQPScheme, AMQPUri, AMQPUserInfo};
use lapin::{Connection, ConnectionProperties};
use parking_lot::Mutex;
use rustls::ClientConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::uri::LinkUri;
use crate::broker::Broker;
use crate::codec;

/// Heartbeat a link asks for when its URI does not say (the Erlang client's default).
pub const DEFAULT_HEARTBEAT: u16 = 10;
/// How long a connection attempt (TCP, TLS and the AMQP handshake) may take when the URI's
/// `connection_timeout` does not say.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// An open link connection.
pub struct Connected {
    pub conn: Connection,
    /// The URI, without credentials, as the status shows it.
    pub redacted: String,
    /// This connection's name in the peer's `/api/connections` (`local -> peer`).
    pub name: String,
}

/// Where to connect and as whom.
struct Target {
    host: String,
    port: u16,
    user: String,
    password: String,
    vhost: String,
    tls: Option<Arc<ClientConfig>>,
    /// The name for SNI and certificate checks.
    server_name: String,
    mechanism: SASLMechanism,
}

/// rustls' process-wide provider: ring. Several providers can be linked into one build (feature
/// unification across the workspace), and then rustls cannot choose by itself.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The system's trust anchors, read once.
pub(crate) fn system_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let r = rustls_native_certs::load_native_certs();
        for e in &r.errors {
            tracing::debug!("system trust store: {e}");
        }
        r.certs
    })
}

fn read_pem_certs(
    what: &str,
    path: &std::path::Path,
) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem =
        std::fs::read(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what} {} is not valid PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{what} {} holds no certificate", path.display()));
    }
    Ok(certs)
}

/// Accepts any server certificate: `verify=verify_none`, and the node's own listener.
#[derive(Debug)]
pub(crate) struct NoVerification(pub(crate) Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The TLS client configuration for an `amqps://` URI (or the node's own TLS listener when
/// `verify` is false and nothing else is set).
fn client_config(uri: &LinkUri, verify: bool) -> Result<Arc<ClientConfig>, String> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let opts = &uri.tls_options;
    let builder = if verify {
        let mut roots = rustls::RootCertStore::empty();
        let (_, ignored) = roots.add_parsable_certificates(system_roots().iter().cloned());
        if ignored > 0 {
            tracing::debug!(ignored, "system trust anchors rustls cannot use");
        }
        if let Some(ca) = &opts.cacertfile {
            for c in read_pem_certs("cacertfile", ca)? {
                roots
                    .add(c)
                    .map_err(|e| format!("cacertfile {}: {e}", ca.display()))?;
            }
        }
        if roots.is_empty() {
            return Err(
                "TLS: no trust anchors (the system has none; give cacertfile= or verify=verify_none)"
                    .into(),
            );
        }
        builder.with_root_certificates(roots)
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
    };
    let mut config = match (&opts.certfile, &opts.keyfile) {
        (Some(cert), Some(key)) => {
            let chain = read_pem_certs("certfile", cert)?;
            let pem = std::fs::read(key)
                .map_err(|e| format!("cannot read keyfile {}: {e}", key.display()))?;
            let key_der = PrivateKeyDer::from_pem_slice(&pem)
                .map_err(|e| format!("keyfile {}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| format!("certfile/keyfile: {e}"))?
        }
        _ => builder.with_no_client_auth(),
    };
    if opts.server_name.as_deref() == Some("") {
        config.enable_sni = false;
    }
    Ok(Arc::new(config))
}

/// The node's own AMQP listener (plain if it has one, else TLS), waiting briefly for it to be
/// bound at start-up.
async fn local_listener(broker: &Broker) -> Result<(SocketAddr, bool), String> {
    for _ in 0..100 {
        let listeners = broker.listeners();
        let pick = listeners
            .iter()
            .find(|l| l.protocol == "amqp")
            .map(|l| (l.addr, false))
            .or_else(|| {
                listeners
                    .iter()
                    .find(|l| l.protocol == "amqp/ssl")
                    .map(|l| (l.addr, true))
            });
        if let Some((mut addr, tls)) = pick {
            if addr.ip().is_unspecified() {
                addr.set_ip(match addr.ip() {
                    IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                    IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
                });
            }
            if !addr.ip().is_loopback() {
                // A listener bound to one address: the link connects from that address.
                broker.access.allow_internal_from(addr.ip());
            }
            return Ok((addr, tls));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err("the node has no AMQP listener for amqp:// (local) links".into())
}

async fn target(broker: &Broker, uri: &LinkUri, default_vhost: &str) -> Result<Target, String> {
    let vhost = uri.vhost_or(default_vhost).to_owned();
    if uri.local {
        let (addr, tls) = local_listener(broker).await?;
        let secret = broker
            .access
            .internal_secret()
            .ok_or("the node's internal account is disabled")?;
        return Ok(Target {
            host: addr.ip().to_string(),
            port: addr.port(),
            user: crate::auth::INTERNAL_USER.to_owned(),
            password: secret,
            vhost,
            // Our own listener on loopback: its certificate is ours, nothing to check.
            tls: if tls {
                Some(client_config(uri, false)?)
            } else {
                None
            },
            server_name: "localhost".into(),
            mechanism: SASLMechanism::Plain,
        });
    }
    let mechanism = match uri.auth_mechanism.as_deref() {
        Some("amqplain") => SASLMechanism::AMQPlain,
        Some("external") => SASLMechanism::External,
        _ => SASLMechanism::Plain,
    };
    Ok(Target {
        host: uri.host.clone(),
        port: uri.port,
        user: uri.user.clone(),
        password: uri.password.clone(),
        vhost,
        tls: if uri.tls {
            Some(client_config(uri, uri.tls_options.verify)?)
        } else {
            None
        },
        server_name: match uri.tls_options.server_name.as_deref() {
            Some(n) if !n.is_empty() => n.to_owned(),
            _ => uri.host.clone(),
        },
        mechanism,
    })
}

/// TCP connect to the first address of `host:port` that answers, bounded by `timeout`.
async fn tcp(host: &str, port: u16, timeout: Duration) -> std::io::Result<TcpStream> {
    let fut = async {
        let mut last = None;
        for addr in tokio::net::lookup_host((host, port)).await? {
            match TcpStream::connect(addr).await {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, "no address for the host")
        }))
    };
    let s = tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// Human-readable connection errors, worded as RabbitMQ's links word them where they can be.
pub fn describe(e: &lapin::Error) -> String {
    match e.kind() {
        lapin::ErrorKind::IOError(io) => describe_io(io),
        lapin::ErrorKind::ProtocolError(p) => format!("{} {}", p.get_id(), p.get_message()),
        lapin::ErrorKind::MissingHeartbeatError => "missed heartbeats from the peer".into(),
        _ => e.to_string(),
    }
}

fn describe_io(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "econnrefused".into(),
        std::io::ErrorKind::TimedOut => "etimedout".into(),
        std::io::ErrorKind::ConnectionReset => "econnreset".into(),
        std::io::ErrorKind::HostUnreachable => "ehostunreach".into(),
        _ => e.to_string(),
    }
}

/// Opens a link connection. `default_vhost` applies when the URI has no path; `name` is the
/// `connection_name` client property the peer shows.
pub async fn open(
    broker: &Broker,
    uri: &LinkUri,
    default_vhost: &str,
    name: &str,
) -> Result<Connected, String> {
    let t = target(broker, uri, default_vhost).await?;
    let timeout = uri.connection_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    let amqp_uri = AMQPUri {
        scheme: AMQPScheme::AMQP,
        authority: AMQPAuthority {
            userinfo: AMQPUserInfo {
                username: t.user.clone(),
                password: t.password.clone(),
            },
            host: t.host.clone(),
            port: t.port,
        },
        vhost: t.vhost.clone(),
        query: AMQPQueryString {
            frame_max: uri.frame_max,
            channel_max: uri.channel_max,
            heartbeat: Some(uri.heartbeat.unwrap_or(DEFAULT_HEARTBEAT)),
            connection_timeout: None,
            auth_mechanism: Some(match t.mechanism {
                SASLMechanism::AMQPlain => amq_protocol::uri::SASLMechanism::AMQPlain,
                SASLMechanism::External => amq_protocol::uri::SASLMechanism::External,
                _ => amq_protocol::uri::SASLMechanism::Plain,
            }),
        },
    };
    let addrs: Arc<Mutex<Option<(SocketAddr, SocketAddr)>>> = Arc::default();
    let seen = addrs.clone();
    let host = t.host.clone();
    let port = t.port;
    let tls = t.tls.clone();
    let server_name = t.server_name.clone();
    let connect = async move |_uri: AMQPUri, _rt| {
        let s = tcp(&host, port, timeout).await?;
        if let (Ok(l), Ok(p)) = (s.local_addr(), s.peer_addr()) {
            *seen.lock() = Some((l, p));
        }
        let plain = AsyncTcpStream::Plain(async_compat::Compat::new(s));
        match &tls {
            None => Ok(plain),
            Some(config) => {
                let connector = RustlsConnector::from(config.clone());
                tokio::time::timeout(timeout, plain.into_rustls(&connector, &server_name))
                    .await
                    .map_err(|_| {
                        std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")
                    })?
                    .map_err(lapin::Error::from)
            }
        }
    };
    let runtime = lapin::runtime::default_runtime().map_err(|e| e.to_string())?;
    let props = ConnectionProperties::default().with_connection_name(name.into());
    let conn = tokio::time::timeout(
        timeout,
        Connection::connector(amqp_uri, runtime, connect, props),
    )
    .await
    .map_err(|_| "etimedout".to_owned())?
    .map_err(|e| describe(&e))?;
    let name = match *addrs.lock() {
        Some((local, peer)) => format!("{local} -> {peer}"),
        None => String::new(),
    };
    Ok(Connected {
        conn,
        redacted: uri.redacted.clone(),
        name,
    })
}

/// The peer's `connection.start` server properties, read by a short connection of its own
/// that completes the handshake and closes cleanly (lapin does not expose them). Federation
/// needs the upstream's `cluster_name` for the `x-received-from` header.
pub async fn server_properties(
    broker: &Broker,
    uri: &LinkUri,
    default_vhost: &str,
) -> Result<FieldTable, String> {
    let t = target(broker, uri, default_vhost).await?;
    let timeout = uri.connection_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    let s = tcp(&t.host, t.port, timeout)
        .await
        .map_err(|e| describe_io(&e))?;
    let fut = async {
        match &t.tls {
            None => handshake(s, &t).await,
            Some(config) => {
                let name = ServerName::try_from(t.server_name.clone())
                    .map_err(|e| format!("TLS server name: {e}"))?;
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name, s)
                    .await
                    .map_err(|e| format!("TLS: {e}"))?;
                handshake(tls, &t).await
            }
        }
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| "etimedout".to_owned())?
}

async fn read_method<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut BytesMut,
) -> Result<AMQPClass, String> {
    let d = codec::FrameDecoder::new(1 << 20);
    loop {
        if let Some(f) = d.decode(buf).map_err(|e| e.text.clone())? {
            if f.kind == codec::FRAME_METHOD {
                return codec::decode_method(&f.payload).map_err(|e| e.text.clone());
            }
            continue;
        }
        if s.read_buf(buf).await.map_err(|e| describe_io(&e))? == 0 {
            return Err("the peer closed the connection during the handshake".into());
        }
    }
}

async fn send_method<S: AsyncWrite + Unpin>(s: &mut S, m: AMQPClass) -> Result<(), String> {
    let mut b = BytesMut::new();
    codec::encode_method(&mut b, 0, &m);
    s.write_all(&b).await.map_err(|e| describe_io(&e))
}

async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    t: &Target,
) -> Result<FieldTable, String> {
    s.write_all(codec::PROTOCOL_HEADER)
        .await
        .map_err(|e| describe_io(&e))?;
    let mut buf = BytesMut::new();
    let AMQPClass::Connection(connection::AMQPMethod::Start(start)) =
        read_method(&mut s, &mut buf).await?
    else {
        return Err("the peer did not send connection.start".into());
    };
    let props = start.server_properties;
    // Finish the handshake and close, so neither side logs an aborted connection; the
    // properties are already known if any of this fails.
    let creds = Credentials::new(t.user.clone().into(), t.password.clone().into());
    let finish = async {
        let mut client = FieldTable::default();
        client.insert(
            "connection_name".into(),
            AMQPValue::LongString("Warren link probe".into()),
        );
        send_method(
            &mut s,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties: client,
                mechanism: t.mechanism.name().into(),
                response: creds.sasl_auth_string(t.mechanism),
                locale: "en_US".into(),
            })),
        )
        .await?;
        let AMQPClass::Connection(connection::AMQPMethod::Tune(tune)) =
            read_method(&mut s, &mut buf).await?
        else {
            return Err("expected connection.tune".to_owned());
        };
        send_method(
            &mut s,
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: 1,
                frame_max: tune.frame_max,
                heartbeat: 0,
            })),
        )
        .await?;
        send_method(
            &mut s,
            AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
                virtual_host: t.vhost.clone().into(),
            })),
        )
        .await?;
        let _open_ok = read_method(&mut s, &mut buf).await?;
        send_method(
            &mut s,
            AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                reply_code: 200,
                reply_text: "probe done".into(),
                class_id: 0,
                method_id: 0,
            })),
        )
        .await?;
        let _close_ok = read_method(&mut s, &mut buf).await?;
        Ok::<(), String>(())
    };
    if let Err(e) = finish.await {
        tracing::debug!("link probe: {e}");
    }
    let _ = s.shutdown().await;
    Ok(props)
}

/// A string field of a server-properties table.
pub fn table_str(t: &FieldTable, key: &str) -> Option<String> {
    t.inner().get(key).and_then(crate::message::value_as_string)
}

/// Whether the server advertises a capability (`capabilities` table).
pub fn has_capability(t: &FieldTable, name: &str) -> bool {
    matches!(
        t.inner().get("capabilities"),
        Some(AMQPValue::FieldTable(caps)) if matches!(caps.inner().get(name), Some(AMQPValue::Boolean(true)))
    )
}

/// A connection's events, for [`lost`].
pub type Events = std::pin::Pin<Box<dyn futures_lite::Stream<Item = lapin::Event> + Send>>;

pub fn events(conn: &Connection) -> Events {
    Box::pin(conn.events_listener())
}

/// Resolves when the connection reports an error (a peer closing it, a missed heartbeat, a
/// socket error); returns why. Links also check `status().connected()` now and then, for an
/// idle link to notice a peer that went away.
pub async fn failed(events: &mut Events) -> String {
    use futures_lite::StreamExt;
    loop {
        match events.next().await {
            Some(lapin::Event::Error(e)) => return describe(&e),
            Some(_) => {}
            None => return "connection closed".into(),
        }
    }
}

/// How often a link checks that its connections are still open.
pub const HEALTH_CHECK: Duration = Duration::from_millis(250);

/// Why a link must restart, if one of its connections is no longer open.
pub fn closed(what: &[(&str, &Connection)]) -> Option<String> {
    what.iter()
        .find(|(_, c)| !c.status().connected())
        .map(|(name, _)| format!("{name} connection closed"))
}
