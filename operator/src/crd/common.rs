//! Pieces shared by the `Policy`, `Federation` and `Shovel` resources: how they name the
//! broker they configure, and what happens on the broker when they are deleted.

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
