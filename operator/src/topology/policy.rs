//! `Policy` → `PUT /api/policies/{vhost}/{name}`.

use std::collections::BTreeMap;

use kube::ResourceExt;
use serde_json::{Value, json};

use super::{Target, Topology, target_of};
use crate::crd::Policy;
use crate::crd::common::DeletionPolicy;
use crate::management::segment;

/// Most objects listed in `status.appliesTo`.
const APPLIES_TO_MAX: usize = 100;

impl Topology for Policy {
    const CONTROLLER: &'static str = "policy";
    const FINALIZER: &'static str = "warren.dev/policy-cleanup";
    const NOUN: &'static str = "policy";

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
            "/api/policies/{}/{}",
            segment(&self.spec.vhost),
            segment(&self.broker_name())
        )
    }
    fn body(&self, _: Option<&BTreeMap<String, String>>) -> Result<Value, String> {
        let definition = serde_json::to_value(&self.spec.definition).map_err(|e| e.to_string())?;
        Ok(json!({
            "pattern": self.spec.pattern,
            "definition": definition,
            "priority": self.spec.priority,
            "apply-to": self.spec.apply_to.as_str(),
        }))
    }
    fn observe_paths(&self) -> Vec<String> {
        let vhost = segment(&self.spec.vhost);
        vec![
            format!("/api/queues/{vhost}"),
            format!("/api/exchanges/{vhost}"),
        ]
    }
    fn observed_status(&self, observed: &[Option<Value>]) -> serde_json::Map<String, Value> {
        let name = self.broker_name();
        let mut applies = Vec::new();
        for (kind, list) in ["queue", "exchange"].iter().zip(observed) {
            for item in list
                .as_ref()
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if item.get("policy").and_then(Value::as_str) == Some(name.as_str())
                    && let Some(n) = item.get("name").and_then(Value::as_str)
                {
                    applies.push(format!("{kind} {n}"));
                }
            }
        }
        applies.truncate(APPLIES_TO_MAX);
        let mut m = serde_json::Map::new();
        m.insert("appliesTo".into(), json!(applies));
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::PolicySpec;

    fn policy(spec: Value) -> Policy {
        let spec: PolicySpec = serde_json::from_value(spec).expect("spec");
        Policy::new("limits", spec)
    }

    #[test]
    fn body_is_what_the_management_api_takes() {
        let p = policy(json!({
            "pattern": "^orders\\\\.", "applyTo": "queues", "priority": 3,
            "definition": {"max-length": 10, "overflow": "reject-publish", "x-custom": "v"},
            "rabbitClusterReference": {"name": "c"},
        }));
        assert_eq!(p.path(), "/api/policies/%2F/limits");
        assert_eq!(
            p.body(None).expect("body"),
            json!({"pattern": "^orders\\\\.", "priority": 3, "apply-to": "queues",
                   "definition": {"max-length": 10, "overflow": "reject-publish", "x-custom": "v"}})
        );
    }

    #[test]
    fn spec_name_and_vhost_are_encoded() {
        let p = policy(
            json!({"name": "a b", "vhost": "prod/eu", "pattern": ".", "definition": {"expires": 5},
                              "connectionSecret": {"name": "s"}}),
        );
        assert_eq!(p.path(), "/api/policies/prod%2Feu/a%20b");
        assert!(matches!(p.target(), Target::Secret(_)));
    }

    #[test]
    fn applies_to_lists_matching_objects() {
        let p = policy(
            json!({"pattern": ".", "definition": {"expires": 5}, "rabbitClusterReference": {"name": "c"}}),
        );
        let queues = json!([{"name": "q1", "policy": "limits"}, {"name": "q2", "policy": "other"}]);
        let exchanges = json!([{"name": "x1", "policy": "limits"}]);
        let status = p.observed_status(&[Some(queues), Some(exchanges)]);
        assert_eq!(status["appliesTo"], json!(["queue q1", "exchange x1"]));
    }
}
