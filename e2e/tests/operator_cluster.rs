//! The operator's RabbitCluster controller against the real control plane: kube-apiserver,
//! kube-controller-manager (StatefulSet controller, garbage collector), kube-scheduler and
//! kwok playing the nodes. Each test has its own namespace and its own operator process.

use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{
    ConfigMap, Event, PersistentVolumeClaim, Pod, Secret, Service, ServiceAccount,
};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use warren_e2e::{Broker, Operator, TestPki, client, ensure_crds, namespace, wait_for};
use warren_operator::crd::RabbitCluster;

const LONG: Duration = Duration::from_secs(120);

async fn setup(prefix: &str) -> (Client, String, Operator) {
    let client = client().await;
    ensure_crds(&client).await;
    let ns = namespace(&client, prefix).await;
    let op = Operator::start(&ns);
    (client, ns, op)
}

async fn create_cluster(client: &Client, ns: &str, manifest: serde_json::Value) -> RabbitCluster {
    let rc: RabbitCluster = serde_json::from_value(manifest).expect("manifest");
    Api::<RabbitCluster>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &rc)
        .await
        .expect("create RabbitCluster")
}

async fn patch_cluster(client: &Client, ns: &str, name: &str, patch: serde_json::Value) {
    Api::<RabbitCluster>::namespaced(client.clone(), ns)
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("patch RabbitCluster");
}

fn condition(rc: &RabbitCluster, type_: &str) -> Option<(String, String, String)> {
    rc.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// Waits until condition `type_` has `status`; returns its message.
async fn wait_condition(
    client: &Client,
    ns: &str,
    name: &str,
    type_: &str,
    status: &str,
) -> String {
    let api = Api::<RabbitCluster>::namespaced(client.clone(), ns);
    wait_for(&format!("{name} {type_}={status}"), LONG, || {
        let api = api.clone();
        async move {
            let rc = api.get(name).await.ok()?;
            let (s, _, m) = condition(&rc, type_)?;
            (s == status).then_some(m)
        }
    })
    .await
}

/// The Secret `imported-user` holding the test brokers' credentials (guest), for a
/// cluster's `defaultUser.secretName`.
async fn import_guest_user(client: &Client, ns: &str) {
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "imported-user", "namespace": ns},
        "stringData": {"username": "guest", "password": "guest"},
    }))
    .expect("secret");
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &secret)
        .await
        .expect("secret");
}

async fn wait_settled(client: &Client, ns: &str, name: &str, replicas: i32) {
    let api = Api::<RabbitCluster>::namespaced(client.clone(), ns);
    wait_for(
        &format!("{name} settled with {replicas} ready nodes"),
        LONG,
        || {
            let api = api.clone();
            async move {
                let rc = api.get(name).await.ok()?;
                let st = rc.status.as_ref()?;
                let ok = st.ready_replicas == replicas
                    && st.observed_generation == rc.metadata.generation
                    && condition(&rc, "AllReplicasReady")?.0 == "True"
                    && condition(&rc, "Progressing")?.0 == "False"
                    && condition(&rc, "ReconcileSuccess")?.0 == "True";
                ok.then_some(())
            }
        },
    )
    .await;
}

async fn pods(client: &Client, ns: &str, cluster: &str) -> Vec<Pod> {
    Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&format!("app.kubernetes.io/name={cluster}")))
        .await
        .expect("list pods")
        .items
}

async fn events(client: &Client, ns: &str) -> Vec<(String, String)> {
    Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .map(|e| (e.reason.unwrap_or_default(), e.message.unwrap_or_default()))
        .collect()
}

