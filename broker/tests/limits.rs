#![allow(clippy::unwrap_used)]
//! Limits, against a real broker with real clients (lapin, reqwest, raw sockets): per-vhost
//! `max-connections`/`max-queues` and per-user `max-connections`/`max-channels` set through
//! the management API and refused with RabbitMQ's codes and texts (checked against RabbitMQ
//! 3.10.8); limits exported, imported and kept across a restart; the default max message size
//! (16 MiB, as RabbitMQ 4); bounded transactions and consumers per channel; the management
//! listener's header-read timeout, connection cap, 415 for bodies that are not JSON, and a
//! bounded `POST .../get`; data files written 0600.
mod common;
#[path = "common/node.rs"]
mod node;

use std::time::Duration;

use common::api::Api;
use common::{TestBroker, raw, unique};
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use reqwest::StatusCode;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use warren_broker::Config;

/// The reply code and text of a refusal lapin reports.
fn refusal(e: &lapin::Error) -> (u16, String) {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(p) => (p.get_id(), p.get_message().to_string()),
        other => panic!("expected a protocol error, got {other:?}"),
    }
}

async fn connect(url: &str) -> Result<Connection, lapin::Error> {
    Connection::connect(url, ConnectionProperties::default()).await
}

/// A vhost `name` where `user` (password "pw" unless guest) has full permissions.
async fn vhost_for(api: &Api, name: &str, user: &str) {
    assert!(
        api.put(&format!("/vhosts/{name}"), json!({}))
            .await
            .0
            .is_success()
    );
    if user != "guest" {
        let (s, _) = api
            .put(
                &format!("/users/{user}"),
                json!({"password": "pw", "tags": ""}),
            )
            .await;
        assert!(s.is_success());
    }
    let (s, _) = api
        .put(
            &format!("/permissions/{name}/{user}"),
            json!({"configure": ".*", "write": ".*", "read": ".*"}),
        )
        .await;
    assert!(s.is_success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vhost_limits_refuse_the_next_connection_and_queue() {
    let b = TestBroker::start().await;
    let api = Api::start(&b).await;
    vhost_for(&api, "lim", "guest").await;
    let url = format!("amqp://guest:guest@{}/lim", b.addr);

    // The API, as RabbitMQ's: 204 on set, the list, validation errors, unknown vhost 404.
    assert_eq!(
        api.put("/vhost-limits/lim/max-connections", json!({"value": 1}))
            .await
            .0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        api.put("/vhost-limits/lim/max-queues", json!({"value": 2}))
            .await
            .0,
        StatusCode::NO_CONTENT
    );
    let expected = json!([{"vhost": "lim", "value": {"max-connections": 1, "max-queues": 2}}]);
    assert_eq!(api.get("/vhost-limits").await.1, expected);
    assert_eq!(api.get("/vhost-limits/lim").await.1, expected);
    assert_eq!(
        api.get("/vhost-limits/%2F").await,
        (StatusCode::OK, json!([]))
    );
    let (s, body) = api
        .put("/vhost-limits/lim/max-queues", json!({"value": "3"}))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(
        body["reason"],
        "Validation failed\n\nmax-queues should be a number, actually was <<\"3\">>\n"
    );
    let (s, body) = api
        .put("/vhost-limits/lim/max-channels", json!({"value": 3}))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    let (s, body) = api.put("/vhost-limits/lim/max-queues", json!({})).await;
    assert_eq!(
        (s, body["reason"].clone()),
        (StatusCode::BAD_REQUEST, json!("[{key_missing,value}]"))
    );
    let (s, body) = api
        .put("/vhost-limits/nosuch/max-queues", json!({"value": 1}))
        .await;
    assert_eq!(
        (s, body),
        (
            StatusCode::NOT_FOUND,
            json!({"error": "not_found", "reason": "vhost_not_found"})
        )
    );

    // max-connections 1: the second connection is refused at connection.open.
    let c1 = connect(&url).await.unwrap();
    let e = connect(&url).await.unwrap_err();
    assert_eq!(
        refusal(&e),
        (
            530,
            "NOT_ALLOWED - access to vhost 'lim' refused for user 'guest': connection limit (1) is reached".into()
        )
    );
    // Other vhosts are not counted against it.
    let _other = b.connect().await;

    // max-queues 2: two queues, then the third is refused; redeclaring one is not a new one.
    let ch = c1.create_channel().await.unwrap();
    for q in ["q1", "q2", "q1"] {
        ch.queue_declare(
            q.into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
    let e = ch
        .queue_declare(
            "q3".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(
        refusal(&e),
        (
            406,
            "PRECONDITION_FAILED - cannot declare queue 'q3': queue limit in vhost 'lim' (2) is reached".into()
        )
    );
    // Through the management API too.
    let (s, body) = api.put("/queues/lim/q3", json!({})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["reason"]
            .as_str()
            .unwrap()
            .contains("queue limit in vhost 'lim' (2) is reached")
    );

    // Cleared: a second connection and a third queue are fine. 0 allows none; negative, any.
    assert_eq!(
        api.delete("/vhost-limits/lim/max-connections").await.0,
        StatusCode::NO_CONTENT
    );
    let c2 = connect(&url).await.unwrap();
    api.put("/vhost-limits/lim/max-queues", json!({"value": -1}))
        .await;
    let ch2 = c2.create_channel().await.unwrap();
    ch2.queue_declare(
        "q3".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    api.put("/vhost-limits/lim/max-queues", json!({"value": 0}))
        .await;
    let e = ch2
        .queue_declare(
            "q4".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(refusal(&e).0, 406);
    api.put("/vhost-limits/lim/max-connections", json!({"value": 0}))
        .await;
    assert_eq!(refusal(&connect(&url).await.unwrap_err()).0, 530);
    // A deleted vhost takes its limits with it.
    api.delete("/vhosts/lim").await;
    vhost_for(&api, "lim", "guest").await;
    assert_eq!(api.get("/vhost-limits/lim").await.1, json!([]));
    connect(&url).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_opening_together_do_not_overshoot_a_limit() {
    let b = TestBroker::start().await;
    let api = Api::start(&b).await;
    vhost_for(&api, "burst", "guest").await;
    api.put("/vhost-limits/burst/max-connections", json!({"value": 3}))
        .await;
    let url = format!("amqp://guest:guest@{}/burst", b.addr);
    let tries: Vec<_> = (0..30)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { connect(&url).await })
        })
        .collect();
    let mut open = Vec::new();
    let mut refused = 0;
    for t in tries {
        match t.await.unwrap() {
            Ok(c) => open.push(c),
            Err(e) => {
                assert_eq!(refusal(&e).0, 530);
                refused += 1;
            }
        }
    }
    assert_eq!((open.len(), refused), (3, 27));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_limits_refuse_the_next_connection_and_channel() {
    let b = TestBroker::start().await;
    let api = Api::start(&b).await;
    let user = unique("lim");
    vhost_for(&api, "%2F", &user).await;
    let url = format!("amqp://{user}:pw@{}/%2f", b.addr);

    assert_eq!(
        api.put(
            &format!("/user-limits/{user}/max-channels"),
            json!({"value": 2})
        )
        .await
        .0,
        StatusCode::NO_CONTENT
    );
    let expected = json!([{"user": user, "value": {"max-channels": 2}}]);
    assert_eq!(api.get("/user-limits").await.1, expected);
    assert_eq!(api.get(&format!("/user-limits/{user}")).await.1, expected);
    assert_eq!(
        api.get(&format!("/users/{user}")).await.1["limits"],
        json!({"max-channels": 2})
    );
    let (s, body) = api
        .put(
            &format!("/user-limits/{user}/max-queues"),
            json!({"value": 1}),
        )
        .await;
    assert_eq!(
        (s, body["reason"].clone()),
        (
            StatusCode::BAD_REQUEST,
            json!("Unrecognised terms [{<<\"max-queues\">>,1}] in user-limits")
        )
    );
    assert_eq!(
        api.get("/user-limits/nosuch").await.0,
        StatusCode::NOT_FOUND
    );

    // Two channels, over two connections: the user's, counted together. The third is a
    // connection error (530), as in RabbitMQ.
    let c1 = connect(&url).await.unwrap();
    let c2 = connect(&url).await.unwrap();
    let _ch1 = c1.create_channel().await.unwrap();
    let _ch2 = c2.create_channel().await.unwrap();
    // guest is not limited.
    let (_g, _gch) = b.channel().await;
    let e = c2.create_channel().await.unwrap_err();
    assert_eq!(
        refusal(&e),
        (
            530,
            format!(
                "NOT_ALLOWED - number of channels opened for user '{user}' has reached the maximum allowed user limit of (2)"
            )
        )
    );
    assert!(common::eventually(|| !c2.status().connected()).await);
    drop(c2);

    // max-connections 1: c1 is open, so the next one is refused.
    api.put(
        &format!("/user-limits/{user}/max-connections"),
        json!({"value": 1}),
    )
    .await;
    let e = connect(&url).await.unwrap_err();
    assert_eq!(
        refusal(&e),
        (
            530,
            format!(
                "NOT_ALLOWED - connection refused for user '{user}': user connection limit (1) is reached"
            )
        )
    );
    c1.close(200, "bye".into()).await.unwrap();
    let c3 = connect(&url).await.unwrap();
    let _first = c3.create_channel().await.unwrap();
    // A closed channel frees its place.
    let second = c3.create_channel().await.unwrap();
    second.close(200, "bye".into()).await.unwrap();
    let _again = c3.create_channel().await.unwrap();
    // Deleting a limit, and the user, removes it.
    assert_eq!(
        api.delete(&format!("/user-limits/{user}/max-connections"))
            .await
            .0,
        StatusCode::NO_CONTENT
    );
    connect(&url).await.unwrap();
    api.delete(&format!("/users/{user}")).await;
    assert_eq!(api.get("/user-limits").await.1, json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_are_exported_imported_and_kept_across_a_restart() {
    let dir = node::data_dir("limits");
    let n = node::Node::start(&dir).await;
    let api = Api::at(format!("http://127.0.0.1:{}", n.mgmt));
    api.put("/vhost-limits/%2F/max-queues", json!({"value": 7}))
        .await;
    api.put("/user-limits/guest/max-channels", json!({"value": 9}))
        .await;
    // Exported as RabbitMQ exports them: the vhost's as a `vhost-limits` parameter, the user's
    // as its `limits`.
    let (_, defs) = api.get("/definitions").await;
    assert_eq!(
        defs["parameters"],
        json!([{"value": {"max-queues": 7}, "vhost": "/", "component": "vhost-limits", "name": "limits"}])
    );
    let guest = defs["users"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == "guest")
        .unwrap();
    assert_eq!(guest["limits"], json!({"max-channels": 9}));

    // A durable queue and a persistent message, so every kind of data file exists.
    let c = n.connect().await;
    let ch = c.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    ch.queue_declare(
        "dq".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.basic_publish(
        "".into(),
        "dq".into(),
        BasicPublishOptions::default(),
        b"kept",
        BasicProperties::default().with_delivery_mode(2),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    drop(c);

    let (status, log) = n.terminate();
    assert!(status.success(), "{log}");
    let n = node::Node::start(&dir).await;
    let api = Api::at(format!("http://127.0.0.1:{}", n.mgmt));
    assert_eq!(
        api.get("/vhost-limits").await.1,
        json!([{"vhost": "/", "value": {"max-queues": 7}}])
    );
    assert_eq!(
        api.get("/user-limits/guest").await.1,
        json!([{"user": "guest", "value": {"max-channels": 9}}])
    );

    // Import replaces a vhost's limits and a user's.
    let (s, body) = api
        .post(
            "/definitions",
            json!({
                "users": [{"name": "imp", "password_hash": "", "tags": [], "limits": {"max-connections": 3}}],
                "parameters": [{"vhost": "/", "component": "vhost-limits", "name": "limits", "value": {"max-connections": 4}}],
            }),
        )
        .await;
    assert!(s.is_success(), "{body}");
    assert_eq!(
        api.get("/vhost-limits/%2F").await.1,
        json!([{"vhost": "/", "value": {"max-connections": 4}}])
    );
    assert_eq!(
        api.get("/user-limits/imp").await.1,
        json!([{"user": "imp", "value": {"max-connections": 3}}])
    );
    let (s, _) = api
        .post(
            "/definitions",
            json!({"parameters": [{"vhost": "/", "component": "vhost-limits", "name": "limits", "value": {"max-foo": 4}}]}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);

    // Every data file is the node's alone.
    use std::os::unix::fs::PermissionsExt;
    let mut files = Vec::new();
    let mut dirs = vec![dir.clone()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                dirs.push(e.path());
            } else {
                files.push(e.path());
            }
        }
    }
    for name in ["metadata.json", "metadata.journal"] {
        assert!(
            files.iter().any(|f| f.ends_with(name)),
            "{name} in {files:?}"
        );
    }
    assert!(
        files
            .iter()
            .any(|f| f.parent().unwrap().ends_with("messages"))
    );
    for f in &files {
        let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} has mode {mode:o}", f.display());
    }
    let _ = n.crash();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_over_16_mib_are_refused_by_default() {
    assert_eq!(Config::default().max_message_size, 16 * 1024 * 1024);
    let b = TestBroker::start().await;
    let (_c, ch) = b.channel().await;
    ch.queue_declare(
        "big".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let limit = 16 * 1024 * 1024;
    let mut s = tokio::net::TcpStream::connect(b.addr).await.unwrap();
    let mut buf = raw::handshake(&mut s).await;
    raw::send_method(&mut s, 1, raw::channel_open()).await;
    let _ = raw::read_method(&mut s, &mut buf).await;
    s.write_all(&publish_frames(1, "big", limit)).await.unwrap();
    assert!(common::eventually(|| message_count_now(&b, "big") == 1).await);
    s.write_all(&publish_frames(1, "big", limit + 1))
        .await
        .unwrap();
    assert_eq!(
        channel_close(&mut s, &mut buf).await,
        (
            406,
            format!(
                "PRECONDITION_FAILED - message size {} is larger than configured max size 16777216",
                limit + 1
            )
        )
    );
    assert_eq!(message_count_now(&b, "big"), 1);
    drop(ch);
}

/// A basic.publish to `queue` with a body of `size` bytes: the method, a content header and
/// body frames of at most 128 KiB.
fn publish_frames(ch: u16, queue: &str, size: usize) -> Vec<u8> {
    use amq_protocol::protocol::{AMQPClass, basic};
    let mut b = bytes::BytesMut::new();
    warren_broker::codec::encode_method(
        &mut b,
        ch,
        &AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: "".into(),
            routing_key: queue.into(),
            mandatory: false,
            immediate: false,
        })),
    );
    let mut header = Vec::new();
    header.extend_from_slice(&60u16.to_be_bytes());
    header.extend_from_slice(&0u16.to_be_bytes());
    header.extend_from_slice(&(size as u64).to_be_bytes());
    header.extend_from_slice(&0u16.to_be_bytes());
    b.extend_from_slice(&raw::frame(2, ch, &header));
    let chunk = vec![b'x'; 128 * 1024 - 8];
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk.len());
        b.extend_from_slice(&raw::frame(3, ch, &chunk[..n]));
        left -= n;
    }
    b.to_vec()
}

/// A raw connection with channel 1 open in tx mode.
async fn tx_channel(b: &TestBroker) -> (tokio::net::TcpStream, bytes::BytesMut) {
    use amq_protocol::protocol::{AMQPClass, tx};
    let mut s = tokio::net::TcpStream::connect(b.addr).await.unwrap();
    let mut buf = raw::handshake(&mut s).await;
    raw::send_method(&mut s, 1, raw::channel_open()).await;
    let _ = raw::read_method(&mut s, &mut buf).await;
    raw::send_method(
        &mut s,
        1,
        AMQPClass::Tx(tx::AMQPMethod::Select(tx::Select {})),
    )
    .await;
    let _ = raw::read_method(&mut s, &mut buf).await;
    (s, buf)
}

/// Reads until channel.close; returns its code and text.
async fn channel_close(s: &mut tokio::net::TcpStream, buf: &mut bytes::BytesMut) -> (u16, String) {
    use amq_protocol::protocol::{AMQPClass, channel};
    loop {
        match raw::read_method(s, buf).await {
            AMQPClass::Channel(channel::AMQPMethod::Close(c)) => {
                return (c.reply_code, c.reply_text.to_string());
            }
            AMQPClass::Tx(_) => panic!("the transaction was committed"),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_holds_a_bounded_number_of_publishes_and_bytes() {
    use amq_protocol::protocol::{AMQPClass, tx};
    let b = TestBroker::start().await;
    let (_c, ch) = b.channel().await;
    ch.queue_declare(
        "txq".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();

    // Count: 65,536 publishes are held; the next closes the channel with 406, and nothing
    // of the transaction reaches the queue.
    let (mut s, mut buf) = tx_channel(&b).await;
    let one = publish_frames(1, "txq", 0);
    let mut all = Vec::with_capacity(one.len() * (warren_broker::channel::TX_MAX_OPS + 1));
    for _ in 0..=warren_broker::channel::TX_MAX_OPS {
        all.extend_from_slice(&one);
    }
    s.write_all(&all).await.unwrap();
    raw::send_method(
        &mut s,
        1,
        AMQPClass::Tx(tx::AMQPMethod::Commit(tx::Commit {})),
    )
    .await;
    let (code, text) = channel_close(&mut s, &mut buf).await;
    assert_eq!(code, 406, "{text}");
    assert!(
        text.contains("transaction too large: 65536 uncommitted publishes"),
        "{text}"
    );
    assert_eq!(message_count_now(&b, "txq"), 0);

    // Bytes: 64 MiB of uncommitted bodies at most (four 16 MiB messages), then 406.
    let (mut s, mut buf) = tx_channel(&b).await;
    for _ in 0..5 {
        s.write_all(&publish_frames(1, "txq", 16 * 1024 * 1024))
            .await
            .unwrap();
    }
    raw::send_method(
        &mut s,
        1,
        AMQPClass::Tx(tx::AMQPMethod::Commit(tx::Commit {})),
    )
    .await;
    let (code, text) = channel_close(&mut s, &mut buf).await;
    assert_eq!(code, 406, "{text}");
    assert!(text.contains("would exceed 67108864 bytes"), "{text}");
    assert_eq!(message_count_now(&b, "txq"), 0);
    // Below both bounds, a transaction commits.
    let (mut s, mut buf) = tx_channel(&b).await;
    s.write_all(&publish_frames(1, "txq", 10)).await.unwrap();
    raw::send_method(
        &mut s,
        1,
        AMQPClass::Tx(tx::AMQPMethod::Commit(tx::Commit {})),
    )
    .await;
    assert!(matches!(
        raw::read_method(&mut s, &mut buf).await,
        AMQPClass::Tx(tx::AMQPMethod::CommitOk(_))
    ));
    assert_eq!(message_count_now(&b, "txq"), 1);
    common::still_serving(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_per_channel_are_bounded() {
    assert_eq!(Config::default().consumer_max_per_channel, 16384);
    let b = TestBroker::start_with(Config {
        consumer_max_per_channel: 3,
        ..Config::default()
    })
    .await;
    let (c, ch) = b.channel().await;
    ch.queue_declare(
        "cq".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    // lapin cancels a consumer when its handle is dropped: keep them.
    let mut kept = Vec::new();
    for i in 0..3 {
        kept.push(
            ch.basic_consume(
                "cq".into(),
                format!("c{i}").as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap(),
        );
    }
    let e = ch
        .basic_consume(
            "cq".into(),
            "c3".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(
        refusal(&e),
        (
            530,
            "NOT_ALLOWED - reached maximum (3) of consumers per channel".into()
        )
    );
    assert!(common::eventually(|| !c.status().connected()).await);
    // The fourth, on a raw socket to see exactly what comes back: connection.close 530.
    let mut s = tokio::net::TcpStream::connect(b.addr).await.unwrap();
    let mut buf = raw::handshake(&mut s).await;
    raw::send_method(&mut s, 1, raw::channel_open()).await;
    let _ = raw::read_method(&mut s, &mut buf).await;
    for i in 0..4 {
        let mut m = raw::consume("cq", true);
        if let amq_protocol::protocol::AMQPClass::Basic(
            amq_protocol::protocol::basic::AMQPMethod::Consume(c),
        ) = &mut m
        {
            c.consumer_tag = format!("r{i}").into();
        }
        raw::send_method(&mut s, 1, m).await;
    }
    loop {
        match raw::read_method(&mut s, &mut buf).await {
            amq_protocol::protocol::AMQPClass::Connection(
                amq_protocol::protocol::connection::AMQPMethod::Close(c),
            ) => {
                assert_eq!(c.reply_code, 530);
                assert_eq!(
                    c.reply_text.as_str(),
                    "NOT_ALLOWED - reached maximum (3) of consumers per channel"
                );
                break;
            }
            amq_protocol::protocol::AMQPClass::Basic(
                amq_protocol::protocol::basic::AMQPMethod::ConsumeOk(ok),
            ) => assert_ne!(ok.consumer_tag.as_str(), "r3", "a fourth consumer"),
            other => panic!("unexpected {other:?}"),
        }
    }
    common::still_serving(&b).await;
}

/// Sends a raw HTTP request; returns the status line's code.
async fn raw_http(base: &str, request: &str) -> u16 {
    let addr = base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP answer: {text:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_bodies_must_be_json() {
    let b = TestBroker::start().await;
    let api = Api::start(&b).await;
    let auth = "Authorization: Basic Z3Vlc3Q6Z3Vlc3Q=\r\n";
    // A cross-site form (text/plain, urlencoded) or no type with a body: 415.
    for ct in [
        "Content-Type: text/plain\r\n",
        "Content-Type: application/x-www-form-urlencoded\r\n",
        "",
    ] {
        let req = format!(
            "PUT /api/vhosts/csrf HTTP/1.1\r\nHost: x\r\n{auth}{ct}Content-Length: 2\r\nConnection: close\r\n\r\n{{}}"
        );
        assert_eq!(raw_http(&api.base, &req).await, 415, "{ct}");
        let req = format!(
            "POST /api/definitions HTTP/1.1\r\nHost: x\r\n{auth}{ct}Content-Length: 2\r\nConnection: close\r\n\r\n{{}}"
        );
        assert_eq!(raw_http(&api.base, &req).await, 415, "{ct}");
    }
    assert!(b.broker.vhost("csrf").is_none());
    // JSON (with a charset), or no body at all: served.
    let req = format!(
        "PUT /api/vhosts/csrf HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json; charset=utf-8\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
    );
    assert_eq!(raw_http(&api.base, &req).await, 201);
    let req = format!(
        "PUT /api/vhosts/csrf2 HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(raw_http(&api.base, &req).await, 201);
    let req =
        format!("DELETE /api/vhosts/csrf2 HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n");
    assert_eq!(raw_http(&api.base, &req).await, 204);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_get_takes_a_bounded_number_of_messages() {
    let b = TestBroker::start().await;
    let api = Api::start(&b).await;
    let (_c, ch) = b.channel().await;
    ch.queue_declare(
        "many".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    for _ in 0..1005 {
        ch.basic_publish(
            "".into(),
            "many".into(),
            BasicPublishOptions::default(),
            b"m",
            BasicProperties::default(),
        )
        .await
        .unwrap();
    }
    assert!(common::eventually(|| message_count_now(&b, "many") == 1005).await);
    let (s, got) = api
        .post(
            "/queues/%2F/many/get",
            json!({"count": 1_000_000_000_000u64, "ackmode": "ack_requeue_false", "encoding": "auto"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(got.as_array().unwrap().len(), 1000);
    assert_eq!(message_count_now(&b, "many"), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_listener_caps_connections_and_times_out_slow_headers() {
    let b = TestBroker::start_with(Config {
        management_max_connections: 4,
        ..Config::default()
    })
    .await;
    let api = Api::start(&b).await;
    let addr = api.base.trim_start_matches("http://").to_owned();
    // A new connection for each request (no pooled keep-alive connection holding a slot).
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let overview = || async {
        http.get(format!("{}/api/overview", api.base))
            .basic_auth("guest", Some("guest"))
            .timeout(Duration::from_secs(1))
            .send()
            .await
    };
    assert!(overview().await.is_ok());
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Four sockets trickling a header: the fifth client waits...
    let mut idle = Vec::new();
    for _ in 0..4 {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        s.write_all(b"GET /api/overview HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        idle.push(s);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(overview().await.is_err(), "served beyond the cap");
    // ...until one goes.
    idle.pop();
    assert!(overview().await.is_ok());

    // A client that keeps sending header bytes, one every second, is cut off once the
    // header-read timeout (10 s) has passed since it began: bytes do not re-arm it.
    let started = std::time::Instant::now();
    let mut slow = idle.pop().unwrap();
    let closed = loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if slow.write_all(b"X-Slow: 1\r\n").await.is_err() {
            break true;
        }
        let mut byte = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(10), slow.read(&mut byte)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(_)) => break true,
            Err(_) => {}
        }
        if started.elapsed() > Duration::from_secs(20) {
            break false;
        }
    };
    assert!(closed, "a slowloris client was never cut off");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(9) && took < Duration::from_secs(14),
        "cut off after {took:?}"
    );
}

fn message_count_now(b: &TestBroker, queue: &str) -> u32 {
    b.broker
        .vhost("/")
        .and_then(|v| v.queue(queue))
        .map_or(0, |q| q.message_count())
}
