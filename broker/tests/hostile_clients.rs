#![allow(clippy::unwrap_used)]
//! Hostile clients (issue 16): hand-built frames that once crashed or pinned the node. Each
//! test sends the attack over a raw socket, checks what the broker answers, then checks that a
//! well-behaved (lapin) client is still served by the same node.
mod common;

use std::time::Duration;

use amq_protocol::protocol::{AMQPClass, basic, connection};
use bytes::BytesMut;
use common::raw::{self, frame, handshake, send_method};
use common::{TestBroker, still_serving, unique};
use lapin::BasicProperties;
use lapin::options::*;
use lapin::types::FieldTable;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use warren_broker::codec::encode_method;

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
    // Whatever the node still sends is read and dropped: the buffer does not grow.
    let mut buf = vec![0u8; 256 * 1024];
    while started.elapsed() < limit {
        if heartbeats && s.write_all(&frame(8, 0, b"")).await.is_err() {
            return Some(started.elapsed());
        }
        match tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
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

/// Messages of 64 KiB in the stuck-consumer tests: a few dozen fill the socket buffers.
const STUCK_BODY: usize = 64 * 1024;

/// Declares `q` and fills it with `n` messages of [`STUCK_BODY`] bytes (confirmed).
async fn fill_queue(b: &TestBroker, q: &str, n: usize) -> lapin::Connection {
    let (c, ch) = b.channel().await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    ch.queue_declare(
        q.into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let body = vec![b'x'; STUCK_BODY];
    for _ in 0..n {
        common::publish_confirmed(&ch, "", q, &body, BasicProperties::default()).await;
    }
    c
}

/// A raw consumer (small receive buffer, prefetch 1000, manual acks) of `q` that reads the
/// consume-ok and then never reads again. Returns its socket once the node has stopped
/// delivering to it (its unacked count holds still), with how many it holds.
async fn stuck_consumer(b: &TestBroker, q: &str) -> (TcpStream, u64) {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut s = sock.connect(b.addr).await.unwrap();
    let mut buf = raw::handshake(&mut s).await;
    send_method(&mut s, 1, raw::channel_open()).await;
    let _open_ok = raw::read_method(&mut s, &mut buf).await;
    send_method(
        &mut s,
        1,
        AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
            prefetch_count: 1000,
            global: false,
        })),
    )
    .await;
    let _qos_ok = raw::read_method(&mut s, &mut buf).await;
    send_method(&mut s, 1, raw::consume(q, false)).await;
    // From here on the socket is never read: deliveries pile up in the kernel's buffers,
    // then in the connection's outbox, then stay in the queue.
    let queue = b.broker.vhost("/").unwrap().queue(q).unwrap();
    let mut last = (u64::MAX, u64::MAX);
    let started = std::time::Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (ready, unacked, _) = queue.counts();
        if (ready, unacked) == last && unacked > 0 {
            println!(
                "stuck consumer holds {unacked} unacked ({} KiB), {ready} ready, after {:?}",
                unacked * STUCK_BODY as u64 / 1024,
                started.elapsed()
            );
            return (s, unacked);
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "deliveries to the stuck consumer never settled"
        );
        last = (ready, unacked);
    }
}

