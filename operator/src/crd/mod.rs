//! The custom resources of group `warren.dev`, version `v1alpha1`. The CRD manifests in
//! `crds/` are generated from these types by the `crdgen` binary.

// Several `printcolumn(...)` entries repeat `type_ = "string"`, which clippy mistakes for
// a duplicated attribute.
#![allow(clippy::duplicated_attributes)]

pub mod binding;
pub mod cluster;
pub mod common;
pub mod exchange;
pub mod federation;
pub mod operator_policy;
pub mod permission;
pub mod policy;
pub mod queue;
pub mod shovel;
pub mod topic_permission;
pub mod user;
pub mod vhost;

pub use binding::{Binding, BindingSpec};
pub use cluster::{RabbitCluster, RabbitClusterSpec, RabbitClusterStatus};
pub use exchange::{Exchange, ExchangeSpec};
pub use federation::{Federation, FederationSpec};
pub use operator_policy::{OperatorPolicy, OperatorPolicySpec};
pub use permission::{Permission, PermissionSpec};
pub use policy::{Policy, PolicySpec};
pub use queue::{Queue, QueueSpec};
pub use shovel::{Shovel, ShovelSpec};
pub use topic_permission::{TopicPermission, TopicPermissionSpec};
pub use user::{User, UserSpec};
pub use vhost::{Vhost, VhostSpec};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use schemars::{Schema, SchemaGenerator, json_schema};

/// Every CRD of the operator, with the file name `crdgen` writes it to.
pub fn all() -> Vec<(&'static str, CustomResourceDefinition)> {
    vec![
        ("rabbitclusters.yaml", RabbitCluster::crd()),
        ("policies.yaml", Policy::crd()),
        ("federations.yaml", Federation::crd()),
        ("shovels.yaml", Shovel::crd()),
        ("vhosts.yaml", Vhost::crd()),
        ("users.yaml", User::crd()),
        ("permissions.yaml", Permission::crd()),
        ("topicpermissions.yaml", TopicPermission::crd()),
        ("queues.yaml", Queue::crd()),
        ("exchanges.yaml", Exchange::crd()),
        ("operatorpolicies.yaml", OperatorPolicy::crd()),
        ("bindings.yaml", Binding::crd()),
    ]
}

/// An object whose fields are not described by the schema (merged or passed through).
pub(crate) fn free_form_object(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true
    })
}

/// A map of arbitrary JSON values.
pub(crate) fn free_form_map(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "additionalProperties": { "x-kubernetes-preserve-unknown-fields": true }
    })
}

/// Any JSON value.
pub(crate) fn any_value(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "x-kubernetes-preserve-unknown-fields": true
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// Walks a schema and returns the paths of properties without a description, so
    /// `kubectl explain` has something to say about every field.
    fn undocumented(schema: &Value, path: &str, out: &mut Vec<String>) {
        if let Some(props) = schema.get("properties").and_then(Value::as_object) {
            for (name, prop) in props {
                let p = format!("{path}.{name}");
                // apiVersion/kind/metadata are Kubernetes' own.
                let standard =
                    path.is_empty() && matches!(name.as_str(), "apiVersion" | "kind" | "metadata");
                if !standard
                    && prop
                        .get("description")
                        .and_then(Value::as_str)
                        .is_none_or(str::is_empty)
                {
                    out.push(p.clone());
                }
                undocumented(prop, &p, out);
            }
        }
        if let Some(items) = schema.get("items") {
            undocumented(items, &format!("{path}[]"), out);
        }
        if let Some(extra) = schema.get("additionalProperties") {
            undocumented(extra, &format!("{path}{{}}"), out);
        }
    }

    #[test]
    fn every_field_has_a_description() {
        let mut missing = Vec::new();
        for (_, crd) in all() {
            let v = serde_json::to_value(&crd).expect("json");
            for version in v["spec"]["versions"].as_array().expect("versions") {
                let schema = &version["schema"]["openAPIV3Schema"];
                undocumented(schema, crd.spec.names.kind.as_str(), &mut missing);
            }
        }
        assert!(
            missing.is_empty(),
            "fields without a description: {missing:#?}"
        );
    }

    #[test]
    fn every_crd_is_in_the_warren_category_with_status() {
        for (_, crd) in all() {
            assert_eq!(crd.spec.group, "warren.dev");
            assert_eq!(crd.spec.names.categories, Some(vec!["warren".to_string()]));
            assert!(
                crd.spec
                    .names
                    .short_names
                    .as_ref()
                    .is_some_and(|s| !s.is_empty())
            );
            for v in &crd.spec.versions {
                assert!(
                    v.subresources
                        .as_ref()
                        .and_then(|s| s.status.as_ref())
                        .is_some()
                );
                assert!(
                    v.additional_printer_columns
                        .as_ref()
                        .is_some_and(|c| c.len() >= 2)
                );
            }
        }
    }
}
