//! `Queue`: a queue declared through the management API.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::common::{
    ConnectionSecretReference, DeletionPolicy, RabbitClusterReference, TopologyStatus,
    default_vhost,
};
use super::vhost::QueueType;

/// A queue on a Warren or RabbitMQ broker.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "warren.dev",
    version = "v1alpha1",
    kind = "Queue",
    namespaced,
    status = "TopologyStatus",
    shortname = "wq",
    category = "warren",
    doc = "A queue on a broker. Its properties cannot change after creation (a broker refuses to redeclare a queue differently): the schema refuses changes to name, vhost, type, durable and autoDelete; changed arguments are refused by the broker (Ready=False with its error). Delete the Queue and create a new one.",
    printcolumn(name = "Vhost", type_ = "string", json_path = ".spec.vhost"),
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.type"),
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
    "self.vhost == oldSelf.vhost && \
     has(self.name) == has(oldSelf.name) && (!has(self.name) || self.name == oldSelf.name) && \
     has(self.type) == has(oldSelf.type) && (!has(self.type) || self.type == oldSelf.type) && \
     self.durable == oldSelf.durable && self.autoDelete == oldSelf.autoDelete"
).message("name, vhost, type, durable and autoDelete cannot be changed (the broker refuses to redeclare a queue differently); delete the Queue and create a new one"))]
#[serde(rename_all = "camelCase")]
pub struct QueueSpec {
    /// Queue name on the broker; defaults to `metadata.name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub name: Option<String>,
    /// Virtual host of the queue.
    #[serde(default = "default_vhost")]
    #[schemars(length(min = 1))]
    pub vhost: String,
    /// Queue type (the `x-queue-type` argument); unset leaves it to the virtual host's
    /// default queue type. Quorum and stream queues must be durable.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub type_: Option<QueueType>,
    /// Whether the queue survives a broker restart.
    #[serde(default = "durable_default")]
    pub durable: bool,
    /// Whether the broker deletes the queue when its last consumer goes away.
    #[serde(default)]
    pub auto_delete: bool,
    /// Optional queue arguments (`x-max-length`, `x-message-ttl`, `x-dead-letter-exchange`,
    /// …), passed to the broker, which validates them. The broker refuses to redeclare a
    /// queue with other arguments: a change is reported as `Ready=False` with the broker's
    /// error, and the queue keeps its arguments (use a Policy for settings that change).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "crate::crd::free_form_map")]
    pub arguments: BTreeMap<String, serde_json::Value>,
    /// The Warren cluster to configure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rabbit_cluster_reference: Option<RabbitClusterReference>,
    /// Or any broker reachable through a management API URL and credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_secret: Option<ConnectionSecretReference>,
    /// Delete the queue (and the messages in it) from the broker when this resource is
    /// deleted, or keep it.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

fn durable_default() -> bool {
    true
}
