#![allow(clippy::unwrap_used)]
//! Durability against a real `warren-broker` process: restart, `kill -9` in a publish loop,
//! and a damaged segment file.
mod common;
#[path = "common/node.rs"]
mod node;

use std::collections::BTreeSet;
use std::time::Duration;

use node::{Node, data_dir};

use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, ExchangeKind};

fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

async fn drain(ch: &lapin::Channel, q: &str) -> Vec<lapin::message::Delivery> {
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(q.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        out.push(m.delivery);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_exactly_what_is_durable() {
    let dir = data_dir("restart");
    let node = Node::start(&dir).await;
    let c = node.connect().await;
    let ch = c.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(100));
    ch.queue_declare("dq".into(), durable, args).await.unwrap();
    ch.queue_declare(
        "tq".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.exchange_declare(
        "dx".into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        "dq".into(),
        "dx".into(),
        "a.#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut headers = FieldTable::default();
    headers.insert("h".into(), AMQPValue::LongString("v".into()));
    for i in 0..5 {
        let props = if i % 2 == 0 {
            persistent()
                .with_headers(headers.clone())
                .with_message_id(format!("m{i}").into())
        } else {
            BasicProperties::default()
        };
        common::publish_confirmed(&ch, "dx", "a.b", format!("{i}").as_bytes(), props).await;
        common::publish_confirmed(&ch, "", "tq", b"t", persistent()).await;
    }
    // One persistent message is consumed and acked: it must not come back.
    let first = ch
        .basic_get("dq".into(), BasicGetOptions::default())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.delivery.data, b"0");
    first
        .delivery
        .ack(BasicAckOptions::default())
        .await
        .unwrap();
    // Let the ack reach the log (acks are not confirmed; at-least-once allows a redelivery).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = node.crash();

    let node = Node::start(&dir).await;
    let c = node.connect().await;
    let ch = c.create_channel().await.unwrap();
    let got = drain(&ch, "dq").await;
    let bodies: Vec<_> = got
        .iter()
        .map(|d| String::from_utf8(d.data.clone()).unwrap())
        .collect();
    assert_eq!(
        bodies,
        ["2", "4"],
        "persistent messages survive, in order; transient ones do not"
    );
    let d = &got[0];
    assert!(
        d.redelivered,
        "recovered messages may have been delivered before"
    );
    assert_eq!(
        d.properties.message_id().as_ref().map(ShortString::as_str),
        Some("m2")
    );
    assert_eq!(
        d.properties.headers().as_ref().unwrap().inner().get("h"),
        Some(&AMQPValue::LongString("v".into()))
    );
    assert_eq!(d.exchange.as_str(), "dx");
    assert_eq!(d.routing_key.as_str(), "a.b");
    // The durable queue kept its arguments; the transient queue is gone.
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(100));
    ch.queue_declare(
        "dq".into(),
        QueueDeclareOptions {
            durable: true,
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_declare(
        "dq".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap();
    let e = ch
        .queue_declare(
            "tq".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(common::code(&e), Some(404));
    // The durable exchange and binding route again.
    let ch = c.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    common::publish_confirmed(&ch, "dx", "a.c", b"after", persistent()).await;
    assert_eq!(drain(&ch, "dq").await.len(), 1);
    node.crash();
}

/// How many `kill -9` rounds a crash test runs: `WARREN_CRASH_ROUNDS`, else `default`.
fn crash_rounds(default: usize) -> usize {
    std::env::var("WARREN_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_confirmed_message_is_lost_to_kill_9() {
    let rounds = crash_rounds(8);
    let dir = data_dir("crash");
    let mut confirmed: BTreeSet<u64> = BTreeSet::new();
    let mut next = 0u64;
    let mut node = Node::start(&dir).await;
    {
        let c = node.connect().await;
        let ch = c.create_channel().await.unwrap();
        ch.queue_declare(
            "crash".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
    for round in 0..rounds {
        // Publish with confirms until the broker dies under us.
        let c = node.connect().await;
        let ch = c.create_channel().await.unwrap();
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let publisher = {
            let ch = ch.clone();
            let start = next;
            tokio::spawn(async move {
                let mut done = Vec::new();
                let mut inflight = std::collections::VecDeque::new();
                let mut n = start;
                loop {
                    let Ok(p) = ch
                        .basic_publish(
                            "".into(),
                            "crash".into(),
                            BasicPublishOptions::default(),
                            &n.to_be_bytes(),
                            persistent(),
                        )
                        .await
                    else {
                        break;
                    };
                    inflight.push_back((n, p));
                    n += 1;
                    if inflight.len() >= 64 {
                        let (id, p) = inflight.pop_front().unwrap();
                        match p.await {
                            Ok(conf) if conf.is_ack() => done.push(id),
                            Ok(_) => {}
                            Err(_) => break,
                        }
                    }
                }
                (done, n)
            })
        };
        let wait = 150 + (round as u64 * 97) % 400;
        tokio::time::sleep(Duration::from_millis(wait)).await;
        let _ = node.crash();
        let (done, n) = publisher.await.unwrap();
        confirmed.extend(done);
        next = n;
        node = Node::start(&dir).await;
    }
    let c = node.connect().await;
    let ch = c.create_channel().await.unwrap();
    let present: BTreeSet<u64> = drain(&ch, "crash")
        .await
        .iter()
        .map(|d| u64::from_be_bytes(d.data.clone().try_into().unwrap()))
        .collect();
    let lost: Vec<_> = confirmed.difference(&present).collect();
    eprintln!(
        "crash test: {rounds} kill -9 rounds, {} messages confirmed, {} present after recovery, {} lost",
        confirmed.len(),
        present.len(),
        lost.len()
    );
    assert!(!confirmed.is_empty(), "the publisher never got a confirm");
    assert!(
        lost.is_empty(),
        "confirmed but lost: {:?}",
        &lost[..lost.len().min(20)]
    );
    node.crash();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_damaged_in_the_middle_loses_only_the_damaged_record_and_says_so() {
    let dir = data_dir("corrupt");
    let node = Node::start(&dir).await;
    let c = node.connect().await;
    let ch = c.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    ch.queue_declare(
        "cq".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    for i in 0..10u8 {
        common::publish_confirmed(&ch, "", "cq", &[i; 100], persistent()).await;
    }
    node.crash();
    // Flip one byte inside the 7th record of the only segment.
    let seg_dir = dir.join("messages");
    let seg = std::fs::read_dir(&seg_dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut data = std::fs::read(&seg).unwrap();
    let per = data.len() / 10;
    data[6 * per + per / 2] ^= 0x55;
    std::fs::write(&seg, &data).unwrap();

    let node = Node::start(&dir).await;
    let c = node.connect().await;
    let ch = c.create_channel().await.unwrap();
    let got = drain(&ch, "cq").await;
    let firsts: Vec<u8> = got.iter().map(|d| d.data[0]).collect();
    // The damaged record's length is intact: everything before and after it comes back.
    assert_eq!(
        firsts,
        [0, 1, 2, 3, 4, 5, 7, 8, 9],
        "everything but the damaged record is recovered"
    );
    let log = node.crash();
    assert!(
        log.contains("message store DAMAGED (not a torn tail")
            && log.contains(&format!(
                "checksum mismatch in record at offset {}",
                6 * per
            ))
            && log.contains("kept 9 records"),
        "log should say it is damage, where, and exactly what was lost:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_permissions_policies_and_parameters_survive_a_crash() {
    let dir = data_dir("mgmt");
    let node = Node::start(&dir).await;
    let http = reqwest::Client::new();
    let api = |node: &Node, path: &str| format!("http://127.0.0.1:{}/api/{path}", node.mgmt);
    // The management listener may come up a moment after AMQP.
    for _ in 0..100 {
        if http
            .get(api(&node, "overview"))
            .basic_auth("guest", Some("guest"))
            .send()
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let put = |url: String, body: serde_json::Value| {
        let http = http.clone();
        async move {
            let r = http
                .put(url)
                .basic_auth("guest", Some("guest"))
                .json(&body)
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success(), "{}", r.status());
        }
    };
    put(api(&node, "vhosts/v2"), serde_json::json!({})).await;
    put(
        api(&node, "users/admin2"),
        serde_json::json!({"password": "pw2", "tags": "administrator"}),
    )
    .await;
    put(
        api(&node, "users/alice"),
        serde_json::json!({"password": "pw", "tags": "monitoring"}),
    )
    .await;
    put(
        api(&node, "permissions/v2/alice"),
        serde_json::json!({"configure": "^a", "write": ".*", "read": ".*"}),
    )
    .await;
    put(
        api(&node, "policies/v2/cap"),
        serde_json::json!({"pattern": "^q", "definition": {"max-length": 7}, "apply-to": "queues"}),
    )
    .await;
    put(
        api(&node, "parameters/federation-upstream/v2/up"),
        serde_json::json!({"value": {"uri": "amqp://remote", "prefetch-count": 10}}),
    )
    .await;
    let r = http
        .delete(api(&node, "users/guest"))
        .basic_auth("admin2", Some("pw2"))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    node.crash();

    let node = Node::start(&dir).await;
    let get = |url: String, user: &'static str, pass: &'static str| {
        let http = http.clone();
        async move {
            let mut last = None;
            for _ in 0..100 {
                match http.get(&url).basic_auth(user, Some(pass)).send().await {
                    Ok(r) => {
                        last = Some(r.status());
                        if r.status().is_success() {
                            return r.json::<serde_json::Value>().await.unwrap();
                        }
                        break;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
            panic!("GET {url} failed: {last:?}");
        }
    };
    // alice can log in with her password after the restart.
    let me = get(api(&node, "whoami"), "alice", "pw").await;
    assert_eq!(me["name"], "alice");
    let perm = get(api(&node, "permissions/v2/alice"), "admin2", "pw2").await;
    assert_eq!(perm["configure"], "^a");
    let pol = get(api(&node, "policies/v2/cap"), "admin2", "pw2").await;
    assert_eq!(pol["definition"]["max-length"], 7);
    let par = get(
        api(&node, "parameters/federation-upstream/v2/up"),
        "admin2",
        "pw2",
    )
    .await;
    assert_eq!(par["value"]["prefetch-count"], 10);
    // The deleted default user stays deleted.
    let r = http
        .get(api(&node, "whoami"))
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::UNAUTHORIZED);
    node.crash();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_cleanly_and_keeps_every_confirmed_message() {
    let dir = data_dir("sigterm");
    let node = Node::start(&dir).await;
    let c = node.connect().await;
    let ch = c.create_channel().await.unwrap();
    ch.queue_declare(
        "term".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    // What the client is told when the node closes the connection (lapin reports the
    // server's connection.close here; a publish racing with it may only see a closed channel).
    let told = {
        use futures_lite::StreamExt;
        let mut events = c.events_listener();
        tokio::spawn(async move {
            let mut codes = Vec::new();
            while let Ok(Some(e)) =
                tokio::time::timeout(Duration::from_secs(30), events.next()).await
            {
                if let lapin::Event::Error(e) = e {
                    codes.extend(common::code(&e));
                    if codes.contains(&320) {
                        break;
                    }
                }
            }
            codes
        })
    };
    // A publisher with confirms, 64 in flight, until the node closes its connection.
    let publisher = {
        let ch = ch.clone();
        tokio::spawn(async move {
            let mut done = Vec::new();
            let mut inflight = std::collections::VecDeque::new();
            let mut n = 0u64;
            let error = loop {
                match ch
                    .basic_publish(
                        "".into(),
                        "term".into(),
                        BasicPublishOptions::default(),
                        &n.to_be_bytes(),
                        persistent(),
                    )
                    .await
                {
                    Ok(p) => inflight.push_back((n, p)),
                    Err(e) => break e,
                }
                n += 1;
                if inflight.len() >= 64 {
                    let (id, p) = inflight.pop_front().unwrap();
                    match p.await {
                        Ok(conf) if conf.is_ack() => done.push(id),
                        Ok(_) => {}
                        Err(e) => break e,
                    }
                }
            };
            // Confirms that made it before the close still count.
            for (id, p) in inflight {
                if let Ok(conf) = p.await
                    && conf.is_ack()
                {
                    done.push(id);
                }
            }
            (done, error)
        })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (status, log) = node.terminate();
    let (confirmed, error) = publisher.await.unwrap();
    assert_eq!(status.code(), Some(0), "exit status {status}; log:\n{log}");
    assert!(
        log.contains("SIGTERM received; shutting down")
            && log.contains("message store closed")
            && log.contains("shutdown complete"),
        "the log should say how the node stopped:\n{log}"
    );
    // Written to a file, not a terminal: no colour codes.
    assert!(!log.contains('\x1b'), "colour codes in a log file:\n{log}");
    if common::code(&error) != Some(320) {
        let told = tokio::time::timeout(Duration::from_secs(40), told)
            .await
            .expect("the connection's events end")
            .unwrap();
        assert!(
            told.contains(&320),
            "the client is told CONNECTION_FORCED: publish error {error}, connection errors {told:?}"
        );
    }
    assert!(!confirmed.is_empty(), "the publisher never got a confirm");

    let node = Node::start(&dir).await;
    let c = node.connect().await;
    let ch = c.create_channel().await.unwrap();
    let present: BTreeSet<u64> = drain(&ch, "term")
        .await
        .iter()
        .map(|d| u64::from_be_bytes(d.data.clone().try_into().unwrap()))
        .collect();
    let lost: Vec<_> = confirmed.iter().filter(|n| !present.contains(n)).collect();
    eprintln!(
        "sigterm test: {} confirmed, {} present after restart, {} lost",
        confirmed.len(),
        present.len(),
        lost.len()
    );
    assert!(
        lost.is_empty(),
        "confirmed but lost: {:?}",
        &lost[..lost.len().min(20)]
    );
    node.crash();
}

/// (body, redelivered) of everything in `q`, consumed without ack.
async fn drain_flags(ch: &lapin::Channel, q: &str) -> Vec<(String, bool)> {
    drain(ch, q)
        .await
        .iter()
        .map(|d| (String::from_utf8(d.data.clone()).unwrap(), d.redelivered))
        .collect()
}

async fn publish_durable(node: &Node, q: &str, bodies: std::ops::Range<u32>) {
    let c = node.connect().await;
    let ch = c.create_channel().await.unwrap();
    common::declare_durable(&ch, q).await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for i in bodies {
        common::publish_confirmed(&ch, "", q, i.to_string().as_bytes(), persistent()).await;
    }
    c.close(200, "done".into()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_messages_delivered_before_a_clean_restart_come_back_redelivered() {
    let dir = data_dir("redelivered");
    let node = Node::start(&dir).await;
    publish_durable(&node, "rd", 0..10).await;
    let c = node.connect().await;
    let ch = c.create_channel().await.unwrap();
    // 0 and 1 delivered and left unacked; 2 delivered and requeued; 3..9 never delivered.
    for _ in 0..3 {
        ch.basic_get("rd".into(), BasicGetOptions::default())
            .await
            .unwrap()
            .unwrap();
    }
    ch.basic_nack(
        3,
        BasicNackOptions {
            requeue: true,
            multiple: false,
        },
    )
    .await
    .unwrap();
    let (status, log) = node.terminate();
    assert_eq!(status.code(), Some(0), "{log}");

    let node = Node::start(&dir).await;
    assert!(node_log_has(&node, "clean_shutdown=true").await);
    let c = node.connect().await;
    let ch = c.create_channel().await.unwrap();
    let got = drain_flags(&ch, "rd").await;
    let want: Vec<(String, bool)> = (0..10).map(|i| (i.to_string(), i < 3)).collect();
    assert_eq!(got, want, "redelivered exactly for what was delivered");

    // After a crash, the markers may be missing the last deliveries: everything may have been
    // delivered.
    publish_durable(&node, "rd", 10..13).await;
    node.crash();
    let node = Node::start(&dir).await;
    let c = node.connect().await;
    let ch = c.create_channel().await.unwrap();
    let got = drain_flags(&ch, "rd").await;
    assert!(got.iter().all(|(_, r)| *r), "{got:?}");

    // A message that came back redelivered after a crash stays so across a clean restart.
    publish_durable(&node, "rd", 13..15).await;
    node.crash();
    let node = Node::start(&dir).await;
    let (status, _) = node.terminate();
    assert_eq!(status.code(), Some(0));
    let node = Node::start(&dir).await;
    let c = node.connect().await;
    let ch = c.create_channel().await.unwrap();
    let got = drain_flags(&ch, "rd").await;
    assert_eq!(got, vec![("13".to_owned(), true), ("14".to_owned(), true)]);
    node.crash();
}

/// Waits (up to 5 s) for the node's log to contain `text`.
async fn node_log_has(node: &Node, text: &str) -> bool {
    for _ in 0..100 {
        if node.log_text().contains(text) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Bytes of segment files under the node's `messages/`.
fn log_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir.join("messages"))
        .map(|d| {
            d.filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_unacked_message_does_not_pin_the_log() {
    const BODY: usize = 64 * 1024;
    const COUNT: u64 = 4096; // 256 MiB: sixteen 16 MiB segments
    let dir = data_dir("compaction");
    let node = Node::start(&dir).await;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    // The stuck message: delivered, never acked, its channel open all along.
    let holder = node.connect().await;
    let hch = holder.create_channel().await.unwrap();
    hch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for q in ["stuck", "churn"] {
        hch.queue_declare(q.into(), durable, FieldTable::default())
            .await
            .unwrap();
    }
    common::publish_confirmed(&hch, "", "stuck", b"the old one", persistent()).await;
    let stuck = hch
        .basic_get("stuck".into(), BasicGetOptions::default())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stuck.delivery.data, b"the old one");

    // Steady publish (confirms) and consume (acks) through another queue.
    let consumer = node.connect().await;
    let cch = consumer.create_channel().await.unwrap();
    cch.basic_qos(64, BasicQosOptions::default()).await.unwrap();
    let mut deliveries = cch
        .basic_consume(
            "churn".into(),
            "churn".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let acker = {
        let acked = acked.clone();
        tokio::spawn(async move {
            use futures_lite::StreamExt;
            let mut n = 0u64;
            while n < COUNT {
                let d = deliveries.next().await.unwrap().unwrap();
                n += 1;
                if n.is_multiple_of(16) || n == COUNT {
                    d.acker
                        .ack(BasicAckOptions { multiple: true })
                        .await
                        .unwrap();
                    acked.store(n, std::sync::atomic::Ordering::Relaxed);
                }
            }
        })
    };
    let publisher = node.connect().await;
    let pch = publisher.create_channel().await.unwrap();
    pch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let body = vec![7u8; BODY];
    let mut most = 0;
    let mut inflight = std::collections::VecDeque::new();
    for i in 0..COUNT {
        let p = pch
            .basic_publish(
                "".into(),
                "churn".into(),
                BasicPublishOptions::default(),
                &body,
                persistent(),
            )
            .await
            .unwrap();
        inflight.push_back(p);
        if inflight.len() >= 32 {
            assert!(inflight.pop_front().unwrap().await.unwrap().is_ack());
        }
        // Publisher and consumer in step: the live data stays small (at most 128 messages),
        // so what the log holds beyond it is garbage compaction must bound.
        while i >= 128 + acked.load(std::sync::atomic::Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        if i % 64 == 0 {
            most = most.max(log_bytes(&dir));
        }
    }
    for p in inflight {
        assert!(p.await.unwrap().is_ack());
    }
    acker.await.unwrap();
    most = most.max(log_bytes(&dir));
    eprintln!(
        "compaction test: {} MiB published and acked around one unacked message; messages/ peaked at {} MiB",
        (COUNT as usize * BODY) >> 20,
        most >> 20
    );
    // Without compaction the first segment would pin all 256 MiB.
    assert!(
        most <= (7 * 16) << 20,
        "messages/ reached {} MiB; log:\n{}",
        most >> 20,
        node.log_text()
    );
    assert!(node.log_text().contains("message store compacted"));

    // The stuck message survives it all, and a restart; nothing acked comes back (a clean
    // stop: with kill -9 the last acks may not have reached the disk, which is allowed).
    drop(stuck);
    let (status, node_log) = node.terminate();
    assert_eq!(status.code(), Some(0));
    assert!(!node_log.contains("compaction failed"), "{node_log}");
    let node = Node::start(&dir).await;
    let c = node.connect().await;
    let ch = c.create_channel().await.unwrap();
    let got = drain(&ch, "stuck").await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].data, b"the old one");
    assert!(got[0].redelivered);
    assert!(drain(&ch, "churn").await.is_empty());
    node.crash();
}

/// A management API list (`GET /api/{path}` as guest), retried while the listener comes up.
async fn api_list(node: &Node, path: &str) -> Vec<serde_json::Value> {
    let url = format!("http://127.0.0.1:{}/api/{path}", node.mgmt);
    let http = reqwest::Client::new();
    for _ in 0..100 {
        if let Ok(r) = http
            .get(&url)
            .basic_auth("guest", Some("guest"))
            .send()
            .await
        {
            assert!(r.status().is_success(), "GET {url}: {}", r.status());
            return r.json().await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("GET {url} failed");
}

/// Declares, binds, unbinds and deletes go to the metadata journal (and the journal into a
/// new snapshot once it outgrows the old one); after `kill -9` the node has exactly the
/// topology the clients last saw, deletions cascading to bindings as they did live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_changes_are_journalled_and_survive_kill_9() {
    let dir = data_dir("journal");
    let node = Node::start(&dir).await;
    let c = node.connect().await;
    let ch = c.create_channel().await.unwrap();
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let no_args = FieldTable::default;
    ch.exchange_declare("ex".into(), ExchangeKind::Topic, durable, no_args())
        .await
        .unwrap();
    let name = |i: u32| format!("orders-service-replica-queue-{i:05}");
    let n = 2400;
    let mut queues = BTreeSet::new();
    let mut bindings = BTreeSet::new();
    // Printed, not asserted: the cost of a durable declare must not grow with the number of
    // queues the node already has (`--release -- --nocapture` for figures).
    let mut batch = std::time::Instant::now();
    for i in 0..n {
        if i > 0 && i % 600 == 0 {
            eprintln!(
                "metadata: queues {}..{i}: {:.3} ms per durable queue declare + 2 binds",
                i - 600,
                batch.elapsed().as_secs_f64() * 1000.0 / 600.0
            );
            batch = std::time::Instant::now();
        }
        let q = name(i);
        common::declare_durable(&ch, &q).await;
        for (x, key) in [("amq.topic", format!("a.{i}.#")), ("ex", format!("e.{i}"))] {
            common::bind(&ch, &q, x, &key).await;
            bindings.insert((x.to_owned(), q.clone(), key));
        }
        queues.insert(q);
    }
    for i in 0..n {
        let q = name(i);
        if i % 3 == 0 {
            // Deleted with its bindings; every 9th comes back with one new binding.
            ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await
                .unwrap();
            queues.remove(&q);
            bindings.retain(|b| b.1 != q);
            if i % 9 == 0 {
                common::declare_durable(&ch, &q).await;
                common::bind(&ch, &q, "ex", "again").await;
                queues.insert(q.clone());
                bindings.insert(("ex".into(), q, "again".into()));
            }
        } else if i % 5 == 0 {
            let key = format!("a.{i}.#");
            ch.queue_unbind(
                q.as_str().into(),
                "amq.topic".into(),
                key.as_str().into(),
                no_args(),
            )
            .await
            .unwrap();
            bindings.remove(&("amq.topic".to_owned(), q, key));
        }
    }
    // A durable auto-delete exchange goes with its last binding; an exchange bound to "ex"
    // and deleted takes that binding with it.
    ch.exchange_declare(
        "ad".into(),
        ExchangeKind::Direct,
        ExchangeDeclareOptions {
            durable: true,
            auto_delete: true,
            ..Default::default()
        },
        no_args(),
    )
    .await
    .unwrap();
    common::bind(&ch, &name(1), "ad", "k").await;
    ch.queue_unbind(name(1).as_str().into(), "ad".into(), "k".into(), no_args())
        .await
        .unwrap();
    ch.exchange_declare("gone".into(), ExchangeKind::Fanout, durable, no_args())
        .await
        .unwrap();
    ch.exchange_bind(
        "gone".into(),
        "ex".into(),
        "#".into(),
        ExchangeBindOptions::default(),
        no_args(),
    )
    .await
    .unwrap();
    ch.exchange_delete("gone".into(), ExchangeDeleteOptions::default())
        .await
        .unwrap();
    let snapshot = std::fs::metadata(dir.join("metadata.json")).unwrap().len();
    assert!(
        snapshot > 100_000,
        "the journal was folded into a new snapshot ({snapshot} bytes)"
    );
    node.crash();

    let node = Node::start(&dir).await;
    let got_queues: BTreeSet<String> = api_list(&node, "queues/%2F")
        .await
        .iter()
        .map(|q| q["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(got_queues, queues);
    let got_bindings: BTreeSet<(String, String, String)> = api_list(&node, "bindings/%2F")
        .await
        .iter()
        .filter(|b| b["source"] != "")
        .map(|b| {
            (
                b["source"].as_str().unwrap().to_owned(),
                b["destination"].as_str().unwrap().to_owned(),
                b["routing_key"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(got_bindings.len(), bindings.len());
    assert_eq!(got_bindings, bindings);
    let exchanges: BTreeSet<String> = api_list(&node, "exchanges/%2F")
        .await
        .iter()
        .map(|x| x["name"].as_str().unwrap().to_owned())
        .collect();
    assert!(exchanges.contains("ex"));
    assert!(!exchanges.contains("ad") && !exchanges.contains("gone"));
    node.crash();
}

/// Topology changes acknowledged to a client survive `kill -9` at random moments: a declared
/// queue exists afterwards with its binding, a deleted one does not come back. (The one
/// operation under way when the node died may go either way.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_topology_changes_survive_kill_9() {
    let rounds = crash_rounds(6);
    let dir = data_dir("meta-crash");
    let mut node = Node::start(&dir).await;
    let mut exists: BTreeSet<String> = BTreeSet::new();
    let mut bound: BTreeSet<String> = BTreeSet::new();
    let mut deleted: BTreeSet<String> = BTreeSet::new();
    let mut uncertain: BTreeSet<String> = BTreeSet::new();
    let mut ops = 0usize;
    for round in 0..rounds {
        let c = node.connect().await;
        let ch = c.create_channel().await.unwrap();
        let worker = tokio::spawn(async move {
            // (queue, what was acknowledged): 0 declared, 1 bound, 2 deleted; and the queue
            // whose operation was under way when the connection died.
            let mut acked: Vec<(String, u8)> = Vec::new();
            let mut i = 0usize;
            let in_flight = loop {
                let q = format!("meta-crash-{round}-{i}");
                let declare = ch.queue_declare(
                    q.as_str().into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                );
                if declare.await.is_err() {
                    break q;
                }
                acked.push((q.clone(), 0));
                let bind = ch.queue_bind(
                    q.as_str().into(),
                    "amq.direct".into(),
                    q.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                );
                if bind.await.is_err() {
                    break q;
                }
                acked.push((q.clone(), 1));
                if i % 3 == 2 {
                    let old = format!("meta-crash-{round}-{}", i - 1);
                    let delete =
                        ch.queue_delete(old.as_str().into(), QueueDeleteOptions::default());
                    if delete.await.is_err() {
                        break old;
                    }
                    acked.push((old, 2));
                }
                i += 1;
            };
            (acked, in_flight)
        });
        let wait = 150 + (round as u64 * 131) % 350;
        tokio::time::sleep(Duration::from_millis(wait)).await;
        let _ = node.crash();
        let (acked, in_flight) = worker.await.unwrap();
        ops += acked.len();
        for (q, what) in acked {
            match what {
                0 => {
                    exists.insert(q);
                }
                1 => {
                    bound.insert(q);
                }
                _ => {
                    exists.remove(&q);
                    bound.remove(&q);
                    deleted.insert(q);
                }
            }
        }
        uncertain.insert(in_flight);
        node = Node::start(&dir).await;
    }
    let queues: BTreeSet<String> = api_list(&node, "queues/%2F")
        .await
        .iter()
        .map(|q| q["name"].as_str().unwrap().to_owned())
        .collect();
    let bindings: BTreeSet<String> = api_list(&node, "bindings/%2F")
        .await
        .iter()
        .filter(|b| b["source"] == "amq.direct")
        .map(|b| b["destination"].as_str().unwrap().to_owned())
        .collect();
    eprintln!(
        "metadata crash test: {rounds} kill -9 rounds, {ops} acknowledged changes, {} queues kept, {} deleted",
        exists.len(),
        deleted.len()
    );
    assert!(ops > 0, "no topology change was acknowledged");
    let lost: Vec<_> = exists
        .difference(&queues)
        .filter(|q| !uncertain.contains(*q))
        .collect();
    assert!(lost.is_empty(), "acknowledged queues lost: {lost:?}");
    let unbound: Vec<_> = bound
        .difference(&bindings)
        .filter(|q| !uncertain.contains(*q))
        .collect();
    assert!(
        unbound.is_empty(),
        "acknowledged bindings lost: {unbound:?}"
    );
    let back: Vec<_> = deleted
        .intersection(&queues)
        .filter(|q| !uncertain.contains(*q))
        .collect();
    assert!(back.is_empty(), "deleted queues came back: {back:?}");
    node.crash();
}
