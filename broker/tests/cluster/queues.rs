//! Exchanges, queues and bindings known cluster-wide: declared, bound and deleted through any
//! node (committed by the metadata group), a publish routed on any node reaching a queue that
//! lives on another, with confirms that wait for the queue's home node.

use std::time::Duration;

use futures_lite::StreamExt;
use lapin::message::Delivery;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};

use crate::harness::{Net, PASS, SERIAL, USER};

const AGREE: Duration = Duration::from_secs(30);

pub async fn channel(net: &Net, i: usize) -> (Connection, Channel) {
    let url = format!("amqp://{USER}:{PASS}@{}:5672/%2f", net.nodes[i].ip);
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("connect to node {i}: {e}"));
    let ch = conn.create_channel().await.expect("channel");
    (conn, ch)
}

pub fn durable() -> QueueDeclareOptions {
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
}

/// The next delivery of `consumer`, within 10 s.
async fn next(consumer: &mut lapin::Consumer, what: &str) -> Delivery {
    tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .unwrap_or_else(|_| panic!("{what}: no delivery in 10 s"))
        .unwrap_or_else(|| panic!("{what}: the consumer ended"))
        .unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// Nothing more for `consumer` within `within`.
async fn nothing(consumer: &mut lapin::Consumer, within: Duration, what: &str) {
    if let Ok(Some(d)) = tokio::time::timeout(within, consumer.next()).await {
        panic!("{what}: unexpected delivery {:?}", d.map(|d| d.data));
    }
}

/// Messages ready in `queue`, as a passive declare through node `i` sees them.
async fn ready(net: &Net, i: usize, queue: &str) -> u32 {
    let (c, ch) = channel(net, i).await;
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("passive declare");
    let _ = c.close(200, "bye".into()).await;
    q.message_count()
}

async fn wait_ready_count(net: &Net, i: usize, queue: &str, want: u32) {
    let mut last = 0;
    for _ in 0..100 {
        last = ready(net, i, queue).await;
        if last == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{queue}: {last} ready, expected {want}");
}

#[tokio::test]
async fn a_consumer_on_any_node_has_prefetch_acks_requeues_and_dead_letters_of_the_home_node() {
    let _serial = SERIAL.lock().await;
    let mut net = Net::new(3);
    net.start_all().await;
    for i in 0..3 {
        net.wait_ready(i, AGREE).await;
    }
    // "work" lives on node 0 and dead-letters to "dead", which lives on node 2.
    let (_c0, ch0) = channel(&net, 0).await;
    let (_c2, ch2) = channel(&net, 2).await;
    ch2.queue_declare("dead".into(), durable(), FieldTable::default())
        .await
        .expect("declare dead on node 2");
    let mut args = FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString("dead".into()),
    );
    ch0.queue_declare("work".into(), durable(), args)
        .await
        .expect("declare work on node 0");
    ch0.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    for i in 0..20u32 {
        ch0.basic_publish(
            "".into(),
            "work".into(),
            BasicPublishOptions::default(),
            i.to_string().as_bytes(),
            persistent(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    }

    // A consumer on node 1 with prefetch 5: five deliveries, in order, then nothing until
    // it acknowledges.
    let (c1, ch1) = channel(&net, 1).await;
    ch1.basic_qos(5, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = ch1
        .basic_consume(
            "work".into(),
            "remote-consumer".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume through node 1");
    let mut tags = Vec::new();
    for i in 0..5u32 {
        let d = next(&mut consumer, "first five").await;
        assert_eq!(d.data, i.to_string().as_bytes());
        assert!(!d.redelivered);
        tags.push(d.delivery_tag);
    }
    nothing(
        &mut consumer,
        Duration::from_millis(700),
        "prefetch 5 reached",
    )
    .await;
    ch1.basic_ack(tags[4], BasicAckOptions { multiple: true })
        .await
        .expect("ack 0..5");
    let mut next_five = Vec::new();
    for i in 5..10u32 {
        let d = next(&mut consumer, "next five").await;
        assert_eq!(d.data, i.to_string().as_bytes());
        next_five.push(d);
    }
    // Rejected without requeue: dead-lettered by the home node to "dead" on node 2.
    ch1.basic_nack(
        next_five[0].delivery_tag,
        BasicNackOptions {
            multiple: false,
            requeue: false,
        },
    )
    .await
    .expect("nack 5");
    // Rejected with requeue: back at the head, delivered again with redelivered set.
    ch1.basic_reject(
        next_five[1].delivery_tag,
        BasicRejectOptions { requeue: true },
    )
    .await
    .expect("reject 6");
    // (10 may come first: the nack freed a prefetch slot.)
    let (a, b) = (
        next(&mut consumer, "requeued 6").await,
        next(&mut consumer, "10").await,
    );
    let again = if a.data == b"6" { a } else { b };
    assert_eq!(again.data, b"6");
    assert!(again.redelivered);

    // The dead letter, fetched through node 1 from node 2 with basic.get, carries x-death.
    let got = ch1
        .basic_get("dead".into(), BasicGetOptions { no_ack: false })
        .await
        .expect("get dead through node 1")
        .expect("a dead letter");
    assert_eq!(got.delivery.data, b"5");
    let headers = got
        .delivery
        .properties
        .headers()
        .clone()
        .expect("headers on a dead letter");
    assert!(
        headers.inner().contains_key("x-death"),
        "x-death missing: {headers:?}"
    );
    got.delivery
        .ack(BasicAckOptions::default())
        .await
        .expect("ack the dead letter");
    assert_eq!(ready(&net, 0, "dead").await, 0);

    // Closing the consumer's connection returns what it held unacknowledged (6 to 10) to the
    // queue on node 0: 20 - 5 acked - 1 dead-lettered.
    let _ = c1.close(200, "bye".into()).await;
    wait_ready_count(&net, 2, "work", 14).await;

    // basic.get with acknowledgement through node 2: unacknowledged and its channel closed,
    // the message goes back too.
    let (c2b, ch2b) = channel(&net, 2).await;
    let got = ch2b
        .basic_get("work".into(), BasicGetOptions { no_ack: false })
        .await
        .expect("get through node 2")
        .expect("a message");
    assert!(got.delivery.redelivered, "6 was delivered before");
    assert_eq!(ready(&net, 1, "work").await, 13);
    let _ = c2b.close(200, "bye".into()).await;
    wait_ready_count(&net, 1, "work", 14).await;

    // A consumer whose node is killed: its unacknowledged messages come back on node 0.
    let (_c1d, ch1d) = channel(&net, 1).await;
    let mut doomed = ch1d
        .basic_consume(
            "work".into(),
            "doomed".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume through node 1");
    for _ in 0..14 {
        next(&mut doomed, "before the kill").await;
    }
    assert_eq!(ready(&net, 2, "work").await, 0);
    net.kill(1);
    wait_ready_count(&net, 2, "work", 14).await;

    // A consumer on node 2 of a queue on node 0 is cancelled (basic.cancel) when node 0 goes,
    // as RabbitMQ cancels consumers of a classic queue whose node is down.
    let mut orphan = ch2
        .basic_consume(
            "work".into(),
            "orphan".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("no-ack consume through node 2");
    for _ in 0..14 {
        next(&mut orphan, "no-ack deliveries").await;
    }
    assert_eq!(
        ready(&net, 2, "work").await,
        0,
        "no-ack deliveries are settled"
    );
    net.kill(0);
    let end = tokio::time::timeout(Duration::from_secs(15), orphan.next())
        .await
        .expect("the consumer is cancelled within 15 s");
    assert!(end.is_none(), "the consumer ended: {end:?}");
}

#[tokio::test]
async fn the_management_api_of_any_node_declares_lists_reads_and_deletes_every_queue() {
    use reqwest::Method;
    use serde_json::json;
    let _serial = SERIAL.lock().await;
    let mut net = Net::new(3);
    net.start_all().await;
    for i in 0..3 {
        net.wait_ready(i, AGREE).await;
    }
    // PUT on node 1: 201 once committed, so every node has it at once; it lives on node 1.
    let (status, body) = net
        .send(
            1,
            Method::PUT,
            "/api/queues/%2f/api-q",
            Some(json!({"durable": true, "arguments": {"x-max-length": 100}})),
        )
        .await
        .expect("PUT queue");
    assert_eq!(status, 201, "{body}");
    // The same declaration through node 2 is a 204; a different one a 400-like refusal.
    let (status, _) = net
        .send(
            2,
            Method::PUT,
            "/api/queues/%2f/api-q",
            Some(json!({"durable": true, "arguments": {"x-max-length": 100}})),
        )
        .await
        .expect("PUT again");
    assert_eq!(status, 204);
    let (status, body) = net
        .send(
            2,
            Method::PUT,
            "/api/queues/%2f/api-q",
            Some(json!({"durable": false})),
        )
        .await
        .expect("PUT inequivalent");
    assert!(status >= 400, "{status} {body}");
    assert!(body.to_string().contains("inequivalent"), "{body}");

    // An exchange through node 2 and a binding through node 0, then a publish on node 0.
    let (status, _) = net
        .send(
            2,
            Method::PUT,
            "/api/exchanges/%2f/api-x",
            Some(json!({"type": "fanout", "durable": true})),
        )
        .await
        .expect("PUT exchange");
    assert_eq!(status, 201);
    let (status, body) = net
        .send(
            0,
            Method::POST,
            "/api/bindings/%2f/e/api-x/q/api-q",
            Some(json!({"routing_key": "k"})),
        )
        .await
        .expect("POST binding");
    assert_eq!(status, 201, "{body}");
    let (_c0, ch0) = channel(&net, 0).await;
    ch0.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    for i in 0..3 {
        let c = ch0
            .basic_publish(
                "api-x".into(),
                "".into(),
                BasicPublishOptions::default(),
                format!("m{i}").as_bytes(),
                persistent(),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(matches!(c, Confirmation::Ack(_)), "{c:?}");
    }

    // Every node lists the queue with its node and counts; any node shows its details.
    let home = net.nodes[1].name.clone();
    for i in 0..3 {
        let list = net.get(i, "/api/queues").await.expect("GET /api/queues");
        let q = list
            .as_array()
            .and_then(|l| l.iter().find(|q| q["name"] == "api-q"))
            .unwrap_or_else(|| panic!("node {i} does not list api-q: {list}"));
        assert_eq!(q["node"], home.as_str(), "{q}");
        assert_eq!(q["messages"], 3, "{q}");
        let one = net
            .get(i, "/api/queues/%2f/api-q")
            .await
            .expect("GET one queue");
        assert_eq!(one["node"], home.as_str(), "{one}");
        assert_eq!(one["arguments"]["x-max-length"], 100, "{one}");
    }

    // POST /get through node 2 reads (and requeues) from node 1.
    let (status, got) = net
        .send(
            2,
            Method::POST,
            "/api/queues/%2f/api-q/get",
            Some(json!({"count": 2, "ackmode": "ack_requeue_true", "encoding": "auto"})),
        )
        .await
        .expect("POST get");
    assert_eq!(status, 200, "{got}");
    let payloads: Vec<&str> = got
        .as_array()
        .expect("an array")
        .iter()
        .filter_map(|m| m["payload"].as_str())
        .collect();
    assert_eq!(payloads, ["m0", "m1"]);

    // Purge through node 0, delete through node 2: gone from every node.
    let (status, _) = net
        .send(0, Method::DELETE, "/api/queues/%2f/api-q/contents", None)
        .await
        .expect("purge");
    assert_eq!(status, 204);
    let one = net.get(2, "/api/queues/%2f/api-q").await.expect("GET");
    assert_eq!(one["messages"], 0, "{one}");
    let (status, _) = net
        .send(2, Method::DELETE, "/api/queues/%2f/api-q", None)
        .await
        .expect("delete");
    assert_eq!(status, 204);
    for i in 0..3 {
        let (status, _) = net
            .send(i, Method::GET, "/api/queues/%2f/api-q", None)
            .await
            .expect("GET after delete");
        assert_eq!(status, 404, "node {i}");
    }

    // A queue whose node is down is listed as down, not left out.
    let (status, _) = net
        .send(
            1,
            Method::PUT,
            "/api/queues/%2f/on-one",
            Some(json!({"durable": true})),
        )
        .await
        .expect("PUT on-one");
    assert_eq!(status, 201);
    net.kill(1);
    net.wait_nodes(0, &[(0, true), (1, false), (2, true)], AGREE)
        .await;
    let list = net.get(0, "/api/queues/%2f").await.expect("list");
    let q = list
        .as_array()
        .and_then(|l| l.iter().find(|q| q["name"] == "on-one"))
        .unwrap_or_else(|| panic!("on-one not listed: {list}"));
    assert_eq!(q["state"], "down", "{q}");
    assert_eq!(q["node"], home.as_str(), "{q}");
}

#[tokio::test]
async fn a_federated_exchange_known_to_every_node_runs_its_link_on_one_and_delivers_once() {
    use reqwest::Method;
    use serde_json::json;
    let _serial = SERIAL.lock().await;
    let mut net = Net::new(3);
    net.start_all().await;
    for i in 0..3 {
        net.wait_ready(i, AGREE).await;
    }
    // The upstream is this cluster's vhost "up" (through node 0); downstream is "/".
    for (path, body) in [
        ("/api/vhosts/up", json!({})),
        (
            "/api/permissions/up/admin",
            json!({"configure": ".*", "write": ".*", "read": ".*"}),
        ),
        (
            "/api/parameters/federation-upstream/%2f/origin",
            json!({"value": {"uri": format!("amqp://{USER}:{PASS}@{}:5672/up", net.nodes[0].ip)}}),
        ),
        (
            "/api/exchanges/%2f/fed-x",
            json!({"type": "fanout", "durable": true}),
        ),
        ("/api/queues/%2f/fed-q", json!({"durable": true})),
        (
            "/api/policies/%2f/fed",
            json!({"pattern": "^fed-x$", "apply-to": "exchanges",
                   "definition": {"federation-upstream-set": "all"}}),
        ),
    ] {
        let (status, answer) = net
            .send(1, Method::PUT, path, Some(body))
            .await
            .expect("PUT");
        assert!(
            status == 201 || status == 204,
            "PUT {path}: {status} {answer}"
        );
    }
    let (status, answer) = net
        .send(
            2,
            Method::POST,
            "/api/bindings/%2f/e/fed-x/q/fed-q",
            Some(json!({})),
        )
        .await
        .expect("bind");
    assert_eq!(status, 201, "{answer}");

    // Exactly one node runs the exchange's link, and it stays that way.
    let running = || async {
        let mut n = 0;
        for i in 0..3 {
            let links = net.get(i, "/api/federation-links").await.expect("links");
            n += links
                .as_array()
                .map(|l| l.iter().filter(|l| l["status"] == "running").count())
                .unwrap_or(0);
        }
        n
    };
    for _ in 0..100 {
        if running().await >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(running().await, 1, "links running over the cluster");

    // A message published upstream arrives once.
    let url = format!("amqp://{USER}:{PASS}@{}:5672/up", net.nodes[2].ip);
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .expect("connect to the upstream vhost");
    let ch = conn.create_channel().await.expect("channel");
    for i in 0..10u32 {
        ch.basic_publish(
            "fed-x".into(),
            "".into(),
            BasicPublishOptions::default(),
            i.to_string().as_bytes(),
            persistent(),
        )
        .await
        .expect("publish upstream");
    }
    wait_ready_count(&net, 0, "fed-q", 10).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(ready(&net, 2, "fed-q").await, 10, "each message once");
    let _ = conn.close(200, "bye".into()).await;
}

#[tokio::test]
async fn balanced_queues_spread_over_the_nodes_and_client_local_ones_stay() {
    let _serial = SERIAL.lock().await;
    let mut net = Net::new(3);
    net.start_all().await;
    for i in 0..3 {
        net.wait_ready(i, AGREE).await;
    }
    let (_c0, ch0) = channel(&net, 0).await;
    let mut balanced = FieldTable::default();
    balanced.insert(
        "x-queue-leader-locator".into(),
        AMQPValue::LongString("balanced".into()),
    );
    for i in 0..6 {
        ch0.queue_declare(format!("b{i}").into(), durable(), balanced.clone())
            .await
            .expect("balanced declare");
    }
    ch0.queue_declare("local".into(), durable(), FieldTable::default())
        .await
        .expect("client-local declare");
    let list = net.get(1, "/api/queues/%2f").await.expect("list");
    let node_of = |name: &str| {
        list.as_array()
            .and_then(|l| l.iter().find(|q| q["name"] == name))
            .and_then(|q| q["node"].as_str())
            .unwrap_or_else(|| panic!("{name} not listed: {list}"))
            .to_owned()
    };
    let mut per_node = std::collections::BTreeMap::new();
    for i in 0..6 {
        *per_node.entry(node_of(&format!("b{i}"))).or_insert(0) += 1;
    }
    assert_eq!(per_node.len(), 3, "spread over every node: {per_node:?}");
    assert!(per_node.values().all(|n| *n == 2), "{per_node:?}");
    assert_eq!(node_of("local"), net.nodes[0].name);

    // A locator Warren does not know is refused, as RabbitMQ refuses it.
    let (_c1, ch1) = channel(&net, 1).await;
    let mut bogus = FieldTable::default();
    bogus.insert(
        "x-queue-master-locator".into(),
        AMQPValue::LongString("everywhere".into()),
    );
    let e = ch1
        .queue_declare("bogus".into(), durable(), bogus)
        .await
        .expect_err("unknown locator");
    assert!(e.to_string().contains("x-queue-master-locator"), "{e}");
}

#[tokio::test]
async fn exclusive_reply_queues_are_reachable_from_every_node_and_go_with_their_connection() {
    let _serial = SERIAL.lock().await;
    let mut net = Net::new(3);
    net.start_all().await;
    for i in 0..3 {
        net.wait_ready(i, AGREE).await;
    }
    // RabbitMQ's RPC tutorial across nodes: the client on node 0 with an exclusive,
    // server-named reply queue; the request queue on node 2; the server on node 1.
    let (_c2, ch2) = channel(&net, 2).await;
    ch2.queue_declare("rpc".into(), durable(), FieldTable::default())
        .await
        .expect("declare rpc on node 2");
    let (client, cch) = channel(&net, 0).await;
    let reply = cch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("exclusive reply queue");
    let reply_name = reply.name().to_string();
    assert!(reply_name.starts_with("amq.gen-"), "{reply_name}");
    let mut replies = cch
        .basic_consume(
            reply_name.clone().into(),
            "replies".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume replies");
    // The same queue as a fanout subscriber (tutorial 3): bound through its own node.
    cch.exchange_declare(
        "logs".into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("declare logs");
    cch.queue_bind(
        reply_name.clone().into(),
        "logs".into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind the exclusive queue");

    let (_c1, sch) = channel(&net, 1).await;
    let mut requests = sch
        .basic_consume(
            "rpc".into(),
            "server".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("server consumes rpc through node 1");
    for i in 0..5u32 {
        cch.basic_publish(
            "".into(),
            "rpc".into(),
            BasicPublishOptions::default(),
            i.to_string().as_bytes(),
            BasicProperties::default()
                .with_reply_to(reply_name.clone().into())
                .with_correlation_id(format!("c{i}").into()),
        )
        .await
        .expect("request");
        let req = next(&mut requests, "request").await;
        let to = req
            .properties
            .reply_to()
            .clone()
            .expect("reply_to")
            .to_string();
        let answer = format!("answer {}", String::from_utf8_lossy(&req.data));
        sch.basic_publish(
            "".into(),
            to.into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            answer.as_bytes(),
            BasicProperties::default()
                .with_correlation_id(req.properties.correlation_id().clone().expect("id")),
        )
        .await
        .expect("reply through node 1");
        req.ack(BasicAckOptions::default()).await.expect("ack");
        let got = next(&mut replies, "reply").await;
        assert_eq!(got.data, format!("answer {i}").as_bytes());
    }
    let (_c2b, pch) = channel(&net, 2).await;
    pch.basic_publish(
        "logs".into(),
        "".into(),
        BasicPublishOptions::default(),
        b"log line",
        BasicProperties::default(),
    )
    .await
    .expect("log through node 2");
    assert_eq!(next(&mut replies, "log").await.data, b"log line");

    // Another connection, through another node, may not use it.
    let (_c1b, other) = channel(&net, 1).await;
    let e = other
        .basic_consume(
            reply_name.clone().into(),
            "thief".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect_err("someone else's exclusive queue");
    assert!(
        e.to_string().contains("RESOURCE_LOCKED") || e.to_string().contains("405"),
        "{e}"
    );

    // Its connection closed, it is gone from every node.
    let _ = client.close(200, "bye".into()).await;
    let path = format!("/api/queues/%2f/{reply_name}");
    for i in 0..3 {
        net.wait_status(i, &path, 404, Duration::from_secs(10))
            .await;
    }

    // Its node killed and restarted: an exclusive queue it had is removed cluster-wide.
    let (c0, ch0) = channel(&net, 0).await;
    let q = ch0
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("another exclusive queue");
    let path = format!("/api/queues/%2f/{}", q.name());
    net.wait_status(2, &path, 200, Duration::from_secs(5)).await;
    drop(c0);
    net.kill(0);
    net.start(0).await;
    net.wait_ready(0, AGREE).await;
    for i in 0..3 {
        net.wait_status(i, &path, 404, Duration::from_secs(20))
            .await;
    }
}
