#![allow(clippy::unwrap_used)]
//! Hostile clients (issue 16): hand-built frames that once crashed or pinned the node. Each
//! test sends the attack over a raw socket, checks what the broker answers, then checks that a
//! well-behaved (lapin) client is still served by the same node.
mod common;

use std::time::Duration;

use amq_protocol::protocol::{AMQPClass, basic, connection};
use bytes::BytesMut;
use common::raw::{self, frame, handshake, send_method};
use common::{TestBroker, unique};
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use warren_broker::codec::encode_method;

/// A lapin client opens a connection, declares a queue and publishes into it.
async fn still_serving(b: &TestBroker) {
    let c = Connection::connect(&b.url(), ConnectionProperties::default())
        .await
        .expect("a second client is still served");
    let ch = c.create_channel().await.unwrap();
    let q = unique("alive");
    ch.queue_declare(
        q.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("broker still serves");
    ch.basic_publish(
        "".into(),
        q.as_str().into(),
        BasicPublishOptions::default(),
        b"ok",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    let q2 = q.clone();
    assert!(
        common::eventually(|| b
            .broker
            .vhost("/")
            .unwrap()
            .queue(&q2)
            .unwrap()
            .message_count()
            == 1)
        .await
    );
}

/// A field value (type octet first) of `depth` arrays, each holding the next; a void inside.
fn nested_arrays(depth: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(5 * depth + 1);
    for level in 0..depth {
        v.push(b'A');
        v.extend_from_slice(&((5 * (depth - 1 - level) + 1) as u32).to_be_bytes());
    }
    v.push(b'V');
    v
}

/// A field value of `depth` tables, each holding the next under the empty key.
fn nested_tables(depth: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(6 * depth);
    for level in 0..depth {
        v.push(b'F');
        // The inner table: one entry (empty key, the next table), or nothing at the bottom.
        let inner = if level + 1 == depth {
            0
        } else {
            1 + 5 + 6 * (depth - 2 - level)
        };
        v.extend_from_slice(&(inner as u32).to_be_bytes());
        if level + 1 < depth {
            v.push(0);
        }
    }
    v
}

/// A field table (length-prefixed) with one entry `key` = `value`.
fn table_with(key: &str, value: &[u8]) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(&((1 + key.len() + value.len()) as u32).to_be_bytes());
    t.push(key.len() as u8);
    t.extend_from_slice(key.as_bytes());
    t.extend_from_slice(value);
    t
}

fn short_str(out: &mut Vec<u8>, s: &str) {
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

/// `connection.start-ok` (PLAIN, guest) whose client properties are `props`.
fn start_ok_frame(props: &[u8]) -> Vec<u8> {
    let mut p = vec![0, 10, 0, 11];
    p.extend_from_slice(props);
    short_str(&mut p, "PLAIN");
    let response = b"\0guest\0guest";
    p.extend_from_slice(&(response.len() as u32).to_be_bytes());
    p.extend_from_slice(response);
    short_str(&mut p, "en_US");
    frame(1, 0, &p)
}

/// Reads until `connection.close` arrives, answers it and returns it (None if the socket
/// closed or went quiet first).
async fn connection_close(s: &mut TcpStream, buf: &mut BytesMut) -> Option<connection::Close> {
    loop {
        match raw::try_read_method(s, buf).await? {
            AMQPClass::Connection(connection::AMQPMethod::Close(c)) => {
                // After a frame error the broker cannot read on and may hang up at once.
                let mut ok = BytesMut::new();
                encode_method(
                    &mut ok,
                    0,
                    &AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
                );
                let _ = s.write_all(&ok).await;
                return Some(c);
            }
            _ => continue,
        }
    }
}

/// After the close handshake the broker hangs up.
async fn assert_hung_up(s: &mut TcpStream, what: &str) {
    let mut rest = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut rest))
        .await
        .unwrap_or_else(|_| panic!("{what}: socket still open"));
    assert!(
        matches!(n, Ok(0) | Err(_)),
        "{what}: socket should be closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_client_properties_are_refused_before_login() {
    let b = TestBroker::start().await;
    // (what, client properties, accepted reply codes, a word the reply text must contain)
    let cases: Vec<(&str, Vec<u8>, &[u16], &str)> = vec![
        // ~125 KB: over the 4096-byte limit that holds until tune-ok.
        (
            "25,000 nested arrays",
            table_with("x", &nested_arrays(25_000)),
            &[501],
            "4096",
        ),
        (
            "20,000 nested tables",
            table_with("x", &nested_tables(20_000)),
            &[501],
            "4096",
        ),
        // Small enough for the pre-tune limit, too deep for the nesting limit.
        (
            "500 nested arrays in 2.5 KB",
            table_with("x", &nested_arrays(500)),
            &[502],
            "nest",
        ),
        (
            "500 nested tables in 3 KB",
            table_with("x", &nested_tables(500)),
            &[502],
            "nest",
        ),
    ];
    for (what, props, codes, word) in cases {
        let mut s = TcpStream::connect(b.addr).await.unwrap();
        s.write_all(b"AMQP\x00\x00\x09\x01").await.unwrap();
        let mut buf = BytesMut::new();
        let _start = raw::read_method(&mut s, &mut buf).await;
        // The broker may close before reading all of it: ignore a failed write.
        let _ = s.write_all(&start_ok_frame(&props)).await;
        let close = connection_close(&mut s, &mut buf)
            .await
            .unwrap_or_else(|| panic!("{what}: no connection.close"));
        assert!(
            codes.contains(&close.reply_code),
            "{what}: reply {} {}",
            close.reply_code,
            close.reply_text
        );
        assert!(
            close.reply_text.as_str().contains(word),
            "{what}: reply text should say what was wrong: {}",
            close.reply_text
        );
        assert_hung_up(&mut s, what).await;
        still_serving(&b).await;
    }
    // Nesting up to the limit is fine: the client logs in.
    let mut s = TcpStream::connect(b.addr).await.unwrap();
    s.write_all(b"AMQP\x00\x00\x09\x01").await.unwrap();
    let mut buf = BytesMut::new();
    let _start = raw::read_method(&mut s, &mut buf).await;
    s.write_all(&start_ok_frame(&table_with("x", &nested_arrays(99))))
        .await
        .unwrap();
    assert!(
        matches!(
            raw::read_method(&mut s, &mut buf).await,
            AMQPClass::Connection(connection::AMQPMethod::Tune(_))
        ),
        "99 nested arrays (100 levels with the properties table) are accepted"
    );
}

/// `queue.declare` of `q` with `arguments` (a length-prefixed field table).
fn queue_declare_frame(channel: u16, q: &str, arguments: &[u8]) -> Vec<u8> {
    let mut p = vec![0, 50, 0, 10, 0, 0];
    short_str(&mut p, q);
    p.push(0);
    p.extend_from_slice(arguments);
    frame(1, channel, &p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_queue_arguments_close_the_connection() {
    let b = TestBroker::start().await;
    for (what, args) in [
        (
            "25,000 nested arrays",
            table_with("x-a", &nested_arrays(25_000)),
        ),
        (
            "20,000 nested tables",
            table_with("x-t", &nested_tables(20_000)),
        ),
    ] {
        let mut s = TcpStream::connect(b.addr).await.unwrap();
        let mut buf = handshake(&mut s).await;
        send_method(&mut s, 1, raw::channel_open()).await;
        s.write_all(&queue_declare_frame(1, "deep", &args))
            .await
            .unwrap();
        let close = connection_close(&mut s, &mut buf)
            .await
            .unwrap_or_else(|| panic!("{what}: no connection.close"));
        assert_eq!(close.reply_code, 502, "{what}: {}", close.reply_text);
        assert!(
            close.reply_text.as_str().contains("nest"),
            "{what}: {}",
            close.reply_text
        );
        assert_eq!((close.class_id, close.method_id), (50, 10), "{what}");
        assert_hung_up(&mut s, what).await;
        still_serving(&b).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_message_headers_close_the_connection() {
    let b = TestBroker::start().await;
    for (what, headers) in [
        (
            "25,000 nested arrays",
            table_with("h", &nested_arrays(25_000)),
        ),
        (
            "20,000 nested tables",
            table_with("h", &nested_tables(20_000)),
        ),
    ] {
        let mut s = TcpStream::connect(b.addr).await.unwrap();
        let mut buf = handshake(&mut s).await;
        send_method(&mut s, 1, raw::channel_open()).await;
        send_method(
            &mut s,
            1,
            AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
                exchange: "".into(),
                routing_key: "nowhere".into(),
                mandatory: false,
                immediate: false,
            })),
        )
        .await;
        // Content header: class 60, weight 0, body size 0, flags = headers only.
        let mut p = vec![0, 60, 0, 0];
        p.extend_from_slice(&0u64.to_be_bytes());
        p.extend_from_slice(&(1u16 << 13).to_be_bytes());
        p.extend_from_slice(&headers);
        s.write_all(&frame(2, 1, &p)).await.unwrap();
        let close = connection_close(&mut s, &mut buf)
            .await
            .unwrap_or_else(|| panic!("{what}: no connection.close"));
        assert_eq!(close.reply_code, 502, "{what}: {}", close.reply_text);
        assert!(
            close.reply_text.as_str().contains("nest"),
            "{what}: {}",
            close.reply_text
        );
        assert_hung_up(&mut s, what).await;
        still_serving(&b).await;
    }
}

/// Waits until the peer closes `s` (EOF or a reset), feeding it a heartbeat frame every
/// second meanwhile if `heartbeats`; returns how long that took, or None after `limit`.
async fn closed_within(s: &mut TcpStream, heartbeats: bool, limit: Duration) -> Option<Duration> {
    let started = tokio::time::Instant::now();
    let mut buf = BytesMut::new();
    while started.elapsed() < limit {
        if heartbeats && s.write_all(&frame(8, 0, b"")).await.is_err() {
            return Some(started.elapsed());
        }
        match tokio::time::timeout(Duration::from_secs(1), s.read_buf(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) | Err(_) => {}
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_has_one_deadline_that_heartbeats_do_not_extend() {
    let b = TestBroker::start_with(warren_broker::Config {
        handshake_timeout: Duration::from_secs(2),
        ..warren_broker::Config::default()
    })
    .await;
    // Closed by the 2 s deadline; 8 s leaves room for a loaded machine, and is still less
    // than the 10 s a step used to be allowed (each heartbeat re-armed it, so forever).
    let limit = Duration::from_secs(8);
    for step in ["protocol header", "start-ok"] {
        let mut s = TcpStream::connect(b.addr).await.unwrap();
        s.write_all(b"AMQP\x00\x00\x09\x01").await.unwrap();
        let mut buf = BytesMut::new();
        let _start = raw::read_method(&mut s, &mut buf).await;
        if step == "start-ok" {
            // Logged in, but never answers connection.tune.
            send_method(&mut s, 0, raw::start_ok("guest", "guest", true)).await;
            let _tune = raw::read_method(&mut s, &mut buf).await;
        }
        let took = closed_within(&mut s, true, limit).await;
        println!("heartbeating after the {step}: closed after {took:?}");
        assert!(
            took.is_some(),
            "a socket heartbeating after the {step} is still open after {limit:?}"
        );
    }
    // A socket that sends nothing at all.
    let mut s = TcpStream::connect(b.addr).await.unwrap();
    let took = closed_within(&mut s, false, limit).await;
    println!("silent socket: closed after {took:?}");
    assert!(
        took.is_some(),
        "a silent socket is still open after {limit:?}"
    );
    still_serving(&b).await;
}

/// The resident memory of this process (the test and the in-process node), in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_handshakes_do_not_starve_a_real_client() {
    let b = TestBroker::start().await;
    // Warm up: one full connection, so the runtime and the node's lazy state exist before
    // the baseline.
    still_serving(&b).await;
    let pending = 2_000;
    let open = || {
        b.broker
            .open_connections
            .load(std::sync::atomic::Ordering::Acquire)
    };
    // The warm-up connection is gone (lapin closes it when dropped).
    assert!(common::eventually(|| open() == 0).await);
    let before = rss();
    let mut sockets = Vec::with_capacity(pending);
    for _ in 0..pending {
        sockets.push(TcpStream::connect(b.addr).await.unwrap());
    }
    assert!(
        common::eventually(|| open() == pending).await,
        "the node accepted every pending socket"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = rss();
    println!(
        "{pending} pending sockets: VmRSS {} KiB -> {} KiB, {} bytes per pending socket \
         (both ends: the node's task and buffers, the test's client socket)",
        before / 1024,
        after / 1024,
        after.saturating_sub(before) / pending as u64
    );
    let started = std::time::Instant::now();
    still_serving(&b).await;
    println!(
        "with {pending} pending sockets a lapin client connected, declared and published in {:?}",
        started.elapsed()
    );
    drop(sockets);
}
