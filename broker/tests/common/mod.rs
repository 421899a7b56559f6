#![allow(clippy::unwrap_used, dead_code)]
//! Test harness: a real broker on 127.0.0.1:0 in the test's runtime, and lapin helpers.

pub mod api;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use lapin::{Channel, Connection, ConnectionProperties};
use tokio::net::TcpListener;
use warren_broker::{Broker, Config};

pub struct TestBroker {
    pub addr: SocketAddr,
    pub broker: Arc<Broker>,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

impl TestBroker {
    pub async fn start() -> Self {
        Self::start_with(Config::default()).await
    }

    pub async fn start_with(config: Config) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let broker = Broker::new(config);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(warren_broker::server::run(
            broker.clone(),
            listener,
            async {
                let _ = rx.await;
            },
        ));
        // Federation links and shovels, as the binary runs them.
        warren_broker::links::start(&broker);
        Self {
            addr,
            broker,
            _shutdown: tx,
        }
    }

    /// Serves this broker's Prometheus endpoint on 127.0.0.1:0; returns its base URL
    /// (`http://127.0.0.1:PORT`). The listener lives as long as the test's runtime.
    pub async fn start_metrics(&self) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(warren_broker::metrics::run(
            self.broker.clone(),
            listener,
            std::future::pending(),
        ));
        format!("http://{addr}")
    }

    /// Serves this broker's management HTTP API on 127.0.0.1:0; returns its base URL
    /// (`http://127.0.0.1:PORT`). The listener lives as long as the test's runtime.
    pub async fn start_management(&self) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(warren_broker::management::run(
            self.broker.clone(),
            listener,
            std::future::pending(),
        ));
        format!("http://{addr}")
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }

    pub async fn connect(&self) -> Connection {
        Connection::connect(&self.url(), ConnectionProperties::default())
            .await
            .expect("connect")
    }

    pub async fn channel(&self) -> (Connection, Channel) {
        let c = self.connect().await;
        let ch = c.create_channel().await.expect("channel");
        (c, ch)
    }
}

/// The AMQP reply code carried by a lapin error, if any.
pub fn code(e: &lapin::Error) -> Option<u16> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(p) => Some(p.get_id()),
        _ => None,
    }
}

