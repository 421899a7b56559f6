//! `OperatorPolicy` → `PUT /api/operator-policies/{vhost}/{name}`.

use std::collections::BTreeMap;

use kube::ResourceExt;
use serde_json::{Value, json};

use super::{Target, Topology, target_of};
use crate::crd::OperatorPolicy;
use crate::crd::common::DeletionPolicy;
use crate::management::segment;

impl Topology for OperatorPolicy {
    const CONTROLLER: &'static str = "operatorpolicy";
    const FINALIZER: &'static str = "warren.dev/operatorpolicy-cleanup";
    const NOUN: &'static str = "operator policy";

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
            "/api/operator-policies/{}/{}",
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::OperatorPolicySpec;

    #[test]
    fn body_and_path() {
        let spec: OperatorPolicySpec = serde_json::from_value(json!({
            "vhost": "prod/eu", "pattern": "^orders\\.", "priority": 2,
            "definition": {"max-length": 1000, "x-other": "v"},
            "rabbitClusterReference": {"name": "c"},
        }))
        .expect("spec");
        let p = OperatorPolicy::new("limits", spec);
        assert_eq!(p.path(), "/api/operator-policies/prod%2Feu/limits");
        assert_eq!(
            p.body(None).expect("body"),
            json!({"pattern": "^orders\\.", "priority": 2, "apply-to": "queues",
                   "definition": {"max-length": 1000, "x-other": "v"}})
        );
    }
}
