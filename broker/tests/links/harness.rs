//! Helpers shared by the link tests: management API calls, waiting, publishing, draining.

use std::future::Future;
use std::time::Duration;

use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};
use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::common::TestBroker;

/// The management API of one broker, as guest.
pub struct Api {
    pub base: String,
    http: reqwest::Client,
}

impl Api {
    pub async fn start(b: &TestBroker) -> Self {
        Self::at(&b.start_management().await)
    }

    pub fn at(base: &str) -> Self {
        Api {
            base: base.to_owned(),
            http: reqwest::Client::new(),
        }
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self
            .http
            .request(method, format!("{}/api{path}", self.base))
            .basic_auth("guest", Some("guest"))
            .timeout(Duration::from_secs(10));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        let v = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, v)
    }

    pub async fn get(&self, path: &str) -> Value {
        let (s, v) = self.call(Method::GET, path, None).await;
        assert!(s.is_success(), "GET {path}: {s} {v}");
        v
    }

    /// PUT /api/parameters/{component}/%2F/{name} {"value": value}; the status.
    pub async fn put_param(
        &self,
        component: &str,
        vhost: &str,
        name: &str,
        value: Value,
    ) -> (StatusCode, Value) {
        self.call(
            Method::PUT,
            &format!("/parameters/{component}/{}/{name}", enc(vhost)),
            Some(serde_json::json!({ "value": value })),
        )
        .await
    }

    pub async fn put_policy(&self, vhost: &str, name: &str, body: Value) {
        let (s, v) = self
            .call(
                Method::PUT,
                &format!("/policies/{}/{name}", enc(vhost)),
                Some(body),
            )
            .await;
        assert!(s.is_success(), "policy {name}: {s} {v}");
    }

    pub async fn delete(&self, path: &str) -> StatusCode {
        self.call(Method::DELETE, path, None).await.0
    }

    /// The entry of /api/shovels for one shovel.
    pub async fn shovel(&self, name: &str) -> Option<Value> {
        self.get("/shovels")
            .await
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .cloned()
    }

    /// The entries of /api/federation-links for one federated exchange or queue.
    pub async fn federation_links(&self, object: &str) -> Vec<Value> {
        self.get("/federation-links")
            .await
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| l["exchange"] == object || l["queue"] == object)
            .cloned()
            .collect()
    }
}

pub fn enc(vhost: &str) -> String {
    vhost.replace('%', "%25").replace('/', "%2F")
}

/// Polls `f` until it is true (every 50 ms, up to `secs` seconds); false on timeout.
pub async fn wait_for<F, Fut>(secs: u64, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Messages in a queue of an in-process broker (ready + unacked); 0 if it does not exist.
pub fn depth(b: &TestBroker, vhost: &str, queue: &str) -> u64 {
    b.broker
        .vhost(vhost)
        .and_then(|v| v.queue(queue))
        .map_or(0, |q| {
            let (ready, unacked, _) = q.counts();
            ready + unacked
        })
}

pub async fn declare(ch: &Channel, queue: &str, durable: bool) {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
}

/// Publishes `n` persistent messages with bodies `{prefix}{i}` to the default exchange, with
/// publisher confirms.
pub async fn publish_n(ch: &Channel, routing_key: &str, prefix: &str, n: usize) {
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut confirms = Vec::with_capacity(n);
    for i in 0..n {
        confirms.push(
            ch.basic_publish(
                "".into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                format!("{prefix}{i}").as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap(),
        );
    }
    for c in confirms {
        assert!(c.await.unwrap().is_ack());
    }
}

/// Takes every message from a queue (basic.get, auto-ack); their bodies as strings.
pub async fn drain(ch: &Channel, queue: &str) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        out.push(String::from_utf8_lossy(&m.delivery.data).into_owned());
    }
    out
}

/// Takes every message from a queue; the deliveries.
pub async fn drain_deliveries(ch: &Channel, queue: &str) -> Vec<lapin::message::Delivery> {
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        out.push(m.delivery);
    }
    out
}

/// The value of one sample of the Prometheus text `text`, by its exact label set.
pub fn sample(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Whether a server-side connection is the link's (by its `connection_name`).
pub fn link_connection(c: &warren_broker::connection::ConnShared, name: &str) -> bool {
    matches!(
        c.info.client_properties.inner().get("connection_name"),
        Some(lapin::types::AMQPValue::LongString(s)) if s.to_string() == name
    )
}
