//! A resync that finds the broker as specified writes nothing: one resource of every topology
//! kind, on Warren (through a RabbitCluster) and on Debian's RabbitMQ (through a connection
//! Secret), with a 2 s resync. Each kind's comparison with what its broker answers must
//! hold, or the kind would be rewritten (and counted as drift) every resync.

use kube::Client;
use serde_json::{Value, json};
use warren_e2e::topology::{LONG, Mgmt, cluster_for, counter, create, delete, secret, wait_ready};
use warren_e2e::{Broker, Operator, client, ensure_crds, namespace, wait_for};
use warren_operator::crd::{
    Binding, Exchange, Federation, OperatorPolicy, Permission, Policy, Queue, Shovel,
    TopicPermission, User, Vhost,
};

/// (kind, controller) of every topology kind.
const KINDS: [(&str, &str); 11] = [
    ("Vhost", "vhost"),
    ("User", "user"),
    ("Permission", "permission"),
    ("TopicPermission", "topicpermission"),
    ("Queue", "queue"),
    ("Exchange", "exchange"),
    ("Binding", "binding"),
    ("Policy", "policy"),
    ("OperatorPolicy", "operatorpolicy"),
    ("Federation", "federation"),
    ("Shovel", "shovel"),
];

fn manifest(kind: &str, ns: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "warren.dev/v1alpha1", "kind": kind,
        "metadata": {"name": kind.to_lowercase(), "namespace": ns},
        "spec": spec,
    })
}

