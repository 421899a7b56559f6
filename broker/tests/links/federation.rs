//! Federation between Warren nodes in this process: each node has its own cluster name, as two
//! data centres would.

use std::time::Duration;

use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, ExchangeKind};
use reqwest::StatusCode;
use serde_json::json;
use warren_broker::Config;

use crate::common::TestBroker;
use crate::harness::*;

async fn node(cluster: &str) -> TestBroker {
    TestBroker::start_with(Config {
        cluster_name: cluster.to_owned(),
        node_name: format!("warren@{cluster}"),
        ..Config::default()
    })
    .await
}

async fn topic(ch: &Channel, name: &str) {
    ch.exchange_declare(
        name.into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
}

async fn bind(ch: &Channel, queue: &str, exchange: &str, key: &str) {
    ch.queue_bind(
        queue.into(),
        exchange.into(),
        key.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
}

async fn publish(ch: &Channel, exchange: &str, key: &str, body: &str) {
    ch.basic_publish(
        exchange.into(),
        key.into(),
        BasicPublishOptions::default(),
        body.as_bytes(),
        BasicProperties::default(),
    )
    .await
    .unwrap();
}

/// Federates exchanges (or queues) matching `pattern` on `down` from `up`.
async fn federate(
    api: &Api,
    upstream_name: &str,
    up: &TestBroker,
    pattern: &str,
    extra: serde_json::Value,
) {
    let mut value = json!({"uri": up.url(), "reconnect-delay": 0.2});
    if let (Some(v), Some(e)) = (value.as_object_mut(), extra.as_object()) {
        v.extend(e.clone());
    }
    let (s, v) = api
        .put_param("federation-upstream", "/", upstream_name, value)
        .await;
    assert!(s.is_success(), "{v}");
    api.put_policy(
        "/",
        &format!("fed-{upstream_name}"),
        json!({"pattern": pattern, "definition": {"federation-upstream-set": "all"}}),
    )
    .await;
}

async fn running(api: &Api, object: &str, links: usize) -> bool {
    wait_for(15, || async {
        let l = api.federation_links(object).await;
        l.len() == links && l.iter().all(|l| l["status"] == "running")
    })
    .await
}

/// The upstream bindings of a federated exchange: the routing keys bound to its internal
/// exchange on the upstream.
fn upstream_keys(up: &TestBroker, exchange: &str) -> Vec<String> {
    let x = up.broker.vhost("/").unwrap().exchange(exchange).unwrap();
    let mut keys: Vec<String> = x
        .bindings
        .read()
        .list()
        .iter()
        .filter(|b| b.destination.name().starts_with("federation: "))
        .map(|b| b.routing_key.clone())
        .collect();
    keys.sort();
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_federation_delivers_what_matches_downstream_bindings() {
    let down = node("dc-down").await;
    let up = node("dc-up").await;
    let api = Api::start(&down).await;
    let metrics = down.start_metrics().await;
    let (_cd, chd) = down.channel().await;
    let (_cu, chu) = up.channel().await;
    topic(&chd, "fx").await;
    declare(&chd, "local", false).await;
    bind(&chd, "local", "fx", "a.*").await;
    federate(&api, "up", &up, "^fx$", json!({"max-hops": 1})).await;
    assert!(
        running(&api, "fx", 1).await,
        "{:?}",
        api.federation_links("fx").await
    );
    let link = &api.federation_links("fx").await[0];
    assert_eq!(link["type"], "exchange");
    assert_eq!(link["upstream"], "up");
    assert_eq!(link["upstream_exchange"], "fx");
    assert_eq!(link["vhost"], "/");
    assert_eq!(link["node"], "warren@dc-down");
    assert_eq!(link["uri"], format!("amqp://{}/%2f", up.addr));
    assert!(link["local_connection"].as_str().unwrap().contains(" -> "));
    assert_eq!(link["id"].as_str().unwrap().len(), 8);
    // The upstream got the exchange, the queue and the binding, as RabbitMQ names them.
    let uv = up.broker.vhost("/").unwrap();
    assert!(
        uv.exchange("fx").is_some(),
        "the upstream exchange was declared like ours"
    );
    let q = uv
        .queue("federation: fx -> dc-down")
        .expect("the upstream queue");
    assert!(q.durable);
    assert!(uv.exchange("federation: fx -> dc-down A").is_some());
    assert_eq!(upstream_keys(&up, "fx"), ["a.*"]);
    for (key, body) in [
        ("a.1", "yes-1"),
        ("b.1", "no-1"),
        ("a.2", "yes-2"),
        ("a.b.c", "no-2"),
    ] {
        publish(&chu, "fx", key, body).await;
    }
    assert!(wait_for(10, || async { depth(&down, "/", "local") == 2 }).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = drain_deliveries(&chd, "local").await;
    let bodies: Vec<_> = got
        .iter()
        .map(|d| String::from_utf8_lossy(&d.data).into_owned())
        .collect();
    assert_eq!(
        bodies,
        ["yes-1", "yes-2"],
        "exactly what matches the downstream's bindings"
    );
    let h = got[0].properties.headers().as_ref().unwrap().inner();
    let Some(AMQPValue::FieldArray(rf)) = h.get("x-received-from") else {
        panic!("{h:?}")
    };
    let Some(AMQPValue::FieldTable(t)) = rf.as_slice().first() else {
        panic!()
    };
    assert!(
        matches!(t.inner().get("cluster-name"), Some(AMQPValue::LongString(s)) if s.to_string() == "dc-up")
    );
    assert!(
        matches!(t.inner().get("exchange"), Some(AMQPValue::LongString(s)) if s.to_string() == "fx")
    );
    // A new local binding propagates; a removed one is unbound upstream.
    bind(&chd, "local", "fx", "b.#").await;
    assert!(wait_for(10, || async { upstream_keys(&up, "fx") == ["a.*", "b.#"] }).await);
    chd.queue_unbind(
        "local".into(),
        "fx".into(),
        "a.*".into(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    assert!(
        wait_for(10, || async { upstream_keys(&up, "fx") == ["b.#"] }).await,
        "{:?}",
        upstream_keys(&up, "fx")
    );
    publish(&chu, "fx", "a.3", "now-no").await;
    publish(&chu, "fx", "b.x.y", "now-yes").await;
    assert!(wait_for(10, || async { depth(&down, "/", "local") == 1 }).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(drain(&chd, "local").await, ["now-yes"]);
    let text = reqwest::get(format!("{metrics}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let l = r#"vhost="/",upstream="up",type="exchange",name="fx""#;
    assert_eq!(
        sample(
            &text,
            &format!("warren_federation_link_state{{{l},state=\"running\"}}")
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            &format!("warren_federation_messages_forwarded_total{{{l}}}")
        ),
        Some(3.0)
    );
    assert_eq!(
        sample(&text, &format!("warren_federation_link_pending{{{l}}}")),
        Some(0.0)
    );
    // Removing the policy stops the link and removes what it declared upstream.
    assert_eq!(
        api.delete("/policies/%2F/fed-up").await,
        StatusCode::NO_CONTENT
    );
    assert!(wait_for(10, || async { api.federation_links("fx").await.is_empty() }).await);
    assert!(
        wait_for(10, || async {
            uv.queue("federation: fx -> dc-down").is_none()
        })
        .await
    );
    assert!(upstream_keys(&up, "fx").is_empty());
}

/// Publishes one message on `at`'s exchange and checks every node's local queue gets it exactly
/// once, also after a while.
async fn publish_once_everyone_gets_one(nodes: &[&TestBroker], at: usize, exchange: &str) {
    let (_c, ch) = nodes[at].channel().await;
    publish(&ch, exchange, "k", "once").await;
    for (i, n) in nodes.iter().enumerate() {
        assert!(
            wait_for(10, || async { depth(n, "/", "mine") == 1 }).await,
            "node {i}: {}",
            depth(n, "/", "mine")
        );
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for (i, n) in nodes.iter().enumerate() {
        assert_eq!(depth(n, "/", "mine"), 1, "node {i} got a copy that looped");
        let (_c, ch) = n.channel().await;
        drain(&ch, "mine").await;
    }
}

async fn ring_member(n: &TestBroker, exchange: &str) -> (lapin::Connection, Channel) {
    let (c, ch) = n.channel().await;
    topic(&ch, exchange).await;
    declare(&ch, "mine", false).await;
    bind(&ch, "mine", exchange, "#").await;
    (c, ch)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_site_ring_does_not_loop() {
    let a = node("dc-a").await;
    let b = node("dc-b").await;
    let (api_a, api_b) = (Api::start(&a).await, Api::start(&b).await);
    let _ma = ring_member(&a, "ring").await;
    let _mb = ring_member(&b, "ring").await;
    // max-hops well above the ring's size: the cluster names stop the loop.
    federate(&api_a, "b", &b, "^ring$", json!({"max-hops": 10})).await;
    federate(&api_b, "a", &a, "^ring$", json!({"max-hops": 10})).await;
    assert!(running(&api_a, "ring", 1).await && running(&api_b, "ring", 1).await);
    // Bindings stop where messages stop: each side's binding reaches the other and no further.
    assert!(
        wait_for(10, || async {
            upstream_keys(&a, "ring") == ["#"] && upstream_keys(&b, "ring") == ["#"]
        })
        .await
    );
    publish_once_everyone_gets_one(&[&a, &b], 0, "ring").await;
    publish_once_everyone_gets_one(&[&a, &b], 1, "ring").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_site_ring_does_not_loop() {
    let a = node("dc-1").await;
    let b = node("dc-2").await;
    let c = node("dc-3").await;
    let apis = [
        Api::start(&a).await,
        Api::start(&b).await,
        Api::start(&c).await,
    ];
    let _m: Vec<_> = futures_join([
        ring_member(&a, "ring3"),
        ring_member(&b, "ring3"),
        ring_member(&c, "ring3"),
    ])
    .await;
    // a ← c, b ← a, c ← b: one direction round the ring.
    federate(&apis[0], "from-c", &c, "^ring3$", json!({"max-hops": 5})).await;
    federate(&apis[1], "from-a", &a, "^ring3$", json!({"max-hops": 5})).await;
    federate(&apis[2], "from-b", &b, "^ring3$", json!({"max-hops": 5})).await;
    for api in &apis {
        assert!(running(api, "ring3", 1).await);
    }
    for at in 0..3 {
        publish_once_everyone_gets_one(&[&a, &b, &c], at, "ring3").await;
    }
}

async fn futures_join<F: std::future::Future>(fs: [F; 3]) -> Vec<F::Output> {
    let mut out = Vec::new();
    for f in fs {
        out.push(f.await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_hops_one_stops_after_one_hop() {
    // a ← b ← c with the default max-hops 1: a message published at c reaches b, not a.
    let a = node("hop-a").await;
    let b = node("hop-b").await;
    let c = node("hop-c").await;
    let (api_a, api_b) = (Api::start(&a).await, Api::start(&b).await);
    let _m: Vec<_> = futures_join([
        ring_member(&a, "chain"),
        ring_member(&b, "chain"),
        ring_member(&c, "chain"),
    ])
    .await;
    federate(&api_a, "b", &b, "^chain$", json!({})).await;
    federate(&api_b, "c", &c, "^chain$", json!({})).await;
    assert!(running(&api_a, "chain", 1).await && running(&api_b, "chain", 1).await);
    let (_cc, chc) = c.channel().await;
    publish(&chc, "chain", "k", "from-c").await;
    assert!(wait_for(10, || async { depth(&b, "/", "mine") == 1 }).await);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(depth(&a, "/", "mine"), 0, "two hops away with max-hops 1");
    let (_cb, chb) = b.channel().await;
    publish(&chb, "chain", "k", "from-b").await;
    assert!(wait_for(10, || async { depth(&a, "/", "mine") == 1 }).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_federation_moves_messages_only_when_the_local_queue_is_starved() {
    let down = node("q-down").await;
    let up = node("q-up").await;
    let api = Api::start(&down).await;
    let up_api = Api::start(&up).await;
    let (_cu, chu) = up.channel().await;
    declare(&chu, "fq", true).await;
    publish_n(&chu, "fq", "u", 100).await;
    let (_cd, chd) = down.channel().await;
    declare(&chd, "fq", true).await;
    federate(&api, "up", &up, "^fq$", json!({"prefetch-count": 10})).await;
    assert!(running(&api, "fq", 1).await);
    let link = &api.federation_links("fq").await[0];
    assert_eq!(link["type"], "queue");
    assert_eq!(link["upstream_queue"], "fq");
    assert_eq!(link["consumer_tag"], "federation-link-up");
    // No local consumer: nothing moves.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(depth(&up, "/", "fq"), 100);
    assert_eq!(depth(&down, "/", "fq"), 0);
    // Local ready messages and a consumer that is not taking them: still starved? No — it has
    // ready messages, so nothing moves either.
    publish_n(&chd, "fq", "d", 3).await;
    let (_cc, chc) = down.channel().await;
    chc.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    let mut slow = chc
        .basic_consume(
            "fq".into(),
            "slow".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    use futures_lite::StreamExt;
    let first = slow.next().await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        depth(&up, "/", "fq"),
        100,
        "the local queue still has ready messages"
    );
    // The upstream consumer has priority -1.
    let consumers = up_api.get("/consumers").await;
    assert!(
        consumers.as_array().unwrap().is_empty(),
        "not consuming upstream: {consumers}"
    );
    // Consume everything: once the local queue runs dry, the link fetches from upstream.
    first.acker.ack(BasicAckOptions::default()).await.unwrap();
    let mut got = Vec::new();
    let mut seen = None;
    while got.len() < 102 {
        let d = tokio::time::timeout(Duration::from_secs(10), slow.next())
            .await
            .expect("the federation link keeps the consumer fed")
            .unwrap()
            .unwrap();
        got.push(String::from_utf8_lossy(&d.data).into_owned());
        if seen.is_none() {
            // The link consumes and cancels as the local queue runs dry and fills up.
            seen = up_api
                .get("/consumers")
                .await
                .as_array()
                .unwrap()
                .first()
                .cloned();
        }
        d.acker.ack(BasicAckOptions::default()).await.unwrap();
    }
    assert_eq!(got.iter().filter(|b| b.starts_with('u')).count(), 100);
    let c = seen.expect("the link's consumer was seen on the upstream");
    assert_eq!(c["consumer_tag"], "federation-link-up", "{c}");
    assert_eq!(c["arguments"]["x-priority"], -1, "{c}");
    assert!(wait_for(5, || async { depth(&up, "/", "fq") == 0 }).await);
    let h = {
        // Federated messages carry x-received-from with a visit count.
        publish_n(&chu, "fq", "late", 1).await;
        let d = tokio::time::timeout(Duration::from_secs(10), slow.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        d.properties.headers().clone().unwrap()
    };
    let Some(AMQPValue::FieldArray(rf)) = h.inner().get("x-received-from") else {
        panic!("{h:?}")
    };
    let Some(AMQPValue::FieldTable(t)) = rf.as_slice().first() else {
        panic!()
    };
    assert!(
        matches!(
            t.inner().get("visit-count"),
            Some(AMQPValue::LongLongInt(1))
        ),
        "{t:?}"
    );
    assert!(h.inner().contains_key("x-original-routing-key"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_sets_single_upstreams_and_errors() {
    let down = node("s-down").await;
    let up = node("s-up").await;
    let api = Api::start(&down).await;
    let (_cd, chd) = down.channel().await;
    topic(&chd, "sx").await;
    topic(&chd, "single").await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!(
            "amqp://guest:guest@127.0.0.1:{}/%2f",
            l.local_addr().unwrap().port()
        )
    };
    for (name, uri) in [("live", up.url()), ("dead", dead.clone())] {
        let (s, v) = api
            .put_param(
                "federation-upstream",
                "/",
                name,
                json!({"uri": uri, "reconnect-delay": 0.2}),
            )
            .await;
        assert!(s.is_success(), "{v}");
    }
    let (s, v) = api
        .put_param(
            "federation-upstream-set",
            "/",
            "both",
            json!([{"upstream": "live", "exchange": "renamed"}, {"upstream": "dead"}]),
        )
        .await;
    assert!(s.is_success(), "{v}");
    api.put_policy("/", "set", json!({"pattern": "^sx$", "apply-to": "exchanges", "definition": {"federation-upstream-set": "both"}}))
        .await;
    api.put_policy(
        "/",
        "one",
        json!({"pattern": "^single$", "definition": {"federation-upstream": "live"}}),
    )
    .await;
    assert!(
        wait_for(15, || async {
            let l = api.federation_links("sx").await;
            l.len() == 2
                && l.iter().any(|x| {
                    x["upstream"] == "live"
                        && x["status"] == "running"
                        && x["upstream_exchange"] == "renamed"
                })
                && l.iter()
                    .any(|x| x["upstream"] == "dead" && x["status"] == "error")
        })
        .await,
        "{:?}",
        api.federation_links("sx").await
    );
    let dead_link = api
        .federation_links("sx")
        .await
        .into_iter()
        .find(|x| x["upstream"] == "dead")
        .unwrap();
    assert!(
        dead_link["error"]
            .as_str()
            .unwrap()
            .contains("econnrefused"),
        "{dead_link}"
    );
    assert!(
        up.broker.vhost("/").unwrap().exchange("renamed").is_some(),
        "the set entry's exchange"
    );
    assert!(running(&api, "single", 1).await);
    // Deleting the upstream stops its links.
    assert_eq!(
        api.delete("/parameters/federation-upstream/%2F/dead").await,
        StatusCode::NO_CONTENT
    );
    assert!(wait_for(10, || async { api.federation_links("sx").await.len() == 1 }).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_id_is_kept_only_for_trusted_upstreams() {
    let down = node("u-down").await;
    let up = node("u-up").await;
    let api = Api::start(&down).await;
    let (_cd, chd) = down.channel().await;
    let (_cu, chu) = up.channel().await;
    for x in ["trusted", "untrusted"] {
        topic(&chd, x).await;
        declare(&chd, &format!("{x}-q"), false).await;
        bind(&chd, &format!("{x}-q"), x, "#").await;
    }
    for (name, trust, x) in [("t", true, "trusted"), ("u", false, "untrusted")] {
        let (s, v) = api
            .put_param(
                "federation-upstream",
                "/",
                name,
                json!({"uri": up.url(), "trust-user-id": trust, "ack-mode": "on-publish", "reconnect-delay": 0.2}),
            )
            .await;
        assert!(s.is_success(), "{v}");
        api.put_policy(
            "/",
            &format!("p-{name}"),
            json!({"pattern": format!("^{x}$"), "definition": {"federation-upstream": name}}),
        )
        .await;
    }
    assert!(running(&api, "trusted", 1).await && running(&api, "untrusted", 1).await);
    for x in ["trusted", "untrusted"] {
        chu.basic_publish(
            x.into(),
            "k".into(),
            BasicPublishOptions::default(),
            b"signed",
            BasicProperties::default().with_user_id("guest".into()),
        )
        .await
        .unwrap();
    }
    assert!(
        wait_for(10, || async {
            depth(&down, "/", "trusted-q") == 1 && depth(&down, "/", "untrusted-q") == 1
        })
        .await
    );
    let t = drain_deliveries(&chd, "trusted-q").await;
    let u = drain_deliveries(&chd, "untrusted-q").await;
    assert_eq!(
        t[0].properties.user_id().as_ref().map(|s| s.as_str()),
        Some("guest")
    );
    assert_eq!(
        u[0].properties.user_id(),
        &None,
        "dropped unless the upstream is trusted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_upstream_restarts_the_link_and_keeps_the_upstream_queue() {
    let down = node("r-down").await;
    let up = node("r-up").await;
    let api = Api::start(&down).await;
    let (_cd, chd) = down.channel().await;
    topic(&chd, "rx").await;
    declare(&chd, "rq", false).await;
    bind(&chd, "rq", "rx", "#").await;
    federate(&api, "up", &up, "^rx$", json!({})).await;
    assert!(running(&api, "rx", 1).await);
    let uv = up.broker.vhost("/").unwrap();
    let before = uv.queue("federation: rx -> r-down").unwrap();
    let first = api.federation_links("rx").await[0]["timestamp"].clone();
    let (s, _) = api
        .put_param(
            "federation-upstream",
            "/",
            "up",
            json!({"uri": up.url(), "reconnect-delay": 0.2, "prefetch-count": 50}),
        )
        .await;
    assert!(s.is_success());
    // A new link (new status), same upstream queue: nothing it held is dropped.
    assert!(
        wait_for(10, || async {
            let l = api.federation_links("rx").await;
            l.len() == 1
                && l[0]["status"] == "running"
                && (l[0]["timestamp"] != first || l[0]["forwarded"] == 0)
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = uv.queue("federation: rx -> r-down").unwrap();
    assert!(
        std::sync::Arc::ptr_eq(&before, &after),
        "the upstream queue was kept"
    );
    let (_cu, chu) = up.channel().await;
    publish(&chu, "rx", "k", "after").await;
    assert!(wait_for(10, || async { depth(&down, "/", "rq") == 1 }).await);
}
