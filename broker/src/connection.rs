//! One client connection: the opening handshake (protocol header, SASL, tune, vhost), then a
//! reader that decodes frames and drives the channels, and a writer that flushes the outbox.
//!
//! The reader does all the work of the requests it reads — routing, enqueueing, acking — in
//! its own task, without awaiting anything but the socket, and processes every frame already
//! buffered before reading again, so confirms and replies for a burst of requests go out
//! together. It stops reading while the outbox is over its bound (the client is not reading
//! replies) or while a resource alarm blocks publishers. A client that stops reading
//! altogether is cut off by the writer: a socket that accepts no byte for `write-timeout`
//! (or two heartbeat intervals, if longer) closes the connection, which requeues its
//! unacknowledged messages.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use amq_protocol::protocol::{AMQPClass, channel, connection};
use amq_protocol::types::{AMQPValue, FieldTable, LongString};
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{Instrument, debug, info, warn};

use crate::auth;
use crate::broker::Broker;
use crate::channel::Channel;
use crate::codec::{self, FrameDecoder, RawFrame};
use crate::error::{AmqpError, Result};
use crate::limits;
use crate::outbox::{HIGH_WATER, Outbox};
use crate::vhost::Vhost;

/// How long we wait for `connection.close-ok` after sending `connection.close`.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest a publisher pauses for one queue's backlog before reading again.
const FLOW_WAIT_MAX: Duration = Duration::from_millis(500);
/// The reader stops reading requests while this much output is waiting to be written.
const READ_PAUSE_AT: usize = 4 * HIGH_WATER;

/// What every channel of a connection shares.
#[derive(Debug)]
pub struct ConnShared {
    pub id: u64,
    pub broker: Arc<Broker>,
    pub vhost: Arc<Vhost>,
    pub user: String,
    pub outbox: Arc<Outbox>,
    pub frame_max: u32,
    /// The client understands server-sent `basic.cancel`.
    pub cancel_notify: bool,
    /// What the management API shows about this connection.
    pub info: crate::registry::ConnectionInfo,
    /// Close requests from the management API, and the open channels it lists.
    pub control: crate::registry::ConnectionControl,
    /// Woken when another node answers a publish forwarded for this connection (a confirm
    /// or a `tx.commit-ok` may go out).
    pub wake: Arc<tokio::sync::Notify>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Broker")
    }
}

impl std::fmt::Debug for Vhost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vhost").field("name", &self.name).finish()
    }
}

fn server_properties(broker: &Broker) -> FieldTable {
    let mut caps = FieldTable::default();
    for c in [
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "connection.blocked",
        "consumer_priorities",
        "authentication_failure_close",
        "per_consumer_qos",
        "direct_reply_to",
    ] {
        caps.insert(c.into(), AMQPValue::Boolean(true));
    }
    let s = |v: &str| AMQPValue::LongString(LongString::from(v.as_bytes().to_vec()));
    let mut p = FieldTable::default();
    p.insert("capabilities".into(), AMQPValue::FieldTable(caps));
    p.insert("product".into(), s("Warren"));
    p.insert("version".into(), s(env!("CARGO_PKG_VERSION")));
    p.insert("platform".into(), s("Rust"));
    p.insert("cluster_name".into(), s(&broker.config.cluster_name));
    p.insert("copyright".into(), s("Copyright the Warren authors"));
    p.insert(
        "information".into(),
        s("Licensed under the Apache License 2.0"),
    );
    p
}

fn client_capability(props: &FieldTable, name: &str) -> bool {
    matches!(
        props.inner().get("capabilities"),
        Some(AMQPValue::FieldTable(c)) if matches!(c.inner().get(name), Some(AMQPValue::Boolean(true)))
    )
}

/// The socket's read side with its buffer and frame decoder. `R` is a TCP read half on the
/// plain listener, the read half of a TLS stream on the AMQPS listener.
struct Reader<R> {
    rd: R,
    buf: BytesMut,
    decoder: FrameDecoder,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    /// Reads until one frame is complete. `None` on EOF.
    async fn frame(&mut self) -> Result<Option<RawFrame>> {
        loop {
            if let Some(f) = self.decoder.decode(&mut self.buf)? {
                return Ok(Some(f));
            }
            match self.rd.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return Ok(None),
                Ok(_) => {}
            }
        }
    }

    /// Reads the next method frame of the handshake (skipping heartbeats). Not bounded in
    /// time itself: the whole handshake runs under one deadline ([`serve_io`]), so a peer
    /// cannot stretch it by trickling heartbeats.
    async fn method(&mut self) -> Result<Option<AMQPClass>> {
        loop {
            let Some(f) = self.frame().await? else {
                return Ok(None);
            };
            match f.kind {
                codec::FRAME_HEARTBEAT => continue,
                codec::FRAME_METHOD if f.channel == 0 => {
                    return codec::decode_method(&f.payload).map(Some);
                }
                _ => {
                    return Err(AmqpError::command_invalid(
                        "expected a connection method during the handshake",
                    ));
                }
            }
        }
    }
}

