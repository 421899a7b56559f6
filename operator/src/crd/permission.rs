//! `Permission`: what a user may configure, write and read in a virtual host.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{
    ConnectionSecretReference, DeletionPolicy, RabbitClusterReference, UserReference, default_vhost,
};

/// A user's permissions in a virtual host on a Warren or RabbitMQ broker.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "warren.dev",
    version = "v1alpha1",
    kind = "Permission",
    namespaced,
    status = "PermissionStatus",
    shortname = "wperm",
    category = "warren",
    doc = "A user's permissions in a virtual host: regular expressions over the names of the queues and exchanges it may configure, write to and read from.",
    printcolumn(name = "Vhost", type_ = "string", json_path = ".spec.vhost"),
    printcolumn(name = "User", type_ = "string", json_path = ".status.user"),
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
#[x_kube(validation = kube::core::Rule::new("has(self.user) != has(self.userReference)").message("set exactly one of user and userReference"))]
#[x_kube(validation = kube::core::Rule::new("(has(self.user) ? self.user : '') == (has(oldSelf.user) ? oldSelf.user : '') && (has(self.userReference) ? self.userReference.name : '') == (has(oldSelf.userReference) ? oldSelf.userReference.name : '')").message("user and userReference cannot be changed; delete the Permission and create a new one"))]
#[x_kube(validation = kube::core::Rule::new("self.vhost == oldSelf.vhost").message("vhost cannot be changed; delete the Permission and create a new one"))]
#[serde(rename_all = "camelCase")]
pub struct PermissionSpec {
    /// Virtual host the permissions apply in.
    #[serde(default = "default_vhost")]
    #[schemars(length(min = 1))]
    pub vhost: String,
    /// Name of the user on the broker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub user: Option<String>,
    /// Or a `User` resource in this namespace (its name on the broker is used).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_reference: Option<UserReference>,
    /// Regular expression over the names of the queues and exchanges the user may declare
    /// and delete; empty matches nothing.
    #[serde(default)]
    pub configure: String,
    /// Regular expression over the names of the exchanges the user may publish to (and
    /// queues it may bind); empty matches nothing.
    #[serde(default)]
    pub write: String,
    /// Regular expression over the names of the queues the user may consume from (and
    /// exchanges it may bind from); empty matches nothing.
    #[serde(default)]
    pub read: String,
    /// The Warren cluster to configure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rabbit_cluster_reference: Option<RabbitClusterReference>,
    /// Or any broker reachable through a management API URL and credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_secret: Option<ConnectionSecretReference>,
    /// Remove the permissions from the broker when this resource is deleted, or keep them.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// What the operator observed of a permission.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PermissionStatus {
    /// `Ready` is true once the broker holds the permissions as the spec says; when the
    /// broker refuses, its message is the broker's error text.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The user's name on the broker, as last applied (for a `userReference`, the
    /// referenced User's name, kept so that deleting this resource after the User still
    /// removes the permissions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}
