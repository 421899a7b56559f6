//! Vhost, User, Permission and TopicPermission resources configure a real broker through
//! its management API: one scenario, run against a Warren process reached through a
//! RabbitCluster and against Debian's RabbitMQ reached through a connection Secret. The
//! operator runs against the real control plane with a long resync, so only the watches
//! (of the resources, of their Secrets, of the Users a permission names) explain how fast
//! a change arrives.
//!
//! Queues, exchanges and operator policies likewise, with a short resync: one deleted on the
//! broker comes back.
//!
//! Bindings likewise (short resync): to a queue and to an exchange, with arguments, restored
//! after a deletion on the broker, immutable, deleted (only the one binding) or retained.
//!
//! Also here: `rabbitClusterReference` and `connectionSecret` cannot be changed once set
//! (the API server refuses it, on every topology kind).

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use serde_json::{Value, json};
use warren_e2e::topology::{
    LONG, Mgmt, cluster_for, counter, create, delete, patch, secret, status_of, wait_ready,
};
use warren_e2e::{Broker, Operator, client, ensure_crds, namespace, wait_for};
use warren_operator::crd::{
    Binding, Exchange, Federation, OperatorPolicy, Permission, Policy, Queue, Shovel,
    TopicPermission, User, Vhost,
};

/// Which broker a scenario configures, and how the resources name it.
struct Target {
    mgmt: Mgmt,
    /// `rabbitClusterReference` or `connectionSecret`.
    field: &'static str,
    /// Its value in the specs.
    reference: Value,
    /// Appended to names on the broker (the reference RabbitMQ outlives a test run).
    suffix: String,
    /// The operator's metrics endpoint.
    metrics: String,
}

impl Target {
    /// A local Warren behind a RabbitCluster `site` (`rabbitClusterReference`); the broker
    /// lives as long as the returned handle.
    async fn warren(client: &Client, ns: &str, op: &Operator) -> (Target, Broker) {
        let broker = Broker::start().await;
        cluster_for(client, ns, "site", &broker).await;
        let target = Target {
            mgmt: Mgmt::of(&broker),
            field: "rabbitClusterReference",
            reference: json!({"name": "site"}),
            suffix: "w".into(),
            metrics: op.metrics_url.clone(),
        };
        (target, broker)
    }

    /// The reference RabbitMQ through a `connectionSecret` named `rabbitmq`.
    async fn rabbitmq(client: &Client, ns: &str, op: &Operator) -> Target {
        let rmq = Mgmt::rabbitmq();
        secret(
            client,
            ns,
            "rabbitmq",
            json!({"uri": rmq.url, "username": "guest", "password": "guest"}),
        )
        .await;
        Target {
            mgmt: rmq,
            field: "connectionSecret",
            reference: json!({"name": "rabbitmq"}),
            suffix: ns[ns.len() - 6..].to_string(),
            metrics: op.metrics_url.clone(),
        }
    }

    /// `spec` with the target added.
    fn spec(&self, mut spec: Value) -> Value {
        spec[self.field] = self.reference.clone();
        spec
    }
}

fn manifest(kind: &str, ns: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "warren.dev/v1alpha1", "kind": kind,
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    })
}

async fn secret_value(client: &Client, ns: &str, name: &str, key: &str) -> Option<String> {
    let s = Api::<Secret>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .ok()??;
    let v = s.data?.get(key)?.0.clone();
    String::from_utf8(v).ok()
}

/// Waits until `user:pass` authenticates on the management API (`GET /api/whoami`).
async fn wait_authenticates(mgmt: &Mgmt, user: &str, pass: &str) {
    let as_user = mgmt.as_user(user, pass);
    wait_for(&format!("{user} authenticating with {pass}"), LONG, || {
        let m = as_user.clone();
        async move { (m.status("/api/whoami").await == 200).then_some(()) }
    })
    .await;
}

async fn refused(mgmt: &Mgmt, user: &str, pass: &str) -> bool {
    mgmt.as_user(user, pass).status("/api/whoami").await == 401
}

async fn wait_generation<K>(client: &Client, ns: &str, name: &str, generation: i64)
where
    K: kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    wait_for(
        &format!("{name} Ready at observedGeneration {generation}"),
        LONG,
        || async move {
            let st = status_of::<K>(client, ns, name).await;
            let ready = st["conditions"]
                .as_array()?
                .iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            (ready && st["observedGeneration"] == generation).then_some(())
        },
    )
    .await;
}

