//! `TopicPermission`: which routing keys a user may publish and bind with on a topic
//! exchange.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::common::{
    ConnectionSecretReference, DeletionPolicy, RabbitClusterReference, UserReference, default_vhost,
};
use super::permission::PermissionStatus;

/// A user's topic permissions on one exchange of a Warren or RabbitMQ broker.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "warren.dev",
    version = "v1alpha1",
    kind = "TopicPermission",
    namespaced,
    status = "PermissionStatus",
    shortname = "wtopicperm",
    category = "warren",
    doc = "A user's topic permissions on one topic exchange: regular expressions over the routing keys it may publish with and bind with. Deleting one (deletionPolicy: delete) removes all of the user's topic permissions in the virtual host, as the management API's DELETE /api/topic-permissions/{vhost}/{user} does: keep one TopicPermission per user and vhost, or use deletionPolicy: retain.",
    printcolumn(name = "Vhost", type_ = "string", json_path = ".spec.vhost"),
    printcolumn(name = "User", type_ = "string", json_path = ".status.user"),
    printcolumn(name = "Exchange", type_ = "string", json_path = ".spec.exchange"),
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
#[x_kube(validation = kube::core::Rule::new("(has(self.user) ? self.user : '') == (has(oldSelf.user) ? oldSelf.user : '') && (has(self.userReference) ? self.userReference.name : '') == (has(oldSelf.userReference) ? oldSelf.userReference.name : '')").message("user and userReference cannot be changed; delete the TopicPermission and create a new one"))]
#[x_kube(validation = kube::core::Rule::new("self.vhost == oldSelf.vhost && self.exchange == oldSelf.exchange").message("vhost and exchange cannot be changed; delete the TopicPermission and create a new one"))]
#[serde(rename_all = "camelCase")]
pub struct TopicPermissionSpec {
    /// Virtual host of the exchange.
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
    /// The topic exchange these permissions are for.
    #[schemars(length(min = 1))]
    pub exchange: String,
    /// Regular expression over the routing keys the user may publish with; empty matches
    /// nothing.
    #[serde(default)]
    pub write: String,
    /// Regular expression over the routing keys the user may bind queues with; empty
    /// matches nothing.
    #[serde(default)]
    pub read: String,
    /// The Warren cluster to configure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rabbit_cluster_reference: Option<RabbitClusterReference>,
    /// Or any broker reachable through a management API URL and credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_secret: Option<ConnectionSecretReference>,
    /// On deletion of this resource: `delete` removes all of the user's topic permissions
    /// in the virtual host (the management API deletes them per user and vhost, not per
    /// exchange); `retain` keeps them.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}
