//! Every sample manifest in `samples/` applied with the real kubectl to the real control
//! plane: the clusters reconcile until all their nodes are ready, the other kinds are
//! accepted, and `kubectl get warren` / `kubectl explain` work as documented.

use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, PersistentVolume};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use warren_e2e::{Operator, client, ensure_crds, namespace, repo_root, wait_for};
use warren_operator::crd::RabbitCluster;

fn kubectl(args: &[&str]) -> String {
    let bin = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
    let out = Command::new(&bin).args(args).output().unwrap_or_else(|e| {
        panic!("cannot run {bin} ({e}): put kubectl on PATH or set KUBECTL (bash scripts/kubetools.sh installs it)")
    });
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "kubectl {args:?} failed: {}{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Static volumes for a cluster's claims (this control plane has no provisioner).
async fn volumes_for(
    client: &Client,
    ns: &str,
    cluster: &str,
    class: Option<&str>,
    size: &str,
    n: usize,
) {
    let api = Api::<PersistentVolume>::all(client.clone());
    for i in 0..n {
        let mut spec = json!({
            "capacity": {"storage": size},
            "accessModes": ["ReadWriteOnce"],
            "hostPath": {"path": format!("/tmp/{ns}-{cluster}-{i}")},
            "claimRef": {"namespace": ns, "name": format!("persistence-{cluster}-server-{i}")},
        });
        if let Some(c) = class {
            spec["storageClassName"] = json!(c);
        }
        let pv: PersistentVolume = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": format!("{ns}-{cluster}-{i}")},
            "spec": spec,
        }))
        .expect("pv");
        api.create(&PostParams::default(), &pv)
            .await
            .expect("create pv");
    }
}

async fn wait_ready(client: &Client, ns: &str, name: &str, replicas: i32) {
    let api = Api::<RabbitCluster>::namespaced(client.clone(), ns);
    wait_for(
        &format!("sample {name} with all {replicas} nodes ready"),
        Duration::from_secs(120),
        || {
            let api = api.clone();
            async move {
                let rc = api.get(name).await.ok()?;
                let st = rc.status?;
                let all = st
                    .conditions
                    .iter()
                    .any(|c| c.type_ == "AllReplicasReady" && c.status == "True");
                (all && st.ready_replicas == replicas).then_some(())
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_sample_applies_and_the_clusters_become_ready() {
    let client = client().await;
    ensure_crds(&client).await;
    let ns = namespace(&client, "samples").await;
    let _op = Operator::start(&ns);
    let samples = repo_root().join("samples");

    // What the production sample expects of the cluster: its TLS Secrets, nodes labelled
    // for messaging, volumes in its StorageClass.
    for (name, keys) in [
        ("warren-prod-tls", vec!["tls.crt", "tls.key"]),
        ("warren-prod-ca", vec!["ca.crt"]),
    ] {
        let data: serde_json::Map<String, serde_json::Value> = keys
            .iter()
            .map(|k| (k.to_string(), json!("placeholder")))
            .collect();
        let type_ = if name.ends_with("tls") {
            "kubernetes.io/tls"
        } else {
            "Opaque"
        };
        let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Secret", "type": type_,
            "metadata": {"name": name, "namespace": ns}, "stringData": data,
        }))
        .expect("secret");
        Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), &ns)
            .create(&PostParams::default(), &secret)
            .await
            .expect("tls secret");
    }
    let nodes = Api::<Node>::all(client.clone());
    for node in nodes
        .list(&ListParams::default())
        .await
        .expect("nodes")
        .items
    {
        let name = node.metadata.name.expect("node name");
        nodes
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(&json!({"metadata": {"labels": {"workload": "messaging"}}})),
            )
            .await
            .expect("label node");
    }
    volumes_for(&client, &ns, "hello-warren", None, "10Gi", 3).await;
    volumes_for(&client, &ns, "warren-prod", Some("fast-ssd"), "100Gi", 3).await;

    for file in [
        "rabbitcluster-minimal.yaml",
        "rabbitcluster-production.yaml",
        "policy.yaml",
        "federation.yaml",
        "shovel.yaml",
        "vhost.yaml",
        "user.yaml",
        "permission.yaml",
        "topicpermission.yaml",
        "queue.yaml",
        "exchange.yaml",
        "binding.yaml",
        "operatorpolicy.yaml",
    ] {
        let path = samples.join(file);
        let out = kubectl(&["apply", "-n", &ns, "-f", &path.to_string_lossy()]);
        assert!(
            out.contains("created") || out.contains("configured"),
            "{file}: {out}"
        );
    }
    wait_ready(&client, &ns, "hello-warren", 3).await;
    wait_ready(&client, &ns, "warren-prod", 3).await;

    // The production cluster is TLS-only: no plain AMQP or HTTP management port on its Service.
    let svc = kubectl(&[
        "get",
        "service",
        "warren-prod",
        "-n",
        &ns,
        "-o",
        "jsonpath={.spec.ports[*].name}",
    ]);
    assert_eq!(svc, "amqps management-tls prometheus-tls");

    // `kubectl get warren` lists every kind; printer columns are there.
    let all = kubectl(&["get", "warren", "-n", &ns]);
    for name in [
        "hello-warren",
        "warren-prod",
        "orders-limits",
        "dc2",
        "legacy-jobs",
        "orders",
        "orders-app",
        "orders-monitor",
        "orders-app-amq-topic",
        "orders-incoming",
        "orders-events",
        "orders-created",
        "orders-limits-hard",
    ] {
        assert!(all.contains(name), "kubectl get warren lacks {name}: {all}");
    }
    let clusters = kubectl(&["get", "rabbit", "-n", &ns]);
    assert!(
        clusters.contains("REPLICAS")
            && clusters.contains("READY")
            && clusters.contains("AVAILABLE"),
        "{clusters}"
    );
    let explained = kubectl(&["explain", "rabbitclusters.spec.persistence.storage"]);
    assert!(explained.contains("emptyDir"), "{explained}");
    // The topology kinds document their fields too.
    for (field, text) in [
        ("users.spec.importCredentialsSecret", "user-credentials"),
        ("topicpermissions", "DELETE"),
        ("vhosts.spec.defaultQueueType", "x-queue-type"),
        ("queues.spec.arguments", "Ready=False"),
        ("permissions.spec.userReference", "User"),
        // `bindings` alone is Kubernetes' own core Binding: the short name is ours.
        ("wb", "properties key"),
        ("wb.spec.destinationType", "exchange"),
    ] {
        let explained = kubectl(&["explain", field]);
        assert!(explained.contains(text), "{field}: {explained}");
    }
    // kubectl scale works through the scale subresource.
    kubectl(&["scale", "rabbit/hello-warren", "-n", &ns, "--replicas=3"]);
}