fn is_owned_by(meta: &kube::api::ObjectMeta, rc: &RabbitCluster) -> bool {
    meta.owner_references.as_ref().is_some_and(|o| {
        o.iter().any(|r| {
            r.kind == "RabbitCluster"
                && r.name == rc.name_any()
                && Some(&r.uid) == rc.metadata.uid.as_ref()
        })
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_gets_every_object_its_pods_and_its_status() {
    let (client, ns, op) = setup("lifecycle").await;
    create_cluster(
        &client,
        &ns,
        json!({
            "apiVersion": "warren.dev/v1alpha1",
            "kind": "RabbitCluster",
            "metadata": {"name": "hare", "namespace": ns},
            "spec": {"replicas": 3, "persistence": {"storage": "0"}, "config": {"heartbeat": 30}},
        }),
    )
    .await;
    wait_settled(&client, &ns, "hare", 3).await;
    let rc = Api::<RabbitCluster>::namespaced(client.clone(), &ns)
        .get("hare")
        .await
        .expect("get");

    // Every owned object exists, owned by the cluster, with the right content.
    let svc = Api::<Service>::namespaced(client.clone(), &ns);
    let nodes = svc.get("hare-nodes").await.expect("headless service");
    assert!(is_owned_by(&nodes.metadata, &rc));
    let spec = nodes.spec.expect("spec");
    assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
    assert_eq!(spec.publish_not_ready_addresses, Some(true));
    let client_svc = svc.get("hare").await.expect("client service");
    assert!(is_owned_by(&client_svc.metadata, &rc));
    let ports: Vec<i32> = client_svc
        .spec
        .expect("spec")
        .ports
        .expect("ports")
        .iter()
        .map(|p| p.port)
        .collect();
    assert_eq!(ports, vec![5672, 15672, 15692]);

    let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
    let user = secrets
        .get("hare-default-user")
        .await
        .expect("default user secret");
    assert!(is_owned_by(&user.metadata, &rc));
    let data = user.data.expect("data");
    for key in [
        "username", "password", "host", "port", "uri", "type", "provider",
    ] {
        assert!(data.contains_key(key), "default-user secret lacks {key}");
    }
    let text = |k: &str| String::from_utf8(data[k].0.clone()).expect("utf8");
    assert_eq!(text("host"), format!("hare.{ns}.svc"));
    assert!(text("uri").starts_with("amqp://default_user_"));
    assert!(text("password").len() >= 24);
    let cluster_secret = secrets
        .get("hare-cluster-secret")
        .await
        .expect("cluster secret");
    assert!(is_owned_by(&cluster_secret.metadata, &rc));

    let cm = Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .get("hare-config")
        .await
        .expect("configmap");
    assert!(is_owned_by(&cm.metadata, &rc));
    let toml_text = cm.data.expect("data")["warren.toml"].clone();
    assert!(toml_text.contains("heartbeat = 30"), "{toml_text}");

    let sa = Api::<ServiceAccount>::namespaced(client.clone(), &ns)
        .get("hare-server")
        .await
        .expect("sa");
    assert!(is_owned_by(&sa.metadata, &rc));
    assert_eq!(sa.automount_service_account_token, Some(false));
    let pdb = Api::<PodDisruptionBudget>::namespaced(client.clone(), &ns)
        .get("hare-server")
        .await
        .expect("pdb");
    assert!(is_owned_by(&pdb.metadata, &rc));

    let sts = Api::<StatefulSet>::namespaced(client.clone(), &ns)
        .get("hare-server")
        .await
        .expect("sts");
    assert!(is_owned_by(&sts.metadata, &rc));
    let managers: Vec<String> = sts
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| m.operation.as_deref() == Some("Apply"))
        .filter_map(|m| m.manager.clone())
        .collect();
    assert_eq!(
        managers,
        vec!["warren-operator".to_string()],
        "one field manager, server-side apply"
    );

    // The StatefulSet controller made the pods; kwok ran them.
    let p = pods(&client, &ns, "hare").await;
    assert_eq!(p.len(), 3);
    for pod in &p {
        let spec = pod.spec.as_ref().expect("pod spec");
        assert!(spec.node_name.is_some(), "pod {} scheduled", pod.name_any());
        let c = &spec.containers[0];
        assert_eq!(
            c.security_context
                .as_ref()
                .and_then(|s| s.read_only_root_filesystem),
            Some(true)
        );
    }

    // Status.
    let st = rc.status.expect("status");
    assert_eq!(st.ready_replicas, 3);
    assert_eq!(st.replicas, 3);
    assert_eq!(
        st.selector,
        "app.kubernetes.io/component=broker,app.kubernetes.io/name=hare"
    );
    let du = st.default_user.expect("defaultUser");
    assert_eq!(du.secret_reference.name, "hare-default-user");
    assert_eq!(du.service_reference.name, "hare");
    assert_eq!(condition_of(&st.conditions, "Available"), "True");

    // Events for what it did.
    let ev = events(&client, &ns).await;
    assert!(
        ev.iter()
            .any(|(r, m)| r == "Created" && m.contains("StatefulSet hare-server")),
        "{ev:?}"
    );

    // Its own metrics count the reconciles.
    let metrics = reqwest::get(format!("{}/metrics", op.metrics_url))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("warren_operator_reconciliations_total{controller=\"rabbitcluster\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("warren_operator_reconcile_duration_seconds_bucket"));
    assert!(metrics.contains("warren_operator_leader 1"));
    for path in ["healthz", "readyz"] {
        let r = reqwest::get(format!("{}/{path}", op.metrics_url))
            .await
            .expect(path);
        assert!(r.status().is_success(), "/{path}");
    }
    // Its text log goes to a file: plain text, no colour codes.
    let log = op.log_text();
    assert!(log.contains("INFO"), "the operator logged nothing:\n{log}");
    assert!(
        !log.contains('\x1b'),
        "colour codes in the log file:\n{log}"
    );

    // Deleting the cluster cascades through the owner references (the garbage collector).
    Api::<RabbitCluster>::namespaced(client.clone(), &ns)
        .delete("hare", &DeleteParams::default())
        .await
        .expect("delete");
    let sts_api = Api::<StatefulSet>::namespaced(client.clone(), &ns);
    let cm_api = Api::<ConfigMap>::namespaced(client.clone(), &ns);
    wait_for("owned objects garbage-collected", LONG, || {
        let (sts_api, cm_api, svc, secrets) = (
            sts_api.clone(),
            cm_api.clone(),
            svc.clone(),
            secrets.clone(),
        );
        async move {
            let gone = sts_api.get_opt("hare-server").await.ok()?.is_none()
                && cm_api.get_opt("hare-config").await.ok()?.is_none()
                && svc.get_opt("hare").await.ok()?.is_none()
                && secrets.get_opt("hare-default-user").await.ok()?.is_none();
            gone.then_some(())
        }
    })
    .await;
    wait_for("the RabbitCluster gone (finalizer removed)", LONG, || {
        let api = Api::<RabbitCluster>::namespaced(client.clone(), &ns);
        async move { api.get_opt("hare").await.ok()?.is_none().then_some(()) }
    })
    .await;
}

fn condition_of(
    c: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    t: &str,
) -> String {
    c.iter()
        .find(|c| c.type_ == t)
        .map(|c| c.status.clone())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn scale_up_and_a_config_change_rolls_one_pod_at_a_time() {
    let (client, ns, _op) = setup("roll").await;
    create_cluster(
        &client,
        &ns,
        json!({
            "apiVersion": "warren.dev/v1alpha1",
            "kind": "RabbitCluster",
            "metadata": {"name": "roll", "namespace": ns},
            "spec": {"replicas": 1, "persistence": {"storage": "0"}},
        }),
    )
    .await;
    wait_settled(&client, &ns, "roll", 1).await;
    patch_cluster(&client, &ns, "roll", json!({"spec": {"replicas": 3}})).await;
    wait_settled(&client, &ns, "roll", 3).await;

    let hash = |p: &Pod| {
        p.labels()
            .get("controller-revision-hash")
            .cloned()
            .unwrap_or_default()
    };
    let before: Vec<String> = pods(&client, &ns, "roll").await.iter().map(hash).collect();
    let old = before[0].clone();
    assert!(before.iter().all(|h| *h == old));

    // Change the configuration: the pod template's config hash changes and the StatefulSet
    // controller replaces the pods one by one. Watch that never more than one is missing.
    patch_cluster(
        &client,
        &ns,
        "roll",
        json!({"spec": {"config": {"heartbeat": 20}}}),
    )
    .await;
    let mut fewest_ready = 3;
    let start = std::time::Instant::now();
    loop {
        let p = pods(&client, &ns, "roll").await;
        let ready = p
            .iter()
            .filter(|p| {
                p.metadata.deletion_timestamp.is_none()
                    && p.status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            })
            .count();
        fewest_ready = fewest_ready.min(ready);
        if p.len() == 3 && ready == 3 && p.iter().all(|p| hash(p) != old) {
            break;
        }
        assert!(
            start.elapsed() < LONG,
            "roll did not finish: {:?}",
            p.iter().map(hash).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        fewest_ready >= 2,
        "the roll took down more than one node at once (min ready {fewest_ready})"
    );
    wait_settled(&client, &ns, "roll", 3).await;
    let cm = Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .get("roll-config")
        .await
        .expect("cm");
    assert!(cm.data.expect("data")["warren.toml"].contains("heartbeat = 20"));
}

#[tokio::test(flavor = "multi_thread")]
async fn scale_down_drains_the_node_through_the_broker_first() {
    let (client, ns, _op) = setup("drain").await;
    let broker = Broker::start().await;
    // A queue with messages on the "node" that will be removed.
    let conn = lapin::Connection::connect(
        &format!("amqp://guest:guest@127.0.0.1:{}/%2F", broker.amqp_port),
        lapin::ConnectionProperties::default(),
    )
    .await
    .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_declare(
        "orders".into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        Default::default(),
    )
    .await
    .expect("declare");
    for _ in 0..3 {
        ch.basic_publish(
            "".into(),
            "orders".into(),
            Default::default(),
            b"x",
            Default::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("publish done");
    }
    // The cluster's default user is imported from a Secret holding the broker's
    // credentials, and the management URL points at the broker.
    import_guest_user(&client, &ns).await;
    create_cluster(
        &client,
        &ns,
        json!({
            "apiVersion": "warren.dev/v1alpha1",
            "kind": "RabbitCluster",
            "metadata": {"name": "drain", "namespace": ns,
                         "annotations": {"warren.dev/management-uri": "http://127.0.0.1:1"}},
            "spec": {"replicas": 3, "persistence": {"storage": "0"},
                     "defaultUser": {"secretName": "imported-user"}},
        }),
    )
    .await;
    wait_settled(&client, &ns, "drain", 3).await;

    // While the node cannot be reached, the scale-down waits and says why.
    patch_cluster(&client, &ns, "drain", json!({"spec": {"replicas": 2}})).await;
    let message = wait_condition(&client, &ns, "drain", "Progressing", "True").await;
    let api = Api::<RabbitCluster>::namespaced(client.clone(), &ns);
    let message = wait_for("a drain failure reported", LONG, || {
        let api = api.clone();
        async move {
            let rc = api.get("drain").await.ok()?;
            let (_, _, m) = condition(&rc, "Progressing")?;
            m.contains("cannot drain drain-server-2").then_some(m)
        }
    })
    .await
    .to_string()
        + &message;
    assert!(message.contains("unreachable"), "{message}");
    let sts_api = Api::<StatefulSet>::namespaced(client.clone(), &ns);
    let sts = sts_api.get("drain-server").await.expect("sts");
    assert_eq!(
        sts.spec.and_then(|s| s.replicas),
        Some(3),
        "no scale-down without a drain"
    );
    assert!(
        events(&client, &ns)
            .await
            .iter()
            .any(|(r, _)| r == "DrainFailed")
    );

    // Point the operator at the broker: it drains, reports the queues left, then shrinks.
    patch_cluster(
        &client,
        &ns,
        "drain",
        json!({"metadata": {"annotations": {
            "warren.dev/management-uri": broker.management_url,
        }}}),
    )
    .await;
    wait_settled(&client, &ns, "drain", 2).await;
    let rc = api.get("drain").await.expect("get");
    let drained = rc.status.expect("status").drained_nodes;
    assert_eq!(drained.len(), 1, "{drained:?}");
    assert_eq!(drained[0].pod, "drain-server-2");
    assert!(
        drained[0]
            .queues
            .iter()
            .any(|q| q == "//orders: 3 messages"),
        "{drained:?}"
    );
    assert_eq!(
        sts_api
            .get("drain-server")
            .await
            .expect("sts")
            .spec
            .and_then(|s| s.replicas),
        Some(2)
    );
    assert!(
        events(&client, &ns)
            .await
            .iter()
            .any(|(r, m)| r == "Drained" && m.contains("orders"))
    );
    // The drained broker closed its clients.
    wait_for(
        "the client connection closed by the drain",
        Duration::from_secs(10),
        || {
            let status = conn.status().connected();
            async move { (!status).then_some(()) }
        },
    )
    .await;
}

/// A scale-down of a real 3-node Warren cluster: the node is removed from the StatefulSet,
/// and once it has stopped the operator removes it from the brokers' membership (forget),
/// so the cluster's majority is counted over the nodes that are left. The brokers are real
/// processes named as the pods are (kwok runs the pods); the management-uri annotation sends
/// the operator's calls to the first of them.
#[tokio::test(flavor = "multi_thread")]
async fn scale_down_forgets_the_removed_node_once_it_has_stopped() {
    let (client, ns, _op) = setup("forget").await;
    let names: Vec<String> = (0..3)
        .map(|i| format!("warren@forget-server-{i}.forget-nodes.{ns}"))
        .collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut brokers = Broker::start_cluster(&refs).await;
    import_guest_user(&client, &ns).await;
    create_cluster(
        &client,
        &ns,
        json!({
            "apiVersion": "warren.dev/v1alpha1",
            "kind": "RabbitCluster",
            "metadata": {"name": "forget", "namespace": ns,
                         "annotations": {"warren.dev/management-uri": brokers[0].management_url}},
            "spec": {"replicas": 3, "persistence": {"storage": "0"},
                     "defaultUser": {"secretName": "imported-user"}},
        }),
    )
    .await;
    wait_settled(&client, &ns, "forget", 3).await;

    // The StatefulSet shrinks; while the removed node's broker still runs, the brokers
    // refuse to forget it and the operator says so.
    patch_cluster(&client, &ns, "forget", json!({"spec": {"replicas": 2}})).await;
    let api = Api::<RabbitCluster>::namespaced(client.clone(), &ns);
    let message = wait_for("the forget refused while the node runs", LONG, || {
        let api = api.clone();
        async move {
            let rc = api.get("forget").await.ok()?;
            let (_, _, m) = condition(&rc, "Progressing")?;
            m.contains("cannot remove").then_some(m)
        }
    })
    .await;
    assert!(message.contains("is running"), "{message}");
    let sts_api = Api::<StatefulSet>::namespaced(client.clone(), &ns);
    assert_eq!(
        sts_api
            .get("forget-server")
            .await
            .expect("sts")
            .spec
            .and_then(|s| s.replicas),
        Some(2)
    );

    // The node stops (its pod is gone): it is forgotten, and the cluster's metadata group
    // has the two nodes left as its voters.
    brokers[2].kill();
    wait_settled(&client, &ns, "forget", 2).await;
    let rc = api.get("forget").await.expect("get");
    let drained = rc.status.expect("status").drained_nodes;
    assert!(
        drained
            .iter()
            .any(|d| d.pod == "forget-server-2" && d.forgotten),
        "{drained:?}"
    );
    let meta = brokers[0]
        .get("/api/warren/metadata")
        .await
        .expect("metadata");
    let voters: Vec<&str> = meta["voters"]
        .as_array()
        .expect("voters")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(voters.len(), 2, "{meta}");
    assert!(!voters.contains(&names[2].as_str()), "{meta}");
    let nodes = brokers[0].get("/api/nodes").await.expect("nodes");
    assert_eq!(nodes.as_array().map(Vec::len), Some(2), "{nodes}");
    assert!(
        events(&client, &ns)
            .await
            .iter()
            .any(|(r, m)| r == "Forgotten" && m.contains("forget-server-2"))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tls_only_cluster_is_drained_over_https() {
    let (client, ns, _op) = setup("drain-https").await;
    // The broker serves its management API over HTTPS only; the CA that signed its
    // certificate is the ca.crt of the cluster's TLS Secret.
    let pki = TestPki::new("drain");
    let broker = Broker::start_https_only(&pki).await;
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
    for (name, data) in [
        (
            "imported-user",
            json!({"username": "guest", "password": "guest"}),
        ),
        (
            "drain-tls",
            json!({"tls.crt": pki.cert_pem, "tls.key": pki.key_pem, "ca.crt": pki.ca_pem}),
        ),
    ] {
        let secret: Secret = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "namespace": ns},
            "stringData": data,
        }))
        .expect("secret");
        secrets
            .create(&PostParams::default(), &secret)
            .await
            .expect("secret");
    }
    create_cluster(
        &client,
        &ns,
        json!({
            "apiVersion": "warren.dev/v1alpha1",
            "kind": "RabbitCluster",
            "metadata": {"name": "drain", "namespace": ns,
                         "annotations": {"warren.dev/management-uri": broker.management_url}},
            "spec": {"replicas": 2, "persistence": {"storage": "0"},
                     "defaultUser": {"secretName": "imported-user"},
                     "tls": {"secretName": "drain-tls", "disableNonTLSListeners": true}},
        }),
    )
    .await;
    wait_settled(&client, &ns, "drain", 2).await;
    patch_cluster(&client, &ns, "drain", json!({"spec": {"replicas": 1}})).await;
    wait_settled(&client, &ns, "drain", 1).await;
    let rc = Api::<RabbitCluster>::namespaced(client.clone(), &ns)
        .get("drain")
        .await
        .expect("get");
    let drained = rc.status.expect("status").drained_nodes;
    assert_eq!(drained.len(), 1, "{drained:?}");
    assert_eq!(drained[0].pod, "drain-server-1");
    let nodes = broker.get("/api/nodes").await.expect("nodes");
    assert_eq!(nodes[0]["being_drained"], true, "{nodes}");
    let _ = std::fs::remove_dir_all(&pki.dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_spec_is_refused_by_the_api_server_or_reported_in_status() {
    let (client, ns, _op) = setup("invalid").await;
    // Refused by the schema.
    for (spec, expect) in [
        (json!({"replicas": -1}), "spec.replicas"),
        (
            json!({"config": {"memoryHighWatermark": 1.5}}),
            "memoryHighWatermark is a fraction",
        ),
        (json!({"service": {"type": "Ingress"}}), "spec.service.type"),
        (
            json!({"config": {"logLevel": "loud"}}),
            "spec.config.logLevel",
        ),
        (
            json!({"persistence": {"storage": "lots"}}),
            "storage is a quantity",
        ),
        (
            json!({"config": {"diskFreeLimit": "plenty"}}),
            "diskFreeLimit is a quantity",
        ),
        (json!({"replicaz": 3}), "field not declared in schema"),
    ] {
        let raw = json!({
            "apiVersion": "warren.dev/v1alpha1", "kind": "RabbitCluster",
            "metadata": {"name": "bad", "namespace": ns}, "spec": spec,
        });
        // Sent as raw JSON with strict field validation, as `kubectl apply` does.
        let dyn_api: Api<kube::api::DynamicObject> = Api::namespaced_with(
            client.clone(),
            &ns,
            &kube::api::ApiResource::erase::<RabbitCluster>(&()),
        );
        let obj: kube::api::DynamicObject = serde_json::from_value(raw).expect("dynamic");
        let pp = PatchParams {
            field_validation: Some(kube::api::ValidationDirective::Strict),
            ..PatchParams::apply("e2e")
        };
        let err = dyn_api
            .patch("bad", &pp, &Patch::Apply(&obj))
            .await
            .expect_err(&format!("{spec} must be refused"));
        assert!(err.to_string().contains(expect), "{spec}: {err}");
    }
    // Valid for the schema, not for the broker: ReconcileSuccess=False says what to fix,
    // and nothing is created until it is fixed.
    create_cluster(
        &client,
        &ns,
        json!({
            "apiVersion": "warren.dev/v1alpha1", "kind": "RabbitCluster",
            "metadata": {"name": "typo", "namespace": ns},
            "spec": {"replicas": 1, "persistence": {"storage": "0"},
                     "config": {"additionalConfig": {"hartbeat": "10"}}},
        }),
    )
    .await;
    let message = wait_condition(&client, &ns, "typo", "ReconcileSuccess", "False").await;
    assert!(
        message.contains("spec.config.additionalConfig.hartbeat"),
        "{message}"
    );
    assert!(message.contains("not a broker setting"), "{message}");
    assert!(
        Api::<StatefulSet>::namespaced(client.clone(), &ns)
            .get_opt("typo-server")
            .await
            .expect("get")
            .is_none()
    );
    patch_cluster(
        &client,
        &ns,
        "typo",
        json!({"spec": {"config": {"additionalConfig": null}}}),
    )
    .await;
    wait_settled(&client, &ns, "typo", 1).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_pause_label_stops_reconciliation_until_removed() {
    let (client, ns, _op) = setup("pause").await;
    create_cluster(
        &client,
        &ns,
        json!({
            "apiVersion": "warren.dev/v1alpha1", "kind": "RabbitCluster",
            "metadata": {"name": "p", "namespace": ns},
            "spec": {"replicas": 1, "persistence": {"storage": "0"}},
        }),
    )
    .await;
    wait_settled(&client, &ns, "p", 1).await;
    patch_cluster(&client, &ns, "p", json!({"metadata": {"labels": {"warren.dev/pause-reconciliation": "true"}}, "spec": {"replicas": 2}})).await;
    let message = wait_condition(&client, &ns, "p", "ReconcileSuccess", "False").await;
    assert!(message.contains("paused"), "{message}");
    let sts_api = Api::<StatefulSet>::namespaced(client.clone(), &ns);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        sts_api
            .get("p-server")
            .await
            .expect("sts")
            .spec
            .and_then(|s| s.replicas),
        Some(1)
    );
    patch_cluster(
        &client,
        &ns,
        "p",
        json!({"metadata": {"labels": {"warren.dev/pause-reconciliation": null}}}),
    )
    .await;
    wait_settled(&client, &ns, "p", 2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn volumes_grow_when_the_class_allows_and_never_shrink() {
    let (client, ns, _op) = setup("volumes").await;
    // A StorageClass that allows expansion, and static volumes for the claims to bind to
    // (there is no provisioner on this control plane).
    let class = format!("expandable-{ns}");
    let sc: k8s_openapi::api::storage::v1::StorageClass = serde_json::from_value(json!({
        "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
        "metadata": {"name": class},
        "provisioner": "kubernetes.io/no-provisioner",
        "allowVolumeExpansion": true,
        "volumeBindingMode": "Immediate",
    }))
    .expect("sc");
    Api::<k8s_openapi::api::storage::v1::StorageClass>::all(client.clone())
        .create(&PostParams::default(), &sc)
        .await
        .expect("storage class");
    let pv: k8s_openapi::api::core::v1::PersistentVolume = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": format!("pv-{ns}")},
        "spec": {"capacity": {"storage": "4Gi"}, "accessModes": ["ReadWriteOnce"],
                 "storageClassName": class, "hostPath": {"path": format!("/tmp/{ns}")},
                 "claimRef": {"namespace": ns, "name": "persistence-vol-server-0"}},
    }))
    .expect("pv");
    Api::<k8s_openapi::api::core::v1::PersistentVolume>::all(client.clone())
        .create(&PostParams::default(), &pv)
        .await
        .expect("pv");
    create_cluster(
        &client,
        &ns,
        json!({
            "apiVersion": "warren.dev/v1alpha1", "kind": "RabbitCluster",
            "metadata": {"name": "vol", "namespace": ns},
            "spec": {"replicas": 1, "persistence": {"storage": "1Gi", "storageClassName": class}},
        }),
    )
    .await;
    wait_settled(&client, &ns, "vol", 1).await;
    let pvcs = Api::<PersistentVolumeClaim>::namespaced(client.clone(), &ns);
    let pod_uid = pods(&client, &ns, "vol").await[0].metadata.uid.clone();

    patch_cluster(
        &client,
        &ns,
        "vol",
        json!({"spec": {"persistence": {"storage": "2Gi"}}}),
    )
    .await;
    wait_for("the claim resized to 2Gi", LONG, || {
        let pvcs = pvcs.clone();
        async move {
            let pvc = pvcs.get("persistence-vol-server-0").await.ok()?;
            let size = pvc.spec?.resources?.requests?.get("storage")?.0.clone();
            (size == "2Gi").then_some(())
        }
    })
    .await;
    wait_settled(&client, &ns, "vol", 1).await;
    let sts = Api::<StatefulSet>::namespaced(client.clone(), &ns)
        .get("vol-server")
        .await
        .expect("sts");
    let template_size = sts
        .spec
        .and_then(|s| s.volume_claim_templates)
        .and_then(|t| {
            t[0].spec
                .as_ref()?
                .resources
                .as_ref()?
                .requests
                .as_ref()?
                .get("storage")
                .map(|q| q.0.clone())
        });
    assert_eq!(template_size.as_deref(), Some("2Gi"));
    assert_eq!(
        pods(&client, &ns, "vol").await[0].metadata.uid,
        pod_uid,
        "the pod kept running through the expansion"
    );
    assert!(
        events(&client, &ns)
            .await
            .iter()
            .any(|(r, _)| r == "VolumesExpanded")
    );

    // Shrinking is refused with a message.
    patch_cluster(
        &client,
        &ns,
        "vol",
        json!({"spec": {"persistence": {"storage": "1Gi"}}}),
    )
    .await;
    let message = wait_condition(&client, &ns, "vol", "ReconcileSuccess", "False").await;
    assert!(message.contains("cannot shrink"), "{message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_secrets_are_checked_and_a_renewed_certificate_rolls_the_pods() {
    let (client, ns, _op) = setup("tls").await;
    create_cluster(
        &client,
        &ns,
        json!({
            "apiVersion": "warren.dev/v1alpha1", "kind": "RabbitCluster",
            "metadata": {"name": "sec", "namespace": ns},
            "spec": {"replicas": 2, "persistence": {"storage": "0"},
                     "tls": {"secretName": "sec-tls", "disableNonTLSListeners": true}},
        }),
    )
    .await;
    // The Secret does not exist yet: the spec cannot be applied and says what to create.
    let message = wait_condition(&client, &ns, "sec", "ReconcileSuccess", "False").await;
    assert!(
        message.contains("spec.tls.secretName") && message.contains("sec-tls"),
        "{message}"
    );
    let tls = |crt: &str| -> Secret {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": {"name": "sec-tls", "namespace": ns},
            "stringData": {"tls.crt": crt, "tls.key": "key"},
        }))
        .expect("secret")
    };
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
    secrets
        .create(&PostParams::default(), &tls("cert-1"))
        .await
        .expect("tls secret");
    wait_settled(&client, &ns, "sec", 2).await;
    let cm = Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .get("sec-config")
        .await
        .expect("cm");
    let toml_text = cm.data.expect("data")["warren.toml"].clone();
    assert!(toml_text.contains("amqp-listen = \"none\""), "{toml_text}");
    assert!(
        toml_text.contains("amqps-listen = \"0.0.0.0:5671\""),
        "{toml_text}"
    );
    // The management API over HTTPS only.
    assert!(
        toml_text.contains("management-listen = \"none\"")
            && toml_text.contains("management-tls-listen = \"0.0.0.0:15671\""),
        "{toml_text}"
    );
    // Prometheus too, and the pods say so for the chart's PodMonitor.
    assert!(
        toml_text.contains("prometheus-listen = \"none\"")
            && toml_text.contains("prometheus-tls-listen = \"0.0.0.0:15691\""),
        "{toml_text}"
    );
    for p in pods(&client, &ns, "sec").await {
        assert_eq!(
            p.labels().get("warren.dev/tls-only").map(String::as_str),
            Some("true")
        );
    }

    // Renewing the certificate rolls the pods (the broker reads it at start).
    let hash = |p: &Pod| {
        p.labels()
            .get("controller-revision-hash")
            .cloned()
            .unwrap_or_default()
    };
    let old = hash(&pods(&client, &ns, "sec").await[0]);
    secrets
        .patch(
            "sec-tls",
            &PatchParams::apply("e2e").force(),
            &Patch::Apply(&tls("cert-2")),
        )
        .await
        .expect("renew");
    wait_for("pods rolled onto the renewed certificate", LONG, || {
        let client = client.clone();
        let ns = ns.clone();
        let old = old.clone();
        async move {
            let p = pods(&client, &ns, "sec").await;
            (p.len() == 2 && p.iter().all(|p| hash(p) != old)).then_some(())
        }
    })
    .await;
    wait_settled(&client, &ns, "sec", 2).await;
}

/// Whether objects named `name` of every kind the operator applies are absent from `ns`.
async fn nothing_applied(client: &Client, ns: &str, cluster: &str) -> Vec<String> {
    let mut present = Vec::new();
    let server = format!("{cluster}-server");
    if Api::<StatefulSet>::namespaced(client.clone(), ns)
        .get_opt(&server)
        .await
        .expect("get")
        .is_some()
    {
        present.push(format!("StatefulSet {server}"));
    }
    for name in [cluster.to_string(), format!("{cluster}-nodes")] {
        if Api::<Service>::namespaced(client.clone(), ns)
            .get_opt(&name)
            .await
            .expect("get")
            .is_some()
        {
            present.push(format!("Service {name}"));
        }
    }
    for name in [
        format!("{cluster}-default-user"),
        format!("{cluster}-cluster-secret"),
    ] {
        if Api::<Secret>::namespaced(client.clone(), ns)
            .get_opt(&name)
            .await
            .expect("get")
            .is_some()
        {
            present.push(format!("Secret {name}"));
        }
    }
    if Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get_opt(&format!("{cluster}-config"))
        .await
        .expect("get")
        .is_some()
    {
        present.push(format!("ConfigMap {cluster}-config"));
    }
    if Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .get_opt(&server)
        .await
        .expect("get")
        .is_some()
    {
        present.push(format!("ServiceAccount {server}"));
    }
    present
}

/// `spec.override` may not give the broker pods access to their node (privileged, host
/// namespaces, hostPath, another ServiceAccount) unless the operator runs with
/// `--allow-privileged-pods`: ReconcileSuccess=False, InvalidSpec naming each field, and
/// nothing applied.
#[tokio::test(flavor = "multi_thread")]
async fn pods_with_host_access_are_refused_unless_the_operator_allows_them() {
    let (client, ns, _op) = setup("hostaccess").await;
    let hostile = |name: &str, ns: &str| {
        json!({
            "apiVersion": "warren.dev/v1alpha1", "kind": "RabbitCluster",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"replicas": 1, "persistence": {"storage": "0"},
                     "override": {"statefulSet": {"spec": {"template": {"spec": {
                         "hostNetwork": true,
                         "serviceAccountName": "default",
                         "volumes": [{"name": "node-root", "hostPath": {"path": "/"}}],
                         "containers": [{"name": "warren",
                                         "securityContext": {"privileged": true,
                                             "capabilities": {"add": ["SYS_ADMIN"]}},
                                         "volumeMounts": [{"name": "node-root", "mountPath": "/host"}]}],
                     }}}}}},
        })
    };
    create_cluster(&client, &ns, hostile("hosty", &ns)).await;
    let message = wait_condition(&client, &ns, "hosty", "ReconcileSuccess", "False").await;
    let rc = Api::<RabbitCluster>::namespaced(client.clone(), &ns)
        .get("hosty")
        .await
        .expect("get");
    assert_eq!(
        condition(&rc, "ReconcileSuccess").map(|c| c.1).as_deref(),
        Some("InvalidSpec")
    );
    for field in [
        "spec.override.statefulSet.spec.template.spec.hostNetwork: true",
        "spec.override.statefulSet.spec.template.spec.serviceAccountName: \"default\"",
        "volumes[name: node-root].hostPath",
        "containers[name: warren].securityContext.privileged: true",
        "containers[name: warren].securityContext.capabilities.add: [\"SYS_ADMIN\"]",
        "--allow-privileged-pods",
    ] {
        assert!(message.contains(field), "{field} not in: {message}");
    }
    assert!(
        events(&client, &ns)
            .await
            .iter()
            .any(|(reason, note)| reason == "InvalidSpec" && note.contains("hostNetwork")),
        "no InvalidSpec Event"
    );
    // Another reconcile after the refusal changes nothing either.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let present = nothing_applied(&client, &ns, "hosty").await;
    assert!(
        present.is_empty(),
        "applied despite the refusal: {present:?}"
    );

    // Removing the override lets the cluster through.
    patch_cluster(&client, &ns, "hosty", json!({"spec": {"override": null}})).await;
    wait_settled(&client, &ns, "hosty", 1).await;

    // An operator started with --allow-privileged-pods applies the same spec.
    let allowed_ns = namespace(&client, "hostallowed").await;
    let _allowing = Operator::start_with(&allowed_ns, &["--allow-privileged-pods"]);
    create_cluster(&client, &allowed_ns, hostile("hosty", &allowed_ns)).await;
    wait_condition(&client, &allowed_ns, "hosty", "ReconcileSuccess", "True").await;
    let pod = Api::<StatefulSet>::namespaced(client.clone(), &allowed_ns)
        .get("hosty-server")
        .await
        .expect("StatefulSet")
        .spec
        .and_then(|s| s.template.spec)
        .expect("pod spec");
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.service_account_name.as_deref(), Some("default"));
}

/// The operator's Secret watches are metadata-only: the data of a Secret it does not use
/// never reaches it (checked on the bytes the API server sends it, through a recording proxy),
/// while a Secret a cluster references still triggers a reconcile when it appears.
#[tokio::test(flavor = "multi_thread")]
async fn secret_data_the_operator_does_not_use_never_reaches_it() {
    let client = client().await;
    ensure_crds(&client).await;
    let ns = namespace(&client, "secretwatch").await;
    let value = format!("not-for-the-operator-{:08x}", rand::random::<u32>());
    let unrelated = |name: &str| -> Secret {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "namespace": ns},
            "stringData": {"token": value},
        }))
        .expect("secret")
    };
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
    let before = secrets
        .create(&PostParams::default(), &unrelated("unrelated-before"))
        .await
        .expect("create");
    // What the API server sends for this Secret's data: base64 in JSON.
    let encoded = serde_json::to_value(&before).expect("json")["data"]["token"]
        .as_str()
        .expect("data")
        .to_string();
    let recorder = warren_e2e::ApiRecorder::start(&encoded).await;
    let kubeconfig = recorder.kubeconfig.to_string_lossy().to_string();
    let _op = Operator::start_with_env(&ns, &[], &[("KUBECONFIG", kubeconfig.as_str())]);

    // A cluster whose imported default user does not exist yet: refused until it does.
    create_cluster(
        &client,
        &ns,
        json!({
            "apiVersion": "warren.dev/v1alpha1", "kind": "RabbitCluster",
            "metadata": {"name": "picky", "namespace": ns},
            "spec": {"replicas": 1, "persistence": {"storage": "0"},
                     "defaultUser": {"secretName": "imported-user"}},
        }),
    )
    .await;
    let message = wait_condition(&client, &ns, "picky", "ReconcileSuccess", "False").await;
    assert!(message.contains("imported-user"), "{message}");
    secrets
        .create(&PostParams::default(), &unrelated("unrelated-after"))
        .await
        .expect("create");
    import_guest_user(&client, &ns).await;
    wait_settled(&client, &ns, "picky", 1).await;
    // A change to an unrelated Secret streams past too.
    secrets
        .patch(
            "unrelated-before",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"touched": "yes"}}})),
        )
        .await
        .expect("patch");
    tokio::time::sleep(Duration::from_secs(2)).await;

    let leaked = recorder.saw_needle();
    assert!(
        leaked.is_empty(),
        "the API server sent the operator the data of a Secret it does not use: {leaked:#?}"
    );
    let requests = recorder.requests();
    let secret_streams: Vec<_> = requests
        .iter()
        .filter(|r| {
            let path = r.uri.split('?').next().unwrap_or_default();
            r.method == "GET" && path.ends_with("/secrets")
        })
        .collect();
    assert!(
        !secret_streams.is_empty(),
        "the operator never listed or watched Secrets through the recorder: {requests:#?}"
    );
    for r in &secret_streams {
        assert!(
            r.accept.contains("as=PartialObjectMetadata"),
            "a Secret list or watch asked for whole Secrets: {r:?}"
        );
    }
    // The operator's own Secrets are still read, one by name.
    assert!(
        requests
            .iter()
            .any(|r| r.method == "GET" && r.uri.contains("/secrets/imported-user")),
        "the operator did not read the imported Secret"
    );
}
