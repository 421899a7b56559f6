//! `Vhost` → `PUT /api/vhosts/{name}`; deletion deletes the virtual host.

use std::collections::BTreeMap;

use kube::ResourceExt;
use serde_json::{Value, json};

use super::{Limits, Target, Topology, tag_set, target_of};
use crate::crd::Vhost;
use crate::crd::common::DeletionPolicy;
use crate::management::segment;

impl Topology for Vhost {
    const CONTROLLER: &'static str = "vhost";
    const FINALIZER: &'static str = "warren.dev/vhost-cleanup";
    const NOUN: &'static str = "virtual host";

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
        format!("/api/vhosts/{}", segment(&self.broker_name()))
    }
    /// Tags as a set (brokers answer an array); the default queue type only when specified,
    /// at the top level or (RabbitMQ) in `metadata`.
    fn in_sync(&self, body: &Value, current: &Value) -> bool {
        body["description"] == current["description"]
            && tag_set(&body["tags"]) == tag_set(&current["tags"])
            && self.spec.default_queue_type.is_none_or(|t| {
                current["default_queue_type"] == t.as_str()
                    || current["metadata"]["default_queue_type"] == t.as_str()
            })
    }
    fn limits(&self) -> Option<Limits> {
        let l = self.spec.limits.as_ref()?;
        let vhost = segment(&self.broker_name());
        Some(Limits {
            read: format!("/api/vhost-limits/{vhost}"),
            prefix: format!("/api/vhost-limits/{vhost}"),
            desired: vec![
                ("max-connections", l.max_connections),
                ("max-queues", l.max_queues),
            ],
        })
    }
    fn body(&self, _: Option<&BTreeMap<String, String>>) -> Result<Value, String> {
        // Description and tags are always sent, so removing them from the spec clears them.
        let mut body = json!({
            "description": self.spec.description.clone().unwrap_or_default(),
            "tags": self.spec.tags.join(","),
        });
        // RabbitMQ up to 3.11 reads `defaultqueuetype` (as rabbit-hole sends it); Warren and
        // later RabbitMQs read `default_queue_type`. Each ignores the other key.
        if let Some(t) = self.spec.default_queue_type {
            body["default_queue_type"] = json!(t.as_str());
            body["defaultqueuetype"] = json!(t.as_str());
        }
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::VhostSpec;

    #[test]
    fn body_and_path() {
        let spec: VhostSpec = serde_json::from_value(json!({
            "name": "prod/eu", "tags": ["eu", "prod"], "description": "Production",
            "defaultQueueType": "quorum", "rabbitClusterReference": {"name": "c"},
        }))
        .expect("spec");
        let v = Vhost::new("prod", spec);
        assert_eq!(v.path(), "/api/vhosts/prod%2Feu");
        assert_eq!(
            v.body(None).expect("body"),
            json!({"description": "Production", "tags": "eu,prod",
                   "default_queue_type": "quorum", "defaultqueuetype": "quorum"})
        );
        // Compared with the answers of Warren and of RabbitMQ (metadata).
        let body = v.body(None).expect("body");
        assert!(v.in_sync(
            &body,
            &json!({"description": "Production", "tags": ["prod", "eu"],
                                         "default_queue_type": "quorum"})
        ));
        assert!(v.in_sync(
            &body,
            &json!({"description": "Production", "tags": ["eu", "prod"],
                                         "metadata": {"default_queue_type": "quorum"}})
        ));
        assert!(!v.in_sync(
            &body,
            &json!({"description": "Production", "tags": ["eu"],
                                          "default_queue_type": "quorum"})
        ));
        assert!(!v.in_sync(
            &body,
            &json!({"description": "", "tags": ["eu", "prod"],
                                          "default_queue_type": "quorum"})
        ));
        assert!(!v.in_sync(
            &body,
            &json!({"description": "Production", "tags": ["eu", "prod"],
                                          "default_queue_type": "classic"})
        ));
        let spec: VhostSpec =
            serde_json::from_value(json!({"connectionSecret": {"name": "s"}})).expect("spec");
        let v = Vhost::new("plain", spec);
        assert_eq!(v.path(), "/api/vhosts/plain");
        assert_eq!(
            v.body(None).expect("body"),
            json!({"description": "", "tags": ""})
        );
    }
}