pub async fn eventually<F: FnMut() -> bool>(mut f: F) -> bool {
    for _ in 0..200 {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

/// After a bad connection, a good (lapin) client still works end to end on the same node:
/// it connects, declares a queue and publishes into it.
pub async fn still_serving(b: &TestBroker) {
    use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
    let (_c, ch) = b.channel().await;
    let q = unique("alive");
    ch.queue_declare(
        q.as_str().into(),
        QueueDeclareOptions::default(),
        lapin::types::FieldTable::default(),
    )
    .await
    .expect("broker still serves");
    ch.basic_publish(
        "".into(),
        q.as_str().into(),
        BasicPublishOptions::default(),
        b"ok",
        lapin::BasicProperties::default(),
    )
    .await
    .unwrap();
    assert!(
        eventually(|| b
            .broker
            .vhost("/")
            .unwrap()
            .queue(&q)
            .unwrap()
            .message_count()
            == 1)
        .await
    );
}

pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub mod raw {
    //! Just enough hand-made AMQP to play a client that misbehaves.
    use amq_protocol::protocol::{AMQPClass, basic, channel, connection};
    use amq_protocol::types::{AMQPValue, FieldTable};
    use bytes::BytesMut;
    use std::time::Duration;
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
    use tokio::net::TcpStream;
    use warren_broker::codec::{FrameDecoder, decode_method, encode_method};

    /// Any byte stream: a `TcpStream`, or a TLS stream over one.
    pub trait Stream: AsyncRead + AsyncWrite + Unpin {}
    impl<S: AsyncRead + AsyncWrite + Unpin> Stream for S {}

    pub async fn send_method(s: &mut impl Stream, ch: u16, m: AMQPClass) {
        let mut b = BytesMut::new();
        encode_method(&mut b, ch, &m);
        s.write_all(&b).await.unwrap();
    }

    /// The next method frame, or None if the socket closed first (or nothing came in 5 s).
    pub async fn try_read_method(s: &mut impl Stream, buf: &mut BytesMut) -> Option<AMQPClass> {
        let d = FrameDecoder::new(1 << 20);
        loop {
            if let Some(f) = d.decode(buf).unwrap() {
                if f.kind == 1 {
                    return Some(decode_method(&f.payload).unwrap());
                }
                continue;
            }
            match tokio::time::timeout(Duration::from_secs(5), s.read_buf(buf)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return None,
            }
        }
    }

    pub async fn read_method(s: &mut impl Stream, buf: &mut BytesMut) -> AMQPClass {
        try_read_method(s, buf)
            .await
            .expect("socket closed before a method arrived")
    }

    pub fn start_ok(user: &str, pass: &str, failure_close: bool) -> AMQPClass {
        let mut caps = FieldTable::default();
        caps.insert(
            "authentication_failure_close".into(),
            AMQPValue::Boolean(failure_close),
        );
        caps.insert("connection.blocked".into(), AMQPValue::Boolean(true));
        caps.insert("consumer_cancel_notify".into(), AMQPValue::Boolean(true));
        let mut props = FieldTable::default();
        props.insert("capabilities".into(), AMQPValue::FieldTable(caps));
        AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
            client_properties: props,
            mechanism: "PLAIN".into(),
            response: format!("\0{user}\0{pass}").into(),
            locale: "en_US".into(),
        }))
    }

    pub async fn handshake(s: &mut TcpStream) -> BytesMut {
        handshake_with(s, 0).await
    }

    /// Opens a connection as guest with the given heartbeat; returns the read buffer.
    pub async fn handshake_with(s: &mut TcpStream, heartbeat: u16) -> BytesMut {
        s.write_all(b"AMQP\x00\x00\x09\x01").await.unwrap();
        let mut buf = BytesMut::new();
        let _start = read_method(s, &mut buf).await;
        send_method(s, 0, start_ok("guest", "guest", true)).await;
        let frame_max = match read_method(s, &mut buf).await {
            AMQPClass::Connection(connection::AMQPMethod::Tune(t)) => t.frame_max,
            other => panic!("expected connection.tune, got {other:?}"),
        };
        send_method(
            s,
            0,
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: 10,
                frame_max,
                heartbeat,
            })),
        )
        .await;
        send_method(
            s,
            0,
            AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
                virtual_host: "/".into(),
            })),
        )
        .await;
        let _ok = read_method(s, &mut buf).await;
        buf
    }

    pub fn channel_open() -> AMQPClass {
        AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {}))
    }

    pub fn consume(q: &str, no_ack: bool) -> AMQPClass {
        AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
            queue: q.into(),
            consumer_tag: "raw".into(),
            no_local: false,
            no_ack,
            exclusive: false,
            nowait: false,
            arguments: FieldTable::default(),
        }))
    }

    /// A frame with arbitrary type, channel and payload.
    pub fn frame(kind: u8, ch: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![kind];
        v.extend_from_slice(&ch.to_be_bytes());
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v.push(0xCE);
        v
    }

    /// Reads until `connection.close` arrives; returns its reply code (None if the socket closed).
    pub async fn expect_connection_close(s: &mut impl Stream, buf: &mut BytesMut) -> Option<u16> {
        loop {
            match try_read_method(s, buf).await? {
                AMQPClass::Connection(connection::AMQPMethod::Close(c)) => {
                    send_method(
                        s,
                        0,
                        AMQPClass::Connection(connection::AMQPMethod::CloseOk(
                            connection::CloseOk {},
                        )),
                    )
                    .await;
                    return Some(c.reply_code);
                }
                _ => continue,
            }
        }
    }
}

/// Publishes on a channel in confirm mode and waits for the broker's confirm.
pub async fn publish_confirmed(
    ch: &lapin::Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    props: lapin::BasicProperties,
) -> lapin::Confirmation {
    ch.basic_publish(
        exchange.into(),
        routing_key.into(),
        lapin::options::BasicPublishOptions::default(),
        body,
        props,
    )
    .await
    .expect("publish")
    .await
    .expect("confirm")
}

/// Declares a durable queue.
pub async fn declare_durable(ch: &Channel, queue: &str) {
    ch.queue_declare(
        queue.into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        lapin::types::FieldTable::default(),
    )
    .await
    .unwrap();
}

/// Binds `queue` to `exchange` with `key`.
pub async fn bind(ch: &Channel, queue: &str, exchange: &str, key: &str) {
    ch.queue_bind(
        queue.into(),
        exchange.into(),
        key.into(),
        lapin::options::QueueBindOptions::default(),
        lapin::types::FieldTable::default(),
    )
    .await
    .unwrap();
}

/// Messages in `queue` (a passive declare).
pub async fn message_count(ch: &Channel, queue: &str) -> u32 {
    ch.queue_declare(
        queue.into(),
        lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        lapin::types::FieldTable::default(),
    )
    .await
    .unwrap()
    .message_count()
}
