#![allow(clippy::unwrap_used)]
//! Exchanges, bindings and routing, driven by lapin against a real broker.
mod common;

use common::{TestBroker, unique};
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, ExchangeKind};

async fn declare_q(ch: &Channel, name: &str) {
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("queue.declare");
}

async fn get_all(ch: &Channel, q: &str) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(q.into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
    {
        out.push(String::from_utf8(m.delivery.data.clone()).unwrap());
    }
    out
}

async fn publish(ch: &Channel, ex: &str, rk: &str, body: &str, props: BasicProperties) {
    common::publish_confirmed(ch, ex, rk, body.as_bytes(), props).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_fanout_topic_and_default_exchange() {
    let b = TestBroker::start().await;
    let (_c, ch) = b.channel().await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let (qa, qb) = (unique("a"), unique("b"));
    declare_q(&ch, &qa).await;
    declare_q(&ch, &qb).await;

    // Default exchange routes by queue name.
    publish(&ch, "", &qa, "default", BasicProperties::default()).await;
    assert_eq!(get_all(&ch, &qa).await, ["default"]);

    // Direct.
    ch.queue_bind(
        qa.as_str().into(),
        "amq.direct".into(),
        "k1".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    publish(&ch, "amq.direct", "k1", "d1", BasicProperties::default()).await;
    publish(&ch, "amq.direct", "k2", "d2", BasicProperties::default()).await;
    assert_eq!(get_all(&ch, &qa).await, ["d1"]);

    // Fanout to both.
    let fx = unique("fx");
    ch.exchange_declare(
        fx.as_str().into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    for q in [&qa, &qb] {
        ch.queue_bind(
            q.as_str().into(),
            fx.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
    publish(&ch, &fx, "whatever", "f", BasicProperties::default()).await;
    assert_eq!(get_all(&ch, &qa).await, ["f"]);
    assert_eq!(get_all(&ch, &qb).await, ["f"]);

    // Topic.
    let tx = unique("tx");
    ch.exchange_declare(
        tx.as_str().into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        qa.as_str().into(),
        tx.as_str().into(),
        "stock.*.nyse".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        qb.as_str().into(),
        tx.as_str().into(),
        "stock.#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    for rk in ["stock.ibm.nyse", "stock", "stock.a.b.c", "bond.x.nyse"] {
        publish(&ch, &tx, rk, rk, BasicProperties::default()).await;
    }
    assert_eq!(get_all(&ch, &qa).await, ["stock.ibm.nyse"]);
    assert_eq!(
        get_all(&ch, &qb).await,
        ["stock.ibm.nyse", "stock", "stock.a.b.c"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_exchange_all_and_any() {
    let b = TestBroker::start().await;
    let (_c, ch) = b.channel().await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let (qall, qany) = (unique("all"), unique("any"));
    declare_q(&ch, &qall).await;
    declare_q(&ch, &qany).await;
    let mut all = FieldTable::default();
    all.insert("x-match".into(), AMQPValue::LongString("all".into()));
    all.insert("format".into(), AMQPValue::LongString("pdf".into()));
    all.insert("type".into(), AMQPValue::LongString("report".into()));
    let mut any = all.clone();
    any.insert("x-match".into(), AMQPValue::LongString("any".into()));
    ch.queue_bind(
        qall.as_str().into(),
        "amq.headers".into(),
        "".into(),
        QueueBindOptions::default(),
        all,
    )
    .await
    .unwrap();
    ch.queue_bind(
        qany.as_str().into(),
        "amq.match".into(),
        "".into(),
        QueueBindOptions::default(),
        any,
    )
    .await
    .unwrap();
    let headers = |pairs: &[(&str, &str)]| {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert((*k).into(), AMQPValue::LongString((*v).into()));
        }
        BasicProperties::default().with_headers(t)
    };
    publish(
        &ch,
        "amq.headers",
        "",
        "both",
        headers(&[("format", "pdf"), ("type", "report")]),
    )
    .await;
    publish(&ch, "amq.headers", "", "one", headers(&[("format", "pdf")])).await;
    publish(
        &ch,
        "amq.match",
        "",
        "any-one",
        headers(&[("type", "report")]),
    )
    .await;
    publish(&ch, "amq.match", "", "none", headers(&[("type", "log")])).await;
    assert_eq!(get_all(&ch, &qall).await, ["both"]);
    assert_eq!(get_all(&ch, &qany).await, ["any-one"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_to_exchange_alternate_and_internal() {
    let b = TestBroker::start().await;
    let (_c, ch) = b.channel().await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let (src, dst, ae) = (unique("src"), unique("dst"), unique("ae"));
    let (q, qae) = (unique("q"), unique("qae"));
    declare_q(&ch, &q).await;
    declare_q(&ch, &qae).await;
    ch.exchange_declare(
        ae.as_str().into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "alternate-exchange".into(),
        AMQPValue::LongString(ae.as_str().into()),
    );
    ch.exchange_declare(
        src.as_str().into(),
        ExchangeKind::Direct,
        ExchangeDeclareOptions::default(),
        args,
    )
    .await
    .unwrap();
    ch.exchange_declare(
        dst.as_str().into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            internal: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.exchange_bind(
        dst.as_str().into(),
        src.as_str().into(),
        "to-dst".into(),
        ExchangeBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        q.as_str().into(),
        dst.as_str().into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        qae.as_str().into(),
        ae.as_str().into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    publish(&ch, &src, "to-dst", "via-e2e", BasicProperties::default()).await;
    publish(&ch, &src, "nowhere", "via-ae", BasicProperties::default()).await;
    assert_eq!(get_all(&ch, &q).await, ["via-e2e"]);
    assert_eq!(get_all(&ch, &qae).await, ["via-ae"]);

    // Unbinding stops the flow.
    ch.exchange_unbind(
        dst.as_str().into(),
        src.as_str().into(),
        "to-dst".into(),
        ExchangeUnbindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    publish(
        &ch,
        &src,
        "to-dst",
        "after-unbind",
        BasicProperties::default(),
    )
    .await;
    assert!(get_all(&ch, &q).await.is_empty());
    assert_eq!(get_all(&ch, &qae).await, ["after-unbind"]);

    // Publishing to an internal exchange is refused with 403.
    let err = ch
        .basic_publish(
            dst.as_str().into(),
            "".into(),
            BasicPublishOptions::default(),
            b"x",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap_err();
    assert_eq!(common::code(&err), Some(403), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cc_and_bcc_sender_selected_distribution() {
    let b = TestBroker::start().await;
    let (_c, ch) = b.channel().await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let (q1, q2, q3) = (unique("q1"), unique("q2"), unique("q3"));
    for q in [&q1, &q2, &q3] {
        declare_q(&ch, q).await;
    }
    let mut h = FieldTable::default();
    h.insert(
        "CC".into(),
        AMQPValue::FieldArray(vec![AMQPValue::LongString(q2.as_str().into())].into()),
    );
    h.insert(
        "BCC".into(),
        AMQPValue::FieldArray(vec![AMQPValue::LongString(q3.as_str().into())].into()),
    );
    publish(
        &ch,
        "",
        &q1,
        "m",
        BasicProperties::default().with_headers(h),
    )
    .await;
    for q in [&q1, &q2, &q3] {
        let m = ch
            .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .expect("delivered");
        let headers = m.delivery.properties.headers().clone().unwrap_or_default();
        assert!(
            headers.inner().contains_key(&ShortString::from("CC")),
            "CC kept"
        );
        assert!(
            !headers.inner().contains_key(&ShortString::from("BCC")),
            "BCC removed"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_delete_exchange_and_queue() {
    let b = TestBroker::start().await;
    let (_c, ch) = b.channel().await;
    let (x, q) = (unique("adx"), unique("adq"));
    ch.exchange_declare(
        x.as_str().into(),
        ExchangeKind::Direct,
        ExchangeDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_declare(
        q.as_str().into(),
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        q.as_str().into(),
        x.as_str().into(),
        "k".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let consumer = ch
        .basic_consume(
            q.as_str().into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    ch.basic_cancel(consumer.tag(), BasicCancelOptions::default())
        .await
        .unwrap();
    // The queue went with its last consumer, and the exchange with its last binding.
    let vh = b.broker.vhost("/").unwrap();
    assert!(common::eventually(|| vh.queue(&q).is_none()).await);
    assert!(vh.exchange(&x).is_none());
}
