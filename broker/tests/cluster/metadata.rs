//! Definitions (vhosts, users, permissions, policies, parameters, limits) replicated through the
//! metadata group: a change on any node is committed by a majority and applied on every node;
//! a minority refuses changes with 503 and catches up after the partition heals; restarted,
//! wiped and forgotten nodes leave the group consistent.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{Net, SERIAL};

const AGREE: Duration = Duration::from_secs(30);
/// A committed change reaches every connected node within a few heartbeats (250 ms each).
const SPREAD: Duration = Duration::from_secs(10);

async fn ready_cluster(n: usize) -> Net {
    let mut net = Net::new(n);
    net.start_all().await;
    for i in 0..n {
        net.wait_ready(i, AGREE).await;
    }
    net
}

async fn put(net: &Net, i: usize, path: &str, body: Value) -> (u16, Value) {
    net.send(i, Method::PUT, path, Some(body))
        .await
        .unwrap_or_else(|e| panic!("PUT {path} on node {i}: {e}"))
}

async fn metadata(net: &Net, i: usize) -> Value {
    net.get(i, "/api/warren/metadata")
        .await
        .unwrap_or_else(|e| panic!("metadata of node {i}: {e}"))
}

#[tokio::test]
async fn a_change_on_any_node_is_applied_on_every_node() {
    let _serial = SERIAL.lock().await;
    let net = ready_cluster(3).await;
    let m = metadata(&net, 0).await;
    assert_eq!(m["voters"].as_array().map(Vec::len), Some(3), "{m}");
    assert_eq!(m["caught_up"], true, "{m}");

    // Each change goes to a different node; the node that took it reads it back at once.
    let (s, body) = put(&net, 1, "/api/vhosts/orders", json!({"description": "d1"})).await;
    assert_eq!(s, 201, "{body}");
    net.wait_status(1, "/api/vhosts/orders", 200, Duration::from_millis(1))
        .await;
    let (s, body) = put(
        &net,
        2,
        "/api/users/alice",
        json!({"password": "alice-pw", "tags": "management"}),
    )
    .await;
    assert_eq!(s, 201, "{body}");
    let (s, body) = put(
        &net,
        0,
        "/api/permissions/orders/alice",
        json!({"configure": ".*", "write": ".*", "read": ".*"}),
    )
    .await;
    assert_eq!(s, 201, "{body}");
    let (s, body) = put(
        &net,
        1,
        "/api/policies/orders/ttl",
        json!({"pattern": "^q", "definition": {"message-ttl": 60000}, "apply-to": "queues"}),
    )
    .await;
    assert_eq!(s, 201, "{body}");
    let (s, body) = put(
        &net,
        2,
        "/api/parameters/federation-upstream/orders/up",
        json!({"value": {"uri": "amqp://upstream.invalid"}}),
    )
    .await;
    assert_eq!(s, 201, "{body}");
    // Validation happens before the proposal: a bad policy is refused and proposes nothing.
    let (s, body) = put(
        &net,
        0,
        "/api/policies/orders/bad",
        json!({"pattern": "^q", "definition": {"message-ttl": "soon"}}),
    )
    .await;
    assert_eq!(s, 400, "{body}");

    for i in 0..3 {
        let v = net.wait_status(i, "/api/vhosts/orders", 200, SPREAD).await;
        assert_eq!(v["description"], "d1", "node {i}: {v}");
        net.wait_status(i, "/api/users/alice", 200, SPREAD).await;
        net.wait_status(i, "/api/permissions/orders/alice", 200, SPREAD)
            .await;
        net.wait_status(i, "/api/policies/orders/ttl", 200, SPREAD)
            .await;
        net.wait_status(
            i,
            "/api/parameters/federation-upstream/orders/up",
            200,
            SPREAD,
        )
        .await;
        net.wait_status(i, "/api/policies/orders/bad", 404, SPREAD)
            .await;
    }
    // The user and permission are live for AMQP on every node, not only listed.
    for i in 0..3 {
        let url = format!("amqp://alice:alice-pw@{}:5672/orders", net.nodes[i].ip);
        let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| panic!("alice cannot log in to node {i}: {e}"));
        let _ = conn.close(200, "bye".into()).await;
    }
    // Limits are definitions too: set on one node, refused on every node.
    let (s, body) = put(
        &net,
        2,
        "/api/vhost-limits/orders/max-connections",
        json!({"value": 0}),
    )
    .await;
    assert_eq!(s, 204, "{body}");
    for i in 0..3 {
        let start = std::time::Instant::now();
        loop {
            let v = net
                .get(i, "/api/vhost-limits/orders")
                .await
                .expect("limits");
            if v == json!([{"vhost": "orders", "value": {"max-connections": 0}}]) {
                break;
            }
            assert!(start.elapsed() < SPREAD, "node {i} still has {v}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let url = format!("amqp://alice:alice-pw@{}:5672/orders", net.nodes[i].ip);
        let refused = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
            .await
            .err()
            .unwrap_or_else(|| panic!("node {i} let alice in over the vhost's limit"));
        assert!(
            refused
                .to_string()
                .contains("connection limit (0) is reached"),
            "node {i}: {refused}"
        );
    }

    // Updates and deletes replicate too; a second PUT of the same object is an update.
    let (s, _) = put(&net, 0, "/api/vhosts/orders", json!({"description": "d2"})).await;
    assert_eq!(s, 204);
    let (s, _) = net
        .send(1, Method::DELETE, "/api/users/alice", None)
        .await
        .expect("DELETE user");
    assert_eq!(s, 204);
    let (s, _) = net
        .send(2, Method::DELETE, "/api/users/alice", None)
        .await
        .expect("DELETE user again");
    assert_eq!(s, 404, "a second delete finds nothing, on any node");
    for i in 0..3 {
        net.wait_status(i, "/api/users/alice", 404, SPREAD).await;
        let start = std::time::Instant::now();
        loop {
            let v = net.get(i, "/api/vhosts/orders").await.expect("vhost");
            if v["description"] == "d2" {
                break;
            }
            assert!(start.elapsed() < SPREAD, "node {i} still has {v}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test]
async fn a_minority_refuses_changes_and_catches_up_after_the_partition_heals() {
    let _serial = SERIAL.lock().await;
    let net = ready_cluster(3).await;
    // A queue living on node 0, declared while the cluster is whole.
    let url = format!("amqp://admin:s3cret-admin@{}:5672/%2f", net.nodes[0].ip);
    let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
        .await
        .expect("connect to node 0");
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_declare(
        "still-here".into(),
        lapin::options::QueueDeclareOptions::default(),
        lapin::types::FieldTable::default(),
    )
    .await
    .expect("queue declared while the cluster is whole");
    let _ = conn.close(200, "bye".into()).await;
    net.partition(&[&[0], &[1, 2]]);
    net.wait_nodes(0, &[(0, true), (1, false), (2, false)], AGREE)
        .await;
    net.wait_nodes(1, &[(0, false), (1, true), (2, true)], AGREE)
        .await;

    // The minority answers at once, naming the lost quorum; nothing is applied anywhere.
    let (s, body) = put(&net, 0, "/api/vhosts/lonely", json!({})).await;
    assert_eq!(s, 503, "{body}");
    let reason = body["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("metadata quorum lost"), "{body}");
    assert!(
        reason.contains(&net.nodes[1].name),
        "names the unreachable nodes: {body}"
    );
    // A new queue is a metadata change: refused with 541 naming the lost quorum.
    net.wait_status(0, "/api/vhosts/%2f", 200, SPREAD).await;
    let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
        .await
        .expect("the minority node still serves AMQP");
    let ch = conn.create_channel().await.expect("channel");
    let refused = ch
        .queue_declare(
            "new-on-minority".into(),
            lapin::options::QueueDeclareOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .expect_err("a new queue needs the quorum");
    let text = refused.to_string();
    assert!(
        text.contains("541") || text.contains("INTERNAL_ERROR") || text.contains("internal"),
        "{text}"
    );
    assert!(text.contains("quorum"), "{text}");
    // It still serves the queue it hosts: publish and get.
    let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
        .await
        .expect("the minority node still serves AMQP");
    let ch = conn.create_channel().await.expect("channel");
    ch.basic_publish(
        "".into(),
        "still-here".into(),
        lapin::options::BasicPublishOptions::default(),
        b"kept",
        lapin::BasicProperties::default(),
    )
    .await
    .expect("publish on the minority");
    let got = loop {
        let got = ch
            .basic_get(
                "still-here".into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .expect("basic.get on the minority");
        if let Some(m) = got {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(got.delivery.data, b"kept");
    let _ = conn.close(200, "bye".into()).await;

    // The majority goes on (once it has a leader: the old one may be the cut-off node, and
    // an election on a busy machine can take a few seconds); a node in it is quorum-critical
    // now (2 of 3 voters up).
    let mut answer = (0, json!(null));
    for _ in 0..60 {
        answer = put(&net, 1, "/api/vhosts/majority", json!({})).await;
        if answer.0 != 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (s, body) = answer;
    assert!(s == 201 || s == 204, "{s} {body}");
    let (s, body) = net
        .send(
            2,
            Method::GET,
            "/api/health/checks/node-is-quorum-critical",
            None,
        )
        .await
        .expect("quorum-critical");
    assert_eq!(s, 503, "{body}");

    net.heal();
    net.wait_status(0, "/api/vhosts/majority", 200, AGREE).await;
    for i in 0..3 {
        net.wait_status(i, "/api/vhosts/lonely", 404, SPREAD).await;
    }
    // And it takes changes again, once its failure detector sees the others (until then it
    // still answers 503 naming them).
    net.wait_nodes(0, &[(0, true), (1, true), (2, true)], AGREE)
        .await;
    let (s, body) = put(&net, 0, "/api/vhosts/healed", json!({})).await;
    assert_eq!(s, 201, "{body}");
    for i in 0..3 {
        net.wait_status(i, "/api/vhosts/healed", 200, SPREAD).await;
    }
}

#[tokio::test]
async fn restarted_and_wiped_nodes_catch_up_and_a_forgotten_node_leaves_the_group() {
    let _serial = SERIAL.lock().await;
    let mut net = ready_cluster(3).await;

    // Down while the others change things: more than a snapshot's worth (the harness snapshots
    // every 20 entries), so the log it missed is partly truncated.
    net.kill(2);
    net.wait_nodes(0, &[(0, true), (1, true), (2, false)], AGREE)
        .await;
    for k in 0..30 {
        let (s, body) = put(&net, k % 2, &format!("/api/vhosts/v{k}"), json!({})).await;
        assert_eq!(s, 201, "{body}");
    }
    net.start(2).await;
    net.wait_ready(2, AGREE).await;
    for k in 0..30 {
        net.wait_status(2, &format!("/api/vhosts/v{k}"), 200, SPREAD)
            .await;
    }

    // Wiped: it comes back as a new member (a new incarnation), replaces its old self in the
    // group, and receives the definitions as a snapshot.
    net.stop(2);
    net.wipe(2);
    net.start(2).await;
    net.wait_ready(2, AGREE).await;
    net.wait_status(2, "/api/vhosts/v29", 200, SPREAD).await;
    // The new member joins first, then its old self is removed (a second membership change,
    // which on a busy machine can trail the first by a moment).
    let mut m = metadata(&net, 0).await;
    let start = std::time::Instant::now();
    while m["voters"].as_array().map(Vec::len) != Some(3) && start.elapsed() < AGREE {
        tokio::time::sleep(Duration::from_millis(200)).await;
        m = metadata(&net, 0).await;
    }
    assert_eq!(m["voters"].as_array().map(Vec::len), Some(3), "{m}");

    // Forgotten: out of the group, so two voters remain and both are needed.
    let gone = net.nodes[2].name.clone();
    net.kill(2);
    net.wait_nodes(0, &[(0, true), (1, true), (2, false)], AGREE)
        .await;
    let out = net.forget_cli(0, &gone);
    assert!(out.status.success(), "{out:?}");
    let m = metadata(&net, 1).await;
    let voters: Vec<&str> = m["voters"]
        .as_array()
        .expect("voters")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(voters.len(), 2, "{m}");
    assert!(!voters.contains(&gone.as_str()), "{m}");
    let (s, body) = put(&net, 1, "/api/vhosts/after-forget", json!({})).await;
    assert_eq!(s, 201, "{body}");
    net.wait_status(0, "/api/vhosts/after-forget", 200, SPREAD)
        .await;
}