fn encode(m: &AMQPClass) -> BytesMut {
    let mut b = BytesMut::new();
    codec::encode_method(&mut b, 0, m);
    b
}

fn close_method(e: &AmqpError) -> AMQPClass {
    AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
        reply_code: e.code,
        reply_text: e.reply_text().into(),
        class_id: e.class_id,
        method_id: e.method_id,
    }))
}

/// Writes bytes during the handshake and pushes them out (a TLS stream may hold them back
/// until flushed; for TCP the flush does nothing).
async fn send_now<W: AsyncWrite + Unpin>(wr: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    wr.write_all(bytes).await?;
    wr.flush().await
}

/// Sends `connection.close` during the handshake and waits briefly for `close-ok`.
async fn refuse<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    reader: &mut Reader<R>,
    wr: &mut W,
    e: AmqpError,
) {
    debug!(code = e.code, text = %e.text, "closing connection during handshake");
    if send_now(wr, &encode(&close_method(&e))).await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        while let Ok(Some(m)) = reader.method().await {
            if matches!(m, AMQPClass::Connection(connection::AMQPMethod::CloseOk(_))) {
                break;
            }
        }
    })
    .await;
}

struct Opened {
    user: String,
    vhost: Arc<Vhost>,
    frame_max: u32,
    channel_max: u16,
    heartbeat: u16,
    client_properties: FieldTable,
    mechanism: String,
}

/// Serves one accepted TCP connection until it closes. `handshake_deadline` is when the
/// opening handshake must be done (accept + `handshake-timeout`).
pub async fn serve(
    broker: Arc<Broker>,
    stream: TcpStream,
    peer: SocketAddr,
    handshake_deadline: Instant,
) {
    let _ = stream.set_nodelay(true);
    let local = stream.local_addr().unwrap_or(peer);
    // Owned halves: no lock between the reader and the writer task.
    let (rd, wr) = stream.into_split();
    let ends = Ends {
        peer,
        local,
        handshake_deadline,
    };
    serve_io(broker, rd, wr, ends, None, None).await;
}

/// Serves one connection whose TLS handshake is done, until it closes.
pub async fn serve_tls(
    broker: Arc<Broker>,
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    ends: Ends,
) {
    let session = crate::tls::TlsSession::of(stream.get_ref().1);
    // rustls hands over a client certificate only once its verifier (the CA of tls-ca-file)
    // accepted it; without a CA no certificate is asked for. The first is the client's own.
    let peer_cert = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|c| c.as_ref().to_vec());
    let (rd, wr) = tokio::io::split(stream);
    serve_io(broker, rd, wr, ends, Some(session), peer_cert).await;
}

/// Where a connection comes from and goes to, and when its handshake must be done.
#[derive(Debug, Clone, Copy)]
pub struct Ends {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub handshake_deadline: Instant,
}

