//! What the topology tests (`operator_topology*.rs`) share: a management API client to
//! check what the operator wrote on a broker, and typed create/patch/delete/wait helpers
//! for the custom resources.

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use warren_operator::crd::RabbitCluster;

use crate::{Broker, wait_for};

pub const LONG: Duration = Duration::from_secs(60);

/// A management API to check what the operator wrote.
#[derive(Clone)]
pub struct Mgmt {
    pub url: String,
    pub user: String,
    pub pass: String,
    pub http: reqwest::Client,
}

impl Mgmt {
    pub fn of(b: &Broker) -> Self {
        Mgmt {
            url: b.management_url.clone(),
            user: "guest".into(),
            pass: "guest".into(),
            http: b.http.clone(),
        }
    }

    /// The reference RabbitMQ started by e2e/run.sh.
    pub fn rabbitmq() -> Self {
        let url = std::env::var("RABBITMQ_MGMT_URL").unwrap_or_else(|_| {
            panic!("RABBITMQ_MGMT_URL is not set: start Debian's RabbitMQ with `bash scripts/rabbitmq-ref.sh start` (e2e/run.sh does)")
        });
        Mgmt {
            url,
            user: "guest".into(),
            pass: "guest".into(),
            http: reqwest::Client::new(),
        }
    }

    /// The same management API, authenticating as another user.
    pub fn as_user(&self, user: &str, pass: &str) -> Self {
        Mgmt {
            user: user.into(),
            pass: pass.into(),
            ..self.clone()
        }
    }

    /// The HTTP status of GET `path` (0 if the request failed).
    pub async fn status(&self, path: &str) -> u16 {
        match self
            .http
            .get(format!("{}{path}", self.url))
            .basic_auth(&self.user, Some(&self.pass))
            .send()
            .await
        {
            Ok(r) => r.status().as_u16(),
            Err(_) => 0,
        }
    }

    pub async fn get(&self, path: &str) -> Option<Value> {
        let r = self
            .http
            .get(format!("{}{path}", self.url))
            .basic_auth(&self.user, Some(&self.pass))
            .send()
            .await
            .ok()?;
        if !r.status().is_success() {
            return None;
        }
        r.json().await.ok()
    }

    pub async fn put(&self, path: &str, body: Value) {
        let r = self
            .http
            .put(format!("{}{path}", self.url))
            .basic_auth(&self.user, Some(&self.pass))
            .json(&body)
            .send()
            .await
            .expect("PUT");
        assert!(r.status().is_success(), "PUT {path}: {}", r.status());
    }

    /// POST `body` to `path` and return the answer (`{}` when it has none).
    pub async fn post(&self, path: &str, body: Value) -> Value {
        let r = self
            .http
            .post(format!("{}{path}", self.url))
            .basic_auth(&self.user, Some(&self.pass))
            .json(&body)
            .send()
            .await
            .expect("POST");
        assert!(r.status().is_success(), "POST {path}: {}", r.status());
        r.json().await.unwrap_or_else(|_| serde_json::json!({}))
    }

    pub async fn delete(&self, path: &str) {
        let r = self
            .http
            .delete(format!("{}{path}", self.url))
            .basic_auth(&self.user, Some(&self.pass))
            .send()
            .await
            .expect("DELETE");
        assert!(
            r.status().is_success() || r.status() == 404,
            "DELETE {path}: {}",
            r.status()
        );
    }

    /// Waits until GET `path` satisfies `check`.
    pub async fn wait(&self, what: &str, path: &str, check: impl Fn(&Value) -> bool) -> Value {
        wait_for(what, LONG, || {
            let me = self.clone();
            let path = path.to_string();
            let ok = |v: &Value| check(v);
            async move { me.get(&path).await }.then_filter(ok)
        })
        .await
    }

    pub async fn wait_gone(&self, what: &str, path: &str) {
        wait_for(what, LONG, || {
            let me = self.clone();
            let path = path.to_string();
            async move { me.get(&path).await.is_none().then_some(()) }
        })
        .await
    }
}