/// The whole life of a Vhost, two Users, two Permissions and a TopicPermission on `t`.
async fn scenario(client: &Client, ns: &str, t: &Target) {
    let m = &t.mgmt;
    let sfx = &t.suffix;

    // ---- Vhost: a name Kubernetes does not allow, tags, description, default queue type.
    let vhost = format!("prod/eu-{sfx}");
    let vpath = format!("/api/vhosts/prod%2Feu-{sfx}");
    create::<Vhost>(
        client,
        ns,
        manifest(
            "Vhost",
            ns,
            "prod",
            t.spec(
                json!({"name": vhost, "tags": ["eu", "prod"], "description": "Production",
                          "defaultQueueType": "quorum",
                          "limits": {"maxConnections": 10, "maxQueues": 5}}),
            ),
        ),
    )
    .await;
    let v = m.wait("the vhost on the broker", &vpath, |_| true).await;
    assert_eq!(v["description"], "Production", "{v}");
    assert_eq!(v["tags"], json!(["eu", "prod"]), "{v}");
    assert_eq!(v["default_queue_type"], "quorum", "{v}");
    wait_generation::<Vhost>(client, ns, "prod", 1).await;
    let lpath = format!("/api/vhost-limits/prod%2Feu-{sfx}");
    m.wait("the vhost limits", &lpath, |l| {
        l[0]["value"] == json!({"max-connections": 10, "max-queues": 5})
    })
    .await;
    patch::<Vhost>(
        client,
        ns,
        "prod",
        json!({"spec": {"description": "Production (EU)", "tags": ["eu"],
                        "limits": {"maxQueues": null}}}),
    )
    .await
    .expect("patch vhost");
    m.wait("the changed vhost", &vpath, |v| {
        v["description"] == "Production (EU)" && v["tags"] == json!(["eu"])
    })
    .await;
    // A limit no longer given is removed.
    m.wait("the vhost limits without max-queues", &lpath, |l| {
        l[0]["value"] == json!({"max-connections": 10})
    })
    .await;
    wait_generation::<Vhost>(client, ns, "prod", 2).await;
    let kept_vhost = format!("kept-{sfx}");
    create::<Vhost>(
        client,
        ns,
        manifest(
            "Vhost",
            ns,
            "kept",
            t.spec(json!({"name": kept_vhost, "deletionPolicy": "retain"})),
        ),
    )
    .await;
    m.wait(
        "the retained vhost on the broker",
        &format!("/api/vhosts/{kept_vhost}"),
        |_| true,
    )
    .await;

    // ---- User with a generated password.
    let app = format!("app-{sfx}");
    create::<User>(
        client,
        ns,
        manifest(
            "User",
            ns,
            "app",
            t.spec(json!({"name": app, "tags": ["monitoring"],
                          "limits": {"maxConnections": 2, "maxChannels": 4}})),
        ),
    )
    .await;
    let upath = format!("/api/users/{app}");
    let u = m
        .wait("the generated user on the broker", &upath, |_| true)
        .await;
    assert_eq!(u["tags"], json!(["monitoring"]), "{u}");
    m.wait("the user limits", &format!("/api/user-limits/{app}"), |l| {
        l[0]["value"] == json!({"max-connections": 2, "max-channels": 4})
    })
    .await;
    wait_generation::<User>(client, ns, "app", 1).await;
    assert_eq!(
        status_of::<User>(client, ns, "app").await["credentialsSecret"],
        "app-user-credentials"
    );
    let generated = wait_for("the generated credentials Secret", LONG, || async move {
        secret_value(client, ns, "app-user-credentials", "password").await
    })
    .await;
    assert!(generated.len() >= 20, "a short generated password");
    assert_eq!(
        secret_value(client, ns, "app-user-credentials", "username")
            .await
            .as_deref(),
        Some(app.as_str())
    );
    wait_authenticates(m, &app, &generated).await;
    // Rotating the generated Secret: the new password works at once, the old one is refused.
    secret(
        client,
        ns,
        "app-user-credentials",
        json!({"username": app, "password": "rotated-1"}),
    )
    .await;
    wait_authenticates(m, &app, "rotated-1").await;
    assert!(
        refused(m, &app, &generated).await,
        "the old password still works"
    );
    // Tags follow the spec.
    patch::<User>(
        client,
        ns,
        "app",
        json!({"spec": {"tags": ["management", "policymaker"]}}),
    )
    .await
    .expect("patch user");
    m.wait("the user's new tags", &upath, |u| {
        u["tags"] == json!(["management", "policymaker"])
    })
    .await;
    wait_generation::<User>(client, ns, "app", 2).await;
    assert!(
        m.as_user(&app, "rotated-1").status("/api/whoami").await == 200,
        "a tag change must keep the password"
    );

    // ---- User with imported credentials, retained on deletion.
    let svc = format!("svc-{sfx}");
    secret(
        client,
        ns,
        "svc-creds",
        json!({"username": svc, "password": "first"}),
    )
    .await;
    create::<User>(
        client,
        ns,
        manifest(
            "User",
            ns,
            "svc",
            t.spec(json!({"name": svc, "tags": ["management"], "importCredentialsSecret": {"name": "svc-creds"},
                          "deletionPolicy": "retain"})),
        ),
    )
    .await;
    wait_authenticates(m, &svc, "first").await;
    wait_generation::<User>(client, ns, "svc", 1).await;
    assert_eq!(
        status_of::<User>(client, ns, "svc").await["credentialsSecret"],
        "svc-creds"
    );
    secret(
        client,
        ns,
        "svc-creds",
        json!({"username": svc, "password": "second"}),
    )
    .await;
    wait_authenticates(m, &svc, "second").await;
    assert!(
        refused(m, &svc, "first").await,
        "the old password still works"
    );
    // A Secret naming another user is refused with a clear condition, and nothing changes.
    secret(
        client,
        ns,
        "svc-creds",
        json!({"username": "someone-else", "password": "third"}),
    )
    .await;
    let (reason, message) = wait_ready::<User>(client, ns, "svc", "False").await;
    assert_eq!(reason, "InvalidSpec", "{message}");
    assert!(message.contains("someone-else"), "{message}");
    assert!(refused(m, &svc, "third").await);
    secret(
        client,
        ns,
        "svc-creds",
        json!({"username": svc, "password": "second"}),
    )
    .await;
    wait_ready::<User>(client, ns, "svc", "True").await;

    // ---- A User naming the account the operator itself uses (guest here) is refused, and
    // deleting it leaves that account alone: the operator cannot lock itself out.
    create::<User>(
        client,
        ns,
        manifest(
            "User",
            ns,
            "operator-account",
            t.spec(json!({"name": "guest"})),
        ),
    )
    .await;
    let (reason, message) = wait_ready::<User>(client, ns, "operator-account", "False").await;
    assert_eq!(reason, "InvalidSpec", "{message}");
    assert!(message.contains("lock the operator out"), "{message}");
    delete::<User>(client, ns, "operator-account").await;
    assert_eq!(
        m.status("/api/whoami").await,
        200,
        "the operator's account still authenticates"
    );

    // ---- Permission through a userReference, and one by user name (retained).
    let ppath = format!("/api/permissions/prod%2Feu-{sfx}/{app}");
    create::<Permission>(
        client,
        ns,
        manifest(
            "Permission",
            ns,
            "app",
            t.spec(json!({"vhost": vhost, "userReference": {"name": "app"},
                          "configure": "^app\\.", "write": ".*", "read": ".*"})),
        ),
    )
    .await;
    let p = m
        .wait("the permission on the broker", &ppath, |_| true)
        .await;
    assert_eq!(
        (&p["configure"], &p["write"], &p["read"]),
        (&json!("^app\\."), &json!(".*"), &json!(".*")),
        "{p}"
    );
    wait_generation::<Permission>(client, ns, "app", 1).await;
    assert_eq!(
        status_of::<Permission>(client, ns, "app").await["user"],
        app.as_str()
    );
    patch::<Permission>(client, ns, "app", json!({"spec": {"read": "^app\\."}}))
        .await
        .expect("patch permission");
    m.wait("the changed permission", &ppath, |p| p["read"] == "^app\\.")
        .await;
    wait_generation::<Permission>(client, ns, "app", 2).await;
    let svc_ppath = format!("/api/permissions/prod%2Feu-{sfx}/{svc}");
    create::<Permission>(
        client,
        ns,
        manifest(
            "Permission",
            ns,
            "svc",
            t.spec(json!({"vhost": vhost, "user": svc, "read": ".*", "deletionPolicy": "retain"})),
        ),
    )
    .await;
    let p = m
        .wait("the permission by user name", &svc_ppath, |_| true)
        .await;
    assert_eq!(p["configure"], "", "{p}");
    assert_eq!(p["read"], ".*", "{p}");
    // A reference to a User that does not exist says so.
    create::<Permission>(
        client,
        ns,
        manifest(
            "Permission",
            ns,
            "nobody",
            t.spec(json!({"vhost": vhost, "userReference": {"name": "nobody"}})),
        ),
    )
    .await;
    let (reason, message) = wait_ready::<Permission>(client, ns, "nobody", "False").await;
    assert_eq!(reason, "UserNotFound", "{message}");
    assert!(message.contains("nobody"), "{message}");
    delete::<Permission>(client, ns, "nobody").await;

    // ---- TopicPermission.
    let tpath = format!("/api/topic-permissions/prod%2Feu-{sfx}/{app}");
    create::<TopicPermission>(
        client,
        ns,
        manifest(
            "TopicPermission",
            ns,
            "app-topic",
            t.spec(json!({"vhost": vhost, "userReference": {"name": "app"},
                          "exchange": "amq.topic", "write": "^orders\\.", "read": ".*"})),
        ),
    )
    .await;
    let on_topic = |w: &'static str| {
        move |v: &Value| {
            v.as_array().is_some_and(|l| {
                l.iter()
                    .any(|p| p["exchange"] == "amq.topic" && p["write"] == w && p["read"] == ".*")
            })
        }
    };
    m.wait(
        "the topic permission on the broker",
        &tpath,
        on_topic("^orders\\."),
    )
    .await;
    wait_generation::<TopicPermission>(client, ns, "app-topic", 1).await;
    patch::<TopicPermission>(
        client,
        ns,
        "app-topic",
        json!({"spec": {"write": "^orders\\.eu\\."}}),
    )
    .await
    .expect("patch topic permission");
    m.wait(
        "the changed topic permission",
        &tpath,
        on_topic("^orders\\.eu\\."),
    )
    .await;
    wait_generation::<TopicPermission>(client, ns, "app-topic", 2).await;

    // ---- The broker a resource configures cannot be changed, nor its kind of target.
    let other = if t.field == "rabbitClusterReference" {
        "connectionSecret"
    } else {
        "rabbitClusterReference"
    };
    let err = patch::<Permission>(
        client,
        ns,
        "app",
        json!({"spec": {t.field: {"name": "another-broker"}}}),
    )
    .await
    .expect_err("changing the target");
    assert!(
        err.to_string()
            .contains(&format!("{} cannot be changed", t.field)),
        "{err}"
    );
    let err = patch::<Vhost>(
        client,
        ns,
        "prod",
        json!({"spec": {t.field: null, other: {"name": "another-broker"}}}),
    )
    .await
    .expect_err("switching the kind of target");
    assert!(err.to_string().contains("cannot be changed"), "{err}");

    // ---- Deletion: delete removes, retain keeps.
    delete::<TopicPermission>(client, ns, "app-topic").await;
    let tpath = tpath.as_str();
    wait_for("the topic permissions removed", LONG, || async move {
        match m.get(tpath).await {
            None => Some(()),
            Some(v) if v.as_array().is_some_and(Vec::is_empty) => Some(()),
            Some(_) => None,
        }
    })
    .await;
    delete::<Permission>(client, ns, "app").await;
    m.wait_gone("the permission removed", &ppath).await;
    delete::<Permission>(client, ns, "svc").await;
    assert!(
        m.get(&svc_ppath).await.is_some(),
        "retain keeps the permission"
    );
    delete::<User>(client, ns, "app").await;
    m.wait_gone("the user removed", &upath).await;
    // The generated Secret is owned by the User: the garbage collector removes it.
    wait_for("the generated Secret collected", LONG, || async move {
        Api::<Secret>::namespaced(client.clone(), ns)
            .get_opt("app-user-credentials")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    delete::<User>(client, ns, "svc").await;
    assert!(
        m.get(&format!("/api/users/{svc}")).await.is_some(),
        "retain keeps the user"
    );
    delete::<Vhost>(client, ns, "prod").await;
    m.wait_gone("the vhost removed", &vpath).await;
    delete::<Vhost>(client, ns, "kept").await;
    assert!(
        m.get(&format!("/api/vhosts/{kept_vhost}")).await.is_some(),
        "retain keeps the vhost"
    );
    // Leave nothing behind on a broker that outlives the test.
    m.delete(&format!("/api/users/{svc}")).await;
    m.delete(&format!("/api/vhosts/{kept_vhost}")).await;
}

/// A quorum queue, a transient classic queue, a topic exchange, an internal exchange and
/// operator policies on `t`: created as specified, restored after a deletion on the broker,
/// immutable (queues, exchanges) or updated (operator policies), deleted or retained.
async fn queue_scenario(client: &Client, ns: &str, t: &Target) {
    let m = &t.mgmt;
    let sfx = &t.suffix;
    let orders = format!("orders-{sfx}");
    let qpath = format!("/api/queues/%2F/{orders}");
    create::<Queue>(
        client,
        ns,
        manifest(
            "Queue",
            ns,
            "orders",
            t.spec(json!({"name": orders, "type": "quorum", "arguments": {"x-max-length": 10}})),
        ),
    )
    .await;
    let q = m.wait("the queue on the broker", &qpath, |_| true).await;
    assert_eq!(q["type"], "quorum", "{q}");
    assert_eq!(q["durable"], true, "{q}");
    assert_eq!(q["auto_delete"], false, "{q}");
    assert_eq!(q["arguments"]["x-max-length"], 10, "{q}");
    assert_eq!(q["arguments"]["x-queue-type"], "quorum", "{q}");
    wait_generation::<Queue>(client, ns, "orders", 1).await;

    // Drift: deleted on the broker, it is declared again at the next resync.
    m.delete(&qpath).await;
    m.wait("the queue declared again", &qpath, |q| {
        q["type"] == "quorum"
    })
    .await;

    // What the broker cannot change, the API server refuses to change.
    for change in [
        json!({"spec": {"durable": false}}),
        json!({"spec": {"type": "classic"}}),
        json!({"spec": {"autoDelete": true}}),
    ] {
        let err = patch::<Queue>(client, ns, "orders", change.clone())
            .await
            .expect_err(&format!("{change}"));
        assert!(
            err.to_string()
                .contains("cannot be changed (the broker refuses to redeclare"),
            "{change}: {err}"
        );
    }
    // Other arguments: the schema cannot see into them, the broker refuses the redeclare,
    // and the condition carries its error; the queue is unchanged. Put back, it is Ready.
    patch::<Queue>(
        client,
        ns,
        "orders",
        json!({"spec": {"arguments": {"x-max-length": 20}}}),
    )
    .await
    .expect("patch arguments");
    let (reason, message) = wait_ready::<Queue>(client, ns, "orders", "False").await;
    assert_eq!(reason, "BrokerRefused", "{message}");
    assert!(message.contains("x-max-length"), "{message}");
    assert_eq!(
        m.get(&qpath).await.expect("queue")["arguments"]["x-max-length"],
        10
    );
    patch::<Queue>(
        client,
        ns,
        "orders",
        json!({"spec": {"arguments": {"x-max-length": 10}}}),
    )
    .await
    .expect("patch arguments back");
    wait_generation::<Queue>(client, ns, "orders", 3).await;
    // deletionPolicy can change: retain keeps the queue.
    patch::<Queue>(
        client,
        ns,
        "orders",
        json!({"spec": {"deletionPolicy": "retain"}}),
    )
    .await
    .expect("deletionPolicy is mutable");
    wait_generation::<Queue>(client, ns, "orders", 4).await;
    delete::<Queue>(client, ns, "orders").await;
    assert!(m.get(&qpath).await.is_some(), "retain keeps the queue");
    m.delete(&qpath).await;

    // A transient classic queue, deleted with its resource.
    let tmp = format!("tmp-{sfx}");
    let tpath = format!("/api/queues/%2F/{tmp}");
    create::<Queue>(
        client,
        ns,
        manifest(
            "Queue",
            ns,
            "tmp",
            t.spec(json!({"name": tmp, "type": "classic", "durable": false})),
        ),
    )
    .await;
    let q = m.wait("the classic queue", &tpath, |_| true).await;
    assert_eq!(q["durable"], false, "{q}");
    assert_eq!(q["type"], "classic", "{q}");
    wait_ready::<Queue>(client, ns, "tmp", "True").await;
    delete::<Queue>(client, ns, "tmp").await;
    m.wait_gone("the classic queue removed", &tpath).await;

    // ---- Exchanges.
    let events = format!("events-{sfx}");
    let xpath = format!("/api/exchanges/%2F/{events}");
    create::<Exchange>(
        client,
        ns,
        manifest(
            "Exchange",
            ns,
            "events",
            t.spec(json!({"name": events, "type": "topic",
                          "arguments": {"alternate-exchange": format!("ae-{sfx}")}})),
        ),
    )
    .await;
    let x = m.wait("the exchange on the broker", &xpath, |_| true).await;
    assert_eq!(x["type"], "topic", "{x}");
    assert_eq!(x["durable"], true, "{x}");
    assert_eq!(x["internal"], false, "{x}");
    assert_eq!(
        x["arguments"]["alternate-exchange"],
        format!("ae-{sfx}"),
        "{x}"
    );
    wait_generation::<Exchange>(client, ns, "events", 1).await;
    // Resync compares before it writes: while the broker holds the exchange as specified,
    // resyncs go on and write nothing.
    let metric = |name: &'static str, label: &'static str| {
        let url = t.metrics.clone();
        async move { counter(&url, name, label, "exchange").await }
    };
    let writes = metric("warren_operator_topology_writes_total", "kind").await;
    let drift = metric("warren_operator_topology_drift_corrections_total", "kind").await;
    let resyncs = metric("warren_operator_reconciliations_total", "controller").await;
    assert!(writes >= 1, "the exchange was written once");
    wait_for("three more resyncs of the exchange", LONG, || async {
        (metric("warren_operator_reconciliations_total", "controller").await >= resyncs + 3)
            .then_some(())
    })
    .await;
    assert_eq!(
        metric("warren_operator_topology_writes_total", "kind").await,
        writes,
        "a resync without drift wrote to the broker"
    );
    assert_eq!(
        metric("warren_operator_topology_drift_corrections_total", "kind").await,
        drift
    );
    // Drift: deleted on the broker, it is declared again at the next resync, and counted.
    m.delete(&xpath).await;
    m.wait("the exchange declared again", &xpath, |x| {
        x["type"] == "topic"
    })
    .await;
    wait_for("the drift correction counted", LONG, || async {
        (metric("warren_operator_topology_drift_corrections_total", "kind").await == drift + 1)
            .then_some(())
    })
    .await;
    assert_eq!(
        metric("warren_operator_topology_writes_total", "kind").await,
        writes + 1
    );
    for change in [
        json!({"spec": {"type": "fanout"}}),
        json!({"spec": {"durable": false}}),
        json!({"spec": {"internal": true}}),
    ] {
        let err = patch::<Exchange>(client, ns, "events", change.clone())
            .await
            .expect_err(&format!("{change}"));
        assert!(
            err.to_string()
                .contains("cannot be changed (the broker refuses to redeclare an exchange"),
            "{change}: {err}"
        );
    }
    patch::<Exchange>(
        client,
        ns,
        "events",
        json!({"spec": {"deletionPolicy": "retain"}}),
    )
    .await
    .expect("deletionPolicy is mutable");
    wait_generation::<Exchange>(client, ns, "events", 2).await;
    delete::<Exchange>(client, ns, "events").await;
    assert!(m.get(&xpath).await.is_some(), "retain keeps the exchange");
    m.delete(&xpath).await;
    let internal = format!("internal-{sfx}");
    let ipath = format!("/api/exchanges/%2F/{internal}");
    create::<Exchange>(
        client,
        ns,
        manifest(
            "Exchange",
            ns,
            "internal",
            t.spec(json!({"name": internal, "type": "fanout", "internal": true, "durable": false})),
        ),
    )
    .await;
    let x = m.wait("the internal exchange", &ipath, |_| true).await;
    assert_eq!(
        (&x["type"], &x["internal"], &x["durable"]),
        (&json!("fanout"), &json!(true), &json!(false)),
        "{x}"
    );
    wait_ready::<Exchange>(client, ns, "internal", "True").await;
    delete::<Exchange>(client, ns, "internal").await;
    m.wait_gone("the internal exchange removed", &ipath).await;

    // ---- Operator policies.
    let limits = format!("limits-{sfx}");
    let opath = format!("/api/operator-policies/%2F/{limits}");
    create::<OperatorPolicy>(
        client,
        ns,
        manifest(
            "OperatorPolicy",
            ns,
            "limits",
            t.spec(
                json!({"name": limits, "pattern": format!("^orders-{sfx}$"), "priority": 3,
                          "definition": {"max-length": 1000, "expires": 600000}}),
            ),
        ),
    )
    .await;
    let p = m
        .wait("the operator policy on the broker", &opath, |_| true)
        .await;
    assert_eq!(p["apply-to"], "queues", "{p}");
    assert_eq!(p["priority"], 3, "{p}");
    assert_eq!(
        p["definition"],
        json!({"max-length": 1000, "expires": 600000}),
        "{p}"
    );
    wait_generation::<OperatorPolicy>(client, ns, "limits", 1).await;
    patch::<OperatorPolicy>(
        client,
        ns,
        "limits",
        json!({"spec": {"definition": {"max-length": 500, "expires": null}}}),
    )
    .await
    .expect("patch operator policy");
    m.wait("the changed operator policy", &opath, |p| {
        p["definition"] == json!({"max-length": 500})
    })
    .await;
    wait_generation::<OperatorPolicy>(client, ns, "limits", 2).await;
    m.delete(&opath).await;
    m.wait("the operator policy restored", &opath, |_| true)
        .await;
    delete::<OperatorPolicy>(client, ns, "limits").await;
    m.wait_gone("the operator policy removed", &opath).await;
    create::<OperatorPolicy>(
        client,
        ns,
        manifest(
            "OperatorPolicy",
            ns,
            "kept",
            t.spec(
                json!({"name": format!("kept-{limits}"), "pattern": "^none$",
                          "definition": {"max-length": 1}, "deletionPolicy": "retain"}),
            ),
        ),
    )
    .await;
    let kpath = format!("/api/operator-policies/%2F/kept-{limits}");
    m.wait("the retained operator policy", &kpath, |_| true)
        .await;
    wait_ready::<OperatorPolicy>(client, ns, "kept", "True").await;
    delete::<OperatorPolicy>(client, ns, "kept").await;
    assert!(
        m.get(&kpath).await.is_some(),
        "retain keeps the operator policy"
    );
    m.delete(&kpath).await;
}

/// The bindings between source and destination, as the broker lists them.
async fn bindings(m: &Mgmt, path: &str) -> Vec<Value> {
    m.get(path)
        .await
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

/// Waits until the listing at `path` has (or, with `present` false, lacks) a binding with
/// routing key `key`; returns that binding.
async fn wait_binding(m: &Mgmt, path: &str, key: &str, present: bool) -> Option<Value> {
    wait_for(
        &format!("binding {key:?} at {path} present={present}"),
        LONG,
        || async move {
            let found = bindings(m, path)
                .await
                .into_iter()
                .find(|b| b["routing_key"] == key);
            match (found, present) {
                (Some(b), true) => Some(Some(b)),
                (None, false) => Some(None),
                _ => None,
            }
        },
    )
    .await
}

/// Bindings to a queue and to an exchange on `t`: refused while the queue is missing (the
/// broker's error in the condition), created, restored after a deletion on the broker,
/// immutable, deleted one at a time (another binding between the same ends stays) or retained.
async fn binding_scenario(client: &Client, ns: &str, t: &Target) {
    let m = &t.mgmt;
    let sfx = &t.suffix;
    let (src, dst_x, q) = (
        format!("bsrc-{sfx}"),
        format!("bdst-{sfx}"),
        format!("bq-{sfx}"),
    );
    m.put(
        &format!("/api/exchanges/%2F/{src}"),
        json!({"type": "topic", "durable": false}),
    )
    .await;
    m.put(
        &format!("/api/exchanges/%2F/{dst_x}"),
        json!({"type": "headers", "durable": false}),
    )
    .await;
    let qlist = format!("/api/bindings/%2F/e/{src}/q/{q}");
    let xlist = format!("/api/bindings/%2F/e/{src}/e/{dst_x}");

    // Exchange to exchange, with arguments (first: once it is Ready, the broker is known
    // to be reachable, and the binding below fails only for the missing queue, retried
    // within seconds rather than after a long backoff).
    create::<Binding>(
        client,
        ns,
        manifest(
            "Binding",
            ns,
            "eu",
            t.spec(
                json!({"source": src, "destination": dst_x, "destinationType": "exchange",
                          "arguments": {"x-match": "all", "region": "eu"}}),
            ),
        ),
    )
    .await;
    let eu = wait_binding(m, &xlist, "", true).await.expect("binding");
    assert_eq!(eu["destination_type"], "exchange", "{eu}");
    assert_eq!(
        eu["arguments"],
        json!({"x-match": "all", "region": "eu"}),
        "{eu}"
    );
    wait_generation::<Binding>(client, ns, "eu", 1).await;
    // The queue does not exist yet: the broker refuses, and says so in the condition.
    create::<Binding>(
        client,
        ns,
        manifest(
            "Binding",
            ns,
            "orders",
            t.spec(json!({"source": src, "destination": q, "routingKey": "order.*"})),
        ),
    )
    .await;
    let message = wait_for("the broker refusing the binding", LONG, || async {
        let st = status_of::<Binding>(client, ns, "orders").await;
        st["conditions"].as_array()?.iter().find_map(|c| {
            (c["type"] == "Ready" && c["status"] == "False" && c["reason"] == "BrokerRefused")
                .then(|| c["message"].as_str().unwrap_or_default().to_string())
        })
    })
    .await;
    assert!(message.contains(&q), "{message}");
    m.put(
        &format!("/api/queues/%2F/{q}"),
        json!({"durable": false, "arguments": {"x-queue-type": "classic"}}),
    )
    .await;
    let b = wait_binding(m, &qlist, "order.*", true)
        .await
        .expect("binding");
    assert_eq!(b["destination_type"], "queue", "{b}");
    wait_generation::<Binding>(client, ns, "orders", 1).await;
    // A second binding between the same ends.
    create::<Binding>(
        client,
        ns,
        manifest(
            "Binding",
            ns,
            "created",
            t.spec(json!({"source": src, "destination": q, "routingKey": "order.created"})),
        ),
    )
    .await;
    wait_binding(m, &qlist, "order.created", true).await;

    // Drift: deleted on the broker (by its properties key), it is bound again at the next
    // resync.
    let props = eu["properties_key"].as_str().expect("properties_key");
    m.delete(&format!("{xlist}/{}", urlencode(props))).await;
    wait_binding(m, &xlist, "", false).await;
    let b = wait_binding(m, &xlist, "", true)
        .await
        .expect("bound again");
    assert_eq!(b["arguments"]["region"], "eu", "{b}");

    // Nothing that identifies a binding can change.
    for change in [
        json!({"spec": {"routingKey": "other"}}),
        json!({"spec": {"destination": "elsewhere"}}),
        json!({"spec": {"destinationType": "queue"}}),
        json!({"spec": {"arguments": {"x-match": "any"}}}),
        json!({"spec": {"arguments": null}}),
    ] {
        let err = patch::<Binding>(client, ns, "eu", change.clone())
            .await
            .expect_err(&format!("{change}"));
        assert!(
            err.to_string()
                .contains("cannot be changed (they are what identifies a binding"),
            "{change}: {err}"
        );
    }

    // Deleting one Binding removes that binding only.
    delete::<Binding>(client, ns, "orders").await;
    wait_binding(m, &qlist, "order.*", false).await;
    assert!(
        bindings(m, &qlist)
            .await
            .iter()
            .any(|b| b["routing_key"] == "order.created"),
        "the other binding between the same ends stays"
    );
    delete::<Binding>(client, ns, "created").await;
    wait_binding(m, &qlist, "order.created", false).await;
    // Retain keeps it.
    patch::<Binding>(
        client,
        ns,
        "eu",
        json!({"spec": {"deletionPolicy": "retain"}}),
    )
    .await
    .expect("deletionPolicy is mutable");
    wait_generation::<Binding>(client, ns, "eu", 2).await;
    delete::<Binding>(client, ns, "eu").await;
    assert!(
        !bindings(m, &xlist).await.is_empty(),
        "retain keeps the binding"
    );
    // Leave nothing behind on a broker that outlives the test.
    m.delete(&format!("/api/queues/%2F/{q}")).await;
    m.delete(&format!("/api/exchanges/%2F/{dst_x}")).await;
    m.delete(&format!("/api/exchanges/%2F/{src}")).await;
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn bindings_reach_warren() {
    let client = client().await;
    ensure_crds(&client).await;
    let ns = namespace(&client, "bindings").await;
    let op = Operator::start_with(&ns, &["--topology-resync-seconds", "2"]);
    let (target, _broker) = Target::warren(&client, &ns, &op).await;
    binding_scenario(&client, &ns, &target).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bindings_reach_a_stock_rabbitmq() {
    let client = client().await;
    ensure_crds(&client).await;
    let ns = namespace(&client, "bindings-stock").await;
    let op = Operator::start_with(&ns, &["--topology-resync-seconds", "2"]);
    let target = Target::rabbitmq(&client, &ns, &op).await;
    binding_scenario(&client, &ns, &target).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn queues_exchanges_and_operator_policies_reach_warren() {
    let client = client().await;
    ensure_crds(&client).await;
    let ns = namespace(&client, "queues").await;
    let op = Operator::start_with(&ns, &["--topology-resync-seconds", "2"]);
    let (target, _broker) = Target::warren(&client, &ns, &op).await;
    queue_scenario(&client, &ns, &target).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn queues_exchanges_and_operator_policies_reach_a_stock_rabbitmq() {
    let client = client().await;
    ensure_crds(&client).await;
    let ns = namespace(&client, "queues-stock").await;
    let op = Operator::start_with(&ns, &["--topology-resync-seconds", "2"]);
    let target = Target::rabbitmq(&client, &ns, &op).await;
    queue_scenario(&client, &ns, &target).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn vhosts_users_and_permissions_reach_warren() {
    let client = client().await;
    ensure_crds(&client).await;
    let ns = namespace(&client, "kinds").await;
    let op = Operator::start_with(&ns, &["--topology-resync-seconds", "600"]);
    let (target, _broker) = Target::warren(&client, &ns, &op).await;
    scenario(&client, &ns, &target).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn vhosts_users_and_permissions_reach_a_stock_rabbitmq() {
    let client = client().await;
    ensure_crds(&client).await;
    let ns = namespace(&client, "kinds-stock").await;
    let op = Operator::start_with(&ns, &["--topology-resync-seconds", "600"]);
    let target = Target::rabbitmq(&client, &ns, &op).await;
    scenario(&client, &ns, &target).await;
}

/// Every topology kind refuses a change of `rabbitClusterReference` or `connectionSecret`
/// (the object would stay behind on the old broker). No operator runs: this is the API
/// server applying the CRDs' rules.
#[tokio::test(flavor = "multi_thread")]
async fn the_broker_of_a_topology_resource_cannot_be_changed() {
    let client = client().await;
    ensure_crds(&client).await;
    let ns = namespace(&client, "immutable").await;
    let target = json!({"rabbitClusterReference": {"name": "a"}});
    let with = |mut spec: Value| {
        spec["rabbitClusterReference"] = target["rabbitClusterReference"].clone();
        spec
    };
    create::<Policy>(
        &client,
        &ns,
        manifest(
            "Policy",
            &ns,
            "p",
            with(json!({"pattern": ".", "definition": {"expires": 5}})),
        ),
    )
    .await;
    create::<Federation>(
        &client,
        &ns,
        manifest(
            "Federation",
            &ns,
            "f",
            with(json!({"uriSecret": {"name": "s"}})),
        ),
    )
    .await;
    create::<Shovel>(
        &client,
        &ns,
        manifest(
            "Shovel",
            &ns,
            "s",
            with(json!({"uriSecret": {"name": "s"}, "srcQueue": "a", "destQueue": "b"})),
        ),
    )
    .await;
    create::<Vhost>(&client, &ns, manifest("Vhost", &ns, "v", with(json!({})))).await;
    create::<User>(&client, &ns, manifest("User", &ns, "u", with(json!({})))).await;
    create::<Permission>(
        &client,
        &ns,
        manifest("Permission", &ns, "pm", with(json!({"user": "x"}))),
    )
    .await;
    create::<TopicPermission>(
        &client,
        &ns,
        manifest(
            "TopicPermission",
            &ns,
            "tp",
            with(json!({"user": "x", "exchange": "amq.topic"})),
        ),
    )
    .await;
    create::<Queue>(&client, &ns, manifest("Queue", &ns, "q", with(json!({})))).await;
    create::<Exchange>(
        &client,
        &ns,
        manifest("Exchange", &ns, "x", with(json!({}))),
    )
    .await;
    create::<OperatorPolicy>(
        &client,
        &ns,
        manifest(
            "OperatorPolicy",
            &ns,
            "op",
            with(json!({"pattern": ".", "definition": {"max-length": 1}})),
        ),
    )
    .await;
    let changes = [
        json!({"spec": {"rabbitClusterReference": {"name": "b"}}}),
        json!({"spec": {"rabbitClusterReference": {"name": "a", "namespace": "elsewhere"}}}),
        json!({"spec": {"rabbitClusterReference": null, "connectionSecret": {"name": "c"}}}),
    ];
    macro_rules! refused_for {
        ($kind:ty, $name:expr) => {
            for change in &changes {
                let err = patch::<$kind>(&client, &ns, $name, change.clone())
                    .await
                    .expect_err(&format!("{} {change}", $name));
                assert!(
                    err.to_string().contains("cannot be changed")
                        && err.to_string().contains("delete this resource"),
                    "{}: {err}",
                    $name
                );
            }
        };
    }
    refused_for!(Policy, "p");
    refused_for!(Federation, "f");
    refused_for!(Shovel, "s");
    refused_for!(Vhost, "v");
    refused_for!(User, "u");
    refused_for!(Permission, "pm");
    refused_for!(TopicPermission, "tp");
    refused_for!(Queue, "q");
    refused_for!(Exchange, "x");
    refused_for!(OperatorPolicy, "op");
    create::<Binding>(
        &client,
        &ns,
        manifest(
            "Binding",
            &ns,
            "b",
            with(json!({"source": "x", "destination": "q"})),
        ),
    )
    .await;
    refused_for!(Binding, "b");

    // A resource created with connectionSecret keeps it too.
    create::<Vhost>(
        &client,
        &ns,
        manifest(
            "Vhost",
            &ns,
            "by-secret",
            json!({"connectionSecret": {"name": "c"}}),
        ),
    )
    .await;
    let err = patch::<Vhost>(
        &client,
        &ns,
        "by-secret",
        json!({"spec": {"connectionSecret": {"name": "d"}}}),
    )
    .await
    .expect_err("connectionSecret changed");
    assert!(
        err.to_string()
            .contains("connectionSecret cannot be changed"),
        "{err}"
    );
    // Other fields still change.
    patch::<Vhost>(
        &client,
        &ns,
        "by-secret",
        json!({"spec": {"description": "still editable"}}),
    )
    .await
    .expect("a description change is allowed");
}

/// `--namespace a,b`: one operator configures the resources of both namespaces and leaves
/// those of a third alone.
#[tokio::test(flavor = "multi_thread")]
async fn one_operator_watches_a_list_of_namespaces() {
    let client = client().await;
    ensure_crds(&client).await;
    let a = namespace(&client, "watch-a").await;
    let b = namespace(&client, "watch-b").await;
    let other = namespace(&client, "watch-other").await;
    let _op = Operator::start_watching(&[a.as_str(), b.as_str()], &[], &[]);
    let broker = Broker::start().await;
    let m = Mgmt::of(&broker);
    for ns in [&a, &b, &other] {
        secret(
            &client,
            ns,
            "broker",
            json!({"uri": m.url, "username": "guest", "password": "guest"}),
        )
        .await;
        create::<Vhost>(
            &client,
            ns,
            manifest(
                "Vhost",
                ns,
                "v",
                json!({"name": ns, "connectionSecret": {"name": "broker"}}),
            ),
        )
        .await;
    }
    m.wait(
        "the vhost of the first namespace",
        &format!("/api/vhosts/{a}"),
        |_| true,
    )
    .await;
    m.wait(
        "the vhost of the second namespace",
        &format!("/api/vhosts/{b}"),
        |_| true,
    )
    .await;
    wait_ready::<Vhost>(&client, &a, "v", "True").await;
    wait_ready::<Vhost>(&client, &b, "v", "True").await;
    // Both are done; the third namespace's resource was never looked at.
    assert!(m.get(&format!("/api/vhosts/{other}")).await.is_none());
    let untouched = Api::<Vhost>::namespaced(client.clone(), &other)
        .get("v")
        .await
        .expect("vhost");
    assert!(untouched.status.is_none(), "{:?}", untouched.status);
    assert!(untouched.metadata.finalizers.is_none());
    delete::<Vhost>(&client, &a, "v").await;
    m.wait_gone("the first vhost removed", &format!("/api/vhosts/{a}"))
        .await;
    delete::<Vhost>(&client, &b, "v").await;
    m.wait_gone("the second vhost removed", &format!("/api/vhosts/{b}"))
        .await;
}

/// A resource whose connection Secret is gone (deleted by hand, or before it when their
/// namespace is deleted) can still be deleted: the operator cannot know its broker any more,
/// so it removes its finalizer and says, in a Warning Event, what the broker may still hold.
#[tokio::test(flavor = "multi_thread")]
async fn a_resource_whose_connection_secret_is_gone_can_still_be_deleted() {
    let client = client().await;
    ensure_crds(&client).await;
    let ns = namespace(&client, "orphan").await;
    let _op = Operator::start_watching(&[ns.as_str()], &[], &[]);
    let broker = Broker::start().await;
    let m = Mgmt::of(&broker);
    secret(
        &client,
        &ns,
        "broker",
        json!({"uri": m.url, "username": "guest", "password": "guest"}),
    )
    .await;
    create::<Queue>(
        &client,
        &ns,
        manifest(
            "Queue",
            &ns,
            "orphan",
            json!({"connectionSecret": {"name": "broker"}}),
        ),
    )
    .await;
    wait_ready::<Queue>(&client, &ns, "orphan", "True").await;
    m.wait("the queue declared", "/api/queues/%2F/orphan", |_| true)
        .await;
    Api::<Secret>::namespaced(client.clone(), &ns)
        .delete("broker", &Default::default())
        .await
        .expect("delete the Secret");
    // Returns once the resource is gone (its finalizer removed).
    delete::<Queue>(&client, &ns, "orphan").await;
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), &ns)
        .list(&Default::default())
        .await
        .expect("events");
    assert!(
        events.items.iter().any(|e| {
            e.reason.as_deref() == Some("SecretNotFound")
                && e.type_.as_deref() == Some("Warning")
                && e.note.as_deref().is_some_and(|n| {
                    n.contains("queue orphan") && n.contains("broker may still hold it")
                })
        }),
        "no Warning Event naming the queue left behind: {:?}",
        events
            .items
            .iter()
            .map(|e| (&e.reason, &e.note))
            .collect::<Vec<_>>()
    );
    // The broker was not reachable through the resource any more: its queue is still there.
    assert!(m.get("/api/queues/%2F/orphan").await.is_some());
}