/// The connection over any byte stream: handshake, then reader and writer until it closes.
async fn serve_io<R, W>(
    broker: Arc<Broker>,
    rd: R,
    mut wr: W,
    ends: Ends,
    tls: Option<crate::tls::TlsSession>,
    peer_cert: Option<Vec<u8>>,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut reader = Reader {
        rd,
        // Small until the peer has logged in: a socket that never completes the handshake
        // costs little (measured, tests/hostile_clients.rs: ~4 KB a pending socket with
        // 1 KiB here, ~7 KB with 64 KiB). It grows to what a frame needs.
        buf: BytesMut::with_capacity(1024),
        // RabbitMQ's initial_frame_max: a peer that has not logged in (nor tuned) may not
        // make the node buffer large frames.
        decoder: FrameDecoder::pre_tune(),
    };
    let transport = Transport {
        tls: tls.is_some(),
        peer_cert: peer_cert.as_deref(),
    };
    let Ends { peer, local, .. } = ends;
    // One deadline for the whole handshake: neither heartbeats nor a frame now and then
    // extend it, so an unauthenticated socket cannot be held open.
    let handshake = handshake(&broker, &mut reader, &mut wr, peer, transport);
    let opened = match tokio::time::timeout_at(ends.handshake_deadline, handshake).await {
        Ok(Ok(Some(o))) => o,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            refuse(&mut reader, &mut wr, e).await;
            return;
        }
        Err(_) => {
            debug!(%peer, "handshake not done within handshake-timeout; closing the socket");
            return;
        }
    };
    // Logged in: read in large chunks from now on.
    reader.buf.reserve(64 * 1024);
    let id = broker.next_connection_id();
    let user = opened.user.clone();
    let span =
        tracing::info_span!("connection", id, %peer, user = %user, vhost = %opened.vhost.name);
    // The span is attached to this future (not entered across its awaits: an entered span
    // stays current on the worker thread while the task is parked, and every connection
    // polled there next would nest inside it).
    async move {
        let outbox = Outbox::new();
        let shared = Arc::new(ConnShared {
            id,
            broker: broker.clone(),
            vhost: opened.vhost.clone(),
            user: opened.user.clone(),
            outbox: outbox.clone(),
            frame_max: opened.frame_max,
            cancel_notify: client_capability(&opened.client_properties, "consumer_cancel_notify"),
            wake: Arc::new(tokio::sync::Notify::new()),
            info: crate::registry::ConnectionInfo {
                name: format!("{peer} -> {local}"),
                peer,
                local,
                client_properties: opened.client_properties.clone(),
                connected_at: crate::queue::now_ms(),
                channel_max: opened.channel_max,
                heartbeat: opened.heartbeat,
                auth_mechanism: opened.mechanism.clone(),
                tls,
            },
            control: Default::default(),
        });
        // The vhost's and the user's connection limits are checked and the connection counted
        // under one lock: handshakes finishing together cannot overshoot a limit.
        let admitted = broker.connections.register_within(
            shared.clone(),
            opened.vhost.limit(limits::MAX_CONNECTIONS),
            limits::in_force(
                &broker.access.user_limits(&opened.user),
                limits::MAX_CONNECTIONS,
            ),
        );
        if let Err(over) = admitted {
            refuse(&mut reader, &mut wr, limit_error(&opened, over)).await;
            return;
        }
        let open_ok = AMQPClass::Connection(connection::AMQPMethod::OpenOk(connection::OpenOk {}));
        if send_now(&mut wr, &encode(&open_ok)).await.is_err() {
            broker.connections.deregister(id);
            return;
        }
        info!("connection opened");
        if broker.is_draining() {
            // The drain began after our handshake checked; its sweep may have missed us.
            shared.control.request_close(crate::broker::DRAIN_REASON);
        }
        broker.metrics.connection_opened();
        let heartbeat = Duration::from_secs(opened.heartbeat as u64);
        // A client that stopped reading is cut off once its socket has accepted nothing for this
        // long; never sooner than two heartbeat intervals, the time a dead peer gets.
        let stall = broker.config.write_timeout.max(heartbeat * 2);
        let mut writer =
            tokio::spawn(write_loop(outbox.clone(), wr, heartbeat, stall).in_current_span());
        let mut conn = Connection {
            shared,
            channels: HashMap::new(),
            channel_max: opened.channel_max,
            closing: false,
            close_deadline: None,
            blocked_capable: client_capability(&opened.client_properties, "connection.blocked"),
            has_published: false,
            sync_pause: false,
            deferred: None,
        };
        let reason = conn.run(&mut reader, heartbeat).await;
        broker.connections.deregister(id);
        conn.cleanup();
        broker.metrics.connection_closed();
        outbox.close();
        // The writer flushes what is left (a close-ok, say) within the close deadline, or the
        // usual grace if the client closed; a socket that accepts nothing is not waited for
        // longer: aborting the writer drops its half of the socket, which closes it.
        let flush_by = conn
            .close_deadline
            .unwrap_or_else(|| Instant::now() + CLOSE_TIMEOUT);
        if tokio::time::timeout_at(flush_by, &mut writer)
            .await
            .is_err()
        {
            writer.abort();
            debug!("the socket took nothing more before the close deadline; dropped it");
        }
        info!(reason = %reason, "connection closed");
    }
    .instrument(span)
    .await
}

/// What authentication can use of the connection's transport.
#[derive(Clone, Copy)]
struct Transport<'a> {
    tls: bool,
    /// The client's verified certificate (DER), on a mutual-TLS connection.
    peer_cert: Option<&'a [u8]>,
}

/// SASL EXTERNAL (RabbitMQ's rabbitmq_auth_mechanism_ssl): the user named by the client
/// certificate, as `ssl-cert-login-from` says; no password. The SASL response is ignored.
fn external_login(
    broker: &Broker,
    transport: Transport<'_>,
    peer: SocketAddr,
) -> Result<Arc<auth::User>> {
    let Some(cert) = transport.peer_cert else {
        return Err(AmqpError::access_refused(if transport.tls {
            "EXTERNAL authentication needs a client certificate; this TLS connection presented none"
        } else {
            "EXTERNAL authentication needs a TLS connection with a client certificate; \
             this is not a TLS connection"
        }));
    };
    let c = &broker.config;
    let san = (c.ssl_cert_login_san_type, c.ssl_cert_login_san_index);
    let name = crate::tls::cert_login_name(cert, c.ssl_cert_login_from, san)
        .map_err(|e| AmqpError::access_refused(format!("EXTERNAL authentication refused: {e}")))?;
    broker.access.authenticate_external(&name, peer.ip())
}