/// Consumes `q` with lapin (auto-ack) until `n` messages came; returns when the last one did,
/// or None if they did not all come within `limit`.
async fn lapin_receives(b: &TestBroker, q: &str, n: usize, limit: Duration) -> Option<Duration> {
    use futures_lite::StreamExt;
    let started = std::time::Instant::now();
    let (_c, ch) = b.channel().await;
    let mut consumer = ch
        .basic_consume(
            q.into(),
            "well-behaved".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut got = 0;
    while got < n {
        match tokio::time::timeout_at((started + limit).into(), consumer.next()).await {
            Ok(Some(Ok(d))) => {
                assert_eq!(d.data.len(), STUCK_BODY);
                got += 1;
            }
            _ => {
                println!("lapin consumer got {got} of {n} within {limit:?}");
                return None;
            }
        }
    }
    Some(started.elapsed())
}

/// Runs `f` while sending a heartbeat frame on `s` every half second, as a client whose
/// heartbeat thread lives on while its consumer is stuck.
async fn heartbeating<T>(s: &mut TcpStream, f: impl std::future::Future<Output = T>) -> T {
    tokio::pin!(f);
    let mut sent = 0;
    let out = loop {
        tokio::select! {
            out = &mut f => break out,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                // A bounded write: the node may have stopped reading us too.
                let hb = frame(8, 0, b"");
                if let Ok(Ok(())) =
                    tokio::time::timeout(Duration::from_millis(100), s.write_all(&hb)).await
                {
                    sent += 1;
                }
            }
        }
    };
    println!("the stuck client sent {sent} heartbeats meanwhile");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_stops_reading_is_cut_off_and_its_messages_go_to_another() {
    let b = TestBroker::start_with(warren_broker::Config {
        write_timeout: Duration::from_secs(2),
        ..warren_broker::Config::default()
    })
    .await;
    let q = unique("stuck");
    let n = 300;
    let _publisher = fill_queue(&b, &q, n).await;
    let (mut s, held) = stuck_consumer(&b, &q).await;
    // The client is alive: it keeps sending heartbeats, it just does not read.
    let heartbeats = heartbeating(&mut s, lapin_receives(&b, &q, n, Duration::from_secs(30))).await;
    println!(
        "write-timeout 2 s: a lapin consumer had all {n} messages ({held} from the stuck consumer) after {heartbeats:?}"
    );
    assert!(
        heartbeats.is_some(),
        "the messages held by a consumer that stopped reading never reached another consumer"
    );
    assert!(
        common::eventually(|| b.broker.connections.len() == 1).await,
        "the stuck connection is still registered"
    );
    let hung_up = closed_within(&mut s, false, Duration::from_secs(20)).await;
    println!("the stuck client's socket reached its end after reading for {hung_up:?}");
    assert!(hung_up.is_some(), "the node never closed the stuck socket");
    still_serving(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_stuck_connection_closes_it_promptly() {
    // The default write-timeout (30 s) would close it too, but later than the DELETE must.
    let b = TestBroker::start().await;
    let api = b.start_management().await;
    let q = unique("stuck-delete");
    let n = 300;
    let _publisher = fill_queue(&b, &q, n).await;
    let (mut s, held) = stuck_consumer(&b, &q).await;
    let me = s.local_addr().unwrap();
    let name = b
        .broker
        .connections
        .list()
        .into_iter()
        .find(|c| c.info.peer == me)
        .expect("the stuck connection is registered")
        .info
        .name
        .clone();
    let enc: String = name
        .bytes()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                (c as char).to_string()
            } else {
                format!("%{c:02X}")
            }
        })
        .collect();
    let started = std::time::Instant::now();
    let resp = reqwest::Client::new()
        .delete(format!("{api}/api/connections/{enc}"))
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::NO_CONTENT);
    let gone = heartbeating(&mut s, async {
        while started.elapsed() < Duration::from_secs(20) {
            if !b
                .broker
                .connections
                .list()
                .iter()
                .any(|c| c.info.peer == me)
            {
                return Some(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    })
    .await;
    println!("DELETE of a stuck connection holding {held} unacked: closed after {gone:?}");
    let gone = gone.expect("the stuck connection is still open 20 s after DELETE");
    assert!(
        gone < Duration::from_secs(5),
        "DELETE took {gone:?} to close a stuck connection"
    );
    let took = lapin_receives(&b, &q, n, Duration::from_secs(30)).await;
    println!("then a lapin consumer had all {n} messages after {took:?}");
    assert!(
        took.is_some(),
        "the stuck connection's messages were not requeued"
    );
    let hung_up = closed_within(&mut s, false, Duration::from_secs(20)).await;
    println!("the stuck client's socket reached its end after reading for {hung_up:?}");
    assert!(hung_up.is_some(), "the node never closed the stuck socket");
}
