//! `Vhost`: a virtual host, created through the management API.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{
    ConnectionSecretReference, DeletionPolicy, RabbitClusterReference, TopologyStatus,
};

/// A virtual host on a Warren or RabbitMQ broker.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "warren.dev",
    version = "v1alpha1",
    kind = "Vhost",
    namespaced,
    status = "TopologyStatus",
    shortname = "wvhost",
    category = "warren",
    doc = "A virtual host on a broker: its own queues, exchanges, permissions and policies.",
    printcolumn(name = "Vhost", type_ = "string", json_path = ".spec.name"),
    printcolumn(
        name = "Queue-Type",
        type_ = "string",
        json_path = ".spec.defaultQueueType"
    ),
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
#[x_kube(validation = kube::core::Rule::new("(has(self.name) ? self.name : '') == (has(oldSelf.name) ? oldSelf.name : '')").message("name cannot be changed; delete the Vhost and create a new one"))]
#[serde(rename_all = "camelCase")]
pub struct VhostSpec {
    /// Virtual host name on the broker; defaults to `metadata.name` (set it for names
    /// Kubernetes does not allow, such as `/` or `prod/eu`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub name: Option<String>,
    /// Tags of the virtual host (free text, shown by the management UI).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Description of the virtual host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Type of the queues declared in this virtual host without an `x-queue-type`
    /// argument. Unset leaves the broker's default (classic).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_queue_type: Option<QueueType>,
    /// Limits of the virtual host (`PUT /api/vhost-limits/{vhost}/{name}`). Unset: the
    /// operator leaves the broker's limits alone; set: each limit not given is removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<VhostLimits>,
    /// The Warren cluster to configure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rabbit_cluster_reference: Option<RabbitClusterReference>,
    /// Or any broker reachable through a management API URL and credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_secret: Option<ConnectionSecretReference>,
    /// Delete the virtual host (with every queue, exchange and message in it) from the
    /// broker when this resource is deleted, or keep it.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// A queue type (the `x-queue-type` argument): `classic` (single leader), `quorum`
/// (replicated, Raft) or `stream` (append-only log; a broker without streams refuses it).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// Single-leader queues.
    Classic,
    /// Replicated queues (Raft).
    Quorum,
    /// Append-only logs (RabbitMQ; a broker without streams refuses it).
    Stream,
}

impl QueueType {
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
            QueueType::Stream => "stream",
        }
    }
}

/// Limits of a virtual host.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VhostLimits {
    /// Most client connections to the virtual host at once (`max-connections`; 0 refuses
    /// every connection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_connections: Option<i64>,
    /// Most queues in the virtual host (`max-queues`; 0 refuses every declare).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_queues: Option<i64>,
}
