//! Two operator replicas share a Lease: one reconciles, the other stands by and takes over
//! when the leader dies.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube::api::PostParams;
use serde_json::json;
use warren_e2e::{Operator, client, ensure_crds, namespace, wait_for};
use warren_operator::crd::RabbitCluster;

async fn leader_gauge(op: &Operator) -> Option<String> {
    let text = reqwest::get(format!("{}/metrics", op.metrics_url))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find(|l| l.starts_with("warren_operator_leader "))
        .map(|l| l.trim_start_matches("warren_operator_leader ").to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_standby_replica_takes_over_when_the_leader_dies() {
    let client = client().await;
    ensure_crds(&client).await;
    let ns = namespace(&client, "ha").await;
    let args = ["--lease-duration", "4"];
    let first = Operator::start_with(&ns, &args);
    let leases = Api::<Lease>::namespaced(client.clone(), &ns);
    let holder = wait_for("a leader", Duration::from_secs(30), || {
        let leases = leases.clone();
        async move {
            leases
                .get("warren-operator")
                .await
                .ok()?
                .spec?
                .holder_identity
        }
    })
    .await;
    let second = Operator::start_with(&ns, &args);
    // The second replica is healthy but does not lead.
    wait_for("the standby's /readyz", Duration::from_secs(30), || {
        let url = format!("{}/readyz", second.metrics_url);
        async move {
            reqwest::get(url)
                .await
                .ok()?
                .status()
                .is_success()
                .then_some(())
        }
    })
    .await;
    assert_eq!(leader_gauge(&first).await.as_deref(), Some("1"));
    assert_eq!(leader_gauge(&second).await.as_deref(), Some("0"));
    assert!(
        holder.ends_with(&first.pid().to_string()),
        "holder {holder}"
    );

    // The leader dies; the standby takes the Lease and reconciles.
    drop(first);
    wait_for("the standby to lead", Duration::from_secs(30), || {
        let leases = leases.clone();
        let pid = second.pid().to_string();
        async move {
            let h = leases
                .get("warren-operator")
                .await
                .ok()?
                .spec?
                .holder_identity?;
            h.ends_with(&pid).then_some(())
        }
    })
    .await;
    let rc: RabbitCluster = serde_json::from_value(json!({
        "apiVersion": "warren.dev/v1alpha1", "kind": "RabbitCluster",
        "metadata": {"name": "after-failover", "namespace": ns},
        "spec": {"replicas": 1, "persistence": {"storage": "0"}},
    }))
    .expect("rc");
    let api = Api::<RabbitCluster>::namespaced(client.clone(), &ns);
    api.create(&PostParams::default(), &rc)
        .await
        .expect("create");
    wait_for(
        "the new leader to reconcile",
        Duration::from_secs(60),
        || {
            let api = api.clone();
            async move {
                let rc = api.get("after-failover").await.ok()?;
                rc.status?
                    .conditions
                    .iter()
                    .any(|c| c.type_ == "AllReplicasReady" && c.status == "True")
                    .then_some(())
            }
        },
    )
    .await;
    assert_eq!(leader_gauge(&second).await.as_deref(), Some("1"));
}