/// Protocol header, start/start-ok (authentication), tune/tune-ok, open/open-ok.
async fn handshake<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    broker: &Broker,
    reader: &mut Reader<R>,
    wr: &mut W,
    peer: SocketAddr,
    transport: Transport<'_>,
) -> Result<Option<Opened>> {
    let mut header = [0u8; 8];
    if reader.rd.read_exact(&mut header).await.is_err() {
        return Ok(None);
    }
    if &header != codec::PROTOCOL_HEADER {
        // Tell the peer which protocol we speak, then close (AMQP 0-9-1 §4.2.2).
        let _ = send_now(wr, codec::PROTOCOL_HEADER).await;
        return Ok(None);
    }
    let start = AMQPClass::Connection(connection::AMQPMethod::Start(connection::Start {
        version_major: 0,
        version_minor: 9,
        server_properties: server_properties(broker),
        // EXTERNAL only where a client certificate was verified (RabbitMQ with the
        // rabbitmq_auth_mechanism_ssl plugin lists it after the defaults).
        mechanisms: if transport.peer_cert.is_some() {
            "PLAIN AMQPLAIN EXTERNAL".into()
        } else {
            "PLAIN AMQPLAIN".into()
        },
        locales: "en_US".into(),
    }));
    if send_now(wr, &encode(&start)).await.is_err() {
        return Ok(None);
    }
    let Some(m) = reader.method().await? else {
        return Ok(None);
    };
    let AMQPClass::Connection(connection::AMQPMethod::StartOk(start_ok)) = m else {
        return Err(AmqpError::command_invalid("expected connection.start-ok"));
    };
    let credentials = match start_ok.mechanism.as_str() {
        "PLAIN" => Some(auth::parse_plain(start_ok.response.as_bytes())),
        "AMQPLAIN" => Some(auth::parse_amqplain(start_ok.response.as_bytes())),
        "EXTERNAL" => None,
        other => {
            return Err(AmqpError::access_refused(format!(
                "unsupported authentication mechanism '{other}'"
            )));
        }
    };
    let failure_close =
        client_capability(&start_ok.client_properties, "authentication_failure_close");
    let login = match credentials {
        Some(credentials) => credentials
            .ok_or_else(|| AmqpError::access_refused("malformed SASL response"))
            .and_then(|(u, p)| broker.access.authenticate(&u, &p, peer.ip())),
        None => external_login(broker, transport, peer),
    };
    let user = match login {
        Ok(u) => u,
        Err(e) => {
            warn!(%peer, "authentication failed: {}", e.text);
            if failure_close {
                return Err(e);
            }
            return Ok(None);
        }
    };
    let tune = AMQPClass::Connection(connection::AMQPMethod::Tune(connection::Tune {
        channel_max: broker.config.channel_max,
        frame_max: broker.config.frame_max,
        heartbeat: broker.config.heartbeat,
    }));
    if send_now(wr, &encode(&tune)).await.is_err() {
        return Ok(None);
    }
    let Some(m) = reader.method().await? else {
        return Ok(None);
    };
    let AMQPClass::Connection(connection::AMQPMethod::TuneOk(t)) = m else {
        return Err(AmqpError::command_invalid("expected connection.tune-ok"));
    };
    let frame_max = match t.frame_max {
        0 => broker.config.frame_max,
        f if f < codec::FRAME_MIN_SIZE => {
            return Err(AmqpError::not_allowed(format!(
                "frame_max={f} < {} min size",
                codec::FRAME_MIN_SIZE
            )));
        }
        f if f > broker.config.frame_max => {
            return Err(AmqpError::not_allowed(format!(
                "frame_max={f} > {} max size",
                broker.config.frame_max
            )));
        }
        f => f,
    };
    reader.decoder = FrameDecoder::new(frame_max);
    let channel_max = match t.channel_max {
        0 => broker.config.channel_max,
        c => c.min(broker.config.channel_max),
    };
    let Some(m) = reader.method().await? else {
        return Ok(None);
    };
    let AMQPClass::Connection(connection::AMQPMethod::Open(open)) = m else {
        return Err(AmqpError::command_invalid("expected connection.open"));
    };
    if broker.is_draining() {
        info!(%peer, user = %user.name, "connection refused: the node is being drained");
        return Err(AmqpError::new(
            crate::error::code::CONNECTION_FORCED,
            crate::broker::DRAIN_REASON,
        ));
    }
    let vhost_name = open.virtual_host.as_str();
    let Some(vhost) = broker.vhost(vhost_name) else {
        return Err(AmqpError::not_allowed(format!(
            "vhost '{vhost_name}' not found"
        )));
    };
    if broker
        .access
        .vhost_permission(&user.name, vhost_name)
        .is_none()
    {
        return Err(AmqpError::not_allowed(format!(
            "access to vhost '{vhost_name}' refused for user '{}'",
            user.name
        )));
    }
    // `connection.open-ok` is sent once the connection is registered within its limits
    // (`serve_io`).
    Ok(Some(Opened {
        user: user.name.clone(),
        vhost,
        frame_max,
        channel_max,
        heartbeat: t.heartbeat,
        client_properties: start_ok.client_properties,
        mechanism: start_ok.mechanism.to_string(),
    }))
}

