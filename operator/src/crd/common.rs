//! Pieces shared by the topology resources (`Policy`, `Federation`, `Shovel`, `Vhost`,
//! `User`, `Permission`, `TopicPermission`): how they name the broker they configure, what
//! happens on the broker when they are deleted, and the rules that keep the broker fixed.

use kube::core::Rule;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A `RabbitCluster` managed by this operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RabbitClusterReference {
    /// Name of the `RabbitCluster`.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Namespace of the `RabbitCluster`; defaults to the namespace of this resource. A
    /// cluster in another namespace must list this resource's namespace in its
    /// `warren.dev/topology-allowed-namespaces` annotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// A Secret with the keys `uri` (the management API's base URL), `username` and `password`,
/// for a broker this operator does not manage — a stock RabbitMQ works too.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionSecretReference {
    /// Name of the Secret, in the namespace of this resource.
    #[schemars(length(min = 1))]
    pub name: String,
}

/// What happens on the broker when the Kubernetes resource is deleted.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum DeletionPolicy {
    /// Remove the object from the broker.
    #[default]
    Delete,
    /// Leave the object on the broker.
    Retain,
}

pub(crate) fn default_vhost() -> String {
    "/".to_string()
}

/// CEL rule: `rabbitClusterReference` cannot be set, changed or removed after creation. The
/// operator deletes from the broker it applies to now; moving the resource to another broker
/// would leave its object behind on the old one.
pub(crate) fn cluster_reference_unchanged() -> Rule {
    Rule::new(
        "has(self.rabbitClusterReference) == has(oldSelf.rabbitClusterReference) && \
         (!has(self.rabbitClusterReference) || self.rabbitClusterReference == oldSelf.rabbitClusterReference)",
    )
    .message(
        "rabbitClusterReference cannot be changed (the object would stay behind on the old broker); \
         delete this resource and create a new one",
    )
}

/// CEL rule: `connectionSecret` cannot be set, changed or removed after creation (see
/// `cluster_reference_unchanged`).
pub(crate) fn connection_secret_unchanged() -> Rule {
    Rule::new(
        "has(self.connectionSecret) == has(oldSelf.connectionSecret) && \
         (!has(self.connectionSecret) || self.connectionSecret == oldSelf.connectionSecret)",
    )
    .message(
        "connectionSecret cannot be changed (the object would stay behind on the old broker); \
         delete this resource and create a new one",
    )
}

/// CEL rule: exactly one of `rabbitClusterReference` and `connectionSecret`.
pub(crate) fn exactly_one_target() -> Rule {
    Rule::new("has(self.rabbitClusterReference) != has(self.connectionSecret)")
        .message("set exactly one of rabbitClusterReference and connectionSecret")
}

/// A Secret in this resource's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LocalSecretReference {
    /// Name of the Secret.
    #[schemars(length(min = 1))]
    pub name: String,
}

/// A `User` resource in this resource's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UserReference {
    /// Name of the `User` resource (its `metadata.name`); the permission is for that User's
    /// name on the broker.
    #[schemars(length(min = 1))]
    pub name: String,
}

/// What the operator observed of a topology resource.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TopologyStatus {
    /// `Ready` is true once the broker holds the object as the spec says; when the broker
    /// refuses, its message is the broker's error text.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
