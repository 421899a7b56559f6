//! `Binding`: a binding from an exchange to a queue or to another exchange.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{
    ConnectionSecretReference, DeletionPolicy, RabbitClusterReference, TopologyStatus,
    default_vhost,
};

/// A binding on a Warren or RabbitMQ broker.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "warren.dev",
    version = "v1alpha1",
    kind = "Binding",
    namespaced,
    status = "TopologyStatus",
    shortname = "wb",
    category = "warren",
    doc = "A binding from a source exchange to a destination queue or exchange, with a routing key and optional arguments. A binding has no name on the broker: it is the source, destination, routing key and arguments together, so none of them can change (the schema refuses it); delete the Binding and create a new one. Deleting it removes the one broker binding with exactly this routing key and these arguments (found through its properties key). `kubectl get bindings` lists Kubernetes' own core Bindings: use `kubectl get bindings.warren.dev` or the short name `wb`.",
    printcolumn(name = "Vhost", type_ = "string", json_path = ".spec.vhost"),
    printcolumn(name = "Source", type_ = "string", json_path = ".spec.source"),
    printcolumn(
        name = "Destination",
        type_ = "string",
        json_path = ".spec.destination"
    ),
    printcolumn(name = "Key", type_ = "string", json_path = ".spec.routingKey"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = super::common::exactly_one_target())]
#[x_kube(validation = super::common::cluster_reference_unchanged())]
#[x_kube(validation = super::common::connection_secret_unchanged())]
#[x_kube(validation = kube::core::Rule::new(
    "self.vhost == oldSelf.vhost && self.source == oldSelf.source && \
     self.destination == oldSelf.destination && \
     self.destinationType == oldSelf.destinationType && \
     self.routingKey == oldSelf.routingKey && \
     has(self.arguments) == has(oldSelf.arguments)"
).message("vhost, source, destination, destinationType, routingKey and arguments cannot be changed (they are what identifies a binding on the broker); delete the Binding and create a new one"))]
#[serde(rename_all = "camelCase")]
pub struct BindingSpec {
    /// Virtual host of the binding (and of both its ends).
    #[serde(default = "default_vhost")]
    #[schemars(length(min = 1))]
    pub vhost: String,
    /// Name of the source exchange (the default exchange `""` cannot be bound).
    #[schemars(length(min = 1, max = 255))]
    pub source: String,
    /// Name of the destination queue or exchange.
    #[schemars(length(min = 1, max = 255))]
    pub destination: String,
    /// Whether `destination` is a queue or an exchange.
    #[serde(default)]
    pub destination_type: DestinationType,
    /// Routing key (a pattern for topic exchanges; ignored by fanout and headers
    /// exchanges).
    #[serde(default)]
    #[schemars(length(max = 255))]
    pub routing_key: String,
    /// Optional binding arguments (`x-match` and the headers to match for a headers
    /// exchange, …).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "immutable_arguments")]
    pub arguments: BTreeMap<String, serde_json::Value>,
    /// The Warren cluster to configure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rabbit_cluster_reference: Option<RabbitClusterReference>,
    /// Or any broker reachable through a management API URL and credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_secret: Option<ConnectionSecretReference>,
    /// Delete the binding from the broker when this resource is deleted, or keep it.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// Free-form arguments that cannot change: CEL sees into an object whose unknown fields
/// are preserved (not into a map of untyped values), so the rule is on the field itself.
fn immutable_arguments(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
        "x-kubernetes-validations": [{
            "rule": "self == oldSelf",
            "message": "vhost, source, destination, destinationType, routingKey and arguments cannot be changed (they are what identifies a binding on the broker); delete the Binding and create a new one",
        }],
    })
}

/// Whether a binding's destination is a queue or an exchange.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum DestinationType {
    /// A queue.
    #[default]
    Queue,
    /// An exchange (an exchange-to-exchange binding).
    Exchange,
}
