//! Replicated queues (`x-queue-type: quorum`): a Raft group per queue over the nodes. What a
//! publisher was confirmed survives the leader's kill -9; what a dead node's consumer held
//! comes back redelivered; a killed replica catches up when it returns.

use std::collections::BTreeSet;
use std::time::Duration;

use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation};

use crate::harness::{Net, PASS, SERIAL, USER};
use crate::queues::{channel, durable};

const AGREE: Duration = Duration::from_secs(30);

fn quorum() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args
}

/// Publishes `bodies` with confirms; returns those confirmed (acked) and how many were nacked.
async fn publish(
    ch: &Channel,
    queue: &str,
    bodies: impl Iterator<Item = String>,
) -> (Vec<String>, usize) {
    let mut pending = Vec::new();
    for b in bodies {
        let p = ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                b.as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await;
        pending.push((b, p));
    }
    let (mut acked, mut nacked) = (Vec::new(), 0);
    for (b, p) in pending {
        let confirmed = match p {
            Ok(c) => tokio::time::timeout(Duration::from_secs(30), c).await,
            Err(e) => panic!("publish {b}: {e}"),
        };
        match confirmed {
            Ok(Ok(Confirmation::Ack(_))) => acked.push(b),
            Ok(Ok(_)) => nacked += 1,
            Ok(Err(e)) => panic!("confirm of {b}: {e}"),
            Err(_) => panic!("no confirm for {b} within 30 s"),
        }
    }
    (acked, nacked)
}

/// The `members` of a queue as the management API shows it.
fn members(info: &serde_json::Value) -> Vec<String> {
    info["members"]
        .as_array()
        .expect("members")
        .iter()
        .filter_map(|m| m.as_str().map(str::to_owned))
        .collect()
}

async fn leader(net: &Net, i: usize) -> Option<String> {
    let q = net.get(i, "/api/queues/%2f/rq").await.ok()?;
    q["leader"].as_str().map(str::to_owned)
}

