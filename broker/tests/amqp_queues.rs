#![allow(clippy::unwrap_used)]
//! Queues, consumers, acknowledgements, confirms, transactions, dead lettering and TTL,
//! driven by lapin against a real broker.
mod common;

use std::time::Duration;

use common::{TestBroker, code, unique};
use futures_lite::StreamExt;
use lapin::Confirmation;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel};

fn args(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), v.clone());
    }
    t
}

fn s(v: &str) -> AMQPValue {
    AMQPValue::LongString(v.into())
}

async fn declare(ch: &Channel, name: &str, a: FieldTable) {
    ch.queue_declare(name.into(), QueueDeclareOptions::default(), a)
        .await
        .expect("queue.declare");
}

async fn publish(ch: &Channel, rk: &str, body: &str, props: BasicProperties) -> Confirmation {
    common::publish_confirmed(ch, "", rk, body.as_bytes(), props).await
}

async fn get(ch: &Channel, q: &str, no_ack: bool) -> Option<lapin::message::BasicGetMessage> {
    ch.basic_get(q.into(), BasicGetOptions { no_ack })
        .await
        .expect("basic.get")
}

fn body(d: &lapin::message::Delivery) -> String {
    String::from_utf8(d.data.clone()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_requeue_keeps_order_and_sets_redelivered() {
    let b = TestBroker::start().await;
    let (_c, ch) = b.channel().await;
    let q = unique("q");
    declare(&ch, &q, FieldTable::default()).await;
    for m in ["1", "2", "3"] {
        publish(&ch, &q, m, BasicProperties::default()).await;
    }
    let m1 = get(&ch, &q, false).await.unwrap();
    let m2 = get(&ch, &q, false).await.unwrap();
    assert!(!m1.delivery.redelivered);
    // Requeue both with one multiple nack: they return to the head, in order.
    ch.basic_nack(
        m2.delivery.delivery_tag,
        BasicNackOptions {
            multiple: true,
            requeue: true,
        },
    )
    .await
    .unwrap();
    let again: Vec<(String, bool)> = {
        let mut v = Vec::new();
        while let Some(m) = get(&ch, &q, true).await {
            v.push((body(&m.delivery), m.delivery.redelivered));
        }
        v
    };
    assert_eq!(
        again,
        [("1".into(), true), ("2".into(), true), ("3".into(), false)]
    );

    // Reject without requeue drops it (no DLX).
    publish(&ch, &q, "4", BasicProperties::default()).await;
    let m = get(&ch, &q, false).await.unwrap();
    ch.basic_reject(
        m.delivery.delivery_tag,
        BasicRejectOptions { requeue: false },
    )
    .await
    .unwrap();
    assert!(get(&ch, &q, true).await.is_none());

    // Acking an unknown tag is a channel error 406 (seen on the wire: lapin may report the
    // closed channel before the reason).
    let mut s = tokio::net::TcpStream::connect(b.addr).await.unwrap();
    let mut buf = common::raw::handshake(&mut s).await;
    common::raw::send_method(&mut s, 1, common::raw::channel_open()).await;
    let _open_ok = common::raw::read_method(&mut s, &mut buf).await;
    let ack = amq_protocol::protocol::AMQPClass::Basic(
        amq_protocol::protocol::basic::AMQPMethod::Ack(amq_protocol::protocol::basic::Ack {
            delivery_tag: 999,
            multiple: false,
        }),
    );
    common::raw::send_method(&mut s, 1, ack).await;
    match common::raw::read_method(&mut s, &mut buf).await {
        amq_protocol::protocol::AMQPClass::Channel(
            amq_protocol::protocol::channel::AMQPMethod::Close(c),
        ) => {
            assert_eq!(c.reply_code, 406);
            assert!(
                c.reply_text.as_str().contains("unknown delivery tag 999"),
                "{}",
                c.reply_text
            );
        }
        other => panic!("expected channel.close, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_prefetch_limits_unacked_deliveries_and_round_robin() {
    let b = TestBroker::start().await;
    let (_c, ch) = b.channel().await;
    let q = unique("q");
    declare(&ch, &q, FieldTable::default()).await;
    ch.basic_qos(2, BasicQosOptions::default()).await.unwrap();
    let mut c1 = ch
        .basic_consume(
            q.as_str().into(),
            "c1".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut c2 = ch
        .basic_consume(
            q.as_str().into(),
            "c2".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for i in 0..10 {
        publish(&ch, &q, &i.to_string(), BasicProperties::default()).await;
    }
    let mut got = Vec::new();
    for _ in 0..2 {
        got.push(body(&c1.next().await.unwrap().unwrap()));
        got.push(body(&c2.next().await.unwrap().unwrap()));
    }
    got.sort();
    assert_eq!(got, ["0", "1", "2", "3"]);
    // Nothing more arrives while 2 per consumer are unacked.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), c1.next())
            .await
            .is_err()
    );
    let (_, unacked, _) = b.broker.vhost("/").unwrap().queue(&q).unwrap().counts();
    assert_eq!(unacked, 4);
    // Acking one lets exactly one more through to that consumer.
    ch.basic_ack(1, BasicAckOptions::default()).await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), async {
        tokio::select! { d = c1.next() => d, d = c2.next() => d }
    })
    .await
    .expect("a delivery after ack");
    assert_eq!(body(&next.unwrap().unwrap()), "4");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirms_nack_on_reject_publish_and_mandatory_return() {
    let b = TestBroker::start().await;
    let (_c, ch) = b.channel().await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let q = unique("q");
    declare(
        &ch,
        &q,
        args(&[
            ("x-max-length", AMQPValue::LongInt(1)),
            ("x-overflow", s("reject-publish")),
        ]),
    )
    .await;
    assert!(matches!(
        publish(&ch, &q, "1", BasicProperties::default()).await,
        Confirmation::Ack(None)
    ));
    assert!(matches!(
        publish(&ch, &q, "2", BasicProperties::default()).await,
        Confirmation::Nack(_)
    ));

    let conf = ch
        .basic_publish(
            "amq.direct".into(),
            "no-such-binding".into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            b"lost",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    match conf {
        Confirmation::Ack(Some(ret)) => {
            assert_eq!(ret.reply_code, 312);
            assert_eq!(ret.reply_text.as_str(), "NO_ROUTE");
            assert_eq!(ret.delivery.data, b"lost");
        }
        other => panic!("expected an ack carrying the returned message, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_commit_and_rollback() {
    let b = TestBroker::start().await;
    let (_c, ch) = b.channel().await;
    let q = unique("q");
    declare(&ch, &q, FieldTable::default()).await;
    ch.tx_select().await.unwrap();
    ch.basic_publish(
        "".into(),
        q.as_str().into(),
        BasicPublishOptions::default(),
        b"rolled-back",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    ch.tx_rollback().await.unwrap();
    ch.basic_publish(
        "".into(),
        q.as_str().into(),
        BasicPublishOptions::default(),
        b"committed",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    let vh = b.broker.vhost("/").unwrap();
    assert_eq!(
        vh.queue(&q).unwrap().message_count(),
        0,
        "nothing before commit"
    );
    ch.tx_commit().await.unwrap();
    let m = get(&ch, &q, false).await.unwrap();
    assert_eq!(body(&m.delivery), "committed");
    // An ack inside a transaction takes effect only at commit.
    ch.basic_ack(m.delivery.delivery_tag, BasicAckOptions::default())
        .await
        .unwrap();
    ch.tx_rollback().await.unwrap();
    assert_eq!(vh.queue(&q).unwrap().counts().1, 1, "ack rolled back");
    ch.basic_ack(m.delivery.delivery_tag, BasicAckOptions::default())
        .await
        .unwrap();
    ch.tx_commit().await.unwrap();
    assert_eq!(vh.queue(&q).unwrap().counts().1, 0);
    // confirm.select on a transactional channel is 406.
    let err = ch
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(406));
}

fn x_death(d: &lapin::message::Delivery) -> Vec<FieldTable> {
    let h = d.properties.headers().clone().unwrap_or_default();
    match h.inner().get(&ShortString::from("x-death")) {
        Some(AMQPValue::FieldArray(a)) => a
            .as_slice()
            .iter()
            .filter_map(|v| match v {
                AMQPValue::FieldTable(t) => Some(t.clone()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn field<'a>(t: &'a FieldTable, k: &str) -> &'a AMQPValue {
    t.inner()
        .get(&ShortString::from(k))
        .unwrap_or(&AMQPValue::Void)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_lettering_rejected_expired_and_maxlen_with_x_death() {
    let b = TestBroker::start().await;
    let (_c, ch) = b.channel().await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let (work, dlq) = (unique("work"), unique("dlq"));
    declare(&ch, &dlq, FieldTable::default()).await;
    declare(
        &ch,
        &work,
        args(&[
            ("x-dead-letter-exchange", s("")),
            ("x-dead-letter-routing-key", s(&dlq)),
            ("x-max-length", AMQPValue::LongInt(2)),
        ]),
    )
    .await;
    // rejected
    publish(&ch, &work, "r", BasicProperties::default()).await;
    let m = get(&ch, &work, false).await.unwrap();
    ch.basic_reject(
        m.delivery.delivery_tag,
        BasicRejectOptions { requeue: false },
    )
    .await
    .unwrap();
    // expired (per-message TTL), without any consumer present
    publish(
        &ch,
        &work,
        "e",
        BasicProperties::default().with_expiration("50".into()),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // maxlen (drop-head)
    for m in ["m1", "m2", "m3"] {
        publish(&ch, &work, m, BasicProperties::default()).await;
    }
    let mut dead = Vec::new();
    assert!(
        common::eventually(|| b
            .broker
            .vhost("/")
            .unwrap()
            .queue(&dlq)
            .unwrap()
            .message_count()
            >= 3)
        .await
    );
    while let Some(m) = get(&ch, &dlq, true).await {
        dead.push(m.delivery);
    }
    let summary: Vec<(String, String)> = dead
        .iter()
        .map(|d| {
            let xd = x_death(d);
            let reason = match field(&xd[0], "reason") {
                AMQPValue::LongString(r) => r.to_string(),
                other => format!("{other:?}"),
            };
            (body(d), reason)
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("r".into(), "rejected".into()),
            ("e".into(), "expired".into()),
            ("m1".into(), "maxlen".into())
        ]
    );
    let e = &dead[1];
    assert!(e.properties.expiration().is_none(), "expiration is removed");
    let xd = x_death(e);
    assert_eq!(field(&xd[0], "count"), &AMQPValue::LongLongInt(1));
    assert_eq!(field(&xd[0], "queue"), &s(&work));
    assert_eq!(field(&xd[0], "exchange"), &s(""));
    assert_eq!(field(&xd[0], "original-expiration"), &s("50"));
    assert_eq!(
        field(&xd[0], "routing-keys"),
        &AMQPValue::FieldArray(vec![s(&work)].into())
    );
    assert!(matches!(field(&xd[0], "time"), AMQPValue::Timestamp(_)));
    let h = e.properties.headers().clone().unwrap();
    assert_eq!(field(&h, "x-first-death-reason"), &s("expired"));
    assert_eq!(field(&h, "x-first-death-queue"), &s(&work));
    assert_eq!(field(&h, "x-last-death-reason"), &s("expired"));
    assert_eq!(e.routing_key.as_str(), dlq, "dead-letter routing key used");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_ttl_expires_and_expired_messages_are_never_delivered() {
    let b = TestBroker::start().await;
    let (_c, ch) = b.channel().await;
    let q = unique("ttl");
    declare(&ch, &q, args(&[("x-message-ttl", AMQPValue::LongInt(100))])).await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    publish(&ch, &q, "old", BasicProperties::default()).await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    let vh = b.broker.vhost("/").unwrap();
    assert_eq!(
        vh.queue(&q).unwrap().message_count(),
        0,
        "expired without a consumer"
    );
    publish(&ch, &q, "fresh", BasicProperties::default()).await;
    assert_eq!(body(&get(&ch, &q, true).await.unwrap().delivery), "fresh");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_expires_when_unused() {
    let b = TestBroker::start().await;
    let (_c, ch) = b.channel().await;
    let q = unique("exp");
    declare(&ch, &q, args(&[("x-expires", AMQPValue::LongInt(150))])).await;
    let vh = b.broker.vhost("/").unwrap();
    assert!(vh.queue(&q).is_some());
    assert!(common::eventually(|| vh.queue(&q).is_none()).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_queue_orders_by_priority() {
    let b = TestBroker::start().await;
    let (_c, ch) = b.channel().await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let q = unique("prio");
    declare(
        &ch,
        &q,
        args(&[("x-max-priority", AMQPValue::ShortShortUInt(10))]),
    )
    .await;
    for (m, p) in [("low", 1), ("high", 9), ("mid", 5), ("low2", 1)] {
        publish(&ch, &q, m, BasicProperties::default().with_priority(p)).await;
    }
    let mut order = Vec::new();
    while let Some(m) = get(&ch, &q, true).await {
        order.push(body(&m.delivery));
    }
    assert_eq!(order, ["high", "mid", "low", "low2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_active_consumer_and_consumer_priorities() {
    let b = TestBroker::start().await;
    let (_c, ch) = b.channel().await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let q = unique("sac");
    declare(
        &ch,
        &q,
        args(&[("x-single-active-consumer", AMQPValue::Boolean(true))]),
    )
    .await;
    let mut first = ch
        .basic_consume(
            q.as_str().into(),
            "first".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut second = ch
        .basic_consume(
            q.as_str().into(),
            "second".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    for i in 0..4 {
        publish(&ch, &q, &i.to_string(), BasicProperties::default()).await;
    }
    for i in 0..4 {
        assert_eq!(body(&first.next().await.unwrap().unwrap()), i.to_string());
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(200), second.next())
            .await
            .is_err()
    );
    ch.basic_cancel("first".into(), BasicCancelOptions::default())
        .await
        .unwrap();
    publish(&ch, &q, "to-second", BasicProperties::default()).await;
    assert_eq!(body(&second.next().await.unwrap().unwrap()), "to-second");

    // Consumer priorities: the higher-priority consumer gets everything while it has credit.
    let q2 = unique("cprio");
    declare(&ch, &q2, FieldTable::default()).await;
    let mut low = ch
        .basic_consume(
            q2.as_str().into(),
            "low".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            args(&[("x-priority", AMQPValue::LongInt(1))]),
        )
        .await
        .unwrap();
    let mut high = ch
        .basic_consume(
            q2.as_str().into(),
            "high".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            args(&[("x-priority", AMQPValue::LongInt(10))]),
        )
        .await
        .unwrap();
    for i in 0..3 {
        publish(&ch, &q2, &i.to_string(), BasicProperties::default()).await;
    }
    for _ in 0..3 {
        high.next().await.unwrap().unwrap();
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(200), low.next())
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclusive_consumer_and_exclusive_queue() {
    let b = TestBroker::start().await;
    let (_c1, ch1) = b.channel().await;
    let q = unique("xq");
    declare(&ch1, &q, FieldTable::default()).await;
    let _only = ch1
        .basic_consume(
            q.as_str().into(),
            "only".into(),
            BasicConsumeOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let (_c2, ch2) = b.channel().await;
    let err = ch2
        .basic_consume(
            q.as_str().into(),
            "other".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(403));

    // Exclusive queue: 405 from another connection, gone when its connection closes.
    let xq = unique("excl");
    ch1.queue_declare(
        xq.as_str().into(),
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    let (_c3, ch3) = b.channel().await;
    let err = ch3
        .queue_declare(
            xq.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(405));
    _c1.close(200, "bye".into()).await.unwrap();
    let vh = b.broker.vhost("/").unwrap();
    assert!(common::eventually(|| vh.queue(&xq).is_none()).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_delete_conditions_server_named_and_recover() {
    let b = TestBroker::start().await;
    let (_c, ch) = b.channel().await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let named = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert!(
        named.name().as_str().starts_with("amq.gen-"),
        "{}",
        named.name()
    );
    let q = unique("pq");
    declare(&ch, &q, FieldTable::default()).await;
    for i in 0..3 {
        publish(&ch, &q, &i.to_string(), BasicProperties::default()).await;
    }
    let redeclared = ch
        .queue_declare(
            q.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(redeclared.message_count(), 3);
    assert_eq!(
        ch.queue_purge(q.as_str().into(), QueuePurgeOptions::default())
            .await
            .unwrap(),
        3
    );

    publish(&ch, &q, "x", BasicProperties::default()).await;
    let err = ch
        .queue_delete(
            q.as_str().into(),
            QueueDeleteOptions {
                if_empty: true,
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(406));

    let ch = _c.create_channel().await.unwrap();
    let _consumer = ch
        .basic_consume(
            q.as_str().into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    // basic.recover requeues the unacked delivery (redelivered) to the same consumer.
    tokio::time::sleep(Duration::from_millis(100)).await;
    ch.basic_recover(BasicRecoverOptions { requeue: true })
        .await
        .unwrap();
    let ch2 = _c.create_channel().await.unwrap();
    let err = ch2
        .queue_delete(
            q.as_str().into(),
            QueueDeleteOptions {
                if_unused: true,
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(406));
    let ch3 = _c.create_channel().await.unwrap();
    assert_eq!(
        ch3.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await
            .unwrap(),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_messages_return_when_channel_closes() {
    let b = TestBroker::start().await;
    let (c, ch) = b.channel().await;
    let q = unique("q");
    declare(&ch, &q, FieldTable::default()).await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    publish(&ch, &q, "m", BasicProperties::default()).await;
    let ch2 = c.create_channel().await.unwrap();
    let m = get(&ch2, &q, false).await.unwrap();
    assert!(!m.delivery.redelivered);
    ch2.close(200, "done".into()).await.unwrap();
    let again = get(&ch, &q, true).await.unwrap();
    assert!(again.delivery.redelivered);
    assert_eq!(body(&again.delivery), "m");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_cancels_consumer_when_queue_is_deleted() {
    let b = TestBroker::start().await;
    let (c, ch) = b.channel().await;
    let q = unique("q");
    declare(&ch, &q, FieldTable::default()).await;
    let mut consumer = ch
        .basic_consume(
            q.as_str().into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let other = c.create_channel().await.unwrap();
    other
        .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    // lapin ends the consumer stream when it receives basic.cancel.
    let end = tokio::time::timeout(Duration::from_secs(5), consumer.next())
        .await
        .expect("cancel seen");
    assert!(end.is_none(), "stream should end, got {end:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_reply_to_round_trip() {
    let b = TestBroker::start().await;
    let (_c, client) = b.channel().await;
    let (_c2, server) = b.channel().await;
    let rpc = unique("rpc");
    declare(&server, &rpc, FieldTable::default()).await;
    let mut replies = client
        .basic_consume(
            "amq.rabbitmq.reply-to".into(),
            "replies".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    client
        .basic_publish(
            "".into(),
            rpc.as_str().into(),
            BasicPublishOptions::default(),
            b"ping",
            BasicProperties::default().with_reply_to("amq.rabbitmq.reply-to".into()),
        )
        .await
        .unwrap();
    let mut requests = server
        .basic_consume(
            rpc.as_str().into(),
            "srv".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let req = requests.next().await.unwrap().unwrap();
    let reply_to = req.properties.reply_to().clone().unwrap();
    assert!(
        reply_to.as_str().starts_with("amq.rabbitmq.reply-to."),
        "{reply_to}"
    );
    server
        .basic_publish(
            "".into(),
            reply_to,
            BasicPublishOptions::default(),
            b"pong",
            BasicProperties::default(),
        )
        .await
        .unwrap();
    let rep = tokio::time::timeout(Duration::from_secs(5), replies.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(rep.data, b"pong");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_does_not_grow_output_without_bound() {
    // A no-ack consumer that never reads: the broker must stop writing to it, and keep the
    // rest of the queue in the queue rather than in the connection's buffer.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let b = TestBroker::start().await;
    let (_c, ch) = b.channel().await;
    let q = unique("slow");
    declare(&ch, &q, FieldTable::default()).await;
    // Raw client that consumes and then stops reading.
    let mut s = tokio::net::TcpStream::connect(b.addr).await.unwrap();
    common::raw::handshake(&mut s).await;
    common::raw::send_method(&mut s, 1, common::raw::channel_open()).await;
    common::raw::send_method(&mut s, 1, common::raw::consume(&q, true)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_millis(100), s.read(&mut sink)).await;
    let payload = vec![b'x'; 64 * 1024];
    for _ in 0..400 {
        ch.basic_publish(
            "".into(),
            q.as_str().into(),
            BasicPublishOptions::default(),
            &payload,
            BasicProperties::default(),
        )
        .await
        .unwrap();
    }
    let vh = b.broker.vhost("/").unwrap();
    // 400 × 64 KiB = 25 MiB published; socket buffers plus our bounded outbox hold far less.
    assert!(common::eventually(|| vh.queue(&q).unwrap().message_count() > 100).await);
    // With a backlog that waits only on the consumer's connection, publishers are asked to
    // pause (credit flow)...
    for _ in 0..1100 {
        ch.basic_publish(
            "".into(),
            q.as_str().into(),
            BasicPublishOptions::default(),
            b"small",
            BasicProperties::default(),
        )
        .await
        .unwrap();
    }
    assert!(common::eventually(|| vh.queue(&q).unwrap().flow_pressure()).await);
    s.shutdown().await.ok();

    // ...but a consumer that is simply out of prefetch credit never stalls publishers.
    let q2 = unique("noack");
    declare(&ch, &q2, FieldTable::default()).await;
    let (_c2, cch) = b.channel().await;
    cch.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    let _held = cch
        .basic_consume(
            q2.as_str().into(),
            "held".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for _ in 0..1500 {
        ch.basic_publish(
            "".into(),
            q2.as_str().into(),
            BasicPublishOptions::default(),
            b"m",
            BasicProperties::default(),
        )
        .await
        .unwrap();
    }
    ch.wait_for_confirms().await.unwrap();
    let queue2 = vh.queue(&q2).unwrap();
    assert_eq!(queue2.counts().0, 1499);
    assert!(!queue2.flow_pressure());
}
