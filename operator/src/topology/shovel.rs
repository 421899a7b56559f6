//! `Shovel` → `PUT /api/parameters/shovel/{vhost}/{name}`.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use serde_json::{Map, Value, json};

use super::federation::uri_value;
use super::{Target, Topology, target_of};
use crate::crd::Shovel;
use crate::crd::common::DeletionPolicy;
use crate::management::segment;

impl Topology for Shovel {
    const CONTROLLER: &'static str = "shovel";
    const FINALIZER: &'static str = "warren.dev/shovel-cleanup";
    const NOUN: &'static str = "shovel";

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
            "/api/parameters/shovel/{}/{}",
            segment(&self.spec.vhost),
            segment(&self.broker_name())
        )
    }
    const MAY_FINISH: bool = true;
    /// A shovel with `srcDeleteAfter` (other than `never`) deletes itself when done.
    fn finishes(&self) -> bool {
        match &self.spec.src_delete_after {
            None => false,
            Some(IntOrString::String(s)) => s != "never",
            Some(IntOrString::Int(_)) => true,
        }
    }
    fn uri_secret(&self) -> Option<String> {
        Some(self.spec.uri_secret.name.clone())
    }
    fn body(&self, secret: Option<&BTreeMap<String, String>>) -> Result<Value, String> {
        let get = |k: &str| {
            secret.and_then(|s| s.get(k)).ok_or_else(|| {
                format!(
                    "spec.uriSecret: Secret {} has no key {k}",
                    self.spec.uri_secret.name
                )
            })
        };
        let s = &self.spec;
        let mut v = Map::new();
        v.insert("src-protocol".into(), json!("amqp091"));
        v.insert("dest-protocol".into(), json!("amqp091"));
        v.insert("src-uri".into(), uri_value(get("srcUri")?, "srcUri")?);
        v.insert("dest-uri".into(), uri_value(get("destUri")?, "destUri")?);
        let mut put = |k: &str, val: Option<Value>| {
            if let Some(val) = val {
                v.insert(k.into(), val);
            }
        };
        put("src-queue", s.src_queue.clone().map(Value::from));
        put("src-exchange", s.src_exchange.clone().map(Value::from));
        put(
            "src-exchange-key",
            s.src_exchange_key.clone().map(Value::from),
        );
        put("src-prefetch-count", s.src_prefetch_count.map(Value::from));
        put(
            "src-delete-after",
            s.src_delete_after.as_ref().map(|d| match d {
                IntOrString::Int(n) => json!(n),
                IntOrString::String(s) => json!(s),
            }),
        );
        if !s.src_queue_args.is_empty() {
            put("src-queue-args", Some(json!(s.src_queue_args)));
        }
        put("dest-queue", s.dest_queue.clone().map(Value::from));
        if !s.dest_queue_args.is_empty() {
            put("dest-queue-args", Some(json!(s.dest_queue_args)));
        }
        put("dest-exchange", s.dest_exchange.clone().map(Value::from));
        put(
            "dest-exchange-key",
            s.dest_exchange_key.clone().map(Value::from),
        );
        put(
            "dest-add-forward-headers",
            s.dest_add_forward_headers.map(Value::from),
        );
        put(
            "dest-add-timestamp-header",
            s.dest_add_timestamp_header.map(Value::from),
        );
        if !s.dest_publish_properties.is_empty() {
            put(
                "dest-publish-properties",
                Some(json!(s.dest_publish_properties)),
            );
        }
        put("ack-mode", s.ack_mode.map(|m| json!(m.as_str())));
        put("reconnect-delay", s.reconnect_delay.map(Value::from));
        Ok(json!({"value": v}))
    }
    fn observe_paths(&self) -> Vec<String> {
        vec![format!("/api/shovels/{}", segment(&self.spec.vhost))]
    }
    fn observed_status(&self, observed: &[Option<Value>]) -> Map<String, Value> {
        let name = self.broker_name();
        let mut m = Map::new();
        let found = observed
            .first()
            .and_then(|o| o.as_ref())
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|s| s.get("name").and_then(Value::as_str) == Some(name.as_str()));
        if let Some(sh) = found {
            if let Some(state) = sh.get("state").and_then(Value::as_str) {
                m.insert("state".into(), json!(state));
            }
            if let Some(reason) = sh.get("reason").and_then(Value::as_str) {
                m.insert("reason".into(), json!(reason));
            }
            if let Some(n) = sh
                .get("messages_forwarded")
                .or_else(|| sh.get("forwarded"))
                .and_then(Value::as_i64)
            {
                m.insert("messagesForwarded".into(), json!(n));
            }
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::ShovelSpec;

    #[test]
    fn body_has_the_shovel_keys() {
        let spec: ShovelSpec = serde_json::from_value(json!({
            "uriSecret": {"name": "uris"}, "srcQueue": "a", "srcPrefetchCount": 10,
            "srcQueueArgs": {"x-queue-type": "quorum"},
            "srcDeleteAfter": "queue-length", "destExchange": "x", "destExchangeKey": "k",
            "destAddForwardHeaders": true, "destPublishProperties": {"delivery_mode": 2},
            "ackMode": "on-confirm", "reconnectDelay": 2, "connectionSecret": {"name": "c"},
        }))
        .expect("spec");
        let sh = Shovel::new("move", spec);
        let secret = BTreeMap::from([
            ("srcUri".to_string(), "amqp://src".to_string()),
            ("destUri".to_string(), "amqp://".to_string()),
        ]);
        assert_eq!(sh.path(), "/api/parameters/shovel/%2F/move");
        assert_eq!(
            sh.body(Some(&secret)).expect("body"),
            json!({"value": {"src-protocol": "amqp091", "dest-protocol": "amqp091",
                "src-uri": "amqp://src", "dest-uri": "amqp://", "src-queue": "a",
                "src-queue-args": {"x-queue-type": "quorum"},
                "src-prefetch-count": 10, "src-delete-after": "queue-length",
                "dest-exchange": "x", "dest-exchange-key": "k", "dest-add-forward-headers": true,
                "dest-publish-properties": {"delivery_mode": 2}, "ack-mode": "on-confirm",
                "reconnect-delay": 2}})
        );
        let missing = BTreeMap::from([("srcUri".to_string(), "amqp://src".to_string())]);
        assert!(
            sh.body(Some(&missing))
                .expect_err("no destUri")
                .contains("destUri")
        );
    }

    #[test]
    fn only_a_shovel_with_src_delete_after_finishes() {
        let with = |after: Value| {
            let mut spec = json!({"uriSecret": {"name": "u"}, "srcQueue": "a", "destQueue": "b",
                                  "connectionSecret": {"name": "c"}});
            if !after.is_null() {
                spec["srcDeleteAfter"] = after;
            }
            Shovel::new(
                "s",
                serde_json::from_value::<ShovelSpec>(spec).expect("spec"),
            )
        };
        assert!(!with(Value::Null).finishes());
        assert!(!with(json!("never")).finishes());
        assert!(with(json!("queue-length")).finishes());
        assert!(with(json!(100)).finishes());
    }

    #[test]
    fn state_comes_from_api_shovels() {
        let spec: ShovelSpec = serde_json::from_value(json!({"uriSecret": {"name": "u"}, "srcQueue": "a", "destQueue": "b", "connectionSecret": {"name": "c"}})).expect("spec");
        let sh = Shovel::new("move", spec);
        let status = sh.observed_status(&[Some(
            json!([{"name": "move", "state": "terminated", "reason": "needs restart"}]),
        )]);
        assert_eq!(status["state"], json!("terminated"));
        assert_eq!(status["reason"], json!("needs restart"));
    }
}
