//! `Queue` → `PUT /api/queues/{vhost}/{name}` (a declare: idempotent while the properties
//! match, which the schema keeps so); deletion deletes the queue with its messages.

use std::collections::BTreeMap;

use kube::ResourceExt;
use serde_json::{Value, json};

use super::{Target, Topology, subset, target_of};
use crate::crd::Queue;
use crate::crd::common::DeletionPolicy;
use crate::management::segment;

impl Topology for Queue {
    const CONTROLLER: &'static str = "queue";
    const FINALIZER: &'static str = "warren.dev/queue-cleanup";
    const NOUN: &'static str = "queue";

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
            "/api/queues/{}/{}",
            segment(&self.spec.vhost),
            segment(&self.broker_name())
        )
    }
    /// Arguments as a subset: a broker may list defaults it added.
    fn in_sync(&self, body: &Value, current: &Value) -> bool {
        body["durable"] == current["durable"]
            && body["auto_delete"] == current["auto_delete"]
            && subset(&body["arguments"], &current["arguments"])
    }
    fn body(&self, _: Option<&BTreeMap<String, String>>) -> Result<Value, String> {
        let mut arguments: serde_json::Map<String, Value> = self
            .spec
            .arguments
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if let Some(t) = self.spec.type_ {
            if let Some(other) = arguments.get("x-queue-type")
                && other != t.as_str()
            {
                return Err(format!(
                    "spec.type is {} but spec.arguments[\"x-queue-type\"] is {other}",
                    t.as_str()
                ));
            }
            arguments.insert("x-queue-type".into(), json!(t.as_str()));
        }
        Ok(json!({
            "durable": self.spec.durable,
            "auto_delete": self.spec.auto_delete,
            "arguments": arguments,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::QueueSpec;

    fn queue(spec: Value) -> Queue {
        Queue::new(
            "orders",
            serde_json::from_value::<QueueSpec>(spec).expect("spec"),
        )
    }

    #[test]
    fn body_and_path() {
        let q = queue(
            json!({"vhost": "prod/eu", "type": "quorum", "arguments": {"x-max-length": 10},
                             "rabbitClusterReference": {"name": "c"}}),
        );
        assert_eq!(q.path(), "/api/queues/prod%2Feu/orders");
        assert_eq!(
            q.body(None).expect("body"),
            json!({"durable": true, "auto_delete": false,
                   "arguments": {"x-max-length": 10, "x-queue-type": "quorum"}})
        );
        let q = queue(json!({"name": "tmp", "durable": false, "autoDelete": true,
                             "connectionSecret": {"name": "s"}}));
        assert_eq!(q.path(), "/api/queues/%2F/tmp");
        assert_eq!(
            q.body(None).expect("body"),
            json!({"durable": false, "auto_delete": true, "arguments": {}})
        );
    }

    #[test]
    fn a_type_and_a_different_x_queue_type_are_refused() {
        let q = queue(
            json!({"type": "quorum", "arguments": {"x-queue-type": "classic"},
                             "rabbitClusterReference": {"name": "c"}}),
        );
        assert!(q.body(None).is_err());
    }
}
