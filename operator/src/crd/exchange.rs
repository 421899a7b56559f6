//! `Exchange`: an exchange declared through the management API.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::common::{
    ConnectionSecretReference, DeletionPolicy, RabbitClusterReference, TopologyStatus,
    default_vhost,
};

/// An exchange on a Warren or RabbitMQ broker.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "warren.dev",
    version = "v1alpha1",
    kind = "Exchange",
    namespaced,
    status = "TopologyStatus",
    shortname = "wx",
    category = "warren",
    doc = "An exchange on a broker. Its properties cannot change after creation (a broker refuses to redeclare an exchange differently): the schema refuses changes to name, vhost, type, durable, autoDelete and internal; changed arguments are refused by the broker (Ready=False with its error). Delete the Exchange and create a new one.",
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
    "self.vhost == oldSelf.vhost && self.type == oldSelf.type && \
     has(self.name) == has(oldSelf.name) && (!has(self.name) || self.name == oldSelf.name) && \
     self.durable == oldSelf.durable && self.autoDelete == oldSelf.autoDelete && \
     self.internal == oldSelf.internal"
).message("name, vhost, type, durable, autoDelete and internal cannot be changed (the broker refuses to redeclare an exchange differently); delete the Exchange and create a new one"))]
#[serde(rename_all = "camelCase")]
pub struct ExchangeSpec {
    /// Exchange name on the broker; defaults to `metadata.name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub name: Option<String>,
    /// Virtual host of the exchange.
    #[serde(default = "default_vhost")]
    #[schemars(length(min = 1))]
    pub vhost: String,
    /// Exchange type: `direct`, `fanout`, `topic`, `headers`, or a type a broker plugin
    /// adds (`x-…`).
    #[serde(rename = "type", default = "direct")]
    #[schemars(length(min = 1))]
    pub type_: String,
    /// Whether the exchange survives a broker restart.
    #[serde(default = "durable_default")]
    pub durable: bool,
    /// Whether the broker deletes the exchange when its last binding goes away.
    #[serde(default)]
    pub auto_delete: bool,
    /// Whether clients cannot publish to it directly (only other exchanges, through
    /// exchange-to-exchange bindings).
    #[serde(default)]
    pub internal: bool,
    /// Optional exchange arguments (`alternate-exchange`, …), passed to the broker, which
    /// validates them. The broker refuses to redeclare an exchange with other arguments: a
    /// change is reported as `Ready=False` with the broker's error.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "crate::crd::free_form_map")]
    pub arguments: BTreeMap<String, serde_json::Value>,
    /// The Warren cluster to configure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rabbit_cluster_reference: Option<RabbitClusterReference>,
    /// Or any broker reachable through a management API URL and credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_secret: Option<ConnectionSecretReference>,
    /// Delete the exchange (and its bindings) from the broker when this resource is
    /// deleted, or keep it.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

fn direct() -> String {
    "direct".to_string()
}

fn durable_default() -> bool {
    true
}