/// A connection over the vhost's or the user's `max-connections`, with RabbitMQ's refusals
/// (530 NOT_ALLOWED at `connection.open`).
fn limit_error(opened: &Opened, over: crate::registry::Over) -> AmqpError {
    let (vhost, user) = (&opened.vhost.name, &opened.user);
    AmqpError::not_allowed(match over {
        crate::registry::Over::Vhost(max) => format!(
            "access to vhost '{vhost}' refused for user '{user}': connection limit ({max}) is reached"
        ),
        crate::registry::Over::User(max) => format!(
            "connection refused for user '{user}': user connection limit ({max}) is reached"
        ),
    })
}

/// The user's `max-channels` over all its connections on this node (530 NOT_ALLOWED, as
/// RabbitMQ: a connection error).
fn check_channel_limit(conn: &ConnShared) -> Result<()> {
    let user = conn.user.as_str();
    if let Some(max) = limits::in_force(&conn.broker.access.user_limits(user), limits::MAX_CHANNELS)
        && conn.broker.connections.channels_of(user) >= max
    {
        return Err(AmqpError::not_allowed(format!(
            "number of channels opened for user '{user}' has reached the maximum allowed user limit of ({max})"
        )));
    }
    Ok(())
}

/// Flushes the outbox to the socket, one write per batch; sends heartbeats when idle. Closes
/// the outbox (which ends the reader) if a write fails or the socket accepts no byte for
/// `stall`: a client that stopped reading.
async fn write_loop<W: AsyncWrite + Unpin>(
    outbox: Arc<Outbox>,
    mut wr: W,
    heartbeat: Duration,
    stall: Duration,
) {
    loop {
        let chunk = outbox.take();
        if chunk.is_empty() {
            if outbox.is_closed() {
                break;
            }
            let notified = outbox.data.notified();
            if heartbeat.is_zero() {
                notified.await;
            } else if tokio::time::timeout(heartbeat / 2, notified).await.is_err() {
                codec::encode_heartbeat(&mut outbox.writer());
            }
            continue;
        }
        match write_progressing(&mut wr, &chunk, stall).await {
            Ok(()) => {}
            Err(e) => {
                if e.kind() == std::io::ErrorKind::TimedOut {
                    warn!(
                        "the client accepted no bytes for {}s ({} waiting); closing the connection",
                        stall.as_secs_f64(),
                        chunk.len() + outbox.len()
                    );
                }
                outbox.close();
                return;
            }
        }
        drop(chunk);
        outbox.after_write();
    }
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, wr.shutdown()).await;
}

