#![allow(clippy::unwrap_used)]
//! The management HTTP API, driven over HTTP against a real broker: authentication and tags,
//! every resource group, validation failures, closing a connection, publish/get, and a
//! definitions export → import round trip.
mod common;

use std::time::Duration;

use common::api::Api;
use common::{TestBroker, raw, unique};
use lapin::options::*;
use lapin::types::FieldTable;
use reqwest::StatusCode;
use serde_json::{Value, json};

/// The 400 body's reason, after checking the shape `{"error": "bad_request", "reason"}`.
fn bad_request(r: (StatusCode, Value)) -> String {
    assert_eq!(r.0, StatusCode::BAD_REQUEST, "{:?}", r.1);
    assert_eq!(r.1["error"], "bad_request", "{:?}", r.1);
    r.1["reason"].as_str().unwrap().to_owned()
}

fn names(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_and_tags() {
    let b = TestBroker::start().await;
    let api = Api::start(&b).await;

    // No credentials / bad password: 401 not_authorized with a Basic challenge.
    let resp = reqwest::get(format!("{}/api/overview", api.base))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert!(
        resp.headers()
            .get("www-authenticate")
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("Basic")
    );
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        body,
        json!({"error": "not_authorized", "reason": "Login failed"})
    );
    let (s, body) = api.as_user("guest", "wrong").get("/overview").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(body["reason"], "Login failed");

    for (user, tags) in [
        ("notag", ""),
        ("mgmt", "management"),
        ("mon", "monitoring"),
        ("pol", "policymaker"),
    ] {
        let (s, _) = api
            .put(
                &format!("/users/{user}"),
                json!({"password": "pw", "tags": tags}),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED);
    }
    let (s, body) = api.as_user("notag", "pw").get("/overview").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(
        body,
        json!({"error": "not_authorised", "reason": "Not management user"})
    );

    let mgmt = api.as_user("mgmt", "pw");
    assert_eq!(mgmt.get("/overview").await.0, StatusCode::OK);
    let (s, body) = mgmt.get("/users").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(body["reason"], "Not administrator user");
    assert_eq!(mgmt.get("/nodes").await.1["reason"], "Not monitor user");
    // No permissions on "/": the vhost is invisible in lists and refused directly.
    assert_eq!(mgmt.get("/queues").await.1, json!([]));
    assert_eq!(mgmt.get("/vhosts").await.1, json!([]));
    let (s, body) = mgmt.get("/queues/%2F").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(body["reason"], "User not authorised to access virtual host");
    let (s, _) = mgmt.put("/queues/%2F/mq", json!({})).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    // With permissions, a management user declares within the vhost, limited by them.
    api.put(
        "/permissions/%2F/mgmt",
        json!({"configure": "^mine-", "write": ".*", "read": ".*"}),
    )
    .await;
    assert_eq!(
        mgmt.put("/queues/%2F/mine-q", json!({})).await.0,
        StatusCode::CREATED
    );
    let (s, body) = mgmt.put("/queues/%2F/other-q", json!({})).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{body}");
    assert!(
        body["reason"]
            .as_str()
            .unwrap()
            .contains("configure access"),
        "{body}"
    );
    // Policies: readable, but only a policymaker may change them.
    assert_eq!(mgmt.get("/policies/%2F").await.0, StatusCode::OK);
    let policy = json!({"pattern": "^x", "definition": {"max-length": 1}});
    let (s, body) = mgmt.put("/policies/%2F/p", policy.clone()).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(body["reason"], "User not authorised to access object");
    let pol = api.as_user("pol", "pw");
    assert_eq!(
        pol.put("/policies/%2F/p", policy.clone()).await.0,
        StatusCode::UNAUTHORIZED
    );
    api.put(
        "/permissions/%2F/pol",
        json!({"configure": ".*", "write": ".*", "read": ".*"}),
    )
    .await;
    assert_eq!(
        pol.put("/policies/%2F/p", policy.clone()).await.0,
        StatusCode::CREATED
    );
    assert_eq!(
        pol.put("/policies/%2F/p", policy).await.0,
        StatusCode::NO_CONTENT
    );

    // Monitoring users read node-wide state.
    let mon = api.as_user("mon", "pw");
    let (s, nodes) = mon.get("/nodes").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(nodes[0]["running"], true);
    assert!(nodes[0]["mem_used"].as_u64().unwrap() > 0);
    assert_eq!(mon.get("/vhosts").await.1.as_array().unwrap().len(), 1);
    assert_eq!(mon.get("/users").await.0, StatusCode::UNAUTHORIZED);

    let (s, me) = mgmt.get("/whoami").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(me, json!({"name": "mgmt", "tags": ["management"]}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overview_nodes_and_health_checks() {
    let b = TestBroker::start().await;
    let api = Api::start(&b).await;
    let (s, o) = api.get("/overview").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(o["product_name"], "Warren");
    assert_eq!(o["object_totals"]["exchanges"], 6);
    assert_eq!(o["queue_totals"]["messages"], 0);
    let amqp_port = b.addr.port();
    assert!(
        o["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["protocol"] == "amqp" && l["port"] == amqp_port)
    );
    let (s, n) = api.get("/nodes").await;
    assert_eq!(s, StatusCode::OK);
    let name = n[0]["name"].as_str().unwrap().to_owned();
    assert_eq!(api.get(&format!("/nodes/{name}")).await.0, StatusCode::OK);
    assert_eq!(
        api.get("/nodes/nope@nowhere").await.0,
        StatusCode::NOT_FOUND
    );

    for check in [
        "alarms",
        "local-alarms",
        "virtual-hosts",
        "node-is-quorum-critical",
    ] {
        let (s, body) = api.get(&format!("/health/checks/{check}")).await;
        assert_eq!(s, StatusCode::OK, "{check}");
        assert_eq!(body["status"], "ok");
    }
    let (s, body) = api
        .get(&format!("/health/checks/port-listener/{amqp_port}"))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body, json!({"status": "ok", "port": amqp_port}));
    let (s, body) = api.get("/health/checks/port-listener/1").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["status"], "failed");
    assert_eq!(
        bad_request(api.get("/health/checks/port-listener/x").await),
        "Invalid port"
    );

    b.broker.set_alarm("memory");
    let (s, body) = api.get("/health/checks/alarms").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["alarms"][0]["resource"], "memory");
    assert_eq!(api.get("/nodes").await.1[0]["mem_alarm"], true);
    b.broker.clear_alarm("memory");
    assert_eq!(api.get("/health/checks/alarms").await.0, StatusCode::OK);

    // Unknown paths and methods.
    let (s, body) = api.get("/nope").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(
        body,
        json!({"error": "Object Not Found", "reason": "Not Found"})
    );
    assert_eq!(
        api.post("/overview", json!({})).await.0,
        StatusCode::METHOD_NOT_ALLOWED
    );
    assert_eq!(api.get("/federation-links").await.1, json!([]));
    assert_eq!(api.get("/shovels").await.1, json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_node_and_cluster_names() {
    // Defaults: both names are warren@$HOSTNAME, as before the settings existed.
    let b = TestBroker::start().await;
    let api = Api::start(&b).await;
    let (_, o) = api.get("/overview").await;
    let default = warren_broker::config::default_node_name();
    assert_eq!(o["cluster_name"], default.as_str());
    assert_eq!(o["node"], default.as_str());
    assert_eq!(api.get("/cluster-name").await.1, json!({"name": default}));

    let b = TestBroker::start_with(warren_broker::Config {
        node_name: "warren@warren-0.warren-nodes.ns".into(),
        cluster_name: "orders".into(),
        ..Default::default()
    })
    .await;
    let api = Api::start(&b).await;
    let (s, o) = api.get("/overview").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(o["cluster_name"], "orders");
    assert_eq!(o["node"], "warren@warren-0.warren-nodes.ns");
    assert!(
        o["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["node"] == "warren@warren-0.warren-nodes.ns")
    );
    let (s, body) = api.get("/cluster-name").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body, json!({"name": "orders"}));
    let (_, n) = api.get("/nodes").await;
    assert_eq!(n[0]["name"], "warren@warren-0.warren-nodes.ns");
    assert_eq!(
        api.get("/nodes/warren@warren-0.warren-nodes.ns").await.0,
        StatusCode::OK
    );
    let (_, v) = api.get("/vhosts/%2F").await;
    assert_eq!(
        v["cluster_state"],
        json!({"warren@warren-0.warren-nodes.ns": "running"})
    );
    // Anyone may read the name; nobody changes it through the API.
    api.put("/users/m", json!({"password": "pw", "tags": "management"}))
        .await;
    assert_eq!(
        api.as_user("m", "pw").get("/cluster-name").await.0,
        StatusCode::OK
    );
    assert_eq!(
        api.put("/cluster-name", json!({"name": "x"})).await.0,
        StatusCode::METHOD_NOT_ALLOWED
    );

    // Clients see the cluster name in the server properties.
    let mut sock = tokio::net::TcpStream::connect(b.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut sock, b"AMQP\x00\x00\x09\x01")
        .await
        .unwrap();
    let mut buf = bytes::BytesMut::new();
    match raw::read_method(&mut sock, &mut buf).await {
        amq_protocol::protocol::AMQPClass::Connection(
            amq_protocol::protocol::connection::AMQPMethod::Start(start),
        ) => assert_eq!(
            start.server_properties.inner().get("cluster_name"),
            Some(&lapin::types::AMQPValue::LongString("orders".into()))
        ),
        other => panic!("expected connection.start, got {other:?}"),
    }

    // Prometheus identity labels.
    let metrics = b.start_metrics().await;
    let text = reqwest::get(format!("{metrics}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let identity = text
        .lines()
        .find(|l| l.starts_with("rabbitmq_identity_info{"))
        .unwrap();
    assert!(
        identity.contains("rabbitmq_node=\"warren@warren-0.warren-nodes.ns\"")
            && identity.contains("rabbitmq_cluster=\"orders\""),
        "{identity}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vhosts_users_and_permissions() {
    let b = TestBroker::start().await;
    let api = Api::start(&b).await;

    assert_eq!(
        api.put("/vhosts/v1", json!({"description": "first", "tags": "a,b"}))
            .await
            .0,
        StatusCode::CREATED
    );
    assert_eq!(
        api.put("/vhosts/v1", json!({})).await.0,
        StatusCode::NO_CONTENT
    );
    let (_, v) = api.get("/vhosts/v1").await;
    assert_eq!(v["description"], "first");
    assert_eq!(v["tags"], json!(["a", "b"]));
    assert_eq!(names(&api.get("/vhosts").await.1), vec!["/", "v1"]);
    assert_eq!(api.get("/vhosts/nope").await.0, StatusCode::NOT_FOUND);
    // The default queue type, in RabbitMQ 3.11's spelling or 3.10's.
    assert_eq!(
        api.put("/vhosts/v1", json!({"defaultqueuetype": "quorum"}))
            .await
            .0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        api.get("/vhosts/v1").await.1["default_queue_type"],
        "quorum"
    );
    assert_eq!(
        api.put("/vhosts/v1", json!({"default_queue_type": "classic"}))
            .await
            .0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        api.get("/vhosts/v1").await.1["default_queue_type"],
        "classic"
    );
    assert_eq!(
        bad_request(
            api.put("/vhosts/v1", json!({"defaultqueuetype": "stream"}))
                .await
        ),
        "field 'defaultqueuetype' must be classic or quorum, got \"stream\""
    );

    // Users: password or password_hash, tags as a string or a list.
    assert_eq!(
        api.put(
            "/users/alice",
            json!({"password": "pw", "tags": ["management"]})
        )
        .await
        .0,
        StatusCode::CREATED
    );
    let (_, alice) = api.get("/users/alice").await;
    assert_eq!(alice["tags"], json!(["management"]));
    assert_eq!(alice["hashing_algorithm"], "rabbit_password_hashing_sha256");
    let hash = alice["password_hash"].as_str().unwrap().to_owned();
    assert_eq!(
        api.put(
            "/users/bob",
            json!({"password_hash": hash, "tags": "administrator"})
        )
        .await
        .0,
        StatusCode::CREATED
    );
    // bob has alice's password now.
    assert_eq!(
        api.as_user("bob", "pw").get("/users").await.0,
        StatusCode::OK
    );
    assert!(
        bad_request(
            api.put("/users/c", json!({"password_hash": "nope", "tags": ""}))
                .await
        )
        .contains("password_hash")
    );
    assert!(
        bad_request(
            api.put("/users/c", json!({"password": 5, "tags": ""}))
                .await
        )
        .contains("'password'")
    );
    assert!(
        bad_request(
            api.put("/users/c", json!({"password": "x", "tags": 5}))
                .await
        )
        .contains("'tags'")
    );
    assert!(
        bad_request(
            api.put(
                "/users/c",
                json!({"password": "x", "hashing_algorithm": "rabbit_password_hashing_md5"})
            )
            .await
        )
        .contains("hashing_algorithm")
    );

    // Permissions.
    let perm = json!({"configure": ".*", "write": "^w", "read": ".*"});
    assert_eq!(
        api.put("/permissions/v1/alice", perm.clone()).await.0,
        StatusCode::CREATED
    );
    assert_eq!(
        api.put("/permissions/v1/alice", perm).await.0,
        StatusCode::NO_CONTENT
    );
    let (_, p) = api.get("/permissions/v1/alice").await;
    assert_eq!(
        p,
        json!({"user": "alice", "vhost": "v1", "configure": ".*", "write": "^w", "read": ".*"})
    );
    assert_eq!(
        api.get("/users/alice/permissions")
            .await
            .1
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        api.get("/vhosts/v1/permissions")
            .await
            .1
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(api.get("/permissions").await.1.as_array().unwrap().len(), 2);
    assert!(
        bad_request(
            api.put(
                "/permissions/v1/alice",
                json!({"configure": ".*", "write": ".*"})
            )
            .await
        )
        .contains("'read'")
    );
    assert!(
        bad_request(
            api.put(
                "/permissions/v1/alice",
                json!({"configure": "(", "write": ".*", "read": ".*"})
            )
            .await
        )
        .contains("regex")
    );
    assert_eq!(
        bad_request(
            api.put(
                "/permissions/v1/nobody",
                json!({"configure": ".*", "write": ".*", "read": ".*"})
            )
            .await
        ),
        "vhost_or_user_not_found"
    );
    assert_eq!(
        bad_request(
            api.put(
                "/permissions/nope/alice",
                json!({"configure": ".*", "write": ".*", "read": ".*"})
            )
            .await
        ),
        "vhost_or_user_not_found"
    );
    // alice (management) now sees v1 only.
    assert_eq!(
        names(&api.as_user("alice", "pw").get("/vhosts").await.1),
        vec!["v1"]
    );

    // Topic permissions.
    let tp = json!({"exchange": "amq.topic", "write": "^a", "read": ".*"});
    assert_eq!(
        api.put("/topic-permissions/v1/alice", tp).await.0,
        StatusCode::CREATED
    );
    let (_, list) = api.get("/topic-permissions/v1/alice").await;
    assert_eq!(
        list,
        json!([{"user": "alice", "vhost": "v1", "exchange": "amq.topic", "write": "^a", "read": ".*"}])
    );
    assert_eq!(
        api.get("/topic-permissions")
            .await
            .1
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        api.get("/users/alice/topic-permissions")
            .await
            .1
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert!(
        bad_request(
            api.put(
                "/topic-permissions/v1/alice",
                json!({"write": ".*", "read": ".*"})
            )
            .await
        )
        .contains("'exchange'")
    );
    assert_eq!(
        api.delete("/topic-permissions/v1/alice").await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        api.delete("/topic-permissions/v1/alice").await.0,
        StatusCode::NOT_FOUND
    );

    assert_eq!(
        api.delete("/permissions/v1/alice").await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        api.get("/permissions/v1/alice").await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(api.delete("/users/alice").await.0, StatusCode::NO_CONTENT);
    assert_eq!(api.delete("/users/alice").await.0, StatusCode::NOT_FOUND);
    assert_eq!(api.delete("/vhosts/v1").await.0, StatusCode::NO_CONTENT);
    assert_eq!(api.delete("/vhosts/v1").await.0, StatusCode::NOT_FOUND);
    assert!(b.broker.vhost("v1").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_exchanges_bindings_publish_get() {
    let b = TestBroker::start().await;
    let api = Api::start(&b).await;
    let q = unique("mq");

    // Declare, redeclare, inequivalent, bad bodies.
    let path = format!("/queues/%2F/{q}");
    assert_eq!(
        api.put(
            &path,
            json!({"durable": true, "arguments": {"x-max-length": 10}})
        )
        .await
        .0,
        StatusCode::CREATED
    );
    assert_eq!(
        api.put(
            &path,
            json!({"durable": true, "arguments": {"x-max-length": 10}})
        )
        .await
        .0,
        StatusCode::NO_CONTENT
    );
    assert!(
        bad_request(api.put(&path, json!({"durable": false})).await)
            .contains("inequivalent arg 'durable'")
    );
    assert!(
        bad_request(
            api.put("/queues/%2F/other", json!({"durable": "yes"}))
                .await
        )
        .contains("'durable'")
    );
    assert!(
        bad_request(
            api.put(
                "/queues/%2F/other",
                json!({"arguments": {"x-max-length": "abc"}})
            )
            .await
        )
        .contains("x-max-length")
    );
    assert!(
        bad_request(api.put("/queues/%2F/other", json!({"arguments": []})).await)
            .contains("'arguments'")
    );
    let resp = api
        .http
        .put(format!("{}/api/queues/%2F/other", api.base))
        .basic_auth("guest", Some("guest"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"error": "bad_request", "reason": "not_json"})
    );
    assert_eq!(
        api.put("/queues/%2F/amq.nope", json!({})).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        api.put("/queues/nope/q", json!({})).await.0,
        StatusCode::NOT_FOUND
    );

    let (_, info) = api.get(&path).await;
    assert_eq!(info["durable"], true);
    assert_eq!(info["arguments"], json!({"x-max-length": 10}));
    assert_eq!(info["type"], "classic");
    assert!(names(&api.get("/queues").await.1).contains(&q));
    assert!(names(&api.get("/queues/%2F").await.1).contains(&q));

    // Exchanges.
    let x = unique("mx");
    let xpath = format!("/exchanges/%2F/{x}");
    assert_eq!(
        api.put(&xpath, json!({"type": "topic"})).await.0,
        StatusCode::CREATED
    );
    assert_eq!(
        api.put(&xpath, json!({"type": "topic"})).await.0,
        StatusCode::NO_CONTENT
    );
    assert!(
        bad_request(api.put(&xpath, json!({"type": "direct"})).await)
            .contains("inequivalent arg 'type'")
    );
    assert!(
        bad_request(
            api.put("/exchanges/%2F/x2", json!({"type": "nosuch"}))
                .await
        )
        .contains("nosuch")
    );
    assert_eq!(
        api.put("/exchanges/%2F/amq.mine", json!({"type": "direct"}))
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(api.get(&xpath).await.1["type"], "topic");
    assert_eq!(api.get("/exchanges/%2F/amq.default").await.1["name"], "");
    assert_eq!(
        api.get("/exchanges/%2F").await.1.as_array().unwrap().len(),
        7
    );

    // Bindings: create → 201 + Location, list, show by properties key, delete.
    let resp = api
        .http
        .post(format!("{}/api/bindings/%2F/e/{x}/q/{q}", api.base))
        .basic_auth("guest", Some("guest"))
        .json(&json!({"routing_key": "a.*", "arguments": {"k": "v"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let location = resp.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.starts_with(&format!("{q}/a.%2A~")), "{location}");
    assert_eq!(
        api.post(
            &format!("/bindings/%2F/e/{x}/q/{q}"),
            json!({"routing_key": "b"})
        )
        .await
        .0,
        StatusCode::CREATED
    );
    let (s, body) = api
        .post(&format!("/bindings/%2F/e/{x}/q/nosuch"), json!({}))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(
        api.post(&format!("/bindings/%2F/e/amq.fanout/e/{x}"), json!({}))
            .await
            .0,
        StatusCode::CREATED
    );
    let (_, list) = api.get(&format!("/bindings/%2F/e/{x}/q/{q}")).await;
    let list = list.as_array().unwrap().clone();
    assert_eq!(list.len(), 2);
    let with_args = list.iter().find(|b| b["routing_key"] == "a.*").unwrap();
    assert_eq!(with_args["arguments"], json!({"k": "v"}));
    let key = with_args["properties_key"].as_str().unwrap();
    assert_eq!(
        api.get(&format!("/bindings/%2F/e/{x}/q/{q}/b")).await.1["routing_key"],
        "b"
    );
    assert_eq!(
        api.get(&format!("/bindings/%2F/e/amq.fanout/e/{x}/~"))
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        api.get(&format!("/exchanges/%2F/{x}/bindings/source"))
            .await
            .1
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        api.get(&format!("/exchanges/%2F/{x}/bindings/destination"))
            .await
            .1
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // The queue's bindings include the default exchange's.
    assert_eq!(
        api.get(&format!("{path}/bindings"))
            .await
            .1
            .as_array()
            .unwrap()
            .len(),
        3
    );
    assert!(api.get("/bindings").await.1.as_array().unwrap().len() >= 4);

    // Publish through the topic exchange and the default exchange.
    let publish = |rk: &str, payload: &str, enc: &str| json!({"properties": {"delivery_mode": 2, "headers": {"h": 1}}, "routing_key": rk, "payload": payload, "payload_encoding": enc});
    let (s, r) = api
        .post(
            &format!("{xpath}/publish"),
            publish("a.x", "hello", "string"),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(r, json!({"routed": true}));
    assert_eq!(
        api.post(&format!("{xpath}/publish"), publish("zzz", "x", "string"))
            .await
            .1,
        json!({"routed": false})
    );
    assert_eq!(
        api.post(
            "/exchanges/%2F/amq.default/publish",
            publish(&q, "/w==", "base64")
        )
        .await
        .1,
        json!({"routed": true})
    );
    assert!(
        bad_request(
            api.post(&format!("{xpath}/publish"), publish("a", "%%%", "base64"))
                .await
        )
        .contains("base64")
    );
    assert!(
        bad_request(
            api.post(
                &format!("{xpath}/publish"),
                json!({"routing_key": "a", "payload": "x", "payload_encoding": "string"})
            )
            .await
        )
        .contains("'properties'")
    );
    assert!(bad_request(api.post(&format!("{xpath}/publish"), json!({"properties": {"delivery_mode": "x"}, "routing_key": "a", "payload": "x", "payload_encoding": "string"})).await).contains("delivery_mode"));
    assert!(
        bad_request(
            api.post("/exchanges/%2F/nosuch/publish", publish("a", "x", "string"))
                .await
        )
        .contains("no exchange")
    );
    assert_eq!(api.get(&path).await.1["messages"], 2);

    // Get: requeue keeps them (redelivered next time), then ack removes them.
    let get = |ackmode: &str, encoding: &str| json!({"count": 5, "ackmode": ackmode, "encoding": encoding, "truncate": 50000});
    let (s, msgs) = api
        .post(&format!("{path}/get"), get("ack_requeue_true", "auto"))
        .await;
    assert_eq!(s, StatusCode::OK);
    let msgs = msgs.as_array().unwrap().clone();
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[0]["payload"], "hello");
    assert_eq!(msgs[0]["payload_encoding"], "string");
    assert_eq!(msgs[0]["exchange"], x.as_str());
    assert_eq!(msgs[0]["routing_key"], "a.x");
    assert_eq!(msgs[0]["message_count"], 1);
    assert_eq!(
        msgs[0]["properties"],
        json!({"delivery_mode": 2, "headers": {"h": 1}})
    );
    assert_eq!(msgs[0]["redelivered"], false);
    // Not UTF-8: base64 even in auto mode.
    assert_eq!(msgs[1]["payload"], "/w==");
    assert_eq!(msgs[1]["payload_encoding"], "base64");
    let (_, msgs) = api
        .post(&format!("{path}/get"), json!({"count": "1", "ackmode": "ack_requeue_false", "encoding": "base64", "truncate": 2}))
        .await;
    assert_eq!(msgs[0]["redelivered"], true);
    assert_eq!(msgs[0]["payload"], "aGU=");
    assert_eq!(msgs[0]["payload_bytes"], 5);
    assert_eq!(api.get(&path).await.1["messages"], 1);
    assert!(
        bad_request(api.post(&format!("{path}/get"), get("bogus", "auto")).await)
            .contains("ackmode")
    );
    assert_eq!(
        bad_request(
            api.post(&format!("{path}/get"), get("ack_requeue_true", "zzz"))
                .await
        ),
        "Unsupported encoding. Please use auto or base64."
    );
    assert!(
        bad_request(
            api.post(
                &format!("{path}/get"),
                json!({"ackmode": "ack_requeue_true", "encoding": "auto"})
            )
            .await
        )
        .contains("'count'")
    );

    // Purge, unbind, delete.
    assert_eq!(
        api.delete(&format!("{path}/contents")).await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(api.get(&path).await.1["messages"], 0);
    assert_eq!(
        api.delete("/queues/%2F/nosuch/contents").await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        api.delete(&format!("/bindings/%2F/e/{x}/q/{q}/{}", urlencode(key)))
            .await
            .0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        api.delete(&format!("/bindings/%2F/e/{x}/q/{q}/{}", urlencode(key)))
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        api.get(&format!("/bindings/%2F/e/{x}/q/{q}"))
            .await
            .1
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(api.delete(&xpath).await.0, StatusCode::NO_CONTENT);
    assert_eq!(api.delete(&xpath).await.0, StatusCode::NOT_FOUND);
    assert_eq!(
        api.delete("/exchanges/%2F/amq.direct").await.0,
        StatusCode::UNAUTHORIZED
    );
    api.post(
        "/exchanges/%2F/amq.default/publish",
        publish(&q, "x", "string"),
    )
    .await;
    assert!(bad_request(api.delete(&format!("{path}?if-empty=true")).await).contains("not empty"));
    assert_eq!(api.delete(&path).await.0, StatusCode::NO_CONTENT);
    assert_eq!(api.get(&path).await.0, StatusCode::NOT_FOUND);
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_channels_consumers_and_forced_close() {
    let b = TestBroker::start().await;
    let api = Api::start(&b).await;
    let q = unique("cq");
    let (conn, ch) = b.channel().await;
    ch.queue_declare(
        q.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.basic_qos(7, BasicQosOptions::default()).await.unwrap();
    let _consumer = ch
        .basic_consume(
            q.as_str().into(),
            "ctag".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    let (_, conns) = api.get("/connections").await;
    let conns = conns.as_array().unwrap().clone();
    assert_eq!(conns.len(), 1);
    let c = &conns[0];
    assert_eq!(c["user"], "guest");
    assert_eq!(c["vhost"], "/");
    assert_eq!(c["protocol"], "AMQP 0-9-1");
    assert_eq!(c["channels"], 1);
    assert_eq!(c["auth_mechanism"], "PLAIN");
    assert!(c["client_properties"]["capabilities"].is_object(), "{c}");
    let name = c["name"].as_str().unwrap().to_owned();
    assert!(name.ends_with(&format!("-> {}", b.addr)), "{name}");
    let enc = urlencode(&name);
    assert_eq!(
        api.get(&format!("/connections/{enc}")).await.1["name"],
        name.as_str()
    );

    let (_, chans) = api.get("/channels").await;
    assert_eq!(chans[0]["name"], format!("{name} (1)"));
    assert_eq!(chans[0]["consumer_count"], 1);
    assert_eq!(chans[0]["connection_details"]["name"], name.as_str());
    assert_eq!(
        api.get(&format!("/connections/{enc}/channels"))
            .await
            .1
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        api.get("/vhosts/%2F/channels")
            .await
            .1
            .as_array()
            .unwrap()
            .len(),
        1
    );

    let (_, consumers) = api.get("/consumers").await;
    let cons = &consumers[0];
    assert_eq!(cons["consumer_tag"], "ctag");
    assert_eq!(cons["queue"], json!({"name": q, "vhost": "/"}));
    assert_eq!(cons["ack_required"], true);
    assert_eq!(cons["prefetch_count"], 7);
    assert_eq!(cons["channel_details"]["connection_name"], name.as_str());
    assert_eq!(
        api.get(&format!("/queues/%2F/{q}")).await.1["consumer_details"][0]["consumer_tag"],
        "ctag"
    );
    assert_eq!(
        api.get("/overview").await.1["object_totals"]["consumers"],
        1
    );

    // A user without monitoring sees only its own connections.
    api.put("/users/m", json!({"password": "pw", "tags": "management"}))
        .await;
    assert_eq!(
        api.as_user("m", "pw").get("/connections").await.1,
        json!([])
    );
    assert_eq!(
        api.as_user("m", "pw")
            .delete(&format!("/connections/{enc}"))
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );

    // Close it: lapin sees the connection end, the registry forgets it.
    assert_eq!(
        api.delete(&format!("/connections/{enc}")).await.0,
        StatusCode::NO_CONTENT
    );
    assert!(common::eventually(|| !conn.status().connected()).await);
    assert!(common::eventually(|| b.broker.connections.is_empty()).await);
    assert_eq!(api.get("/connections").await.1, json!([]));
    assert_eq!(
        api.delete(&format!("/connections/{enc}")).await.0,
        StatusCode::NOT_FOUND
    );

    // On the wire: connection.close 320 CONNECTION_FORCED with our reason.
    let mut s = tokio::net::TcpStream::connect(b.addr).await.unwrap();
    let mut buf = raw::handshake(&mut s).await;
    assert!(common::eventually(|| b.broker.connections.len() == 1).await);
    let name = b.broker.connections.list()[0].info.name.clone();
    let resp = api
        .http
        .delete(format!("{}/api/connections/{}", api.base, urlencode(&name)))
        .basic_auth("guest", Some("guest"))
        .header("X-Reason", "maintenance")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let code = tokio::time::timeout(
        Duration::from_secs(5),
        raw::expect_connection_close(&mut s, &mut buf),
    )
    .await
    .unwrap();
    assert_eq!(code, Some(320));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_and_parameters_are_validated_and_stored() {
    let b = TestBroker::start().await;
    let api = Api::start(&b).await;

    let p = json!({"pattern": "^lim-", "definition": {"max-length": 1}, "priority": 3, "apply-to": "queues"});
    assert_eq!(api.put("/policies/%2F/lim", p).await.0, StatusCode::CREATED);
    let (_, got) = api.get("/policies/%2F/lim").await;
    assert_eq!(
        got,
        json!({"vhost": "/", "name": "lim", "pattern": "^lim-", "apply-to": "queues", "definition": {"max-length": 1}, "priority": 3})
    );
    assert_eq!(api.get("/policies").await.1.as_array().unwrap().len(), 1);
    // Applied: the queue shows the policy.
    api.put("/queues/%2F/lim-q", json!({})).await;
    assert_eq!(api.get("/queues/%2F/lim-q").await.1["policy"], "lim");
    assert!(
        bad_request(
            api.put(
                "/policies/%2F/bad",
                json!({"definition": {"max-length": 1}})
            )
            .await
        )
        .contains("pattern")
    );
    assert!(
        bad_request(
            api.put(
                "/policies/%2F/bad",
                json!({"pattern": ".", "definition": {"bogus": 1}})
            )
            .await
        )
        .contains("bogus")
    );
    assert!(
        bad_request(
            api.put(
                "/policies/%2F/bad",
                json!({"pattern": ".", "definition": {"max-length": "a"}})
            )
            .await
        )
        .contains("max-length")
    );
    assert!(
        bad_request(
            api.put(
                "/policies/%2F/bad",
                json!({"pattern": ".", "definition": {"max-length": 1}, "apply-to": "foo"})
            )
            .await
        )
        .contains("apply-to")
    );
    assert!(
        bad_request(
            api.put(
                "/policies/%2F/bad",
                json!({"pattern": ".", "definition": {"max-length": 1}, "priority": "a"})
            )
            .await
        )
        .contains("priority")
    );
    assert_eq!(
        api.delete("/policies/%2F/lim").await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        api.delete("/policies/%2F/lim").await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        api.put("/policies/nope/x", json!({})).await.0,
        StatusCode::NOT_FOUND
    );

    let op = json!({"pattern": ".*", "definition": {"max-length": 100}, "apply-to": "queues"});
    assert_eq!(
        api.put("/operator-policies/%2F/cap", op).await.0,
        StatusCode::CREATED
    );
    assert_eq!(api.get("/operator-policies").await.1[0]["name"], "cap");
    assert!(
        bad_request(
            api.put(
                "/operator-policies/%2F/cap",
                json!({"pattern": ".*", "definition": {"ha-mode": "all"}})
            )
            .await
        )
        .contains("ha-mode")
    );
    assert_eq!(
        api.get("/queues/%2F/lim-q").await.1["operator_policy"],
        "cap"
    );
    assert_eq!(
        api.delete("/operator-policies/%2F/cap").await.0,
        StatusCode::NO_CONTENT
    );

    // Parameters.
    let up = json!({"value": {"uri": "amqp://upstream", "prefetch-count": 10, "ack-mode": "on-publish"}});
    assert_eq!(
        api.put("/parameters/federation-upstream/%2F/up1", up.clone())
            .await
            .0,
        StatusCode::CREATED
    );
    assert_eq!(
        api.put("/parameters/federation-upstream/%2F/up1", up)
            .await
            .0,
        StatusCode::NO_CONTENT
    );
    let (_, got) = api.get("/parameters/federation-upstream/%2F/up1").await;
    assert_eq!(got["component"], "federation-upstream");
    assert_eq!(got["value"]["prefetch-count"], 10);
    assert!(
        bad_request(
            api.put(
                "/parameters/federation-upstream/%2F/u2",
                json!({"value": {"uri": "amqp://x", "bogus": 1}})
            )
            .await
        )
        .contains("bogus")
    );
    assert!(
        bad_request(
            api.put(
                "/parameters/federation-upstream/%2F/u2",
                json!({"value": {"uri": "amqp://x", "prefetch-count": "a"}})
            )
            .await
        )
        .contains("prefetch-count")
    );
    assert!(
        bad_request(
            api.put(
                "/parameters/federation-upstream/%2F/u2",
                json!({"value": {"prefetch-count": 1}})
            )
            .await
        )
        .contains("uri")
    );
    assert!(
        bad_request(
            api.put(
                "/parameters/federation-upstream/%2F/u2",
                json!({"value": {"uri": "amqp://x", "ack-mode": "zz"}})
            )
            .await
        )
        .contains("ack-mode")
    );
    assert!(
        bad_request(
            api.put("/parameters/federation-upstream/%2F/u2", json!({}))
                .await
        )
        .contains("'value'")
    );
    assert_eq!(
        api.put(
            "/parameters/federation-upstream-set/%2F/set",
            json!({"value": [{"upstream": "up1"}]})
        )
        .await
        .0,
        StatusCode::CREATED
    );
    assert!(
        bad_request(
            api.put(
                "/parameters/federation-upstream-set/%2F/set2",
                json!({"value": [{"upstream": "up1", "x": 2}]})
            )
            .await
        )
        .contains("'x'")
    );
    let shovel = json!({"value": {"src-uri": "amqp://", "src-queue": "a", "dest-uri": "amqp://", "dest-queue": "b"}});
    assert_eq!(
        api.put("/parameters/shovel/%2F/sh", shovel).await.0,
        StatusCode::CREATED
    );
    assert!(bad_request(api.put("/parameters/shovel/%2F/sh2", json!({"value": {"src-uri": "amqp://", "src-queue": "a", "src-exchange": "x", "dest-uri": "amqp://"}})).await).contains("src-exchange"));
    assert!(bad_request(api.put("/parameters/shovel/%2F/sh2", json!({"value": {"src-uri": "amqp://", "src-queue": "a", "dest-uri": "amqp://", "src-prefetch-count": "x"}})).await).contains("src-prefetch-count"));
    assert!(
        bad_request(
            api.put("/parameters/nosuch/%2F/x", json!({"value": {}}))
                .await
        )
        .contains("nosuch")
    );
    assert_eq!(api.get("/parameters").await.1.as_array().unwrap().len(), 3);
    assert_eq!(
        api.get("/parameters/shovel")
            .await
            .1
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        api.get("/parameters/federation-upstream/%2F")
            .await
            .1
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        api.delete("/parameters/shovel/%2F/sh").await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        api.delete("/parameters/shovel/%2F/sh").await.0,
        StatusCode::NOT_FOUND
    );
    // A management user may not read parameters.
    api.put("/users/m", json!({"password": "pw", "tags": "management"}))
        .await;
    assert_eq!(
        api.as_user("m", "pw").get("/parameters").await.0,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn definitions_round_trip() {
    let src = TestBroker::start().await;
    let a = Api::start(&src).await;
    a.put("/vhosts/app", json!({"description": "the app"}))
        .await;
    a.put(
        "/users/svc",
        json!({"password": "pw", "tags": "management"}),
    )
    .await;
    a.put(
        "/permissions/app/svc",
        json!({"configure": "^svc", "write": ".*", "read": ".*"}),
    )
    .await;
    a.put(
        "/topic-permissions/app/svc",
        json!({"exchange": "amq.topic", "write": "^x", "read": ".*"}),
    )
    .await;
    a.put(
        "/queues/app/work",
        json!({"durable": true, "arguments": {"x-message-ttl": 5000}}),
    )
    .await;
    a.put(
        "/exchanges/app/events",
        json!({"type": "topic", "durable": true}),
    )
    .await;
    a.post(
        "/bindings/app/e/events/q/work",
        json!({"routing_key": "order.*", "arguments": {"a": "b"}}),
    )
    .await;
    a.post("/bindings/app/e/amq.fanout/e/events", json!({}))
        .await;
    a.put(
        "/policies/app/ttl",
        json!({"pattern": "^work$", "definition": {"max-length": 5}}),
    )
    .await;
    a.put(
        "/parameters/federation-upstream/app/up",
        json!({"value": {"uri": "amqp://h"}}),
    )
    .await;
    let (s, exported) = a.get("/definitions").await;
    assert_eq!(s, StatusCode::OK);
    for key in [
        "users",
        "vhosts",
        "permissions",
        "topic_permissions",
        "parameters",
        "policies",
        "queues",
        "exchanges",
        "bindings",
    ] {
        assert!(exported[key].is_array(), "{key}");
    }
    assert_eq!(
        exported["queues"].as_array().unwrap().len(),
        1,
        "{exported}"
    );
    assert_eq!(
        exported["exchanges"].as_array().unwrap().len(),
        1,
        "only non-predeclared exchanges"
    );
    assert_eq!(
        exported["bindings"].as_array().unwrap().len(),
        2,
        "no default-exchange bindings"
    );

    let dst = TestBroker::start().await;
    let d = Api::start(&dst).await;
    assert_eq!(
        d.post("/definitions", exported.clone()).await.0,
        StatusCode::NO_CONTENT
    );
    let (_, reexported) = d.get("/definitions").await;
    for key in [
        "users",
        "vhosts",
        "permissions",
        "topic_permissions",
        "parameters",
        "policies",
        "queues",
        "exchanges",
        "bindings",
    ] {
        assert_eq!(reexported[key], exported[key], "{key}");
    }
    // The imported user logs in with the original password (the hash came along).
    assert_eq!(
        d.as_user("svc", "pw").get("/vhosts").await.1[0]["name"],
        "app"
    );
    // Import is idempotent.
    assert_eq!(
        d.post("/definitions", exported).await.0,
        StatusCode::NO_CONTENT
    );

    // Per-vhost export has no vhost fields and no node-wide sections.
    let (_, vdefs) = d.get("/definitions/app").await;
    assert!(vdefs.get("users").is_none());
    assert!(vdefs["queues"][0].get("vhost").is_none());

    // Failures name the entry.
    assert!(
        bad_request(
            d.post(
                "/definitions",
                json!({"queues": [{"name": "q", "vhost": "nope"}]})
            )
            .await
        )
        .contains("no_such_vhost")
    );
    assert!(
        bad_request(
            d.post("/definitions", json!({"queues": [{"vhost": "/"}]}))
                .await
        )
        .contains("queues[0]")
    );
    assert!(bad_request(d.post("/definitions", json!({"policies": [{"vhost": "/", "name": "p", "pattern": ".", "definition": {"bogus": 1}}]})).await).contains("bogus"));
    assert_eq!(
        bad_request(d.post("/definitions", json!([1])).await),
        "failed_to_parse_json"
    );
    assert_eq!(
        d.as_user("svc", "pw").get("/definitions").await.0,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_message_stats_count_and_rate() {
    use lapin::options::*;
    let b = TestBroker::start().await;
    let api = Api::start(&b).await;
    let (_c, ch) = b.channel().await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    ch.queue_declare(
        "stats-q".into(),
        QueueDeclareOptions::default(),
        lapin::types::FieldTable::default(),
    )
    .await
    .unwrap();
    for _ in 0..5 {
        common::publish_confirmed(&ch, "", "stats-q", b"m", lapin::BasicProperties::default())
            .await;
    }
    for _ in 0..3 {
        let m = ch
            .basic_get("stats-q".into(), BasicGetOptions::default())
            .await
            .unwrap()
            .unwrap();
        m.delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    let m = ch
        .basic_get("stats-q".into(), BasicGetOptions::default())
        .await
        .unwrap()
        .unwrap();
    m.delivery
        .nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let again = ch
        .basic_get("stats-q".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .unwrap();
    assert!(again.delivery.redelivered);
    // Counts are immediate; rates appear after a sampling interval.
    let vh = b.broker.vhost("/").unwrap();
    let q = vh.queue("stats-q").unwrap();
    let t0 = std::time::Instant::now();
    q.stats.sample(t0);
    let (status, v) = api.get("/queues/%2F/stats-q").await;
    assert_eq!(status, StatusCode::OK);
    let s = &v["message_stats"];
    assert_eq!(s["publish"], 5);
    assert_eq!(s["deliver_get"], 5);
    assert_eq!(s["ack"], 3);
    assert_eq!(s["redeliver"], 1);
    assert_eq!(s["publish_details"]["rate"], 0.0);
    common::publish_confirmed(&ch, "", "stats-q", b"m", lapin::BasicProperties::default()).await;
    q.stats.sample(t0 + std::time::Duration::from_secs(1));
    let (_, v) = api.get("/queues/%2F/stats-q").await;
    assert_eq!(v["message_stats"]["publish_details"]["rate"], 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_closes_and_refuses_connections_until_ended() {
    let b = TestBroker::start().await;
    let api = Api::start(&b).await;
    let (s, n) = api.get("/nodes").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(n[0]["being_drained"], false);

    // A client with a consumer on one queue, and a durable queue holding messages.
    let conn = b.connect().await;
    let mut events = conn.events_listener();
    let ch = conn.create_channel().await.unwrap();
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare("left-behind".into(), durable, FieldTable::default())
        .await
        .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for _ in 0..3 {
        common::publish_confirmed(
            &ch,
            "",
            "left-behind",
            b"m",
            lapin::BasicProperties::default(),
        )
        .await;
    }
    ch.queue_declare(
        "consumed".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.basic_consume(
        "consumed".into(),
        "c".into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    // And one more client, speaking raw AMQP, to see the close on the wire.
    let mut raw_sock = tokio::net::TcpStream::connect(b.addr).await.unwrap();
    let mut raw_buf = raw::handshake(&mut raw_sock).await;
    assert!(common::eventually(|| b.broker.connections.len() == 2).await);

    // Only administrators drain.
    api.put(
        "/users/mon",
        json!({"password": "pw", "tags": "monitoring"}),
    )
    .await;
    let mon = api.as_user("mon", "pw");
    assert_eq!(
        mon.post("/warren/drain", json!({})).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(mon.get("/warren/drain").await.1["being_drained"], false);

    // The raw client answers the close as soon as it comes.
    let raw_close = tokio::spawn(async move {
        tokio::time::timeout(
            Duration::from_secs(5),
            raw::expect_connection_close(&mut raw_sock, &mut raw_buf),
        )
        .await
    });
    let started = std::time::Instant::now();
    let (s, report) = api.post("/warren/drain", json!({})).await;
    assert_eq!(s, StatusCode::OK, "{report}");
    // It answers once the clients are gone, not after its whole wait.
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(report["being_drained"], true);
    assert_eq!(report["node"], b.broker.node_name().as_str());
    assert_eq!(report["connections_closed"], 2);
    assert_eq!(report["connections_open"], 0, "{report}");
    assert_eq!(
        report["queues"],
        json!([
            {"vhost": "/", "name": "consumed", "durable": false, "messages": 0, "consumers": 0},
            {"vhost": "/", "name": "left-behind", "durable": true, "messages": 3, "consumers": 0},
        ])
    );
    // The clients heard 320 CONNECTION_FORCED with the reason.
    assert_eq!(raw_close.await.unwrap().unwrap(), Some(320));
    let error = tokio::time::timeout(Duration::from_secs(5), async {
        use futures_lite::StreamExt;
        loop {
            match events.next().await {
                Some(lapin::Event::Error(e)) => return e,
                Some(_) => continue,
                None => panic!("lapin's event stream ended without an error"),
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(common::code(&error), Some(320), "{error}");
    assert!(
        error
            .to_string()
            .contains("CONNECTION_FORCED - node is being drained"),
        "{error}"
    );
    assert!(!conn.status().connected());

    // New connections are refused with the same reply while draining.
    let refused = lapin::Connection::connect(&b.url(), lapin::ConnectionProperties::default())
        .await
        .expect_err("a drained node accepted a connection");
    assert_eq!(common::code(&refused), Some(320), "{refused}");
    assert!(
        refused.to_string().contains("node is being drained"),
        "{refused}"
    );
    assert!(b.broker.connections.is_empty());
    let (_, n) = api.get("/nodes").await;
    assert_eq!(n[0]["being_drained"], true);
    // Draining again is harmless.
    assert_eq!(api.post("/warren/drain", json!({})).await.0, StatusCode::OK);

    // DELETE ends it.
    assert_eq!(
        mon.delete("/warren/drain").await.0,
        StatusCode::UNAUTHORIZED
    );
    let (s, report) = api.delete("/warren/drain").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(report["being_drained"], false);
    assert_eq!(api.get("/nodes").await.1[0]["being_drained"], false);
    let again = b.connect().await;
    let ch = again.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            "left-behind".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(q.message_count(), 3);
}

/// A policymaker may not point a shovel or federation upstream at a vhost it has no access
/// to through a host-less URI (which logs in as the node's internal account), nor make the
/// node read local files through the TLS query keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_uris_reach_only_what_the_acting_user_may() {
    let b = TestBroker::start().await;
    let api = Api::start(&b).await;
    for v in ["a", "b"] {
        assert_eq!(
            api.put(&format!("/vhosts/{v}"), json!({})).await.0,
            StatusCode::CREATED
        );
    }
    let (s, _) = api
        .put(
            "/users/pm",
            json!({"password": "pw", "tags": "policymaker"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let all = json!({"configure": ".*", "write": ".*", "read": ".*"});
    assert_eq!(
        api.put("/permissions/a/pm", all).await.0,
        StatusCode::CREATED
    );
    // A message in vhost b that pm must not be able to reach.
    assert_eq!(
        api.put("/queues/b/secret", json!({})).await.0,
        StatusCode::CREATED
    );
    let (s, body) = api
        .post(
            "/exchanges/b/amq.default/publish",
            json!({"routing_key": "secret", "payload": "s3cret",
                   "payload_encoding": "string", "properties": {}}),
        )
        .await;
    assert_eq!((s, &body["routed"]), (StatusCode::OK, &json!(true)));
    let pm = api.as_user("pm", "pw");

    let shovel = |src: &str| {
        json!({"value": {"src-uri": src, "src-queue": "secret",
                         "dest-uri": "amqp:///a", "dest-queue": "loot"}})
    };
    // (what, path, body, the vhost the error must name, the key it must name)
    let refused = [
        (
            "shovel from amqp:///b",
            "/parameters/shovel/a/steal",
            shovel("amqp:///b"),
            "'b'",
            "src-uri",
        ),
        (
            "shovel from amqp:// (vhost /)",
            "/parameters/shovel/a/steal",
            shovel("amqp://"),
            "'/'",
            "src-uri",
        ),
        (
            "shovel into amqp:///b",
            "/parameters/shovel/a/plant",
            json!({"value": {"src-uri": "amqp:///a", "src-queue": "x",
                             "dest-uri": "amqp:///b", "dest-queue": "secret"}}),
            "'b'",
            "dest-uri",
        ),
        (
            "federation upstream amqp:///b",
            "/parameters/federation-upstream/a/up",
            json!({"value": {"uri": "amqp:///b"}}),
            "'b'",
            "uri",
        ),
        (
            "federation upstream list with amqp:///b",
            "/parameters/federation-upstream/a/up",
            json!({"value": {"uri": ["amqp:///a", "amqp://%2f@/b"]}}),
            "'b'",
            "uri",
        ),
    ];
    for (what, path, body, vhost, key) in refused {
        let reason = bad_request(pm.put(path, body).await);
        assert!(
            reason.contains(vhost) && reason.contains(key) && reason.contains("pm"),
            "{what}: {reason}"
        );
    }
    // Nothing was stored, no link runs, and the message is still where it was.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(api.get("/parameters").await.1, json!([]));
    assert_eq!(api.get("/shovels").await.1, json!([]));
    let secret = b.broker.vhost("b").unwrap().queue("secret").unwrap();
    assert_eq!(secret.message_count(), 1, "the secret message stayed in b");

    // Its own vhost, host-less or not, is fine.
    let up = json!({"value": {"uri": ["amqp:///a", "amqp://pm:pw@127.0.0.1:1/b"]}});
    assert_eq!(
        pm.put("/parameters/federation-upstream/a/own", up).await.0,
        StatusCode::CREATED
    );

    // Files on the node: only an administrator may name them.
    for (what, uri) in [
        ("cacertfile", "amqps://127.0.0.1:1/a?cacertfile=/etc/passwd"),
        (
            "certfile",
            "amqps://127.0.0.1:1/a?certfile=/etc/shadow&keyfile=/etc/shadow",
        ),
    ] {
        let reason = bad_request(
            pm.put(
                "/parameters/federation-upstream/a/files",
                json!({"value": {"uri": uri}}),
            )
            .await,
        );
        assert!(
            reason.contains(what) && reason.contains("administrator"),
            "{what}: {reason}"
        );
    }
    assert!(
        pm.get("/parameters/federation-upstream/a/files")
            .await
            .0
            .is_client_error()
    );
    let (s, _) = api
        .put(
            "/parameters/federation-upstream/a/files",
            json!({"value": {"uri": "amqps://127.0.0.1:1/a?cacertfile=/etc/ssl/certs/ca-certificates.crt"}}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "an administrator may");
}
