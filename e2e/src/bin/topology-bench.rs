//! Benchmark of the topology controllers on the real control plane (not a test): many
//! topology objects across many namespaces, all reconciled against one real `warren-broker`
//! (through `connectionSecret`) by one operator watching those namespaces. Reports the time
//! from the first create to every object Ready, and the operator's resident memory.
//!
//!   BENCH_TOPOLOGY=1 bash scripts/bench-operator.sh
//!   (BENCH_OBJECTS=2000 objects, BENCH_NAMESPACES=20; half Queues, half Exchanges;
//!   BENCH_CLUSTER_WIDE=1: the operator watches every namespace, one set of controllers,
//!   instead of `--namespace` with the bench's namespaces)

use std::time::{Duration, Instant};

use kube::api::ListParams;
use kube::{Api, Client};
use serde_json::json;
use warren_e2e::topology::{create, secret};
use warren_e2e::{Broker, Operator, client, ensure_crds, namespace, rss_kib, wait_for};
use warren_operator::crd::{Exchange, Queue};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// How many objects of kind `K` in `ns` have the condition Ready=True.
async fn ready_in<K>(client: &Client, ns: &str) -> usize
where
    K: kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let Ok(list) = Api::<K>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
    else {
        return 0;
    };
    list.items
        .iter()
        .filter(|o| {
            let v = serde_json::to_value(o).unwrap_or_default();
            v["status"]["conditions"].as_array().is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
        })
        .count()
}

#[tokio::main]
async fn main() {
    let objects = env_usize("BENCH_OBJECTS", 2000);
    let namespaces = env_usize("BENCH_NAMESPACES", 20).max(1);
    let per_ns = objects / namespaces;
    let client = client().await;
    ensure_crds(&client).await;
    let broker = Broker::start().await;
    let mut names = Vec::new();
    for _ in 0..namespaces {
        let ns = namespace(&client, "tbench").await;
        secret(
            &client,
            &ns,
            "broker",
            json!({"uri": broker.management_url, "username": "guest", "password": "guest"}),
        )
        .await;
        names.push(ns);
    }
    let cluster_wide = std::env::var("BENCH_CLUSTER_WIDE").is_ok_and(|v| v == "1");
    let op = if cluster_wide {
        // No namespace: every namespace, one set of controllers (no Lease to place).
        Operator::start_watching(&[""], &["--leader-elect", "false"], &[])
    } else {
        let watched: Vec<&str> = names.iter().map(String::as_str).collect();
        Operator::start_watching(&watched, &[], &[])
    };
    let (rss0, _) = rss_kib(op.pid());

    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for ns in &names {
        let (client, ns) = (client.clone(), ns.clone());
        tasks.spawn(async move {
            for i in 0..per_ns {
                let name = format!("o{i:04}");
                let spec =
                    json!({"name": format!("{ns}.{name}"), "connectionSecret": {"name": "broker"}});
                let manifest = |kind: &str| {
                    json!({
                        "apiVersion": "warren.dev/v1alpha1", "kind": kind,
                        "metadata": {"name": name, "namespace": ns}, "spec": spec,
                    })
                };
                if i % 2 == 0 {
                    create::<Queue>(&client, &ns, manifest("Queue")).await;
                } else {
                    create::<Exchange>(&client, &ns, manifest("Exchange")).await;
                }
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("create objects");
    }
    let created = t.elapsed();
    let total = per_ns * namespaces;
    wait_for(
        &format!("{total} topology objects Ready"),
        Duration::from_secs(1800),
        || {
            let (client, names) = (client.clone(), names.clone());
            async move {
                let mut n = 0;
                for ns in &names {
                    n += ready_in::<Queue>(&client, ns).await;
                    n += ready_in::<Exchange>(&client, ns).await;
                }
                (n == total).then_some(())
            }
        },
    )
    .await;
    let elapsed = t.elapsed();
    let (rss, hwm) = rss_kib(op.pid());
    let queues = broker.get("/api/queues").await.map_or(0, |q| {
        q.as_array().map_or(0, |a| {
            a.iter()
                .filter(|q| q["name"].as_str().is_some_and(|n| n.starts_with("tbench")))
                .count()
        })
    });
    println!(
        "{total} topology objects ({} Queues, {} Exchanges) in {namespaces} namespaces: created in {:.1} s, all Ready after {:.1} s = {:.0} objects/s; {queues} of the queues on the broker",
        total.div_ceil(2),
        total / 2,
        created.as_secs_f64(),
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64()
    );
    println!(
        "operator ({}) resident memory: {rss0} KiB at start, {rss} KiB now, peak {hwm} KiB",
        if cluster_wide {
            "watching every namespace"
        } else {
            "watching the bench's namespaces"
        }
    );
}
