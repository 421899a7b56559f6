//! Policy, Federation and Shovel resources configure a real broker through its management
//! API: a Warren process reached through a RabbitCluster, and Debian's RabbitMQ reached
//! through a connection Secret. The operator runs against the real control plane.

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;
use warren_e2e::topology::{
    LONG, Mgmt, cluster_for, create, delete, patch, secret, status_of, wait_ready,
};
use warren_e2e::{Broker, Operator, TestPki, client, ensure_crds, namespace, wait_for};
use warren_operator::crd::{Federation, Policy, RabbitCluster, Shovel};

async fn reconciles(op: &Operator, controller: &str) -> u64 {
    let text = reqwest::get(format!("{}/metrics", op.metrics_url))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let prefix = format!("warren_operator_reconciliations_total{{controller=\"{controller}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_policy_reaches_a_tls_only_cluster_over_https_trusting_its_ca() {
    let client = client().await;
    ensure_crds(&client).await;
    let ns = namespace(&client, "https").await;
    let _op = Operator::start_with(&ns, &["--topology-resync-seconds", "2"]);
    // The broker serves its management API over HTTPS only, with a certificate from a CA
    // only the cluster's TLS Secret knows.
    let pki = TestPki::new("topology");
    let broker = Broker::start_https_only(&pki).await;
    assert!(broker.management_url.starts_with("https://"));
    let mgmt = Mgmt::of(&broker);
    secret(
        &client,
        &ns,
        "site-user",
        json!({"username": "guest", "password": "guest"}),
    )
    .await;
    let tls = json!({"tls.crt": pki.cert_pem, "tls.key": pki.key_pem, "ca.crt": pki.ca_pem});
    secret(&client, &ns, "site-tls", tls.clone()).await;
    create::<RabbitCluster>(
        &client,
        &ns,
        json!({
            "apiVersion": "warren.dev/v1alpha1", "kind": "RabbitCluster",
            "metadata": {"name": "site", "namespace": ns,
                         "annotations": {"warren.dev/management-uri": broker.management_url}},
            "spec": {"replicas": 1, "persistence": {"storage": "0"},
                     "defaultUser": {"secretName": "site-user"},
                     "tls": {"secretName": "site-tls", "disableNonTLSListeners": true}},
        }),
    )
    .await;
    create::<Policy>(
        &client,
        &ns,
        json!({
            "apiVersion": "warren.dev/v1alpha1", "kind": "Policy",
            "metadata": {"name": "limits", "namespace": ns},
            "spec": {"pattern": "^orders\\.", "applyTo": "queues", "priority": 2,
                     "definition": {"max-length": 10},
                     "rabbitClusterReference": {"name": "site"}},
        }),
    )
    .await;
    let path = "/api/policies/%2F/limits";
    let p = mgmt.wait("the policy on the broker", path, |_| true).await;
    assert_eq!(p["definition"], json!({"max-length": 10}));
    wait_ready::<Policy>(&client, &ns, "limits", "True").await;
    // The default user's Secret points at HTTPS too.
    let user = Api::<Secret>::namespaced(client.clone(), &ns)
        .get("site-default-user")
        .await
        .expect("default user secret");
    let uri = user
        .data
        .as_ref()
        .and_then(|d| d.get("management-uri"))
        .map(|v| String::from_utf8_lossy(&v.0).into_owned())
        .unwrap_or_default();
    assert_eq!(uri, format!("https://site.{ns}.svc:15671"));

    // Without ca.crt the operator has nothing to trust the certificate with: a change
    // cannot be applied, and the condition says why.
    // (`stringData` is write-only: a merge patch on `data` removes the key.)
    Api::<Secret>::namespaced(client.clone(), &ns)
        .patch(
            "site-tls",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"ca.crt": null}})),
        )
        .await
        .expect("remove ca.crt");
    patch::<Policy>(
        &client,
        &ns,
        "limits",
        json!({"spec": {"definition": {"max-length": 20}}}),
    )
    .await
    .expect("patch");
    let (reason, message) = wait_ready::<Policy>(&client, &ns, "limits", "False").await;
    assert_eq!(reason, "BrokerUnreachable", "{message}");
    assert!(message.contains("https://127.0.0.1"), "{message}");
    assert!(message.contains("UnknownIssuer"), "{message}");
    assert_eq!(
        mgmt.get(path).await.expect("policy")["definition"],
        json!({"max-length": 10})
    );
    // With the CA back, the change goes through.
    secret(&client, &ns, "site-tls", tls).await;
    mgmt.wait("the changed policy", path, |p| {
        p["definition"] == json!({"max-length": 20})
    })
    .await;
    wait_ready::<Policy>(&client, &ns, "limits", "True").await;
    let _ = std::fs::remove_dir_all(&pki.dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn policies_reach_warren_follow_changes_and_come_back_after_drift() {
    let client = client().await;
    ensure_crds(&client).await;
    let ns = namespace(&client, "policy").await;
    let op = Operator::start_with(&ns, &["--topology-resync-seconds", "2"]);
    let mut broker = Broker::start().await;
    let mgmt = Mgmt::of(&broker);
    cluster_for(&client, &ns, "site", &broker).await;

    create::<Policy>(
        &client,
        &ns,
        json!({
            "apiVersion": "warren.dev/v1alpha1", "kind": "Policy",
            "metadata": {"name": "limits", "namespace": ns},
            "spec": {"pattern": "^orders\\.", "applyTo": "queues", "priority": 2,
                     "definition": {"max-length": 10, "overflow": "reject-publish"},
                     "rabbitClusterReference": {"name": "site"}},
        }),
    )
    .await;
    let path = "/api/policies/%2F/limits";
    let p = mgmt.wait("the policy on the broker", path, |_| true).await;
    assert_eq!(p["pattern"], "^orders\\.");
    assert_eq!(p["apply-to"], "queues");
    assert_eq!(p["priority"], 2);
    assert_eq!(
        p["definition"],
        json!({"max-length": 10, "overflow": "reject-publish"})
    );
    wait_ready::<Policy>(&client, &ns, "limits", "True").await;

    // It reports what it applies to.
    mgmt.put("/api/queues/%2F/orders.eu", json!({"durable": true}))
        .await;
    wait_for("status.appliesTo", LONG, || {
        let client = client.clone();
        let ns = ns.clone();
        async move {
            let st = status_of::<Policy>(&client, &ns, "limits").await;
            st["appliesTo"]
                .as_array()?
                .iter()
                .any(|v| v == "queue orders.eu")
                .then_some(())
        }
    })
    .await;
    assert_eq!(
        status_of::<Policy>(&client, &ns, "limits").await["observedGeneration"],
        1
    );

    // A change to the spec reaches the broker.
    patch::<Policy>(
        &client,
        &ns,
        "limits",
        json!({"spec": {"definition": {"max-length": 20}}}),
    )
    .await
    .expect("patch");
    mgmt.wait("max-length 20", path, |p| {
        p["definition"]["max-length"] == 20
    })
    .await;

    // Drift: deleted or changed directly on the broker, it comes back.
    mgmt.delete(path).await;
    mgmt.wait(
        "the policy restored after deletion on the broker",
        path,
        |_| true,
    )
    .await;
    mgmt.put(
        path,
        json!({"pattern": ".*", "definition": {"max-length": 1}}),
    )
    .await;
    mgmt.wait(
        "the policy restored after a change on the broker",
        path,
        |p| p["pattern"] == "^orders\\.",
    )
    .await;

    // name and vhost are immutable.
    let err = patch::<Policy>(&client, &ns, "limits", json!({"spec": {"name": "other"}}))
        .await
        .expect_err("immutable");
    assert!(err.to_string().contains("name cannot be changed"), "{err}");

    // The broker refuses: Ready=False with the broker's own text.
    create::<Policy>(
        &client,
        &ns,
        json!({
            "apiVersion": "warren.dev/v1alpha1", "kind": "Policy",
            "metadata": {"name": "novhost", "namespace": ns},
            "spec": {"vhost": "missing", "pattern": ".", "definition": {"expires": 1000},
                     "rabbitClusterReference": {"name": "site"}},
        }),
    )
    .await;
    let (reason, message) = wait_ready::<Policy>(&client, &ns, "novhost", "False").await;
    assert_eq!(reason, "BrokerRefused", "{message}");
    assert!(message.contains("missing"), "{message}");
    delete::<Policy>(&client, &ns, "novhost").await;

    // The broker goes away: Ready=False, retried with backoff, not in a hot loop.
    broker.kill();
    let (reason, message) = wait_ready::<Policy>(&client, &ns, "limits", "False").await;
    assert_eq!(reason, "BrokerUnreachable", "{message}");
    let before = reconciles(&op, "policy").await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let during = reconciles(&op, "policy").await - before;
    assert!(
        during <= 6,
        "{during} reconciles in 10 s against a dead broker: a hot loop"
    );
    broker.restart().await;
    wait_ready::<Policy>(&client, &ns, "limits", "True").await;
    mgmt.wait("the policy back on the restarted broker", path, |_| true)
        .await;

    // Cluster missing or scaled to zero.
    create::<Policy>(&client, &ns, json!({
        "apiVersion": "warren.dev/v1alpha1", "kind": "Policy",
        "metadata": {"name": "orphan", "namespace": ns},
        "spec": {"pattern": ".", "definition": {"expires": 1000}, "rabbitClusterReference": {"name": "nope"}},
    }))
    .await;
    let (reason, message) = wait_ready::<Policy>(&client, &ns, "orphan", "False").await;
    assert_eq!(reason, "ClusterNotFound");
    assert!(message.contains("nope"), "{message}");
    delete::<Policy>(&client, &ns, "orphan").await;
    patch::<RabbitCluster>(&client, &ns, "site", json!({"spec": {"replicas": 0}}))
        .await
        .expect("scale to zero");
    let (reason, _) = wait_ready::<Policy>(&client, &ns, "limits", "False").await;
    assert_eq!(reason, "ClusterScaledToZero");
    patch::<RabbitCluster>(&client, &ns, "site", json!({"spec": {"replicas": 1}}))
        .await
        .expect("scale up");
    wait_ready::<Policy>(&client, &ns, "limits", "True").await;

    // Deleting the resource deletes the policy from the broker.
    delete::<Policy>(&client, &ns, "limits").await;
    mgmt.wait_gone("the policy removed from the broker", path)
        .await;

    // The queue-type-specific targets (RabbitMQ 3.12+ accepts them too).
    for (name, apply_to) in [
        ("streams", "streams"),
        ("quorum", "quorum_queues"),
        ("classic", "classic_queues"),
    ] {
        create::<Policy>(
            &client,
            &ns,
            json!({
                "apiVersion": "warren.dev/v1alpha1", "kind": "Policy",
                "metadata": {"name": name, "namespace": ns},
                "spec": {"pattern": "^x\\.", "applyTo": apply_to, "definition": {"max-length": 5},
                         "rabbitClusterReference": {"name": "site"}},
            }),
        )
        .await;
        let path = format!("/api/policies/%2F/{name}");
        mgmt.wait(&format!("policy applying to {apply_to}"), &path, |p| {
            p["apply-to"] == apply_to
        })
        .await;
        wait_ready::<Policy>(&client, &ns, name, "True").await;
        delete::<Policy>(&client, &ns, name).await;
        mgmt.wait_gone("the policy removed", &path).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn federation_and_shovel_reach_warren_and_follow_their_secrets() {
    let client = client().await;
    ensure_crds(&client).await;
    let ns = namespace(&client, "links").await;
    // A long resync: only the Secret watch can explain a fast re-apply.
    let _op = Operator::start_with(&ns, &["--topology-resync-seconds", "600"]);
    let broker = Broker::start().await;
    let mgmt = Mgmt::of(&broker);
    cluster_for(&client, &ns, "site", &broker).await;

    secret(
        &client,
        &ns,
        "upstream",
        json!({"uri": "amqp://user:pw@dc2.example:5672"}),
    )
    .await;
    create::<Federation>(&client, &ns, json!({
        "apiVersion": "warren.dev/v1alpha1", "kind": "Federation",
        "metadata": {"name": "dc2", "namespace": ns},
        "spec": {"uriSecret": {"name": "upstream"}, "prefetchCount": 100, "ackMode": "on-confirm",
                 "maxHops": 2, "expires": 60000, "rabbitClusterReference": {"name": "site"},
                 "deletionPolicy": "retain"},
    }))
    .await;
    let path = "/api/parameters/federation-upstream/%2F/dc2";
    let p = mgmt
        .wait("the upstream on the broker", path, |_| true)
        .await;
    assert_eq!(p["value"]["uri"], "amqp://user:pw@dc2.example:5672");
    assert_eq!(p["value"]["prefetch-count"], 100);
    assert_eq!(p["value"]["ack-mode"], "on-confirm");
    assert_eq!(p["value"]["max-hops"], 2);
    wait_ready::<Federation>(&client, &ns, "dc2", "True").await;

    // Rotating the Secret re-applies within seconds.
    secret(
        &client,
        &ns,
        "upstream",
        json!({"uri": "amqps://user:new@dc2.example:5671,amqps://user:new@dc3.example:5671"}),
    )
    .await;
    mgmt.wait("the rotated URIs", path, |p| {
        p["value"]["uri"]
            == json!([
                "amqps://user:new@dc2.example:5671",
                "amqps://user:new@dc3.example:5671"
            ])
    })
    .await;

    secret(
        &client,
        &ns,
        "shovel-uris",
        json!({"srcUri": "amqp://", "destUri": "amqp://"}),
    )
    .await;
    create::<Shovel>(&client, &ns, json!({
        "apiVersion": "warren.dev/v1alpha1", "kind": "Shovel",
        "metadata": {"name": "move", "namespace": ns},
        "spec": {"uriSecret": {"name": "shovel-uris"}, "srcQueue": "old", "destExchange": "amq.topic",
                 "destExchangeKey": "moved", "srcPrefetchCount": 50, "ackMode": "on-confirm",
                 "srcQueueArgs": {"x-queue-type": "quorum"},
                 "destAddForwardHeaders": true, "rabbitClusterReference": {"name": "site"}},
    }))
    .await;
    let spath = "/api/parameters/shovel/%2F/move";
    let s = mgmt.wait("the shovel on the broker", spath, |_| true).await;
    assert_eq!(s["value"]["src-queue"], "old");
    assert_eq!(
        s["value"]["src-queue-args"],
        json!({"x-queue-type": "quorum"})
    );
    assert_eq!(s["value"]["dest-exchange"], "amq.topic");
    assert_eq!(s["value"]["dest-exchange-key"], "moved");
    assert_eq!(s["value"]["src-uri"], "amqp://");
    assert_eq!(s["value"]["ack-mode"], "on-confirm");
    wait_ready::<Shovel>(&client, &ns, "move", "True").await;

    // An invalid combination is refused by the API server.
    let bad: Result<Shovel, _> = serde_json::from_value(json!({
        "apiVersion": "warren.dev/v1alpha1", "kind": "Shovel",
        "metadata": {"name": "bad", "namespace": ns},
        "spec": {"uriSecret": {"name": "shovel-uris"}, "srcQueue": "a", "srcExchange": "x",
                 "destQueue": "b", "rabbitClusterReference": {"name": "site"}},
    }));
    let err = Api::<Shovel>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &bad.expect("shovel"))
        .await
        .expect_err("two sources");
    assert!(err.to_string().contains("exactly one source"), "{err}");

    // deletionPolicy: delete removes the shovel; retain keeps the upstream.
    delete::<Shovel>(&client, &ns, "move").await;
    mgmt.wait_gone("the shovel removed", spath).await;
    delete::<Federation>(&client, &ns, "dc2").await;
    assert!(
        mgmt.get(path).await.is_some(),
        "retain keeps the upstream on the broker"
    );
}

/// Publishes `n` messages to queue `q` through the default exchange.
async fn publish(mgmt: &Mgmt, q: &str, n: usize) {
    for i in 0..n {
        let r = mgmt
            .post(
                "/api/exchanges/%2F/amq.default/publish",
                json!({"properties": {}, "routing_key": q, "payload": format!("m{i}"),
                       "payload_encoding": "string"}),
            )
            .await;
        assert_eq!(r["routed"], true, "{r}");
    }
}

async fn wait_messages(mgmt: &Mgmt, q: &str, n: u64) {
    mgmt.wait(
        &format!("{n} messages in {q}"),
        &format!("/api/queues/%2F/{q}"),
        |v| v["messages"] == n,
    )
    .await;
}

/// A shovel with `srcDeleteAfter` moves what its source held, deletes itself, and stays
/// finished: resyncs do not create it again (it would move the messages published since),
/// a change of the spec does.
#[tokio::test(flavor = "multi_thread")]
async fn a_finished_shovel_stays_finished() {
    let client = client().await;
    ensure_crds(&client).await;
    let ns = namespace(&client, "shovel-once").await;
    let op = Operator::start_with(&ns, &["--topology-resync-seconds", "2"]);
    let broker = Broker::start().await;
    let mgmt = Mgmt::of(&broker);
    cluster_for(&client, &ns, "site", &broker).await;
    for q in ["once-src", "once-dst"] {
        mgmt.put(&format!("/api/queues/%2F/{q}"), json!({"durable": true}))
            .await;
    }
    publish(&mgmt, "once-src", 3).await;
    secret(
        &client,
        &ns,
        "shovel-uris",
        json!({"srcUri": "amqp://", "destUri": "amqp://"}),
    )
    .await;
    create::<Shovel>(
        &client,
        &ns,
        json!({
            "apiVersion": "warren.dev/v1alpha1", "kind": "Shovel",
            "metadata": {"name": "once", "namespace": ns},
            "spec": {"uriSecret": {"name": "shovel-uris"}, "srcQueue": "once-src",
                     "destQueue": "once-dst", "srcDeleteAfter": "queue-length",
                     "rabbitClusterReference": {"name": "site"}},
        }),
    )
    .await;
    wait_messages(&mgmt, "once-dst", 3).await;
    let finished = |generation: i64| {
        let client = client.clone();
        let ns = ns.clone();
        async move {
            wait_for("the shovel finished in status", LONG, || {
                let client = client.clone();
                let ns = ns.clone();
                async move {
                    let st = status_of::<Shovel>(&client, &ns, "once").await;
                    (st["finished"] == true
                        && st["state"] == "finished"
                        && st["observedGeneration"] == generation)
                        .then_some(st)
                }
            })
            .await
        }
    };
    let st = finished(1).await;
    let ready = st["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .find(|c| c["type"] == "Ready")
        .cloned()
        .expect("Ready");
    assert_eq!(
        (&ready["status"], &ready["reason"]),
        (&json!("True"), &json!("Finished"))
    );
    let spath = "/api/parameters/shovel/%2F/once";
    assert!(mgmt.get(spath).await.is_none(), "the shovel deleted itself");

    // Resyncs go on; the shovel is not created again, so new messages stay where they are.
    publish(&mgmt, "once-src", 2).await;
    let before = reconciles(&op, "shovel").await;
    wait_for("three more shovel resyncs", LONG, || {
        let op = &op;
        async move { (reconciles(op, "shovel").await >= before + 3).then_some(()) }
    })
    .await;
    assert!(
        mgmt.get(spath).await.is_none(),
        "a resync re-created the shovel"
    );
    wait_messages(&mgmt, "once-src", 2).await;
    wait_messages(&mgmt, "once-dst", 3).await;

    // A new spec is a new run.
    patch::<Shovel>(
        &client,
        &ns,
        "once",
        json!({"spec": {"srcPrefetchCount": 5}}),
    )
    .await
    .expect("patch shovel");
    wait_messages(&mgmt, "once-dst", 5).await;
    finished(2).await;
    wait_messages(&mgmt, "once-src", 0).await;
    delete::<Shovel>(&client, &ns, "once").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_resources_configure_a_stock_rabbitmq() {
    let client = client().await;
    ensure_crds(&client).await;
    let ns = namespace(&client, "stock").await;
    let _op = Operator::start_with(&ns, &["--topology-resync-seconds", "3"]);
    let rmq = Mgmt::rabbitmq();
    let amqp_port = std::env::var("RABBITMQ_AMQP_PORT").unwrap_or_else(|_| "5673".into());
    secret(
        &client,
        &ns,
        "rabbitmq",
        json!({"uri": rmq.url, "username": "guest", "password": "guest"}),
    )
    .await;
    let target = json!({"name": "rabbitmq"});
    let suffix = &ns[ns.len() - 6..];
    let (pol, up, sh) = (
        format!("fed-{suffix}"),
        format!("self-{suffix}"),
        format!("move-{suffix}"),
    );

    secret(
        &client,
        &ns,
        "self-uri",
        json!({"uri": format!("amqp://guest:guest@127.0.0.1:{amqp_port}")}),
    )
    .await;
    create::<Federation>(&client, &ns, json!({
        "apiVersion": "warren.dev/v1alpha1", "kind": "Federation",
        "metadata": {"name": "up", "namespace": ns},
        "spec": {"name": up, "uriSecret": {"name": "self-uri"}, "exchange": format!("src-{suffix}"),
                 "ackMode": "on-confirm", "connectionSecret": target},
    }))
    .await;
    create::<Policy>(
        &client,
        &ns,
        json!({
            "apiVersion": "warren.dev/v1alpha1", "kind": "Policy",
            "metadata": {"name": "fed", "namespace": ns},
            "spec": {"name": pol, "pattern": format!("^fed-{suffix}$"), "applyTo": "exchanges",
                     "definition": {"federation-upstream": up}, "connectionSecret": target},
        }),
    )
    .await;
    let p = rmq
        .wait(
            "the policy on RabbitMQ",
            &format!("/api/policies/%2F/{pol}"),
            |_| true,
        )
        .await;
    assert_eq!(p["definition"]["federation-upstream"], up);
    let u = rmq
        .wait(
            "the upstream on RabbitMQ",
            &format!("/api/parameters/federation-upstream/%2F/{up}"),
            |_| true,
        )
        .await;
    assert_eq!(u["value"]["ack-mode"], "on-confirm");
    wait_ready::<Policy>(&client, &ns, "fed", "True").await;
    wait_ready::<Federation>(&client, &ns, "up", "True").await;

    // A federated exchange makes a link; its live state reaches the Federation's status.
    rmq.put(
        &format!("/api/exchanges/%2F/src-{suffix}"),
        json!({"type": "fanout"}),
    )
    .await;
    rmq.put(
        &format!("/api/exchanges/%2F/fed-{suffix}"),
        json!({"type": "fanout"}),
    )
    .await;
    let links = wait_for("a federation link in status.links", LONG, || {
        let client = client.clone();
        let ns = ns.clone();
        async move {
            let st = status_of::<Federation>(&client, &ns, "up").await;
            let links = st["links"].as_array()?.clone();
            links
                .iter()
                .any(|l| l["status"] == "running")
                .then_some(links)
        }
    })
    .await;
    assert_eq!(links[0]["name"], format!("fed-{suffix}"));
    assert_eq!(links[0]["type"], "exchange");

    secret(
        &client,
        &ns,
        "shovel-uris",
        json!({"srcUri": "amqp://", "destUri": "amqp://"}),
    )
    .await;
    create::<Shovel>(&client, &ns, json!({
        "apiVersion": "warren.dev/v1alpha1", "kind": "Shovel",
        "metadata": {"name": "move", "namespace": ns},
        "spec": {"name": sh, "uriSecret": {"name": "shovel-uris"}, "srcQueue": format!("a-{suffix}"),
                 "destQueue": format!("b-{suffix}"), "ackMode": "on-confirm", "srcPrefetchCount": 10,
                 "connectionSecret": target},
    }))
    .await;
    rmq.wait(
        "the shovel on RabbitMQ",
        &format!("/api/parameters/shovel/%2F/{sh}"),
        |_| true,
    )
    .await;
    wait_for("the shovel running in status.state", LONG, || {
        let client = client.clone();
        let ns = ns.clone();
        async move {
            (status_of::<Shovel>(&client, &ns, "move").await["state"] == "running").then_some(())
        }
    })
    .await;

    // Drift on RabbitMQ is corrected too.
    rmq.delete(&format!("/api/policies/%2F/{pol}")).await;
    rmq.wait(
        "the policy restored on RabbitMQ",
        &format!("/api/policies/%2F/{pol}"),
        |_| true,
    )
    .await;

    for name in ["move"] {
        delete::<Shovel>(&client, &ns, name).await;
    }
    delete::<Policy>(&client, &ns, "fed").await;
    delete::<Federation>(&client, &ns, "up").await;
    rmq.wait_gone(
        "shovel removed from RabbitMQ",
        &format!("/api/parameters/shovel/%2F/{sh}"),
    )
    .await;
    rmq.wait_gone(
        "policy removed from RabbitMQ",
        &format!("/api/policies/%2F/{pol}"),
    )
    .await;
    rmq.wait_gone(
        "upstream removed from RabbitMQ",
        &format!("/api/parameters/federation-upstream/%2F/{up}"),
    )
    .await;
    rmq.delete(&format!("/api/exchanges/%2F/src-{suffix}"))
        .await;
    rmq.delete(&format!("/api/exchanges/%2F/fed-{suffix}"))
        .await;
    rmq.delete(&format!("/api/queues/%2F/a-{suffix}")).await;
    rmq.delete(&format!("/api/queues/%2F/b-{suffix}")).await;
}

/// An operator without `--allow-any-management-uri` sends a cluster's default user (an
/// administrator) only to the cluster's own Services: a `warren.dev/management-uri` annotation
/// naming another host — here a listener standing in for an attacker's server — makes the
/// RabbitCluster `ReconcileSuccess=False` and a Policy on it `Ready=False`
/// (`ManagementUriRefused`) with an Event, and not one connection reaches that host.
#[tokio::test(flavor = "multi_thread")]
async fn credentials_go_only_to_the_clusters_own_services() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncReadExt;

    let client = client().await;
    ensure_crds(&client).await;
    let ns = namespace(&client, "mgmturi").await;
    // The attacker's server: counts connections and keeps what they send.
    let trap = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let trap_url = format!("http://{}", trap.local_addr().expect("addr"));
    let connections = Arc::new(AtomicUsize::new(0));
    let received = Arc::new(std::sync::Mutex::new(String::new()));
    let (c, r) = (connections.clone(), received.clone());
    let trap_task = tokio::spawn(async move {
        while let Ok((mut socket, _)) = trap.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            let r = r.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                if let Ok(n) = socket.read(&mut buf).await {
                    r.lock()
                        .expect("received")
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
    });
    let _op = Operator::start_with(&ns, &["--allow-any-management-uri=false"]);
    secret(
        &client,
        &ns,
        "lured-user",
        json!({"username": "admin", "password": "s3cret"}),
    )
    .await;
    create::<RabbitCluster>(
        &client,
        &ns,
        json!({
            "apiVersion": "warren.dev/v1alpha1", "kind": "RabbitCluster",
            "metadata": {"name": "lured", "namespace": ns,
                         "annotations": {"warren.dev/management-uri": trap_url}},
            "spec": {"replicas": 1, "persistence": {"storage": "0"},
                     "defaultUser": {"secretName": "lured-user"}},
        }),
    )
    .await;
    create::<Policy>(
        &client,
        &ns,
        json!({
            "apiVersion": "warren.dev/v1alpha1", "kind": "Policy",
            "metadata": {"name": "lure", "namespace": ns},
            "spec": {"pattern": ".*", "definition": {"max-length": 1},
                     "rabbitClusterReference": {"name": "lured"}},
        }),
    )
    .await;

    // The cluster: refused before anything is applied, naming the annotation.
    let clusters = Api::<RabbitCluster>::namespaced(client.clone(), &ns);
    let (reason, message) = wait_for("lured ReconcileSuccess=False", LONG, || {
        let clusters = clusters.clone();
        async move {
            let rc = clusters.get("lured").await.ok()?;
            let c = rc
                .status?
                .conditions
                .into_iter()
                .find(|c| c.type_ == "ReconcileSuccess" && c.status == "False")?;
            Some((c.reason, c.message))
        }
    })
    .await;
    assert_eq!(reason, "InvalidSpec");
    for text in [
        "metadata.annotations[\"warren.dev/management-uri\"]",
        "\"127.0.0.1\"",
        "lured.",
        "--allow-any-management-uri",
    ] {
        assert!(message.contains(text), "{text} not in: {message}");
    }
    // The Policy: not ready, saying why.
    let (reason, message) = wait_ready::<Policy>(&client, &ns, "lure", "False").await;
    assert_eq!(reason, "ManagementUriRefused", "{message}");
    assert!(message.contains("warren.dev/management-uri"), "{message}");
    assert!(message.contains("--allow-any-management-uri"), "{message}");
    let events = Api::<k8s_openapi::api::core::v1::Event>::namespaced(client.clone(), &ns)
        .list(&Default::default())
        .await
        .expect("events");
    assert!(
        events
            .items
            .iter()
            .any(|e| e.reason.as_deref() == Some("ManagementUriRefused")),
        "no ManagementUriRefused Event"
    );
    // A retry or two later, still nothing has reached the host.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        connections.load(Ordering::SeqCst),
        0,
        "the operator connected to the annotation's host: {}",
        received.lock().expect("received")
    );
    trap_task.abort();
}