/// `async { … }.then_filter(f)`: keeps `Some(v)` only when `f(&v)`.
pub trait ThenFilter: std::future::Future<Output = Option<Value>> + Sized {
    fn then_filter<F: Fn(&Value) -> bool>(
        self,
        f: F,
    ) -> impl std::future::Future<Output = Option<Value>> {
        async move { self.await.filter(|v| f(v)) }
    }
}
impl<T: std::future::Future<Output = Option<Value>>> ThenFilter for T {}

pub async fn create<K>(client: &Client, ns: &str, manifest: Value)
where
    K: kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let obj: K = serde_json::from_value(manifest).expect("manifest");
    Api::<K>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &obj)
        .await
        .expect("create");
}

pub async fn patch<K>(client: &Client, ns: &str, name: &str, p: Value) -> Result<K, kube::Error>
where
    K: kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    Api::<K>::namespaced(client.clone(), ns)
        .patch(name, &PatchParams::default(), &Patch::Merge(&p))
        .await
}

pub async fn secret(client: &Client, ns: &str, name: &str, data: Value) {
    let s: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": ns}, "stringData": data,
    }))
    .expect("secret");
    Api::<Secret>::namespaced(client.clone(), ns)
        .patch(name, &PatchParams::apply("e2e").force(), &Patch::Apply(&s))
        .await
        .expect("secret");
}

/// Waits for the resource's Ready condition to have `status`; returns (reason, message).
pub async fn wait_ready<K>(client: &Client, ns: &str, name: &str, status: &str) -> (String, String)
where
    K: kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let api = Api::<K>::namespaced(client.clone(), ns);
    wait_for(&format!("{name} Ready={status}"), LONG, || {
        let api = api.clone();
        async move {
            let obj = serde_json::to_value(api.get(name).await.ok()?).ok()?;
            let conds = obj.get("status")?.get("conditions")?.as_array()?.clone();
            let c = conds.iter().find(|c| c["type"] == "Ready")?;
            (c["status"] == status).then(|| {
                (
                    c["reason"].as_str().unwrap_or("").to_string(),
                    c["message"].as_str().unwrap_or("").to_string(),
                )
            })
        }
    })
    .await
}

pub async fn status_of<K>(client: &Client, ns: &str, name: &str) -> Value
where
    K: kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let obj = Api::<K>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .expect("get");
    serde_json::to_value(obj).expect("json")["status"].clone()
}

pub async fn delete<K>(client: &Client, ns: &str, name: &str)
where
    K: kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let api = Api::<K>::namespaced(client.clone(), ns);
    api.delete(name, &DeleteParams::default())
        .await
        .expect("delete");
    wait_for(&format!("{name} deleted (finalizer done)"), LONG, || {
        let api = api.clone();
        async move { api.get_opt(name).await.ok()?.is_none().then_some(()) }
    })
    .await;
}

/// A RabbitCluster whose management API is the local broker (the operator runs outside
/// Kubernetes' network here) and whose default user is the broker's `guest`.
pub async fn cluster_for(client: &Client, ns: &str, name: &str, broker: &Broker) {
    secret(
        client,
        ns,
        &format!("{name}-user"),
        json!({"username": "guest", "password": "guest"}),
    )
    .await;
    create::<RabbitCluster>(
        client,
        ns,
        json!({
            "apiVersion": "warren.dev/v1alpha1", "kind": "RabbitCluster",
            "metadata": {"name": name, "namespace": ns,
                         "annotations": {"warren.dev/management-uri": broker.management_url}},
            "spec": {"replicas": 1, "persistence": {"storage": "0"},
                     "defaultUser": {"secretName": format!("{name}-user")}},
        }),
    )
    .await;
}

/// The value of the operator's counter `name{label="value"}` at `metrics_url` (0 while it
/// has no such series).
pub async fn counter(metrics_url: &str, name: &str, label: &str, value: &str) -> u64 {
    let text = reqwest::get(format!("{metrics_url}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    let prefix = format!("{name}{{{label}=\"{value}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}