async fn every_kind_once(
    client: &Client,
    ns: &str,
    target: (&str, Value),
    sfx: &str,
    metrics: &str,
) {
    let with = |mut spec: Value| {
        spec[target.0] = target.1.clone();
        spec
    };
    secret(
        client,
        ns,
        "links",
        json!({"uri": "amqp://localhost", "srcUri": "amqp://", "destUri": "amqp://"}),
    )
    .await;
    let (user, q, x) = (format!("u-{sfx}"), format!("q-{sfx}"), format!("x-{sfx}"));
    let specs = [
        json!({"name": format!("v-{sfx}"), "tags": ["b", "a"], "description": "d",
               "defaultQueueType": "quorum", "limits": {"maxConnections": 10}}),
        json!({"name": user, "tags": ["monitoring", "management"], "limits": {"maxChannels": 5}}),
        json!({"user": user, "configure": ".*", "write": ".*", "read": ".*"}),
        json!({"user": user, "exchange": "amq.topic", "write": "^a", "read": "^b"}),
        json!({"name": q, "type": "quorum", "arguments": {"x-max-length": 10}}),
        json!({"name": x, "type": "topic", "arguments": {"alternate-exchange": "ae"}}),
        json!({"source": x, "destination": q, "routingKey": "a.#"}),
        json!({"name": format!("p-{sfx}"), "pattern": format!("^{q}$"), "applyTo": "queues",
               "priority": 1, "definition": {"max-length": 5, "overflow": "reject-publish"}}),
        json!({"name": format!("op-{sfx}"), "pattern": format!("^{q}$"),
               "definition": {"max-length": 100}}),
        json!({"name": format!("f-{sfx}"), "uriSecret": {"name": "links"}, "prefetchCount": 10,
               "exchange": "amq.topic"}),
        json!({"name": format!("s-{sfx}"), "uriSecret": {"name": "links"}, "srcQueue": q,
               "destQueue": format!("d-{sfx}"), "ackMode": "on-confirm"}),
    ];
    // One at a time, each Ready before the next: a Binding created before its queue would
    // be refused and retried with a growing backoff.
    for ((kind, _), spec) in KINDS.iter().zip(specs) {
        let m = manifest(kind, ns, with(spec));
        let name = kind.to_lowercase();
        match *kind {
            "Vhost" => {
                create::<Vhost>(client, ns, m).await;
                wait_ready::<Vhost>(client, ns, &name, "True").await
            }
            "User" => {
                create::<User>(client, ns, m).await;
                wait_ready::<User>(client, ns, &name, "True").await
            }
            "Permission" => {
                create::<Permission>(client, ns, m).await;
                wait_ready::<Permission>(client, ns, &name, "True").await
            }
            "TopicPermission" => {
                create::<TopicPermission>(client, ns, m).await;
                wait_ready::<TopicPermission>(client, ns, &name, "True").await
            }
            "Queue" => {
                create::<Queue>(client, ns, m).await;
                wait_ready::<Queue>(client, ns, &name, "True").await
            }
            "Exchange" => {
                create::<Exchange>(client, ns, m).await;
                wait_ready::<Exchange>(client, ns, &name, "True").await
            }
            "Binding" => {
                create::<Binding>(client, ns, m).await;
                wait_ready::<Binding>(client, ns, &name, "True").await
            }
            "Policy" => {
                create::<Policy>(client, ns, m).await;
                wait_ready::<Policy>(client, ns, &name, "True").await
            }
            "OperatorPolicy" => {
                create::<OperatorPolicy>(client, ns, m).await;
                wait_ready::<OperatorPolicy>(client, ns, &name, "True").await
            }
            "Federation" => {
                create::<Federation>(client, ns, m).await;
                wait_ready::<Federation>(client, ns, &name, "True").await
            }
            _ => {
                create::<Shovel>(client, ns, m).await;
                wait_ready::<Shovel>(client, ns, &name, "True").await
            }
        };
    }

    // From here on every reconcile is a resync of an applied generation.
    let snapshot = || async {
        let mut out = Vec::new();
        for (_, c) in KINDS {
            out.push((
                c,
                counter(metrics, "warren_operator_topology_writes_total", "kind", c).await,
                counter(
                    metrics,
                    "warren_operator_reconciliations_total",
                    "controller",
                    c,
                )
                .await,
            ));
        }
        out
    };
    // Let reconciles that were already queued (status updates) settle first.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let before = snapshot().await;
    wait_for("three more resyncs of every kind", LONG, || async {
        let now = snapshot().await;
        now.iter()
            .zip(&before)
            .all(|((_, _, r), (_, _, r0))| *r >= r0 + 3)
            .then_some(())
    })
    .await;
    let after = snapshot().await;
    let rewritten: Vec<_> = after
        .iter()
        .zip(&before)
        .filter(|((_, w, _), (_, w0, _))| w != w0)
        .map(|((c, w, _), (_, w0, _))| format!("{c}: {w0} -> {w} writes"))
        .collect();
    assert!(
        rewritten.is_empty(),
        "resyncs without drift wrote to the broker: {rewritten:?}"
    );

    delete::<Shovel>(client, ns, "shovel").await;
    delete::<Federation>(client, ns, "federation").await;
    delete::<OperatorPolicy>(client, ns, "operatorpolicy").await;
    delete::<Policy>(client, ns, "policy").await;
    delete::<Binding>(client, ns, "binding").await;
    delete::<Exchange>(client, ns, "exchange").await;
    delete::<Queue>(client, ns, "queue").await;
    delete::<TopicPermission>(client, ns, "topicpermission").await;
    delete::<Permission>(client, ns, "permission").await;
    delete::<User>(client, ns, "user").await;
    delete::<Vhost>(client, ns, "vhost").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn resyncs_without_drift_write_nothing_to_warren() {
    let client = client().await;
    ensure_crds(&client).await;
    let ns = namespace(&client, "resync").await;
    let op = Operator::start_with(&ns, &["--topology-resync-seconds", "2"]);
    let broker = Broker::start().await;
    cluster_for(&client, &ns, "site", &broker).await;
    every_kind_once(
        &client,
        &ns,
        ("rabbitClusterReference", json!({"name": "site"})),
        "w",
        &op.metrics_url,
    )
    .await;
    let m = Mgmt::of(&broker);
    m.delete("/api/queues/%2F/d-w").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn resyncs_without_drift_write_nothing_to_a_stock_rabbitmq() {
    let client = client().await;
    ensure_crds(&client).await;
    let ns = namespace(&client, "resync-stock").await;
    let op = Operator::start_with(&ns, &["--topology-resync-seconds", "2"]);
    let rmq = Mgmt::rabbitmq();
    secret(
        &client,
        &ns,
        "rabbitmq",
        json!({"uri": rmq.url, "username": "guest", "password": "guest"}),
    )
    .await;
    let sfx = ns[ns.len() - 6..].to_string();
    every_kind_once(
        &client,
        &ns,
        ("connectionSecret", json!({"name": "rabbitmq"})),
        &sfx,
        &op.metrics_url,
    )
    .await;
    rmq.delete(&format!("/api/queues/%2F/d-{sfx}")).await;
}
