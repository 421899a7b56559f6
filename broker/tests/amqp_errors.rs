#![allow(clippy::unwrap_used)]
//! Error paths: every failure gets the right reply code on the right scope, and the broker
//! keeps serving other connections. Bad input is produced with hand-made frames; well-formed
//! but refused requests with lapin.
mod common;

use std::time::Duration;

use amq_protocol::protocol::{AMQPClass, basic, channel, connection};
use common::raw::{self, expect_connection_close, frame, handshake, send_method};
use common::{TestBroker, code, still_serving, unique};
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use warren_broker::Config;

async fn connected(b: &TestBroker) -> (TcpStream, bytes::BytesMut) {
    let mut s = TcpStream::connect(b.addr).await.unwrap();
    let buf = handshake(&mut s).await;
    (s, buf)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_close_the_connection_with_the_right_code() {
    let b = TestBroker::start().await;
    // (what we send, expected connection.close reply code)
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("unknown frame type", frame(9, 0, b"xx"), 501),
        (
            "oversized frame, refused from its header",
            {
                let mut v = vec![3u8, 0, 1];
                v.extend_from_slice(&(64u32 << 20).to_be_bytes());
                v
            },
            501,
        ),
        (
            "bad frame-end octet",
            {
                let mut f = frame(8, 0, b"");
                let n = f.len();
                f[n - 1] = 0;
                f
            },
            501,
        ),
        ("unknown method", frame(1, 0, &[0, 60, 0x03, 0xE7]), 540),
        ("unknown class", frame(1, 0, &[0, 99, 0, 10]), 540),
        (
            "malformed method arguments",
            frame(1, 0, &[0, 10, 0, 50, 0]),
            502,
        ),
        (
            "method on a channel never opened",
            frame(1, 5, &[0, 50, 0, 30, 0, 0, 1, b'q', 0]),
            504,
        ),
        (
            "content header on an unopened channel",
            frame(2, 3, &[0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0]),
            504,
        ),
        ("heartbeat on a non-zero channel", frame(8, 1, b""), 501),
        (
            "channel beyond channel_max",
            frame(1, 11, &[0, 20, 0, 10, 0]),
            504,
        ),
        (
            "basic method on channel 0",
            frame(1, 0, &[0, 60, 0, 10, 0, 0, 0, 0, 0, 1, 0]),
            503,
        ),
    ];
    for (what, bytes, expected) in cases {
        let (mut s, mut buf) = connected(&b).await;
        s.write_all(&bytes).await.unwrap();
        let got = expect_connection_close(&mut s, &mut buf).await;
        assert_eq!(got, Some(expected), "{what}");
        // After close-ok the broker closes the socket.
        let mut rest = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut rest))
            .await
            .expect("socket closed");
        assert!(
            matches!(n, Ok(0) | Err(_)),
            "{what}: socket should be closed"
        );
    }
    still_serving(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_frames_out_of_order_are_unexpected() {
    let b = TestBroker::start().await;
    // Content header without basic.publish.
    let (mut s, mut buf) = connected(&b).await;
    send_method(&mut s, 1, raw::channel_open()).await;
    s.write_all(&frame(2, 1, &[0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0]))
        .await
        .unwrap();
    assert_eq!(expect_connection_close(&mut s, &mut buf).await, Some(505));

    // A method where the content header should be.
    let (mut s, mut buf) = connected(&b).await;
    send_method(&mut s, 1, raw::channel_open()).await;
    let publish = AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
        exchange: "".into(),
        routing_key: "q".into(),
        mandatory: false,
        immediate: false,
    }));
    send_method(&mut s, 1, publish.clone()).await;
    send_method(&mut s, 1, publish).await;
    assert_eq!(expect_connection_close(&mut s, &mut buf).await, Some(505));
    still_serving(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_frames_and_garbage_do_not_disturb_others() {
    let b = TestBroker::start().await;
    // Half a frame, then hang up.
    let (mut s, _) = connected(&b).await;
    s.write_all(&frame(1, 0, &[0, 20, 0, 10, 0])[..5])
        .await
        .unwrap();
    drop(s);
    // Not AMQP at all: the broker answers with the protocol header it speaks and closes.
    let mut s = TcpStream::connect(b.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut reply)).await;
    assert_eq!(reply, b"AMQP\x00\x00\x09\x01");
    still_serving(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_failures_and_vhost_access() {
    let b = TestBroker::start().await;
    // With authentication_failure_close: connection.close 403.
    let mut s = TcpStream::connect(b.addr).await.unwrap();
    s.write_all(b"AMQP\x00\x00\x09\x01").await.unwrap();
    let mut buf = bytes::BytesMut::new();
    let start = raw::read_method(&mut s, &mut buf).await;
    let AMQPClass::Connection(connection::AMQPMethod::Start(start)) = start else {
        panic!()
    };
    let caps = match start.server_properties.inner().get("capabilities") {
        Some(AMQPValue::FieldTable(t)) => t.clone(),
        _ => panic!("no capabilities"),
    };
    for c in [
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "connection.blocked",
        "authentication_failure_close",
        "per_consumer_qos",
        "direct_reply_to",
        "consumer_priorities",
    ] {
        assert_eq!(
            caps.inner().get(c),
            Some(&AMQPValue::Boolean(true)),
            "capability {c}"
        );
    }
    send_method(&mut s, 0, raw::start_ok("guest", "wrong", true)).await;
    assert_eq!(expect_connection_close(&mut s, &mut buf).await, Some(403));

    // Without it: the socket is just closed.
    let mut s = TcpStream::connect(b.addr).await.unwrap();
    s.write_all(b"AMQP\x00\x00\x09\x01").await.unwrap();
    let mut buf = bytes::BytesMut::new();
    let _ = raw::read_method(&mut s, &mut buf).await;
    send_method(&mut s, 0, raw::start_ok("guest", "wrong", false)).await;
    assert_eq!(raw::try_read_method(&mut s, &mut buf).await, None);

    // lapin sees the refusal as an error too.
    let bad = format!("amqp://guest:nope@{}/%2f", b.addr);
    assert!(
        Connection::connect(&bad, ConnectionProperties::default())
            .await
            .is_err()
    );

    // Unknown vhost: 530 NOT_ALLOWED.
    let url = format!("amqp://guest:guest@{}/no-such-vhost", b.addr);
    let err = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(530), "{err:?}");

    // A user without permissions on the vhost: 530 too.
    b.broker.access.add_user("nobody", "pw", &[]);
    let url = format!("amqp://nobody:pw@{}/%2f", b.addr);
    let err = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(530), "{err:?}");
    still_serving(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_errors_close_only_the_channel() {
    let b = TestBroker::start().await;
    let (c, ch) = b.channel().await;
    let q = unique("q");
    ch.queue_declare(
        q.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let fresh = || async { c.create_channel().await.expect("connection still open") };

    let e = fresh()
        .await
        .queue_declare(
            unique("missing").as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(404), "passive declare of a missing queue");

    let e = fresh()
        .await
        .queue_declare(
            q.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(406), "redeclare with other durability");

    let mut a = FieldTable::default();
    a.insert("x-max-length".into(), AMQPValue::LongInt(5));
    let e = fresh()
        .await
        .queue_declare(q.as_str().into(), QueueDeclareOptions::default(), a)
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(406), "redeclare with other arguments");

    let mut bad = FieldTable::default();
    bad.insert("x-message-ttl".into(), AMQPValue::LongString("soon".into()));
    let e = fresh()
        .await
        .queue_declare(
            unique("badarg").as_str().into(),
            QueueDeclareOptions::default(),
            bad,
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(406), "invalid argument type");

    let e = fresh()
        .await
        .exchange_declare(
            "amq.mine".into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(403), "amq.* is reserved");

    let e = fresh()
        .await
        .queue_declare(
            "amq.q".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(403), "amq.* queue names are reserved");

    let e = fresh()
        .await
        .exchange_declare(
            "amq.direct".into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                passive: false,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(
        code(&e),
        Some(406),
        "existing amq.* exchanges are checked for equivalence"
    );

    let x = unique("x");
    let ch2 = fresh().await;
    ch2.exchange_declare(
        x.as_str().into(),
        ExchangeKind::Direct,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let e = ch2
        .exchange_declare(
            x.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(406), "exchange redeclared with another type");

    let e = fresh()
        .await
        .exchange_declare(
            unique("missing").as_str().into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(404));

    let e = fresh()
        .await
        .queue_bind(
            q.as_str().into(),
            unique("missing").as_str().into(),
            "k".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(404), "bind to a missing exchange");

    // Publishing to a missing exchange closes the channel with 404.
    let ch3 = fresh().await;
    ch3.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let e = ch3
        .basic_publish(
            unique("missing").as_str().into(),
            "k".into(),
            BasicPublishOptions::default(),
            b"x",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(404));

    // user-id must match the authenticated user.
    let ch4 = fresh().await;
    ch4.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let e = ch4
        .basic_publish(
            "".into(),
            q.as_str().into(),
            BasicPublishOptions::default(),
            b"x",
            BasicProperties::default().with_user_id("mallory".into()),
        )
        .await
        .unwrap()
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(406));

    // The connection survived all of that.
    still_serving(&b).await;
    let ch5 = fresh().await;
    ch5.queue_declare(
        q.as_str().into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissions_are_enforced_per_method() {
    let b = TestBroker::start().await;
    let ac = &b.broker.access;
    ac.add_user("app", "pw", &[]);
    // May configure and read app-*, write only to amq.direct and app-*.
    ac.set_permissions("app", "/", "^app-", "^(app-.*|amq\\.direct)$", "^app-")
        .unwrap();
    ac.set_topic_permissions("app", "/", "amq.topic", "^allowed\\.", ".*")
        .unwrap();
    let url = format!("amqp://app:pw@{}/%2f", b.addr);
    let c = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap();

    let ch = c.create_channel().await.unwrap();
    ch.queue_declare(
        "app-q".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let e = c
        .create_channel()
        .await
        .unwrap()
        .queue_declare(
            "other-q".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(403), "configure denied");

    let ch = c.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    common::publish_confirmed(&ch, "amq.direct", "k", b"x", BasicProperties::default()).await;
    let e = ch
        .basic_publish(
            "amq.fanout".into(),
            "k".into(),
            BasicPublishOptions::default(),
            b"x",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(403), "write denied");

    // Topic permissions on amq.topic (write access to amq.topic itself is needed first).
    ac.set_permissions(
        "app",
        "/",
        "^app-",
        "^(app-.*|amq\\.direct|amq\\.topic)$",
        "^app-",
    )
    .unwrap();
    let ch = c.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    common::publish_confirmed(
        &ch,
        "amq.topic",
        "allowed.x",
        b"x",
        BasicProperties::default(),
    )
    .await;
    let e = ch
        .basic_publish(
            "amq.topic".into(),
            "denied.x".into(),
            BasicPublishOptions::default(),
            b"x",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(403), "topic write denied");

    let e = c
        .create_channel()
        .await
        .unwrap()
        .basic_get("secret".into(), BasicGetOptions::default())
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(403), "read denied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_flow_both_ways_and_silent_peers_are_dropped() {
    let b = TestBroker::start().await;
    let (mut s, mut buf) = {
        let mut s = TcpStream::connect(b.addr).await.unwrap();
        let buf = raw::handshake_with(&mut s, 1).await;
        (s, buf)
    };
    // The server sends heartbeat frames on an idle connection...
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut saw_heartbeat = false;
    while tokio::time::Instant::now() < deadline && !saw_heartbeat {
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(500), s.read_buf(&mut buf)).await
        {
            assert!(n > 0);
            saw_heartbeat = buf.windows(8).any(|w| w == [8, 0, 0, 0, 0, 0, 0, 0xCE]);
        }
    }
    assert!(saw_heartbeat, "no heartbeat from the server");
    // ...and closes the socket when the client stays silent for two intervals.
    let closed = tokio::time::timeout(Duration::from_secs(6), async {
        loop {
            match s.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return true,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert_eq!(closed, Ok(true), "silent client not dropped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_max_is_enforced_after_tune() {
    let config = Config {
        frame_max: 8192,
        ..Config::default()
    };
    let b = TestBroker::start_with(config).await;
    // lapin negotiates 8192 and splits large bodies into frames that fit.
    let (_c, ch) = b.channel().await;
    let q = unique("big");
    ch.queue_declare(
        q.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let payload = vec![7u8; 100_000];
    ch.basic_publish(
        "".into(),
        q.as_str().into(),
        BasicPublishOptions::default(),
        &payload,
        BasicProperties::default(),
    )
    .await
    .unwrap();
    let mut got = None;
    for _ in 0..50 {
        got = ch
            .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap();
        if got.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(got.expect("delivered").delivery.data, payload);

    // A raw client sending a 10 000-byte body frame is refused with 501.
    let (mut s, mut buf) = connected(&b).await;
    send_method(&mut s, 1, raw::channel_open()).await;
    s.write_all(&frame(3, 1, &vec![0u8; 10_000])).await.unwrap();
    assert_eq!(expect_connection_close(&mut s, &mut buf).await, Some(501));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_reopen_and_double_open() {
    let b = TestBroker::start().await;
    let (mut s, mut buf) = connected(&b).await;
    send_method(&mut s, 1, raw::channel_open()).await;
    assert!(matches!(
        raw::read_method(&mut s, &mut buf).await,
        AMQPClass::Channel(channel::AMQPMethod::OpenOk(_))
    ));
    send_method(&mut s, 1, raw::channel_open()).await;
    assert_eq!(expect_connection_close(&mut s, &mut buf).await, Some(504));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resource_alarm_blocks_publishers_and_unblocks() {
    let b = TestBroker::start().await;
    let (mut s, mut buf) = connected(&b).await;
    send_method(&mut s, 1, raw::channel_open()).await;
    let _ = raw::read_method(&mut s, &mut buf).await;
    let q = unique("blocked");
    let (_c, ch) = b.channel().await;
    ch.queue_declare(
        q.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let publish = |body: &'static [u8]| {
        let mut v = Vec::new();
        let mut m = bytes::BytesMut::new();
        warren_broker::codec::encode_method(
            &mut m,
            1,
            &AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
                exchange: "".into(),
                routing_key: q.as_str().into(),
                mandatory: false,
                immediate: false,
            })),
        );
        v.extend_from_slice(&m);
        let hp =
            warren_broker::codec::encode_header_payload(body.len() as u64, &Default::default());
        let mut c = bytes::BytesMut::new();
        warren_broker::codec::encode_content(&mut c, 1, &hp, body, 131072);
        v.extend_from_slice(&c);
        v
    };
    s.write_all(&publish(b"before")).await.unwrap();
    let vh = b.broker.vhost("/").unwrap();
    assert!(common::eventually(|| vh.queue(&q).unwrap().message_count() == 1).await);

    b.broker.set_alarm("memory");
    // The publishing connection is told it is blocked...
    let m = raw::read_method(&mut s, &mut buf).await;
    assert!(
        matches!(m, AMQPClass::Connection(connection::AMQPMethod::Blocked(_))),
        "{m:?}"
    );
    // ...and what it sends is not read while the alarm lasts.
    s.write_all(&publish(b"during")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(vh.queue(&q).unwrap().message_count(), 1);
    // Consumers keep draining meanwhile.
    assert!(
        ch.basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .is_some()
    );

    b.broker.clear_alarm("memory");
    let m = raw::read_method(&mut s, &mut buf).await;
    assert!(
        matches!(
            m,
            AMQPClass::Connection(connection::AMQPMethod::Unblocked(_))
        ),
        "{m:?}"
    );
    assert!(common::eventually(|| vh.queue(&q).unwrap().message_count() == 1).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_message_is_refused_on_its_channel() {
    let config = Config {
        max_message_size: 1024,
        ..Config::default()
    };
    let b = TestBroker::start_with(config).await;
    let (c, ch) = b.channel().await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let e = ch
        .basic_publish(
            "".into(),
            "any".into(),
            BasicPublishOptions::default(),
            &[0u8; 2048],
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(406));
    assert!(c.create_channel().await.is_ok(), "connection survives");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_and_invalid_publish_options() {
    let b = TestBroker::start().await;
    // basic.qos with prefetch_size != 0: 540 (as RabbitMQ).
    let (mut s, mut buf) = connected(&b).await;
    send_method(&mut s, 1, raw::channel_open()).await;
    s.write_all(&frame(1, 1, &[0, 60, 0, 10, 0, 0, 3, 232, 0, 1, 0]))
        .await
        .unwrap();
    assert_eq!(expect_connection_close(&mut s, &mut buf).await, Some(540));

    // immediate=true: 540.
    let (mut s, mut buf) = connected(&b).await;
    send_method(&mut s, 1, raw::channel_open()).await;
    let publish = AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
        exchange: "".into(),
        routing_key: "q".into(),
        mandatory: false,
        immediate: true,
    }));
    send_method(&mut s, 1, publish).await;
    assert_eq!(expect_connection_close(&mut s, &mut buf).await, Some(540));

    // An expiration that is not a non-negative integer: 406 on the channel.
    let (c, _) = b.channel().await;
    for bad in ["-1", "soon", ""] {
        let ch = c.create_channel().await.unwrap();
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let e = ch
            .basic_publish(
                "".into(),
                "any".into(),
                BasicPublishOptions::default(),
                b"x",
                BasicProperties::default().with_expiration(bad.into()),
            )
            .await
            .unwrap()
            .await
            .unwrap_err();
        assert_eq!(code(&e), Some(406), "expiration {bad:?}");
    }

    // A headers binding with an unknown x-match: 406.
    let ch = c.create_channel().await.unwrap();
    let q = unique("hq");
    ch.queue_declare(
        q.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut a = FieldTable::default();
    a.insert("x-match".into(), AMQPValue::LongString("bogus".into()));
    let e = ch
        .queue_bind(
            q.as_str().into(),
            "amq.headers".into(),
            "".into(),
            QueueBindOptions::default(),
            a,
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(406));
    still_serving(&b).await;
}
