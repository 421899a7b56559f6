//! Benchmark of the operator on the real control plane (not a test): time from creating a
//! RabbitCluster to all its owned objects existing and to `AllReplicasReady`; throughput
//! with many clusters at once; the operator's resident memory.
//!
//!   bash scripts/bench-operator.sh        (starts the control plane; BENCH_CLUSTERS=200)

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::PostParams;
use kube::{Api, Client};
use serde_json::json;
use warren_e2e::{Operator, client, ensure_crds, namespace, rss_kib, wait_for};
use warren_operator::crd::RabbitCluster;

fn manifest(ns: &str, name: &str, replicas: i32) -> RabbitCluster {
    serde_json::from_value(json!({
        "apiVersion": "warren.dev/v1alpha1", "kind": "RabbitCluster",
        "metadata": {"name": name, "namespace": ns},
        // Small requests: 200 clusters must fit on the three fake nodes (64 CPUs each).
        "spec": {"replicas": replicas, "persistence": {"storage": "0"},
                 "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}}},
    }))
    .expect("manifest")
}

async fn all_owned_exist(client: &Client, ns: &str, name: &str) -> bool {
    let c = client.clone();
    Api::<StatefulSet>::namespaced(c.clone(), ns)
        .get_opt(&format!("{name}-server"))
        .await
        .ok()
        .flatten()
        .is_some()
        && Api::<Service>::namespaced(c.clone(), ns)
            .get_opt(name)
            .await
            .ok()
            .flatten()
            .is_some()
        && Api::<Service>::namespaced(c.clone(), ns)
            .get_opt(&format!("{name}-nodes"))
            .await
            .ok()
            .flatten()
            .is_some()
        && Api::<Secret>::namespaced(c.clone(), ns)
            .get_opt(&format!("{name}-default-user"))
            .await
            .ok()
            .flatten()
            .is_some()
        && Api::<Secret>::namespaced(c.clone(), ns)
            .get_opt(&format!("{name}-cluster-secret"))
            .await
            .ok()
            .flatten()
            .is_some()
        && Api::<ConfigMap>::namespaced(c.clone(), ns)
            .get_opt(&format!("{name}-config"))
            .await
            .ok()
            .flatten()
            .is_some()
        && Api::<ServiceAccount>::namespaced(c.clone(), ns)
            .get_opt(&format!("{name}-server"))
            .await
            .ok()
            .flatten()
            .is_some()
        && Api::<PodDisruptionBudget>::namespaced(c, ns)
            .get_opt(&format!("{name}-server"))
            .await
            .ok()
            .flatten()
            .is_some()
}

fn ready(rc: &RabbitCluster) -> bool {
    rc.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "AllReplicasReady" && c.status == "True")
    })
}

async fn metric(op: &Operator, name: &str) -> String {
    let text = reqwest::get(format!("{}/metrics", op.metrics_url))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    text.lines()
        .filter(|l| l.starts_with(name))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::main]
async fn main() {
    let clusters: usize = std::env::var("BENCH_CLUSTERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let client = client().await;
    ensure_crds(&client).await;
    let ns = namespace(&client, "bench").await;
    let op = Operator::start(&ns);
    let api = Api::<RabbitCluster>::namespaced(client.clone(), &ns);
    let (rss0, _) = rss_kib(op.pid());

    // One cluster of 3 nodes, timed.
    let t = Instant::now();
    api.create(&PostParams::default(), &manifest(&ns, "single", 3))
        .await
        .expect("create");
    wait_for("owned objects", Duration::from_secs(120), || {
        let client = client.clone();
        let ns = ns.clone();
        async move { all_owned_exist(&client, &ns, "single").await.then_some(()) }
    })
    .await;
    let objects = t.elapsed();
    wait_for("AllReplicasReady", Duration::from_secs(120), || {
        let api = api.clone();
        async move { ready(&api.get("single").await.ok()?).then_some(()) }
    })
    .await;
    let all_ready = t.elapsed();
    println!(
        "single cluster (3 nodes): all 8 owned objects after {:.3} s, AllReplicasReady after {:.3} s",
        objects.as_secs_f64(),
        all_ready.as_secs_f64()
    );

    // Many clusters at once.
    let t = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..clusters {
        let api = api.clone();
        let rc = manifest(&ns, &format!("c{i:03}"), 1);
        tasks.push(tokio::spawn(async move {
            api.create(&PostParams::default(), &rc).await
        }));
    }
    for task in tasks {
        task.await.expect("join").expect("create");
    }
    let created = t.elapsed();
    wait_for(
        &format!("{clusters} clusters ready"),
        Duration::from_secs(1800),
        || {
            let api = api.clone();
            async move {
                let list = api.list(&Default::default()).await.ok()?;
                let n = list.items.iter().filter(|rc| ready(rc)).count();
                (n == clusters + 1).then_some(())
            }
        },
    )
    .await;
    let elapsed = t.elapsed();
    let (rss, hwm) = rss_kib(op.pid());
    println!(
        "{clusters} clusters (1 node each): created in {:.1} s, all AllReplicasReady after {:.1} s = {:.1} clusters/s",
        created.as_secs_f64(),
        elapsed.as_secs_f64(),
        clusters as f64 / elapsed.as_secs_f64()
    );
    println!(
        "operator resident memory: {} KiB at start, {} KiB now, peak {} KiB",
        rss0, rss, hwm
    );
    println!(
        "{}",
        metric(&op, "warren_operator_reconciliations_total").await
    );
    println!(
        "{}",
        metric(&op, "warren_operator_reconcile_errors_total").await
    );
    println!(
        "{}",
        metric(&op, "warren_operator_reconcile_duration_seconds_sum").await
    );
    println!(
        "{}",
        metric(&op, "warren_operator_reconcile_duration_seconds_count").await
    );
}
