//! `Shovel`: a dynamic shovel, written as a `shovel` runtime parameter.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{
    ConnectionSecretReference, DeletionPolicy, RabbitClusterReference, default_vhost,
};
use super::federation::{AckMode, UriSecretReference};

/// A shovel: moves messages from a source queue or exchange to a destination queue or
/// exchange, possibly on another broker.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "warren.dev",
    version = "v1alpha1",
    kind = "Shovel",
    namespaced,
    status = "ShovelStatus",
    shortname = "wshovel",
    category = "warren",
    doc = "A dynamic shovel on a broker.",
    printcolumn(name = "Vhost", type_ = "string", json_path = ".spec.vhost"),
    printcolumn(name = "State", type_ = "string", json_path = ".status.state"),
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
#[x_kube(validation = kube::core::Rule::new("has(self.srcQueue) != has(self.srcExchange)").message("set exactly one source: srcQueue, or srcExchange (with srcExchangeKey)"))]
#[x_kube(validation = kube::core::Rule::new("!has(self.srcExchangeKey) || has(self.srcExchange)").message("srcExchangeKey needs srcExchange"))]
#[x_kube(validation = kube::core::Rule::new("has(self.destQueue) != has(self.destExchange)").message("set exactly one destination: destQueue, or destExchange (with destExchangeKey)"))]
#[x_kube(validation = kube::core::Rule::new("!has(self.destExchangeKey) || has(self.destExchange)").message("destExchangeKey needs destExchange"))]
#[x_kube(validation = kube::core::Rule::new("(has(self.name) ? self.name : '') == (has(oldSelf.name) ? oldSelf.name : '')").message("name cannot be changed; delete the Shovel and create a new one"))]
#[x_kube(validation = kube::core::Rule::new("self.vhost == oldSelf.vhost").message("vhost cannot be changed; delete the Shovel and create a new one"))]
#[serde(rename_all = "camelCase")]
pub struct ShovelSpec {
    /// Shovel name on the broker; defaults to `metadata.name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub name: Option<String>,
    /// Virtual host the shovel is defined in.
    #[serde(default = "default_vhost")]
    #[schemars(length(min = 1))]
    pub vhost: String,
    /// A Secret with the keys `srcUri` and `destUri` (AMQP URIs; several separated by
    /// commas to fail over between).
    pub uri_secret: UriSecretReference,
    /// Source queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_queue: Option<String>,
    /// Source exchange; the shovel declares its own queue bound to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_exchange: Option<String>,
    /// Routing key the shovel's queue is bound to `srcExchange` with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_exchange_key: Option<String>,
    /// Most unacknowledged messages taken from the source at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub src_prefetch_count: Option<i32>,
    /// `never`, `queue-length` (the source queue's length when the shovel starts) or a
    /// number of messages, after which the shovel deletes itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new("type(self) == int ? self >= 0 : (self == 'never' || self == 'queue-length')").message("srcDeleteAfter is never, queue-length or a number of messages"))]
    pub src_delete_after: Option<IntOrString>,
    /// Arguments the shovel declares `srcQueue` with if it does not exist yet
    /// (`x-queue-type`, …): the shovel's `src-queue-args`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "crate::crd::free_form_map")]
    pub src_queue_args: BTreeMap<String, serde_json::Value>,
    /// Destination queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dest_queue: Option<String>,
    /// Arguments the shovel declares `destQueue` with if it does not exist yet
    /// (`x-queue-type`, …): the shovel's `dest-queue-args`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "crate::crd::free_form_map")]
    pub dest_queue_args: BTreeMap<String, serde_json::Value>,
    /// Destination exchange.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dest_exchange: Option<String>,
    /// Routing key used with `destExchange`; the message's own key when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dest_exchange_key: Option<String>,
    /// Add an `x-shovelled` header saying where the message came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dest_add_forward_headers: Option<bool>,
    /// Add an `x-shovelled-timestamp` header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dest_add_timestamp_header: Option<bool>,
    /// Message properties set on every shovelled message (e.g. `delivery_mode: 2`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "crate::crd::free_form_map")]
    pub dest_publish_properties: BTreeMap<String, serde_json::Value>,
    /// When the shovel acknowledges the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack_mode: Option<AckMode>,
    /// Seconds between reconnection attempts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub reconnect_delay: Option<i32>,
    /// The Warren cluster to configure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rabbit_cluster_reference: Option<RabbitClusterReference>,
    /// Or any broker reachable through a management API URL and credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_secret: Option<ConnectionSecretReference>,
    /// Remove the shovel from the broker when this resource is deleted, or keep it.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// What the operator observed of the shovel.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShovelStatus {
    /// `Ready` is true once the broker holds the shovel as the spec says.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `starting`, `running` or `terminated`, from the broker's `/api/shovels`; `finished`
    /// once a shovel with `srcDeleteAfter` has done its work.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// Why the shovel terminated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// True once a shovel with `srcDeleteAfter` has finished and deleted itself on the
    /// broker: it is not created again (and does not run again) unless the spec changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<bool>,
    /// Messages the shovel has forwarded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages_forwarded: Option<i64>,
}
