#![allow(clippy::unwrap_used)]
//! Policies and operator policies take effect on existing and new queues and exchanges.
mod common;

use std::time::Duration;

use common::{TestBroker, unique};
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use serde_json::json;
use warren_broker::policy::parse_policy;

async fn publish_n(ch: &Channel, q: &str, n: usize) {
    for i in 0..n {
        common::publish_confirmed(
            ch,
            "",
            q,
            i.to_string().as_bytes(),
            BasicProperties::default(),
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_limits_apply_to_existing_and_new_queues() {
    let b = TestBroker::start().await;
    let vh = b.broker.vhost("/").unwrap();
    let (_c, ch) = b.channel().await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let prefix = unique("pol");
    let existing = format!("{prefix}-old");
    ch.queue_declare(
        existing.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    publish_n(&ch, &existing, 5).await;

    let p = parse_policy("limit", "/", &json!({"pattern": format!("^{prefix}"), "definition": {"max-length": 2}, "apply-to": "queues"}), false).unwrap();
    vh.put_policy(p, false);
    assert_eq!(
        vh.queue(&existing).unwrap().message_count(),
        2,
        "applied immediately (drop-head)"
    );

    // A new queue picks the policy up at declare; a client argument beats it.
    let fresh = format!("{prefix}-new");
    ch.queue_declare(
        fresh.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    publish_n(&ch, &fresh, 4).await;
    assert_eq!(vh.queue(&fresh).unwrap().message_count(), 2);
    let own = format!("{prefix}-own");
    let mut a = FieldTable::default();
    a.insert("x-max-length".into(), AMQPValue::LongInt(3));
    ch.queue_declare(own.as_str().into(), QueueDeclareOptions::default(), a)
        .await
        .unwrap();
    publish_n(&ch, &own, 5).await;
    assert_eq!(
        vh.queue(&own).unwrap().message_count(),
        3,
        "client argument wins"
    );

    // An operator policy caps both.
    let op = parse_policy(
        "cap",
        "/",
        &json!({"pattern": format!("^{prefix}"), "definition": {"max-length": 1}}),
        true,
    )
    .unwrap();
    vh.put_policy(op, true);
    assert_eq!(
        vh.queue(&own).unwrap().message_count(),
        1,
        "operator policy caps the client argument"
    );
    assert_eq!(vh.queue(&fresh).unwrap().message_count(), 1);

    // Removing both lifts the limits.
    assert!(vh.delete_policy("cap", true));
    assert!(vh.delete_policy("limit", false));
    publish_n(&ch, &fresh, 3).await;
    assert_eq!(vh.queue(&fresh).unwrap().message_count(), 4);
    publish_n(&ch, &own, 5).await;
    assert_eq!(
        vh.queue(&own).unwrap().message_count(),
        3,
        "back to the client's own limit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_ttl_dead_lettering_and_alternate_exchange() {
    let b = TestBroker::start().await;
    let vh = b.broker.vhost("/").unwrap();
    let (_c, ch) = b.channel().await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let prefix = unique("ttlpol");
    let (q, dlq) = (format!("{prefix}-q"), unique("dlq"));
    for name in [&q, &dlq] {
        ch.queue_declare(
            name.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
    let p = parse_policy(
        "ttl",
        "/",
        &json!({"pattern": format!("^{prefix}"), "definition": {"message-ttl": 50, "dead-letter-exchange": "", "dead-letter-routing-key": dlq}}),
        false,
    )
    .unwrap();
    vh.put_policy(p, false);
    publish_n(&ch, &q, 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let dead = ch
        .basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap();
    let dead = dead.expect("dead-lettered through the policy's DLX");
    let h = dead.delivery.properties.headers().clone().unwrap();
    assert_eq!(
        h.inner().get("x-first-death-reason"),
        Some(&AMQPValue::LongString("expired".into()))
    );

    // alternate-exchange from a policy, for exchanges.
    let x = format!("{prefix}-x");
    ch.exchange_declare(
        x.as_str().into(),
        lapin::ExchangeKind::Direct,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let ae = parse_policy("ae", "/", &json!({"pattern": format!("^{prefix}-x$"), "apply-to": "exchanges", "definition": {"alternate-exchange": "amq.fanout"}}), false).unwrap();
    vh.put_policy(ae, false);
    let catch = unique("catch");
    ch.queue_declare(
        catch.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        catch.as_str().into(),
        "amq.fanout".into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    common::publish_confirmed(
        &ch,
        x.as_str(),
        "unbound",
        b"stray",
        BasicProperties::default(),
    )
    .await;
    assert_eq!(vh.queue(&catch).unwrap().message_count(), 1);
}
