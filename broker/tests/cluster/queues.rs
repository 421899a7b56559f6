//! Exchanges, queues and bindings known cluster-wide: declared, bound and deleted through any
//! node (committed by the metadata group), a publish routed on any node reaching a queue that
//! lives on another, with confirms that wait for the queue's home node.

use std::time::Duration;

use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};

use crate::harness::{Net, PASS, SERIAL, USER};

const AGREE: Duration = Duration::from_secs(30);

async fn channel(net: &Net, i: usize) -> (Connection, Channel) {
    let url = format!("amqp://{USER}:{PASS}@{}:5672/%2f", net.nodes[i].ip);
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("connect to node {i}: {e}"));
    let ch = conn.create_channel().await.expect("channel");
    (conn, ch)
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

#[tokio::test]
async fn any_node_declares_binds_publishes_to_and_deletes_a_queue_living_on_another() {
    let _serial = SERIAL.lock().await;
    let mut net = Net::new(3);
    net.start_all().await;
    for i in 0..3 {
        net.wait_ready(i, AGREE).await;
    }
    let (c0, ch0) = channel(&net, 0).await;
    let (c1, ch1) = channel(&net, 1).await;
    let (c2, ch2) = channel(&net, 2).await;

    // The queue lives on node 0 (client-local), the exchange is declared on node 1 and the
    // binding made on node 2: each answered after commit, so the next step sees it.
    ch0.queue_declare("orders".into(), durable(), FieldTable::default())
        .await
        .expect("declare on node 0");
    ch1.exchange_declare(
        "shop".into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("exchange declared on node 1");
    ch2.queue_bind(
        "orders".into(),
        "shop".into(),
        "order.*".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bound on node 2");
    for i in 0..3 {
        net.wait_status(i, "/api/exchanges/%2f/shop", 200, Duration::from_secs(5))
            .await;
    }

    // Published with confirms on node 2: routed there, forwarded to node 0, every confirm
    // an ack once node 0 has the message on disk.
    ch2.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    let mut confirms = Vec::new();
    for i in 0..100u32 {
        let c = ch2
            .basic_publish(
                "shop".into(),
                "order.new".into(),
                BasicPublishOptions::default(),
                i.to_string().as_bytes(),
                persistent(),
            )
            .await
            .expect("publish on node 2");
        confirms.push(c);
    }
    for c in confirms {
        assert_eq!(c.await.expect("confirm"), Confirmation::Ack(None));
    }
    // Not routed: nothing forwarded, still confirmed.
    let c = ch2
        .basic_publish(
            "shop".into(),
            "invoice.new".into(),
            BasicPublishOptions::default(),
            b"nowhere",
            persistent(),
        )
        .await
        .expect("publish");
    assert_eq!(c.await.expect("confirm"), Confirmation::Ack(None));

    // Node 1 counts it through node 0; a redeclare that differs is refused there.
    let q = ch1
        .queue_declare(
            "orders".into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("passive declare on node 1");
    assert_eq!(q.message_count(), 100);
    let e = ch1
        .queue_declare(
            "orders".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect_err("inequivalent durable");
    assert!(e.to_string().contains("inequivalent arg 'durable'"), "{e}");
    drop(ch1);

    // Every message, in order, on node 0.
    for i in 0..100u32 {
        let m = ch0
            .basic_get("orders".into(), BasicGetOptions { no_ack: true })
            .await
            .expect("get")
            .unwrap_or_else(|| panic!("message {i} missing"));
        assert_eq!(m.delivery.data, i.to_string().as_bytes());
    }

    // Consuming through another node is not there yet: refused, naming the home node.
    let (c1b, ch1b) = channel(&net, 1).await;
    let e = ch1b
        .basic_consume(
            "orders".into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect_err("remote consume");
    assert!(e.to_string().contains(&net.nodes[0].name), "{e}");

    // Purge through node 1, then delete through node 2: gone everywhere.
    let (_c1c, ch1c) = channel(&net, 1).await;
    for _ in 0..5 {
        ch2.basic_publish(
            "".into(),
            "orders".into(),
            BasicPublishOptions::default(),
            b"x",
            persistent(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    }
    assert_eq!(
        ch1c.queue_purge("orders".into(), QueuePurgeOptions::default())
            .await
            .expect("purge through node 1"),
        5
    );
    ch2.queue_delete("orders".into(), QueueDeleteOptions::default())
        .await
        .expect("delete through node 2");
    for i in 0..3 {
        net.wait_status(i, "/api/queues/%2f/orders", 404, Duration::from_secs(5))
            .await;
    }

    // A queue whose home node is down: a confirm is a nack, not a silent ack.
    ch0.queue_declare("on-zero".into(), durable(), FieldTable::default())
        .await
        .expect("declare on node 0");
    let _ = c0.close(200, "bye".into()).await;
    net.kill(0);
    net.wait_nodes(2, &[(0, false), (1, true), (2, true)], AGREE)
        .await;
    let c = ch2
        .basic_publish(
            "".into(),
            "on-zero".into(),
            BasicPublishOptions::default(),
            b"lost?",
            persistent(),
        )
        .await
        .expect("publish");
    assert!(
        matches!(c.await.expect("confirm"), Confirmation::Nack(_)),
        "a publish to a queue on a down node is nacked"
    );
    let _ = c2.close(200, "bye".into()).await;
    let _ = c1.close(200, "bye".into()).await;
    let _ = c1b.close(200, "bye".into()).await;
}
