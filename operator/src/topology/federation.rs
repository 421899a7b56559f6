//! `Federation` → `PUT /api/parameters/federation-upstream/{vhost}/{name}`.

use std::collections::BTreeMap;

use kube::ResourceExt;
use serde_json::{Map, Value, json};

use super::{Target, Topology, target_of};
use crate::crd::Federation;
use crate::crd::common::DeletionPolicy;
use crate::management::segment;

/// Splits a comma-separated URI list; one URI is sent as a string, several as a list.
pub(crate) fn uri_value(raw: &str, key: &str) -> Result<Value, String> {
    let uris: Vec<&str> = raw
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect();
    for u in &uris {
        if !(u.starts_with("amqp://") || u.starts_with("amqps://") || *u == "amqp://") {
            return Err(format!(
                "spec.uriSecret key {key}: {u:?} is not an amqp:// or amqps:// URI"
            ));
        }
    }
    match uris.as_slice() {
        [] => Err(format!("spec.uriSecret key {key} is empty")),
        [one] => Ok(json!(one)),
        many => Ok(json!(many)),
    }
}

impl Topology for Federation {
    const CONTROLLER: &'static str = "federation";
    const FINALIZER: &'static str = "warren.dev/federation-cleanup";
    const NOUN: &'static str = "federation upstream";

    fn target(&self) -> Target<'_> {
        target_of(
            &self.spec.rabbit_cluster_reference,
            &self.spec.connection_secret,
        )
    }
    fn deletion_policy(&self) -> DeletionPolicy {
        self.spec.deletion_policy
    }
    fn broker_name(&self) -> String {
        self.spec.name.clone().unwrap_or_else(|| self.name_any())
    }
    fn path(&self) -> String {
        format!(
            "/api/parameters/federation-upstream/{}/{}",
            segment(&self.spec.vhost),
            segment(&self.broker_name())
        )
    }
    fn uri_secret(&self) -> Option<String> {
        Some(self.spec.uri_secret.name.clone())
    }
    fn body(&self, secret: Option<&BTreeMap<String, String>>) -> Result<Value, String> {
        let raw = secret.and_then(|s| s.get("uri")).ok_or_else(|| {
            format!(
                "spec.uriSecret: Secret {} has no key uri",
                self.spec.uri_secret.name
            )
        })?;
        let s = &self.spec;
        let mut v = Map::new();
        v.insert("uri".into(), uri_value(raw, "uri")?);
        let mut put = |k: &str, val: Option<Value>| {
            if let Some(val) = val {
                v.insert(k.into(), val);
            }
        };
        put("prefetch-count", s.prefetch_count.map(Value::from));
        put("reconnect-delay", s.reconnect_delay.map(Value::from));
        put("ack-mode", s.ack_mode.map(|m| json!(m.as_str())));
        put("trust-user-id", s.trust_user_id.map(Value::from));
        put("exchange", s.exchange.clone().map(Value::from));
        put("max-hops", s.max_hops.map(Value::from));
        put("expires", s.expires.map(Value::from));
        put("message-ttl", s.message_ttl.map(Value::from));
        put("queue", s.queue.clone().map(Value::from));
        put("consumer-tag", s.consumer_tag.clone().map(Value::from));
        Ok(json!({"value": v}))
    }
    fn observe_paths(&self) -> Vec<String> {
        vec![format!(
            "/api/federation-links/{}",
            segment(&self.spec.vhost)
        )]
    }
    fn observed_status(&self, observed: &[Option<Value>]) -> Map<String, Value> {
        let name = self.broker_name();
        let links: Vec<Value> = observed
            .first()
            .and_then(|o| o.as_ref())
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|l| l.get("upstream").and_then(Value::as_str) == Some(name.as_str()))
            .map(|l| {
                let mut link = json!({
                    "type": l.get("type").and_then(Value::as_str).unwrap_or("exchange"),
                    "name": l.get("exchange").or_else(|| l.get("queue")).and_then(Value::as_str).unwrap_or(""),
                    "status": l.get("status").and_then(Value::as_str).unwrap_or("unknown"),
                });
                if let Some(e) = l.get("error").and_then(Value::as_str) {
                    link["error"] = json!(e);
                }
                link
            })
            .collect();
        let mut m = Map::new();
        m.insert("links".into(), json!(links));
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::FederationSpec;

    #[test]
    fn body_carries_every_upstream_key_and_the_secret_uri() {
        let spec: FederationSpec = serde_json::from_value(json!({
            "uriSecret": {"name": "up"}, "prefetchCount": 50, "ackMode": "on-publish",
            "reconnectDelay": 3, "trustUserId": true, "exchange": "x", "maxHops": 2,
            "expires": 1000, "messageTTL": 500, "queue": "q", "consumerTag": "t",
            "rabbitClusterReference": {"name": "c"},
        }))
        .expect("spec");
        let f = Federation::new("dc2", spec);
        let secret = BTreeMap::from([("uri".to_string(), "amqp://a, amqps://b:5671".to_string())]);
        assert_eq!(f.path(), "/api/parameters/federation-upstream/%2F/dc2");
        assert_eq!(
            f.body(Some(&secret)).expect("body"),
            json!({"value": {"uri": ["amqp://a", "amqps://b:5671"], "prefetch-count": 50,
                "ack-mode": "on-publish", "reconnect-delay": 3, "trust-user-id": true,
                "exchange": "x", "max-hops": 2, "expires": 1000, "message-ttl": 500,
                "queue": "q", "consumer-tag": "t"}})
        );
        let bad = BTreeMap::from([("uri".to_string(), "http://nope".to_string())]);
        assert!(
            f.body(Some(&bad))
                .expect_err("bad uri")
                .contains("not an amqp")
        );
        assert!(
            f.body(Some(&BTreeMap::new()))
                .expect_err("missing")
                .contains("no key uri")
        );
    }

    #[test]
    fn links_of_this_upstream_only() {
        let spec: FederationSpec = serde_json::from_value(
            json!({"uriSecret": {"name": "up"}, "rabbitClusterReference": {"name": "c"}}),
        )
        .expect("spec");
        let f = Federation::new("dc2", spec);
        let links = json!([
            {"upstream": "dc2", "type": "exchange", "exchange": "events", "status": "running"},
            {"upstream": "dc3", "type": "exchange", "exchange": "events", "status": "running"},
            {"upstream": "dc2", "type": "queue", "queue": "jobs", "status": "error", "error": "refused"},
        ]);
        let status = f.observed_status(&[Some(links)]);
        assert_eq!(
            status["links"],
            json!([
                {"type": "exchange", "name": "events", "status": "running"},
                {"type": "queue", "name": "jobs", "status": "error", "error": "refused"},
            ])
        );
    }
}