/// Writes all of `buf`, failing with `TimedOut` if the socket accepts nothing for `stall`
/// (each write that makes progress re-arms it: a slow reader is not a stuck one).
async fn write_progressing<W: AsyncWrite + Unpin>(
    wr: &mut W,
    mut buf: &[u8],
    stall: Duration,
) -> std::io::Result<()> {
    let stuck = || std::io::Error::new(std::io::ErrorKind::TimedOut, "no bytes accepted");
    while !buf.is_empty() {
        match tokio::time::timeout(stall, wr.write(buf)).await {
            Err(_) => return Err(stuck()),
            Ok(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(Ok(n)) => buf = &buf[n..],
            Ok(Err(e)) => return Err(e),
        }
    }
    tokio::time::timeout(stall, wr.flush())
        .await
        .map_err(|_| stuck())?
}

/// Resolves when the message log syncs more (never without a log).
async fn wait_for_sync(synced: &mut Option<tokio::sync::watch::Receiver<u64>>) {
    match synced {
        Some(rx) => {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

enum Flow {
    Continue,
    Exit(&'static str),
}

struct Connection {
    shared: Arc<ConnShared>,
    channels: HashMap<u16, Channel>,
    channel_max: u16,
    /// We sent `connection.close` and wait for `close-ok`.
    closing: bool,
    /// Until when we wait for `close-ok` (set with `closing`); nothing the client sends
    /// extends it.
    close_deadline: Option<Instant>,
    blocked_capable: bool,
    has_published: bool,
    /// A channel's `tx.commit` waits for the message log: no frame is handled (nor read) until
    /// it is answered, so replies keep their order.
    sync_pause: bool,
    /// A channel's method waits for the cluster (a commit, another node's answer): as with
    /// `sync_pause`, nothing more is handled or read until it is answered.
    deferred: Option<(u16, crate::channel::Deferred)>,
}

/// The answer of the deferred method, once it comes (never without one).
async fn deferred_answer(
    d: &mut Option<(u16, crate::channel::Deferred)>,
) -> (u16, Result<Option<AMQPClass>>) {
    match d {
        Some((id, answer)) => (*id, answer.await),
        None => std::future::pending().await,
    }
}

impl Connection {
    fn send(&self, ch: u16, m: AMQPClass) {
        codec::encode_method(&mut self.shared.outbox.writer(), ch, &m);
    }

    async fn run<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut Reader<R>,
        heartbeat: Duration,
    ) -> String {
        let broker = self.shared.broker.clone();
        let mut alarms = broker.alarms();
        let mut synced = broker.store().map(|s| s.synced());
        let mut blocked_sent = false;
        loop {
            if self.sync_pause {
                // The log may have synced: answer the waiting commit, then handle what the
                // client sent after it (already buffered, perhaps nothing more will come).
                self.flush_confirms();
                self.sync_pause = self.channels.values().any(Channel::commit_pending);
            }
            // Everything already buffered is handled before reading again.
            while (!self.sync_pause && self.deferred.is_none()) || self.closing {
                let frame = match reader.decoder.decode(&mut reader.buf) {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => {
                        if self.closing {
                            return "bad frame while closing".into();
                        }
                        self.close_with(e);
                        reader.buf.clear();
                        break;
                    }
                };
                match self.handle_frame(frame) {
                    Ok(Flow::Continue) => {}
                    Ok(Flow::Exit(why)) => return why.into(),
                    Err(e) => self.close_with(e),
                }
            }
            let mut flow_wait = None;
            self.flush_confirms();
            for ch in self.channels.values_mut() {
                if let Some(q) = ch.take_flow_wait() {
                    flow_wait = Some(q);
                }
            }
            self.sync_pause = self.channels.values().any(Channel::commit_pending);
            // Credit flow: a queue whose consumers' connections are behind asks us to stop
            // reading publishes until it catches up (bounded, so heartbeats and other
            // channels are never starved for long).
            if let Some(q) = flow_wait {
                let until = tokio::time::Instant::now() + FLOW_WAIT_MAX;
                while q.flow_pressure() && tokio::time::Instant::now() < until {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            if self.shared.outbox.is_closed() {
                return "socket closed or not accepting writes".into();
            }
            // Not while closing: then only close-ok is read, and a client that stopped
            // reading must not hold off a close requested from outside.
            while self.shared.outbox.len() > READ_PAUSE_AT
                && !self.shared.outbox.is_closed()
                && !self.closing
            {
                let drained = self.shared.outbox.wait_for_drain();
                tokio::select! {
                    _ = tokio::time::timeout(Duration::from_millis(100), drained) => {}
                    why = self.shared.control.close_requested() => {
                        self.settle_confirms(&mut synced).await;
                        self.close_with(AmqpError::new(crate::error::code::CONNECTION_FORCED, why));
                    }
                }
            }
            // Resource alarms block connections that publish.
            if self.has_published && !self.closing && !alarms.borrow().is_empty() {
                if !blocked_sent && self.blocked_capable {
                    let reason = format!("low on {}", alarms.borrow().join(", "));
                    self.send(
                        0,
                        AMQPClass::Connection(connection::AMQPMethod::Blocked(
                            connection::Blocked {
                                reason: reason.into(),
                            },
                        )),
                    );
                    blocked_sent = true;
                }
                tokio::select! {
                    r = alarms.changed() => if r.is_err() {
                        return "broker shutting down".into();
                    },
                    why = self.shared.control.close_requested() => {
                        self.close_with(AmqpError::new(crate::error::code::CONNECTION_FORCED, why));
                    }
                    _ = self.shared.outbox.closed() => {}
                }
                continue;
            }
            if blocked_sent {
                self.send(
                    0,
                    AMQPClass::Connection(connection::AMQPMethod::Unblocked(
                        connection::Unblocked {},
                    )),
                );
                blocked_sent = false;
            }
            let read_by = match self.close_deadline {
                Some(deadline) => deadline,
                None if heartbeat.is_zero() => Instant::now() + Duration::from_secs(24 * 3600),
                None => Instant::now() + heartbeat * 2,
            };
            tokio::select! {
                r = tokio::time::timeout_at(read_by, reader.rd.read_buf(&mut reader.buf)), if (!self.sync_pause && self.deferred.is_none()) || self.closing => match r {
                    Ok(Ok(0)) => return "client closed the socket".into(),
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return format!("read error: {e}"),
                    Err(_) if self.closing => return "no close-ok from client".into(),
                    Err(_) => {
                        warn!("missed heartbeats from client, timeout: {}s", heartbeat.as_secs() * 2);
                        return "missed heartbeats".into();
                    }
                },
                _ = alarms.changed() => {}
                // The writer gave up (the socket failed or accepted nothing for too long).
                _ = self.shared.outbox.closed() => {}
                // Publisher confirms waiting for the message log go out when it syncs.
                _ = wait_for_sync(&mut synced), if self.channels.values().any(Channel::awaiting_sync) => {}
                (id, answer) = deferred_answer(&mut self.deferred), if self.deferred.is_some() => {
                    self.deferred = None;
                    self.finish_deferred(id, answer);
                }
                // ... or when another node answers a forwarded publish.
                _ = self.shared.wake.notified(), if self.channels.values().any(Channel::awaiting_sync) => {}
                why = self.shared.control.close_requested(), if !self.closing => {
                    // Closed from outside (drain, node shutdown): confirms for what was
                    // already taken go out first, so a publisher knows exactly what the node
                    // kept (a shovel or federation link then neither loses nor duplicates).
                    self.settle_confirms(&mut synced).await;
                    self.close_with(AmqpError::new(crate::error::code::CONNECTION_FORCED, why));
                }
            }
        }
    }

    /// Waits (up to 5 s) for the message log to sync every persistent message whose confirm
    /// is pending, and queues the confirms.
    async fn settle_confirms(&mut self, synced: &mut Option<tokio::sync::watch::Receiver<u64>>) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            self.flush_confirms();
            if !self.channels.values().any(Channel::awaiting_sync) {
                return;
            }
            let wake = self.shared.wake.clone();
            let either = async {
                tokio::select! {
                    _ = wait_for_sync(synced) => {}
                    _ = wake.notified() => {}
                }
            };
            if tokio::time::timeout_at(deadline, either).await.is_err() {
                return;
            }
        }
    }

    /// Sends the confirms (and commit-oks) the message log allows; a commit the log can
    /// never allow (it failed) closes the connection.
    fn flush_confirms(&mut self) {
        let mut failed = None;
        for ch in self.channels.values_mut() {
            if let Some(e) = ch.flush_confirms() {
                failed.get_or_insert(e);
            }
        }
        if let Some(e) = failed {
            self.close_with(e);
        }
    }

    /// A hard error: `connection.close`, then wait for `close-ok` ignoring everything else.
    fn close_with(&mut self, e: AmqpError) {
        if self.closing {
            return;
        }
        warn!(
            code = e.code,
            class_id = e.class_id,
            method_id = e.method_id,
            "connection error: {}",
            e.text
        );
        self.closing = true;
        self.close_deadline = Some(Instant::now() + CLOSE_TIMEOUT);
        for ch in self.channels.values_mut() {
            // Closing anyway: a failed commit needs no error of its own.
            let _ = ch.flush_confirms();
        }
        self.send(0, close_method(&e));
    }

    fn handle_frame(&mut self, f: RawFrame) -> Result<Flow> {
        if self.closing {
            if f.kind == codec::FRAME_METHOD && f.channel == 0 {
                match codec::method_ids(&f.payload) {
                    Some((10, 51)) => return Ok(Flow::Exit("closed after error")),
                    Some((10, 50)) => {
                        self.send(
                            0,
                            AMQPClass::Connection(connection::AMQPMethod::CloseOk(
                                connection::CloseOk {},
                            )),
                        );
                        return Ok(Flow::Exit("closed after error"));
                    }
                    _ => {}
                }
            }
            return Ok(Flow::Continue);
        }
        if f.kind == codec::FRAME_HEARTBEAT {
            if f.channel != 0 {
                return Err(AmqpError::frame_error(
                    "heartbeat frame on a non-zero channel",
                ));
            }
            return Ok(Flow::Continue);
        }
        if f.channel == 0 {
            return self.connection_frame(f);
        }
        if f.channel > self.channel_max {
            return Err(AmqpError::channel_error(format!(
                "channel {} exceeds the negotiated channel_max of {}",
                f.channel, self.channel_max
            )));
        }
        let id = f.channel;
        let Some(ch) = self.channels.get_mut(&id) else {
            if f.kind != codec::FRAME_METHOD {
                return Err(AmqpError::channel_error(format!(
                    "content frame on channel {id}, which is not open"
                )));
            }
            return match codec::decode_method(&f.payload)? {
                AMQPClass::Channel(channel::AMQPMethod::Open(_)) => {
                    check_channel_limit(&self.shared)?;
                    let ch = Channel::new(id, self.shared.clone());
                    self.shared.control.add_channel(&ch.shared);
                    self.channels.insert(id, ch);
                    self.send(
                        id,
                        AMQPClass::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {})),
                    );
                    Ok(Flow::Continue)
                }
                m => Err(AmqpError::channel_error("expected 'channel.open'")
                    .on_method(m.get_amqp_class_id(), m.get_amqp_method_id())),
            };
        };
        if ch.closing {
            if f.kind == codec::FRAME_METHOD {
                match codec::method_ids(&f.payload) {
                    Some((20, 41)) => {
                        self.channels.remove(&id);
                    }
                    Some((20, 40)) => {
                        self.channels.remove(&id);
                        self.send(
                            id,
                            AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                        );
                    }
                    _ => {}
                }
            }
            return Ok(Flow::Continue);
        }
        let result = match f.kind {
            codec::FRAME_METHOD => {
                // amq-protocol drops basic.qos prefetch_size; RabbitMQ refuses a non-zero one.
                if codec::method_ids(&f.payload) == Some((60, 10))
                    && let Some(size) = f.payload.get(4..8)
                    && size != [0, 0, 0, 0]
                {
                    let n = u32::from_be_bytes([size[0], size[1], size[2], size[3]]);
                    return Err(
                        AmqpError::not_implemented(format!("prefetch_size!=0 ({n})"))
                            .on_method(60, 10),
                    );
                }
                if ch.expecting_content() {
                    return Err(AmqpError::unexpected_frame(
                        "expected content header for class 60, got non content header frame instead",
                    ));
                }
                match codec::decode_method(&f.payload)? {
                    AMQPClass::Channel(channel::AMQPMethod::Close(_)) => {
                        let _ = ch.flush_confirms();
                        ch.cleanup();
                        self.channels.remove(&id);
                        self.send(
                            id,
                            AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                        );
                        return Ok(Flow::Continue);
                    }
                    AMQPClass::Channel(channel::AMQPMethod::CloseOk(_)) => {
                        return Ok(Flow::Continue);
                    }
                    AMQPClass::Connection(_) => {
                        return Err(AmqpError::command_invalid(format!(
                            "connection method on channel {id}"
                        )));
                    }
                    m => {
                        if matches!(
                            m,
                            AMQPClass::Basic(amq_protocol::protocol::basic::AMQPMethod::Publish(_))
                        ) {
                            self.has_published = true;
                        }
                        let r = ch.handle_method(m);
                        self.sync_pause |= ch.commit_pending();
                        if let Some(answer) = ch.take_deferred() {
                            self.deferred = Some((id, answer));
                        }
                        r
                    }
                }
            }
            codec::FRAME_HEADER => {
                let h = codec::decode_header(&f.payload)?;
                ch.handle_header(h)
            }
            codec::FRAME_BODY => ch.handle_body(f.payload),
            other => Err(AmqpError::frame_error(format!(
                "unexpected frame type {other}"
            ))),
        };
        match result {
            Err(e) => self.channel_failed(id, e),
            Ok(()) => Ok(Flow::Continue),
        }
    }

    /// The answer of a deferred method: its reply, or its error.
    fn finish_deferred(&mut self, id: u16, answer: Result<Option<AMQPClass>>) {
        if self.closing || !self.channels.contains_key(&id) {
            return;
        }
        match answer {
            Ok(Some(m)) => self.send(id, m),
            Ok(None) => {}
            Err(e) => {
                if let Err(e) = self.channel_failed(id, e) {
                    self.close_with(e);
                }
            }
        }
    }

    /// A channel error closes the channel; a hard one is returned (it closes the connection).
    fn channel_failed(&mut self, id: u16, e: AmqpError) -> Result<Flow> {
        if e.is_hard() {
            return Err(e);
        }
        if let Some(ch) = self.channels.get_mut(&id) {
            debug!(channel = id, code = e.code, "channel error: {}", e.text);
            let _ = ch.flush_confirms();
            ch.cleanup();
            ch.closing = true;
            let m = AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                reply_code: e.code,
                reply_text: e.reply_text().into(),
                class_id: e.class_id,
                method_id: e.method_id,
            }));
            self.send(id, m);
        }
        Ok(Flow::Continue)
    }

    fn connection_frame(&mut self, f: RawFrame) -> Result<Flow> {
        if f.kind != codec::FRAME_METHOD {
            return Err(AmqpError::command_invalid("content frame on channel 0"));
        }
        match codec::decode_method(&f.payload)? {
            AMQPClass::Connection(connection::AMQPMethod::Close(c)) => {
                debug!(code = c.reply_code, "client closed the connection");
                self.cleanup();
                self.send(
                    0,
                    AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
                );
                Ok(Flow::Exit("client closed the connection"))
            }
            AMQPClass::Connection(connection::AMQPMethod::CloseOk(_)) => Ok(Flow::Exit("close-ok")),
            AMQPClass::Connection(connection::AMQPMethod::Blocked(_))
            | AMQPClass::Connection(connection::AMQPMethod::Unblocked(_)) => Ok(Flow::Continue),
            AMQPClass::Connection(connection::AMQPMethod::UpdateSecret(_)) => Err(
                AmqpError::not_implemented("connection.update-secret is not supported"),
            ),
            m => Err(AmqpError::command_invalid(format!(
                "method {}.{} is not valid on channel 0 of an open connection",
                m.get_amqp_class_id(),
                m.get_amqp_method_id()
            ))
            .on_method(m.get_amqp_class_id(), m.get_amqp_method_id())),
        }
    }

    /// Releases channels (requeueing unacked messages) and exclusive queues.
    fn cleanup(&mut self) {
        for (_, mut ch) in self.channels.drain() {
            ch.cleanup();
        }
        self.shared.vhost.remove_exclusive_queues(self.shared.id);
    }
}