async fn wait_leader(net: &Net, i: usize, not: Option<&str>) -> String {
    for _ in 0..200 {
        if let Some(l) = leader(net, i).await
            && Some(l.as_str()) != not
        {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no leader of rq (other than {not:?}) seen by node {i} within 20 s");
}

#[tokio::test]
async fn confirmed_messages_survive_the_leaders_kill_and_its_consumers_messages_come_back() {
    let _serial = SERIAL.lock().await;
    let mut net = Net::new(3);
    net.start_all().await;
    for i in 0..3 {
        net.wait_ready(i, AGREE).await;
    }
    let (_c0, ch0) = channel(&net, 0).await;
    ch0.queue_declare("rq".into(), durable(), quorum())
        .await
        .expect("declare a quorum queue on node 0");
    // Every node knows it as a replicated queue with three members.
    for i in 0..3 {
        net.wait_status(i, "/api/queues/%2f/rq", 200, Duration::from_secs(5))
            .await;
    }
    let info = net.get(1, "/api/queues/%2f/rq").await.expect("show");
    assert_eq!(info["type"], "quorum", "{info}");
    let members: BTreeSet<String> = members(&info).into_iter().collect();
    let names: BTreeSet<String> = net.nodes.iter().map(|n| n.name.clone()).collect();
    assert_eq!(members, names, "{info}");
    // A non-durable quorum queue is refused, as RabbitMQ refuses one.
    let (_cx, chx) = channel(&net, 1).await;
    let refused = chx
        .queue_declare(
            "rq-transient".into(),
            QueueDeclareOptions::default(),
            quorum(),
        )
        .await;
    assert!(refused.is_err(), "a non-durable quorum queue: {refused:?}");

    let lead = wait_leader(&net, 0, None).await;
    let l = net
        .nodes
        .iter()
        .position(|n| n.name == lead)
        .expect("leader is a node");
    let (c, p) = ((l + 1) % 3, (l + 2) % 3);

    // A consumer on the leader's node holds 5 unacknowledged messages when it is killed.
    let (_cl, chl) = channel(&net, l).await;
    chl.basic_qos(5, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut doomed = chl
        .basic_consume(
            "rq".into(),
            "doomed".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume on the leader's node");

    let (_cp, chp) = channel(&net, p).await;
    chp.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let (mut confirmed, nacked) = publish(&chp, "rq", (0..300).map(|i| format!("m{i}"))).await;
    assert_eq!(nacked, 0, "every publish confirmed while all nodes are up");
    let mut held = BTreeSet::new();
    for _ in 0..5 {
        let d = tokio::time::timeout(Duration::from_secs(10), doomed.next())
            .await
            .expect("a delivery to the leader's consumer")
            .expect("consumer open")
            .expect("delivery");
        held.insert(String::from_utf8_lossy(&d.data).into_owned());
    }

    net.kill(l);
    // A new leader among the others, within seconds.
    let new = wait_leader(&net, c, Some(&lead)).await;
    assert_ne!(new, lead);

    // Publishing goes on through the new leader; what is confirmed counts.
    let (more, nacked) = publish(&chp, "rq", (300..400).map(|i| format!("m{i}"))).await;
    eprintln!(
        "leader {lead} killed, new leader {new}: {} of 100 later publishes confirmed, {nacked} nacked",
        more.len()
    );
    confirmed.extend(more);

    // A consumer on another node drains everything: the 5 the dead consumer held come back
    // redelivered, and every confirmed message is there.
    let (_cc, chc) = channel(&net, c).await;
    chc.basic_qos(50, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut drain = chc
        .basic_consume(
            "rq".into(),
            "drain".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume on a surviving node");
    let mut seen = BTreeSet::new();
    let mut redelivered = BTreeSet::new();
    let want: BTreeSet<String> = confirmed.iter().cloned().collect();
    while !want.is_subset(&seen) {
        let d = tokio::time::timeout(Duration::from_secs(20), drain.next())
            .await
            .unwrap_or_else(|_| {
                let missing: Vec<&String> = want.difference(&seen).take(10).collect();
                panic!(
                    "confirmed messages lost: {} missing, e.g. {missing:?}",
                    want.difference(&seen).count()
                )
            })
            .expect("consumer open")
            .expect("delivery");
        let body = String::from_utf8_lossy(&d.data).into_owned();
        if d.redelivered {
            redelivered.insert(body.clone());
        }
        seen.insert(body);
        d.ack(BasicAckOptions::default()).await.expect("ack");
    }
    eprintln!(
        "{} confirmed, {} received ({} redelivered)",
        want.len(),
        seen.len(),
        redelivered.len()
    );
    assert!(
        held.is_subset(&redelivered),
        "what the dead node's consumer held comes back redelivered: held {held:?}, redelivered {redelivered:?}"
    );

    // The killed node returns and catches up: its replica shows the queue drained.
    net.start(l).await;
    net.wait_ready(l, AGREE).await;
    let mut last = serde_json::Value::Null;
    for _ in 0..100 {
        if let Ok(q) = net.get(l, "/api/queues/%2f/rq").await {
            if q["messages"] == 0 && q["leader"].is_string() {
                return;
            }
            last = q;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("the restarted replica did not catch up: {last}");
}

#[tokio::test]
async fn a_two_replica_queue_makes_its_members_quorum_critical_and_takes_publishes_from_any_node() {
    let _serial = SERIAL.lock().await;
    let mut net = Net::new(3);
    net.start_all().await;
    for i in 0..3 {
        net.wait_ready(i, AGREE).await;
    }
    let (_c0, ch0) = channel(&net, 0).await;
    let mut args = quorum();
    args.insert("x-quorum-initial-group-size".into(), AMQPValue::LongInt(2));
    ch0.queue_declare("pair".into(), durable(), args)
        .await
        .expect("declare a 2-replica queue on node 0");
    let info = net
        .wait_status(0, "/api/queues/%2f/pair", 200, Duration::from_secs(5))
        .await;
    let members = members(&info);
    assert_eq!(members.len(), 2, "{info}");
    assert_eq!(
        members[0], net.nodes[0].name,
        "the declaring node first: {info}"
    );
    let outsider = (0..3)
        .find(|&i| !members.contains(&net.nodes[i].name))
        .expect("one node holds no replica");
    let member = (0..3)
        .find(|&i| i != 0 && members.contains(&net.nodes[i].name))
        .expect("the other member");

    // Stopping a member would leave the queue without a majority of its two replicas; the
    // node without a replica is not critical (the metadata group has three voters).
    let mut critical = None;
    for _ in 0..50 {
        let (status, body) = net
            .send(
                0,
                reqwest::Method::GET,
                "/api/health/checks/node-is-quorum-critical",
                None,
            )
            .await
            .expect("health check");
        if status == 503 {
            critical = Some(body);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let body = critical.expect("node 0 is quorum-critical for the queue");
    assert_eq!(body["queues"][0]["name"], "pair", "{body}");
    let (status, body) = net
        .send(
            outsider,
            reqwest::Method::GET,
            "/api/health/checks/node-is-quorum-critical",
            None,
        )
        .await
        .expect("health check");
    assert_eq!(status, 200, "{body}");

    // Publishes with confirms through the node without a replica go through a member.
    let (_co, cho) = channel(&net, outsider).await;
    cho.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let (confirmed, nacked) = publish(&cho, "pair", (0..50).map(|i| format!("p{i}"))).await;
    assert_eq!((confirmed.len(), nacked), (50, 0));
    // The node without a replica shows the queue as a member sees it.
    let seen = net
        .get(outsider, "/api/queues/%2f/pair")
        .await
        .expect("show");
    assert_eq!(
        (seen["messages"].as_u64(), seen["state"].as_str()),
        (Some(50), Some("running")),
        "{seen}"
    );
    // The node without a replica follows the queue as a Raft learner: its consumers are
    // served there. It takes 25; the other member the remaining 25.
    let (_cx, chx) = channel(&net, outsider).await;
    chx.basic_qos(10, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut there = chx
        .basic_consume(
            "pair".into(),
            "there".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume through the node without a replica");
    let mut got = BTreeSet::new();
    for _ in 0..25 {
        let d = tokio::time::timeout(Duration::from_secs(10), there.next())
            .await
            .expect("a delivery through the learner")
            .expect("consumer open")
            .expect("delivery");
        got.insert(String::from_utf8_lossy(&d.data).into_owned());
        d.ack(BasicAckOptions::default()).await.expect("ack");
    }
    chx.basic_cancel("there".into(), BasicCancelOptions::default())
        .await
        .expect("cancel");

    let (_cm, chm) = channel(&net, member).await;
    while got.len() < 50 {
        let d = chm
            .basic_get("pair".into(), BasicGetOptions { no_ack: false })
            .await
            .expect("get")
            .expect("a message");
        got.insert(String::from_utf8_lossy(&d.delivery.data).into_owned());
        d.delivery
            .ack(BasicAckOptions::default())
            .await
            .expect("ack");
    }
    let want: BTreeSet<String> = confirmed.into_iter().collect();
    assert_eq!(got, want);

    // Dead letters: rejected without requeue, or returned more often than x-delivery-limit,
    // a message goes to the dead-letter exchange with its x-death reason.
    chm.queue_declare("dead".into(), durable(), FieldTable::default())
        .await
        .expect("declare the dead-letter queue");
    let mut args = quorum();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString("dead".into()),
    );
    args.insert("x-delivery-limit".into(), AMQPValue::LongInt(1));
    chm.queue_declare("retry".into(), durable(), args)
        .await
        .expect("declare a replicated queue with a dead-letter exchange");
    chm.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let (sent, _) = publish(
        &chm,
        "retry",
        ["rejected".to_owned(), "looping".to_owned()].into_iter(),
    )
    .await;
    assert_eq!(sent.len(), 2);
    let get = |q: &'static str| {
        let chm = chm.clone();
        async move {
            for _ in 0..50 {
                if let Some(m) = chm
                    .basic_get(q.into(), BasicGetOptions { no_ack: false })
                    .await
                    .expect("get")
                {
                    return m;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!("nothing in {q} within 5 s");
        }
    };
    let first = get("retry").await;
    assert_eq!(&first.delivery.data[..], b"rejected");
    first
        .delivery
        .reject(BasicRejectOptions { requeue: false })
        .await
        .expect("reject");
    // "looping" is returned twice: over the limit of 1, it is dead-lettered.
    for _ in 0..2 {
        let m = get("retry").await;
        assert_eq!(&m.delivery.data[..], b"looping");
        m.delivery
            .nack(BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            })
            .await
            .expect("nack");
    }
    let mut reasons = Vec::new();
    for _ in 0..2 {
        let m = get("dead").await;
        let death = m
            .delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("x-death").cloned());
        let Some(AMQPValue::FieldArray(deaths)) = death else {
            panic!("no x-death on {:?}", m.delivery.properties);
        };
        let Some(AMQPValue::FieldTable(first)) = deaths.as_slice().first().cloned() else {
            panic!("x-death {deaths:?}");
        };
        let reason = match first.inner().get("reason") {
            Some(AMQPValue::LongString(r)) => r.to_string(),
            other => panic!("reason {other:?}"),
        };
        reasons.push((
            String::from_utf8_lossy(&m.delivery.data).into_owned(),
            reason,
        ));
        m.delivery
            .ack(BasicAckOptions::default())
            .await
            .expect("ack");
    }
    reasons.sort();
    assert_eq!(
        reasons,
        vec![
            ("looping".to_owned(), "delivery_limit".to_owned()),
            ("rejected".to_owned(), "rejected".to_owned())
        ]
    );

    // A policy with ha-mode (RabbitMQ's mirrored classic queues) makes a durable queue it
    // matches replicated, with as many replicas as ha-params says; a non-durable one stays
    // classic.
    put_queue_policy(
        &net,
        0,
        "mirror",
        "^mirrored\\.",
        serde_json::json!({"ha-mode": "exactly", "ha-params": 2}),
    )
    .await;
    let (_cy, chx) = channel(&net, outsider).await;
    chx.queue_declare("mirrored.one".into(), durable(), FieldTable::default())
        .await
        .expect("declare a mirrored queue");
    chx.queue_declare(
        "mirrored.tmp".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("declare a transient queue the policy matches");
    let one = net
        .wait_status(
            outsider,
            "/api/queues/%2f/mirrored.one",
            200,
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(one["type"], "quorum", "{one}");
    assert_eq!(one["members"].as_array().map(Vec::len), Some(2), "{one}");
    // Declared classic explicitly: mirrored all the same, as RabbitMQ mirrors classic queues.
    let mut classic = FieldTable::default();
    classic.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("classic".into()),
    );
    chx.queue_declare("mirrored.classic".into(), durable(), classic)
        .await
        .expect("declare an explicitly classic queue the policy matches");
    let explicit = net
        .wait_status(
            outsider,
            "/api/queues/%2f/mirrored.classic",
            200,
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(explicit["type"], "quorum", "{explicit}");
    assert_eq!(
        explicit["members"].as_array().map(Vec::len),
        Some(2),
        "{explicit}"
    );
    let tmp = net
        .wait_status(
            outsider,
            "/api/queues/%2f/mirrored.tmp",
            200,
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(tmp["type"], "classic", "{tmp}");

    // A vhost whose default queue type is quorum (set with RabbitMQ 3.10's spelling,
    // `defaultqueuetype`) replicates a durable queue declared without `x-queue-type`, on
    // every node; an exclusive queue there stays classic, as in RabbitMQ.
    let (status, body) = net
        .send(
            0,
            reqwest::Method::PUT,
            "/api/vhosts/qq",
            Some(serde_json::json!({"defaultqueuetype": "quorum"})),
        )
        .await
        .expect("PUT vhost");
    assert_eq!(status, 201, "{body}");
    let (status, body) = net
        .send(
            0,
            reqwest::Method::PUT,
            &format!("/api/permissions/qq/{USER}"),
            Some(serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"})),
        )
        .await
        .expect("PUT permissions");
    assert!(status == 201 || status == 204, "{status} {body}");
    let vhost = net
        .wait_status(outsider, "/api/vhosts/qq", 200, Duration::from_secs(5))
        .await;
    assert_eq!(vhost["default_queue_type"], "quorum", "{vhost}");
    let url = format!("amqp://{USER}:{PASS}@{}:5672/qq", net.nodes[outsider].ip);
    let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
        .await
        .expect("connect to vhost qq");
    let chq = conn.create_channel().await.expect("channel");
    chq.queue_declare("by-default".into(), durable(), FieldTable::default())
        .await
        .expect("declare a queue without x-queue-type");
    let exclusive = chq
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare an exclusive queue");
    let by_default = net
        .wait_status(
            outsider,
            "/api/queues/qq/by-default",
            200,
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(by_default["type"], "quorum", "{by_default}");
    assert_eq!(
        by_default["members"].as_array().map(Vec::len),
        Some(3),
        "{by_default}"
    );
    let name = exclusive.name().as_str().to_owned();
    let excl = net
        .wait_status(
            outsider,
            &format!("/api/queues/qq/{name}"),
            200,
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(excl["type"], "classic", "{excl}");
}

/// Waits until node `i` shows queue `name` with `n` members; returns them.
async fn wait_members(net: &Net, i: usize, name: &str, n: usize) -> Vec<String> {
    let path = format!("/api/queues/%2f/{name}");
    let mut last = serde_json::Value::Null;
    for _ in 0..100 {
        if let Ok(q) = net.get(i, &path).await {
            if q["members"].as_array().map(Vec::len) == Some(n) {
                return members(&q);
            }
            last = q;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("node {i} does not show {name} with {n} members within 10 s: {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_are_added_and_removed_and_a_drain_moves_leadership_away_without_a_nack() {
    let _serial = SERIAL.lock().await;
    let mut net = Net::new(3);
    net.start_all().await;
    for i in 0..3 {
        net.wait_ready(i, AGREE).await;
    }
    let index = |name: &str| {
        net.nodes
            .iter()
            .position(|n| n.name == name)
            .expect("a node's name")
    };
    let (_c0, ch0) = channel(&net, 0).await;
    let mut args = quorum();
    args.insert("x-quorum-initial-group-size".into(), AMQPValue::LongInt(2));
    ch0.queue_declare("rg".into(), durable(), args)
        .await
        .expect("declare a quorum queue of 2 members");
    let two = wait_members(&net, 0, "rg", 2).await;
    let outsider = (0..3)
        .find(|i| !two.contains(&net.nodes[*i].name))
        .expect("a node without a replica");
    let post = reqwest::Method::POST;
    let delete = reqwest::Method::DELETE;

    // Add the third node (RabbitMQ's `rabbitmq-queues add_member`), through any node.
    let node = |i: usize| serde_json::json!({"node": net.nodes[i].name});
    let add = "/api/queues/quorum/%2f/rg/replicas/add";
    let (status, body) = net
        .send(outsider, post.clone(), add, Some(node(outsider)))
        .await
        .expect("add a member");
    assert_eq!(status, 204, "{body}");
    for i in 0..3 {
        wait_members(&net, i, "rg", 3).await;
    }
    // A node the cluster does not know, and a classic queue, are refused with the reason.
    let (status, body) = net
        .send(
            0,
            post.clone(),
            add,
            Some(serde_json::json!({"node": "nobody"})),
        )
        .await
        .expect("add an unknown node");
    assert_eq!(status, 400, "{body}");
    assert!(
        body["reason"].as_str().unwrap_or("").contains("nobody"),
        "{body}"
    );

    // Remove one (`delete_member`), then another (`shrink` on its node): one member left,
    // which cannot be removed.
    let remove = "/api/queues/quorum/%2f/rg/replicas/delete";
    let first = index(&two[0]);
    let (status, body) = net
        .send(1, delete.clone(), remove, Some(node(first)))
        .await
        .expect("delete a member");
    assert_eq!(status, 202, "{body}");
    let left = wait_members(&net, 2, "rg", 2).await;
    assert!(!left.contains(&two[0]), "{left:?}");
    let second = index(&left[0]);
    let shrink = format!(
        "/api/queues/quorum/replicas/on/{}/shrink",
        net.nodes[second].name
    );
    let (status, body) = net
        .send(0, delete.clone(), &shrink, None)
        .await
        .expect("shrink");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body[0]["name"], "rg", "{body}");
    assert_eq!(body[0]["result"], "ok", "{body}");
    assert_eq!(body[0]["size"], 1, "{body}");
    let last = wait_members(&net, 0, "rg", 1).await;
    let (status, body) = net
        .send(0, delete.clone(), remove, Some(node(index(&last[0]))))
        .await
        .expect("delete the last member");
    assert_eq!(status, 400, "{body}");

    // A single-member queue still confirms, and grows back (`grow` on each other node).
    let (_cp, chp) = channel(&net, first).await;
    chp.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let (mut confirmed, nacked) = publish(&chp, "rg", (0..100).map(|i| format!("m{i}"))).await;
    assert_eq!(nacked, 0);
    for n in &net.nodes {
        if n.name == last[0] {
            continue;
        }
        let grow = format!("/api/queues/quorum/replicas/on/{}/grow", n.name);
        let body =
            serde_json::json!({"strategy": "all", "queue_pattern": "^rg$", "vhost_pattern": ".*"});
        let (status, answer) = net
            .send(0, post.clone(), &grow, Some(body))
            .await
            .expect("grow");
        assert_eq!(status, 204, "{answer}");
    }
    for i in 0..3 {
        wait_members(&net, i, "rg", 3).await;
    }

    // Drain the leader's node (the pod's preStop hook): leadership moves to another member
    // before the node goes, and a publisher on another node is never nacked meanwhile.
    let lead = wait_leader_of(&net, 0, "rg").await;
    let l = index(&lead);
    let p = (l + 1) % 3;
    let (_cq, chq) = channel(&net, p).await;
    chq.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let publisher = tokio::spawn(async move {
        let mut acked = Vec::new();
        let mut nacked = 0;
        for batch in 0..30 {
            let (a, n) = publish(&chq, "rg", (0..10).map(|i| format!("d{batch}-{i}"))).await;
            acked.extend(a);
            nacked += n;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (acked, nacked)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let began = std::time::Instant::now();
    let report = tokio::task::block_in_place(|| net.drain_cli(l));
    eprintln!(
        "drain of the leader's node took {:?}: {report}",
        began.elapsed()
    );
    let moved = report["leadership"]
        .as_array()
        .and_then(|l| l.iter().find(|x| x["queue"] == "rg").cloned())
        .unwrap_or_else(|| panic!("the drain report names rg's leadership: {report}"));
    let to = moved["moved_to"]
        .as_str()
        .unwrap_or_else(|| panic!("leadership of rg not moved: {report}"))
        .to_owned();
    assert_ne!(to, lead, "{report}");
    assert_eq!(wait_leader_of(&net, p, "rg").await, to);
    let (acked, nacked) = publisher.await.expect("publisher");
    assert_eq!(nacked, 0, "no publish nacked while leadership moved");
    assert_eq!(acked.len(), 300);
    confirmed.extend(acked);
    // The drained node does not take leadership back while drained.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_ne!(wait_leader_of(&net, p, "rg").await, lead);
    let (status, body) = net
        .send(l, delete.clone(), "/api/warren/drain", None)
        .await
        .expect("end the drain");
    assert_eq!(status, 200, "{body}");

    // Everything confirmed is there, once.
    let (_cc, chc) = channel(&net, p).await;
    let mut got = BTreeSet::new();
    while let Some(m) = chc
        .basic_get("rg".into(), BasicGetOptions { no_ack: true })
        .await
        .expect("get")
    {
        assert!(
            got.insert(String::from_utf8_lossy(&m.delivery.data).into_owned()),
            "a duplicate"
        );
    }
    let want: BTreeSet<String> = confirmed.into_iter().collect();
    assert_eq!(got, want);

    // A node stopped and forgotten (`warren-broker cluster forget`, the operator's last step
    // of a scale-down) leaves the queue's members too, so its majority is counted over the
    // nodes left.
    let gone = net.nodes[l].name.clone();
    net.kill(l);
    let mut out = String::new();
    for _ in 0..50 {
        let run = tokio::task::block_in_place(|| net.forget_cli(p, &gone));
        out = format!(
            "{}{}",
            String::from_utf8_lossy(&run.stdout),
            String::from_utf8_lossy(&run.stderr)
        );
        if run.status.success() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        out.contains("replicated queue 'rg' in vhost '/': its replica there removed (ok)"),
        "{out}"
    );
    let left = wait_members(&net, p, "rg", 2).await;
    assert!(!left.contains(&gone), "{left:?}");
    let (_cr, chr) = channel(&net, p).await;
    chr.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let (acked, nacked) = publish(&chr, "rg", (0..10).map(|i| format!("after-forget-{i}"))).await;
    assert_eq!((acked.len(), nacked), (10, 0));
}

async fn wait_leader_of(net: &Net, i: usize, queue: &str) -> String {
    let path = format!("/api/queues/%2f/{queue}");
    for _ in 0..200 {
        if let Ok(q) = net.get(i, &path).await
            && let Some(l) = q["leader"].as_str()
        {
            return l.to_owned();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no leader of {queue} seen by node {i} within 20 s");
}

/// A restarted node takes AMQP connections only once it knows the cluster's queues: before,
/// a publish to a queue it had not heard of yet was unroutable, dropped and confirmed (a
/// Jepsen-style run lost 515 confirmed messages that way, in the 0.4 s between a restarted
/// node's AMQP listener and its metadata). The queue here is declared while the node is down.
#[tokio::test]
async fn a_restarted_node_serves_amqp_only_once_it_knows_the_queues_declared_while_it_was_down() {
    let _serial = SERIAL.lock().await;
    let mut net = Net::new(3);
    net.start_all().await;
    for i in 0..3 {
        net.wait_ready(i, AGREE).await;
    }
    // A queue deleted while node 1 is down: its replica's directory goes once node 1 is
    // back and caught up.
    let (_c0, ch0) = channel(&net, 0).await;
    ch0.queue_declare("doomed".into(), durable(), quorum())
        .await
        .expect("declare a quorum queue");
    let replicas = net.nodes[1].data_dir.join("cluster").join("queues");
    let listing = |dir: &std::path::Path| -> BTreeSet<String> {
        std::fs::read_dir(dir)
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut doomed = BTreeSet::new();
    for _ in 0..100 {
        doomed = listing(&replicas);
        if !doomed.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(doomed.len(), 1, "node 1's replica of 'doomed': {doomed:?}");
    net.kill(1);
    ch0.queue_delete("doomed".into(), QueueDeleteOptions::default())
        .await
        .expect("delete the queue while node 1 is down");
    // Enough changes for the metadata group to snapshot: node 1 catches up from a snapshot.
    for i in 0..30 {
        let name = format!("churn-{i}");
        ch0.queue_declare(name.as_str().into(), durable(), FieldTable::default())
            .await
            .expect("declare");
        ch0.queue_delete(name.as_str().into(), QueueDeleteOptions::default())
            .await
            .expect("delete");
    }
    ch0.queue_declare("late".into(), durable(), quorum())
        .await
        .expect("declare a quorum queue while node 1 is down");
    net.spawn(1);
    // The first AMQP connection node 1 accepts.
    let url = format!(
        "amqp://{}:{}@{}:5672/%2f",
        crate::harness::USER,
        crate::harness::PASS,
        net.nodes[1].ip
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let conn = loop {
        match lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await {
            Ok(c) => break c,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => panic!("node 1 took no AMQP connection within 60 s: {e}"),
        }
    };
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let (acked, nacked) = publish(&ch, "late", (0..200).map(|i| format!("early-{i}"))).await;
    assert_eq!(nacked, 0);
    ch.queue_declare(
        "late".into(),
        QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("node 1 knows the queue on its first connection");
    // Every confirmed message is there, read through another node.
    let mut got = BTreeSet::new();
    let mut deliveries = ch0
        .basic_consume(
            "late".into(),
            "reader".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume");
    while got.len() < acked.len() {
        match tokio::time::timeout(Duration::from_secs(10), deliveries.next()).await {
            Ok(Some(Ok(d))) => {
                got.insert(String::from_utf8_lossy(&d.data).into_owned());
            }
            other => panic!(
                "{} of {} confirmed messages read: {other:?}",
                got.len(),
                acked.len()
            ),
        }
    }
    let confirmed: BTreeSet<String> = acked.into_iter().collect();
    assert_eq!(got, confirmed);
    let left = listing(&replicas);
    assert!(
        left.is_disjoint(&doomed),
        "the deleted queue's replica is still on node 1: {left:?}"
    );
}

/// Sets policy `name` (`pattern`, applied to queues, `definition`) through node `i`.
async fn put_queue_policy(
    net: &Net,
    i: usize,
    name: &str,
    pattern: &str,
    definition: serde_json::Value,
) {
    let (status, body) = net
        .send(
            i,
            reqwest::Method::PUT,
            &format!("/api/policies/%2f/{name}"),
            Some(serde_json::json!({
                "pattern": pattern,
                "apply-to": "queues",
                "definition": definition
            })),
        )
        .await
        .expect("PUT policy");
    assert!(status == 201 || status == 204, "{status} {body}");
}

/// Waits until node `i` lists `queue` as replicated over `n` members with `messages` waiting.
async fn wait_replicated(net: &Net, i: usize, queue: &str, n: usize, messages: u64) {
    let path = format!("/api/queues/%2f/{queue}");
    let deadline = tokio::time::Instant::now() + AGREE;
    loop {
        let q = net.get(i, &path).await;
        let done = q.as_ref().is_ok_and(|q| {
            q["type"] == "quorum"
                && q["members"].as_array().map(Vec::len) == Some(n)
                && q["messages"].as_u64() == Some(messages)
        });
        if done {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!(
                "node {i} does not list {queue} as replicated over {n} members with {messages} messages: {q:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_policy_with_ha_mode_makes_an_existing_classic_queue_replicated_and_loses_no_message() {
    let _serial = SERIAL.lock().await;
    let mut net = Net::new(3);
    net.start_all().await;
    for i in 0..3 {
        net.wait_ready(i, AGREE).await;
    }
    // A durable classic queue on node 0 with 300 confirmed messages; a consumer on node 0
    // holds 10 of them unacknowledged.
    let (_c0, ch0) = channel(&net, 0).await;
    ch0.queue_declare("legacy".into(), durable(), FieldTable::default())
        .await
        .expect("declare a classic queue");
    ch0.queue_bind(
        "legacy".into(),
        "amq.direct".into(),
        "legacy-key".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind");
    ch0.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let (acked, nacked) = publish(&ch0, "legacy", (0..300).map(|i| format!("m-{i}"))).await;
    assert_eq!((acked.len(), nacked), (300, 0));
    let before = net
        .wait_status(1, "/api/queues/%2f/legacy", 200, AGREE)
        .await;
    assert_eq!(before["type"], "classic", "{before}");
    let (_c1, holder) = channel(&net, 0).await;
    holder
        .basic_qos(10, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut held_stream = holder
        .basic_consume(
            "legacy".into(),
            "holder".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut held = Vec::new();
    while held.len() < 10 {
        match tokio::time::timeout(Duration::from_secs(10), held_stream.next()).await {
            Ok(Some(Ok(d))) => held.push(d),
            other => panic!("delivery {} of 10: {other:?}", held.len()),
        }
    }

    // The policy, set through node 1: the queue becomes replicated on every node.
    put_queue_policy(
        &net,
        1,
        "ha-legacy",
        "^legacy$",
        serde_json::json!({"ha-mode": "all"}),
    )
    .await;
    // The consumer is cancelled by the server (basic.cancel): its stream ends.
    match tokio::time::timeout(AGREE, held_stream.next()).await {
        Ok(None) => {}
        other => panic!("the classic queue's consumer was not cancelled: {other:?}"),
    }
    // What it held goes back and is moved too: all 300 are in the replicated queue.
    for d in held {
        d.acker
            .nack(BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            })
            .await
            .expect("return a held message");
    }
    for i in 0..3 {
        wait_replicated(&net, i, "legacy", 3, 300).await;
    }
    // Publishing through the binding made before reaches the replicated queue.
    let (_c2, ch2) = channel(&net, 2).await;
    ch2.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let confirm = ch2
        .basic_publish(
            "amq.direct".into(),
            "legacy-key".into(),
            BasicPublishOptions::default(),
            b"after",
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(matches!(confirm, Confirmation::Ack(_)), "{confirm:?}");

    // The classic queue's node dies: every confirmed message is read through node 2 (once
    // a leader other than node 0 is elected).
    let node0 = net.get(0, "/api/overview").await.expect("overview")["node"]
        .as_str()
        .expect("node name")
        .to_owned();
    net.kill(0);
    for _ in 0..200 {
        if wait_leader_of(&net, 2, "legacy").await != node0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut got = BTreeSet::new();
    let mut deliveries = ch2
        .basic_consume(
            "legacy".into(),
            "reader".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume through node 2");
    let mut want: BTreeSet<String> = acked.into_iter().collect();
    want.insert("after".into());
    while got.len() < want.len() {
        match tokio::time::timeout(Duration::from_secs(20), deliveries.next()).await {
            Ok(Some(Ok(d))) => {
                got.insert(String::from_utf8_lossy(&d.data).into_owned());
            }
            other => panic!("{} of {} messages read: {other:?}", got.len(), want.len()),
        }
    }
    assert_eq!(got, want);
    // Node 0 comes back with the queue replicated and nothing left to move: no message
    // reappears.
    net.spawn(0);
    net.wait_ready(0, AGREE).await;
    wait_replicated(&net, 0, "legacy", 3, 0).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    wait_replicated(&net, 2, "legacy", 3, 0).await;

    // The queue follows the policy, as RabbitMQ's mirrors do: `exactly` 2 leaves two members,
    // no policy leaves the leader alone; it still takes and gives messages.
    put_queue_policy(
        &net,
        2,
        "ha-legacy",
        "^legacy$",
        serde_json::json!({"ha-mode": "exactly", "ha-params": 2}),
    )
    .await;
    for i in 0..3 {
        wait_replicated(&net, i, "legacy", 2, 0).await;
    }
    let (status, body) = net
        .send(
            2,
            reqwest::Method::DELETE,
            "/api/policies/%2f/ha-legacy",
            None,
        )
        .await
        .expect("DELETE policy");
    assert_eq!(status, 204, "{body}");
    for i in 0..3 {
        wait_replicated(&net, i, "legacy", 1, 0).await;
    }
    ch2.basic_cancel("reader".into(), BasicCancelOptions::default())
        .await
        .expect("cancel the reader");
    let (acked, nacked) = publish(&ch2, "legacy", ["alone".to_owned()].into_iter()).await;
    assert_eq!((acked.len(), nacked), (1, 0));
    let (_c1, ch1) = channel(&net, 1).await;
    let got = ch1
        .basic_get("legacy".into(), BasicGetOptions { no_ack: true })
        .await
        .expect("get");
    assert_eq!(got.map(|m| m.delivery.data), Some(b"alone".to_vec()));
}

#[tokio::test]
async fn a_classic_queue_whose_node_is_killed_while_its_messages_move_finishes_the_move_after_a_restart()
 {
    let _serial = SERIAL.lock().await;
    let mut net = Net::new(3);
    net.start_all().await;
    for i in 0..3 {
        net.wait_ready(i, AGREE).await;
    }
    const TOTAL: usize = 20_000;
    let (_c0, ch0) = channel(&net, 0).await;
    ch0.queue_declare("bulk".into(), durable(), FieldTable::default())
        .await
        .expect("declare a classic queue");
    ch0.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let pad = "x".repeat(1000);
    let (acked, nacked) = publish(&ch0, "bulk", (0..TOTAL).map(|i| format!("{i:06}-{pad}"))).await;
    assert_eq!((acked.len(), nacked), (TOTAL, 0));
    put_queue_policy(
        &net,
        1,
        "ha-bulk",
        "^bulk$",
        serde_json::json!({"ha-mode": "all"}),
    )
    .await;
    // Node 0 is killed once part of the queue is in the replicated queue.
    let deadline = tokio::time::Instant::now() + AGREE;
    let partial = loop {
        let q = net.get(1, "/api/queues/%2f/bulk").await;
        let moved = q
            .as_ref()
            .ok()
            .filter(|q| q["type"] == "quorum")
            .and_then(|q| q["messages"].as_u64())
            .unwrap_or(0);
        if moved > 0 {
            net.kill(0);
            break moved;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no message moved within {AGREE:?}: {q:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(
        (partial as usize) < TOTAL,
        "the move was over before node 0 was killed ({partial} messages moved)"
    );
    // Restarted, node 0 finds the classic queue in its store and moves the rest.
    net.spawn(0);
    net.wait_ready(0, AGREE).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let q = net.get(2, "/api/queues/%2f/bulk").await;
        if q.as_ref().ok().and_then(|q| q["messages"].as_u64()) >= Some(TOTAL as u64) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the move did not finish after the restart ({partial} moved before the kill): {q:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_c2, ch2) = channel(&net, 2).await;
    let mut deliveries = ch2
        .basic_consume(
            "bulk".into(),
            "reader".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume through node 2");
    let want: BTreeSet<String> = acked.into_iter().collect();
    let mut got = BTreeSet::new();
    let mut read = 0usize;
    while got.len() < want.len() {
        match tokio::time::timeout(Duration::from_secs(20), deliveries.next()).await {
            Ok(Some(Ok(d))) => {
                read += 1;
                got.insert(String::from_utf8_lossy(&d.data).into_owned());
            }
            other => panic!("{} of {} messages read: {other:?}", got.len(), want.len()),
        }
    }
    assert_eq!(got, want);
    println!(
        "killed with {partial} of {TOTAL} moved; after the restart {read} read, {} duplicates",
        read - want.len()
    );
}

#[tokio::test]
async fn a_queue_an_ha_mode_all_policy_placed_gains_a_member_on_a_node_that_joins_later() {
    let _serial = SERIAL.lock().await;
    let mut net = Net::new(3);
    net.start(0).await;
    net.start(1).await;
    for i in 0..2 {
        net.wait_ready(i, AGREE).await;
    }
    put_queue_policy(
        &net,
        0,
        "ha-all",
        "^grow\\.",
        serde_json::json!({"ha-mode": "all"}),
    )
    .await;
    let (_c0, ch0) = channel(&net, 0).await;
    ch0.queue_declare("grow.q".into(), durable(), FieldTable::default())
        .await
        .expect("declare");
    ch0.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let (acked, nacked) = publish(&ch0, "grow.q", (0..100).map(|i| format!("g-{i}"))).await;
    assert_eq!((acked.len(), nacked), (100, 0));
    wait_replicated(&net, 1, "grow.q", 2, 100).await;
    // Node 2 joins: the queue's leader makes it a member (within its 10 s look again).
    net.start(2).await;
    net.wait_ready(2, AGREE).await;
    for i in 0..3 {
        wait_replicated(&net, i, "grow.q", 3, 100).await;
    }
}
